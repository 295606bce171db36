"""Continuous batching (palm.inference.engine): requests that join and leave a running batch at any step."""

import pytest
import torch
from conftest import lively_model, tiny_config

from palm.inference.engine import Engine, Request, bucket
from palm.inference.generate import GenerationError, Generator, SamplingConfig

PROMPTS = [
    "我喜欢编程，因为",
    "The quick brown fox jumps over the lazy dog. " * 4,
    "x = 12",
    "def f(a, b):\n    return",
    "hello",
    "自然语言处理是计算机科学的一个分支",
]


@pytest.fixture(scope="module")
def generator(tokenizer):
    return Generator(lively_model(tiny_config(tokenizer)), tokenizer)


def run(engine: Engine, arrivals: list[tuple[int, Request]], max_steps: int = 500) -> list[list[tuple[Request, int]]]:
    """Add each request at its step (or as soon as a row is free after it); the events of every step."""
    waiting, steps = sorted(arrivals, key=lambda a: a[0]), []
    while waiting or engine.requests:
        while waiting and waiting[0][0] <= len(steps) and engine.add(waiting[0][1]):
            waiting.pop(0)
        steps.append(engine.step() if engine.requests else [])
        assert len(steps) < max_steps
    return steps


def text_ids(generator, request: Request) -> list[int]:
    return [t for t in request.tokens if t not in generator.eos_ids]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_each_request_gets_its_solo_greedy_output_whenever_it_joins(generator, tokenizer, dtype):
    if dtype != torch.float32:  # bf16's own kernels (oneDNN's packed matmul on a CPU) must be row-exact too
        generator = Generator(lively_model(tiny_config(tokenizer)).to(dtype), tokenizer)
    settings = [
        dict(max_new_tokens=12),
        dict(max_new_tokens=20, repetition_penalty=1.3),
        dict(max_new_tokens=5),
        dict(max_new_tokens=30),
        dict(max_new_tokens=16, repetition_penalty=1.2),
        dict(max_new_tokens=9),
    ]
    cfgs = [SamplingConfig(**s) for s in settings]
    if dtype == torch.float32:
        solo = [generator.generate([p], c)[0].token_ids for p, c in zip(PROMPTS, cfgs)]
    else:  # each alone in the engine: bf16 rounds a prompt prefilled in chunks apart from one prefilled whole
        alone = [Request(generator.encode(p), c) for p, c in zip(PROMPTS, cfgs)]
        for request in alone:
            run(Engine(generator, max_batch=4, prefill_chunk=8), [(0, request)])
        solo = [text_ids(generator, r) for r in alone]
    assert len({tuple(s) for s in solo}) == len(solo)
    # Four rows for six requests, a prefill budget that cuts the long prompt into chunks, arrivals spread out.
    engine = Engine(generator, max_batch=4, prefill_chunk=8)
    requests = [Request(generator.encode(p), c) for p, c in zip(PROMPTS, cfgs)]
    steps = run(engine, list(zip([0, 0, 2, 3, 7, 8], requests)))
    assert [text_ids(generator, r) for r in requests] == solo
    assert max(len(events) for events in steps) >= 3  # they did share steps
    assert engine.requests == [] and sorted(engine.free) == [0, 1, 2, 3]


def test_seeded_sampling_repeats_whatever_shares_the_batch(generator):
    def sampled(seed):
        return SamplingConfig(
            max_new_tokens=16, temperature=1.0, top_k=40, top_p=0.9, repetition_penalty=1.1, seed=seed
        )

    alone = Request(generator.encode(PROMPTS[0]), sampled(7))
    run(Engine(generator, max_batch=1), [(0, alone)])
    crowd = [Request(generator.encode(p), sampled(7) if i == 2 else sampled(100 + i)) for i, p in enumerate(PROMPTS)]
    crowd[2].prompt = generator.encode(PROMPTS[0])
    run(Engine(generator, max_batch=6, prefill_chunk=16), [(i, r) for i, r in enumerate(crowd)])
    assert crowd[2].tokens == alone.tokens
    other = Request(generator.encode(PROMPTS[0]), sampled(8))
    run(Engine(generator, max_batch=1), [(0, other)])
    assert other.tokens != alone.tokens


def test_a_removed_request_frees_its_row_at_the_next_step(generator):
    engine = Engine(generator, max_batch=1)
    leaving = Request(generator.encode(PROMPTS[0]), SamplingConfig(max_new_tokens=50))
    waiting = Request(generator.encode(PROMPTS[2]), SamplingConfig(max_new_tokens=4))
    assert engine.add(leaving)
    assert not engine.add(waiting) and engine.full  # one row, taken: the caller keeps it waiting
    engine.step(), engine.step()
    produced = len(leaving.tokens)
    engine.remove(leaving)
    assert engine.add(waiting) and waiting.row == 0
    events = engine.step()
    assert [r for r, _ in events] == [waiting] and len(leaving.tokens) == produced
    run(engine, [])
    assert text_ids(generator, waiting) == generator.generate([PROMPTS[2]], waiting.cfg)[0].token_ids


def test_prefill_of_a_long_prompt_is_interleaved_with_decoding(generator):
    engine = Engine(generator, max_batch=2, prefill_chunk=8)
    running = Request(generator.encode(PROMPTS[0]), SamplingConfig(max_new_tokens=40))
    engine.add(running)
    while not running.tokens:  # its own prompt in, a chunk per step
        engine.step()
    long = Request(generator.encode(PROMPTS[1]), SamplingConfig(max_new_tokens=3))
    assert len(long.prompt) > 4 * 8
    engine.add(long)
    chunks = -(-len(long.prompt) // 8)
    for _ in range(chunks):
        assert running in [r for r, _ in engine.step()]  # the running stream gets a token at every step
    assert long.fed == len(long.prompt) and len(long.tokens) == 1  # and the prompt went in a chunk per step


def test_length_limits(generator):
    engine = Engine(generator, max_batch=2, max_len=24)
    with pytest.raises(GenerationError, match="24"):
        engine.add(Request(generator.encode(PROMPTS[1]), SamplingConfig()))
    short = Request(generator.encode(PROMPTS[2]), SamplingConfig(max_new_tokens=1000))
    run(engine, [(0, short)])
    assert short.finish == "length" and len(short.prompt) + len(short.tokens) == 24


def test_windows_are_powers_of_two():
    assert [bucket(n, 16, 64) for n in (1, 16, 17, 33, 64, 100)] == [16, 16, 32, 64, 64, 64]
    assert [bucket(n, 1, 6) for n in (1, 2, 3, 5, 6)] == [1, 2, 4, 6, 6]


def test_the_pool_is_allocated_once(generator):
    engine = Engine(generator, max_batch=3, max_len=32)
    c = generator.model.config
    assert engine.cache.nbytes() == 2 * c.num_hidden_layers * 3 * c.num_key_value_heads * 32 * c.head_dim * 4
    keys = [k.data_ptr() for k in engine.cache.keys]
    run(
        engine,
        [(i, Request(generator.encode(p), SamplingConfig(max_new_tokens=4))) for i, p in enumerate(PROMPTS[2:5])],
    )
    assert [k.data_ptr() for k in engine.cache.keys] == keys and torch.isfinite(engine.cache.keys[0]).all()


@pytest.mark.parametrize("chunk", [8, 24], ids=["one-block-a-step", "three-blocks-a-step"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_shared_prefix_is_copied_not_prefilled_and_changes_no_token(tokenizer, dtype, chunk):
    """Prompts that share a long system prompt, arriving while the first is still being prefilled and after
    it: with reuse, their whole shared blocks are copied from the row that holds them (only what that row
    has prefilled so far), and every token equals the run without reuse (cut in the same blocks)."""
    generator = Generator(lively_model(tiny_config(tokenizer)).to(dtype), tokenizer)
    system = tokenizer.encode("You are a helpful assistant who answers in one short sentence. " * 3)
    prompts = [
        system + tokenizer.encode(q, bos=False)
        for q in ("What is 2 + 2?", "Name a colour.", "说一个城市。", "What is 2 + 3?")
    ]
    prompts.append(tokenizer.encode("An unrelated prompt with nothing shared"))

    def serve(reuse: bool) -> tuple[list[list[int]], int]:
        engine = Engine(generator, max_batch=4, prefill_chunk=chunk, reuse=reuse, block=8)
        requests = [Request(list(p), SamplingConfig(max_new_tokens=10)) for p in prompts]
        run(engine, list(zip([0, 1, 40, 40, 41], requests)))
        return [r.tokens for r in requests], engine.reused_tokens

    plain, none = serve(False)
    shared, reused = serve(True)
    assert shared == plain and none == 0
    # request 1 arrives after one step (the first 8 tokens are in), requests 2 and 3 once the first two are done
    whole = (len(system) // 8) * 8
    assert reused >= 8 + 2 * whole and len(system) > 16  # (more where "What is 2 + " is shared too)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_choices_of_one_prompt_fork_from_one_prefill(tokenizer, dtype):
    """OpenAI's n: requests for the same prompt, arriving together or while it is prefilled, take its keys,
    values and last logits from the row that prefilled it (the prompt runs through the model once), and each
    samples exactly what it samples alone."""
    generator = Generator(lively_model(tiny_config(tokenizer)).to(dtype), tokenizer)
    prompt = tokenizer.encode("The choices of one prompt share its prefill: " * 3)
    cfgs = [SamplingConfig(max_new_tokens=8, temperature=0.9, seed=s) for s in (1, 2, 3, 4)] + [
        SamplingConfig(max_new_tokens=8, temperature=0.0)
    ]

    def serve(requests: list[Request], arrivals: list[int]) -> Engine:
        engine = Engine(generator, max_batch=8, prefill_chunk=16)
        calls = []
        prefill = generator.step.prefill
        generator.step.prefill = lambda *a, **k: calls.append(a[1].shape[1]) or prefill(*a, **k)
        try:
            run(engine, list(zip(arrivals, requests)))
        finally:
            del generator.step.prefill
        engine.prefilled = sum(calls)
        return engine

    alone = []
    for cfg in cfgs:
        request = Request(list(prompt), cfg)
        serve([request], [0])
        alone.append(request.tokens)
    requests = [Request(list(prompt), cfg) for cfg in cfgs]
    engine = serve(requests, [0, 0, 0, 1, 40])  # the fourth arrives mid-prefill, the last after all are done
    assert [r.tokens for r in requests] == alone
    assert len(set(map(tuple, alone))) > 2  # the seeds differ
    assert engine.prefilled == len(prompt) and engine.reused_tokens == 4 * len(prompt) and len(prompt) > 32
