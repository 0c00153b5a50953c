"""HuggingFace PEFT checkpoints, both ways, for every method PEFT also implements.

PEFT layout (``PeftModel.save_pretrained``): ``adapter_config.json`` (``peft_type`` and the method's
options) and ``adapter_model.safetensors`` with keys ``base_model.model.<layer>.<key>`` (each
method names its keys in ``peft_keys``) and ``base_model.model.<module>.<param>`` for
``modules_to_save``. Options that differ between layers travel as PEFT's per-layer patterns
(``rank_pattern``, ``alpha_pattern``, ``block_size_pattern``) keyed by the escaped layer name.

Each adapter class converts its own layer (``to_peft`` / ``peft_options`` / ``load_peft``); this
module only assembles configs, resolves patterns and does the file work. Importing checks every
layer and tensor before the model is touched; only safetensors and JSON are read (a pickled
``adapter_model.bin`` is refused, never opened). Dtypes (decision, issue 10): a tensor of another
floating dtype is cast to the layer's (PEFT checkpoints are often saved in half precision); an
integer or bool tensor where a float is expected is refused. Both files are written atomically,
the config last.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from loraplex.adapter import Adapter, restoring
from loraplex.adapters import METHODS
from loraplex.files import read_json, read_tensors, write_json, write_tensors
from loraplex.inject import adapters_of, add_trained, bind_options, build, layers, match, trained_modules

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
    "bias": "none",
}


def _merge_configs(per_layer: dict[str, dict[str, Any]], patterns: dict[str, str]) -> dict[str, Any]:
    """One PEFT config from per-layer values: common values, else the most common plus a pattern."""
    config: dict[str, Any] = {}
    for key in next(iter(per_layer.values())):
        values = {layer: cfg[key] for layer, cfg in per_layer.items()}
        common = Counter(map(repr, values.values())).most_common(1)[0][0]
        config[key] = next(v for v in values.values() if repr(v) == common)
        odd = {re.escape(n): v for n, v in values.items() if repr(v) != common}
        if odd and key not in patterns:
            raise ValueError(
                f"PEFT needs one {key} for all layers; this model's layers use {sorted(map(repr, values.values()))}"
            )
        if key in patterns:
            config[patterns[key]] = odd
    return config


def export_peft(model: nn.Module, directory: str | os.PathLike[str], name: str | None = None) -> Path:
    """Write the model's adapter (``name``, if it has several) as a HuggingFace PEFT checkpoint.

    ``peft.PeftModel.from_pretrained(base, directory)`` then gives the same outputs on the same base.
    The modules named in ``train`` travel as ``modules_to_save``.
    """
    chosen = list(adapters_of(model, None, name, "export_peft").items())
    types = {a.peft_type for _, a in chosen}
    if None in types or len(types) != 1:
        methods = sorted({a.method for _, a in chosen})
        raise ValueError(f"PEFT holds one method per adapter and has no equivalent for some of {methods}")
    per_layer, tensors = {}, {}
    for layer, a in chosen:
        per_layer[layer], mine = a.to_peft()
        tensors.update({f"{PREFIX}{layer}.{k}": v for k, v in mine.items()})
    train = trained_modules(model)
    for t in train:
        tensors.update({f"{PREFIX}{t}.{k}": v for k, v in model.get_submodule(t).state_dict().items()})
    config = {
        "peft_type": types.pop(),
        "task_type": None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
        "target_modules": [n for n, _ in chosen],
        "modules_to_save": train or None,
        "inference_mode": True,
        **_merge_configs(per_layer, chosen[0][1].peft_patterns),
    }
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    write_tensors(d / WEIGHTS_FILE, tensors)
    write_json(d / CONFIG_FILE, config)
    return d


def _layer_config(config: dict[str, Any], layer: str, patterns: dict[str, str]) -> dict[str, Any]:
    """PEFT's config as it applies to ``layer``: pattern entries override (PEFT's get_pattern_key)."""
    out = dict(config)
    for key, field in patterns.items():
        for pattern, value in (config.get(field) or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", layer):
                out[key] = value
                break
    return out


def _method_for(config: Any, where: Path) -> str:
    if not isinstance(config, dict):
        raise ValueError(f"{where} must hold a JSON object (a PEFT config), not a {type(config).__name__}")
    peft_type = config.get("peft_type")
    found = [m for m, cls in METHODS.items() if peft_type and cls.peft_type == peft_type and cls.peft_matches(config)]
    if len(found) != 1:
        known = sorted({cls.peft_type for cls in METHODS.values() if cls.peft_type})
        raise ValueError(f"{where}: peft_type={peft_type!r} is not one loraplex imports ({', '.join(known)})")
    for key, default in UNSUPPORTED.items():
        if config.get(key, default) not in (default, {}, []):
            raise ValueError(f"{where}: {key}={config[key]!r} is not supported by loraplex")
    return found[0]


def import_peft(model: nn.Module, directory: str | os.PathLike[str], name: str = "default") -> nn.Module:
    """Load a HuggingFace PEFT checkpoint into the un-adapted base ``model``, in place.

    The adapted layers are those with tensors in the file; per-layer options come from the config,
    its patterns and the tensors' shapes; ``modules_to_save`` become loraplex ``train`` modules.
    """
    d = Path(directory)
    if not (d / WEIGHTS_FILE).is_file() and (d / "adapter_model.bin").is_file():
        raise ValueError(f"{d}: only safetensors checkpoints are read (adapter_model.bin is a pickle)")
    config = read_json(d / CONFIG_FILE)
    method = _method_for(config, d / CONFIG_FILE)
    cls = METHODS[method]
    raw = read_tensors(d / WEIGHTS_FILE)
    if bad := [k for k in raw if not k.startswith(PREFIX)]:
        raise ValueError(f"{d / WEIGHTS_FILE}: key {bad[0]!r} does not start with {PREFIX!r}")
    tensors = {k[len(PREFIX) :]: v for k, v in raw.items()}
    marks = ["." + k for k in cls.peft_keys]  # any of them marks a layer (LoKr may lack lokr_w1 or lokr_w1_a)
    targets = sorted({k[: -len(m)] for k in tensors for m in marks if k.endswith(m)})
    if not targets:
        raise ValueError(f"{d / WEIGHTS_FILE} holds none of the {cls.method} tensors {list(cls.peft_keys)}")
    found = layers(model)
    plan: list[tuple[str, Adapter]] = []
    with restoring():
        for layer in targets:
            if layer not in found:
                raise ValueError(f"{d}: the checkpoint adapts layer {layer!r}, which the model lacks")
            mine = {k: tensors[f"{layer}.{k}"] for k in cls.peft_keys if f"{layer}.{k}" in tensors}
            if bad := [k for k, v in mine.items() if not v.is_floating_point()]:
                # decision: another float dtype is cast (PEFT files are often saved in half precision), another kind not
                raise ValueError(
                    f"{d / WEIGHTS_FILE}: tensor {PREFIX}{layer}.{bad[0]} has dtype {mine[bad[0]].dtype}, not a float"
                )
            try:
                options = bind_options(method, cls.peft_options(_layer_config(config, layer, cls.peft_patterns), mine))
                adapter = build(method, found[layer], options, name, layer)
                adapter.load_peft(mine)
            except ValueError as e:
                raise ValueError(f"{d}: layer {layer!r}: {e}") from e
            plan.append((layer, adapter))
    modules = dict(model.named_modules())
    train = match([n for n in modules if n], list(config.get("modules_to_save") or []))
    state: dict[str, dict[str, Tensor]] = {}
    for t in train:
        state[t] = {}
        for k, v in modules[t].state_dict().items():
            got = tensors.get(f"{t}.{k}")
            if got is None or got.shape != v.shape or got.is_floating_point() != v.is_floating_point():
                raise ValueError(
                    f"{d}: modules_to_save tensor {t}.{k} is missing or has the wrong shape or dtype: "
                    f"{None if got is None else (tuple(got.shape), got.dtype)}, expected {(tuple(v.shape), v.dtype)}"
                )
            state[t][k] = got
    for layer, adapter in plan:
        model.set_submodule(layer, adapter)
    for t in train:
        modules[t].load_state_dict(state[t])
    add_trained(model, train)
    return model
