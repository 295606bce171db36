"""palm serve under mixed load: 64 requests at once (completions and chats, streamed and not, greedy and
seeded, a third of the streams left mid-way by their clients). Every reply that finishes equals the same
request served alone, the pool of cache rows is empty afterwards, and the server goes on answering."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import torch
from conftest import lively_model, tiny_config
from test_serve import running

from palm.inference.generate import Generator
from palm.serve import create_app

WORDS = "the model reads every weight once per step 我喜欢编程 因为 def f(x): return".split()


def requests() -> list[dict]:
    """64 distinct requests: every third streamed one is left after its first chunk."""
    out = []
    for i in range(64):
        prompt = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(3 + i % 11))
        chat, streamed = i % 2 == 0, i % 4 in (1, 2)
        sampling = {"temperature": 0.0} if i % 3 == 0 else {"temperature": 0.9, "seed": 1000 + i}
        body = {"model": "m", "max_tokens": 6 + i % 9, **sampling, "stream": streamed}
        body |= {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
        out.append(
            {
                "route": "/v1/chat/completions" if chat else "/v1/completions",
                "body": body,
                "leave": streamed and i % 3 == 1,
            }
        )
    return out


async def send(client: httpx.AsyncClient, base: str, req: dict) -> str | None:
    """The reply's text (the stream's deltas joined), or None for a client that left mid-stream."""
    url, body = base + req["route"], req["body"]
    if not body["stream"]:
        r = await client.post(url, json=body)
        r.raise_for_status()
        choice = r.json()["choices"][0]
        return choice["message"]["content"] if "message" in choice else choice["text"]
    text = ""
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"]
            if not choice:
                continue
            delta = choice[0].get("delta", {}).get("content") if "delta" in choice[0] else choice[0].get("text")
            text += delta or ""
            if req["leave"] and text:
                return None  # the client goes: closing the response cancels the generation
    return text


async def all_at_once(base: str, reqs: list[dict]) -> list[str | None]:
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=80)) as client:
        return await asyncio.gather(*(send(client, base, r) for r in reqs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mixed_load_gives_every_request_its_solo_reply(tokenizer, dtype):
    generator = Generator(lively_model(tiny_config(tokenizer)).to(dtype), tokenizer)
    app = create_app(generator, "m", max_batch=16)
    reqs = requests()
    with running(app) as base:
        solo = [asyncio.run(all_at_once(base, [{**r, "leave": False}]))[0] for r in reqs]
        mixed = asyncio.run(all_at_once(base, reqs))
        engine = app.state.worker.engine
        deadline = time.monotonic() + 30
        while (engine.requests or len(engine.free) < engine.max_batch) and time.monotonic() < deadline:
            time.sleep(0.05)  # the rows of the clients that left are freed at the worker's next step
        assert engine.requests == [] and sorted(engine.free) == list(range(engine.max_batch))
        again = asyncio.run(all_at_once(base, [{**reqs[0], "leave": False}]))[0]
    finished = [(s, m) for s, m, r in zip(solo, mixed, reqs) if not r["leave"]]
    assert len(finished) == 64 - sum(r["leave"] for r in reqs) and sum(r["leave"] for r in reqs) >= 10
    assert [m for _, m in finished] == [s for s, _ in finished]
    assert all(m is None for m, r in zip(mixed, reqs) if r["leave"])
    assert len({s for s, _ in finished}) > 20  # distinct replies: the check can tell rows apart
    assert again == solo[0]
