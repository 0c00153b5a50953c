"""TRP, Cuttlefish and LoRAE (loraplex.lowrank) against dense numpy re-derivations."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from loraplex.compression.layers import LowRankConv2d, LowRankLinear
from loraplex.lowrank import TRP, Autoencoder, Cuttlefish, LowRankLatent, energy_rank, nuclear_penalty, stable_rank
from loraplex.lowrank.cuttlefish import ema, is_stable


@pytest.fixture(autouse=True)
def _float64():
    """Exact comparisons: every test runs in float64."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def np_truncate(w: np.ndarray, energy: float) -> tuple[np.ndarray, np.ndarray, int]:
    """By hand: matrix ``(N, rest)``, numpy SVD, first k with cumulative energy ≥ energy."""
    m = w.reshape(w.shape[0], -1)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    frac = np.cumsum(s**2) / np.sum(s**2)
    k = next(i + 1 for i in range(len(s)) if frac[i] >= energy - 1e-12)
    return (u[:, :k] @ np.diag(s[:k]) @ vt[:k]).reshape(w.shape), (u[:, :k] @ vt[:k]).reshape(w.shape), k


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, padding=1)
        self.c3 = nn.Conv2d(6, 8, 3, stride=2)
        self.p = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        return self.fc(self.p(torch.relu(self.c3(x))).flatten(1))


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 9), nn.ReLU(), nn.Linear(9, 3))


# ---------------------------------------------------------------- TRP


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.just(0.0), st.floats(1e-3, 10.0)), min_size=1, max_size=12), st.floats(0.05, 1.0))
def test_energy_rank_matches_brute_force(values: list[float], energy: float) -> None:
    s = np.sort(np.array(values))[::-1]
    if s.sum() == 0:
        assert energy_rank(torch.tensor(s.copy()), energy) == 0  # the one energy_rank: 0 for a zero matrix
        return
    frac = np.cumsum(s**2) / np.sum(s**2)
    want = next(i + 1 for i in range(len(s)) if frac[i] >= energy - 1e-12)
    assert energy_rank(torch.tensor(s.copy()), energy) == want


def test_default_targets_skip_first_conv_and_1x1() -> None:
    assert TRP(CNN(), nuclear_weight=0).names == ["c2", "c3", "fc"]
    assert TRP(CNN(), skip_first_conv=False, replace=False).names == ["c1", "c2", "c3", "fc"]
    assert TRP(CNN(), targets=["c1", "p"], replace=False).names == ["c1", "p"]


@pytest.mark.parametrize("name", ["c2", "c3", "fc"])
def test_replace_and_subgradient_match_dense_svd(name: str) -> None:
    torch.manual_seed(1)
    model = CNN()
    w0 = model.get_submodule(name).weight.detach().numpy().copy()
    trp = TRP(model, energy=0.8, nuclear_weight=0.37)
    low, sub, k = np_truncate(w0, 0.8)
    assert trp.ranks()[name] == k < min(w0.shape[0], w0[0].size)
    w = model.get_submodule(name).weight
    np.testing.assert_allclose(w.detach().numpy(), low, atol=1e-12)
    model(torch.randn(3, 2, 6, 6)).square().sum().backward()
    g = w.grad.clone()
    trp.before_step()
    np.testing.assert_allclose((w.grad - g).numpy(), 0.37 * sub, atol=1e-12)


def test_replace_false_keeps_weights_but_adds_truncated_subgradient() -> None:
    model = mlp()
    w0 = model[0].weight.detach().clone()
    trp = TRP(model, energy=0.7, replace=False, nuclear_weight=1.0)
    assert torch.equal(model[0].weight, w0)
    trp.before_step()  # no backward yet: the grad is created
    np.testing.assert_allclose(model[0].weight.grad.numpy(), np_truncate(w0.numpy(), 0.7)[1], atol=1e-12)


def test_period_is_respected() -> None:
    torch.manual_seed(0)
    model = mlp()
    trp = TRP(model, period=3, energy=0.6, nuclear_weight=0.0)
    truncated = []
    for t in range(1, 8):
        with torch.no_grad():  # an "optimizer step" that makes the weights full rank again
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        before = model[0].weight.detach().clone()
        trp.step()
        assert trp.t == t
        changed = not torch.equal(model[0].weight, before)
        truncated.append(changed)
        if changed:
            np.testing.assert_allclose(model[0].weight.detach().numpy(), np_truncate(before.numpy(), 0.6)[0])
        assert bool(trp.pending) == (t % 3 == 0)
    assert truncated == [t % 3 == 0 for t in range(1, 8)]


def test_loop_contract_every_forward_sees_a_truncated_weight() -> None:
    """In an ordinary loop (before_step / optimizer.step / step), each forward's weight is the energy truncation
    of the weight the optimizer left, and each gradient gets λ U_k V_kᵀ of that truncation."""
    torch.manual_seed(7)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    seen: list[torch.Tensor] = []
    model[2].register_forward_pre_hook(lambda m, args: seen.append(m.weight.detach().clone()))
    left = model[2].weight.detach().clone()
    trp = TRP(model, targets=["2"], energy=0.8, nuclear_weight=0.01)
    for _ in range(4):
        model(torch.randn(8, 12)).square().mean().backward()
        np.testing.assert_allclose(seen[-1].numpy(), np_truncate(left.numpy(), 0.8)[0], atol=1e-12)
        g = model[2].weight.grad.clone()
        trp.before_step()
        np.testing.assert_allclose((model[2].weight.grad - g).numpy(), 0.01 * np_truncate(left.numpy(), 0.8)[1])
        opt.step()
        left = model[2].weight.detach().clone()
        trp.step(opt)
        opt.zero_grad()


def test_finalize_factorises_within_truncation_error() -> None:
    torch.manual_seed(2)
    model = CNN()
    trp = TRP(model, final_threshold=0.1, replace=False)
    dense = {n: model.get_submodule(n).weight.detach().clone() for n in trp.names}
    ranks = trp.final_ranks()
    for n, w in dense.items():
        s = np.linalg.svd(w.reshape(w.shape[0], -1).numpy(), compute_uv=False)
        assert ranks[n] == max(1, int((s > 0.1).sum()))
    # make c2 exactly low rank (rank 2) so that it is factorised; fc is 5 x 32: rank 5 > break-even 4
    u, s, vh = torch.linalg.svd(dense["c2"].flatten(1), full_matrices=False)
    s[2:] = 0.05
    with torch.no_grad():
        model.c2.weight.copy_(((u * s) @ vh).view_as(model.c2.weight))
    x = torch.randn(4, 2, 6, 6)
    truncated = copy.deepcopy(model)  # the dense model with c2 at its rank-2 truncation
    with torch.no_grad():
        truncated.c2.weight.copy_(((u[:, :2] * s[:2]) @ vh[:2]).view_as(model.c2.weight))
    trp.finalize()
    assert isinstance(model.c2, LowRankConv2d) and model.c2.rank == 2
    assert isinstance(model.fc, nn.Linear) and isinstance(model.c1, nn.Conv2d)
    err = torch.linalg.matrix_norm(model.c2.dense_weight().detach().flatten(1) - (u * s) @ vh)
    assert math.isclose(float(err), 0.05 * math.sqrt(len(s) - 2), rel_tol=1e-9)  # Eckart–Young
    torch.testing.assert_close(model(x), truncated(x))


def test_finalize_linear_at_value_threshold() -> None:
    torch.manual_seed(3)
    lin = nn.Sequential(nn.Linear(20, 20))
    with torch.no_grad():
        lin[0].weight.mul_(torch.logspace(0, -2, 20))  # decaying column scales: a decaying spectrum
    trp = TRP(lin, replace=False, final_threshold=0.1)
    w = lin[0].weight.detach().numpy().copy()
    u, s, vt = np.linalg.svd(w)
    k = int((s > 0.1).sum())
    assert 1 <= k <= 9  # break-even rank of 20 x 20: 9
    trp.finalize()
    assert isinstance(lin[0], LowRankLinear) and lin[0].rank == k
    np.testing.assert_allclose(lin[0].dense_weight().detach().numpy(), (u[:, :k] * s[:k]) @ vt[:k], atol=1e-10)


def test_trp_state_dict_roundtrip_and_bad_input() -> None:
    model = mlp()
    trp = TRP(model, period=2)
    trp.step()
    trp.step()
    state = trp.state_dict()
    other = TRP(mlp(), period=2)
    other.load_state_dict(state)
    assert other.t == 2 and other.ranks() == trp.ranks()
    assert set(other.pending) == set(trp.pending) and all(
        torch.equal(other.pending[k], trp.pending[k]) for k in trp.pending
    )
    for kwargs, msg in [
        ({"period": 0}, "period=0"),
        ({"energy": 1.5}, "energy=1.5"),
        ({"nuclear_weight": -1.0}, "nuclear_weight=-1.0"),
        ({"targets": "nothing"}, "matches no"),
    ]:
        with pytest.raises(ValueError, match=msg):
            TRP(mlp(), **kwargs)


# ---------------------------------------------------------------- Cuttlefish


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(1, 7), st.integers(1, 7), st.integers(0, 10_000))
def test_stable_rank_matches_numpy(n: int, m: int, seed: int) -> None:
    w = np.random.default_rng(seed).standard_normal((n, m))
    s = np.linalg.svd(w, compute_uv=False)
    assert stable_rank(torch.tensor(w)) == int(np.sum(s**2) / s[0] ** 2)


def test_floored_stable_rank_of_an_orthogonal_matrix_is_full() -> None:
    # issue 18: ‖Q‖_F² / σ_1² computes to 11.99999999999999 (seed 0: ...995); a plain floor gave 11 for 19 of 20
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64, generator=g))
        assert stable_rank(q) == 12
    assert stable_rank(torch.eye(7)) == 7 and stable_rank(torch.diag(torch.tensor([2.0, 1.0, 1.0]))) == 1


def test_one_stable_rank_and_one_energy_rank() -> None:
    from loraplex.analysis import spectra
    from loraplex.compression import allocate
    from loraplex.lowrank import cuttlefish, trp

    assert energy_rank is spectra.energy_rank and trp.energy_rank is spectra.energy_rank
    assert cuttlefish.stable_rank is spectra.floored_stable_rank and allocate.energy_rank is spectra.energy_rank
    for zero in (torch.zeros(4, 3), torch.zeros(3)):  # the zero-matrix convention, once: 0
        assert energy_rank(zero, 0.9) == 0 and stable_rank(zero) == 0 and spectra.stable_rank(zero) == 0.0
    # the callers that need one component say so: TRP's truncation and the allocator keep 1
    assert trp.truncate(torch.zeros(4, 3), 0.9)[2] == 1
    layer = allocate.LayerSpectrum("z", 3, 4, np.zeros(3))
    assert allocate.by_energy([layer], 0.9) == {"z": 1}


def test_ema_and_detector_by_hand() -> None:
    x = [10.0, 8.0, 7.0, 7.0, 7.0]
    w = 2 / 4
    e = [10.0]
    for v in x[1:]:
        e.append(w * v + (1 - w) * e[-1])
    np.testing.assert_allclose(ema(x, 3), e)
    grad = np.abs(np.gradient(e))
    mean2 = np.mean(grad[-2:])
    assert is_stable(x, mean2, min_epoch=4, ema_points=3, tail=2)
    assert not is_stable(x, mean2 * 0.999, min_epoch=4, ema_points=3, tail=2)
    assert not is_stable(x, 1e9, min_epoch=5, ema_points=3, tail=2)  # epoch 4 < min_epoch


def make_rank(model: nn.Sequential, idx: int, rank: int, seed: int) -> None:
    """Set layer ``idx`` to a random matrix with singular values ``[1] * rank + [0.3]`` (stable rank
    ``floor(rank + 0.09) = rank``, away from the rounding of ``floor``; matrix rank ``rank + 1``)."""
    w = model[idx].weight
    g = torch.Generator().manual_seed(seed)
    q1 = torch.linalg.qr(torch.randn(w.shape[0], w.shape[0], generator=g))[0][:, : rank + 1]
    q2 = torch.linalg.qr(torch.randn(w.shape[1], w.shape[1], generator=g))[0][:, : rank + 1]
    s = torch.tensor([1.0] * rank + [0.3])
    with torch.no_grad():
        w.copy_((q1 * s) @ q2.T)


def test_cuttlefish_tracks_switches_and_scales_ranks() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    for i in (0, 2, 4):
        make_rank(model, i, 8, i)  # sr at init 8: ξ = 16 / 8 = 2
    cf = Cuttlefish(model, keep_first=1, min_epoch=3, ema_points=3, tail=2, tau=0.01)
    assert cf.names == ["2", "4"] and cf.xi == {"2": 2.0, "4": 2.0}
    for epoch in range(4):
        make_rank(model, 2, 3, 10 + epoch)  # layer 2 stabilises at sr 3 at once
        make_rank(model, 4, 5 if epoch < 3 else 2, 20 + epoch)  # layer 4 moves at epoch 3
        cf.epoch_end()
    assert cf.history == {"2": [3, 3, 3, 3], "4": [5, 5, 5, 2]}
    assert cf.stable == {"2": True, "4": False} and not cf.ready
    assert cf.ranks() == {"2": 6, "4": 4}  # ceil(sr · ξ)
    for epoch in range(6):
        make_rank(model, 2, 3, 30 + epoch)
        make_rank(model, 4, 2, 40 + epoch)
        cf.epoch_end()
        if cf.ready:
            break
    assert cf.ready
    x = torch.randn(5, 16)
    before = model(x)
    cf.switch()
    assert cf.switched and not cf.ready
    assert isinstance(model[0], nn.Linear) and isinstance(model[2], LowRankLinear) and model[2].rank == 6
    assert model[4].rank == 4
    torch.testing.assert_close(model(x), before)  # the weights have ranks 4 and 3 ≤ r̂: exact
    with pytest.raises(ValueError, match="switched=True"):
        cf.switch()


def test_threshold_scaling_with_layers_remaining() -> None:
    cf = Cuttlefish(mlp(), keep_first=0, tau=0.1, tau_scale=2.5)
    assert [cf.threshold(r) for r in (3, 2, 1)] == pytest.approx([0.1, 0.25, 0.5])


def test_rank_is_clamped_and_dense_kept_when_not_smaller() -> None:
    model = mlp()
    cf = Cuttlefish(model, keep_first=0)
    cf.xi = {n: 100.0 for n in cf.names}
    assert cf.ranks() == {"0": 10, "2": 9, "4": 3}  # min(full, ·)
    cf.switch()
    assert cf.factorized == {} and isinstance(model[2], nn.Linear)


def test_frobenius_decay_equals_autograd() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 6, 3), nn.Flatten(), nn.Linear(6, 8))
    cf = Cuttlefish(model, keep_first=1, frobenius_decay=0.3)
    cf.xi = {n: 0.4 for n in cf.names}
    cf.switch()
    assert set(cf.factorized) == {"1", "3"}
    for up, down in cf.factors():
        up.grad = torch.randn_like(up)
        down.grad = torch.randn_like(down)
    base = [(u.grad.clone(), d.grad.clone()) for u, d in cf.factors()]
    cf.before_step()
    for (up, down), (gu, gd) in zip(cf.factors(), base, strict=True):
        u, d = up.detach().requires_grad_(), down.detach().requires_grad_()
        pen = 0.3 / 2 * (u.flatten(1) @ d.flatten(1)).square().sum()
        au, ad = torch.autograd.grad(pen, (u, d))
        torch.testing.assert_close(up.grad - gu, au)
        torch.testing.assert_close(down.grad - gd, ad)
    groups = cf.param_groups(weight_decay=0.01)
    factors = {id(p) for pair in cf.factors() for p in pair}
    biases = {id(model[0].bias), id(model[1].up.bias), id(model[3].up.bias)}
    assert groups[0]["weight_decay"] == 0.0 and {id(p) for p in groups[0]["params"]} == factors | biases
    assert groups[1]["weight_decay"] == 0.01 and [id(p) for p in groups[1]["params"]] == [id(model[0].weight)]


def test_cuttlefish_state_dict_roundtrip() -> None:
    model = mlp()
    cf = Cuttlefish(model, keep_first=0, min_epoch=0)
    cf.epoch_end()
    cf.xi = {n: 0.3 for n in cf.names}
    cf.switch()
    other_model = mlp(1)
    other = Cuttlefish(other_model, keep_first=0)
    other.load_state_dict(cf.state_dict())
    assert other.switched and other.factorized == cf.factorized and other.history == cf.history
    other_model.load_state_dict(model.state_dict())
    x = torch.randn(2, 12)
    torch.testing.assert_close(other_model(x), model(x))
    with pytest.raises(ValueError, match="keep_first=3"):
        Cuttlefish(mlp(), keep_first=3)


# ---------------------------------------------------------------- LoRAE


def test_nuclear_penalty_value_and_gradient() -> None:
    torch.manual_seed(5)
    latent = LowRankLatent(6, layers=2)
    assert len(latent) == 2 and latent[0].bias is None
    m = latent.matrix
    pen = nuclear_penalty(latent, weight=0.7)
    u, s, vt = np.linalg.svd(m.detach().numpy())
    assert math.isclose(float(pen.detach()), 0.7 * s.sum(), rel_tol=1e-10)
    pen.backward()
    np.testing.assert_allclose(m.grad.numpy(), 0.7 * u @ vt, atol=1e-8)
    assert latent[1].weight.grad is None  # only the first layer is penalised
    with pytest.raises(ValueError, match="weight=-1"):
        nuclear_penalty(latent, weight=-1)


def test_autoencoder_loss_composition() -> None:
    torch.manual_seed(6)
    enc, dec = nn.Linear(8, 4), nn.Linear(4, 8)
    latent = LowRankLatent(4)
    ae = Autoencoder(enc, dec, latent, weight=0.1)
    x = torch.randn(5, 8)
    want = ((dec(latent(enc(x))) - x) ** 2).mean() + 0.1 * torch.linalg.svdvals(latent[0].weight).sum()
    torch.testing.assert_close(ae.loss(x), want)
    plain = Autoencoder(enc, dec)
    torch.testing.assert_close(plain.loss(x), ((dec(enc(x)) - x) ** 2).mean())


# ---------------------------------------------------------------- non-finite weights (issue 18)


def poisoned(value: float) -> nn.Sequential:
    model = mlp()
    with torch.no_grad():
        model[2].weight[1, :2] = value
    return model


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    assert model.state_dict().keys() == state.keys()
    for k, v in state.items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_trp_refuses_non_finite_weights_naming_the_layer(value: float) -> None:
    """Before: torch._LinAlgError "linalg.svd: ... contained non-finite values" for NaN (layer '0' already
    truncated), nothing at all for inf (NaN weights afterwards)."""
    counts = r"\(2 NaN, 0 inf\)" if value != value else r"\(0 NaN, 2 inf\)"
    msg = rf"TRP: layer '2' has non-finite weights {counts}; its SVD needs finite values"
    model = poisoned(value)
    state = state_of(model)
    with pytest.raises(ValueError, match=msg):
        TRP(model)
    assert_state(model, state)
    model = mlp()  # diverged during training: the next SVD step refuses before replacing any layer
    trp = TRP(model)
    with torch.no_grad():
        model[2].weight[1, :2] = value
    state = state_of(model)
    for call in (trp.step, trp.final_ranks, trp.finalize):
        with pytest.raises(ValueError, match=msg):
            call()
        assert_state(model, state)
    assert all(isinstance(model[i], nn.Linear) for i in (0, 2, 4))


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_cuttlefish_refuses_non_finite_weights_naming_the_layer(value: float) -> None:
    """Before: torch._LinAlgError from the stable rank's SVD for NaN, nothing for inf (rank from NaN)."""
    counts = r"\(2 NaN, 0 inf\)" if value != value else r"\(0 NaN, 2 inf\)"
    msg = rf"Cuttlefish: layer '2' has non-finite weights {counts}; its SVD needs finite values"
    model = poisoned(value)
    state = state_of(model)
    with pytest.raises(ValueError, match=msg):
        Cuttlefish(model, keep_first=0)
    assert_state(model, state)
    model = mlp()
    cf = Cuttlefish(model, keep_first=0)
    with torch.no_grad():
        model[2].weight[1, :2] = value
    state = state_of(model)
    for call in (cf.epoch_end, cf.switch):
        with pytest.raises(ValueError, match=msg):
            call()
        assert_state(model, state)
    assert cf.history == {"0": [], "2": [], "4": []} and not cf.switched
