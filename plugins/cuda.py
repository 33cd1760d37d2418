"""The NVIDIA CUDA device: NCCL collectives; megatron-core's CUDA paths need no bridging."""

from __future__ import annotations

from aquila_npu.hookspecs import hookimpl

DEVICE = "cuda"


@hookimpl
def aquila_npu_devices():
    return {DEVICE: 200}


@hookimpl
def aquila_npu_device_available(device):
    if device != DEVICE:
        return None
    import torch

    return torch.cuda.is_available()


@hookimpl
def aquila_npu_device_unavailable_reason(device):
    if device != DEVICE:
        return None
    import torch

    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU build; install a CUDA build of torch"
    return "torch finds no CUDA device (check the driver and CUDA_VISIBLE_DEVICES)"


@hookimpl
def aquila_npu_distributed_backend(device):
    return "nccl" if device == DEVICE else None


@hookimpl
def aquila_npu_initialize_device(device, local_rank):
    if device != DEVICE:
        return None
    import torch

    torch.cuda.set_device(local_rank % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


@hookimpl
def aquila_npu_megatron_defaults(device):
    if device != DEVICE:
        return None
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is None:
        # without Transformer Engine megatron-core runs its local modules
        return {"--transformer-impl": "local", "--no-persist-layer-norm": None}
    return {}
