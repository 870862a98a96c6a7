"""Import Feast without the two import-time costs it pays for features recstack does not
use. Nearly every ``recstack`` command (the orchestrator, its replicas, the reference, the
offline steps) imports Feast; on a 2-core host that import took ~9 s and ~390 MB:

- Feast decorates its definition classes (``FeatureView``, ``Entity``, ``Field``, the data
  sources, the SQLite online store, ...) with typeguard's ``@typechecked``, which re-reads
  their source, rewrites its syntax tree and compiles it again at *every* import (~5 s).
  typeguard documents these checks as a development aid and turns the decorator into a
  no-op under ``python -O``; here the decorator alone becomes that no-op, so ``assert``
  statements keep running.
- ``feast.torch_wrapper`` imports torch eagerly (~2 s, ~180 MB resident) for optional
  tensor outputs. While that one module loads, torch is hidden unless it is imported
  already: Feast records "no torch", and a later ``import torch`` (training) loads it.

Both act on the first import of the module concerned, so a command that never imports
Feast pays nothing. The tests keep typeguard's checks (pytest's own process does not call
:func:`lean_feast_imports`): a feature definition of a wrong type still fails there."""

from __future__ import annotations

import contextlib
import importlib.abc
import sys
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

Around = Callable[[ModuleType], contextlib.AbstractContextManager[None]]


def _no_typecheck(target: Any = None, **_options: Any) -> Any:
    """typeguard's ``typechecked`` as it is under ``python -O``: the target unchanged."""
    if target is None:  # used as @typechecked(...) with options
        return _no_typecheck
    return target


@contextlib.contextmanager
def _typeguard_off(module: ModuleType) -> Iterator[None]:
    yield
    # Feast's modules read the name when they load (`from typeguard import typechecked`).
    module.typechecked = _no_typecheck  # type: ignore[attr-defined]


@contextlib.contextmanager
def _torch_hidden(_module: ModuleType) -> Iterator[None]:
    if "torch" in sys.modules:  # already paid for: let Feast use it
        yield
        return
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
    try:
        yield
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]


class _WrappedLoader(importlib.abc.Loader):
    """A module's own loader, with ``around`` entered while the module's code runs."""

    def __init__(self, loader: importlib.abc.Loader, around: Around) -> None:
        self._loader, self._around = loader, around

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with self._around(module):
            self._loader.exec_module(module)

    def __getattr__(self, name: str) -> Any:  # resources, get_source, ...: the real loader's
        return getattr(self._loader, name)


class _FirstImport(importlib.abc.MetaPathFinder):
    """Finds the named modules through the other finders and wraps their loaders, once."""

    def __init__(self, hooks: dict[str, Around]) -> None:
        self._hooks = hooks

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> Any:
        around = self._hooks.get(fullname)
        if around is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        del self._hooks[fullname]
        if not self._hooks:
            sys.meta_path.remove(self)
        spec.loader = _WrappedLoader(spec.loader, around)
        return spec


def lean_feast_imports() -> None:
    """Skip Feast's typeguard instrumentation and its eager torch import in this process.
    Call before anything imports typeguard or Feast (entry points); later it does nothing."""
    hooks: dict[str, Around] = {}
    if "typeguard" not in sys.modules:
        hooks["typeguard"] = _typeguard_off
    if "feast.torch_wrapper" not in sys.modules:
        hooks["feast.torch_wrapper"] = _torch_hidden
    if hooks and not any(isinstance(f, _FirstImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _FirstImport(hooks))
