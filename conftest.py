"""Repository-wide pytest hooks.

pytest's ``--import-mode=importlib`` collects ``loraplex/adapters/*.py`` (their doctests) by importing
each file and binding it on its parent package, which rebinds ``loraplex.adapters`` (the public
function, :func:`loraplex.inject.adapters`) to the ``loraplex.adapters`` subpackage. A plain
``import loraplex.adapters.lora`` never does that (the subpackage is already imported), so only a
collected test run can see it: the function is put back once collection is over.
"""

from __future__ import annotations

import pytest


def pytest_collection_finish(session: pytest.Session) -> None:
    import loraplex
    import loraplex.inject

    loraplex.adapters = loraplex.inject.adapters  # type: ignore[assignment]
