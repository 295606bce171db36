"""Deterministic synthetic tasks that show fine-tuning working on a small model and a CPU.

- **numbers**: English number words -> Chinese numerals for 1..9999 ("three hundred and twelve" ->
  "三百一十二"), and the reverse direction;
- **arithmetic**: "What is 37 + 48?" -> "85";
- **chat sum**: a two-turn conversation: two numbers in words, then their sum in Chinese numerals.

Each task is split into train, few-shot and test sets that share no question, from a fixed seed, and
written both as fine-tuning data (`{"prompt", "completion"}` JSONL) and as an evaluation task
(`{"prompt", "answer"}` JSONL plus a YAML naming the file, template, metric, few-shot file and stop);
the chat task as conversations to fine-tune on and a chat task for `palm eval`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..core.atomic import write_text
from ..text.templates import TEMPLATES

ONES = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
ZH_DIGITS = "零一二三四五六七八九"


def english(n: int) -> str:
    """British English words for 1 <= n <= 9999: 'one thousand and five', 'three hundred and twelve'."""
    if not 1 <= n <= 9999:
        raise ValueError(f"{n} is outside 1..9999")
    thousands, hundreds, rest = n // 1000, n // 100 % 10, n % 100
    words = []
    if thousands:
        words.append(f"{ONES[thousands]} thousand")
    if hundreds:
        words.append(f"{ONES[hundreds]} hundred")
    if rest:
        if words:
            words.append("and")  # "one hundred and five", "two thousand and ten"
        words.append(ONES[rest] if rest < 20 else TENS[rest // 10] + (f"-{ONES[rest % 10]}" if rest % 10 else ""))
    return " ".join(words)


def chinese(n: int) -> str:
    """Chinese numerals for 1 <= n <= 9999, as written in standard Mandarin.

    One 零 stands for any run of zeros between non-zero digits (1001 一千零一, 1010 一千零一十); none at
    the end (1100 一千一百); 10..19 alone drop the leading one (十二) but keep it inside a larger
    number (一百一十二). 2 is 二 throughout (二百, 二千), the written form.
    """
    if not 1 <= n <= 9999:
        raise ValueError(f"{n} is outside 1..9999")
    digits = [n // 1000, n // 100 % 10, n // 10 % 10, n % 10]
    units = ["千", "百", "十", ""]
    first = next(i for i, d in enumerate(digits) if d)
    out, zero_pending = [], False
    for i in range(first, 4):
        d = digits[i]
        if d == 0:
            zero_pending = True
            continue
        if zero_pending:
            out.append("零")
            zero_pending = False
        if not (d == 1 and units[i] == "十" and i == first):  # 十二, not 一十二, when it leads
            out.append(ZH_DIGITS[d])
        out.append(units[i])
    return "".join(out)


@dataclass
class Split:
    train: list[dict]  # {"prompt", "completion"}
    fewshot: list[dict]  # {"prompt", "answer"}: k-shot examples for evaluation, disjoint from test
    test: list[dict]  # {"prompt", "answer"}


def _cut(items: list, seed: int, n_test: int, n_fewshot: int, n_train: int | None) -> tuple[list, list, list]:
    """Shuffle `items` with `seed` and cut them into disjoint test | few-shot | train lists."""
    items = list(items)
    random.Random(seed).shuffle(items)
    test, fewshot, train = items[:n_test], items[n_test : n_test + n_fewshot], items[n_test + n_fewshot :]
    return test, fewshot, train if n_train is None else train[:n_train]


def _split(
    train: list[tuple[str, str]], fewshot: list[tuple[str, str]], test: list[tuple[str, str]], seed: int
) -> Split:
    train = list(train)
    random.Random(seed + 1).shuffle(train)  # mix the directions / orders within the training file
    return Split(
        train=[{"prompt": q, "completion": a} for q, a in train],
        fewshot=[{"prompt": q, "answer": a} for q, a in fewshot],
        test=[{"prompt": q, "answer": a} for q, a in test],
    )


def number_task(
    seed: int = 0, n_test: int = 200, n_fewshot: int = 50, n_train: int | None = None, both_directions: bool = True
) -> Split:
    """Number words -> Chinese numerals over 1..9999 (and back when `both_directions`).

    The prompt is the number alone; its script says which way to translate. A test number is held
    out in both directions, so training never sees it either way.
    """
    test, fewshot, train = _cut(list(range(1, 10000)), seed, n_test, n_fewshot, n_train)

    def rows(numbers):
        out = [(english(n), chinese(n)) for n in numbers]
        return out + ([(chinese(n), english(n)) for n in numbers] if both_directions else [])

    return _split(rows(train), rows(fewshot), rows(test), seed)


def arithmetic_task(
    seed: int = 0, low: int = 10, high: int = 99, n_test: int = 200, n_fewshot: int = 50, n_train: int | None = None
) -> Split:
    """'What is a + b?' -> str(a + b) for low <= a, b <= high.

    Pairs are split unordered: a held-out {a, b} is asked neither as a + b nor as b + a in training.
    """
    pairs = [(a, b) for a in range(low, high + 1) for b in range(a, high + 1)]
    test, fewshot, train = _cut(pairs, seed, n_test, n_fewshot, None)

    def ask(a, b):
        return f"What is {a} + {b}?", str(a + b)

    train = [ask(*p) for a, b in train for p in ([(a, b), (b, a)] if a != b else [(a, b)])]
    split = _split(train, [ask(a, b) for a, b in fewshot], [ask(a, b) for a, b in test], seed)
    if n_train is not None:
        split.train = split.train[:n_train]
    return split


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_task(split: Split, out: str | Path, name: str, task: str, max_new_tokens: int = 24) -> dict[str, Path]:
    """Write `out/NAME-{train,fewshot,test}.jsonl` and `out/NAME.yaml` (the evaluation task); returns the paths.

    The YAML's template is the fine-tuning template of `task`, so the fine-tuned model is asked in the
    form it was trained on.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / f"{name}-{kind}.jsonl" for kind in ("train", "fewshot", "test")}
    _write_jsonl(paths["train"], split.train)
    _write_jsonl(paths["fewshot"], split.fewshot)
    _write_jsonl(paths["test"], split.test)
    spec = {
        "name": name,
        "file": paths["test"].name,
        "kind": "generate",
        "template": TEMPLATES[task],
        "metric": "exact_match",
        "fewshot_file": paths["fewshot"].name,
        "max_new_tokens": max_new_tokens,
        "stop": ["\n"],
    }
    paths["yaml"] = out / f"{name}.yaml"
    write_text(paths["yaml"], yaml.safe_dump(spec, allow_unicode=True, sort_keys=False))
    return paths


# ---- a two-turn conversation ---------------------------------------------------------------------

RECALL_QUESTIONS = {
    "first": "Write the first one in Chinese numerals.",
    "second": "Write the second one in Chinese numerals.",
}


def recall_conversation(a: int, b: int, which: str) -> list[dict[str, str]]:
    """Two numbers in words in the first turn; one of them, in Chinese numerals, asked for in the second,
    which can only be answered from the first."""
    return [
        {"role": "user", "content": f"Remember two numbers: {english(a)} and {english(b)}."},
        {"role": "assistant", "content": f"{a} and {b}."},
        {"role": "user", "content": RECALL_QUESTIONS[which]},
        {"role": "assistant", "content": chinese(a if which == "first" else b)},
    ]


@dataclass
class ChatSplit:
    train: list[dict]  # {"messages": a whole conversation}
    test: list[dict]  # {"messages": up to the last question, "answer": the last assistant turn}


def chat_recall_task(seed: int = 0, low: int = 1, high: int = 99, n_test: int = 200) -> ChatSplit:
    """`recall_conversation` over pairs of different numbers low..high, the question drawn per conversation;
    a held-out pair {a, b} is trained on in neither order."""
    pairs = [(a, b) for a in range(low, high + 1) for b in range(a + 1, high + 1)]
    test, _, train = _cut(pairs, seed, n_test, 0, None)
    rng = random.Random(seed + 1)
    conversations = [
        recall_conversation(*p, rng.choice(sorted(RECALL_QUESTIONS))) for a, b in train for p in ((a, b), (b, a))
    ]
    rng.shuffle(conversations)
    held = [
        recall_conversation(*(p if rng.random() < 0.5 else p[::-1]), rng.choice(sorted(RECALL_QUESTIONS)))  # type: ignore[call-arg]
        for p in test
    ]
    return ChatSplit(
        train=[{"messages": c} for c in conversations],
        test=[{"messages": c[:-1], "answer": c[-1]["content"]} for c in held],
    )


def write_chat_task(split: ChatSplit, out: str | Path, name: str, max_new_tokens: int = 16) -> dict[str, Path]:
    """`out/NAME-train.jsonl` (fine-tuning conversations), `out/NAME-test.jsonl` and `out/NAME.yaml` (a chat
    task for `palm eval --tasks`)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"train": out / f"{name}-train.jsonl", "test": out / f"{name}-test.jsonl", "yaml": out / f"{name}.yaml"}
    _write_jsonl(paths["train"], split.train)
    _write_jsonl(paths["test"], split.test)
    spec = {
        "name": name,
        "file": paths["test"].name,
        "kind": "chat",
        "metric": "exact_match",
        "max_new_tokens": max_new_tokens,
    }
    write_text(paths["yaml"], yaml.safe_dump(spec, allow_unicode=True, sort_keys=False))
    return paths
