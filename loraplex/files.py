"""Low-level files: atomic writes (text, JSON, figures, safetensors, ``save_pretrained`` folders) and digests.

Each file is written to a temporary name in the same folder, flushed (``fsync``), then renamed over
the old one, so a write killed at any point leaves the previous file intact; the folder is fsynced
after the rename.

Integrity: safetensors has no checksum, so a flipped byte in the data would load as a wrong value.
:func:`write_tensors` stores a SHA-256 of every tensor (name, dtype, shape, bytes) in the file's
metadata (``loraplex_sha256``) and :func:`read_tensors` recomputes it. Files without the digest
(written by another tool, or edited by hand) are read without this check.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

DIGEST_KEY = "loraplex_sha256"


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` then rename ``tmp`` over ``path``: readers see the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically (NaN / inf refused: they are not JSON)."""
    write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    atomic_write(path, write)


def write_figure(fig: Any, path: str | os.PathLike[str], **kwargs: Any) -> None:
    """``fig.savefig(path, **kwargs)`` atomically; the format comes from the suffix (``.png``)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))


def save_pretrained(obj: Any, directory: str | os.PathLike[str]) -> None:
    """``obj.save_pretrained`` (a HuggingFace tokenizer or model) with every file renamed into place.

    The files are written to a temporary folder inside ``directory``, fsynced, then each one is
    renamed over its old version, so no file is ever half-written. (Several files are not swapped as
    one: a save killed between two renames leaves some new and some old files, each complete.)
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".save_pretrained.", dir=d))
    try:
        obj.save_pretrained(tmp)
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
                target = d / f.relative_to(tmp)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(f, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def digest(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order (hex)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_tensors(path: str | os.PathLike[str], tensors: dict[str, Tensor]) -> str:
    """Write ``tensors`` to a safetensors file atomically; returns their :func:`digest` (also in the metadata)."""
    # clone: safetensors refuses tensors that share storage (tied weights)
    cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    sha = digest(cpu)
    atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata={"format": "pt", DIGEST_KEY: sha}))
    return sha


def tensor_digest(path: Path) -> str | None:
    """The digest stored in a safetensors file's metadata by :func:`write_tensors`, if any."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    return meta.get(DIGEST_KEY)


def read_tensors(path: Path) -> dict[str, Tensor]:
    """Tensors of a safetensors file; anything else (a pickle, a truncated or corrupted file) is a ``ValueError``.

    The file is parsed by safetensors alone (a header of JSON and raw bytes: nothing is executed).
    When the metadata holds a digest (files from :func:`write_tensors`), the tensors must match it.
    """
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    want = tensor_digest(path)
    if want is not None and digest(tensors) != want:
        raise ValueError(f"{path} is corrupted: its tensors do not match the SHA-256 {want[:12]}... stored at save")
    return tensors


def read_json(path: Path) -> Any:
    """The parsed JSON of ``path``; a missing file or invalid JSON is a ``ValueError``."""
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
