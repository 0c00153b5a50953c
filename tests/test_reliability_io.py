"""Issue 10, checkpoints and atomic saves.

Every loader (``loraplex.load``, ``load_compressed``, ``load_checkpoint``, ``import_peft``) meets
bad files: not safetensors, a pickle (whose ``__reduce__`` would create a marker file), truncated,
corrupted (header and data bytes), malformed or unknown-method or newer-version JSON, tensors of the
wrong shape or dtype, layers the model lacks. Each must raise a ``ValueError`` naming the file /
layer / shape, leave the target bit-identical (every state tensor, every module type, optimizer,
scheduler and random state) and run no code from the file.

Every save (adapters, compressed models, training checkpoints, a results file) is killed with
SIGKILL by a child process in the middle of writing version 2: the folder must still load as
version 1, bit-identical.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from matrix import MODELS, perturb
from safetensors.torch import load_file, save_file
from torch import nn

import loraplex
from loraplex.checkpoint import load_checkpoint, recover, save_checkpoint

MLP = MODELS[0]


class Boom:
    """Unpickling this runs ``touch <marker>``: proof that code from the file was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def torch_save_style(marker: Path) -> bytes:
    """A file laid out like ``torch.save`` (a zip holding ``archive/data.pkl``), without calling it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": Boom(marker)}))
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


# --- one saved artefact per loader --------------------------------------------------------------


def state_of(obj: Any) -> Any:
    """A deep, comparable copy of everything a load could change."""
    if isinstance(obj, nn.Module):
        return {
            "tensors": {k: v.detach().clone() for k, v in obj.state_dict().items()},
            "types": [(n, type(m)) for n, m in obj.named_modules()],
        }
    model, opt, sched = obj
    return {
        "model": state_of(model),
        "opt": copy.deepcopy(opt.state_dict()),
        "sched": copy.deepcopy(sched.state_dict()),
        "rng": (random.getstate(), np.random.get_state(legacy=True)[1].copy(), torch.get_rng_state()),
    }


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8) if t.dtype.is_floating_point else t


def assert_same(a: Any, b: Any) -> None:
    """Bit-identical: tensors equal in dtype, shape and every bit; everything else ``==``."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(bits(a), bits(b))
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def _adapted(seed: int = 3) -> nn.Module:
    model = loraplex.adapt(MLP.make(), "lora", rank=2, train=["classifier"])
    perturb(model, seed=seed)
    return model


def _optimizer(model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return opt, sched


def _steps(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, n: int, seed: int) -> None:
    """``n`` optimizer steps on random gradients (no forward / backward: only the state matters here)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        sched.step()
        opt.zero_grad()


@dataclass
class Kind:
    name: str
    tensor_file: str
    json_file: str
    save: Callable[[Path], None]  # writes version 1 into the folder
    fresh: Callable[[Path], Any]  # the target a load goes into
    load: Callable[[Any, Path], Any]
    layer_key: Callable[[dict[str, torch.Tensor]], str]  # a float32 tensor of a layer (for shape / dtype edits)
    unknown_method: Callable[[dict[str, Any]], None] | None = None
    missing_layer: Callable[[Path], None] | None = None


def _save_adapter(d: Path) -> None:
    loraplex.save(_adapted(), d)


def _save_compressed(d: Path) -> None:
    model = MLP.make()
    perturb(model)
    loraplex.save_compressed(loraplex.compress(model, rank=2, targets=["fc1", "fc2"]), d)


def _save_checkpoint(d: Path) -> None:
    model = _adapted()
    opt, sched = _optimizer(model)
    _steps(model, opt, sched, 2, seed=5)
    save_checkpoint(d, model, opt, sched, step=2)


def _fresh_checkpoint(d: Path) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    model = loraplex.load(MLP.make(), d)
    opt, sched = _optimizer(model)
    _steps(model, opt, sched, 1, seed=9)  # a non-empty state that a partial load would change
    return model, opt, sched


def _save_peft(d: Path) -> None:
    loraplex.export_peft(_adapted(), d)


def _edit_json(path: Path, edit: Callable[[Any], None]) -> None:
    spec = json.loads(path.read_text())
    edit(spec)
    path.write_text(json.dumps(spec))


def _rename_layer(spec: dict[str, Any]) -> None:
    spec["adapters"][0]["layers"][0] = "nope"


def _adapter_lacks(d: Path) -> None:
    _edit_json(d / "adapter.json", _rename_layer)


def _compressed_lacks(d: Path) -> None:
    _edit_json(d / "compression.json", lambda s: s["layers"].__setitem__("nope", s["layers"].pop("fc1")))


def _peft_lacks(d: Path) -> None:
    t = load_file(d / "adapter_model.safetensors")
    save_file({k.replace(".fc1.", ".nope."): v for k, v in t.items()}, d / "adapter_model.safetensors")


def _first(suffix: str) -> Callable[[dict[str, torch.Tensor]], str]:
    return lambda t: next(k for k in sorted(t) if k.endswith(suffix) and t[k].dtype == torch.float32)


KINDS = {
    "adapter": Kind(
        "adapter", "adapter.safetensors", "adapter.json", _save_adapter, lambda d: MLP.make(),
        loraplex.load, _first(".A"),
        unknown_method=lambda s: s["adapters"][0].__setitem__("method", "nope"),
        missing_layer=_adapter_lacks,
    ),
    "compressed": Kind(
        "compressed", "model.safetensors", "compression.json", _save_compressed, lambda d: MLP.make(),
        lambda m, d: loraplex.load_compressed(d, m), _first("down.weight"),
        unknown_method=lambda s: s["layers"]["fc1"].__setitem__("kind", "nope"),
        missing_layer=_compressed_lacks,
    ),
    "checkpoint": Kind(
        "checkpoint", "state.safetensors", "state.json", _save_checkpoint, _fresh_checkpoint,
        lambda t, d: load_checkpoint(d, t[1], t[2]), _first("exp_avg"),
    ),
    "peft": Kind(
        "peft", "adapter_model.safetensors", "adapter_config.json", _save_peft, lambda d: MLP.make(),
        loraplex.import_peft, _first("lora_A.weight"),
        unknown_method=lambda s: s.__setitem__("peft_type", "NOPE"),
        missing_layer=_peft_lacks,
    ),
}  # fmt: skip


@pytest.fixture(params=list(KINDS))
def kind(request: pytest.FixtureRequest) -> Kind:
    return KINDS[request.param]


def refused(kind: Kind, d: Path, match: str, marker: Path | None = None) -> None:
    """The load raises a ValueError matching ``match``, the target is unchanged, the marker absent."""
    target = kind.fresh(d)
    before = state_of(target)
    with pytest.raises(ValueError, match=match):
        kind.load(target, d)
    assert_same(state_of(target), before)
    if marker is not None:
        assert not marker.exists(), "code from the file was executed"


# --- loading bad files ---------------------------------------------------------------------------


def test_a_good_save_loads(kind: Kind, tmp_path: Path) -> None:
    kind.save(tmp_path)
    target = kind.fresh(tmp_path)
    before = state_of(target)
    kind.load(target, tmp_path)
    with pytest.raises(AssertionError):  # the load changed something: the "unchanged" check can fail
        assert_same(state_of(target), before)


BAD_TENSOR_FILES: dict[str, Callable[[bytes, Path], bytes]] = {
    "random bytes": lambda data, _: random.Random(0).randbytes(4096),
    "a JSON file": lambda data, _: json.dumps({"w": [1.0, 2.0]}).encode(),
    "empty": lambda data, _: b"",
    "pickle": lambda data, marker: pickle.dumps({"w": Boom(marker)}),
    "torch.save style": lambda data, marker: torch_save_style(marker),
    "truncated": lambda data, _: data[: len(data) // 2],
    "truncated header": lambda data, _: data[:20],
    "huge header length": lambda data, _: (1 << 40).to_bytes(8, "little") + data[8:],
}


@pytest.mark.parametrize("bad", list(BAD_TENSOR_FILES))
def test_a_bad_tensor_file_is_refused(kind: Kind, bad: str, tmp_path: Path) -> None:
    d, marker = tmp_path / "ckpt", tmp_path / "pwned"
    kind.save(d)
    f = d / kind.tensor_file
    f.write_bytes(BAD_TENSOR_FILES[bad](f.read_bytes(), marker))
    refused(kind, d, rf"{kind.tensor_file}.*(not a readable safetensors|corrupted)", marker)


def test_flipped_header_and_data_bytes_are_refused(kind: Kind, tmp_path: Path) -> None:
    kind.save(tmp_path)
    f = tmp_path / kind.tensor_file
    good = f.read_bytes()
    n = int.from_bytes(good[:8], "little")  # header length; the data follows
    # a byte inside the header JSON, then bytes of the data (the last tensor's, the first tensor's)
    for pos in (8 + n // 2, len(good) - 3, 8 + n + 1):
        data = bytearray(good)
        data[pos] ^= 0x5A
        f.write_bytes(bytes(data))
        refused(kind, tmp_path, rf"{kind.tensor_file}.*(not a readable safetensors|corrupted)")


BAD_JSON: dict[str, bytes] = {
    "malformed": b"{not json",
    "truncated": b'{"format": "loraplex',
    "not utf-8": b"\xff\xfe\x00{",
    "a pickle": pickle.dumps({"format": "x"}),
    "a list": b"[1, 2]",
}


@pytest.mark.parametrize("bad", list(BAD_JSON))
def test_a_bad_json_file_is_refused(kind: Kind, bad: str, tmp_path: Path) -> None:
    kind.save(tmp_path)
    (tmp_path / kind.json_file).write_bytes(BAD_JSON[bad])
    refused(kind, tmp_path, rf"{kind.json_file}")


@pytest.mark.parametrize("name", ["adapter", "compressed", "peft"])  # a training state names no method
def test_an_unknown_method_is_refused(name: str, tmp_path: Path) -> None:
    kind = KINDS[name]
    assert kind.unknown_method is not None
    kind.save(tmp_path)
    _edit_json(tmp_path / kind.json_file, kind.unknown_method)
    refused(kind, tmp_path, r"(?i)'nope'|NOPE")


@pytest.mark.parametrize("kind_name", ["adapter", "compressed"])
def test_a_newer_format_version_is_refused(kind_name: str, tmp_path: Path) -> None:
    kind = KINDS[kind_name]
    kind.save(tmp_path)
    _edit_json(tmp_path / kind.json_file, lambda s: s.__setitem__("format_version", 99))
    refused(kind, tmp_path, r"format_version=99 is newer")


@pytest.mark.parametrize("name", ["adapter", "compressed", "peft"])  # a training state names no layer
def test_a_layer_the_model_lacks_is_refused(name: str, tmp_path: Path) -> None:
    kind = KINDS[name]
    assert kind.missing_layer is not None
    kind.save(tmp_path)
    kind.missing_layer(tmp_path)
    refused(kind, tmp_path, r"'nope'")


def _replace_tensor(kind: Kind, d: Path, change: Callable[[torch.Tensor], torch.Tensor]) -> str:
    """Rewrite one float32 tensor (as another tool would: plain ``save_file``, no digest)."""
    f = d / kind.tensor_file
    tensors = load_file(f)
    key = kind.layer_key(tensors)
    tensors[key] = change(tensors[key])
    save_file(tensors, f)
    return key


def test_a_wrong_shape_is_refused(kind: Kind, tmp_path: Path) -> None:
    kind.save(tmp_path)
    key = _replace_tensor(kind, tmp_path, lambda t: torch.zeros(t.shape[0] + 1, *t.shape[1:]))
    layer = key.split(".")[-3] if kind.name != "checkpoint" else key
    refused(kind, tmp_path, rf"(?s){layer}.*shape|shape.*{layer}")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.float16, torch.float64])
def test_a_wrong_dtype_is_refused(kind: Kind, dtype: torch.dtype, tmp_path: Path) -> None:
    """Decision: a different dtype *kind* (int, bool for float) is always refused. Within floats,
    adapters and compressed models are strict (their dtype is part of the format), PEFT import and
    training checkpoints cast (PEFT files are often saved in half precision; torch's optimizer
    ``load_state_dict`` casts floating state to the parameter's dtype)."""
    kind.save(tmp_path)
    _replace_tensor(kind, tmp_path, lambda t: t.to(dtype))
    if dtype.is_floating_point and kind.name in ("peft", "checkpoint"):
        target = kind.fresh(tmp_path)
        kind.load(target, tmp_path)  # cast: loads
        return
    refused(kind, tmp_path, rf"{str(dtype).removeprefix('torch.')}")


def test_a_pickle_named_like_peft_bin_is_never_read(tmp_path: Path) -> None:
    kind, marker = KINDS["peft"], tmp_path / "pwned"
    kind.save(tmp_path)
    (tmp_path / "adapter_model.safetensors").unlink()
    (tmp_path / "adapter_model.bin").write_bytes(torch_save_style(marker))
    refused(kind, tmp_path, "adapter_model.bin is a pickle", marker)


def test_a_compressed_model_class_is_never_imported(tmp_path: Path) -> None:
    """``model_class`` is looked up among transformers' model classes only, never imported from a path."""
    marker = tmp_path / "pwned"
    KINDS["compressed"].save(tmp_path)
    for name in ("os.system", "__import__", "AutoConfig", "PreTrainedModel.__subclasses__"):
        _edit_json(tmp_path / "compression.json", lambda s, n=name: s.__setitem__("model_class", n))
        with pytest.raises(ValueError, match="not a transformers model class"):
            loraplex.load_compressed(tmp_path)
    assert not marker.exists()


# --- unknown keys: tolerated with a warning -------------------------------------------------------


@pytest.mark.parametrize("where", ["top", "entry"])
def test_unknown_spec_keys_warn_and_load(where: str, tmp_path: Path) -> None:
    for kind, entry in (
        (KINDS["adapter"], lambda s: s["adapters"][0]),
        (KINDS["compressed"], lambda s: s["layers"]["fc1"]),
    ):
        d = tmp_path / kind.name
        kind.save(d)
        reference = kind.fresh(d)
        kind.load(reference, d)

        def add(s: dict[str, Any], entry: Callable[[Any], dict[str, Any]] = entry) -> None:
            (s if where == "top" else entry(s))["zz_future_field"] = {"x": 1}

        _edit_json(d / kind.json_file, add)
        target = kind.fresh(d)
        with pytest.warns(UserWarning, match=r"ignoring unknown keys \['zz_future_field'\]"):
            kind.load(target, d)
        assert_same(state_of(target), state_of(reference))


# --- a save killed in the middle -----------------------------------------------------------------
# One child process (torch imports once) saves version 2 of every artefact, each in its own thread,
# with the writers slowed down: each thread writes half a file, touches its "inside" marker and
# sleeps. When every marker is there, the parent sends SIGKILL. The "between" folders let the
# files through and stop at the next step instead (adapter: after the tensor rename, before the
# spec's; checkpoint: after renaming the old folder away, before renaming the new one in).

CHILD = """
import os, sys, threading, time
sys.path.insert(0, {tests!r})
from pathlib import Path
import torch
import loraplex, loraplex.files, loraplex.io
from loraplex.checkpoint import save_checkpoint
from matrix import MODELS, perturb

root = Path({root!r})
real_save, real_text, real_rename = loraplex.files.save_file, Path.write_text, Path.rename

def stop(where):
    (root / (where + ".inside")).touch()
    time.sleep(120)

def slow_save_file(tensors, path, metadata=None):
    real_save(tensors, path, metadata=metadata)
    name = Path(path).relative_to(root).parts[0].removesuffix(".tmp")  # save_checkpoint writes to <name>.tmp
    if not name.endswith("between"):
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])  # half the file is on disk ...
        stop(name)  # ... when the parent kills us

def slow_write_text(self, text, *args, **kwargs):
    if self.name.startswith(".") and root in self.parents:  # the temporary file of an atomic write
        name = self.relative_to(root).parts[0].removesuffix(".tmp")
        if name != "checkpoint-between":
            real_text(self, text[: len(text) // 2], *args, **kwargs)
            stop(name)
    return real_text(self, text, *args, **kwargs)

def slow_rename(self, target):
    out = real_rename(self, target)
    if str(target).endswith("checkpoint-between.old"):
        stop("checkpoint-between")
    return out

loraplex.files.save_file = slow_save_file
Path.write_text = slow_write_text
Path.rename = slow_rename

def adapter(d):
    model = loraplex.adapt(MODELS[0].make(), "lora", rank=2, train=["classifier"])
    perturb(model, seed=11)
    loraplex.save(model, d)

def compressed(d):
    model = MODELS[0].make()
    perturb(model, seed=11)
    loraplex.save_compressed(loraplex.compress(model, rank=2, targets=["fc1", "fc2"]), d)

def checkpoint(d):
    model = loraplex.adapt(MODELS[0].make(), "lora", rank=2, train=["classifier"])
    perturb(model, seed=11)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    opt.step()
    sched.step()
    save_checkpoint(d, model, opt, sched, step=7)

def results(d):
    loraplex.io.write_json(d / "results.json", {{"version": 2, "rows": list(range(1000))}})

jobs = [adapter, compressed, checkpoint, results]
jobs += [lambda d: adapter(d), lambda d: checkpoint(d)]
names = ["adapter", "compressed", "checkpoint", "results", "adapter-between", "checkpoint-between"]
for job, name in zip(jobs, names):
    threading.Thread(target=job, args=(root / name,), daemon=True).start()
time.sleep(120)
"""

SAVES = {
    "adapter": "adapter",
    "compressed": "compressed",
    "checkpoint": "checkpoint",
    "adapter-between": "adapter",
    "checkpoint-between": "checkpoint",
}


def files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """Version 1 of every artefact, then a child killed while saving version 2 over each.

    Returns the root and, per folder, (its files before, the state a load of version 1 gives).
    """
    root = tmp_path_factory.mktemp("killed")
    before: dict[str, Any] = {}
    for name, kind_name in SAVES.items():
        kind, d = KINDS[kind_name], root / name
        kind.save(d)
        target = kind.fresh(d)
        kind.load(target, d)
        before[name] = (files(d), state_of(target))
    (root / "results").mkdir()
    loraplex.io.write_json(root / "results" / "results.json", {"version": 1})
    script = textwrap.dedent(CHILD).format(tests=os.path.dirname(__file__), root=str(root))
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    waiting = [*SAVES, "results"]
    try:
        while missing := [n for n in waiting if not (root / f"{n}.inside").exists()]:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                err = proc.communicate()[1].decode()[-3000:]
                raise AssertionError(f"the child never reached the writes of {missing}: {err}")
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return root, before


@pytest.mark.parametrize("name", ["adapter", "compressed", "checkpoint"])
def test_a_save_killed_midway_keeps_version_1(name: str, killed: tuple[Path, dict[str, Any]]) -> None:
    root, before = killed
    kind, d = KINDS[name], root / name
    files_before, loaded_before = before[name]
    after = {k: v for k, v in files(d).items() if not Path(k).name.startswith(".")}  # a dead writer's temp file
    assert after == files_before
    target = kind.fresh(d)
    kind.load(target, d)
    assert_same(state_of(target), loaded_before)


def test_a_killed_results_write_keeps_version_1(killed: tuple[Path, dict[str, Any]]) -> None:
    root, _ = killed
    assert [p.name for p in (root / "results").iterdir() if not p.name.startswith(".")] == ["results.json"]
    assert json.loads((root / "results" / "results.json").read_text()) == {"version": 1}


def test_an_adapter_save_killed_between_its_renames_is_refused_not_mixed(
    killed: tuple[Path, dict[str, Any]],
) -> None:
    """New tensors + old spec (same shapes, other values): refused by the digest, never loaded as a mix."""
    root, before = killed
    d = root / "adapter-between"
    assert files(d)["adapter.json"] == before["adapter-between"][0]["adapter.json"]
    assert files(d)["adapter.safetensors"] != before["adapter-between"][0]["adapter.safetensors"]
    refused(KINDS["adapter"], d, "come from different saves")


def test_a_checkpoint_save_killed_between_its_renames_keeps_version_1(killed: tuple[Path, dict[str, Any]]) -> None:
    root, before = killed
    kind, d = KINDS["checkpoint"], root / "checkpoint-between"
    files_before, loaded_before = before["checkpoint-between"]
    assert not d.exists()  # the kill hit the gap: only checkpoint-between.old is left ...
    recover(d)  # ... and recover() (called by finetune before --resume, and by every save / load) puts it back
    assert files(d) == files_before
    target = kind.fresh(d)
    kind.load(target, d)
    assert_same(state_of(target), loaded_before)


# --- every write goes through an atomic helper -----------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
# a call writing a file in place: a kill in the middle leaves it half-written
IN_PLACE = re.compile(
    r"\.write_text\(|\.write_bytes\(|\bsavefig\(|\bsave_file\(|\bjson\.dump\(|\.save_pretrained\(|\bnp\.save|"
    r"\btorch\.save\(|\bopen\([^)]*['\"][wax]b?\+?['\"]"
)
# the atomic helpers themselves
ALLOWED = {"loraplex/files.py"}


def test_every_write_in_the_package_and_benchmarks_is_atomic() -> None:
    found = []
    for path in sorted([*ROOT.glob("loraplex/**/*.py"), *ROOT.glob("benchmarks/*.py")]):
        rel = str(path.relative_to(ROOT))
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if rel not in ALLOWED and IN_PLACE.search(code) and '"""' not in line and "``" not in line:
                found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "writes that bypass loraplex.files' atomic helpers:\n" + "\n".join(found)


def test_write_figure_and_save_pretrained_leave_no_temporary_files(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    loraplex.io.write_figure(fig, tmp_path / "plot.png", dpi=20)
    plt.close(fig)
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    class Saver:
        def __init__(self, version: int, fail: bool = False) -> None:
            self.version, self.fail = version, fail

        def save_pretrained(self, d: Path) -> None:
            (Path(d) / "tokenizer.json").write_text(f"v{self.version}")  # into the temporary folder
            if self.fail:
                raise OSError("disk full")
            (Path(d) / "sub").mkdir()
            (Path(d) / "sub" / "vocab.txt").write_text(f"v{self.version}")

    loraplex.io.save_pretrained(Saver(1), tmp_path)
    with pytest.raises(OSError, match="disk full"):
        loraplex.io.save_pretrained(Saver(2, fail=True), tmp_path)
    assert files(tmp_path) == {"plot.png": files(tmp_path)["plot.png"], "tokenizer.json": b"v1", "sub/vocab.txt": b"v1"}
