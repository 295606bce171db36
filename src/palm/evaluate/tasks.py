"""Local task files (see the package docstring for the format): reading and checking them, and
building the k-shot prompts the paper's protocol shows a model."""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..data.documents import jsonl_rows
from ..text.chat import ChatError, check_messages
from .errors import EvaluationError, TaskError
from .metrics import GENERATION_METRICS

METRICS: dict[str, tuple[str, ...]] = {
    "generate": tuple(GENERATION_METRICS),
    "multiple_choice": ("accuracy",),
    "chat": tuple(GENERATION_METRICS),  # the next assistant turn of a conversation, generated greedily
}
DEFAULT_METRIC = {"generate": "exact_match", "multiple_choice": "accuracy", "chat": "exact_match"}
_YAML_KEYS = {
    "name",
    "file",
    "kind",
    "template",
    "metric",
    "fewshot_file",
    "max_new_tokens",
    "stop",
    "target_delimiter",
    "fewshot_delimiter",
}


@dataclass(frozen=True)
class Example:
    """One question: its prompt, and the text to generate or the index of the right choice."""

    prompt: str
    answer: str | int  # the text to generate (its first reference), or the index of the right choice
    choices: tuple[str, ...] = ()
    messages: tuple[dict[str, str], ...] = ()  # a chat task's conversation so far
    more: tuple[str, ...] = ()  # a generation's other references (SQuAD-style "answer": [...]), scored best-of

    @property
    def target(self) -> str:
        return self.choices[self.answer] if self.choices else self.answer  # type: ignore[return-value]

    @property
    def references(self) -> tuple[str, ...]:
        return (self.target, *self.more)


@dataclass(frozen=True)
class Task:
    """A task file as loaded: its examples and how to prompt and score them."""

    name: str
    kind: str  # "generate" or "multiple_choice"
    examples: tuple[Example, ...]
    metrics: tuple[str, ...]
    fewshot: tuple[Example, ...] | None = None  # None: shots come from the other examples
    template: str = "{prompt}"
    target_delimiter: str = ""
    fewshot_delimiter: str = "\n\n"
    max_new_tokens: int = 32
    stop: tuple[str, ...] = ("\n",)
    source: str = ""

    def format(self, example: Example) -> str:
        return self.template.format(prompt=example.prompt)


def _check_template(where: str, template: str) -> None:
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        template.format(prompt="")
    except (ValueError, KeyError, IndexError, AttributeError) as e:
        raise TaskError(f"{where}: template {template!r} is not a format string with {{prompt}} ({e})") from None
    if "prompt" not in fields:
        raise TaskError(f"{where}: template {template!r} does not use {{prompt}}")


def _chat_example(where: str, row: dict) -> Example:
    try:
        messages = check_messages(row.get("messages"))
    except ChatError as e:
        raise TaskError(f"{where}: {e}") from None
    answers = _answers(where, row.get("answer"), "the text of the next assistant turn")
    return Example(messages[-1]["content"], answers[0], messages=tuple(messages), more=answers[1:])


def _answers(where: str, answer: Any, what: str) -> tuple[str, ...]:
    """A generation's references: one string, or a non-empty list of them."""
    answers = (answer,) if isinstance(answer, str) else tuple(answer) if isinstance(answer, list) else ()
    if not answers or not all(isinstance(a, str) for a in answers):
        got = "an empty list" if answer == [] else type(answer).__name__
        raise TaskError(f'{where}: "answer" must be {what} (a string, or a list of strings), got {got}')
    return answers


def _example(where: str, row: Any, kind: str) -> Example:
    if not isinstance(row, dict):
        raise TaskError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if kind == "chat":
        return _chat_example(where, row)
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        raise TaskError(
            f'{where}: "prompt" must be a string' if "prompt" in row else f'{where}: missing field "prompt"'
        )
    if "answer" not in row:
        raise TaskError(f'{where}: missing field "answer"')
    answer = row["answer"]
    if kind == "generate":
        answers = _answers(where, answer, "the text to generate")
        return Example(prompt, answers[0], more=answers[1:])
    choices = row.get("choices")
    if choices is None:
        raise TaskError(f'{where}: missing field "choices" (a multiple-choice task)')
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise TaskError(f'{where}: "choices" must be a list of at least two non-empty strings')
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise TaskError(f'{where}: "answer" must be the index of the right choice, got {type(answer).__name__}')
    if not 0 <= answer < len(choices):
        raise TaskError(f'{where}: "answer" {answer} is not an index into its {len(choices)} choices')
    return Example(prompt, answer, tuple(choices))


def read_examples(path: Path, kind: str | None = None) -> tuple[str, tuple[Example, ...]]:
    """(kind, examples) of a JSONL task file; the kind, unless given, follows from the first row."""
    examples = []
    for where, row in jsonl_rows(path, TaskError, "task file"):
        if kind is None:
            kind = (
                "chat"
                if isinstance(row, dict) and "messages" in row
                else "multiple_choice"
                if isinstance(row, dict) and "choices" in row
                else "generate"
            )
        examples.append(_example(where, row, kind))
    if not examples:
        raise TaskError(f"task file {path} is empty: it holds no examples")
    return kind or "generate", tuple(examples)


def _yaml_value(where: str, raw: dict, key: str, kind: type, default: Any) -> Any:
    """raw[key] checked to be a `kind` (an explicit null is as wrong as any other type), or `default`."""
    if key not in raw:
        return default
    value = raw[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise TaskError(
            f"{where}: {key} must be a{'n' if kind is int else ''} {kind.__name__}, not {type(value).__name__}"
        )
    return value


def load_task(path: str | Path) -> Task:
    """A task from a `.jsonl` file of examples or a `.yaml` file describing one (see the package docstring)."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml"):
        kind, examples = read_examples(path)
        return Task(path.stem, kind, examples, (DEFAULT_METRIC[kind],), source=str(path))
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise TaskError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if raw is None:
        raise TaskError(f"task file {path} is empty")
    if not isinstance(raw, dict):
        raise TaskError(f"{path}: expected a mapping of task settings, got {type(raw).__name__}")
    where = str(path)
    unknown = sorted(set(map(str, raw)) - _YAML_KEYS)
    if unknown:
        raise TaskError(f"{where}: unknown setting {', '.join(unknown)} (known: {', '.join(sorted(_YAML_KEYS))})")
    if "file" not in raw:
        raise TaskError(f'{where}: missing setting "file" (the JSONL file of examples)')
    if "kind" not in raw:
        raise TaskError(f'{where}: missing setting "kind" ({" or ".join(METRICS)})')
    kind = _yaml_value(where, raw, "kind", str, None)
    if kind not in METRICS:
        raise TaskError(f"{where}: unknown kind {kind!r}; use {' or '.join(METRICS)}")
    metric = raw.get("metric", DEFAULT_METRIC[kind])
    metrics = [metric] if isinstance(metric, str) else metric
    if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) for m in metrics):
        raise TaskError(f"{where}: metric must be a name or a list of names")
    for m in metrics:
        if m not in METRICS[kind]:
            raise TaskError(f"{where}: unknown metric {m!r} for a {kind} task; use {', '.join(METRICS[kind])}")
    template = _yaml_value(where, raw, "template", str, "{prompt}")
    _check_template(where, template)
    name = _yaml_value(where, raw, "name", str, path.stem)
    file = _yaml_value(where, raw, "file", str, None)
    _, examples = read_examples(path.parent / file, kind)
    fewshot = None
    if "fewshot_file" in raw:
        _, fewshot = read_examples(path.parent / _yaml_value(where, raw, "fewshot_file", str, None), kind)
    max_new_tokens = _yaml_value(where, raw, "max_new_tokens", int, 32)
    if max_new_tokens < 1:
        raise TaskError(f"{where}: max_new_tokens must be at least 1, not {max_new_tokens}")
    stop = raw.get("stop", ["\n"])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise TaskError(f"{where}: stop must be a string or a list of non-empty strings")
    return Task(
        name=name,
        kind=kind,
        examples=examples,
        metrics=tuple(metrics),
        fewshot=fewshot,
        template=template,
        target_delimiter=_yaml_value(where, raw, "target_delimiter", str, ""),
        fewshot_delimiter=_yaml_value(where, raw, "fewshot_delimiter", str, "\n\n"),
        max_new_tokens=max_new_tokens,
        stop=tuple(stop),
        source=str(path),
    )


def split_names(specs: Sequence[str]) -> list[str]:
    """Names given comma-separated, one per string, or both (as `--tasks` and `--harness` take them)."""
    return [name.strip() for spec in specs for name in spec.split(",") if name.strip()]


def load_tasks(specs: Sequence[str]) -> list[Task]:
    """Tasks from paths given comma-separated, one per string, or both."""
    paths = split_names(specs)
    if not paths:
        raise TaskError("no task given")
    return [load_task(p) for p in paths]


# ---- few-shot prompts ---------------------------------------------------------------------------------


def fewshot_examples(task: Task, index: int, shots: int, seed: int) -> list[Example]:
    """The k examples shown before example `index`: a fixed sample for (seed, index).

    Drawn from the task's few-shot split, or else from its other examples (never the one asked).
    Seeding per example keeps a prompt the same whatever `--limit` or order the run uses.
    """
    if shots < 0:
        raise EvaluationError(f"--shots must be 0 or more, not {shots}")
    if shots == 0:
        return []
    if task.kind == "chat":
        raise EvaluationError(f"task {task.name} is a chat task, scored zero-shot (--shots 0)")
    pool = task.fewshot if task.fewshot is not None else task.examples
    size = len(pool) if task.fewshot is not None else len(pool) - 1
    if shots > size:
        raise EvaluationError(f"task {task.name} has {size} examples to draw {shots} shots from")
    # A str seed is hashed with SHA-512 by `random`, so it is the same in every process.
    picks = random.Random(f"{seed}/{index}").sample(range(size), shots)
    if task.fewshot is None:
        picks = [j + (j >= index) for j in picks]  # skip the example itself
    return [pool[j] for j in picks]


def build_prompt(task: Task, index: int, shots: int, seed: int, drop: int = 0) -> str:
    """The k-shot prompt for example `index`, leaving out its first `drop` shots."""
    shown = fewshot_examples(task, index, shots, seed)[drop:]
    parts = [task.format(e) + task.target_delimiter + e.target for e in shown]
    return task.fewshot_delimiter.join(parts + [task.format(task.examples[index])])
