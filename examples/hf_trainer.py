"""Fine-tune loraplex adapters with ``transformers.Trainer`` on the embedded data and model.

    HF_HUB_OFFLINE=1 .venv/bin/python examples/hf_trainer.py --method singlora --max-steps 60
    HF_HUB_OFFLINE=1 .venv/bin/python examples/hf_trainer.py --method adalora --rank 12 --allocator adalora

The adapters are ordinary modules, so Trainer trains exactly the parameters loraplex left
trainable (adapters and the classification head); ``AdvanceCallback`` keeps step-counting
schedules (SingLoRA's ramp) in step with Trainer's optimizer; ``AllocatorCallback`` runs a rank
allocator (AdaLoRA, ElaLoRA, ARD-LoRA) inside Trainer's loop with no other user code;
``loraplex.save`` writes the adapter.
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
from loraplex.hf import AdvanceCallback, AllocatorCallback
from loraplex.rank import ALLOCATORS
from loraplex.train import default_model_path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="lora")
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--allocator", choices=sorted(ALLOCATORS), default=None)
    p.add_argument("--target-r", type=int, default=4, help="adalora allocator: final average rank")
    p.add_argument("--max-steps", type=int, default=60)
    p.add_argument("--rows", type=int, default=0, help="use only the first N training rows (0: all)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train, test, names = load_splits(None, None)
    path = str(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(names))
    options = {} if args.rank is None else {"rank": args.rank}
    loraplex.adapt(model, args.method, train=["classifier"], **options)
    callbacks: list = [AdvanceCallback()]
    allocator = None
    if args.allocator:
        extra = {"target_r": args.target_r} if args.allocator == "adalora" else {}
        allocator = ALLOCATORS[args.allocator](model, args.max_steps, **extra)
        callbacks.append(AllocatorCallback(allocator))
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
        callbacks=callbacks,
    )
    result = trainer.train()
    loraplex.save(model, os.path.join(out, "adapter"))
    print(f"trained {args.max_steps} steps, final loss {result.training_loss:.4f}, adapter in {out}/adapter")
    if allocator is not None:
        print("final ranks:", allocator.ranks())
    return {"model": model, "out": out, "loss": result.training_loss, "allocator": allocator}


if __name__ == "__main__":
    main()
