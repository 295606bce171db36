"""Fine-tuning: the loss counts completion tokens only, a killed run resumes exactly, bad data gets one line."""

import json

import pytest
import torch
from conftest import assert_one_line_error, run_cli
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from palm.data.taskdata import Schema, task_row
from palm.model.model import IGNORE_INDEX, PalmForCausalLM, lm_loss
from palm.text.templates import format_prompt
from palm.training.finetune import FinetuneConfig, finetune
from palm.training.finetune_data import collate, encode_row

ROWS = [
    {"prompt": "What is 3 + 4?", "completion": "7"},
    {"prompt": "What is 12 + 30?", "completion": "42"},
    {"prompt": "three hundred and twelve", "completion": "三百一十二"},
    {"prompt": "Translate: 我喜欢编程", "completion": "I like programming"},
    {"prompt": "What is 5 + 5?", "completion": "10"},
    {"prompt": "twenty-one", "completion": "二十一"},
]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def completion_nll(model, tokenizer, rows, task):
    """By hand: -log p(completion + </s> | <s> prompt), summed over rows, and the number of tokens scored."""
    total, count = 0.0, 0
    for row in rows:
        prompt = [tokenizer.bos_id] + tokenizer.encode(format_prompt(row["prompt"], task), bos=False)
        target = tokenizer.encode(row["completion"], bos=False) + [tokenizer.eos_id]
        ids = torch.tensor([prompt + target])
        with torch.no_grad():
            logp = model(input_ids=ids, use_cache=False).logits[0].log_softmax(-1)
        for j, t in enumerate(target):
            total -= logp[len(prompt) - 1 + j, t].item()
        count += len(target)
    return total, count


def test_only_completion_tokens_are_scored(tokenizer, model_dir):
    model = PalmForCausalLM.from_pretrained(model_dir).eval()
    schema = Schema("qa")
    examples = [encode_row(tokenizer, task_row("row", r, schema), 64)[0] for r in ROWS]
    x, y = collate(examples, tokenizer.pad_id)
    logits = model(input_ids=x, use_cache=False).logits.detach().requires_grad_(True)
    ce, _ = lm_loss(logits, y)
    total, count = completion_nll(model, tokenizer, ROWS, "qa")
    assert int((y != IGNORE_INDEX).sum()) == count
    assert ce.item() == pytest.approx(total / count, rel=1e-5)

    # The loss ignores every prompt position: its gradient there is exactly zero, and changing the
    # prompt-position predictions (or what they would be scored against) leaves it unchanged.
    ce.backward()
    prompt_positions = torch.zeros_like(y, dtype=torch.bool)
    for r, (ids, scored) in enumerate(examples):
        n_prompt = scored.index(True)
        prompt_positions[r, : n_prompt - 1] = True
        assert (y[r, : n_prompt - 1] == IGNORE_INDEX).all()
        assert y[r, len(ids) - 2] == tokenizer.eos_id
    assert logits.grad[prompt_positions].abs().max() == 0
    assert logits.grad[y != IGNORE_INDEX].abs().sum() > 0
    noisy = logits.detach() + 100 * torch.randn_like(logits) * prompt_positions[..., None]
    assert lm_loss(noisy, y)[0].item() == pytest.approx(ce.item(), rel=1e-6)


def test_training_step_loss_is_the_completion_loss(tokenizer, model_dir, tmp_path):
    """End to end: the loss the loop logs at step 1 (one batch of every row) is the by-hand completion NLL."""
    data = write_rows(tmp_path / "train.jsonl", ROWS)
    seen = {}
    cfg = FinetuneConfig.from_settings(
        dict(
            base_model=model_dir,
            data=str(data),
            val=str(data),
            out=str(tmp_path / "run"),
            task="qa",
            max_steps=1,
            batch_size=len(ROWS),
            dropout=0.0,
            progress=False,
            threads=1,
            dtype="fp32",
        )
    )
    finetune(cfg, on_step=lambda run, record: seen.update(record))
    total, count = completion_nll(PalmForCausalLM.from_pretrained(model_dir).eval(), tokenizer, ROWS, "qa")
    assert seen["lm_loss"] == pytest.approx(total / count, rel=1e-5)


def losses(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r.get("val_loss")) for r in lines}


class Killed(Exception):
    pass


def settings(tmp_path, model_dir, name, **kw):
    data = write_rows(tmp_path / "train.jsonl", ROWS * 4)
    base = dict(
        base_model=model_dir,
        data=str(data),
        out=str(tmp_path / name),
        task="qa",
        max_steps=12,
        batch_size=4,
        checkpoint_every=4,
        eval_every=3,
        patience=None,
        lr=1e-2,
        progress=False,
        threads=1,
        dtype="fp32",
    )
    return FinetuneConfig.from_settings({**base, **kw})


def test_resume_after_a_kill_is_bitwise_identical(model_dir, tmp_path):
    straight = finetune(settings(tmp_path, model_dir, "straight"))

    def kill_at_10(run, record):  # between the checkpoints at steps 8 and 12
        if record["step"] == 10:
            raise Killed

    with pytest.raises(Killed):
        finetune(settings(tmp_path, model_dir, "killed"), on_step=kill_at_10)
    assert max(losses(tmp_path / "killed")) == 10
    resumed = finetune(settings(tmp_path, model_dir, "killed"), resume=True)
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")
    assert len(losses(tmp_path / "straight")) == 12 and resumed.step == straight.step == 12
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.extra == straight.extra

    # Dropout was on (0.1, so the same steps without it train differently), and the result is a
    # Transformers directory whose best weights are those of the lowest validation loss.
    config = json.loads((tmp_path / "straight" / "final" / "config.json").read_text())
    assert config["dropout"] == 0.1
    no_dropout = finetune(settings(tmp_path, model_dir, "plain", dropout=0.0))
    assert losses(tmp_path / "plain")[2][0] != losses(tmp_path / "straight")[2][0]
    assert no_dropout.step == 12
    vals = {s: v for s, (_, v) in losses(tmp_path / "straight").items() if v is not None}
    assert straight.extra["best_val_loss"] == min(vals.values())
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "straight" / "final"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "straight" / "final"))
    out = model.generate(
        **tok("Question: What is 3 + 4?\nAnswer: ", return_tensors="pt"), max_new_tokens=3, do_sample=False
    )
    assert out.shape[1] > 0


def test_early_stopping(model_dir, tmp_path):
    # A learning rate far below fp32 resolution leaves the weights, and so the validation loss, unchanged:
    # with patience 2 the run stops at the third evaluation.
    run = finetune(
        settings(tmp_path, model_dir, "stuck", lr=1e-30, dropout=0.0, patience=2, eval_every=2, max_steps=40)
    )
    assert run.stop and run.step == 6
    assert run.extra["best_step"] == 2 and run.extra["evals_since_best"] == 2
    assert (tmp_path / "stuck" / "final" / "model.safetensors").is_file()
    again = finetune(
        settings(tmp_path, model_dir, "stuck", lr=1e-30, dropout=0.0, patience=2, eval_every=2, max_steps=40),
        resume=True,
    )
    assert again.step == 6  # a stopped run stays stopped


def test_cli_finetunes_and_resumes(capsys, model_dir, tmp_path):
    data = write_rows(tmp_path / "rows.jsonl", ROWS * 2)
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        capsys,
        "finetune",
        "--model",
        model_dir,
        "--data",
        str(data),
        "--out",
        str(out),
        "--task",
        "translate",
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--threads",
        "1",
    )
    assert code == 0, err
    assert "fine-tuned 3 steps" in stdout and (out / "final" / "tokenizer.json").is_file()
    code, stdout, err = run_cli(capsys, "finetune", "--resume", str(out), "--steps", "5")
    assert code == 0, err
    assert "fine-tuned 5 steps" in stdout
    code, _, err = run_cli(capsys, "finetune", "--resume", str(out), "--lr", "1")
    assert_one_line_error(code, err, "--lr")


BAD = {
    "missing": None,
    "empty": "",
    "blank-lines": "\n\n  \n",
    "not-json": '{"prompt": "a", "completion": "b"}\nthis is not json\n',
    "not-an-object": '["a", "b"]\n',
    "no-completion": '{"prompt": "a"}\n',
    "no-prompt": '{"completion": "b"}\n',
    "wrong-type": '{"prompt": "a", "completion": 3}\n',
    "empty-completion": '{"prompt": "a", "completion": ""}\n',
    "binary": b"\x00\xff\xfe" * 50,
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_data_files_get_one_line(capsys, model_dir, tmp_path, case):
    path = tmp_path / f"{case}.jsonl"
    content = BAD[case]
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "finetune", "--model", model_dir, "--data", str(path), "--out", str(out))
    assert_one_line_error(code, err, path.name)
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--task", "poetry"], ["--task"]),
        (["--dropout", "1.5"], ["--dropout"]),
        (["--steps", "3", "--epochs", "1"], ["--epochs"]),
    ],
)
def test_bad_flags_get_one_line(capsys, model_dir, tmp_path, argv, words):
    data = write_rows(tmp_path / "rows.jsonl", ROWS)
    code, _, err = run_cli(
        capsys, "finetune", "--model", model_dir, "--data", str(data), "--out", str(tmp_path / "r"), *argv
    )
    assert_one_line_error(code, err, *words)


def test_not_a_model_directory(capsys, tmp_path):
    data = write_rows(tmp_path / "rows.jsonl", ROWS)
    code, _, err = run_cli(
        capsys, "finetune", "--model", str(tmp_path / "nope"), "--data", str(data), "--out", str(tmp_path / "r")
    )
    assert_one_line_error(code, err, "no model directory")


def test_finetune_under_torchrun_is_refused_before_any_work(capsys, model_dir, tmp_path, monkeypatch):
    # palm finetune has no parallel layout: two processes would each train (and write) the same run folder.
    data = write_rows(tmp_path / "rows.jsonl", ROWS)
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "r"
    code, _, err = run_cli(capsys, "finetune", "--model", model_dir, "--data", str(data), "--out", str(out))
    assert_one_line_error(code, err, "torchrun", "--parallel")
    assert not out.exists()


def test_finetune_takes_micro_batches_and_compile_with_lora(capsys, model_dir, tmp_path):
    data = write_rows(tmp_path / "rows.jsonl", ROWS * 2)
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        capsys,
        "finetune",
        "--model",
        model_dir,
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--micro-batch-size",
        "2",
        "--compile",
        "--lora-r",
        "2",
        "--activation-checkpointing",
        "selective",
        "--threads",
        "1",
    )
    assert code == 0, err
    loop = json.loads((out / "run.json").read_text())["loop"]
    assert loop["micro_batch_size"] == 2 and loop["compile"] is True and "fine-tuned 2 steps" in stdout
