"""`palm serve` under abuse: bounded requests, cancellation, a bounded queue, read deadlines, the API key,
and a 4xx (never a 5xx) for whatever a client sends. Each server here is real uvicorn on loopback.

The tests count the worker's work (decode steps, tokens per job) rather than time it: a slow step is a
gate the test opens, so what they assert holds on any machine.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from conftest import assert_one_line_error, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve import ERROR_KEYS, MODEL, PROMPT, assert_openai_error, running

from palm.inference.generate import Generator, SamplingConfig
from palm.serve import create_app

LIMIT = 64


@pytest.fixture(scope="module")
def generator(model_dir) -> Generator:
    return Generator.load(model_dir, device="cpu")


@pytest.fixture(scope="module")
def server(generator):
    app = create_app(generator, MODEL, max_tokens_limit=LIMIT)
    with running(app) as base:
        yield base, app


def wait_for(condition: Callable[[], bool], what: str, seconds: float = 30) -> None:
    """Polls `condition`; the deadline only turns a hang into a failure, nothing is timed."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def post(base: str, path: str, body: dict | bytes, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{base}{path}",
        content=content,
        headers={"content-type": "application/json", **kw.pop("headers", {})},
        timeout=kw.pop("timeout", 30),
        **kw,
    )


def raw_request(base: str, path: str, body: dict) -> socket.socket:
    """A request sent on a socket the test closes when it likes: a client that leaves."""
    host, port = base.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def tokens_of(generator: Generator, n: int) -> str:
    """A prompt of exactly `n` tokens (BOS included)."""
    words = ("alpha", "beta", "gamma", "delta")
    text = ""
    for i in range(4 * n):
        if len(generator.encode(text)) >= n:
            break
        text += f" {words[i % 4]}"
    while len(generator.encode(text)) > n:
        text = text[:-1]
    assert len(generator.encode(text)) == n
    return text


class Gate:
    """The worker's engine with its step number `hold` held until `release()`; `steps` holds, per engine
    step, the requests that got a token in it."""

    def __init__(self, monkeypatch, worker, hold: int = 1):
        self.steps: list[list] = []
        self.released = threading.Event()
        real = worker.engine.step

        def gated():
            if len(self.steps) == hold:
                assert self.released.wait(30)
            events = real()
            self.steps.append([request for request, _ in events])
            return events

        monkeypatch.setattr(worker.engine, "step", gated)

    def release(self) -> None:
        self.released.set()


def record_jobs(monkeypatch, worker) -> list:
    jobs, real = [], worker.submit

    def submit(job):
        real(job)
        jobs.append(job)

    monkeypatch.setattr(worker, "submit", submit)
    return jobs


# 1, 2. Bounds and text, refused with a 400 before the model does any work.


def bad(body: dict | str, param: str) -> tuple[bytes, str]:
    return (body.encode() if isinstance(body, str) else json.dumps(body).encode()), param


P = json.dumps(PROMPT)
BOUNDS = {
    "five-stops": bad({"prompt": PROMPT, "stop": list("abcde")}, "stop"),
    "20000-stops": bad({"prompt": PROMPT, "stop": [f"s{i}" for i in range(20_000)]}, "stop"),
    "long-stop": bad({"prompt": PROMPT, "stop": "x" * 65}, "stop"),
    "n-200": bad({"prompt": PROMPT, "n": 200}, "n"),
    "seed-2**63": bad({"prompt": PROMPT, "seed": 2**63, "temperature": 1}, "seed"),
    "seed-2**64": bad({"prompt": PROMPT, "seed": 2**64, "temperature": 1}, "seed"),
    "seed-negative": bad({"prompt": PROMPT, "seed": -1}, "seed"),
    "max_tokens-zero": bad({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    "max_tokens-over-limit": bad({"prompt": PROMPT, "max_tokens": LIMIT + 1}, "max_tokens"),
    "max_tokens-2**80": bad({"prompt": PROMPT, "max_tokens": 2**80}, "max_tokens"),
    "max_tokens-1e308": bad({"prompt": PROMPT, "max_tokens": 1e308}, "max_tokens"),
    "top_k-2**80": bad({"prompt": PROMPT, "top_k": 2**80, "temperature": 1}, "top_k"),
    "repetition_penalty-1e-300": bad(
        {"prompt": PROMPT, "repetition_penalty": 1e-300, "temperature": 1}, "repetition_penalty"
    ),
    "temperature-NaN": bad(f'{{"prompt": {P}, "temperature": NaN}}', "temperature"),
    "temperature-Infinity": bad(f'{{"prompt": {P}, "temperature": Infinity}}', "temperature"),
    "surrogate-prompt": bad('{"prompt": "caf\\ud800"}', "prompt"),
    "surrogate-stop": bad(f'{{"prompt": {P}, "stop": ["ok", "\\udfff"]}}', "stop"),
    "chat:surrogate-content": bad('{"messages": [{"role": "user", "content": "\\ud83d"}]}', "messages.0.content"),
    "chat:surrogate-part": bad(
        '{"messages": [{"role": "system", "content": "hi"}, {"role": "user", "content": '
        '[{"type": "text", "text": "\\ud83d!"}]}]}',
        "messages.1.content",
    ),
    "chat:max_completion_tokens-over-limit": bad(
        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": LIMIT + 1}, "max_completion_tokens"
    ),
    "chat:six-stops": bad({"messages": [{"role": "user", "content": "hi"}], "stop": list("abcdef")}, "stop"),
}


@pytest.mark.parametrize("name", BOUNDS)
def test_requests_over_the_bounds_get_400_before_the_model_works(server, name):
    base, app = server
    body, param = BOUNDS[name]
    worker = app.state.worker
    steps, batches = worker.decode_steps, len(worker.batch_sizes)
    path = "/v1/chat/completions" if name.startswith("chat:") else "/v1/completions"
    error = assert_openai_error(post(base, path, body), 400, param)
    if name.startswith("surrogate") or name.startswith("chat:surrogate"):
        assert "Unicode" in error["message"]
    assert (worker.decode_steps, len(worker.batch_sizes)) == (steps, batches)  # refused before any work
    assert complete_ok(base)


def complete_ok(base: str) -> bool:
    r = post(base, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "temperature": 0})
    return r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_the_prompt_and_max_tokens_must_fit_the_context(server, generator):
    base = server[0]
    prompt = tokens_of(generator, generator.context - 10)
    error = assert_openai_error(post(base, "/v1/completions", {"prompt": prompt, "max_tokens": 11}), 400, "max_tokens")
    assert error["code"] == "context_length_exceeded" and str(generator.context) in error["message"]
    fits = post(base, "/v1/completions", {"prompt": prompt, "max_tokens": 10, "temperature": 0})
    assert fits.status_code == 200 and fits.json()["usage"]["prompt_tokens"] == generator.context - 10
    # An unsaid max_tokens takes what room is left (chat's default is the server's limit, 64 > 10).
    content = tokens_of(generator, generator.context - 30)
    chat = post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": content}], "temperature": 0})
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["total_tokens"] <= generator.context


def test_bounds_within_the_limits_are_served(server, generator):
    base = server[0]
    stops = ["\u0000" * 64, "zz", "\n\n\n", "x" * 10]  # four stops of up to 64 characters: allowed
    r = post(
        base,
        "/v1/completions",
        {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stop": stops, "seed": 2**63 - 1, "n": 1},
    )
    assert r.status_code == 200, r.text
    # A temperature too small to divide logits by decodes greedily (vLLM's rule) instead of failing.
    tiny = post(base, "/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 1e-300})
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == generator.generate([PROMPT], SamplingConfig(max_new_tokens=6))[0].text


def test_the_bounds_are_configurable(generator):
    app = create_app(generator, MODEL, max_tokens_limit=LIMIT, max_total_tokens=40, max_stop=1, max_stop_length=3)
    prompt = tokens_of(generator, 30)
    with running(app) as base:
        assert_openai_error(post(base, "/v1/completions", {"prompt": prompt, "stop": ["a", "b"]}), 400, "stop")
        assert_openai_error(post(base, "/v1/completions", {"prompt": prompt, "stop": "abcd"}), 400, "stop")
        assert post(base, "/v1/completions", {"prompt": prompt, "stop": "abc", "max_tokens": 2}).status_code == 200
        too_long = post(base, "/v1/completions", {"prompt": prompt, "max_tokens": 11})
        assert "40" in assert_openai_error(too_long, 400, "max_tokens")["message"]
        over = post(base, "/v1/completions", {"prompt": tokens_of(generator, 41)})
        assert assert_openai_error(over, 400, "prompt")["code"] == "context_length_exceeded"
        chat = post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": 0})
        assert chat.status_code == 200 and chat.json()["usage"]["total_tokens"] <= 40


# 3. Cancellation.


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_abandoned_requests_stop_at_the_next_token_and_free_the_worker(generator, monkeypatch, streamed):
    app = create_app(generator, MODEL, max_tokens_limit=LIMIT, max_batch=4)
    worker = app.state.worker
    with running(app) as base:
        gate = Gate(monkeypatch, worker)
        jobs = record_jobs(monkeypatch, worker)
        body = {"prompt": PROMPT, "max_tokens": LIMIT, "temperature": 0, "stream": streamed}
        clients = [raw_request(base, "/v1/completions", body) for _ in range(8)]
        # The first step has run and the second waits; four rows at most are taken, the rest queue.
        wait_for(lambda: len(jobs) == 8 and len(gate.steps) == 1, "the requests did not queue")
        for sock in clients:
            sock.close()
        wait_for(lambda: all(j.cancelled.is_set() for j in jobs), "the server did not notice its clients leave")
        gate.release()
        wait_for(lambda: not worker.running and not worker.engine.requests, "the abandoned rows were not freed")
        abandoned_steps = len(gate.steps)
        r = post(base, "/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    # One step before the clients left, at most one more (the one in flight) after; the queued never started.
    assert abandoned_steps <= 2, gate.steps
    assert all(j.tokens <= 1 for j in jobs[:8]) and sum(j.tokens for j in jobs[:8]) == len(gate.steps[0])
    assert sorted(worker.engine.free) == list(range(4))


def test_a_client_leaving_mid_stream_frees_its_row_for_a_waiting_request(generator, monkeypatch):
    app = create_app(generator, MODEL, max_tokens_limit=LIMIT, max_batch=1)  # one row: the waiter needs the leaver's
    worker = app.state.worker
    with running(app) as base, ThreadPoolExecutor(1) as pool:
        gate = Gate(monkeypatch, worker, hold=3)
        jobs = record_jobs(monkeypatch, worker)
        leaver = raw_request(
            base, "/v1/completions", {"prompt": PROMPT, "max_tokens": LIMIT, "temperature": 0, "stream": True}
        )
        wait_for(lambda: len(gate.steps) == 3, "the stream did not start")
        waiter = pool.submit(post, base, "/v1/completions", {"prompt": PROMPT, "max_tokens": 5, "temperature": 0})
        wait_for(lambda: worker.waiting == 1, "the second request did not queue")
        leaver.close()
        wait_for(lambda: jobs[0].cancelled.is_set(), "the server did not notice its client leave")
        gate.release()
        r = waiter.result()
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    assert jobs[0].tokens <= 3
    first_of_waiter = next(i for i, step in enumerate(gate.steps) if step and step[0] is not gate.steps[0][0])
    assert first_of_waiter == 4  # the step after the one in flight when the client left


# 4. A bounded queue.


def test_a_full_pool_and_queue_answer_429_at_once_and_abandoned_requests_give_way(generator, monkeypatch):
    app = create_app(generator, MODEL, max_tokens_limit=LIMIT, max_batch=1, max_queue=2)
    worker = app.state.worker
    body = {"prompt": PROMPT, "max_tokens": 3, "temperature": 0}
    with running(app) as base, ThreadPoolExecutor(4) as pool:
        gate = Gate(monkeypatch, worker)
        first = [pool.submit(post, base, "/v1/completions", body)]
        wait_for(lambda: len(gate.steps) == 1, "the first request did not start")  # the pool's one row is taken
        waiting = [pool.submit(post, base, "/v1/completions", body)]
        leaver = raw_request(base, "/v1/completions", body)
        wait_for(lambda: worker.waiting == 2, "the queue did not fill")
        assert worker.engine.full  # the pool's rows are all taken and the queue is full: admission says 429
        full = post(base, "/v1/completions", body, timeout=10)
        error = assert_openai_error(full, 429, None, kind="rate_limit_error")
        assert error["code"] == "queue_full" and int(full.headers["retry-after"]) >= 1
        refused = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=10)
        with pytest.raises(openai.RateLimitError):
            refused.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        leaver.close()  # a client that leaves gives its place back
        wait_for(lambda: worker.waiting == 1, "the abandoned request kept its place")
        waiting.append(pool.submit(post, base, "/v1/completions", body))
        wait_for(lambda: worker.waiting == 2, "the freed place was not taken")
        gate.release()
        assert [f.result().status_code for f in (*first, *waiting)] == [200, 200, 200]


# 5. Read deadlines.


def test_slow_clients_are_cut_off_after_the_read_timeout(generator):
    app = create_app(generator, MODEL, max_tokens_limit=LIMIT, read_timeout=0.5)
    with running(app) as base:
        host, port = base.removeprefix("http://").split(":")
        # Headers, then a body that never finishes: a 408, and the connection closed.
        body_stalls = socket.create_connection((host, int(port)), timeout=10)
        body_stalls.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"prompt": '
        )
        answer = read_all(body_stalls)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
        assert set(error) == ERROR_KEYS and error["code"] == "request_timeout"
        # A body that trickles in, a byte at a time well within the timeout: the deadline is for the whole body.
        trickle = socket.create_connection((host, int(port)), timeout=10)
        trickle.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        answered = threading.Event()

        def drip():
            for _ in range(1000):
                if answered.wait(0.05):
                    return
                try:
                    trickle.sendall(b" ")
                except OSError:
                    return

        threading.Thread(target=drip, daemon=True).start()
        first = trickle.recv(65536)
        answered.set()
        trickle.close()
        assert first.startswith(b"HTTP/1.1 408"), first
        # Headers that never finish (a byte now and then is what a slowloris client sends): closed.
        headers_stall = socket.create_connection((host, int(port)), timeout=10)
        headers_stall.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        assert read_all(headers_stall) == b""
        # A connection that sends nothing at all: closed too.
        idle = socket.create_connection((host, int(port)), timeout=10)
        assert read_all(idle) == b""
        assert complete_ok(base)


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout if it never does)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    sock.close()
    return b"".join(chunks)


# 6. The API key.


def test_an_api_key_guards_every_route_but_health(generator):
    app = create_app(generator, MODEL, max_tokens_limit=LIMIT, api_key="sk-palm-test")
    with running(app) as base:
        right = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-palm-test", max_retries=0, timeout=30)
        assert [m.id for m in right.models.list().data] == [MODEL]
        assert right.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices[0].finish_reason
        wrong = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-palm-tesT", max_retries=0, timeout=30)
        for call in (
            wrong.models.list,
            lambda: wrong.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2),
            lambda: wrong.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}]),
        ):
            with pytest.raises(openai.AuthenticationError):
                call()
        bare = post(base, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
        assert assert_openai_error(bare, 401, None)["code"] == "invalid_api_key"
        assert bare.headers["www-authenticate"] == "Bearer"
        lowercase = post(
            base,
            "/v1/completions",
            {"prompt": PROMPT, "max_tokens": 2},
            headers={"authorization": "bearer sk-palm-test"},
        )
        assert lowercase.status_code == 200
        assert httpx.get(f"{base}/health").json() == {"status": "ok"}


# 7. Whatever the body, a 200 or an OpenAI-shaped 4xx.

# What broke the server before, and its neighbours: lone surrogates (JSON can spell them; hypothesis
# leaves them out of text by default), numbers past float32 and int64, NaN and Infinity, wrong shapes.
TRICKY = [
    2**31,
    2**63 - 1,
    2**63,
    2**64,
    2**80,
    -(2**80),
    1e308,
    -1e308,
    1e-300,
    1e-45,
    5e-324,
    float("nan"),
    float("inf"),
    float("-inf"),
    -0.0,
    "\ud800",
    "a\udfffb",
    "\ud83d\ude00",
    "\x00",
    [],
    {},
    [[]],
    [{}],
    [{"type": "text", "text": "\ud800"}],
    [{"type": "text"}],
    {"include_usage": "\ud800"},
]
texts = st.one_of(
    st.sampled_from(["", " ", "hi", PROMPT, "user", "\n\n", "<s>"]),
    st.sampled_from(["\ud800", "a\udfffb", "\udbff\udbff", "hi\ud83d"]),
    st.text(st.characters() | st.characters(categories=["Cs"]), min_size=1, max_size=12),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 80), st.floats(), texts, st.sampled_from(TRICKY))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(texts, inner, max_size=4)),
    max_leaves=10,
)
parts = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts}), max_size=2)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "user", "assistant", "developer"]),
            "content": st.one_of(st.none(), texts, parts),
        }
    ),
    min_size=1,
    max_size=3,
)
# Values each field may take (the server's limit on max_tokens is 4): a body of these reaches the model.
VALID = {
    "model": texts,
    "max_tokens": st.integers(1, 4),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(0, 50),
    "repetition_penalty": st.floats(0.5, 2),
    "n": st.just(1),
    "seed": st.integers(0, 2**63 - 1),
    "stop": texts | st.lists(texts, max_size=4),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "logprobs": st.none(),
    "best_of": st.just(1),
    "echo": st.booleans(),
}
FIELDS = ["prompt", "messages", "max_completion_tokens", *VALID]


def body_of(required: dict, extra: dict):
    """A body the server should serve, with at most one field made hostile: one bad field is enough to
    refuse a body at validation, so more would hide what lies deeper."""
    hostile = st.lists(
        st.tuples(st.sampled_from(FIELDS), st.one_of(st.sampled_from(TRICKY), texts, values)), max_size=1
    )
    return st.builds(
        lambda fixed, optional, bad: {**fixed, **optional, **dict(bad)},
        st.fixed_dictionaries(required),
        st.fixed_dictionaries({}, optional={**VALID, **extra}),
        hostile,
    )


requests = st.one_of(
    st.tuples(st.just("/v1/completions"), body_of({"prompt": texts | st.lists(texts, max_size=1)}, {})),
    st.tuples(
        st.just("/v1/chat/completions"), body_of({"messages": messages}, {"max_completion_tokens": st.integers(1, 4)})
    ),
    st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), values),
)


@pytest.fixture(scope="module")
def fuzzed(generator):
    app = create_app(generator, MODEL, max_tokens_limit=4)  # generation stays cheap whatever is asked
    with running(app) as base, httpx.Client(base_url=base, timeout=30) as http:
        yield http


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=requests)
def test_no_body_gets_a_5xx(fuzzed, request):
    path, body = request
    # Python's json writes NaN and Infinity literals and \\ud800 escapes, as a hostile client may.
    content = json.dumps(body, allow_nan=True).encode()
    with fuzzed.stream("POST", path, content=content, headers={"content-type": "application/json"}) as r:
        text = r.read().decode()
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, text)
    if r.status_code == 200:
        assert "server_error" not in text, text
    else:
        error = json.loads(text)["error"]
        assert set(error) == ERROR_KEYS and error["type"] == "invalid_request_error" and error["message"], error


def test_the_fuzzed_server_still_serves(fuzzed):
    r = fuzzed.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 200 and fuzzed.get("/health").json() == {"status": "ok"}


# 8. Options checked before anything starts.


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--port", "70000"], ["--port", "65535", "70000"]),
        (["--port", "-1"], ["--port"]),
        (["--max-tokens-limit", "0"], ["--max-tokens-limit"]),
        (["--max-total-tokens", "0"], ["--max-total-tokens"]),
        (["--max-stop", "-1"], ["--max-stop"]),
        (["--max-stop-length", "0"], ["--max-stop-length"]),
        (["--max-batch", "0"], ["--max-batch"]),
        (["--max-queue", "0"], ["--max-queue"]),
        (["--max-model-len", "0"], ["--max-model-len"]),
        (["--prefill-chunk", "0"], ["--prefill-chunk"]),
        (["--quantize", "int4"], ["--quantize", "int8"]),
        (["--read-timeout", "0"], ["--read-timeout"]),
        (["--read-timeout", "nan"], ["--read-timeout"]),
        (["--api-key", ""], ["API key"]),
        (["--api-key", " sk "], ["API key"]),
    ],
)
def test_cli_serve_refuses_bad_options_in_one_line(capsys, tmp_path, argv, words):
    # tmp_path holds no model: an option's error must come first, before anything loads or listens.
    code, _, err = run_cli(capsys, "serve", "--model", str(tmp_path), *argv)
    assert_one_line_error(code, err, *words)
