"""The serial bottleneck adapter (Houlsby et al., ICML 2019) and SURM's structured adapters (NeurIPS 2024)."""
# size: four structures (dense, circulant, toeplitz, kronecker), their option rules and declarations

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import loraplex.options as opt
from loraplex.adapter import Adapter, check_int, is_restoring
from loraplex.adapters._kron import kron_linear
from loraplex.adapters._structured import circulant_matmul, toeplitz_matmul
from loraplex.options import Option, validate

STRUCTURES = ("dense", "circulant", "toeplitz", "kronecker")
BOTTLENECK = 64  # Houlsby's middle size (the paper sweeps 8, 64, 256)

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,  # exact (erf) GELU, as the reference's nn.GELU
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
    "leaky_relu": F.leaky_relu,
    "relu6": F.relu6,
    "linear": lambda z: z,
}
# Zero slope at 0, where a structured map starts (M = 0): its generators would never get a gradient.
DEAD_AT_ZERO = ("relu", "relu6")


def kronecker_factor(d: int) -> int:
    """The default ``f`` for ``structure="kronecker"``: the divisor of ``d`` with the fewest parameters
    ``f² + (d / f)²`` (the one nearest ``sqrt(d)``; the smaller on a tie).

    Example:
        >>> kronecker_factor(384), kronecker_factor(768), kronecker_factor(29)
        (16, 24, 1)
    """
    return min((f * f + (d // f) ** 2, f) for f in range(1, d + 1) if d % f == 0)[1]


class Bottleneck(Adapter):
    """The serial adapter (https://arxiv.org/abs/1902.00751), dense or SURM-structured (https://arxiv.org/abs/2406.17740).

    Serial: it acts on the **output** ``h = base(x)`` of the layer it wraps (``out_features`` wide),
    not on the layer input, so its effect is not a weight update: ``weight_update = False``,
    ``delta_weight()`` raises, ``loraplex.merge`` refuses (``unload`` removes it), and it cannot
    stack on another adapter. Put it on the layers whose output the paper adapts (Houlsby: the
    attention output projection and the feed-forward output, before their residual and LayerNorm).

    ``structure="dense"`` (Houlsby): ``y = h + W_up act(W_down dropout(h) + b_down) + b_up`` with
    ``W_down`` (m, out), ``W_up`` (out, m), ``m = bottleneck``. Init: ``W_up = 0, b_up = 0``, so the
    adapter starts as the identity exactly (Houlsby, and AdapterHub's default ``"bert"`` init, draw
    the up-projection from a small Gaussian too, only close to the identity); ``W_down ~ N(0, 0.02²)``,
    ``b_down = 0`` (the BERT-style std the SURM adapter layers give their first factor).
    Trainable: ``2·m·out + m + out``.

    Structured (the authors' ``src/adapter/*_adapter.py``): there is **no bottleneck** — the one
    projection is a square ``out × out`` structured map ``M`` on ``h``, with the bias added **after**
    the activation, as the reference's ``CirculantLayer`` / ``ToeplitzLayer`` / ``KroneckerLayer``:
    ``y = h + act(M dropout(h)) + out_bias``. Init: ``M = 0``, ``out_bias = 0`` (identity at init):

    * ``"circulant"``: ``M = C(a ⊙ b)`` (``C(c)[i, j] = c[(i - j) mod out]``), ``a ~ N(0, 0.02²)``,
      ``b = 0``; ``product=False``: ``M = C(a)``, ``a = 0``. Trainable ``3·out`` (``2·out``).
      **Departure (our decision, issue 18):** the reference's ``CirculantLayer`` adds no output bias in its
      ``use_prod=False`` branch (``act(C(a) x)``; it still allocates ``circulant_bias``, a trainable
      parameter that then never gets a gradient). We keep ``out_bias`` in both branches, so the
      ``product=False`` layer is ``y = h + act(C(a) dropout(h)) + out_bias`` like every other
      structured map here (the reference's own ``product=True`` branch and Toeplitz layers add it):
      the reference's ``2·out`` parameters all train, and a single generating vector is the only
      difference between the two settings. Set ``out_bias`` to 0 and freeze it for the reference's map.
    * ``"toeplitz"``: ``M = T(b) T(a)`` (``T(v)[i, j] = v[|i - j|]``), ``a ~ N(0, 0.02²)``, ``b = 0``;
      ``product=False``: ``M = T(a)``, ``a = 0``. Trainable ``3·out`` (``2·out``). Not pinned down:
      the reference file has two layers, ``ToeplitzLayer`` (``T(a ⊙ b)``, the one its
      ``CustomAdapter`` wires) and ``ToeplitzLayer_general`` (``T(b) T(a)``), and says the latter
      "is the one that is described in the paper"; we follow the paper, which is also the Toeplitz
      LoRA's ``T(b) T(a)``.
    * ``"kronecker"``: ``M = kron(B, A)`` with ``A`` (f, f), ``B`` (out/f, out/f), ``A ~ N(0, 0.02²)``,
      ``B = 0``; ``f = factor`` (default ``kronecker_factor(out)``, the divisor with the fewest
      parameters; the reference's ``r`` has no default). The reference computes
      ``h @ kron(B_ref, A_ref)`` with ``A_ref`` (r0, r1), ``B_ref`` (out/r0, out/r1); ours is
      ``h @ kron(B, A)^T``, the same family with ``A = A_ref^T``, ``B = B_ref^T`` and ``r0 = r1 = f``
      (same init distribution). Applied by ``_kron.kron_linear``. Trainable ``f² + (out/f)² + out``.

    Options and their sources: ``bottleneck`` m (dense only; default 64, Houlsby's middle size;
    AdapterHub's reduction factor 16 would give 24 on a 384-wide model), ``activation`` (default
    ``"gelu"``, what the authors' GLUE script passes; ``"relu"`` and ``"relu6"`` are refused for
    the structured maps, whose pre-activation starts at exactly 0 where their slope is 0: the
    generators would never get a gradient, a dead start the reference has too), ``dropout`` on the
    adapter's input (the reference's ``circ_dropout``; default 0, its script uses 0.15),
    ``product`` (circulant / Toeplitz only: the reference's ``use_prod``).

    Speed: the structured maps are applied by FFT (circulant, Toeplitz) or ``kron_linear`` on the
    rows of ``h``; a serial adapter has no base GEMM to fold a dense ``M`` into.

    Shapes: x (..., in) -> h (..., out) -> (..., out); parameters fp32; the adapter branch is computed
    in fp32 and cast to the layer output's dtype.

    Args:
        base: the layer whose output is adapted (not another adapter).
        structure: ``"dense"``, ``"circulant"``, ``"toeplitz"`` or ``"kronecker"``.
        bottleneck: m, the dense adapter's inner size (None: 64); dense only.
        activation: one of ``ACTIVATIONS``.
        product: circulant / Toeplitz: two generating vectors (True) or one (False).
        factor: kronecker: the size f of the small factor (None: ``kronecker_factor(out)``).
        dropout: dropout probability on the adapter's input.

    Example:
        >>> layer = Bottleneck(nn.Linear(16, 32), bottleneck=8)
        >>> x = torch.randn(2, 16)
        >>> torch.equal(layer(x), layer.base(x))  # W_up = 0, b_up = 0 at init
        True
        >>> Bottleneck.num_params(16, 32, bottleneck=8), Bottleneck.num_params(16, 32, structure="circulant")
        (552, 96)
    """

    method = "adapter"
    reads_base_weight = True  # its effect acts on the base output
    weight_update = False
    paper = "https://arxiv.org/abs/1902.00751"
    formula = (
        "dense: 2 * bottleneck * out + bottleneck + out; circulant / toeplitz: 3 * out (2 * out with product=False); "
        "kronecker: factor² + (out / factor)² + out"
    )
    # The SURM authors' adapter script (src/scripts/run_bert_glue.py, BERT-base on GLUE) trains with AdamW at
    # 2e-3 (weight decay 0.25); Houlsby tunes 3e-5..3e-3 on GLUE (BERT-large).
    default_lr = 2e-3
    size_option = "bottleneck"
    declared_options: ClassVar[dict[str, Option]] = {
        "structure": opt.choice("dense", STRUCTURES, "the map: dense down / up, or one structured out x out map"),
        "bottleneck": Option(
            "int",
            None,
            f"the middle size m (structure='dense'; None: {BOTTLENECK})",
            optional=True,
            size=True,
            checked=False,
        ),
        "activation": opt.choice("gelu", tuple(ACTIVATIONS), "the nonlinearity between the maps"),
        "product": opt.flag(True, "circulant / toeplitz: a product of two structured maps instead of one"),
        "factor": Option(
            "int",
            None,
            "structure='kronecker': A's size f (divides out; None: near sqrt(out))",
            optional=True,
            checked=False,
        ),
        "dropout": opt.dropout(),
    }

    def __init__(
        self,
        base: nn.Module,
        *,
        structure: str = "dense",
        bottleneck: int | None = None,
        activation: str = "gelu",
        product: bool = True,
        factor: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(base)
        if self.stacked:
            raise ValueError(
                f"the bottleneck adapter cannot stack on another adapter (the layer carries a "
                f"{self.base.method!r} adapter): it acts on the layer output, not additively on its input"
            )
        opts = {"structure": structure, "activation": activation, "product": product, "dropout": dropout}
        validate(self.declared_options, opts)  # bottleneck and factor: in sizes (they depend on structure)
        self.structure, self.activation, self.product = structure, activation, product
        self.dropout = nn.Dropout(p_drop) if (p_drop := float(dropout)) else nn.Identity()
        d = self.out_features
        self.m, self.f = self.sizes(d, structure, bottleneck, activation, product, factor)
        dev = self.param_device
        if structure == "dense":
            self.down = nn.Parameter(torch.zeros(self.m, d, device=dev))  # (m, out), fp32
            self.down_bias = nn.Parameter(torch.zeros(self.m, device=dev))  # (m,)
            self.up = nn.Parameter(torch.zeros(d, self.m, device=dev))  # (out, m)
            self.up_bias = nn.Parameter(torch.zeros(d, device=dev))  # (out,)
        elif structure == "kronecker":
            self.A = nn.Parameter(torch.zeros(self.f, self.f, device=dev))  # (f, f)
            self.B = nn.Parameter(torch.zeros(d // self.f, d // self.f, device=dev))  # (out/f, out/f)
            self.out_bias = nn.Parameter(torch.zeros(d, device=dev))  # (out,), added after the activation
        else:
            self.a = nn.Parameter(torch.zeros(d, device=dev))  # (out,)
            self.b = nn.Parameter(torch.zeros(d, device=dev)) if product else None  # (out,)
            self.out_bias = nn.Parameter(torch.zeros(d, device=dev))  # (out,), added after the activation
        if not is_restoring():
            self.reset_parameters()

    @staticmethod
    def sizes(
        d: int, structure: str, bottleneck: int | None, activation: str, product: bool, factor: int | None
    ) -> tuple[int, int]:
        """``(m, f)`` after checking the options that depend on the structure (0 where unused)."""
        if structure != "dense" and bottleneck is not None:
            raise ValueError(
                f"bottleneck={bottleneck!r} applies to structure='dense' only: the {structure} adapter has no "
                "bottleneck (one square out x out map)"
            )
        if structure != "kronecker" and factor is not None:
            raise ValueError(f"factor={factor!r} applies to structure='kronecker' only")
        if structure in ("dense", "kronecker") and product is not True:
            raise ValueError(f"product={product!r} applies to structure='circulant' or 'toeplitz' only")
        if structure != "dense" and activation in DEAD_AT_ZERO:
            raise ValueError(
                f"activation={activation!r} has zero slope at 0, where the {structure} map starts (M = 0): it "
                "would never train; use 'gelu', 'silu', 'tanh', 'leaky_relu' or 'linear'"
            )
        if structure == "dense":
            return check_int("bottleneck", BOTTLENECK if bottleneck is None else bottleneck), 0
        if structure == "kronecker":
            f = kronecker_factor(d) if factor is None else check_int("factor", factor)
            if d % f:
                raise ValueError(f"factor={f} must divide out_features={d}")
            return 0, f
        return 0, 0

    @classmethod
    def num_params(
        cls,
        in_features: int,
        out_features: int,
        *,
        structure: str = "dense",
        bottleneck: int | None = None,
        product: bool = True,
        factor: int | None = None,
        **_: object,
    ) -> int:
        d = out_features
        if structure == "dense":
            m = BOTTLENECK if bottleneck is None else bottleneck
            return 2 * m * d + m + d
        if structure == "kronecker":
            f = kronecker_factor(d) if factor is None else factor
            return f * f + (d // f) ** 2 + d
        return (3 if product else 2) * d

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for _, p in self.own_parameters():
            nn.init.zeros_(p)
        if self.structure == "dense":
            nn.init.normal_(self.down, std=0.02)
        elif self.structure == "kronecker":
            nn.init.normal_(self.A, std=0.02)
        elif self.product:
            nn.init.normal_(self.a, std=0.02)

    def branch(self, h: Tensor) -> Tensor:
        """The adapter's effect on the layer output, in the parameters' dtype: (..., out) -> (..., out)."""
        act = ACTIVATIONS[self.activation]
        z = self.dropout(h).to(self.branch_dtype)
        if self.structure == "dense":
            return F.linear(act(F.linear(z, self.down, self.down_bias)), self.up, self.up_bias)
        if self.structure == "kronecker":
            z = kron_linear(z, self.B, self.A)  # z kron(B, A)^T
        elif self.structure == "circulant":
            z = circulant_matmul(z, self.a if self.b is None else self.a * self.b)  # z C(c)^T
        elif self.b is None:
            z = toeplitz_matmul(z, self.a)  # z T(a)
        else:
            z = toeplitz_matmul(toeplitz_matmul(z, self.a), self.b)  # z T(a) T(b) = z (T(b) T(a))^T
        return act(z) + self.out_bias

    @property
    def branch_dtype(self) -> torch.dtype:
        """The parameters' dtype (fp32 unless converted), in which the branch is computed."""
        return (self.up_bias if self.structure == "dense" else self.out_bias).dtype

    def forward(self, x: Tensor) -> Tensor:
        h = self.base(x)
        if not self.active:
            return h
        return h + self.branch(h).to(h.dtype)

    def delta_weight(self) -> Tensor:
        raise ValueError(
            f"the bottleneck adapter ('adapter', structure={self.structure!r}) is not a weight update: it maps the "
            "layer output h to h + f(h), nonlinear in h, so there is no delta_weight to merge"
        )

    def extra_repr(self) -> str:
        inner: dict[str, Any] = {"structure": self.structure}
        if self.structure == "dense":
            inner["bottleneck"] = self.m
        if self.structure == "kronecker":
            inner["factor"] = self.f
        return super().extra_repr() + ", " + ", ".join(f"{k}={v!r}" for k, v in inner.items())
