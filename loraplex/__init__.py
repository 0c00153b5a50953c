"""loraplex: low-rank and structured adaptation and compression of neural networks."""

from loraplex._version import __version__
from loraplex.adapter import Adapter
from loraplex.adapters import METHODS
from loraplex.combine import combine
from loraplex.compression import compress, load_compressed, save_compressed
from loraplex.convert import to_lora
from loraplex.inject import adapt, adapters, advance, track_steps
from loraplex.io import load, save
from loraplex.named import (
    activate,
    adapter_names,
    disabled,
    enable_adapter_names,
    hotswap,
    merge,
    mixed_batch,
    prepare_hotswap,
    remove,
    unload,
)
from loraplex.peft_io import export_peft, import_peft

__all__ = [
    "METHODS",
    "Adapter",
    "__version__",
    "activate",
    "adapt",
    "adapter_names",
    "adapters",
    "advance",
    "combine",
    "compress",
    "disabled",
    "enable_adapter_names",
    "export_peft",
    "hotswap",
    "import_peft",
    "load",
    "load_compressed",
    "merge",
    "mixed_batch",
    "prepare_hotswap",
    "remove",
    "save",
    "save_compressed",
    "to_lora",
    "track_steps",
    "unload",
]
