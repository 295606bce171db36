"""POST /v1/chat/completions: a conversation rendered to a prompt, and the assistant's turn generated."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, Request

from ..inference.generate import Generator
from ..inference.structured import GrammarError, tool_schema
from ..text.chat import ChatError, check_messages, encode_prompt
from ..text.templates import reply_text
from .handling import Reply, complete, fan_out, prepare, settings_of, stream, usage, worker_of
from .logprobs import chat_logprobs
from .schemas import APIError, ChatMessage, ChatRequest

router = APIRouter()


def render_chat(generator: Generator, messages: list[ChatMessage]) -> list[int]:
    """The prompt's ids for a conversation: the chat template the model's tokenizer carries (palm's, which
    chat fine-tuning trained on, unless the folder has another), rendered as `palm generate --chat` does.
    The reply ends at the template's end-of-turn token, `</s>`, which is the model's eos."""
    from jinja2 import TemplateError  # Transformers renders chat templates with it, so it is there

    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.content or ""} for m in messages]
    try:
        return encode_prompt(generator.tokenizer, check_messages(turns))
    except ChatError as e:
        raise APIError(400, str(e), "messages") from None
    except TemplateError as e:  # a template's raise_exception(): roles out of order, say
        raise APIError(400, f"the model's chat template refused these messages: {e}", "messages") from None


def tool_call(text: str, tools: list[dict]) -> dict | None:
    """OpenAI's tool_calls entry for a reply that is a call {"name": ..., "arguments": {...}} of one of the
    tools (what a required call is constrained to; with "auto", a reply that happens to be one), else None."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    names = {t["function"]["name"] for t in tools}
    if not (isinstance(value, dict) and value.get("name") in names and isinstance(value.get("arguments"), dict)):
        return None
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": value["name"], "arguments": json.dumps(value["arguments"], ensure_ascii=False)},
    }


def _delta(index: int, delta: dict, finish: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}


def _streamed_choices(tokenizer, logprobs: int | None, index: int, tools: list[dict] | None):
    """Choice `index`'s chunk builder: the reply's first text loses the space the template puts after
    `Assistant:` (as `reply_text` does for a whole reply); with logprobs, the delta's tokens' own. With tools, a
    reply that opens with `{` is held back until it ends: a call of one of them goes out as one `tool_calls`
    delta (finish "tool_calls"), anything else as the text it was."""
    started, held, held_scores = False, list[str](), list[Any]()

    def content(text: str, scores: list, finish: str | None) -> dict:
        found = (
            chat_logprobs(tokenizer, [t for t, _ in scores], [s for _, s in scores])
            if logprobs is not None and scores
            else None
        )
        return _delta(index, {"content": text}, finish, found)

    def choice(text: str | None, finish: str | None, scores: Sequence = ()) -> list[dict]:
        nonlocal started
        if text is not None:
            if not started:
                text = reply_text(text)
                started = bool(text)
            if tools and (held or text.startswith("{")):
                held.append(text)
                held_scores.extend(scores)
                return []
            return [content(text, list(scores), None)] if text or scores else []
        out = []
        if held:
            whole = "".join(held)
            call = tool_call(whole, tools or [])
            if call is not None:
                return [_delta(index, {"tool_calls": [{"index": 0, **call}]}, None), _delta(index, {}, "tool_calls")]
            out.append(content(whole, held_scores, None))
        return [*out, _delta(index, {}, finish)]

    return choice


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    settings, worker = settings_of(request), worker_of(request)
    # max_completion_tokens is OpenAI's newer name for max_tokens: a client that sends both means it.
    requested, param = body.max_tokens, "max_tokens"
    if body.max_completion_tokens is not None:
        requested, param = body.max_completion_tokens, "max_completion_tokens"
    prompt = render_chat(settings.generator, body.messages)
    calls = body.calls_required()
    as_json, schema = body.output_schema()
    try:
        structured = (
            (tool_schema(body.tools, body.tool_choice), "tools")
            if calls
            else (schema, "response_format")
            if as_json
            else None
        )
    except GrammarError as e:
        raise APIError(400, str(e), "tool_choice") from None
    # An unsaid max_tokens lets the turn run to the server's limit (OpenAI's: to the context).
    job = await prepare(
        settings, body, prompt, "messages", requested, param, settings.options.max_tokens_limit, structured=structured
    )
    jobs = fan_out(job, body.choices)
    tools = body.tools if body.tools and body.tool_choice != "none" else None
    if job.streamed:
        reply = Reply.new("chatcmpl", "chat.completion.chunk", settings.served_name(body.model))
        lead = [_delta(i, {"role": "assistant", "content": ""}, None) for i in range(len(jobs))]
        builders = [_streamed_choices(settings.generator.tokenizer, job.logprobs, i, tools) for i in range(len(jobs))]
        return stream(request, worker, jobs, reply, builders, body.include_usage, job.prompt_tokens, lead)
    dones = await asyncio.gather(*(complete(request, worker, j) for j in jobs))
    reply = Reply.new("chatcmpl", "chat.completion", settings.served_name(body.model))
    choices = []
    for index, (j, done) in enumerate(zip(jobs, dones)):
        logprobs = (
            chat_logprobs(settings.generator.tokenizer, done.token_ids, j.scores) if j.logprobs is not None else None
        )
        message: dict[str, Any] = {"role": "assistant", "content": reply_text(done.text)}
        finish = done.finish_reason
        call = tool_call(reply_text(done.text), tools) if tools else None
        if call is not None:
            message, finish = {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
        choices.append({"index": index, "message": message, "finish_reason": finish, "logprobs": logprobs})
    return reply.body(choices, usage=usage(job.prompt_tokens, sum(len(d.token_ids) for d in dones)))
