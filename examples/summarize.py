"""Summarization end to end: fine-tune a palm model to write a docstring's one-line summary from its
description, in CNN/DailyMail's schema ({"article", "highlights"}), and score it with ROUGE against the
lead-sentence baseline.

The data is built offline from the Python standard library that ships with the interpreter: every
function and class docstring written as PEP 257 asks (a one-line summary, a blank line, a description)
gives one row: the description is the article, the summary line its highlight. Sources are parsed with
`ast`, never imported.

    python examples/summarize.py --model demo/run/final --out runs/summarize
    python examples/summarize.py --out runs/summarize --data-only
"""

from __future__ import annotations

import ast
import inspect
import re
import sysconfig
from pathlib import Path

from applications import Application, run

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def docstring_rows() -> list[dict]:
    """One row per stdlib docstring with a summary line and a description of a few sentences."""
    rows, seen = [], set()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if any(part in ("test", "tests", "idlelib", "site-packages", "lib2to3") for part in path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            summary, _, body = inspect.cleandoc(doc).partition("\n\n")
            summary, body = " ".join(summary.split()), " ".join(body.split())
            if not (15 <= len(summary) <= 100 and summary.endswith(".") and 150 <= len(body) <= 900):
                continue
            if body in seen or ">>>" in body:
                continue
            seen.add(body)
            module = ".".join(path.relative_to(stdlib).with_suffix("").parts)
            rows.append({"id": f"{module}:{node.lineno}:{node.name}", "article": body, "highlights": summary})
    return rows


def lead_sentence(row, _train) -> str:
    return SENTENCE_END.split(row.values["document"], maxsplit=1)[0]


APP = Application(
    steps=2000,
    task="summarize",
    metrics=["rouge2", "rouge1", "rouge_l"],
    baseline_name="lead sentence",
    baseline=lead_sentence,
    source="docstrings of the Python standard library (summary line <- description)",
)

if __name__ == "__main__":
    run(APP, docstring_rows(), __doc__)
