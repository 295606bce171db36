"""Question answering end to end: fine-tune a palm model to answer questions about a Python function from
a short context (its signature and summary), in SQuAD's schema ({"context", "question", "answers":
{"text", "answer_start"}}), and score it with SQuAD's exact match and F1 against the baseline that
answers with the context's first sentence.

The data is built offline from the Python standard library that ships with the interpreter (parsed with
`ast`, never imported): for each public function, questions whose answer is a span of its context -
its module, its first parameter, a parameter's default value.

    python examples/qa.py --model demo/run/final --out runs/qa
    python examples/qa.py --out runs/qa --data-only
"""

from __future__ import annotations

import ast
import inspect
import re
import sysconfig
from pathlib import Path

from applications import Application, run

SENTENCE_END = re.compile(r"(?<=[.!?:])\s+")


def _context(module: str, node: ast.FunctionDef) -> tuple[str, list[tuple[str, str]]] | None:
    args = [a for a in node.args.args if a.arg not in ("self", "cls")]
    doc = ast.get_docstring(node)
    if not args or not doc:
        return None
    summary = " ".join(inspect.cleandoc(doc).partition("\n\n")[0].split())
    if not 10 <= len(summary) <= 120:
        return None
    defaults = (
        dict(zip([a.arg for a in node.args.args][-len(node.args.defaults) :], node.args.defaults))
        if node.args.defaults
        else {}
    )
    params = ", ".join(a.arg + (f"={ast.unparse(defaults[a.arg])}" if a.arg in defaults else "") for a in args)
    context = f"{module}.{node.name}({params}) - {summary}"
    qa = [
        (f"Which module defines {node.name}?", module),
        (f"What is the first parameter of {module}.{node.name}?", args[0].arg),
    ]
    qa += [
        (f"What is the default value of {name} in {module}.{node.name}?", ast.unparse(value))
        for name, value in defaults.items()
        if name in {a.arg for a in args} and len(ast.unparse(value)) <= 20
    ][:1]
    return context, qa


def signature_rows() -> list[dict]:
    rows, seen = [], set()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.glob("*.py")):
        if path.stem.startswith("_"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in tree.body:  # module-level functions only
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            found = _context(path.stem, node)
            if found is None or found[0] in seen:
                continue
            context, qa = found
            seen.add(context)
            for i, (question, answer) in enumerate(qa):
                start = context.find(answer)
                if start >= 0:
                    rows.append(
                        {
                            "id": f"{path.stem}.{node.name}.{i}",
                            "context": context,
                            "question": question,
                            "answers": {"text": [answer], "answer_start": [start]},
                        }
                    )
    return rows


def first_sentence(row, _train) -> str:
    return SENTENCE_END.split(row.values["context"], maxsplit=1)[0]


APP = Application(
    steps=1200,
    task="qa",
    metrics=["f1", "exact_match"],
    baseline_name="first sentence of the context",
    baseline=first_sentence,
    max_new_tokens=16,
    group=lambda row: row["context"],
    source="signatures and summaries of the Python standard library's functions",
)

if __name__ == "__main__":
    run(APP, signature_rows(), __doc__)
