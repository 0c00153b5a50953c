"""Griffe extension for the API reference: read loraplex's ``Example:`` docstring sections as ``Examples:``.

Griffe's Google parser treats only ``Examples:`` as a doctest section; ``Example:`` would render as an
admonition whose ``>>>`` lines become Markdown block quotes (and whose outputs look like cross-references).
"""

from __future__ import annotations

import re
from typing import Any

import griffe


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` section titles to ``Examples:`` in every loaded docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = re.sub(r"^(\s*)Example:$", r"\1Examples:", obj.docstring.value, flags=re.M)
