"""POST /v1/chat/completions: a conversation rendered to a prompt, and the assistant's turn generated."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..generate import Generator
from .handling import Reply, complete, prepare, settings_of, stream, usage, worker_of
from .schemas import APIError, ChatMessage, ChatRequest

router = APIRouter()

# Stops added to chat requests rendered with the plain "<role>: <content>" template, so that a
# model trained on that format ends its turn instead of writing the user's next line.
PLAIN_CHAT_STOPS = ["\nuser:", "\nsystem:"]


def render_chat(generator: Generator, messages: list[ChatMessage]) -> tuple[str, list[str]]:
    """The prompt for a conversation, and the stop strings its template implies."""
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.content or ""} for m in messages]
    hf = generator.tokenizer.hf
    if getattr(hf, "chat_template", None):
        from jinja2 import TemplateError  # Transformers renders chat templates with it, so it is there

        try:
            text = hf.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        except TemplateError as e:  # a template's raise_exception(): roles out of order, say
            raise APIError(400, f"the model's chat template refused these messages: {e}", "messages") from None
        bos = getattr(hf, "bos_token", None)
        if bos and text.startswith(bos):
            text = text[len(bos):]  # Generator.encode adds BOS itself
        return text, []
    return "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:", PLAIN_CHAT_STOPS


def _delta(delta: dict, finish: str | None) -> dict:
    return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}


def _streamed_choice(text: str | None, finish: str | None) -> dict:
    return _delta({} if text is None else {"content": text}, finish)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    settings, worker = settings_of(request), worker_of(request)
    # max_completion_tokens is OpenAI's newer name for max_tokens: a client that sends both means it.
    requested, param = body.max_tokens, "max_tokens"
    if body.max_completion_tokens is not None:
        requested, param = body.max_completion_tokens, "max_completion_tokens"
    prompt, stops = render_chat(settings.generator, body.messages)
    # An unsaid max_tokens lets the turn run to the server's limit (OpenAI's: to the context).
    job = await prepare(settings, body, prompt, "messages", requested, param, settings.options.max_tokens_limit, stops)
    if job.streamed:
        reply = Reply.new("chatcmpl", "chat.completion.chunk", settings.model_name)
        lead = [_delta({"role": "assistant", "content": ""}, None)]
        return stream(request, worker, job, reply, _streamed_choice, body.include_usage, lead)
    done = await complete(request, worker, job)
    message = {"role": "assistant", "content": done.text}
    reply = Reply.new("chatcmpl", "chat.completion", settings.model_name)
    return reply.body([{"index": 0, "message": message, "finish_reason": done.finish_reason, "logprobs": None}],
                      usage=usage(job.prompt_tokens, len(done.token_ids)))
