"""benchmarks/speed.py's configuration: every registered method is configured, its CLI and its ratios.

No timing and no MiniLM here: the options are checked by building each method on a small square
layer, and the table's ratios on made-up timings.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

import loraplex

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


@pytest.fixture(scope="module")
def speed() -> ModuleType:
    spec = importlib.util.spec_from_file_location("speed_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_every_registered_method_has_options(speed: ModuleType) -> None:
    missing = sorted(set(loraplex.METHODS) - set(speed.OPTIONS))
    assert not missing, f"benchmarks/speed.py OPTIONS has no entry for {missing}"


def test_options_are_the_declared_defaults_with_declared_overrides(speed: ModuleType) -> None:
    """OPTIONS is generated: each method's declared defaults, and OVERRIDES only names declared options."""
    for name, overrides in speed.OVERRIDES.items():
        declared = loraplex.METHODS[name.split("+")[0]].declared_options
        assert set(overrides) <= set(declared), f"{name}: {sorted(set(overrides) - set(declared))} not declared"
    for name, options in speed.OPTIONS.items():
        declared = loraplex.METHODS[name.split("+")[0]].declared_options
        assert options == {k: o.default for k, o in declared.items()} | speed.OVERRIDES.get(name, {}), name


def test_options_name_registered_methods_and_build(speed: ModuleType) -> None:
    """Each option set is accepted by its method on the layer suite's square layer (384: MiniLM's width)."""
    for name, options in speed.OPTIONS.items():
        method = name.split("+")[0]
        assert method in loraplex.METHODS, name
        model = loraplex.adapt(speed.Layer(384), method, targets=speed.PROJ, **options)
        (layer, adapter), *rest = loraplex.adapters(model)
        assert layer == speed.PROJ and not rest and adapter.method == method
        assert model(torch.randn(2, 384)).shape == (2, 384)


def test_methods_all_and_layer_defaults(speed: ModuleType) -> None:
    _, args = speed.parse(["--methods", "all", "--suite", "layer", "--device", "cpu"])
    assert args.methods == list(loraplex.METHODS)
    assert (args.width, args.batch, args.seq_len, args.dtype, args.merged) == (1024, 4, 128, "fp32", True)
    _, args = speed.parse(["--suite", "layer", "--device", "cpu", "--width", "64", "--batch", "2", "--no-merged"])
    assert (args.width, args.batch, args.seq_len, args.merged) == (64, 2, 128, False)
    _, args = speed.parse(["--methods", "dora", "--device", "cpu"])  # minilm: the old defaults, LoRA added
    assert (args.methods, args.batch, args.seq_len) == (["lora", "dora"], 32, 64)


@pytest.mark.parametrize("argv", [["--methods", "nope"], ["--width", "0", "--suite", "layer"], ["--warmup", "-1"]])
def test_bad_arguments_stop(speed: ModuleType, argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        speed.parse([*argv, "--device", "cpu"])


def test_rows_ratios_and_allocator_share(speed: ModuleType) -> None:
    def setup(name: str, ms: float, kind: str = "train", alloc: list[float] | None = None):
        s = speed.Setup(name, nn.Linear(2, 2), None, kind=kind)
        s.block_ms, s.alloc_ms = [ms, ms + 100.0, ms - 1.0], alloc or []  # median: ms
        return s

    setups = {
        s.name: s
        for s in [
            setup("base", 10.0),
            setup("ours-lora", 12.0),
            setup("peft-lora", 15.0),
            setup("ours-elalora", 20.0, alloc=[1.0, 3.0, 2.0]),
            setup("base-infer", 4.0, "infer"),
            setup("ours-lora-merged", 5.0, "infer"),
        ]
    }
    setups["ours-elalora"].event_ms, setups["ours-elalora"].event_every = 8.0, 40
    got = {r["setup"]: r for r in speed.rows(setups, "layer")}
    assert got["ours-lora"]["x_base"] == pytest.approx(1.2) and got["ours-lora"]["x_peft"] == pytest.approx(0.8)
    assert got["peft-lora"]["x_ours_lora"] == pytest.approx(15 / 12) and got["peft-lora"]["x_peft"] is None
    assert got["ours-lora-merged"]["x_base"] == pytest.approx(5 / 4)  # against base-infer, not the training floor
    assert got["ours-lora-merged"]["x_ours_lora"] is None and got["ours-lora-merged"]["trainable_params"] == 0
    e = got["ours-elalora"]
    assert (e["alloc_ms"], e["alloc_pct"]) == (pytest.approx(2.0), pytest.approx(10.0))
    assert e["amortised_pct"] == pytest.approx(100 * (2.0 + 8.0 / 40) / 20.0)
    assert "alloc_ms" not in got["ours-lora"]
    table = speed.alloc_cells(list(got.values()))
    assert [row[0] for row in table] == ["setup", "ours-elalora"] and table[1][3] == "10.0"
