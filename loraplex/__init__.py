"""loraplex: low-rank and structured adaptation and compression of neural networks."""

from loraplex._version import __version__
from loraplex.adapter import Adapter, Factorized
from loraplex.adapters import METHODS
from loraplex.inject import adapt, adapters, advance, disabled, merge, track_steps, unload
from loraplex.io import load, save
from loraplex.peft_io import export_peft, import_peft

__all__ = [
    "METHODS",
    "Adapter",
    "Factorized",
    "__version__",
    "adapt",
    "adapters",
    "advance",
    "disabled",
    "export_peft",
    "import_peft",
    "load",
    "merge",
    "save",
    "track_steps",
    "unload",
]
