"""Log-probabilities through the openai client (fp32): completions' and chat's `logprobs` equal the model's own
log-softmax (1e-5), streamed and not; `echo` with `max_tokens: 0` scores a prompt exactly as palm eval's
in-process log-likelihoods do."""

from __future__ import annotations

import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve import running

from palm.evaluate import loglikelihoods, split_for_scoring
from palm.inference.generate import Generator, SamplingConfig
from palm.serve import create_app

PROMPT = "我喜欢编程，因为"


@pytest.fixture(scope="module")
def served(model_dir):
    generator = Generator.load(model_dir, device="cpu", dtype="fp32")
    with running(create_app(generator, "m", max_batch=4)) as base:
        yield generator, openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=30)


def model_logprobs(generator: Generator, ids: list[int]) -> torch.Tensor:
    """log-softmax at every position of `ids` [T, V], from the model itself (Transformers' forward)."""
    with torch.no_grad():
        return generator.model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_completion_logprobs_are_the_model_s_streamed_or_not(served):
    generator, client = served
    prompt = generator.encode(PROMPT)
    plain = dict(temperature=0, extra_body={"repetition_penalty": 1.0})  # the model's saved default is 1.2
    whole = client.completions.create(model="m", prompt=PROMPT, max_tokens=8, logprobs=3, **plain)
    lp = whole.choices[0].logprobs
    tokens = generator.generate([PROMPT], SamplingConfig(max_new_tokens=8))[0].token_ids
    assert (
        len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == whole.usage.completion_tokens == len(tokens)
    )
    reference = model_logprobs(generator, prompt + tokens)
    for i, got in enumerate(lp.token_logprobs):
        row = reference[len(prompt) - 1 + i]
        assert abs(got - row[tokens[i]].item()) < 1e-5 and abs(got - row.max().item()) < 1e-5  # greedy
        assert sorted(lp.top_logprobs[i].values(), reverse=True) == pytest.approx(row.topk(3).values.tolist(), abs=1e-5)
    streamed = client.completions.create(model="m", prompt=PROMPT, max_tokens=8, logprobs=3, stream=True, **plain)
    values = [v for chunk in streamed for c in chunk.choices if c.logprobs for v in c.logprobs.token_logprobs]
    assert values == pytest.approx(lp.token_logprobs, abs=1e-6)


def test_echo_scores_the_prompt_as_palm_eval_does(served):
    generator, client = served
    context, continuation = "我喜欢", "编程，因为它有趣"
    ctx, cont = split_for_scoring(generator.tokenizer, context, continuation)
    ids = ctx + cont
    scored = client.completions.create(model="m", prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    choice = scored.choices[0]
    assert choice.text == generator.tokenizer.decode(ids) and scored.usage.completion_tokens == 0
    assert choice.logprobs.token_logprobs[0] is None and len(choice.logprobs.token_logprobs) == len(ids)
    reference = model_logprobs(generator, ids)
    want = [reference[p - 1, ids[p]].item() for p in range(1, len(ids))]
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-5)
    # palm eval's in-process scoring of the continuation gives the same sum
    ((total, _),) = loglikelihoods(generator.model, generator.tokenizer, [(context, continuation)])
    assert sum(choice.logprobs.token_logprobs[len(ctx) :]) == pytest.approx(total, abs=1e-4)


def test_chat_logprobs_are_the_model_s_streamed_or_not(served):
    generator, client = served
    messages = [{"role": "user", "content": "hi"}]
    plain = dict(temperature=0, extra_body={"repetition_penalty": 1.0})
    whole = client.chat.completions.create(
        model="m", messages=messages, max_tokens=6, logprobs=True, top_logprobs=2, **plain
    )
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens and all(len(e.top_logprobs) == 2 for e in content)
    assert all(abs(e.logprob - e.top_logprobs[0].logprob) < 1e-6 for e in content)  # greedy
    streamed = client.chat.completions.create(
        model="m", messages=messages, max_tokens=6, logprobs=True, top_logprobs=2, stream=True, **plain
    )
    values = [e.logprob for chunk in streamed for c in chunk.choices if c.logprobs for e in c.logprobs.content]
    assert values == pytest.approx([e.logprob for e in content], abs=1e-6)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="m", messages=messages, max_tokens=2, top_logprobs=2)


def test_lm_eval_local_completions_scores_like_palm_eval_harness(served, model_dir, tmp_path, monkeypatch):
    """lm-evaluation-harness's own `local-completions` model against palm serve gives the numbers of
    `palm eval --harness` (lm-eval's `hf` model in process) on a multiple-choice and a perplexity task."""
    import json

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from palm.evaluate import HarnessConfig, run_harness

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    mc = [
        {"question": q, "choices": c, "label": a}
        for q, c, a in [
            ("我喜欢", ["编程", "下雨", "猫"], 0),
            ("The function", [" returns", " sleeps"], 0),
            ("1 2 3", [" 4", " 9", " x"], 0),
            ("今天天气", ["很好", "编程"], 1),
        ]
    ]
    texts = [
        {"text": t}
        for t in [
            "我喜欢编程，因为它让我的大脑跳跃。",
            "def f(x):\n    return x + 1\n",
            "The function returns 42, and three spaces.",
        ]
    ]
    for name, rows in (("mc", mc), ("ppl", texts)):
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
        )
    (tmp_path / "srv_mc.yaml").write_text(
        f"task: srv_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'mc.jsonl'}\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: label\ntarget_delimiter: ""\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n',
        encoding="utf-8",
    )
    (tmp_path / "srv_ppl.yaml").write_text(
        f"task: srv_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'ppl.jsonl'}\n"
        'test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: "{{text}}"\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n",
        encoding="utf-8",
    )
    generator, client = served
    base = str(client.base_url).rstrip("/")
    theirs = simple_evaluate(
        model="local-completions",
        model_args={
            "base_url": f"{base}/completions",
            "model": "m",
            "tokenizer": model_dir,
            "tokenizer_backend": "huggingface",
            "tokenized_requests": True,
            "num_concurrent": 1,
            "max_retries": 1,
            # as lm-eval's hf model runs a palm directory: its tokenizer puts BOS first, windows of the context
            "add_bos_token": True,
            "max_length": generator.context,
        },
        tasks=["srv_mc", "srv_ppl"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        batch_size=1,
    )
    ours = run_harness(
        model_dir, HarnessConfig(tasks=["srv_mc,srv_ppl"], include_path=[str(tmp_path)], batch_size=1, dtype="fp32")
    )
    for task, metrics in (
        ("srv_mc", ("acc,none", "acc_norm,none")),
        ("srv_ppl", ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none")),
    ):
        for metric in metrics:
            # to 1e-4: absolute for accuracies and bits per byte, relative for the perplexities (their exponentials)
            assert theirs["results"][task][metric] == pytest.approx(
                ours["results"][task][metric], rel=1e-4, abs=1e-4
            ), (task, metric)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 300) | st.floats(-300, 300) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
NEW_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "logprobs": st.one_of(st.booleans(), st.integers(-2, 25), JSONISH),
        "top_logprobs": st.one_of(st.integers(-2, 25), JSONISH),
        "echo": st.one_of(st.booleans(), JSONISH),
        "n": st.one_of(st.integers(-1, 3), JSONISH),
        "max_tokens": st.integers(-1, 4),
        "frequency_penalty": st.one_of(st.floats(-3, 3, allow_nan=False), JSONISH),
        "presence_penalty": st.one_of(st.floats(-3, 3, allow_nan=False), JSONISH),
        "logit_bias": st.one_of(
            st.dictionaries(
                st.one_of(st.integers(-5, 10**6).map(str), st.text(max_size=4)),
                st.floats(-150, 150, allow_nan=False),
                max_size=3,
            ),
            JSONISH,
        ),
        "response_format": st.one_of(st.just({"type": "json_object"}), st.just({"type": "text"}), JSONISH),
        "tools": JSONISH,
        "tool_choice": JSONISH,
        "suffix": JSONISH,
        "best_of": JSONISH,
        "stream": st.booleans(),
        "seed": st.integers(-1, 2**64),
    },
)
PROMPTS = st.one_of(
    st.text(max_size=12),
    st.lists(st.integers(-3, 2**20), max_size=5),
    st.lists(
        st.one_of(st.text(min_size=1, max_size=6), st.lists(st.integers(0, 300), min_size=1, max_size=4)), max_size=3
    ),
    JSONISH,
)


@settings(max_examples=80, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=NEW_FIELDS, prompt=PROMPTS, chat=st.booleans())
def test_a_fuzz_of_the_new_fields_never_gets_a_5xx(served, fields, prompt, chat):
    import httpx

    _, client = served
    base = str(client.base_url).rstrip("/")
    if chat:
        r = httpx.post(
            f"{base}/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **fields}, timeout=60
        )
    else:
        r = httpx.post(f"{base}/completions", json={"prompt": prompt, **fields}, timeout=60)
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):  # several choices too
        assert "server_error" not in r.text and r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]
    if r.status_code >= 400:
        assert set(r.json()["error"]) >= {"message", "type", "param", "code"}
    assert httpx.get(f"{base.rsplit('/v1', 1)[0]}/health", timeout=10).json() == {"status": "ok"}
