import json

import pytest

from palm.core.errors import CheckpointError
from palm.training.runlog import MetricsLog, read_metrics


def test_a_torn_last_line_is_dropped_and_later_steps_cut(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5]
    log = MetricsLog(path, keep_through=3)  # the checkpoint a killed run resumes from
    log.write({"step": 4, "loss": 0.5})
    log.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]


def test_a_corrupt_line_inside_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(CheckpointError, match=":2"):
        read_metrics(path)
