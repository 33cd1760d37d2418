"""The plugin contract of aquila-npu: every hook a plugin can implement, and nothing else.

A plugin is a plain module with ``@hookimpl`` functions, published under the entry-point group
``aquila_npu.plugins`` (see ``pyproject.toml`` for the built-in ones)::

    # my_plugin.py
    from aquila_npu import hookimpl

    @hookimpl
    def aquila_npu_model_family():
        return ModelFamily(name="mymodel", specs=[...], tokenizer=TokenizerDefaults(...))

    # pyproject.toml of the plugin's distribution
    [project.entry-points."aquila_npu.plugins"]
    mymodel = "my_plugin"

There are two kinds of plugin, told apart only by the hooks they implement:

* a **model family** (``aquila2``) declares named model specs, tokenizer defaults and extra arguments;
* a **device** (``cpu``, ``cuda``, ``npu``) says whether it is available, its ``torch.distributed`` backend, how to
  initialise it, the Megatron argument defaults it needs, the patches it applies, the fused kernels it offers and
  the runtime options it takes as flags.

Device hooks take the device name and are ``firstresult``: a plugin returns ``None`` for devices that are not its
own, so a third-party plugin can add a device or override one by registering before the built-in one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover - typing only
    import argparse

    from aquila_npu.device_options import DeviceOption
    from aquila_npu.kernels.seams import Kernel
    from aquila_npu.patching import PatchRegistry
    from aquila_npu.specs import ModelFamily

PROJECT = "aquila_npu"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------------------------- model families
@hookspec
def aquila_npu_model_family() -> ModelFamily | None:
    """Return the model family this plugin declares: its named specs, tokenizer defaults and the Hugging Face
    architectures it recognises. Each family plugin returns exactly one ``ModelFamily``."""


@hookspec
def aquila_npu_add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this plugin's own command-line arguments to ``parser`` (our drivers' parser, or Megatron-LM's through
    its ``extra_args_provider``). Only arguments Megatron does not already have belong here."""


# --------------------------------------------------------------------------------------------- devices
@hookspec
def aquila_npu_devices() -> dict[str, int] | None:
    """Return the devices this plugin provides, as ``{name: priority}``. Automatic selection takes the available
    device with the highest priority (built-ins: npu 300, cuda 200, cpu 100)."""


@hookspec(firstresult=True)
def aquila_npu_device_available(device: str) -> bool | None:
    """Is ``device`` usable in this process? ``None`` when ``device`` is not this plugin's. Must be cheap and must
    not initialise the device."""


@hookspec(firstresult=True)
def aquila_npu_device_unavailable_reason(device: str) -> str | None:
    """When ``device`` is this plugin's and is not available: one line saying why and how to fix it."""


@hookspec(firstresult=True)
def aquila_npu_distributed_backend(device: str) -> str | None:
    """The ``torch.distributed`` backend for ``device`` (``gloo``, ``nccl``, ``hccl``)."""


@hookspec
def aquila_npu_prepare_process(device: str) -> None:
    """First thing in every process of a job on ``device``, before any patch is applied and before Megatron is
    imported — on the Megatron-LM route from the start-up hook (in the job's child processes too), on ours from
    ``distributed.initialize``: set up what must hold process-wide before other code takes names from ``torch``
    (the npu plugin applies torch_npu's CUDA bridge, and exports the variable that makes child processes apply it at
    ``import torch``). Must not bind a device: ``aquila_npu_initialize_device`` does that."""


@hookspec(firstresult=True)
def aquila_npu_initialize_device(device: str, local_rank: int) -> Any:
    """Prepare this process for ``device`` before Megatron initialises: import the device runtime, bind the local
    rank to its device, set the environment the runtime needs. Returns a ``torch.device`` for the local rank."""


@hookspec
def aquila_npu_device_options() -> list[DeviceOption] | None:
    """The device runtime's environment variables this plugin exposes as flags (``aquila_npu.device_options``):
    each is set, when given, before ``aquila_npu_initialize_device`` runs."""


@hookspec(firstresult=True)
def aquila_npu_megatron_defaults(device: str) -> dict[str, str | None] | None:
    """Megatron-LM command-line flags ``device`` needs, as ``{"--flag": value}`` (``None`` for a switch). They are
    applied beneath the user's own flags, so the user passes nothing device-specific."""


@hookspec
def aquila_npu_register_patches(registry: PatchRegistry, device: str) -> None:
    """Register the monkey-patches this plugin needs on ``device`` into ``registry`` (a last resort: prefer
    Megatron's own seams). Patches are applied in one place, by the registry, and can be listed and reverted."""


@hookspec
def aquila_npu_prepare_inference_model(model: Any, device: str) -> None:
    """``model`` (this rank's megatron-core ``GPTModel``) is loaded on ``device`` for forward passes only — generation,
    scoring, lm-eval — and has run none yet: a device plugin may store its weights the way the device's matrix
    kernels read fastest, and pick how a product is formed. Layouts and operand order only: the weights' values
    stay the checkpoint's, results change by float rounding at most. Not called for training or conversion."""


@hookspec(firstresult=True)
def aquila_npu_kernels(device: str) -> dict[str, Kernel] | None:
    """The fused kernels ``device`` offers, as ``{op: Kernel}`` for ops among ``rms_norm``, ``attention``,
    ``rotary``, ``swiglu`` (``aquila_npu.kernels``); each ``Kernel`` says whether it is on by default. Ops left out
    run the reference; the ``--use-fused-*`` / ``--use-flash-attn`` flags choose between the two."""
