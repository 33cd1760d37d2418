"""The Huawei Ascend NPU device: torch_npu, HCCL collectives, and the ``transfer_to_npu`` bridge.

``torch_npu.contrib.transfer_to_npu`` maps ``torch.cuda.*``, ``.cuda()``, ``device="cuda"`` and the ``nccl``
backend onto the NPU, which is how MindSpeed runs unmodified Megatron code on Ascend. The fused kernels
(``aquila_npu.kernels.npu``), all on by default: ``npu_rms_norm``, ``npu_fusion_attention`` and ``npu_swiglu`` go
into the layer spec; ``npu_rotary_mul`` fills megatron-core's fused-RoPE slot (a registered patch), which
megatron-core calls when ``apply_rope_fusion`` is set.
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
        return "torch_npu is not installed; install Ascend CANN, then `pip install \"aquila-npu[npu]\"`"
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
def aquila_npu_device_options():
    from aquila_npu.device_options import DeviceOption

    return [
        DeviceOption(DEVICE, "--npu-asd-enable", "NPU_ASD_ENABLE", choices=("0", "1", "2", "3"),
                     help="torch_npu's feature-value (silent data corruption) detection, torch_npu <= 7.0: 0 off, "
                          "1 log, 2 log and alarm, 3 also record on the device"),
        DeviceOption(DEVICE, "--npu-asd-config", "NPU_ASD_CONFIG",
                     help="the same for torch_npu >= 7.1, e.g. enable:true,with_checksum:true"),
        DeviceOption(DEVICE, "--hccl-connect-timeout", "HCCL_CONNECT_TIMEOUT", positive_int=True,
                     help="seconds HCCL waits for every rank to connect (large jobs: 1200, as ModelLink's scripts)"),
    ]


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


@hookimpl
def aquila_npu_register_patches(registry, device):
    if device != DEVICE:
        return

    def npu_rotary(original):
        from aquila_npu.kernels import megatron_rotary_slot
        from aquila_npu.kernels.npu import apply_rotary

        return megatron_rotary_slot(apply_rotary)

    registry.register(
        "megatron.core.models.common.embeddings.rope_utils.fused_apply_rotary_pos_emb", npu_rotary, owner=DEVICE,
        reason="megatron-core's fused-RoPE slot holds Transformer Engine's kernel, which Ascend lacks; fill it with "
               "torch_npu.npu_rotary_mul (used when --use-fused-rotary-pos-emb sets apply_rope_fusion)")
