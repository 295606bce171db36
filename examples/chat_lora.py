"""Chat fine-tuning of the demo model on a two-turn task, with LoRA and with every weight, each scored on
held-out conversations by `palm eval` (a chat task).

The task (palm.data.synthetic.chat_recall_task): the user gives two numbers in words, the assistant repeats
them in digits, the user asks for the first or the second in Chinese numerals, and the answer can only
come from the first turn. Test pairs are trained on in neither order.

    python examples/chat_lora.py --model demo/run/final --out runs/chat
    python examples/chat_lora.py --out runs/chat --data-only      # the task files alone
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from palm.core.errors import PalmError
from palm.data.synthetic import chat_recall_task, write_chat_task
from palm.evaluate import evaluate_task, load_model, load_task
from palm.training.finetune import FinetuneConfig, finetune
from palm.weights.lora import parameter_counts

RECIPES = {
    # AdamW for the adapters: Adafactor's step is relative to a tensor's own scale, and peft starts every
    # adapter's B at zero, so palm's recipe would move B by lr x 1e-3 (its floor) per step.
    "lora": dict(lora_r=16, lora_alpha=32.0, lora_dropout=0.0, optimizer="adamw", lr=3e-3, dropout=0.0),
    "full": dict(lr=1e-2, dropout=0.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo/run/final")
    ap.add_argument("--out", default="runs/chat")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--only", choices=sorted(RECIPES), help="run one recipe")
    ap.add_argument("--data-only", action="store_true", help="write the task files (OUT/data) and stop")
    args = ap.parse_args()
    out = Path(args.out)
    paths = write_chat_task(chat_recall_task(seed=0), out / "data", "chat_recall")
    if args.data_only:
        print(f"wrote {paths['train']}, {paths['test']} and {paths['yaml']}")
        return
    task = load_task(paths["yaml"])
    rows = []
    for name in [args.only] if args.only else list(RECIPES):
        start = time.time()
        cfg = FinetuneConfig.from_settings(
            dict(
                base_model=args.model,
                data=str(paths["train"]),
                out=str(out / name),
                format="chat",
                max_steps=args.steps,
                batch_size=32,
                hold_steps=args.steps // 2,
                eval_every=250,
                patience=None,
                seq_len=96,
                seed=0,
                threads=args.threads,
                **RECIPES[name],
            )
        )
        run = finetune(cfg)
        minutes = (time.time() - start) / 60
        trainable, total = parameter_counts(run.model)
        model, tokenizer = load_model(out / name / "final", dtype="fp32")
        score = evaluate_task(model, tokenizer, task, samples=False)["metrics"]["exact_match"]
        rows.append((name, run.extra.get("trainable_params", trainable), total, score, minutes, run.step))
        print(f"{name}: exact match {score:.1%} on {len(task.examples)} held-out conversations", flush=True)
    print("\n| recipe | trainable parameters | share of the model | held-out exact match | steps | minutes |")
    print("|---|---|---|---|---|---|")
    for name, trainable, total, score, minutes, steps in rows:
        print(f"| {name} | {trainable:,} | {trainable / total:.1%} | {score:.1%} | {steps} | {minutes:.1f} |")


if __name__ == "__main__":
    try:
        main()
    except PalmError as e:
        print(f"chat_lora: error: {e}", file=sys.stderr)
        sys.exit(1)
