"""What a compressed encoder keeps: sentence-embedding cosine to the original, and accuracy of a fitted head.

* Sentence embeddings: mean of the last hidden states over the attention mask, L2-normalised
  (the pooling of sentence-transformers' all-MiniLM-L6-v2, ``1_Pooling/config.json``:
  ``pooling_mode_mean_tokens``).
* Head fit: multinomial logistic regression on the frozen embeddings (full-batch L-BFGS,
  L2 penalty ``1e-4``, 200 iterations, float64), the same recipe for the original and the
  compressed model, so the accuracy difference measures what the compression lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn


@torch.no_grad()
def embed(model: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 64, max_length: int = 64) -> Tensor:
    """Mean-pooled, L2-normalised sentence embeddings ``(len(texts), hidden)`` in float32."""
    model.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(
            list(texts[i : i + batch_size]), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
        out.append(nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def mean_cosine(a: Tensor, b: Tensor) -> float:
    """Mean cosine similarity of matching rows."""
    return float(nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean())


def fit_head(x: Tensor, y: Tensor, n_classes: int, l2: float = 1e-4, iters: int = 200) -> nn.Linear:
    """Multinomial logistic regression ``x -> y`` by full-batch L-BFGS (deterministic)."""
    x64 = x.double()
    head = nn.Linear(x.shape[1], n_classes, dtype=torch.float64)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(x64), y) + l2 * head.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def head_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, n_classes: int) -> float:
    """Test accuracy of :func:`fit_head` trained on the train embeddings."""
    head = fit_head(train_x, train_y, n_classes)
    with torch.no_grad():
        return float((head(test_x.double()).argmax(-1) == test_y).double().mean())
