"""The generation metrics against their reference implementations' own definitions and example values:
the SQuAD v1.1 evaluation script (its functions copied below as the oracle), CMRC 2018's character-level
scoring of Chinese, rouge-score's README example, and sacreBLEU's README example with its signature."""

from __future__ import annotations

import re
import string
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from palm.evaluate.metrics import (
    GENERATION_METRICS,
    bleu,
    chrf,
    chrf_pp,
    exact_match,
    exact_string,
    f1,
    rouge1,
    rouge2,
    rouge_l,
    rouge_lsum,
    signature,
)


# ---- the SQuAD v1.1 evaluation script (evaluate-v1.1.py), as published ------------------------------------
def normalize_answer(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def f1_score(prediction, ground_truth):
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def exact_match_score(prediction, ground_truth):
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    return max(metric_fn(prediction, gt) for gt in ground_truths)


# -----------------------------------------------------------------------------------------------------------


WORDS = st.sampled_from(
    ["the", "a", "An", "cat", "Cat,", "sat", "on", "mat.", "dog", "1990", "(New", "York)", "", "it's", "The"]
)
ANSWER = st.lists(WORDS, max_size=6).map(" ".join)


@settings(max_examples=300, deadline=None)
@given(prediction=ANSWER, references=st.lists(ANSWER, min_size=1, max_size=3))
def test_squad_em_and_f1_are_the_official_scripts(prediction, references):
    want_f1 = metric_max_over_ground_truths(f1_score, prediction, references)
    want_em = metric_max_over_ground_truths(exact_match_score, prediction, references)
    assert f1([prediction], [references]) == pytest.approx(want_f1)
    assert exact_match([prediction], [references]) == float(want_em)


def test_squad_values_by_hand():
    assert f1(["the cat sat"], ["a cat sat down"]) == pytest.approx(0.8)
    assert exact_match(["The Cat!"], [["dog", "cat"]]) == 1.0  # best of several references
    assert exact_match(["-3"], ["3"]) == 1.0 and exact_string(["-3"], ["3"]) == 0.0  # why exact_string exists
    assert exact_string([" 85 ", "3"], ["85", ["5", "3"]]) == 1.0


def test_chinese_is_scored_by_character_as_cmrc_2018_does():
    assert exact_match(["北京大学"], ["北京大学。"]) == 1.0  # punctuation dropped
    assert f1(["北京"], ["北京大学"]) == pytest.approx(2 / 3)  # P = 1, R = 1/2
    assert f1(["在2018年"], ["2018年"]) == pytest.approx(0.8)  # digits stay one token: P = 2/3, R = 1
    assert f1(["上海"], ["北京"]) == 0.0


def test_rouge_is_rouge_scores_readme_example():
    # rouge-score's README: scorer.score('The quick brown fox jumps over the lazy dog',
    #                                    'The quick brown dog jumps on the log.')
    target, prediction = "The quick brown fox jumps over the lazy dog", "The quick brown dog jumps on the log."
    assert rouge1([prediction], [target]) == pytest.approx(0.7058823529411765)
    assert rouge_l([prediction], [target]) == pytest.approx(0.5882352941176471)
    assert rouge2([prediction], [target]) == pytest.approx(4 / 15)  # 2 bigrams shared: P = 2/7, R = 2/8


def test_rouge_keeps_chinese_and_takes_the_best_reference():
    assert rouge_l(["三百一十二"], ["三百一十三"]) == pytest.approx(0.8)  # by character, not empty
    assert rouge1(["the cat"], [["a dog", "the cat"]]) == 1.0
    # Lsum: the longest common subsequence of each reference sentence (a line) against the summary's sentences
    summary, reference = "the cat sat\nthe dog ran", "the dog ran\nthe cat sat"
    assert rouge_lsum([summary], [reference]) == 1.0 and rouge_l([summary], [reference]) < 1.0


SYS = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
REFS = [
    ["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
    ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."],
]


def test_bleu_and_chrf_are_sacrebleus_readme_example():
    per_example = [list(r) for r in zip(*REFS)]  # palm takes each example's references together
    assert bleu(SYS, per_example) == pytest.approx(48.53, abs=0.005)  # the README prints BLEU = 48.53
    assert chrf(SYS, per_example) == pytest.approx(59.73, abs=0.005)  # the README prints chrF2 = 59.73
    assert 0 < chrf_pp(SYS, per_example) < chrf(SYS, per_example)
    sig = signature("bleu", SYS, per_example)
    assert sig.startswith("nrefs:2|case:mixed|eff:no|tok:13a|smooth:exp|version:")
    assert signature("chrf++", SYS, per_example).startswith("nrefs:2|case:mixed|eff:yes|nc:6|nw:2|space:no")
    assert signature("rouge1", SYS, per_example) is None


def test_bleu_tokenizes_chinese_by_character_and_says_so():
    assert bleu(["我喜欢编程"], ["我喜欢编程"]) == pytest.approx(100.0)
    assert "tok:zh" in signature("bleu", ["我喜欢编程"], ["我喜欢编程"])
    assert "nrefs:var" in signature("bleu", ["a b c d", "e f g h"], [["a b c d", "x"], ["e f g h"]])


def test_every_metric_takes_one_or_several_references_and_refuses_a_count_mismatch():
    for name, metric in GENERATION_METRICS.items():
        assert metric(["the cat sat"], ["the cat sat"]) == metric(["the cat sat"], [["x y", "the cat sat"]]), name
        with pytest.raises(ValueError):
            metric(["a", "b"], ["a"])


def test_palm_eval_prints_every_metric_and_the_signatures(model_dir, tmp_path, capsys):
    import json

    from conftest import run_cli

    rows = [{"prompt": "a", "answer": ["the cat", "a cat sat"]}, {"prompt": "我", "answer": "我喜欢编程"}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    names = ["rouge1", "rouge2", "rouge_l", "rouge_lsum", "exact_match", "f1", "bleu", "chrf++"]
    (tmp_path / "t.yaml").write_text(
        f"file: t.jsonl\nkind: generate\nmetric: [{', '.join(names)}]\nmax_new_tokens: 4\n", encoding="utf-8"
    )
    code, stdout, err = run_cli(capsys, "eval", "--model", model_dir, "--tasks", str(tmp_path / "t.yaml"))
    assert code == 0, err
    for name in names:
        assert f" {name} " in stdout, name
    assert "t bleu: nrefs:var|case:mixed|eff:no|tok:zh" in stdout and "t chrf++: nrefs:var" in stdout
