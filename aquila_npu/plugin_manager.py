"""Finds plugins (entry-point group ``aquila_npu.plugins``) and answers questions through their hooks.

Nothing here knows a model family or a device by name: models come from ``aquila_npu_model_family`` hooks and
devices from ``aquila_npu_devices`` hooks. Loading a plugin must stay cheap (no torch import at module level).
"""

from __future__ import annotations

import os
from typing import Iterable

import pluggy

from aquila_npu import hookspecs
from aquila_npu.errors import AquilaNpuError
from aquila_npu.patching import PatchRegistry
from aquila_npu.specs import ModelFamily, ModelSpec

ENTRY_POINT_GROUP = "aquila_npu.plugins"
# set by the autoload for every process of a Megatron-LM job (child processes inherit them)
ENV_PLUGINS = "AQUILA_NPU_PLUGINS"
ENV_DEVICE = "AQUILA_NPU_DEVICE"
# the kernel flags of a Megatron-LM job (``op=1,op=0``; ops not named take the device's default)
ENV_KERNELS = "AQUILA_NPU_KERNELS"


class Plugins:
    """A pluggy ``PluginManager`` with aquila-npu's lookups on top."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.pm = pm
        self.hook = pm.hook

    # ------------------------------------------------------------------ plugins
    def names(self) -> list[str]:
        return sorted(name for name, plugin in self.pm.list_name_plugin() if plugin is not None)

    def require(self, names: Iterable[str]) -> None:
        """Fail with one line when a requested plugin is not installed."""
        for name in names:
            if self.pm.get_plugin(name) is None:
                raise AquilaNpuError(f"unknown plugin {name!r}; installed plugins: {', '.join(self.names())}")

    def hooks_of(self, name: str) -> list[str]:
        plugin = self.pm.get_plugin(name)
        return sorted(impl.name for impl in self.pm.get_hookcallers(plugin) or ())

    # ------------------------------------------------------------------ model families
    def families(self, plugin_names: Iterable[str] | None = None) -> dict[str, ModelFamily]:
        """Model families by name, optionally only those declared by ``plugin_names``."""
        if plugin_names is not None:
            plugin_names = list(plugin_names)
            self.require(plugin_names)
        results = [impl.function() for impl in self.hook.aquila_npu_model_family.get_hookimpls()
                   if plugin_names is None or impl.plugin_name in plugin_names]
        return {family.name: family for family in results if family is not None}

    def model_names(self, plugin_names: Iterable[str] | None = None) -> list[str]:
        return [name for family in self.families(plugin_names).values() for name in family.spec_names()]

    def find_model(self, name: str, plugin_names: Iterable[str] | None = None) -> tuple[ModelFamily, ModelSpec]:
        """The family and spec called ``name``; one clear line naming the known models otherwise."""
        families = self.families(plugin_names)
        for family in families.values():
            for spec in family.specs:
                if spec.name == name:
                    return family, spec
        known = ", ".join(self.model_names(plugin_names)) or "none (install a model-family plugin)"
        raise AquilaNpuError(f"unknown model {name!r}; known models: {known}")

    def family_declaring(self, spec: ModelSpec) -> ModelFamily | None:
        """The family that declares ``spec`` by name, or derived it from a Hugging Face config (``<family>-custom``)."""
        for family in self.families().values():
            if spec.name in family.spec_names() or spec.name == f"{family.name}-custom":
                return family
        return None

    def family_for_hf_config(self, hf_config: dict) -> ModelFamily:
        for family in self.families().values():
            if family.recognises(hf_config):
                return family
        arch = hf_config.get("architectures") or hf_config.get("model_type")
        raise AquilaNpuError(f"no installed model family reads Hugging Face architecture {arch!r}; "
                             f"installed families: {', '.join(self.families())}")

    # ------------------------------------------------------------------ devices
    def devices(self) -> dict[str, int]:
        """Known devices and their priorities, highest first."""
        merged: dict[str, int] = {}
        for result in self.hook.aquila_npu_devices():
            merged.update(result or {})
        return dict(sorted(merged.items(), key=lambda item: -item[1]))

    def device_available(self, device: str) -> bool:
        return bool(self.hook.aquila_npu_device_available(device=device))

    def select_device(self, requested: str | None = None) -> str:
        """``requested`` if it is known and available, else the available device with the highest priority."""
        devices = self.devices()
        if requested and requested != "auto":
            if requested not in devices:
                raise AquilaNpuError(f"unknown device {requested!r}; known devices: {', '.join(devices)}")
            if not self.device_available(requested):
                why = self.hook.aquila_npu_device_unavailable_reason(device=requested) or "not available"
                raise AquilaNpuError(f"device {requested!r} was requested but is not available: {why}")
            return requested
        for device in devices:
            if self.device_available(device):
                return device
        raise AquilaNpuError(f"no usable device among {', '.join(devices)}; is the cpu plugin installed?")

    def backend(self, device: str) -> str:
        return self.hook.aquila_npu_distributed_backend(device=device)

    def fused_kernels(self, device: str) -> dict:
        """The fused kernels ``device`` offers, ``{op: Kernel}`` (empty when it has none)."""
        return dict(self.hook.aquila_npu_kernels(device=device) or {})

    def kernels(self, device: str, requested: dict[str, bool | None] | None = None):
        """The ``KernelSet`` for ``device``: its fused kernels where ``requested`` (``{op: True/False/None}``, None:
        the device's default) asks for them, the reference elsewhere. Asking for one it lacks is an error."""
        from aquila_npu.kernels import seams as kernels

        return kernels.choose(device, self.fused_kernels(device), requested)

    def prepare_inference_model(self, model, device: str) -> None:
        """Every device plugin's ``aquila_npu_prepare_inference_model`` on a model about to serve forward passes."""
        self.hook.aquila_npu_prepare_inference_model(model=model, device=device)

    def device_options(self) -> list:
        """Every device's runtime options (``DeviceOption``), for the parsers of every route."""
        return [option for options in self.hook.aquila_npu_device_options() for option in options or ()]

    def megatron_defaults(self, device: str) -> dict[str, str | None]:
        return dict(self.hook.aquila_npu_megatron_defaults(device=device) or {})

    def patch_registry(self, device: str) -> PatchRegistry:
        """A fresh registry holding every plugin's patches for ``device`` (not applied yet)."""
        registry = PatchRegistry()
        self.hook.aquila_npu_register_patches(registry=registry, device=device)
        return registry


_plugins: Plugins | None = None
_active_device: str | None = None
_kernel_request: dict[str, bool | None] | None = None


def get() -> Plugins:
    """The process-wide plugin set: every installed plugin, loaded once through entry points."""
    global _plugins
    if _plugins is None:
        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        _plugins = Plugins(pm)
    return _plugins


def set_active_device(device: str) -> None:
    global _active_device
    _active_device = device


def active_device() -> str:
    """The device this process runs on: set by initialisation, inherited from the parent, or auto-selected."""
    return _active_device or os.environ.get(ENV_DEVICE) or get().select_device()


def set_kernel_request(requested: dict[str, bool | None] | None) -> None:
    """The kernel flags of this process (``None``: every op at the device's default)."""
    global _kernel_request
    _kernel_request = dict(requested) if requested else None


def kernel_request() -> dict[str, bool | None]:
    if _kernel_request is not None:
        return dict(_kernel_request)
    encoded = os.environ.get(ENV_KERNELS, "")
    return {op: value == "1" for op, _, value in (item.partition("=") for item in encoded.split(",") if item)}


def encode_kernel_request(requested: dict[str, bool | None]) -> str:
    return ",".join(f"{op}={int(value)}" for op, value in requested.items() if value is not None)


def active_kernels():
    """The ``KernelSet`` this process builds models with: the active device's, under this process's flags."""
    return get().kernels(active_device(), kernel_request())
