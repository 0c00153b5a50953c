"""Low-rank training on scikit-learn's bundled digits (8x8, 1797 images): TRP and Cuttlefish against full-rank
training, LoRAE against a plain autoencoder.

Data: ``sklearn.datasets.load_digits``, pixels / 16, a fixed stratified split (``train_test_split``,
``test_size=0.25``, ``random_state=0``: 1347 train, 450 test). CPU, float32, ``--threads`` (default 1).

Classification (``--nets cnn,mlp``): the CNN is ``conv 1->16 3x3, conv 16->32 3x3, pool, conv 32->64 3x3, pool,
linear 256->128, linear 128->10`` (ReLU; padding 1), the MLP ``64->256->256->10``. Every run: SGD momentum 0.9,
lr ``--lr`` ×0.1 at 50 % and 75 % of ``--epochs``, batch 64, weight decay 1e-4, the same seed (init and batch
order) for every method. Targeted layers: the CNN's c2, c3, fc1, fc2 (c1 is left full rank, what TRP's
``skip_first_conv`` and Cuttlefish's ``keep_first=1`` do on the default targets), all three MLP linears; both get
these as ``targets`` (Cuttlefish ``keep_first=0``).

* ``full``: plain training.
* ``trp``: :class:`loraplex.lowrank.TRP` with the paper's settings (``period=1``, ``energy=0.9``,
  ``nuclear_weight=3e-4``), then ``finalize()`` at ``ValueThreshold(0.05)``; ``trp-epoch``: the same with one SVD
  per epoch (``period=22``); ``trp-0.99``: ``energy=0.99``, ``period=1``. Trained from scratch, the paper's setting
  removes ~10 % of the energy of a near-flat (random-init) spectrum at every step, so ranks collapse to 2-4 in the
  first epoch, before the gradient has built a spectrum, and accuracy drops (~0.77-0.80 here); the two variants give
  the gradient that time. ``--finetune N`` adds ``<trp>+ft`` rows: ``N`` epochs
  after ``finalize`` at the last lr (the reference's optional retrain).
* ``cuttlefish``: :class:`loraplex.lowrank.Cuttlefish` with the reference defaults (``min_epoch=15``, EMA 15,
  tail 11, ``τ=0.1``, ×2.5 / ×5); the switch happens the epoch after all tracked layers are stable (if they never
  are, at ``--epochs`` − 5: reported as forced); after it a new SGD with the same lr, the factors Frobenius-decayed
  (λ = 1e-4) instead of weight-decayed.

Columns: test accuracy (mean ± std over seeds), total parameters and parameters of the targeted layers (weights
and biases; the factorised layers' two factors), and the final rank of every targeted layer (first seed).

Autoencoders (``--ae``): ``64 -> 128 -> 32 -> 128 -> 64`` (ReLU, sigmoid output), Adam lr 1e-3, batch 100,
``--ae-epochs`` epochs; LoRAE inserts ``LowRankLatent(32)`` before the decoder and adds ``λ ‖M‖_*`` (``λ = 0``: the
extra layer alone; the reference default is 1e-5). Reported on
the test set: reconstruction MSE, and the effective rank of the latent codes fed to the decoder (centred: the mean
is an offset, not a direction): ``exp(H(p))`` with ``p_i = σ_i / Σ σ`` (Roy & Vetterli 2007), and ``#{σ_i > 0.01
σ_1}``; also ``#{σ_i(M) > 0.01 σ_1(M)}``.

    .venv/bin/python benchmarks/digits.py --markdown benchmarks/results/digits.md --plot benchmarks/results/digits.png
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

from loraplex.compression.layers import LOW_RANK_LAYERS
from loraplex.io import write_figure, write_text
from loraplex.lowrank import TRP, Autoencoder, Cuttlefish, LowRankLatent

Data = tuple[Tensor, Tensor, Tensor, Tensor]
WD, BATCH, FD = 1e-4, 64, 1e-4
STEPS_PER_EPOCH = math.ceil(1347 / BATCH)  # 22
# TRP variants: the paper's setting, one SVD per epoch, and a gentler energy
TRP_OPTIONS: dict[str, dict[str, Any]] = {
    "trp": {"energy": 0.9, "period": 1},
    "trp-epoch": {"energy": 0.9, "period": STEPS_PER_EPOCH},
    "trp-0.99": {"energy": 0.99, "period": 1},
}


def load() -> Data:
    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x / 16.0, y, test_size=0.25, random_state=0, stratify=y)
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return f(xtr), torch.tensor(ytr), f(xte), torch.tensor(yte)


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        self.c3 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(256, 128), nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = x.view(-1, 1, 8, 8)
        x = nn.functional.max_pool2d(torch.relu(self.c2(torch.relu(self.c1(x)))), 2)  # (B, 32, 4, 4)
        x = nn.functional.max_pool2d(torch.relu(self.c3(x)), 2)  # (B, 64, 2, 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


NETS: dict[str, tuple[Callable[[], nn.Module], list[str]]] = {
    # net -> (constructor, targeted layers)
    "cnn": (CNN, ["c2", "c3", "fc1", "fc2"]),
    "mlp": (mlp, ["0", "2", "4"]),
}


def params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    model.train()
    return acc


def lr_at(epoch: int, epochs: int, lr: float) -> float:
    return lr * (0.1 if epoch >= epochs // 2 else 1.0) * (0.1 if epoch >= 3 * epochs // 4 else 1.0)


def sgd(groups: Any, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=WD)


def run_epoch(model: nn.Module, opt: torch.optim.Optimizer, data: Data, gen: torch.Generator, hook: Any) -> None:
    xtr, ytr = data[0], data[1]
    for idx in torch.randperm(len(xtr), generator=gen).split(BATCH):
        loss = nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        if hook is not None:
            hook.before_step()
        opt.step()
        if hook is not None:
            hook.step(opt)


def ranks_text(model: nn.Module, names: list[str]) -> str:
    out = []
    for n in names:
        m = model.get_submodule(n)
        if isinstance(m, LOW_RANK_LAYERS):
            out.append(f"{n} {m.rank}")
        else:
            w = m.weight
            out.append(f"{n} full {min(w.shape[0], w[0].numel())}")
    return ", ".join(out)


def train(net: str, method: str, seed: int, data: Data, epochs: int, lr: float, finetune: int) -> dict[str, Any]:
    make, names = NETS[net]
    torch.manual_seed(seed)
    model = make()
    gen = torch.Generator().manual_seed(seed)
    opt = sgd(model.parameters(), lr)
    hook: Any = None
    note = ""
    if method in TRP_OPTIONS:
        hook = TRP(model, targets=names, nuclear_weight=3e-4, final_threshold=0.05, **TRP_OPTIONS[method])
    elif method == "cuttlefish":
        cf = Cuttlefish(model, targets=names, keep_first=0, frobenius_decay=FD)
    results: dict[str, Any] = {}
    for epoch in range(epochs):
        for g in opt.param_groups:
            g["lr"] = lr_at(epoch, epochs, lr)
        if method == "cuttlefish" and not cf.switched and (cf.ready or epoch == epochs - 5):
            note = f"switch at epoch {epoch}" + ("" if cf.ready else " (forced)")
            cf.switch()
            opt, hook = sgd(cf.param_groups(WD), lr_at(epoch, epochs, lr)), cf
        run_epoch(model, opt, data, gen, hook)
        if method == "cuttlefish" and not cf.switched:
            cf.epoch_end()
    results["acc"] = accuracy(model, data[2], data[3])
    if method in TRP_OPTIONS:
        note = f"before finalize {results['acc']:.4f}"
        hook.finalize()
        results["acc"] = accuracy(model, data[2], data[3])
        opt = sgd(model.parameters(), lr_at(epochs - 1, epochs, lr))
        for _ in range(finetune):
            run_epoch(model, opt, data, gen, None)
        results["acc_ft"] = accuracy(model, data[2], data[3])
    results.update(
        params=params(model),
        target_params=sum(params(model.get_submodule(n)) for n in names),
        ranks=ranks_text(model, names),
        note=note,
    )
    return results


def effective_rank(z: Tensor) -> tuple[float, int]:
    """``(exp(H(σ / Σσ)), #{σ > 0.01 σ_1})`` of the centred codes."""
    s = torch.linalg.svdvals((z - z.mean(0)).double())
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum())), int((s > 0.01 * s[0]).sum())


def train_ae(lam: float | None, seed: int, data: Data, epochs: int, n: int = 32) -> dict[str, float]:
    torch.manual_seed(seed)
    enc = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, n))
    dec = nn.Sequential(nn.Linear(n, 128), nn.ReLU(), nn.Linear(128, 64), nn.Sigmoid())
    ae = Autoencoder(enc, dec, LowRankLatent(n) if lam is not None else None, weight=lam or 0.0)
    opt = torch.optim.Adam(ae.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    xtr, xte = data[0], data[2]
    for _ in range(epochs):
        for idx in torch.randperm(len(xtr), generator=gen).split(100):
            loss = ae.loss(xtr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        mse = float(nn.functional.mse_loss(ae(xte), xte))
        erank, count = effective_rank(ae.encode(xte))
        m_rank = float("nan")
        if ae.latent is not None:
            s = torch.linalg.svdvals(ae.latent.matrix)
            m_rank = float((s > 0.01 * s[0]).sum())
    return {"mse": mse, "erank": erank, "count": count, "m_rank": m_rank}


def fmt(xs: list[float], spec: str = ".4f") -> str:
    if len(xs) == 1:
        return format(xs[0], spec)
    return f"{statistics.mean(xs):{spec}} ± {statistics.stdev(xs):{spec}}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nets", default="cnn,mlp")
    p.add_argument("--methods", default="full,trp,trp-epoch,trp-0.99,cuttlefish")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--finetune", type=int, default=0, help="epochs of fine-tuning after finalize")
    p.add_argument("--ae", default="0,1e-5,1e-4,1e-3,1e-2", help="LoRAE λ values ('' skips the autoencoders)")
    p.add_argument("--ae-epochs", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch threads (2 threads on 2 busy cores is far slower)")
    p.add_argument("--markdown", type=Path)
    p.add_argument("--plot", type=Path, help="PNG of accuracy against targeted parameters")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load()
    start = time.time()
    points: dict[str, list[tuple[str, int, float]]] = {}
    md = [
        "# Low-rank training on scikit-learn digits",
        "",
        f"`benchmarks/digits.py`: {args.epochs} epochs, SGD lr {args.lr} (momentum 0.9, wd {WD}, ×0.1 at 50 % and "
        f"75 %), batch {BATCH}, seeds 0..{args.seeds - 1}; 1347 train / 450 test images. TRP: "
        "λ 3e-4, finalize at σ > 0.05 (variants: `trp` energy 0.9 period 1 = the paper; `trp-epoch` energy 0.9, "
        f"period {STEPS_PER_EPOCH} = once per epoch; `trp-0.99` energy 0.99, period 1)"
        + (f", `+ft` = then {args.finetune} epochs at the last lr" if args.finetune else "")
        + f". Cuttlefish: reference detector defaults (switch after epoch ≥ 15 once stable), Frobenius decay {FD}. "
        "Params: weights + biases; targeted: of the layers TRP / Cuttlefish may factorise.",
        "",
    ]
    for net in [s for s in args.nets.split(",") if s]:
        md += [
            f"## {net.upper()}",
            "",
            "| method | test acc | params | targeted params | ranks (seed 0) | note (seed 0) |",
            "|---|---:|---:|---:|---|---|",
        ]
        for method in [s for s in args.methods.split(",") if s]:
            runs = [train(net, method, s, data, args.epochs, args.lr, args.finetune) for s in range(args.seeds)]
            points.setdefault(net, []).append(
                (method, runs[0]["target_params"], statistics.mean(r["acc"] for r in runs))
            )
            r0 = runs[0]
            row = f"| {method} | {fmt([r['acc'] for r in runs])} | {r0['params']} | {r0['target_params']} |"
            md.append(f"{row} {r0['ranks']} | {r0['note']} |")
            if method in TRP_OPTIONS and args.finetune:
                md.append(
                    f"| {method}+ft | {fmt([r['acc_ft'] for r in runs])} | {r0['params']} | {r0['target_params']} | | |"
                )
            print(md[-1], f"[{time.time() - start:.0f}s]", flush=True)
        md.append("")
    lams = [float(s) for s in args.ae.split(",") if s]
    if lams:
        md += [
            "## Autoencoders (latent 32)",
            "",
            f"{args.ae_epochs} epochs, Adam lr 1e-3, batch 100; test set; mean ± std over {args.seeds} seeds.",
            "",
            "| model | λ | test MSE | latent eff. rank exp(H) | latent #σ > 1 % | M #σ > 1 % |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for lam in [None, *lams]:
            runs = [train_ae(lam, s, data, args.ae_epochs) for s in range(args.seeds)]
            name = "plain AE" if lam is None else "LoRAE"
            m_rank = "" if lam is None else fmt([r["m_rank"] for r in runs], ".1f")
            md.append(
                f"| {name} | {'' if lam is None else f'{lam:g}'} | {fmt([r['mse'] for r in runs], '.5f')} | "
                f"{fmt([r['erank'] for r in runs], '.2f')} | {fmt([float(r['count']) for r in runs], '.1f')} | "
                f"{m_rank} |"
            )
            print(md[-1], f"[{time.time() - start:.0f}s]", flush=True)
        md.append("")
    md.append(f"Total time {time.time() - start:.0f} s ({torch.get_num_threads()} threads).")
    text = "\n".join(md) + "\n"
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        write_text(args.markdown, text)
    if args.plot and points:
        plot(points, args.plot)


def plot(points: dict[str, list[tuple[str, int, float]]], path: Path) -> None:
    """Test accuracy against the targeted layers' parameters, one panel per net."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(points), figsize=(5 * len(points), 3.6), squeeze=False)
    for ax, (net, pts) in zip(axes[0], points.items(), strict=True):
        for method, n, acc in pts:
            ax.scatter(n, acc)
            ax.annotate(method, (n, acc), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(xscale="log", xlabel="parameters of the targeted layers", ylabel="test accuracy", title=net.upper())
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_figure(fig, path, dpi=110)


if __name__ == "__main__":
    main()
