"""Old names kept importable for one release, with a warning that says where they went.

A module that renamed or moved a name a chapter or an exercise had taught ends with
``__getattr__ = moved_names(__name__, {"old_name": "qcourse.module.new_name"})``: the old name
then still imports (PEP 562), with a ``DeprecationWarning`` that names the new home.  The old
names are in no ``__all__``; the next release deletes these tables.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable

__all__ = ["moved_names"]


def moved_names(module_name: str, moved: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` that serves each old name of ``moved`` from its new home."""

    def __getattr__(name: str):
        target = moved.get(name)
        if target is None:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        home, _, new = target.rpartition(".")
        warnings.warn(f"{module_name}.{name} is deprecated and goes in the next release: use "
                      f"{target}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(home), new)

    __getattr__.moved = dict(moved)
    return __getattr__
