"""The public surface: a sorted ``__all__``, every name importable, documented, and in the API reference."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest

import cachelayers

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "reference"


def test_all_is_sorted_and_unique() -> None:
    """``cachelayers.__all__`` is sorted, without duplicates."""
    assert cachelayers.__all__ == sorted(cachelayers.__all__)
    assert len(set(cachelayers.__all__)) == len(cachelayers.__all__)


def test_star_import_gives_exactly_all() -> None:
    """``from cachelayers import *`` binds every name of ``__all__`` and nothing else public."""
    namespace: dict[str, object] = {}
    exec("from cachelayers import *", namespace)
    assert sorted(name for name in namespace if name != "__builtins__") == cachelayers.__all__


def test_public_names_are_not_leaked_helpers() -> None:
    """Every public attribute of the package is in ``__all__`` (or is a submodule or ``__version__``)."""
    public = {name for name, value in vars(cachelayers).items()
              if not name.startswith("_") and not inspect.ismodule(value) and name != "annotations"}
    assert public - set(cachelayers.__all__) == set()


@pytest.mark.parametrize("name", cachelayers.__all__)
def test_every_name_is_importable_and_documented(name: str) -> None:
    """Each exported name imports, comes from cachelayers, and has a docstring with a summary line."""
    value = getattr(cachelayers, name)
    assert (getattr(value, "__module__", "") or "").startswith("cachelayers")
    doc = inspect.getdoc(value)
    assert doc, f"{name} has no docstring"
    summary = doc.splitlines()[0]
    assert summary.strip(), f"{name}'s docstring does not start with a summary line"


def _referenced() -> set[str]:
    """Objects the API reference pages render with ``::: dotted.name``."""
    found: set[str] = set()
    for page in REFERENCE.glob("*.md"):
        found.update(re.findall(r"^:::\s*([\w.]+)", page.read_text(), flags=re.MULTILINE))
    return found


@pytest.mark.parametrize("name", cachelayers.__all__)
def test_every_name_is_in_the_api_reference(name: str) -> None:
    """Each exported name has an entry in docs/reference, itself or through a whole-module page."""
    referenced = _referenced()
    module = getattr(getattr(cachelayers, name), "__module__", "")
    assert f"cachelayers.{name}" in referenced or module in referenced, (
        f"add '::: cachelayers.{name}' to a page in docs/reference/")


def test_every_module_declares_its_public_names() -> None:
    """Every module of the package has an ``__all__`` whose names exist."""
    for info in pkgutil.walk_packages(cachelayers.__path__, "cachelayers."):
        module = importlib.import_module(info.name)
        names = getattr(module, "__all__", None)
        assert names is not None, f"{info.name} has no __all__"
        missing = [name for name in names if not hasattr(module, name)]
        assert not missing, f"{info.name}.__all__ names what it does not define: {missing}"
