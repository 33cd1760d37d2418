"""The Huawei Ascend NPU device: torch_npu, HCCL collectives, and the ``transfer_to_npu`` bridge.

``torch_npu.contrib.transfer_to_npu`` maps ``torch.cuda.*``, ``.cuda()``, ``device="cuda"`` and the ``nccl``
backend onto the NPU, which is how MindSpeed runs unmodified Megatron code on Ascend. The fused kernels
(``npu_rms_norm``, ``npu_fusion_attention``, ``npu_swiglu``; ``aquila_npu.kernels.npu``) go into the layer spec
through the kernel seams; ``npu_rotary_mul`` is implemented there too but not wired yet (megatron-core's rotary runs).
"""

from __future__ import annotations

from aquila_npu.hookspecs import hookimpl

DEVICE = "npu"


def _torch_npu_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch_npu") is not None


@hookimpl
def aquila_npu_devices():
    return {DEVICE: 300}


@hookimpl
def aquila_npu_device_available(device):
    if device != DEVICE:
        return None
    if not _torch_npu_installed():
        return False
    import torch
    import torch_npu  # noqa: F401  (registers torch.npu)

    return torch.npu.is_available()


@hookimpl
def aquila_npu_device_unavailable_reason(device):
    if device != DEVICE:
        return None
    if not _torch_npu_installed():
        return "torch_npu is not installed; install Ascend CANN, then `pip install aquila-npu[npu]`"
    return "torch_npu finds no NPU (check the Ascend driver, CANN's set_env.sh and ASCEND_RT_VISIBLE_DEVICES)"


@hookimpl
def aquila_npu_distributed_backend(device):
    return "hccl" if device == DEVICE else None


@hookimpl
def aquila_npu_initialize_device(device, local_rank):
    if device != DEVICE:
        return None
    import torch
    import torch_npu  # noqa: F401
    from torch_npu.contrib import transfer_to_npu  # noqa: F401  (maps CUDA calls and nccl onto the NPU)

    torch.npu.set_device(local_rank % torch.npu.device_count())
    return torch.device("npu", torch.npu.current_device())


@hookimpl
def aquila_npu_megatron_defaults(device):
    if device != DEVICE:
        return None
    # transfer_to_npu turns nccl into hccl; Transformer Engine does not exist on Ascend
    return {"--distributed-backend": "nccl", "--transformer-impl": "local", "--no-persist-layer-norm": None,
            "--no-gradient-accumulation-fusion": None, "--no-masked-softmax-fusion": None,
            "--no-rope-fusion": None}


@hookimpl
def aquila_npu_kernels(device):
    if device != DEVICE:
        return None
    from aquila_npu.kernels import npu_kernels

    return npu_kernels()
