"""Untrusted checkpoint files: nothing but data is ever unpickled.

A checkpoint is input from someone else. Three readers of Megatron's ``torch_dist`` format would run code a crafted
file carries: torch.distributed.checkpoint reads ``.metadata`` with plain ``pickle``, its planner unpickles the
objects stored in ``.distcp`` files (RNG state, ``_extra_state``) with ``weights_only=False``, and megatron-core reads
``common.pt`` with torch's default (weights-only today, but an environment variable turns that off, and a refusal
is a page of traceback). The three patches here close them on every route: our drivers install them before opening
a checkpoint, the Megatron-LM route at interpreter start-up (``aquila_npu.megatron_lm.startup``).

* ``.metadata``: a restricted unpickler that admits only the record classes torch's distributed checkpoint format
  defines (its metadata and planner dataclasses and enums), ``torch.Size``, dtypes and layouts;
* everything else: ``torch.load(weights_only=True)``, with the plain records Megatron pickles beside the weights
  (``argparse.Namespace``, megatron-core's registered safe classes, enum members of megatron/torch modules).

A refusal is one ``UnsafeFileError`` naming the file (a damaged file: an ``AquilaNpuError``). ``install()`` is
process-wide and idempotent.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib
import io
import os
import pickle

from aquila_npu.errors import USER_ERRORS, AquilaNpuError, UnsafeFileError
from aquila_npu.patching import PatchRegistry

# the modules whose record classes make up torch.distributed.checkpoint's .metadata
DCP_RECORD_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                      "torch.distributed.checkpoint.filesystem")
# containers older savers used for mcore_data / planner_data
PLAIN_BUILTINS = {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                  ("builtins", "slice")}
# torch.serialization's rebuild helpers that only map a name to a torch singleton
TORCH_NAME_LOOKUPS = {("torch.serialization", "_get_layout")}


class CheckpointMetadataUnpickler(pickle.Unpickler):
    """Unpickles torch.distributed.checkpoint ``.metadata`` and refuses every other global."""

    def __init__(self, file, label: str) -> None:
        super().__init__(file)
        self.label = label

    def find_class(self, module: str, name: str):
        if (module, name) in PLAIN_BUILTINS or (module, name) in TORCH_NAME_LOOKUPS:
            return super().find_class(module, name)
        if module == "torch":
            import torch

            obj = getattr(torch, name, None)
            if obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        elif module in DCP_RECORD_MODULES:
            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type) and obj.__module__ == module and (
                    dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        raise UnsafeFileError(f"{self.label} holds {module}.{name}, which is not torch distributed-checkpoint "
                              f"metadata; refusing to unpickle it (the checkpoint is damaged or crafted)")


def load_checkpoint_metadata(stream, label: str):
    """A ``.metadata`` record from ``stream``, through ``CheckpointMetadataUnpickler``."""
    try:
        return CheckpointMetadataUnpickler(stream, label).load()
    except UnsafeFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated or garbled: every unpickling failure is one line
        raise AquilaNpuError(f"{label} is not readable distributed-checkpoint metadata ({type(exc).__name__}); "
                             f"the checkpoint is damaged: copy or convert it again") from None


def _plain_record_classes(unsafe: list[str], label: str) -> list:
    """The classes among ``unsafe`` (as torch names them) that are plain records: ``argparse.Namespace`` and enums
    of megatron/torch modules. Anything else is refused."""
    allowed = []
    for qualified in unsafe:
        module_name, _, attr = qualified.rpartition(".")
        if qualified == "argparse.Namespace":
            allowed.append(argparse.Namespace)
            continue
        if module_name.split(".")[0] in ("megatron", "torch"):
            try:
                obj = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError):
                obj = None
            if isinstance(obj, type) and issubclass(obj, enum.Enum):
                allowed.append(obj)
                continue
        raise UnsafeFileError(f"{label} holds {qualified}, which is not plain data; refusing to unpickle it "
                              f"(weights-only loading)")
    return allowed


def load_weights_only(source, label: str | None = None, mmap: bool = False):
    """``torch.load(weights_only=True)`` of a path or an in-memory stream, admitting the plain records Megatron
    pickles beside the weights and nothing else. Naming ``label`` (default: the path): an ``UnsafeFileError`` when
    the file holds anything else, an ``AquilaNpuError`` when it is no readable torch file."""
    import torch

    label = label or str(source)
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(source)
    except Exception as exc:  # noqa: BLE001
        raise AquilaNpuError(f"{label} is not a readable torch file ({type(exc).__name__}); the checkpoint is "
                             f"damaged or truncated: copy or convert it again") from None
    finally:
        if isinstance(source, io.IOBase):
            source.seek(0)
    allowed = _plain_record_classes(unsafe, label)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap and not isinstance(
                source, io.IOBase))
    except USER_ERRORS:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the unpickler or the zip reader raises
        raise AquilaNpuError(f"{label} cannot be read as plain data ({type(exc).__name__}); the checkpoint is "
                             f"damaged or holds objects weights-only loading refuses") from None


# --------------------------------------------------------------------------------------------- the patches
class _RestrictedPickle:
    """Stands in for the ``pickle`` module inside torch.distributed.checkpoint.filesystem, whose only ``load`` reads
    ``.metadata``; everything else is the real module."""

    def __getattr__(self, name):
        return getattr(pickle, name)

    @staticmethod
    def load(file, *args, **kwargs):
        return load_checkpoint_metadata(file, getattr(file, "name", None) or ".metadata")


def _weights_only_load_bytes(original):
    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint import default_planner

        fqn = read_item.dest_index.fqn
        obj = load_weights_only(value, f"the object {fqn} of a torch_dist checkpoint")
        if self.flatten_state_dict:  # what the original does with the object, as it does it
            default_planner.set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj

    return load_bytes


def _weights_only_load_common(original):
    def load_common(self, checkpoint_dir):
        from megatron.core.dist_checkpointing.strategies import common

        path = os.path.join(checkpoint_dir, common.COMMON_STATE_FNAME)
        if common.MultiStorageClientFeature.is_enabled() or not os.path.isfile(path):
            return original(self, checkpoint_dir)  # object storage, or megatron-core's own missing-file error
        return load_weights_only(path)

    return load_common


def register_patches(registry: PatchRegistry) -> None:
    registry.register(
        "torch.distributed.checkpoint.filesystem.pickle", lambda original: _RestrictedPickle(), owner="aquila-npu",
        reason="torch.distributed.checkpoint reads .metadata with plain pickle: a crafted checkpoint would run code "
               "on load; admit only the distributed-checkpoint record classes")
    registry.register(
        "torch.distributed.checkpoint.default_planner.DefaultLoadPlanner.load_bytes", _weights_only_load_bytes,
        owner="aquila-npu",
        reason="the objects stored in .distcp files (RNG state, _extra_state) are unpickled with "
               "weights_only=False; load them weights-only")
    registry.register(
        "megatron.core.dist_checkpointing.strategies.common.TorchCommonLoadStrategy.load_common",
        _weights_only_load_common, owner="aquila-npu",
        reason="common.pt is read with torch's default, which TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD turns unsafe and "
               "whose refusal is a page of traceback; always weights-only, refused in one line")


_registry: PatchRegistry | None = None


def install() -> PatchRegistry:
    """Apply the patches in this process (now, or as their modules are imported); returns their registry."""
    global _registry
    if _registry is None:
        _registry = PatchRegistry()
        register_patches(_registry)
        _registry.apply()
    return _registry


def uninstall() -> None:
    """Revert the patches (tests)."""
    global _registry
    if _registry is not None:
        _registry.revert()
        _registry = None
