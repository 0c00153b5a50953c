"""Checkpoint robustness: nothing unpickled, clear errors, atomic saves, spec versioning."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch
from matrix import MODELS, perturb

import loraplex


@pytest.fixture
def saved(tmp_path):
    model = loraplex.adapt(MODELS[0].make(), "lora", rank=2, train=["classifier"])
    perturb(model)
    loraplex.save(model, tmp_path)
    return model, tmp_path


def untouched(model) -> bool:
    return not loraplex.adapters(model)


class Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/loraplex-pwned",))


def test_a_pickle_is_never_executed(saved) -> None:
    _, d = saved
    (d / "adapter.safetensors").write_bytes(pickle.dumps({"x": Boom()}))
    model = MODELS[0].make()
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        loraplex.load(model, d)
    assert untouched(model) and not os.path.exists("/tmp/loraplex-pwned")


def test_truncated_and_corrupted_files(saved) -> None:
    _, d = saved
    data = (d / "adapter.safetensors").read_bytes()
    for broken in (data[: len(data) // 2], b"\x00" * 16 + data[16:], b""):
        (d / "adapter.safetensors").write_bytes(broken)
        model = MODELS[0].make()
        with pytest.raises(ValueError, match="safetensors"):
            loraplex.load(model, d)
        assert untouched(model)
    (d / "adapter.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        loraplex.load(MODELS[0].make(), d)


def test_spec_versions_and_unknown_keys(saved) -> None:
    model, d = saved
    spec = json.loads((d / "adapter.json").read_text())
    (d / "adapter.json").write_text(json.dumps(spec | {"format_version": 99}))
    with pytest.raises(ValueError, match="format_version=99 is newer"):
        loraplex.load(MODELS[0].make(), d)
    (d / "adapter.json").write_text(json.dumps(spec | {"comment": "hi"}))
    fresh = MODELS[0].make()
    with pytest.warns(UserWarning, match="ignoring unknown keys"):
        loraplex.load(fresh, d)
    x = MODELS[0].input()
    torch.testing.assert_close(fresh(x), model(x))


def test_wrong_dtype_is_refused(saved) -> None:
    _, d = saved
    from safetensors.torch import load_file, save_file

    tensors = load_file(d / "adapter.safetensors")
    key = next(k for k in tensors if k.endswith(".A"))
    tensors[key] = tensors[key].double()
    save_file(tensors, d / "adapter.safetensors")
    model = MODELS[0].make()
    with pytest.raises(ValueError, match=r"dtype torch.float64.*expects.*float32"):
        loraplex.load(model, d)
    assert untouched(model)


def test_a_killed_save_leaves_the_previous_checkpoint(saved, tmp_path) -> None:
    model, d = saved
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import safetensors.torch as st
        import loraplex.files as files
        from matrix import MODELS
        import loraplex
        model = loraplex.adapt(MODELS[0].make(), "lora", rank=2, train=["classifier"])
        real = st.save_file
        def dying(tensors, path, metadata=None):
            real(tensors, path, metadata=metadata)
            os.kill(os.getpid(), signal.SIGKILL)  # after the temporary file, before the rename
        files.save_file = dying
        loraplex.save(model, {str(d)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    after = {p.name: p.read_bytes() for p in d.iterdir() if not p.name.startswith(".")}
    assert after == before
    fresh = MODELS[0].make()
    loraplex.load(fresh, d)
    x = MODELS[0].input()
    torch.testing.assert_close(fresh(x), model(x))


def test_check_header_refuses_bool_and_newer_versions_and_warns_on_unknown_keys(tmp_path) -> None:
    """One header check serves adapter specs and compressed models; ``True`` is not a version."""
    import warnings as w

    import pytest

    from loraplex.io import check_header

    where = tmp_path / "spec.json"
    good = {"format": "f", "format_version": 1}
    assert check_header(good, where, "f", 1, {"format", "format_version"}, "a spec") is good
    for bad, message in [
        ({"format": "g", "format_version": 1}, "format must be 'f'"),
        ({"format": "f", "format_version": True}, "format_version=True must be a positive integer"),
        ({"format": "f", "format_version": 2}, "format_version=2 is newer"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_header(bad, where, "f", 1, {"format", "format_version"}, "a spec")
    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        check_header(good | {"extra": 1}, where, "f", 1, {"format", "format_version"}, "a spec")
    assert any("'extra'" in str(c.message) for c in caught)
