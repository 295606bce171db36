"""POST /v1/completions: a prompt continued, whole or streamed."""

from __future__ import annotations

from fastapi import APIRouter, Request

from .handling import Reply, complete, count_prompt, settings_of, stream_events, stream_response, usage, worker_of
from .schemas import CompletionRequest

router = APIRouter()

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint


def _choice(text: str | None, finish: str | None) -> dict:
    return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    settings, worker = settings_of(request), worker_of(request)
    cfg = body.sampling(settings.max_tokens(body.max_tokens, DEFAULT_MAX_TOKENS))
    prompt_tokens = await count_prompt(settings.generator, body.prompt, "prompt")
    reply = Reply.new("cmpl", "text_completion", settings.model_name)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        lead = [_choice(body.prompt, None)] if body.echo else []
        events = stream_events(worker, body.prompt, cfg, prompt_tokens, reply, _choice, include_usage, lead)
        return stream_response(events)
    done = await complete(worker, body.prompt, cfg, prompt_tokens)
    text = body.prompt + done.text if body.echo else done.text
    return reply.body([_choice(text, done.finish_reason)], usage=usage(prompt_tokens, len(done.token_ids)))
