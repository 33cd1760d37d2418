"""Bring up torch.distributed and megatron-core's parallel state on the selected device.

The device plugin chooses the backend (gloo / nccl / hccl), prepares the device and contributes its patches; the
patches stay applied until ``shutdown``. Under torchrun the usual environment (RANK, WORLD_SIZE, MASTER_ADDR, ...)
is used; a plain ``python`` process becomes a world of one.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from dataclasses import dataclass
from typing import Callable

from aquila_npu import device_options as options
from aquila_npu import plugin_manager
from aquila_npu.errors import USER_ERRORS, AquilaNpuError, os_error_message
from aquila_npu.patching import PatchRegistry


@dataclass
class World:
    device: str
    torch_device: object
    registry: PatchRegistry
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    kernels: object = None  # the KernelSet models of this world are built with


_world: World | None = None


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a rendezvous on this machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize(device: str | None = None, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
               seed: int = 1234, virtual_pipeline_model_parallel_size: int | None = None,
               kernels: dict[str, bool | None] | None = None, device_options: dict[str, str] | None = None) -> World:
    """Initialise this process for megatron-core; returns the ``World`` (idempotent within a process).

    ``kernels``: the kernel flags (``{op: True/False/None}``, ``aquila_npu.kernels``); the device's defaults
    otherwise. ``device_options``: the device runtime's options given (``{flag: value}``,
    ``aquila_npu.device_options``), set as environment variables before the device starts. A flag the device cannot
    honour fails here, before anything is initialised."""
    global _world
    plugins = plugin_manager.get()
    if _world is not None:
        if kernels and plugins.kernels(_world.device, kernels) != _world.kernels:
            raise AquilaNpuError("this process's megatron world was initialised with other kernels; choose the "
                                 "kernels in the first call (or shut the world down first)")
        return _world
    import torch.distributed as dist

    device = plugins.select_device(device)
    kernel_set = plugins.kernels(device, kernels)
    os.environ.update(options.environment(device_options or {}, device, plugins.device_options()))
    plugins.hook.aquila_npu_prepare_process(device=device)
    plugin_manager.set_active_device(device)
    plugin_manager.set_kernel_request(kernels)
    registry = plugins.patch_registry(device)
    registry.apply()
    try:
        torch_device = plugins.hook.aquila_npu_initialize_device(device=device,
                                                                 local_rank=int(os.environ.get("LOCAL_RANK", 0)))
        if not dist.is_initialized():
            if "RANK" in os.environ:  # torchrun (or another launcher) set up the rendezvous
                dist.init_process_group(backend=plugins.backend(device))
            else:  # a plain process: a world of one, without touching the environment children inherit
                dist.init_process_group(backend=plugins.backend(device), rank=0, world_size=1,
                                        init_method=f"tcp://127.0.0.1:{free_port()}")
        from megatron.core import parallel_state, tensor_parallel

        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size, pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    except BaseException:
        registry.revert()
        plugin_manager.set_kernel_request(None)
        raise
    _world = World(device, torch_device, registry, tensor_model_parallel_size, pipeline_model_parallel_size,
                   kernel_set)
    return _world


def shutdown() -> None:
    """Tear down the parallel state and the process group, and revert the device's patches."""
    global _world
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    if _world is not None:
        _world.registry.revert()
        plugin_manager.set_kernel_request(None)
        _world = None


def run_command(name: str, body: Callable[[], None], interrupted: str = "") -> int:
    """Run a command-line verb: 0 when ``body`` returns; a user error (``AquilaNpuError``) or a file-system failure
    (a full disk, a read-only or forbidden location) is one line on stderr and exit status 2, never a traceback;
    Ctrl-C is one line (``interrupted`` says what it left) and 130. The megatron world the verb brought up is torn
    down either way. Upstream warnings that do not concern the user are silenced (``aquila_npu.known_warnings``)."""
    from aquila_npu import known_warnings

    known_warnings.silence()
    try:
        body()
        return 0
    except USER_ERRORS as exc:
        print(f"aquila-npu {name}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"aquila-npu {name}: error: {os_error_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"aquila-npu {name}: interrupted{'; ' + interrupted if interrupted else ''}", file=sys.stderr)
        return 130
    finally:
        if _world is not None:
            shutdown()


@contextlib.contextmanager
def megatron_world(**kwargs):
    """``initialize`` for the duration of a block; nested use joins the world already there."""
    owned = _world is None
    world = initialize(**kwargs)
    try:
        yield world
    finally:
        if owned:
            shutdown()
