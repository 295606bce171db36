"""POST /v1/completions: a prompt continued, whole or streamed; several prompts, several choices each."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from fastapi import APIRouter, Request

from .handling import Reply, complete, fan_out, prepare, settings_of, stream, usage, worker_of
from .logprobs import completion_logprobs
from .schemas import CompletionRequest

router = APIRouter()

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint


def _choices(tokenizer, logprobs: int | None, index: int):
    """Choice `index`'s streamed builder: text, and with logprobs the log-probabilities of the delta's tokens."""

    def choice(text: str | None, finish: str | None, scores: Sequence = ()) -> list[dict]:
        body = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
        if logprobs is not None and scores:
            body["logprobs"] = completion_logprobs(tokenizer, [t for t, _ in scores], [s for _, s in scores])
        return [body]

    return choice


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    settings, worker = settings_of(request), worker_of(request)
    tokenizer = settings.generator.tokenizer
    prompts = body.prompts
    as_json, schema = body.output_schema()
    structured = (schema, "response_format") if as_json else None
    jobs = [
        await prepare(
            settings, body, p, "prompt", body.max_tokens, "max_tokens", DEFAULT_MAX_TOKENS, structured=structured
        )
        for p in prompts
    ]
    reply = Reply.new("cmpl", "text_completion", settings.served_name(body.model))
    runs = [fan_out(job, body.choices) for job in jobs]  # n choices of each prompt, in order
    prompt_tokens = sum(j.prompt_tokens for j in jobs)  # OpenAI counts each prompt once, whatever n is
    if jobs[0].streamed and not body.score_only:
        builders = [_choices(tokenizer, jobs[0].logprobs, i) for i in range(len(jobs) * body.choices)]
        lead = (
            [
                builders[i](body.prompt_text(prompts[i // body.choices], tokenizer), None)[0]
                for i in range(len(builders))
            ]
            if body.echo
            else []
        )
        return stream(
            request, worker, [j for run in runs for j in run], reply, builders, body.include_usage, prompt_tokens, lead
        )
    dones = await asyncio.gather(*(complete(request, worker, j) for run in runs for j in run))
    choices, completion_tokens = [], 0
    for index, (job, done) in enumerate(zip([j for run in runs for j in run], dones)):
        prompt = prompts[index // body.choices]
        tokens, scores, text = list(done.token_ids), list(job.scores), done.text
        if body.score_only:  # max_tokens 0: the one token generated to run the prompt through is not returned
            tokens, scores, text = [], [], ""
        logprobs = None
        if job.logprobs is not None:
            head = (list(job.prompt_ids), list(job.prompt_scores)) if body.echo else ([], [])
            logprobs = completion_logprobs(tokenizer, head[0] + tokens, head[1] + scores)
        echoed = body.prompt_text(prompt, tokenizer) if body.echo else ""
        choices.append(
            {
                "index": index,
                "text": echoed + text,
                "logprobs": logprobs,
                "finish_reason": "length" if body.score_only else done.finish_reason,
            }
        )
        completion_tokens += len(tokens)
    return reply.body(choices, usage=usage(prompt_tokens, completion_tokens))
