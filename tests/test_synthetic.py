"""The generated fine-tuning tasks: correct conversions, disjoint splits, the same files for the same seed."""

import json

import pytest
import yaml

from palm.data.synthetic import arithmetic_task, chinese, english, number_task, write_task
from palm.text.templates import TEMPLATES
from palm.training.finetune_data import read_rows

KNOWN = {
    1: ("one", "一"),
    10: ("ten", "十"),
    12: ("twelve", "十二"),
    20: ("twenty", "二十"),
    45: ("forty-five", "四十五"),
    100: ("one hundred", "一百"),
    101: ("one hundred and one", "一百零一"),
    110: ("one hundred and ten", "一百一十"),
    115: ("one hundred and fifteen", "一百一十五"),
    312: ("three hundred and twelve", "三百一十二"),
    1000: ("one thousand", "一千"),
    1001: ("one thousand and one", "一千零一"),
    1010: ("one thousand and ten", "一千零一十"),
    1100: ("one thousand one hundred", "一千一百"),
    2019: ("two thousand and nineteen", "二千零一十九"),
    3050: ("three thousand and fifty", "三千零五十"),
    9009: ("nine thousand and nine", "九千零九"),
    9999: ("nine thousand nine hundred and ninety-nine", "九千九百九十九"),
}


@pytest.mark.parametrize("n", sorted(KNOWN))
def test_known_conversions(n):
    assert (english(n), chinese(n)) == KNOWN[n]


def test_every_number_has_a_distinct_rendering_and_a_well_formed_zero():
    zh = [chinese(n) for n in range(1, 10000)]
    en = [english(n) for n in range(1, 10000)]
    assert len(set(zh)) == len(set(en)) == 9999
    assert not any("零零" in s or s.endswith("零") or s.startswith("一十") for s in zh)
    with pytest.raises(ValueError):
        chinese(10000)


def questions(rows):
    return {r["prompt"] for r in rows}


def test_number_task_splits_are_disjoint_in_both_directions():
    split = number_task(seed=0)
    train, test, shots = questions(split.train), questions(split.test), questions(split.fewshot)
    assert not train & test and not train & shots and not test & shots
    assert len(split.test) == 400 and len(split.train) == 2 * (9999 - 250)
    # A number held out one way is held out the other way too.
    held = {r["prompt"] for r in split.test} | {r["answer"] for r in split.test}
    assert not held & (train | {r["completion"] for r in split.train})
    assert {"prompt": "三百一十二", "answer": "three hundred and twelve"} in split.test + split.fewshot or {
        "prompt": "三百一十二",
        "completion": "three hundred and twelve",
    } in split.train


def test_arithmetic_task_holds_out_both_orders():
    split = arithmetic_task(seed=0)
    pairs = lambda rows: {frozenset(map(int, r["prompt"][8:-1].split(" + "))) for r in rows}  # noqa: E731
    assert not pairs(split.train) & pairs(split.test) and not pairs(split.fewshot) & pairs(split.test)
    for r in split.train[:50] + split.test:
        a, b = map(int, r["prompt"][len("What is ") : -1].split(" + "))
        assert r.get("completion", r.get("answer")) == str(a + b)


def test_same_seed_same_files_and_the_eval_format(tmp_path):
    a = write_task(arithmetic_task(seed=3), tmp_path / "a", "arith", "qa")
    b = write_task(arithmetic_task(seed=3), tmp_path / "b", "arith", "qa")
    c = write_task(arithmetic_task(seed=4), tmp_path / "c", "arith", "qa")
    assert all(a[k].read_bytes() == b[k].read_bytes() for k in a)
    assert a["test"].read_bytes() != c["test"].read_bytes()
    spec = yaml.safe_load(a["yaml"].read_text())
    assert spec == {
        "name": "arith",
        "file": "arith-test.jsonl",
        "kind": "generate",
        "template": TEMPLATES["qa"],
        "metric": "exact_match",
        "fewshot_file": "arith-fewshot.jsonl",
        "max_new_tokens": 24,
        "stop": ["\n"],
    }
    rows = [json.loads(line) for line in (tmp_path / "a" / spec["file"]).read_text().splitlines()]
    assert all(set(r) == {"prompt", "answer"} and isinstance(r["answer"], str) for r in rows)
    assert len(read_rows(a["train"])) == len(arithmetic_task(seed=3).train)  # valid fine-tuning data


def test_the_chat_task_holds_pairs_out_in_both_orders_and_scores_with_palm_eval(tmp_path):
    from palm.data.synthetic import RECALL_QUESTIONS, chat_recall_task, write_chat_task
    from palm.evaluate import load_task

    split = chat_recall_task(seed=3, low=1, high=20, n_test=30)
    assert split == chat_recall_task(seed=3, low=1, high=20, n_test=30)  # deterministic
    trained = {tuple(sorted(map(int, c["messages"][1]["content"].rstrip(".").split(" and ")))) for c in split.train}
    asked = {tuple(sorted(map(int, t["messages"][1]["content"].rstrip(".").split(" and ")))) for t in split.test}
    assert not trained & asked and len(asked) == 30
    assert {c["messages"][2]["content"] for c in split.train} == set(RECALL_QUESTIONS.values())  # both questions
    for t in split.test:  # the answer is the number the second turn asks for, from the first turn
        a, b = map(int, t["messages"][1]["content"].rstrip(".").split(" and "))
        wanted = a if t["messages"][2]["content"] == RECALL_QUESTIONS["first"] else b
        assert t["answer"] == chinese(wanted) and t["messages"][-1]["role"] == "user"
    task = load_task(write_chat_task(split, tmp_path, "recall")["yaml"])
    assert task.kind == "chat" and len(task.examples) == 30 and task.examples[0].target == split.test[0]["answer"]
