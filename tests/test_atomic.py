"""Atomic writes: a failed write leaves what was there; stale temporaries are cleared; bad paths are one line."""

import json

import pytest

from palm.core.atomic import (
    OutputError,
    atomic_directory,
    atomic_file,
    remove_stale_temporaries,
    write_json,
    write_text,
)


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.json"
    write_json(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_file(path) as f:
            f.write("half")
            raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_failed_folder_keeps_the_old_folder(tmp_path):
    out = tmp_path / "model"
    with atomic_directory(out) as tmp:
        (tmp / "w").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "w").write_text("new")
            raise RuntimeError("killed")
    assert (out / "w").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_paths_that_cannot_be_written(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="a file"):
        write_json(tmp_path / "file" / "out.json", {})
    with pytest.raises(OutputError, match="not a folder"):
        with atomic_directory(tmp_path / "file"):
            pass
    with pytest.raises(OutputError, match="--force"):
        (tmp_path / "full").mkdir()
        (tmp_path / "full" / "keep").write_text("k")
        with atomic_directory(tmp_path / "full"):
            pass


def test_stale_temporaries_of_a_crash_are_cleared(tmp_path):
    (tmp_path / ".step-0000004.tmp-abc").mkdir()
    (tmp_path / ".run.json.tmp-x").write_text("half")
    (tmp_path / "step-0000003").mkdir()
    gone = remove_stale_temporaries(tmp_path)
    assert len(gone) == 2 and [p.name for p in tmp_path.iterdir()] == ["step-0000003"]


def test_written_files_and_folders_get_the_usual_permissions(tmp_path):
    """Not mkstemp's private 0600: a model written by palm is readable as any file the user makes."""
    import os

    umask = os.umask(0o022)
    try:
        write_text(tmp_path / "f.txt", "x")
        with atomic_directory(tmp_path / "d") as tmp:
            write_text(tmp / "inner.json", "{}")
    finally:
        os.umask(umask)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "d" / "inner.json").stat().st_mode & 0o777 == 0o644
