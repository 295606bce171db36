"""POST /v1/completions: a prompt continued, whole or streamed."""

from __future__ import annotations

from fastapi import APIRouter, Request

from .handling import Reply, complete, prepare, settings_of, stream, usage, worker_of
from .schemas import CompletionRequest

router = APIRouter()

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint


def _choice(text: str | None, finish: str | None) -> dict:
    return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    settings, worker = settings_of(request), worker_of(request)
    job = await prepare(settings, body, body.prompt, "prompt", body.max_tokens, "max_tokens", DEFAULT_MAX_TOKENS)
    reply = Reply.new("cmpl", "text_completion", settings.served_name(body.model))
    if job.streamed:
        lead = [_choice(body.prompt, None)] if body.echo else []
        return stream(request, worker, job, reply, _choice, body.include_usage, lead)
    done = await complete(request, worker, job)
    text = body.prompt + done.text if body.echo else done.text
    return reply.body([_choice(text, done.finish_reason)], usage=usage(job.prompt_tokens, len(done.token_ids)))
