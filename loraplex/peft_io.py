"""HuggingFace PEFT checkpoints: export loraplex LoRA / rsLoRA / DoRA adapters, import PEFT LoRA ones.

PEFT layout (``peft.PeftModel.save_pretrained``): ``adapter_config.json`` and
``adapter_model.safetensors`` with keys ``base_model.model.<layer>.lora_A.weight`` (r, in),
``...lora_B.weight`` (out, r), ``...lora_magnitude_vector`` (out,) for DoRA, and
``base_model.model.<module>.<param>`` for ``modules_to_save``. Per-layer ranks and alphas travel as
``rank_pattern`` / ``alpha_pattern`` keyed by the escaped full layer name.

PiSSA and OLoRA adapters rewrite the base weight; PEFT's ``from_pretrained`` loads into the
original base, so they are exported the way PEFT converts them itself
(``path_initial_model_for_weight_conversion``): a plain LoRA of rank 2r with
``B' = [B, B0]``, ``A' = [A; -A0]`` and the same scale, whose update equals ``W_res + sBA - W0``.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from loraplex.adapter import is_conv1d, linear_sizes
from loraplex.adapters import DoRA, LoRA
from loraplex.inject import adapt, adapters, add_trained, layers, trained_modules
from loraplex.io import read_json, read_tensors, write_json, write_tensors

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT config entries whose non-default values change the forward in ways loraplex does not model.
UNSUPPORTED = {
    "lora_bias": False,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "use_qalora": False,
    "use_bdlora": None,
    "alora_invocation_tokens": None,
    "megatron_config": None,
}
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


def _factors(a: LoRA) -> tuple[Tensor, Tensor, int, float]:
    """``(A, B, rank, alpha)`` of the PEFT LoRA equivalent to ``a`` on the original base weight."""
    A, B = a.A.detach(), a.B.detach()
    if a.A0 is not None and a.B0 is not None:  # PiSSA / OLoRA: fold the base rewrite into a rank-2r adapter
        A, B = torch.cat([A, -a.A0]), torch.cat([B, a.B0], dim=1)
    r = A.shape[0]
    alpha = a.scale * (r**0.5 if a.options["rslora"] else r)
    return A, B, r, alpha


def export_peft(model: nn.Module, directory: str | os.PathLike[str], name: str | None = None) -> Path:
    """Write the model's LoRA / rsLoRA / DoRA adapter (``name``, if several) as a PEFT checkpoint.

    ``peft.PeftModel.from_pretrained(base, directory)`` then gives the same outputs on the same base.
    """
    chosen = [(n, a) for n, a in adapters(model) if name is None or a.name == name]
    names = sorted({a.name for _, a in chosen})
    if len(names) != 1:
        raise ValueError(f"export_peft needs exactly one adapter name, found {names}; pass name=")
    if bad := sorted({a.method for _, a in chosen if a.method not in ("lora", "dora")}):
        raise ValueError(f"PEFT's LoRA format holds lora, rslora and dora adapters, not {bad}")
    for key in ("rslora", "dropout"):
        if len({a.options[key] for _, a in chosen}) > 1:
            raise ValueError(f"PEFT needs one {key} value for all layers; this model mixes several")
    if len({isinstance(a, DoRA) for _, a in chosen}) > 1:
        raise ValueError("PEFT needs either DoRA on every layer or on none; this model mixes both")
    if len({is_conv1d(a.root) for _, a in chosen}) > 1:
        raise ValueError("PEFT needs one fan_in_fan_out for all layers; this model mixes Linear and Conv1D")

    tensors: dict[str, Tensor] = {}
    ranks, alphas = {}, {}
    for layer, a in chosen:
        assert isinstance(a, LoRA)
        A, B, ranks[layer], alphas[layer] = _factors(a)
        tensors[f"{PREFIX}{layer}.lora_A.weight"] = A
        tensors[f"{PREFIX}{layer}.lora_B.weight"] = B
        if isinstance(a, DoRA):
            tensors[f"{PREFIX}{layer}.lora_magnitude_vector"] = a.m.detach()
    train = trained_modules(model)
    for t in train:
        for k, v in model.get_submodule(t).state_dict().items():
            tensors[f"{PREFIX}{t}.{k}"] = v
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    first = chosen[0][1]
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {re.escape(n): v for n, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(n): v for n, v in alphas.items() if v != alpha},
        "target_modules": [n for n, _ in chosen],
        "modules_to_save": train or None,
        "lora_dropout": first.options["dropout"],
        "use_rslora": first.options["rslora"],
        "use_dora": isinstance(first, DoRA),
        "fan_in_fan_out": is_conv1d(first.root),
        "init_lora_weights": True,
        "bias": "none",
        "inference_mode": True,
    }
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    write_tensors(d / WEIGHTS_FILE, tensors)
    write_json(d / CONFIG_FILE, config)
    return d


def _pattern(patterns: dict[str, Any], layer: str, default: Any) -> Any:
    for key, value in patterns.items():  # PEFT's get_pattern_key
        if re.match(rf"(.*\.)?({key})$", layer):
            return value
    return default


def _read_config(d: Path) -> dict[str, Any]:
    config = read_json(d / CONFIG_FILE)
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        got = config.get("peft_type") if isinstance(config, dict) else config
        raise ValueError(f"{d / CONFIG_FILE}: peft_type={got!r}; only PEFT LoRA checkpoints are imported")
    for key, default in UNSUPPORTED.items():
        if config.get(key, default) not in (default, {}, []):
            raise ValueError(f"{d / CONFIG_FILE}: {key}={config[key]!r} is not supported by loraplex")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.startswith(BASE_REWRITING_INITS):
        raise ValueError(
            f"{d / CONFIG_FILE}: init_lora_weights={init!r} checkpoints need the rewritten base model "
            "they were trained on; save them with PEFT's path_initial_model_for_weight_conversion first"
        )
    return config


def import_peft(model: nn.Module, directory: str | os.PathLike[str], name: str = "default") -> nn.Module:
    """Load a PEFT LoRA / rsLoRA / DoRA checkpoint into the un-adapted base ``model``, in place.

    The targeted layers and their ranks are read from the tensors; alphas from ``lora_alpha`` and
    ``alpha_pattern``; ``modules_to_save`` become loraplex ``train`` modules. All checks run before
    the model is touched.
    """
    d = Path(directory)
    if not (d / WEIGHTS_FILE).is_file() and (d / "adapter_model.bin").is_file():
        raise ValueError(f"{d}: only safetensors checkpoints are read (adapter_model.bin is a pickle)")
    config = _read_config(d)
    raw = read_tensors(d / WEIGHTS_FILE)
    if bad := [k for k in raw if not k.startswith(PREFIX)]:
        raise ValueError(f"{d / WEIGHTS_FILE}: key {bad[0]!r} does not start with {PREFIX!r}")
    tensors = {k[len(PREFIX) :]: v for k, v in raw.items()}
    found = layers(model)
    targets = sorted(k[: -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight"))
    if not targets:
        raise ValueError(f"{d / WEIGHTS_FILE} holds no lora_A weights")
    dora = bool(config.get("use_dora", False))
    groups: dict[tuple[int, float], list[str]] = {}
    for layer in targets:
        if layer not in found:
            raise ValueError(f"{d}: the checkpoint adapts layer {layer!r}, which the model lacks")
        A, B = tensors[f"{layer}.lora_A.weight"], tensors.get(f"{layer}.lora_B.weight")
        n_in, n_out = linear_sizes(found[layer])
        r = A.shape[0]
        if B is None or A.shape != (r, n_in) or B.shape != (n_out, r):
            raise ValueError(
                f"{d}: layer {layer!r} is ({n_out}, {n_in}) but the checkpoint's lora_A is "
                f"{tuple(A.shape)} and lora_B {None if B is None else tuple(B.shape)}"
            )
        if dora and f"{layer}.lora_magnitude_vector" not in tensors:
            raise ValueError(f"{d}: use_dora is set but layer {layer!r} has no lora_magnitude_vector")
        alpha = _pattern(config.get("alpha_pattern") or {}, layer, config.get("lora_alpha", 8))
        groups.setdefault((r, float(alpha)), []).append(layer)
    modules = dict(model.named_modules())
    train = list(config.get("modules_to_save") or [])
    train_names = [n for n in modules if n and any(n == t or n.endswith("." + t) for t in train)]
    for t in train_names:
        state = modules[t].state_dict()
        for k, v in state.items():
            if f"{t}.{k}" not in tensors or tensors[f"{t}.{k}"].shape != v.shape:
                raise ValueError(f"{d}: modules_to_save tensor {t}.{k} missing or of the wrong shape")

    options: dict[str, Any] = {
        "dropout": float(config.get("lora_dropout", 0.0)),
        "rslora": bool(config.get("use_rslora")),
    }
    for (r, alpha), names in groups.items():
        adapt(model, "dora" if dora else "lora", targets=names, name=name, rank=r, alpha=alpha, **options)
    with torch.no_grad():
        for layer, a in adapters(model):
            if a.name != name or layer not in targets:
                continue
            assert isinstance(a, LoRA)
            a.A.copy_(tensors[f"{layer}.lora_A.weight"])
            a.B.copy_(tensors[f"{layer}.lora_B.weight"])
            if isinstance(a, DoRA):
                a.m.copy_(tensors[f"{layer}.lora_magnitude_vector"])
        for t in train_names:
            modules[t].load_state_dict({k: tensors[f"{t}.{k}"] for k in modules[t].state_dict()})
    add_trained(model, train_names)
    return model
