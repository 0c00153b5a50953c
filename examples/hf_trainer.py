"""Fine-tune loraplex adapters with ``transformers.Trainer`` on the embedded data and model.

    HF_HUB_OFFLINE=1 .venv/bin/python examples/hf_trainer.py --method singlora --max-steps 60

The adapters are ordinary modules, so Trainer trains exactly the parameters loraplex left
trainable (adapters and the classification head); ``AdvanceCallback`` keeps step-counting
schedules (SingLoRA's ramp) in step with Trainer's optimizer; ``loraplex.save`` writes the adapter.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import loraplex
from loraplex.data import load_splits
from loraplex.hf import AdvanceCallback
from loraplex.train import default_model_path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="lora")
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--rows", type=int, default=0, help="use only the first N training rows (0: all)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train, test, names = load_splits(None, None)
    path = str(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(names))
    loraplex.adapt(model, args.method, train=["classifier"])
    n = args.rows or len(train.texts)
    enc = tokenizer(list(train.texts[:n]), truncation=True, max_length=48)
    rows = [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": train.labels[i]}
            for i in range(n)]  # fmt: skip
    out = args.out or tempfile.mkdtemp(prefix="loraplex-trainer-")
    targs = TrainingArguments(
        output_dir=out,
        max_steps=args.max_steps,
        per_device_train_batch_size=16,
        learning_rate=loraplex.METHODS[args.method].default_lr,
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        logging_steps=max(1, args.max_steps // 5),
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=rows,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[AdvanceCallback()],
    )
    result = trainer.train()
    loraplex.save(model, os.path.join(out, "adapter"))
    print(f"trained {args.max_steps} steps, final loss {result.training_loss:.4f}, adapter in {out}/adapter")
    return {"model": model, "out": out, "loss": result.training_loss}


if __name__ == "__main__":
    main()
