"""SingLoRA: the single-matrix update against its definition, the ramp over optimizer steps (not forwards),
resuming the ramp from a checkpoint, and option errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import loraplex
from loraplex.adapters.singlora import SingLoRA, ramp


@pytest.mark.parametrize(("d_in", "d_out"), [(7, 7), (5, 11), (11, 5)])
def test_update_is_the_truncated_gram_matrix(d_in: int, d_out: int) -> None:
    torch.manual_seed(0)
    a = SingLoRA(nn.Linear(d_in, d_out), rank=3, alpha=6.0, ramp_steps=4).double()
    a.advance(3)
    A = a.A.detach()
    assert A.shape == (max(d_in, d_out), 3)
    want = (6.0 / 3) * (3 / 4) * (A @ A.T)[:d_out, :d_in]  # s · u(t) · (A A^T)[:out, :in]
    torch.testing.assert_close(a.delta_weight().detach(), want, rtol=1e-12, atol=1e-12)
    x = torch.randn(4, d_in, dtype=torch.float64)
    torch.testing.assert_close(a(x), a.base(x) + x @ want.T, rtol=1e-12, atol=1e-12)


def test_square_update_is_symmetric_positive_semidefinite() -> None:
    a = SingLoRA(nn.Linear(9, 9), rank=2, ramp_steps=0).double()
    dW = a.delta_weight().detach()
    torch.testing.assert_close(dW, dW.T, rtol=0, atol=0)
    eig = torch.linalg.eigvalsh(dW)
    assert eig.min() > -1e-12 and (eig > 1e-9).sum() == 2  # rank r, PSD: the method's restriction


def test_ramp_values() -> None:
    assert [ramp(t, 4) for t in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert ramp(0, 0) == 1.0


def test_forwards_do_not_advance_and_accumulation_counts_one_step() -> None:
    torch.manual_seed(0)
    model = loraplex.adapt(nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 3)), "singlora", rank=2, ramp_steps=10)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    handle = loraplex.track_steps(model, opt)
    for _ in range(2):  # two optimizer steps, each over 4 accumulated micro-batches
        for _ in range(4):
            model(torch.randn(3, 6)).sum().backward()
        opt.step()
        opt.zero_grad()
    layers = [a for _, a in loraplex.adapters(model)]
    assert [(a._step, int(a.step), a.u) for a in layers] == [(2, 2, 0.2)] * 2
    handle.remove()
    opt.step()
    loraplex.advance(model, 3)
    assert all(a._step == 5 and a.u == 0.5 for a in layers)
    with pytest.raises(ValueError, match="steps=-1"):
        loraplex.advance(model, -1)


def test_ramp_resumes_after_save_and_load(tmp_path) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 8))
    model = loraplex.adapt(nn.Sequential(nn.Linear(6, 8)), "singlora", rank=2, ramp_steps=10)
    model[0].base.load_state_dict(base[0].state_dict())
    loraplex.advance(model, 7)
    loraplex.save(model, tmp_path)
    fresh = nn.Sequential(nn.Linear(6, 8))
    fresh.load_state_dict(base.state_dict())
    loraplex.load(fresh, tmp_path)
    assert fresh[0].u == 0.7
    x = torch.randn(2, 6)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    other = SingLoRA(nn.Linear(6, 8), rank=2, ramp_steps=10)
    other.load_state_dict(model[0].state_dict())  # plain torch loading refreshes the host copy too
    assert other.u == 0.7


def test_merge_folds_in_the_current_ramp() -> None:
    torch.manual_seed(0)
    model = loraplex.adapt(nn.Sequential(nn.Linear(5, 5)), "singlora", rank=2, ramp_steps=4)
    loraplex.advance(model, 1)
    x = torch.randn(3, 5)
    y = model(x)
    loraplex.merge(model)
    torch.testing.assert_close(model(x), y)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ramp_steps": -1}, "ramp_steps=-1 must be an integer >= 0"),
        ({"rank": 0}, "rank=0"),
        ({"alpha": float("nan")}, "alpha=nan"),
        ({"init": "pissa"}, "init='pissa'"),
    ],
)
def test_option_errors(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SingLoRA(nn.Linear(4, 4), **options)
