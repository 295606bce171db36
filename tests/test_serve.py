"""`palm serve`: a real uvicorn server on loopback, driven by the real OpenAI client and raw httpx."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest
import uvicorn

from palm.cli import main
from palm.inference.generate import Generator, SamplingConfig
from palm.serve import create_app, listen, uvicorn_config

MODEL = "palm-test"
LIMIT = 64  # max_tokens_limit of the test server
BODY_LIMIT = 20_000  # bytes; an over-context prompt (~3.6 KB) still fits under it
PROMPT = "The meaning of life is"
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def generator(model_dir) -> Generator:
    return Generator.load(model_dir, device="cpu")


@contextmanager
def running(app) -> Iterator[str]:
    """`app` served by a real uvicorn on a free loopback port, as palm serve runs it; yields its base URL."""
    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    config = uvicorn_config(app, port, app.state.settings.options.read_timeout, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=1).json() == {"status": "ok"}:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield base
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def server(generator):
    app = create_app(generator, MODEL, max_tokens_limit=LIMIT, max_body_bytes=BODY_LIMIT, max_batch=8)
    with running(app) as base:
        yield base, app


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="x", max_retries=0, timeout=30)


def complete(base: str, prompt: str, max_tokens: int, **extra) -> dict:
    r = httpx.post(
        f"{base}/v1/completions",
        timeout=30,
        json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra},
    )
    assert r.status_code == 200, r.text
    return r.json()


def assert_openai_error(
    r: httpx.Response, status: int | tuple[int, ...], param: str | None = "any", kind: str = "invalid_request_error"
) -> dict:
    assert r.status_code in (status if isinstance(status, tuple) else (status,)), r.text
    error = r.json()["error"]
    assert set(error) == ERROR_KEYS and error["type"] == kind
    assert isinstance(error["message"], str) and error["message"]
    if param != "any":
        assert error["param"] == param, error
    return error


def test_health_and_models(server, client):
    assert httpx.get(f"{server[0]}/health").json() == {"status": "ok"}
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].object == "model" and models[0].owned_by == "palm" and isinstance(models[0].created, int)
    assert client.models.retrieve(MODEL).id == MODEL


def test_greedy_completion_equals_the_generator(generator, client):
    expected = generator.generate([PROMPT], SamplingConfig(max_new_tokens=8))[0]
    assert expected.text  # the lively fixture model writes something
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert out.object == "text_completion" and out.model == MODEL
    assert out.choices[0].text == expected.text
    assert out.choices[0].finish_reason == expected.finish_reason
    assert out.usage.prompt_tokens == expected.prompt_tokens
    assert out.usage.completion_tokens == len(expected.token_ids)
    assert out.usage.total_tokens == expected.prompt_tokens + len(expected.token_ids)


def test_streamed_completion_equals_the_whole_one(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_streamed_chat_equals_the_whole_one(client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_raw_shapes_and_sse_framing(server):
    base = server[0]
    body = complete(
        base,
        PROMPT,
        4,
        frequency_penalty=0.5,
        presence_penalty=0,
        user="u",
        logprobs=None,
        top_k=0,
        repetition_penalty=1.0,
        stop=["\n\n"],
        seed=1,
    )
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    assert set(body["choices"][0]) == {"index", "text", "finish_reason", "logprobs"}
    assert body["choices"][0]["logprobs"] is None and body["id"].startswith("cmpl-")
    assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    chat = httpx.post(
        f"{base}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0},
    ).json()
    assert set(chat) == {"id", "object", "created", "model", "choices", "usage"}
    assert set(chat["choices"][0]) == {"index", "message", "finish_reason", "logprobs"}
    assert set(chat["choices"][0]["message"]) == {"role", "content"}
    with httpx.stream(
        "POST",
        f"{base}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True},
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def stream_text(base: str, prompt: str, max_tokens: int, **extra) -> str:
    with httpx.stream(
        "POST",
        f"{base}/v1/completions",
        timeout=30,
        json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, **extra},
    ) as r:
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    return "".join(e["choices"][0]["text"] for e in events if e["choices"])


def test_concurrent_requests_join_the_running_batch_and_get_their_own_outputs(server):
    base, app = server
    worker = app.state.worker
    # Mixed prompt lengths, budgets and settings, streamed and not: 16 clients for 8 rows.
    asks = [
        (
            f"Request {i}: the quick brown fox" + " jumps" * (3 * i % 7),
            3 + i % 6,
            {"repetition_penalty": 1.3} if i % 3 == 0 else {},
            i % 2 == 1,
        )
        for i in range(16)
    ]

    def ask(prompt, n, extra, streamed):
        return (
            stream_text(base, prompt, n, **extra)
            if streamed
            else complete(base, prompt, n, **extra)["choices"][0]["text"]
        )

    expected = [ask(*a) for a in asks]  # each served alone
    assert len(set(expected)) > 4
    worker.batch_sizes.clear()
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda a: ask(*a), asks))
    assert got == expected
    assert 1 < max(worker.batch_sizes) <= 8  # they shared steps, never more than the rows


BAD_COMPLETIONS = {
    "max_tokens-not-int": ({"prompt": PROMPT, "max_tokens": "x"}, "max_tokens"),
    "missing-prompt": ({"max_tokens": 4}, "prompt"),
    "prompt-not-string": ({"prompt": 5}, "prompt"),
    "empty-prompt": ({"prompt": ""}, "prompt"),
    "max_tokens-over-limit": ({"prompt": PROMPT, "max_tokens": LIMIT + 1}, "max_tokens"),
    "max_tokens-zero": ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    "negative-temperature": ({"prompt": PROMPT, "temperature": -1}, "temperature"),
    "top_p-over-one": ({"prompt": PROMPT, "top_p": 1.5}, "top_p"),
    "n-over-128": ({"prompt": PROMPT, "n": 129}, "n"),
    "best_of-two": ({"prompt": PROMPT, "best_of": 2}, "best_of"),
    "logprobs-over-20": ({"prompt": PROMPT, "logprobs": 21}, "logprobs"),
    "max_tokens-zero-without-echo": ({"prompt": PROMPT, "max_tokens": 0, "logprobs": 1}, "max_tokens"),
    "over-context": ({"prompt": "hello world " * 300}, "prompt"),
    "over-context-streamed": ({"prompt": "hello world " * 300, "stream": True}, "prompt"),
    "frequency_penalty-over-two": ({"prompt": PROMPT, "frequency_penalty": 2.5}, "frequency_penalty"),
    "presence_penalty-under-minus-two": ({"prompt": PROMPT, "presence_penalty": -3}, "presence_penalty"),
    "logit_bias-not-an-id": ({"prompt": PROMPT, "logit_bias": {"the": 5}}, "logit_bias"),
    "logit_bias-past-vocabulary": ({"prompt": PROMPT, "logit_bias": {"99999": 5}}, "logit_bias"),
    "logit_bias-over-100": ({"prompt": PROMPT, "logit_bias": {"5": 101}}, "logit_bias"),
    "response_format-yaml": ({"prompt": PROMPT, "response_format": {"type": "yaml"}}, "response_format"),
    "tools-on-completions": ({"prompt": PROMPT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    "tool_choice-on-completions": ({"prompt": PROMPT, "tool_choice": "required"}, "tool_choice"),
    "functions": ({"prompt": PROMPT, "functions": [{"name": "f"}]}, "functions"),
    "suffix": ({"prompt": PROMPT, "suffix": "end"}, "suffix"),
    "token-past-vocabulary": ({"prompt": [1, 10**6]}, "prompt"),
    "negative-token": ({"prompt": [1, -2]}, "prompt"),
    "batch-with-a-bad-prompt": ({"prompt": ["a", ""]}, "prompt"),
    "empty-token-list": ({"prompt": []}, "prompt"),
}
BAD_CHATS = {
    "no-messages": ({"messages": []}, "messages"),
    "bad-role": ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    "content-not-text": ({"messages": [{"role": "user", "content": 3}]}, "messages.0.content"),
    "stop-not-strings": ({"messages": [{"role": "user", "content": "hi"}], "stop": [1]}, "stop"),
}


@pytest.mark.parametrize("name", [*BAD_COMPLETIONS, *(f"chat:{k}" for k in BAD_CHATS)])
def test_invalid_requests_get_openai_errors_and_the_server_carries_on(server, name):
    base = server[0]
    if name.startswith("chat:"):
        payload, param = BAD_CHATS[name[5:]]
        r = httpx.post(f"{base}/v1/chat/completions", json=payload)
    else:
        payload, param = BAD_COMPLETIONS[name]
        r = httpx.post(f"{base}/v1/completions", json=payload)
    error = assert_openai_error(r, (400, 422), param if param is not None else "any")
    if name.startswith("over-context"):
        assert error["code"] == "context_length_exceeded" and "256" in error["message"]
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    assert complete(base, PROMPT, 2)["choices"][0]["finish_reason"] in ("length", "stop")


def test_malformed_json_and_unknown_routes_use_the_error_shape(server):
    base = server[0]
    r = httpx.post(f"{base}/v1/completions", content=b'{"prompt": ', headers={"content-type": "application/json"})
    assert_openai_error(r, 400, None)
    r = httpx.get(f"{base}/v1/nothing")
    assert r.status_code == 404 and set(r.json()["error"]) == ERROR_KEYS


def test_oversized_bodies_get_413(server):
    base = server[0]
    big = json.dumps({"prompt": "x" * (BODY_LIMIT + 10_000), "max_tokens": 2}).encode()
    declared = httpx.post(f"{base}/v1/completions", content=big, headers={"content-type": "application/json"})
    assert_openai_error(declared, 413)
    # No Content-Length (chunked): the size is counted as the body arrives.
    chunked = httpx.post(
        f"{base}/v1/completions",
        content=iter([big[i : i + 4096] for i in range(0, len(big), 4096)]),
        headers={"content-type": "application/json"},
    )
    assert "content-length" not in chunked.request.headers
    assert_openai_error(chunked, 413)
    assert complete(base, PROMPT, 2)["object"] == "text_completion"


def test_a_client_leaving_mid_stream_does_not_wedge_the_server(server):
    base = server[0]
    with httpx.stream(
        "POST", f"{base}/v1/completions", json={"prompt": PROMPT, "max_tokens": LIMIT, "temperature": 0, "stream": True}
    ) as r:
        next(line for line in r.iter_lines() if line)
    assert complete(base, PROMPT, 3)["choices"][0]["text"] == complete(base, PROMPT, 3)["choices"][0]["text"]


def test_cli_serve_reports_errors_in_one_line(capsys, model_dir, tmp_path):
    def run(*argv):
        with pytest.raises(SystemExit) as info:
            main(["serve", *argv])
        lines = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 1 and len(lines) == 1 and lines[0].startswith("palm: error:"), lines
        return lines[0]

    assert "config.json" in run("--model", str(tmp_path), "--port", "0")
    assert "KV cache" in run("--model", model_dir, "--port", "0", "--max-batch", "100000000")  # before it allocates
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        assert "cannot listen" in run("--model", model_dir, "--port", str(taken.getsockname()[1]))
    finally:
        taken.close()


def test_logit_bias_and_penalties_steer_the_reply_as_openai_defines_them(generator, client):
    """+100 on one token makes it the only greedy choice; -100 on the greedy reply's first token takes it away;
    the penalties reach the sampler with the generated tokens counted (tests/test_sampling.py checks the formula)."""
    plain = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    token = generator.tokenizer.encode("好", bos=False)[0]
    forced = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logit_bias={str(token): 100}
    )
    assert forced.choices[0].text == generator.tokenizer.decode([token] * 6)
    first = generator.encode(PROMPT + plain.choices[0].text)[len(generator.encode(PROMPT))]
    away = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logit_bias={str(first): -100}
    )
    assert away.choices[0].text != plain.choices[0].text
    repeated = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, logit_bias={str(token): 8}, frequency_penalty=2.0
    )
    ids = generator.tokenizer.encode(repeated.choices[0].text, bos=False)
    assert 0 < ids.count(token) < 24  # +8 brings it in; each use costs 2 more until another token wins


def test_a_token_id_prompt_is_the_text_prompt_s_ids(generator, client):
    ids = generator.encode(PROMPT)
    by_text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    for prompt in (ids, [ids]):
        by_ids = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, echo=True)
        assert by_ids.choices[0].text == generator.tokenizer.decode(ids) + by_text.choices[0].text
        assert by_ids.usage.prompt_tokens == len(ids) == by_text.usage.prompt_tokens


def test_n_choices_and_a_batch_of_prompts(generator, client):
    ids = generator.encode(PROMPT)
    seeded = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=11, n=3)
    first, again = client.completions.create(**seeded), client.completions.create(**seeded)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in first.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]  # a seeded request repeats
    assert first.usage.prompt_tokens == len(ids)  # the prompt counted once
    alone = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=11)
    assert alone.choices[0].text == texts[0]
    other = "def f(x):"
    batch = client.completions.create(
        model=MODEL, prompt=[ids, generator.encode(other)], max_tokens=6, temperature=0, n=2
    )
    by_text = [
        client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0).choices[0].text
        for p in (PROMPT, other)
    ]
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == [by_text[0]] * 2 + [by_text[1]] * 2
    assert batch.usage.prompt_tokens == len(ids) + len(generator.encode(other))
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=1.0, seed=3, n=2
    )
    assert [c.index for c in chat.choices] == [0, 1]


def test_several_choices_and_prompts_stream_together_as_they_come_whole(generator, client):
    """Streamed, each choice's deltas (told apart by their index, interleaved) join into the text that the
    same request returns whole; usage counts each prompt once; chat gives every choice its role first."""
    ids = generator.encode(PROMPT)
    asked = dict(model=MODEL, prompt=[PROMPT, "def f(x):"], max_tokens=8, temperature=1.0, seed=5, n=2)
    whole = client.completions.create(**asked)
    texts, finishes, order = {}, {}, []
    for chunk in client.completions.create(**asked, stream=True, stream_options={"include_usage": True}):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            order.append(c.index)
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
        if chunk.usage is not None:
            usage = chunk.usage
    assert texts == {c.index: c.text for c in whole.choices} and len(texts) == 4 and len(set(texts.values())) > 2
    assert finishes == {c.index: c.finish_reason for c in whole.choices}
    assert order != sorted(order)  # the four rows decode side by side
    assert usage.prompt_tokens == whole.usage.prompt_tokens == len(ids) + len(generator.encode("def f(x):"))
    assert usage.completion_tokens == whole.usage.completion_tokens
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=1.0, seed=3, n=3)
    whole = client.chat.completions.create(**chat)
    texts, roles = {}, set()
    for chunk in client.chat.completions.create(**chat, stream=True):
        for c in chunk.choices:
            roles |= {c.index} if c.delta.role == "assistant" else set()
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    assert texts == {c.index: c.message.content for c in whole.choices} and roles == {0, 1, 2}
