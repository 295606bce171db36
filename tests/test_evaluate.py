"""palm.evaluate: bits per byte against the logits by hand, few-shot tasks, metrics, bad task files, lm-eval."""

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_one_line_error, lively_model, run_cli, tiny_config

from palm.evaluate import (
    EvaluationError,
    HarnessConfig,
    Task,
    TaskError,
    bleu,
    build_prompt,
    chrf,
    evaluate_task,
    exact_match,
    fewshot_examples,
    load_task,
    loglikelihoods,
    rouge_l,
    run_harness,
    score_stream,
    score_text,
    sliding_windows,
)
from palm.inference.generate import Generator, SamplingConfig

TEXT = "The quick brown fox jumps over the lazy dog. 我喜欢编程，因为它让我的大脑跳跃。 x = 12"


@pytest.fixture(scope="module")
def model(tokenizer):
    return lively_model(tiny_config(tokenizer))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def hand_log_probs(model, ids):
    """log p(ids[t] | ids[:t]) for t >= 1, from one forward pass over the whole sequence."""
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return [float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]


# ---- bits per byte ---------------------------------------------------------------------------------


def test_bits_per_byte_equals_the_logits_by_hand(model, tokenizer):
    ids = [tokenizer.eod_id] + tokenizer.encode(TEXT, bos=False)
    nll = -sum(hand_log_probs(model, ids))
    by_hand = nll / math.log(2) / len(TEXT.encode("utf-8"))
    score = score_text(model, tokenizer, TEXT)
    assert score.tokens == len(ids) - 1
    assert score.bytes == len(TEXT.encode("utf-8"))
    assert score.bits_per_byte == pytest.approx(by_hand, rel=1e-5)
    assert score.perplexity == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)


def test_bf16_bits_per_byte_are_within_one_percent_of_fp32(model, tokenizer):
    fp32 = score_text(model, tokenizer, TEXT)
    bf16 = score_text(copy.deepcopy(model).to(torch.bfloat16), tokenizer, TEXT)
    assert bf16.tokens == fp32.tokens
    assert bf16.bits_per_byte == pytest.approx(fp32.bits_per_byte, rel=0.01)


def test_sliding_window_gives_each_token_its_last_seq_len_tokens(model, tokenizer):
    ids = [tokenizer.eod_id] + tokenizer.encode(TEXT, bos=False)
    seq_len = 8
    assert len(ids) > 3 * seq_len
    # stride 1: target t is predicted from exactly ids[max(0, t - seq_len) : t]
    by_hand = 0.0
    for t in range(1, len(ids)):
        by_hand -= hand_log_probs(model, ids[max(0, t - seq_len) : t + 1])[-1]
    nll, n = score_stream(model, ids, seq_len, stride=1, batch_size=3)
    assert n == len(ids) - 1
    assert nll == pytest.approx(by_hand, rel=1e-5)
    # windows side by side: each block of seq_len targets is predicted from its own window only
    side_by_side = 0.0
    for start in range(0, len(ids) - 1, seq_len):
        side_by_side -= sum(hand_log_probs(model, ids[start : start + seq_len + 1]))
    assert score_stream(model, ids, seq_len)[0] == pytest.approx(side_by_side, rel=1e-5)
    assert abs(side_by_side - nll) > 0.1  # the context a token gets does change its score


@pytest.mark.parametrize("n,seq_len,stride", [(2, 4, 4), (50, 8, 3), (51, 8, 8), (17, 16, 1), (100, 7, 5)])
def test_sliding_windows_score_every_target_once(n, seq_len, stride):
    scored = []
    for start, end, first in sliding_windows(n, seq_len, stride):
        assert end - start <= seq_len and start <= first < end
        targets = range(first + 1, end + 1)
        assert all(t - start >= min(t, seq_len - stride + 1) for t in targets)  # context ids[start:t]
        scored += targets
    assert scored == list(range(1, n))


def test_bad_window_settings(model):
    with pytest.raises(EvaluationError, match="stride"):
        score_stream(model, [1, 2, 3], seq_len=4, stride=5)
    with pytest.raises(EvaluationError, match="stride"):
        score_stream(model, [1, 2, 3], seq_len=4, stride=0)


def test_eval_corpus_command(capsys, model_dir, corpus_dir, tmp_path):
    out = tmp_path / "r.json"
    code, stdout, err = run_cli(
        capsys,
        "eval",
        "--model",
        model_dir,
        "--corpus",
        str(corpus_dir),
        "--seq-len",
        "64",
        "--stride",
        "32",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(out),
    )
    assert code == 0, err
    assert "bits/byte" in stdout and corpus_dir.name in stdout
    (row,) = json.loads(out.read_text())["corpora"]
    assert row["tokens"] > 100 and row["bytes"] > row["tokens"]
    assert row["bits_per_byte"] == pytest.approx(row["nll"] / math.log(2) / row["bytes"])
    assert 0 < row["bits_per_byte"] < 20 and row["perplexity"] > 1


# ---- few-shot tasks ---------------------------------------------------------------------------------


def arithmetic_task(tmp_path, n=12, fewshot=True):
    rows = [{"prompt": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1)} for i in range(n)]
    write_jsonl(tmp_path / "test.jsonl", rows)
    write_jsonl(
        tmp_path / "train.jsonl", [{"prompt": f"What is {i} + 2?", "answer": str(i + 2)} for i in range(50, 70)]
    )
    yaml = tmp_path / "arith.yaml"
    yaml.write_text(
        'name: arith\nfile: test.jsonl\nkind: generate\ntemplate: "Q: {prompt}\\nA:"\ntarget_delimiter: " "\n'
        f'metric: exact_match\n{"fewshot_file: train.jsonl" if fewshot else ""}\nmax_new_tokens: 4\nstop: ["\\n"]\n',
        encoding="utf-8",
    )
    return yaml


def test_kshot_prompts_repeat_for_a_seed(tmp_path):
    task = load_task(arithmetic_task(tmp_path))
    assert (
        task.name == "arith"
        and task.kind == "generate"
        and task.metrics == ("exact_match",)
        and len(task.fewshot) == 20
    )
    first = [build_prompt(task, i, 3, seed=1) for i in range(len(task.examples))]
    assert first == [build_prompt(task, i, 3, seed=1) for i in range(len(task.examples))]
    assert first != [build_prompt(task, i, 3, seed=2) for i in range(len(task.examples))]
    assert first[0].count("Q: ") == 4 and first[0].endswith("Q: What is 0 + 1?\nA:")
    assert all(e in task.fewshot for e in fewshot_examples(task, 0, 3, seed=1))
    assert "Q: What is 50 + 2?\nA: 52" in "".join(build_prompt(task, i, 5, seed=0) for i in range(12))
    # without a few-shot split the shots are the other examples, never the one asked
    (tmp_path / "nosplit").mkdir()
    no_split = load_task(arithmetic_task(tmp_path / "nosplit", fewshot=False))
    for i, example in enumerate(no_split.examples):
        shots = fewshot_examples(no_split, i, len(no_split.examples) - 1, seed=3)
        assert example not in shots and len(set(shots)) == len(no_split.examples) - 1
    with pytest.raises(EvaluationError, match="examples to draw"):
        fewshot_examples(no_split, 0, len(no_split.examples), seed=0)


def test_kshot_prompts_do_not_depend_on_limit(model, tokenizer, tmp_path):
    task = load_task(arithmetic_task(tmp_path))
    some = evaluate_task(model, tokenizer, task, shots=2, seed=5, limit=3)
    allof = evaluate_task(model, tokenizer, task, shots=2, seed=5)
    assert some["examples"] == 3 and allof["examples"] == 12
    assert some["samples"] == allof["samples"][:3]
    assert set(allof["metrics"]) == {"exact_match"}


def canonical(tokenizer, prompt, ids):
    """Whether `ids` after `prompt` is how the tokenizer itself would split the text (so scoring text sees them)."""
    return tokenizer.encode(prompt + tokenizer.decode(ids)) == tokenizer.encode(prompt) + list(ids)


def test_multiple_choice_prefers_the_models_own_continuation(model, tokenizer, tmp_path):
    """Choices: the greedy continuation, and the same text with its last token swapped for the 2nd-5th likeliest.

    Every choice shares all but the last token, where greedy took the argmax, so greedy must score highest.
    """
    generator = Generator(model, tokenizer)
    # Many prompts, because a random model often emits token runs that the tokenizer would split otherwise.
    pool = [
        a + b
        for a in ("我喜欢", "The ", "def ", "今天", "x = ", "自然语言", "import ", "模型")
        for b in ("编程", "quick", "main", "天气", "1", "处理", "os", "发布")
    ]
    rows = []
    for prompt, completion in zip(pool, generator.generate(pool, SamplingConfig(max_new_tokens=5))):
        ids = completion.token_ids
        if len(ids) < 5 or not canonical(tokenizer, prompt, ids):
            continue
        with torch.no_grad():
            last = model(input_ids=torch.tensor([tokenizer.encode(prompt) + ids[:-1]])).logits[0, -1]
        ranked = last.argsort(descending=True).tolist()
        assert ranked[0] == ids[-1]
        others = [ids[:-1] + [t] for t in ranked[1:20] if canonical(tokenizer, prompt, ids[:-1] + [t])][:4]
        if len(others) < 2 or len({tokenizer.decode(o) for o in others + [ids]}) < len(others) + 1:
            continue
        choices = [tokenizer.decode(o) for o in others] + [completion.text]
        rows.append({"prompt": prompt, "choices": choices, "answer": len(choices) - 1})
    assert len(rows) >= 5, "too few prompts whose greedy text tokenizes back to the same tokens"
    task = load_task(write_jsonl(tmp_path / "mc.jsonl", rows))
    assert task.kind == "multiple_choice" and task.metrics == ("accuracy",)
    result = evaluate_task(model, tokenizer, task)
    assert result["metrics"]["acc"] == 1.0
    for sample in result["samples"]:
        lls = sample["loglikelihoods"]
        assert lls[-1] == max(lls) and lls.count(max(lls)) == 1
    # the right answer is exactly what greedy decoding gives, and the others are not
    scored = loglikelihoods(model, tokenizer, [(r["prompt"], c) for r in rows for c in r["choices"]])
    flags = [is_greedy for _, is_greedy in scored]
    assert flags == [c == len(r["choices"]) - 1 for r in rows for c in range(len(r["choices"]))]
    # and a log-likelihood is the sum of log-probabilities by hand
    prompt, text = rows[0]["prompt"], rows[0]["choices"][-1]
    ids, n = tokenizer.encode(prompt + text), len(tokenizer.encode(prompt))
    assert scored[len(rows[0]["choices"]) - 1][0] == pytest.approx(sum(hand_log_probs(model, ids)[n - 1 :]), rel=1e-5)


def test_loglikelihood_keeps_the_end_of_a_long_context(model, tokenizer):
    context = "我喜欢编程，因为它让我的大脑跳跃。" * 40
    assert len(tokenizer.encode(context)) > model.config.max_position_embeddings
    ((ll, _),) = loglikelihoods(model, tokenizer, [(context, "今天")])
    assert math.isfinite(ll) and ll < 0


def test_generation_task_scores_greedy_output(model, tokenizer, tmp_path):
    generator = Generator(model, tokenizer)
    cfg = SamplingConfig(max_new_tokens=5, stop=["\n"])
    pool = ["a", "b", "c", "d", "我", "你", "x =", "def", "The", "今天"]
    found = [(p, c.text) for p, c in zip(pool, generator.generate(pool, cfg)) if len(c.text.strip()) >= 3]
    prompts, greedy = zip(*found[:4], strict=True)
    references = [g if i % 2 == 0 else g + "x" for i, g in enumerate(greedy)]
    write_jsonl(tmp_path / "g.jsonl", [{"prompt": p, "answer": r} for p, r in zip(prompts, references)])
    (tmp_path / "g.yaml").write_text(
        "file: g.jsonl\nkind: generate\nmetric: [exact_match, chrf, rouge_l, bleu]\nmax_new_tokens: 5\n",
        encoding="utf-8",
    )
    result = evaluate_task(model, tokenizer, load_task(tmp_path / "g.yaml"), batch_size=3)
    assert result["task"] == "g"
    assert [s["prediction"] for s in result["samples"]] == list(greedy)
    metrics = result["metrics"]
    assert metrics["exact_match"] == 0.5
    assert metrics["chrf"] == pytest.approx(chrf(greedy, references)) and 0 < metrics["chrf"] < 100
    assert metrics["rouge_l"] == pytest.approx(rouge_l(greedy, references)) and 0.5 <= metrics["rouge_l"] < 1
    assert metrics["bleu"] == pytest.approx(bleu(greedy, references))


def test_metrics():
    assert exact_match([" 85 ", "3"], ["85", "4"]) == 0.5
    assert rouge_l(["the cat sat"], ["the cat sat"]) == 1.0
    assert rouge_l(["dog"], ["the cat"]) == 0.0
    assert rouge_l(["三百一十二"], ["三百一十三"]) == pytest.approx(0.8)  # by character, not empty
    assert rouge_l(["the cat sat on the mat"], ["the cat lay on the mat"]) == pytest.approx(5 / 6)
    assert chrf(["三百一十二"], ["三百一十二"]) == pytest.approx(100)
    assert chrf(["three hundred"], ["three hundred and twelve"]) < chrf(
        ["three hundred and ten"], ["three hundred and twelve"]
    )
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100)
    assert bleu(["三百一十二万"], ["三百一十二万"]) == pytest.approx(100)
    assert bleu(["x y z w"], ["the cat sat on the mat"]) == pytest.approx(0)


def test_eval_tasks_command(capsys, model_dir, tmp_path):
    yaml = arithmetic_task(tmp_path)
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"prompt": "2 + 2 =", "choices": [" 4", " 5"], "answer": 0}] * 3)
    out = tmp_path / "results.json"
    code, stdout, err = run_cli(
        capsys,
        "eval",
        "--model",
        model_dir,
        "--tasks",
        f"{yaml},{mc}",
        "--shots",
        "2",
        "--limit",
        "4",
        "--out",
        str(out),
    )
    assert code == 0, err
    assert "arith" in stdout and "exact_match" in stdout and "acc_norm" in stdout
    report = json.loads(out.read_text())
    arith, mcr = report["tasks"]
    assert (arith["task"], arith["shots"], arith["examples"]) == ("arith", 2, 4)
    assert mcr["kind"] == "multiple_choice" and mcr["metrics"]["acc"] in (0.0, 1.0)  # three identical questions


# ---- bad task files -----------------------------------------------------------------------------------

GOOD = {"prompt": "What is 1 + 1?", "answer": "2"}
BAD_FILES = {
    "missing": (None, "does not exist"),
    "empty": ("", "empty"),
    "blank lines": ("\n\n", "empty"),
    "not json": ("{prompt: 1}\n", "not valid JSON"),
    "not an object": ('["a", "b"]\n', "JSON object"),
    "no prompt": ('{"answer": "2"}\n', '"prompt"'),
    "no answer": ('{"prompt": "x"}\n', '"answer"'),
    "prompt not a string": ('{"prompt": 3, "answer": "2"}\n', '"prompt" must be a string'),
    "answer not a string": ('{"prompt": "x", "answer": 2}\n', '"answer" must be the text to generate'),
    "second row bad": (json.dumps(GOOD) + '\n{"prompt": "x", "answer": null}\n', ":2:"),
    "choices not a list": ('{"prompt": "x", "choices": "ab", "answer": 0}\n', '"choices"'),
    "one choice": ('{"prompt": "x", "choices": ["a"], "answer": 0}\n', "at least two"),
    "answer out of range": ('{"prompt": "x", "choices": ["a", "b"], "answer": 2}\n', "not an index"),
    "answer not an index": ('{"prompt": "x", "choices": ["a", "b"], "answer": "a"}\n', "index"),
    "mc row missing choices": (
        '{"prompt": "x", "choices": ["a", "b"], "answer": 0}\n{"prompt": "y", "answer": 1}\n',
        '"choices"',
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES), ids=list(BAD_FILES))
def test_bad_jsonl_task_is_one_line(capsys, model_dir, tmp_path, case):
    content, words = BAD_FILES[case]
    path = tmp_path / "task.jsonl"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    code, _, err = run_cli(capsys, "eval", "--model", model_dir, "--tasks", str(path))
    assert_one_line_error(code, err, words)


BAD_YAMLS = {
    "empty": ("", "empty"),
    "not a mapping": ("- a\n- b\n", "mapping"),
    "not yaml": ("name: [unclosed\n", "not valid YAML"),
    "no file": ("kind: generate\n", '"file"'),
    "no kind": ("file: ok.jsonl\n", '"kind"'),
    "unknown kind": ("file: ok.jsonl\nkind: classify\n", "unknown kind 'classify'"),
    "unknown metric": ("file: ok.jsonl\nkind: generate\nmetric: accuracy\n", "unknown metric 'accuracy'"),
    "unknown metric in list": ("file: ok.jsonl\nkind: generate\nmetric: [chrf, meteor]\n", "unknown metric 'meteor'"),
    "unknown setting": ("file: ok.jsonl\nkind: generate\ntemplte: x\n", "unknown setting templte"),
    "file missing": ("file: nowhere.jsonl\nkind: generate\n", "does not exist"),
    "fewshot file missing": ("file: ok.jsonl\nkind: generate\nfewshot_file: nowhere.jsonl\n", "does not exist"),
    "file not a string": ("file: 3\nkind: generate\n", "file must be a str"),
    "file null": ("file: null\nkind: generate\n", "file must be a str"),
    "template without prompt": ("file: ok.jsonl\nkind: generate\ntemplate: 'Q: {question}'\n", "template"),
    "template broken": ("file: ok.jsonl\nkind: generate\ntemplate: 'Q: {prompt'\n", "template"),
    "max_new_tokens not int": (
        "file: ok.jsonl\nkind: generate\nmax_new_tokens: many\n",
        "max_new_tokens must be an int",
    ),
    "max_new_tokens zero": ("file: ok.jsonl\nkind: generate\nmax_new_tokens: 0\n", "max_new_tokens"),
    "stop not strings": ("file: ok.jsonl\nkind: generate\nstop: [1]\n", "stop"),
    "rows of the wrong kind": ("file: ok.jsonl\nkind: multiple_choice\n", '"choices"'),
}


@pytest.mark.parametrize("case", list(BAD_YAMLS), ids=list(BAD_YAMLS))
def test_bad_yaml_task_is_one_line(capsys, model_dir, tmp_path, case):
    content, words = BAD_YAMLS[case]
    write_jsonl(tmp_path / "ok.jsonl", [GOOD])
    path = tmp_path / "task.yaml"
    path.write_text(content, encoding="utf-8")
    code, _, err = run_cli(capsys, "eval", "--model", model_dir, "--tasks", str(path))
    assert_one_line_error(code, err, words)


def test_binary_task_file_is_one_line(capsys, model_dir, tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_bytes(b"\x00\x01\x02binary")
    code, _, err = run_cli(capsys, "eval", "--model", model_dir, "--tasks", str(path))
    assert_one_line_error(code, err, "binary")


@pytest.mark.parametrize(
    "argv,words",
    [
        ([], "--corpus, --tasks or --harness"),
        (["--tasks", "{ok}", "--shots", "-1"], "--shots"),
        (["--tasks", "{ok}", "--shots", "5"], "examples to draw"),
        (["--tasks", "{ok}", "--limit", "0"], "--limit"),
        (["--corpus", "nowhere-corpus"], "nowhere-corpus"),
        (["--corpus", "{txt}", "--stride", "999", "--seq-len", "16"], "stride"),
        (["--corpus", "{txt}", "--seq-len", "100000"], "context"),
        (["--include-path", "{dir}", "--tasks", "{ok}"], "--harness"),
    ],
)
def test_bad_eval_settings_are_one_line(capsys, model_dir, tmp_path, argv, words):
    write_jsonl(tmp_path / "ok.jsonl", [GOOD, GOOD])
    (tmp_path / "t.txt").write_text("some text " * 100, encoding="utf-8")
    argv = [a.format(ok=tmp_path / "ok.jsonl", txt=tmp_path / "t.txt", dir=tmp_path) for a in argv]
    code, _, err = run_cli(capsys, "eval", "--model", model_dir, *argv)
    assert_one_line_error(code, err, words)


def test_missing_model_is_one_line(capsys, tmp_path):
    write_jsonl(tmp_path / "ok.jsonl", [GOOD])
    code, _, err = run_cli(capsys, "eval", "--model", str(tmp_path / "none"), "--tasks", str(tmp_path / "ok.jsonl"))
    assert_one_line_error(code, err, "no model directory at")


def test_library_raises_typed_errors(tmp_path):
    with pytest.raises(TaskError):
        load_task(tmp_path / "none.yaml")
    assert issubclass(TaskError, EvaluationError)
    assert isinstance(Task("t", "generate", (), ("exact_match",)).template, str)


# ---- lm-evaluation-harness ----------------------------------------------------------------------------

MC_ROWS = [
    {"question": "2 + 2 =", "choices": [" 4", " 5", " 22"], "label": 0},
    {"question": "The capital of France is", "choices": [" Paris", " Berlin"], "label": 0},
    {"question": "我喜欢编程，", "choices": ["因为它", "散步"], "label": 0},
    {"question": "def main():", "choices": ["\n    pass", "\n    return 1"], "label": 1},
]
GEN_ROWS = [
    {"question": q, "answer": a} for q, a in [("1 2 3", "4"), ("a b c", "d"), ("我喜欢编程，因为", "它"), ("x =", "1")]
]


@pytest.fixture(scope="module")
def harness_tasks(tmp_path_factory):
    """Two local lm-eval tasks (multiple choice and generation) reading local JSON files."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    write_jsonl(root / "mc.jsonl", MC_ROWS)
    write_jsonl(root / "gen.jsonl", GEN_ROWS)
    (root / "palm_toy_mc.yaml").write_text(
        "task: palm_toy_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: label\ntarget_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        encoding="utf-8",
    )
    (root / "palm_toy_gen.yaml").write_text(
        "task: palm_toy_gen\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {root / 'gen.jsonl'}\n"
        'test_split: test\noutput_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
        'target_delimiter: ""\ngeneration_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n",
        encoding="utf-8",
    )
    return root


@pytest.fixture
def offline(monkeypatch, tmp_path):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def palm_versions_of_harness_tasks(root):
    """The same two tasks as palm task files, to compare palm's scoring with lm-eval's."""
    mc = write_jsonl(
        root / "palm_mc.jsonl",
        [{"prompt": r["question"], "choices": r["choices"], "answer": r["label"]} for r in MC_ROWS],
    )
    write_jsonl(root / "palm_gen.jsonl", [{"prompt": r["question"], "answer": r["answer"]} for r in GEN_ROWS])
    (root / "palm_gen.yaml").write_text("file: palm_gen.jsonl\nkind: generate\nmax_new_tokens: 6\n", encoding="utf-8")
    return load_task(mc), load_task(root / "palm_gen.yaml")


def test_lm_eval_scores_a_palm_directory_like_palm_does(offline, model_dir, tokenizer, harness_tasks, tmp_path):
    from palm.evaluate import load_model

    # Both sides in fp32: the log-likelihoods are compared to 1e-3, closer than bf16 rounding would allow.
    results = run_harness(
        model_dir,
        HarnessConfig(
            tasks=["palm_toy_mc,palm_toy_gen"],
            include_path=[str(harness_tasks)],
            batch_size=2,
            log_samples=True,
            dtype="fp32",
        ),
    )
    mc, gen = results["results"]["palm_toy_mc"], results["results"]["palm_toy_gen"]
    assert mc["sample_len"] == len(MC_ROWS) and gen["sample_len"] == len(GEN_ROWS)
    # palm's own evaluation of the same questions gives the same log-likelihoods, answers and generations
    model, tok = load_model(model_dir, dtype="fp32")
    palm_mc, palm_gen = palm_versions_of_harness_tasks(tmp_path)
    ours_mc, ours_gen = evaluate_task(model, tok, palm_mc), evaluate_task(model, tok, palm_gen)
    assert mc["acc,none"] == ours_mc["metrics"]["acc"] and mc["acc_norm,none"] == ours_mc["metrics"]["acc_norm"]
    theirs = sorted(results["samples"]["palm_toy_mc"], key=lambda s: s["doc_id"])
    for sample, ours in zip(theirs, ours_mc["samples"], strict=True):
        assert [r[0] for r in sample["filtered_resps"]] == pytest.approx(ours["loglikelihoods"], abs=1e-3)
    theirs = sorted(results["samples"]["palm_toy_gen"], key=lambda s: s["doc_id"])
    assert [s["filtered_resps"][0] for s in theirs] == [s["prediction"] for s in ours_gen["samples"]]
    assert float(gen["exact_match,none"]) == ours_gen["metrics"]["exact_match"]


def test_palm_eval_harness_command(offline, capsys, model_dir, harness_tasks, tmp_path):
    out = tmp_path / "h.json"
    code, stdout, err = run_cli(
        capsys,
        "eval",
        "--model",
        model_dir,
        "--harness",
        "palm_toy_mc",
        "--include-path",
        str(harness_tasks),
        "--limit",
        "2",
        "--out",
        str(out),
    )
    assert code == 0, err
    assert "palm_toy_mc" in stdout and "acc_norm" in stdout
    assert json.loads(out.read_text())["harness"]["results"]["palm_toy_mc"]["sample_len"] == 2
    code, _, err = run_cli(
        capsys, "eval", "--model", model_dir, "--harness", "no_such_task", "--include-path", str(harness_tasks)
    )
    assert_one_line_error(code, err, "no_such_task")


def test_lm_eval_loads_a_palm_directory_by_remote_code_alone(offline, model_dir, harness_tasks, tmp_path):
    """Where palm is not importable, lm-eval's `hf` model with trust_remote_code=True loads the directory's own code."""
    code = (
        "import sys, json\n"
        "sys.modules['palm'] = None  # palm cannot be imported in this process\n"
        "import lm_eval\nfrom lm_eval.tasks import TaskManager\n"
        f"r = lm_eval.simple_evaluate(model='hf', model_args={{'pretrained': {model_dir!r}, 'trust_remote_code': True}},\n"
        f"    tasks=['palm_toy_mc'], task_manager=TaskManager(include_path={str(harness_tasks)!r}, include_defaults=False), device='cpu',\n"
        "    batch_size=2, bootstrap_iters=0)\n"
        "assert any(m.startswith('transformers_modules') for m in sys.modules), 'remote code was not used'\n"
        "print(json.dumps(r['results']['palm_toy_mc']))\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    remote = json.loads(done.stdout.strip().splitlines()[-1])
    local = run_harness(
        model_dir, HarnessConfig(tasks=["palm_toy_mc"], include_path=[str(harness_tasks)], batch_size=2)
    )
    assert remote["acc,none"] == local["results"]["palm_toy_mc"]["acc,none"]
    assert remote["acc_norm,none"] == local["results"]["palm_toy_mc"]["acc_norm,none"]


def test_a_chat_task_scores_the_greedy_next_assistant_turn(model, tokenizer, tmp_path):
    from palm.text.chat import encode_prompt
    from palm.text.templates import reply_text

    conversations = [[{"role": "user", "content": f"Say {w}."}] for w in ("yes", "no", "maybe")]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": m, "answer": "yes"} for m in conversations])
    task = load_task(path)
    result = evaluate_task(model, tokenizer, task, batch_size=2)
    generator = Generator(model, tokenizer)
    for sample, messages in zip(result["samples"], conversations):
        ids = encode_prompt(tokenizer, messages)
        alone = []
        for token in generator.token_stream([ids], SamplingConfig(max_new_tokens=task.max_new_tokens)):
            if int(token[0]) in generator.eos_ids:
                break
            alone.append(int(token[0]))
        assert sample["prediction"] == reply_text(tokenizer.decode(alone))  # batched equals alone
    assert result["metrics"]["exact_match"] == sum(s["prediction"] == "yes" for s in result["samples"]) / 3
    with pytest.raises(EvaluationError, match="zero-shot"):
        evaluate_task(model, tokenizer, task, shots=1)
