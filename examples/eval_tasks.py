"""Write two small evaluation tasks from the demo corpora's held-out documents (the ones `palm train`
never trains on), as palm task files and as lm-eval task YAMLs:

- `continuation` (multiple choice): up to 64 characters of a document, cut where a word ends, and two
  possible next 24 characters: its own, and those of another document of the same corpus. Chance
  is 50%.
- `complete` (generation): the same prompts; the answer is the document's next 24 characters,
  scored by chrF and ROUGE-L.

    python examples/eval_tasks.py --out demo/tasks
    palm eval --model demo/run/final --tasks demo/tasks/continuation.yaml,demo/tasks/complete.yaml --shots 3
    palm eval --model demo/run/final --harness palm_continuation --include-path demo/tasks/lm_eval
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

from palm.data.corpora import named_documents
from palm.data.shards import in_validation  # the held-out rule of `palm train`: a hash of the document's position

CORPORA = ["zh-news", "zh-reviews", "python-docs", "python-code"]
VAL_FRACTION = 0.05  # palm train's default
PROMPT_CHARS, NEXT_CHARS, PER_CORPUS = 64, 24, 40  # a prompt ends at the last word end before PROMPT_CHARS


_ENDS_A_WORD = set("，。！？；：、）》」,.;:!?)]}")


def cut(stretch: str) -> tuple[str, str] | None:
    """(prompt, next) of a stretch, cut where a word ends (before a space, or between punctuation and a
    letter), so that no token of the tokenizer spans the cut. None where there is no such place."""
    for p in range(PROMPT_CHARS, PROMPT_CHARS // 2, -1):
        if stretch[p] == " " or (stretch[p - 1] in _ENDS_A_WORD and stretch[p].isalnum()):
            return stretch[:p], stretch[p : p + NEXT_CHARS]
    return None


def held_out(name: str, count: int) -> list[tuple[str, str]]:
    """`count` (prompt, next) pairs cut from stretches of a corpus's held-out documents.

    A long document (a source file) gives up to 16 stretches, so that a corpus of few documents
    still yields enough. Whitespace runs become one space, so that a generation task's stop string
    (a newline) ends only the answer.
    """
    size = PROMPT_CHARS + NEXT_CHARS
    docs = (" ".join(doc.split()) for i, doc in enumerate(named_documents(name)) if in_validation(i, VAL_FRACTION))
    stretches = (d[k : k + size] for d in docs for k in range(0, min(len(d) - size + 1, 16 * size), size))
    found = list(itertools.islice(filter(None, map(cut, stretches)), count))
    if len(found) < count:
        raise SystemExit(f"{name} has only {len(found)} held-out stretches of {size} characters")
    return found


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo/tasks")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    (out / "lm_eval").mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    docs = {name: held_out(name, 2 * PER_CORPUS) for name in CORPORA}

    # Each corpus's first PER_CORPUS documents make test questions; the rest are the few-shot split.
    for split, part in (("test", slice(0, PER_CORPUS)), ("fewshot", slice(PER_CORPUS, None))):
        mc, gen = [], []
        for name in CORPORA:
            pieces = docs[name][part]
            for i, (prompt, right) in enumerate(pieces):
                # The wrong ending comes from the same corpus, so only the context tells them apart.
                wrong = pieces[(i + 1 + rng.randrange(len(pieces) - 1)) % len(pieces)][1]
                answer = rng.randrange(2)
                mc.append({"prompt": prompt, "choices": [wrong, right] if answer else [right, wrong], "answer": answer})
                gen.append({"prompt": prompt, "answer": right})
        write_jsonl(out / f"continuation-{split}.jsonl", mc)
        write_jsonl(out / f"complete-{split}.jsonl", gen)

    (out / "continuation.yaml").write_text(
        "name: continuation\nfile: continuation-test.jsonl\nfewshot_file: continuation-fewshot.jsonl\n"
        "kind: multiple_choice\nmetric: accuracy\n",
        encoding="utf-8",
    )
    (out / "complete.yaml").write_text(
        "name: complete\nfile: complete-test.jsonl\nfewshot_file: complete-fewshot.jsonl\nkind: generate\n"
        f"metric: [chrf, rouge_l, exact_match]\nmax_new_tokens: {NEXT_CHARS}\n",
        encoding="utf-8",
    )
    # The same multiple-choice questions for lm-evaluation-harness (data paths are absolute: lm-eval
    # reads them relative to where it runs, not to the YAML).
    (out / "lm_eval" / "palm_continuation.yaml").write_text(
        "task: palm_continuation\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {(out / 'continuation-test.jsonl').resolve()}\n"
        f"    train: {(out / 'continuation-fewshot.jsonl').resolve()}\n"
        'test_split: test\nfewshot_split: train\noutput_type: multiple_choice\ndoc_to_text: "{{prompt}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: answer\ntarget_delimiter: ""\nfewshot_delimiter: "\\n\\n"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        encoding="utf-8",
    )
    print(
        f"wrote {len(CORPORA) * PER_CORPUS} test questions per task to {out} (continuation.yaml, complete.yaml, lm_eval/)"
    )


if __name__ == "__main__":
    main()
