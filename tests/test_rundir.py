from palm.core.rundir import RunLayout, checkpoint_step
from palm.training.checkpoint import list_checkpoints


def test_checkpoints_are_ordered_by_step_number(tmp_path):
    layout = RunLayout(tmp_path)
    for step in (9_999_900, 10_000_000, 5):
        folder = layout.checkpoint(step)
        folder.mkdir(parents=True)
        (folder / "state.json").write_text("{}")
    (layout.checkpoints / ".step-0000007.tmp-x").mkdir()  # an interrupted save is not a checkpoint
    assert [checkpoint_step(p) for p in list_checkpoints(layout)] == [5, 9_999_900, 10_000_000]


def test_a_model_directory_knows_its_run(tmp_path):
    layout = RunLayout(tmp_path / "run")
    layout.final.mkdir(parents=True)
    assert RunLayout.of_model(layout.final) is None  # no run.json yet
    layout.settings.write_text("{}")
    assert RunLayout.of_model(layout.final) == layout
    assert layout.default_cache() == (tmp_path / ".palm-cache").resolve()
