"""Summarization, question-answering and translation data as public data sets ship it, as fine-tuning rows.

Files: JSON Lines (`.gz`/`.zst` too), Parquet, Arrow, `datasets.save_to_disk` folders, and tab-separated
sentence pairs (`.tsv`, a source and a target per line). Schemas, found by their column names:

    summarize  CNN/DailyMail article/highlights, XSum document/summary, LCSTS text/summary
    qa         SQuAD, CMRC 2018: context/question/answers{text: [...], answer_start: [...]}
    translate  WMT translation{en: ..., zh: ...}, one column per language, or .tsv pairs
    any        prompt/completion

`--columns FIELD=COLUMN,...` names the columns of any other schema (the fields: document and summary;
context, question and answer; source and target). A row becomes a `TaskRow`: the values of its task's
template, the one of them that may be cut when the row is too long (the document, the context, the
source), the completion, and every reference answer (a QA row may have several).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import CorpusError, PalmError
from ..text.templates import TEMPLATES as PROMPTS

TASKS = ("summarize", "qa", "translate")
# A task's fields, the one cut to fit the window first, and the columns each field is found under.
FIELDS: dict[str, tuple[str, ...]] = {
    "summarize": ("document", "summary"),
    "qa": ("context", "question", "answer"),
    "translate": ("source", "target"),
}
CUT = {"summarize": "document", "qa": "context", "translate": "source"}
COLUMNS: dict[str, tuple[str, ...]] = {
    "document": ("article", "document", "text", "prompt"),
    "summary": ("highlights", "summary", "completion"),
    "context": ("context",),
    "question": ("question", "prompt"),
    "answer": ("answers", "answer", "completion"),
    "source": ("source", "prompt"),
    "target": ("target", "completion"),
}
LANGUAGES = {
    "en": "English",
    "zh": "Chinese",
    "de": "German",
    "fr": "French",
    "es": "Spanish",
    "ja": "Japanese",
    "ru": "Russian",
    "cs": "Czech",
    "fi": "Finnish",
    "et": "Estonian",
    "kk": "Kazakh",
    "lt": "Lithuanian",
    "gu": "Gujarati",
    "tr": "Turkish",
    "ro": "Romanian",
    "ko": "Korean",
    "ar": "Arabic",
    "pt": "Portuguese",
}
# palm.text.templates' prompt templates with the fields named, so a prompt/completion row reads the same either
# way; a QA row with a context puts it first, a translation with languages names them.
TEMPLATES = {
    "summarize": PROMPTS["summarize"].replace("{prompt}", "{document}"),
    "qa": PROMPTS["qa"].replace("{prompt}", "{question}"),
    "qa+context": "{context}\n\n" + PROMPTS["qa"].replace("{prompt}", "{question}"),
    "translate": PROMPTS["translate"].replace("{prompt}", "{source}"),
    "translate+languages": "Translate from {source_lang} to {target_lang}:\n{source}\n{target_lang}: ",
}


class TaskDataError(PalmError):
    """A task data file, row or column mapping that cannot be used."""


@dataclass
class TaskRow:
    """One example: the template's values, the field cut to fit, the completion, and every reference."""

    template: str
    values: dict[str, str]
    cut: str
    completion: str
    references: list[str] = field(default_factory=list)

    def prompt(self, keep: int | None = None) -> str:
        """The prompt, with only the first `keep` characters of the cut field (all by default)."""
        values = self.values if keep is None else {**self.values, self.cut: self.values[self.cut][:keep]}
        return self.template.format(**values)

    def fitted(self, tokenizer, room: int, bos: bool) -> tuple[list[int], bool] | None:
        """(the prompt's ids in at most `room` tokens, whether the cut field lost its tail); None when even the
        prompt without the cut field is longer. The prompt is tokenized whole, as at inference: the longest
        head of the field that fits is found by bisection (token counts grow with the characters kept)."""
        ids = tokenizer.encode(self.prompt(), bos=bos)
        if len(ids) <= room:
            return ids, False
        fits = lambda keep: len(tokenizer.encode(self.prompt(keep), bos=bos)) <= room  # noqa: E731
        if not fits(0):
            return None
        lo, hi = 0, len(self.values[self.cut])
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        return tokenizer.encode(self.prompt(lo), bos=bos), True


@dataclass(frozen=True)
class Schema:
    """How rows are read: the task, column names given by the user, and translation's languages."""

    task: str
    columns: dict[str, str] = field(default_factory=dict)
    source_lang: str | None = None
    target_lang: str | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise TaskDataError(f"--task must be one of {', '.join(TASKS)}, not {self.task!r}")
        unknown = sorted(set(self.columns) - set(FIELDS[self.task]))
        if unknown:
            raise TaskDataError(
                f"--columns names {', '.join(unknown)}, which a {self.task} row does not have "
                f"(its fields: {', '.join(FIELDS[self.task])})"
            )
        if (self.source_lang is None) != (self.target_lang is None):
            raise TaskDataError("give --source-lang and --target-lang together")
        if self.source_lang is not None and self.task != "translate":
            raise TaskDataError("--source-lang and --target-lang are for --task translate")


def parse_columns(spec: str | None) -> dict[str, str]:
    """`--columns document=body,summary=abstract` as {field: column}."""
    out: dict[str, str] = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        name, eq, column = part.partition("=")
        if not eq or not name.strip() or not column.strip():
            raise TaskDataError(f"--columns takes FIELD=COLUMN pairs separated by commas, not {part.strip()!r}")
        out[name.strip()] = column.strip()
    return out


# ---- files -------------------------------------------------------------------------------------------


def _raw_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(place, row) of every row of a file or saved-dataset folder, in its order."""
    from . import columnar, textio
    from .documents import jsonl_rows

    if path.is_dir():
        files = columnar.saved_dataset(path)
        if files is None:
            raise TaskDataError(f"{path} is a folder but not a saved dataset (no state.json or dataset_dict.json)")
        for file in files:
            for i, row in enumerate(columnar.records(file), 1):
                yield f"{file}: row {i}", row
        return
    if not path.is_file():
        raise TaskDataError(f"data file {path} does not exist")
    kind = textio.inner_suffix(path)
    if kind in (".parquet", ".arrow"):
        for i, row in enumerate(columnar.records(path), 1):
            yield f"{path}: row {i}", row
    elif kind == ".tsv":
        for i, line in enumerate(_text_lines(path), 1):
            if line.strip():
                parts = line.rstrip("\r\n").split("\t")
                if len(parts) != 2:
                    raise TaskDataError(
                        f"{path}:{i}: expected a source and a target separated by one tab, found {len(parts)} fields"
                    )
                yield f"{path}:{i}", {"source": parts[0], "target": parts[1]}
    else:
        yield from jsonl_rows(path, TaskDataError, "data file")


def _text_lines(path: Path) -> Iterator[str]:
    from . import textio

    yield from textio.decode(path, textio.lines(textio.read_blocks(path)), sniff=True)


# ---- rows --------------------------------------------------------------------------------------------


def _find(where: str, row: dict, name: str, schema: Schema) -> Any:
    """The value of field `name`: the user's column, else the first of the known columns the row has."""
    if name in schema.columns:
        if schema.columns[name] not in row:
            raise TaskDataError(f"{where} has no column {schema.columns[name]!r} (--columns {name}=...)")
        return row[schema.columns[name]]
    for column in COLUMNS[name]:
        if column in row:
            return row[column]
    return None


def _text(where: str, value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise TaskDataError(f"{where}: {name} must be text, not {type(value).__name__}")
    return value


def _answers(where: str, value: Any) -> list[str]:
    """SQuAD's answers{text: [...], answer_start: [...]}, a list of texts, or one text."""
    if isinstance(value, dict):
        value = value.get("text")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise TaskDataError(
            f'{where}: the answer must be a text, a list of texts or {{"text": [...]}} '
            "(SQuAD's answers), and not empty"
        )
    return texts


def _pair(where: str, row: dict, schema: Schema) -> tuple[str, str]:
    """A translation row's (source, target): WMT's translation{lang: text}, language columns, or the fields."""
    languages = row["translation"] if isinstance(row.get("translation"), dict) else row
    src, tgt = schema.source_lang, schema.target_lang
    if src is not None and src in languages and tgt in languages:
        return _text(where, languages[src], src), _text(where, languages[tgt], tgt or "")
    if src is None and "translation" in row:
        raise TaskDataError(
            f"{where} holds translations in {', '.join(map(str, languages))}: say which way with "
            "--source-lang and --target-lang"
        )
    source, target = _find(where, row, "source", schema), _find(where, row, "target", schema)
    if source is None or target is None:
        asked = f"no {src!r} and {tgt!r} texts and " if src is not None else ""
        raise TaskDataError(
            f"{where}: {asked}no source and target (its keys: {', '.join(map(str, languages))}; "
            "WMT's translation{...} or language columns with --source-lang/--target-lang, "
            "or --columns source=...,target=...)"
        )
    return _text(where, source, "source"), _text(where, target, "target")


def task_row(where: str, row: Any, schema: Schema) -> TaskRow:
    """A row of any of the schemas above as a TaskRow; a TaskDataError naming file and row otherwise."""
    if not isinstance(row, dict):
        raise TaskDataError(f"{where} is not a record (a JSON object or a table row)")
    task = schema.task
    if task == "translate":
        source, target = _pair(where, row, schema)
        if schema.source_lang is not None:
            names = {
                "source_lang": LANGUAGES.get(schema.source_lang, schema.source_lang),
                "target_lang": LANGUAGES.get(schema.target_lang or "", schema.target_lang or ""),
            }
            return TaskRow(TEMPLATES["translate+languages"], {"source": source, **names}, "source", target, [target])
        return TaskRow(TEMPLATES["translate"], {"source": source}, "source", target, [target])
    found = {name: _find(where, row, name, schema) for name in FIELDS[task]}
    if task == "summarize":
        missing = [n for n in FIELDS[task] if found[n] is None]
        if missing:
            raise TaskDataError(
                f"{where}: no {' or '.join(missing)} (columns {', '.join(map(str, row))}; "
                "name them with --columns document=...,summary=...)"
            )
        summary = _text(where, found["summary"], "summary")
        return TaskRow(
            TEMPLATES["summarize"],
            {"document": _text(where, found["document"], "document")},
            "document",
            summary,
            [summary],
        )
    if found["question"] is None or found["answer"] is None:
        raise TaskDataError(
            f"{where}: no question or answers (columns {', '.join(map(str, row))}; name them with "
            "--columns question=...,answer=...)"
        )
    answers = _answers(where, found["answer"])
    values = {"question": _text(where, found["question"], "question")}
    if found["context"] is None:
        return TaskRow(TEMPLATES["qa"], values, "question", answers[0], answers)
    values["context"] = _text(where, found["context"], "context")
    return TaskRow(TEMPLATES["qa+context"], values, "context", answers[0], answers)


def read_task_rows(path: str | Path, schema: Schema) -> list[TaskRow]:
    """Every row of a task data file (or saved-dataset folder) as TaskRows."""
    path = Path(path)
    try:
        rows = [task_row(where, row, schema) for where, row in _raw_rows(path)]
    except CorpusError as e:
        raise TaskDataError(str(e)) from None
    if not rows:
        raise TaskDataError(f"data file {path} holds no examples")
    empty = next((i for i, r in enumerate(rows) if not r.completion), None)
    if empty is not None:
        raise TaskDataError(f"{path}: row {empty + 1} has an empty {FIELDS[schema.task][-1]}")
    return rows
