"""TRL's trainers on a tiny palm model (the `trl` extra): SFT on text and on conversations with assistant-only
loss, DPO, GRPO and a LoRA run, a few steps each; `palm generate` loads what each saves, `palm merge` merges
the adapter. No network: no hub, no trackers (report_to="none")."""

import random

import pytest

pytest.importorskip("trl", reason="TRL is an optional extra: pip install -e '.[trl]'")

import torch  # noqa: E402
from conftest import run_cli  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from test_chat import CONVERSATION  # noqa: E402
from test_chat_template import palm_before, random_conversation  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

import palm  # noqa: E402
from palm.text.tokenizer import PalmTokenizer  # noqa: E402
from palm.training.finetune_data import collate  # noqa: E402

TEXTS = ["The cat sat on the mat. " * 3, "One two three four five six. " * 2] * 8


def trl_tokenizer(model_dir):
    # palm saves its tokenizer reading "<s>" typed in text as characters; TRL writes the template's <s> and </s>,
    # and the </s> it appends to each text, as text for the tokenizer to read back as the special tokens.
    return AutoTokenizer.from_pretrained(model_dir, split_special_tokens=False)


def settings(config_class, out, **overrides):
    # fp32: TRL defaults to bf16 autocast, which accelerate wraps around the model's forward even after training
    quick = dict(max_steps=6, per_device_train_batch_size=4, learning_rate=3e-3, seed=0, bf16=False)
    offline = dict(report_to="none", use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True)
    return config_class(output_dir=str(out), **{**quick, **offline, **overrides})


def losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def palm_generates(capsys, model: str, *flags: str) -> str:
    capsys.readouterr()  # the trainer's own log lines
    code, out, err = run_cli(
        capsys, "generate", "--model", model, *flags, "--max-new-tokens", "4", "--temperature", "0"
    )
    assert code == 0, err
    return out


def test_sft_on_text(capsys, model_dir, tmp_path):
    trainer = SFTTrainer(
        model=palm.PalmForCausalLM.from_pretrained(model_dir),
        args=settings(SFTConfig, tmp_path / "run", max_length=64),
        train_dataset=Dataset.from_dict({"text": TEXTS}),
        processing_class=trl_tokenizer(model_dir),
    )
    row = trainer.train_dataset[0]["input_ids"]
    tok = PalmTokenizer.load(model_dir)
    assert row == tok.encode(TEXTS[0]) + [tok.eos_id]  # BOS first, the </s> TRL appends as the token
    trainer.train()
    assert losses(trainer)[-1] < 0.5 * losses(trainer)[0]
    trainer.save_model(str(tmp_path / "out"))
    assert palm_generates(capsys, str(tmp_path / "out"), "The cat").startswith("The cat")
    saved = PalmTokenizer.load(tmp_path / "out")  # TRL saved it reading "<s>" as BOS; palm reads it as text
    saved.hf("<s>")
    assert saved.bos_id not in saved.encode("<s>", bos=False)


def test_sft_assistant_only_loss_scores_palms_mask(capsys, model_dir, tokenizer, tmp_path):
    rng = random.Random(36)
    conversations = [CONVERSATION] + [random_conversation(rng) for _ in range(40)]
    conversations = [c for c in conversations if any(palm_before(tokenizer, c)[1])][:8]
    trainer = SFTTrainer(
        model=palm.PalmForCausalLM.from_pretrained(model_dir),
        args=settings(SFTConfig, tmp_path / "run", max_length=256, assistant_only_loss=True),
        train_dataset=Dataset.from_dict({"messages": conversations}),
        processing_class=trl_tokenizer(model_dir),
    )
    rows = [trainer.train_dataset[i] for i in range(len(conversations))]
    want = [palm_before(tokenizer, c) for c in conversations]
    assert [(r["input_ids"], [label != -100 for label in r["labels"]]) for r in rows] == want
    # TRL's batch labels are the targets palm's collate makes, one position later (the model shifts them)
    labels = trainer.data_collator(rows)["labels"]
    _, targets = collate(want, tokenizer.pad_id)
    assert torch.equal(labels[:, 1:], targets) and bool((labels[:, 0] == -100).all())
    trainer.train()
    assert losses(trainer)[-1] < 0.5 * losses(trainer)[0]
    trainer.save_model(str(tmp_path / "out"))
    palm_generates(capsys, str(tmp_path / "out"), "--chat", "Remember thirty-seven and forty-eight.")


def test_dpo(capsys, model_dir, tmp_path):
    pairs = {"prompt": ["Q: 2+3?\nA:", "Q: 4+4?\nA:"] * 4, "chosen": [" 5", " 8"] * 4, "rejected": [" 7", " 9"] * 4}
    trainer = DPOTrainer(
        model=palm.PalmForCausalLM.from_pretrained(model_dir),
        args=settings(DPOConfig, tmp_path / "run", max_length=64),
        train_dataset=Dataset.from_dict(pairs),
        processing_class=trl_tokenizer(model_dir),
    )
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert history[-1]["loss"] < 0.5 * history[0]["loss"] and history[-1]["rewards/margins"] > 0
    trainer.save_model(str(tmp_path / "out"))
    palm_generates(capsys, str(tmp_path / "out"), "Q: 2+3?\nA:")


def test_grpo_generates_through_the_model(capsys, model_dir, tmp_path):
    model = palm.PalmForCausalLM.from_pretrained(model_dir)
    generate, calls, seen = model.generate, [], []
    model.generate = lambda *a, **k: calls.append(1) or generate(*a, **k)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def distinct_characters(completions, **_):
        seen.extend(completions)
        return [float(len(set(c))) for c in completions]

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=distinct_characters,
        args=settings(GRPOConfig, tmp_path / "run", max_steps=2, num_generations=2, max_completion_length=8),
        train_dataset=Dataset.from_dict({"prompt": ["The cat", "One two"] * 4}),
        processing_class=trl_tokenizer(model_dir),
    )
    trainer.train()
    assert calls and len(seen) >= 8 and all(isinstance(c, str) and c for c in seen)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    trainer.save_model(str(tmp_path / "out"))
    palm_generates(capsys, str(tmp_path / "out"), "The cat")


def test_a_trl_lora_adapter_merges_with_palm_merge(capsys, model_dir, tmp_path):
    trainer = SFTTrainer(
        model=palm.PalmForCausalLM.from_pretrained(model_dir),
        args=settings(SFTConfig, tmp_path / "run", max_length=64, learning_rate=1e-2),
        train_dataset=Dataset.from_dict({"text": TEXTS}),
        processing_class=trl_tokenizer(model_dir),
        peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["in_proj"], task_type="CAUSAL_LM"),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    code, _, err = run_cli(
        capsys, "merge", "--base", model_dir, "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")
    )
    assert code == 0, err
    ids = torch.tensor([PalmTokenizer.load(model_dir).encode(TEXTS[0])])
    merged = palm.PalmForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    base = palm.PalmForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        trained, got, untrained = (m(ids).logits for m in (trainer.model.eval().cpu(), merged, base))
    assert torch.allclose(got, trained, atol=1e-4) and not torch.allclose(got, untrained, atol=1e-3)
    palm_generates(capsys, str(tmp_path / "merged"), "The cat")
