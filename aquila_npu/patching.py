"""The patch registry: every monkey-patch aquila-npu applies, by dotted target, with its reason.

A patch is a last resort (Megatron's own seams come first). Plugins register patches through the
``aquila_npu_register_patches`` hook; the registry applies them in one place, lists them
(``aquila-npu plugins --patches``) and reverts them (tests)::

    registry.register(
        "megatron.core.tensor_parallel.random._set_cuda_rng_state",
        lambda original: _set_cpu_rng_state,
        reason="CPU torch silently ignores CUDA RNG state; keep the tracker's states on the CPU generator",
        owner="cpu",
    )

A target whose module is not imported yet is patched right after that module is first imported (a post-import
hook), so registering patches never imports Megatron: the Megatron-LM route registers them at interpreter start-up,
before the script has put its own ``megatron`` package on ``sys.path``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import threading
import types
from dataclasses import dataclass, field
from typing import Any, Callable

from aquila_npu.errors import AquilaNpuError

_MISSING = object()
_INHERITED = object()


@dataclass
class Patch:
    """One replacement of ``target`` (``package.module.attribute`` or ``package.module.Class.attribute``)."""

    target: str
    # called with the original object and returns the replacement
    factory: Callable[[Any], Any]
    reason: str
    owner: str = ""
    name: str = ""
    # "attribute": replace target's value; "module": stand in for the whole module ``target`` (not yet imported)
    kind: str = "attribute"
    # registered -> pending (module not imported yet) -> applied -> reverted; "skipped": a stub not needed
    state: str = "registered"
    _original: Any = field(default=_MISSING, repr=False)
    _holder: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.name:
            self.name = self.target


class PatchRegistry:
    """Holds patches, applies them (now or on import of their module), lists and reverts them."""

    def __init__(self) -> None:
        self._patches: list[Patch] = []
        self._lock = threading.RLock()
        self._hook: _PostImportHook | None = None

    # ------------------------------------------------------------------ registration and listing
    def register(self, target: str, factory: Callable[[Any], Any], *, reason: str, owner: str = "",
                 name: str = "") -> Patch:
        if "." not in target:
            raise AquilaNpuError(f"patch target {target!r} must be a dotted path such as package.module.attribute")
        if not reason:
            raise AquilaNpuError(f"patch {target!r} needs a reason")
        with self._lock:
            if any(p.target == target for p in self._patches):
                raise AquilaNpuError(f"{target} is patched twice ({owner or 'unknown owner'}); combine the patches")
            patch = Patch(target=target, factory=factory, reason=reason, owner=owner, name=name)
            self._patches.append(patch)
            return patch

    def register_module_stub(self, module: str, factory: Callable[[], types.ModuleType], *, reason: str,
                             owner: str = "") -> Patch:
        """Stand in for ``module`` when it is imported (e.g. a module that imports a GPU-only package at import
        time but whose contents are not used on this device). ``factory`` builds the stand-in module."""
        patch = self.register(module, lambda original: factory(), reason=reason, owner=owner)
        patch.kind = "module"
        return patch

    def __iter__(self):
        return iter(list(self._patches))

    def __len__(self) -> int:
        return len(self._patches)

    def rows(self) -> list[dict[str, str]]:
        return [{"name": p.name, "target": p.target, "owner": p.owner, "state": p.state, "reason": p.reason}
                for p in self._patches]

    # ------------------------------------------------------------------ applying and reverting
    def apply(self) -> None:
        """Apply every registered patch: now when its module is imported, else right after it is imported."""
        with self._lock:
            for patch in self._patches:
                if patch.state in ("registered", "reverted"):
                    patch.state = "pending"
                    self._try_apply(patch)
            if any(p.state == "pending" for p in self._patches) and self._hook is None:
                self._hook = _PostImportHook(self)
                sys.meta_path.insert(0, self._hook)

    def revert(self) -> None:
        """Undo every applied patch, in reverse order, and forget pending ones."""
        with self._lock:
            if self._hook is not None:
                sys.meta_path[:] = [f for f in sys.meta_path if f is not self._hook]
                self._hook = None
            for patch in reversed(self._patches):
                if patch.state == "applied" and patch.kind == "module":
                    sys.modules.pop(patch.target, None)
                    parent, _, child = patch.target.rpartition(".")
                    if parent in sys.modules and hasattr(sys.modules[parent], child):
                        delattr(sys.modules[parent], child)
                    patch._original, patch._holder = _MISSING, None
                elif patch.state == "applied":
                    attribute = patch.target.rsplit(".", 1)[1]
                    if patch._original is _INHERITED:
                        delattr(patch._holder, attribute)
                    else:
                        setattr(patch._holder, attribute, patch._original)
                    patch._original, patch._holder = _MISSING, None
                patch.state = "reverted" if patch.state in ("applied", "pending") else patch.state

    def _module_imported(self, loaded: str | None = None) -> None:
        with self._lock:
            for patch in self._patches:
                if patch.state == "pending":
                    self._try_apply(patch, loaded)

    def _try_apply(self, patch: Patch, loaded: str | None = None) -> None:
        if patch.kind == "module":
            if patch.target in sys.modules:
                patch.state = "skipped"  # the real module imported fine: no stand-in needed
                return
            stub = patch.factory(None)
            sys.modules[patch.target] = stub
            patch._holder, patch._original = sys.modules, None
            parent, _, child = patch.target.rpartition(".")
            if parent in sys.modules:
                setattr(sys.modules[parent], child, stub)
            patch.state = "applied"
            return
        holder_path, attribute = patch.target.rsplit(".", 1)
        module = _imported_module_of(holder_path)
        if module is not None and module != loaded and _initializing(sys.modules[module]):
            return  # reached from a nested import while its module is still executing: apply once it has run
        holder = _resolve_imported(holder_path)
        if holder is None:
            return  # its module is not imported yet: the post-import hook comes back to it
        # on a class, keep staticmethod/classmethod wrappers: patch the function inside, restore the raw entry
        raw = holder.__dict__.get(attribute, _MISSING) if isinstance(holder, type) else _MISSING
        descriptor = type(raw) if isinstance(raw, (staticmethod, classmethod)) else None
        original = raw.__func__ if descriptor else getattr(holder, attribute, _MISSING)
        if original is _MISSING:
            raise AquilaNpuError(f"patch target {patch.target} does not exist in the installed version "
                                 f"({patch.owner or 'no owner'}: {patch.reason})")
        replacement = patch.factory(original)
        patch._holder = holder
        # a method a class inherits is patched on that class; reverting deletes it again
        inherited = isinstance(holder, type) and raw is _MISSING
        patch._original = _INHERITED if inherited else raw if descriptor else original
        setattr(holder, attribute, descriptor(replacement) if descriptor else replacement)
        patch.state = "applied"


def _imported_module_of(path: str) -> str | None:
    """The longest prefix of ``path`` that is an imported module."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in sys.modules:
            return ".".join(parts[:end])
    return None


def _initializing(module) -> bool:
    """Is ``module`` still executing its own import (importlib marks its spec while it runs)?"""
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _resolve_imported(path: str):
    """The object at ``path`` if the module holding it is imported, else None (never imports anything)."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        obj = sys.modules.get(".".join(parts[:end]))
        if obj is None:
            continue
        for part in parts[end:]:
            if not hasattr(obj, part):
                if isinstance(obj, types.ModuleType):
                    return None  # a submodule that is not imported yet
                raise AquilaNpuError(f"patch target {path} does not exist in the installed version")
            obj = getattr(obj, part)
        return obj
    return None


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Wraps the loader of each newly imported module so pending patches apply right after it executes."""

    def __init__(self, registry: PatchRegistry) -> None:
        self.registry = registry
        self._busy = threading.local()

    def find_spec(self, fullname, path=None, target=None):
        if getattr(self._busy, "active", False):
            return None
        if not any(p.state == "pending" and (p.target == fullname or p.target.startswith(fullname + "."))
                   for p in self.registry):
            return None
        self._busy.active = True
        try:
            spec = importlib.util.find_spec(fullname)
        except (ImportError, ValueError):
            return None
        finally:
            self._busy.active = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _LoaderThenPatch(spec.loader, self.registry)
        return spec


class _LoaderThenPatch(importlib.abc.Loader):
    def __init__(self, loader, registry: PatchRegistry) -> None:
        self._loader, self._registry = loader, registry

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._registry._module_imported(module.__name__)

    def __getattr__(self, name):
        return getattr(self._loader, name)
