"""Megatron without Triton: stand-ins for the Megatron modules that import ``triton`` at module level.

Triton exists for NVIDIA GPUs; a CPU host has none and an Ascend host usually has none. Megatron-LM's scripts still
import some Triton modules on paths that never run their kernels there (its ``initialize`` imports the
batch-invariant kernels; its inference scripts import ``mamba_builders``, which imports the Mamba state ops). Each
stand-in imports cleanly and refuses, in one line, to be used.
"""

from __future__ import annotations

import functools
import importlib.util
import types

# module -> (the GPU feature it holds, what imports it on a host without Triton)
TRITON_MODULES = {
    "megatron.core.transformer.custom_layers.batch_invariant_kernels":
        ("batch-invariant mode", "Megatron-LM's initialize imports it"),
    "megatron.core.inference.contexts.attention_context.triton.tensor_ops":
        ("the Mamba dynamic-inference state ops",
         "Megatron-LM's inference scripts import mamba_builders, which imports it"),
}


def register_stubs(registry, owner: str) -> None:
    """Register a stand-in for each of ``TRITON_MODULES`` when Triton is not installed."""
    if importlib.util.find_spec("triton") is not None:
        return
    for module, (feature, importer) in TRITON_MODULES.items():
        registry.register_module_stub(
            module, functools.partial(stand_in, module, feature), owner=owner,
            reason=f"imports triton at module level ({importer}); {feature} is a GPU feature, so without "
                   f"triton it is a stand-in that refuses to be used")


def stand_in(name: str, feature: str) -> types.ModuleType:
    module = types.ModuleType(name)

    def unavailable(*args, **kwargs):
        raise RuntimeError(f"{feature} needs triton and a GPU; it is not available on this device")

    module.is_batch_invariant_mode_enabled = lambda: False  # asked by Megatron-LM's argument checks

    def __getattr__(attribute):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return unavailable

    module.__getattr__ = __getattr__
    return module
