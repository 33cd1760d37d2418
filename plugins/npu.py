"""The Huawei Ascend NPU device: torch_npu, HCCL collectives, and the ``transfer_to_npu`` bridge.

``torch_npu.contrib.transfer_to_npu`` maps ``torch.cuda.*``, ``.cuda()``, ``device="cuda"`` and the ``nccl``
backend onto the NPU, which is how MindSpeed runs unmodified Megatron code on Ascend. The fused kernels
(``aquila_npu.kernels.npu``), all on by default: ``npu_rms_norm``, ``npu_fusion_attention`` and ``npu_swiglu`` go
into the layer spec; ``npu_rotary_mul`` fills megatron-core's fused-RoPE slot (a registered patch), which
megatron-core calls when ``apply_rope_fusion`` is set.

What the bridge leaves out for megatron-core, and this plugin supplies (``aquila-npu plugins --patches --device
npu``): the bridge itself first thing in every process (``TORCH_TRANSFER_TO_NPU=1`` for child processes, so no
module can take a CUDA name with ``from torch.cuda import X`` before it); the model-parallel RNG states set on the
NPU's generator (megatron-core queues them through CUDA's ``_lazy_call``, which never runs without CUDA);
``torch.compile`` fusions off unless ``--npu-torch-compile 1``; NVTX ranges as msprof (mstx) ranges.
"""

from __future__ import annotations

import os

from aquila_npu.hookspecs import hookimpl

DEVICE = "npu"
# torch_npu reads it at import (torch imports torch_npu through its backend entry point): apply the bridge at once
BRIDGE_AT_IMPORT = "TORCH_TRANSFER_TO_NPU"
TORCH_COMPILE = "AQUILA_NPU_TORCH_COMPILE"


def torch_npu_requirement(torch_version: str) -> str:
    """The torch_npu build for a torch: torch_npu ``A.B.C`` (and its ``.postN`` rebuilds) is built for torch
    ``A.B.C``."""
    return f"torch_npu=={torch_version.split('+')[0]}.*"


def torch_npu_matches(torch_version: str, torch_npu_version: str) -> bool:
    """Is this torch_npu built for this torch (``torch_npu_requirement``'s rule)?"""
    release = torch_version.split("+")[0]
    return torch_npu_version == release or torch_npu_version.startswith(release + ".")


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
def aquila_npu_prepare_process(device):
    if device != DEVICE:
        return
    os.environ[BRIDGE_AT_IMPORT] = "1"  # inherited: every child process applies the bridge at `import torch`
    if _torch_npu_installed():
        import torch_npu  # noqa: F401
        from torch_npu.contrib import transfer_to_npu  # noqa: F401  (maps CUDA calls and nccl onto the NPU)


@hookimpl
def aquila_npu_initialize_device(device, local_rank):
    if device != DEVICE:
        return None
    import torch

    aquila_npu_prepare_process(device)  # idempotent; a caller that skipped it still gets the bridge first
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
        DeviceOption(DEVICE, "--npu-torch-compile", TORCH_COMPILE, choices=("0", "1"),
                     help="1: keep megatron-core's torch.compile fusions (jit_fuser) on the NPU; default 0: they run "
                          "eagerly (torch.compile needs torch_npu's inductor backend)"),
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
    from aquila_npu.kernels.seams import npu_kernels

    return npu_kernels()


@hookimpl
def aquila_npu_register_patches(registry, device):
    if device != DEVICE:
        return
    from aquila_npu.megatron_lm import without_triton

    without_triton.register_stubs(registry, owner=DEVICE)

    def npu_rotary(original):
        from aquila_npu.kernels.npu import apply_rotary
        from aquila_npu.kernels.seams import megatron_rotary_slot

        return megatron_rotary_slot(apply_rotary)

    def npu_rotary_thd(original):
        from aquila_npu.kernels.npu import apply_rotary
        from aquila_npu.kernels.seams import megatron_rotary_thd_slot

        return megatron_rotary_thd_slot(apply_rotary)

    registry.register(
        "megatron.core.tensor_parallel.random._set_cuda_rng_state", lambda original: _set_npu_rng_state, owner=DEVICE,
        reason="queues the state through torch.cuda._lazy_call, which the bridge does not map and which never runs "
               "without CUDA: the model-parallel RNG states (dropout per tensor-parallel rank) would never be set; "
               "set them on the NPU's generator")
    registry.register(
        "megatron.core.tensor_parallel.random._get_cuda_rng_state", lambda original: _get_npu_rng_state,
        owner=DEVICE, reason="reads torch.cuda.default_generators, which the bridge maps only once the NPU is "
                             "initialised; read the NPU's generator")
    registry.register(
        "megatron.core.jit.jit_fuser", _jit_fuser, owner=DEVICE,
        reason="megatron-core's fusions (bias-dropout-add, bias-SwiGLU, ...) are torch.compile'd, which the bridge "
               "leaves alone; they run eagerly on the NPU unless --npu-torch-compile 1")
    for name in ("range_push", "range_pop", "mark", "range_start", "range_end"):
        registry.register(
            f"torch.cuda.nvtx.{name}", lambda original, name=name: getattr(_MsprofRanges, name), owner=DEVICE,
            reason="NVTX is CUDA's (a torch without CUDA raises on every call) and the bridge does not map it; "
                   "Megatron's profiling ranges become msprof (mstx) ranges")
    registry.register(
        "megatron.core.models.common.embeddings.rope_utils.fused_apply_rotary_pos_emb", npu_rotary, owner=DEVICE,
        reason="megatron-core's fused-RoPE slot holds Transformer Engine's kernel, which Ascend lacks; fill it with "
               "torch_npu.npu_rotary_mul (used when --use-fused-rotary-pos-emb sets apply_rope_fusion)")
    registry.register(
        "megatron.core.models.common.embeddings.rope_utils.fused_apply_rotary_pos_emb_thd", npu_rotary_thd,
        owner=DEVICE,
        reason="the same slot for packed sequences (THD, --reset-attention-mask on packed data): "
               "torch_npu.npu_rotary_mul with positions restarting at each document")


def _npu_index(device) -> int | None:
    import torch

    if isinstance(device, int):
        return None if device < 0 else device
    return torch.device(device).index if isinstance(device, (str, torch.device)) else None


def _set_npu_rng_state(new_state, device=-1, graph_safe=False):
    import torch

    index = _npu_index(device)
    torch.npu.set_rng_state(new_state, "npu" if index is None else index)


def _get_npu_rng_state(device="cuda", clone=False, graph_safe=False):
    import torch

    index = _npu_index(device)
    return torch.npu.get_rng_state("npu" if index is None else index)


def _jit_fuser(original):
    if os.environ.get(TORCH_COMPILE) == "1":
        return original
    from megatron.core.jit import noop_decorator

    return noop_decorator


class _MsprofRanges:
    """torch.cuda.nvtx's functions over torch_npu's mstx (msprof's markers); a stack pairs pushes with pops."""

    _stack: list[int] = []

    @staticmethod
    def _mstx():
        import torch

        return getattr(getattr(torch, "npu", None), "mstx", None)

    @classmethod
    def range_push(cls, msg):
        mstx = cls._mstx()
        cls._stack.append(mstx.range_start(str(msg)) if mstx else 0)
        return len(cls._stack) - 1

    @classmethod
    def range_pop(cls):
        mstx = cls._mstx()
        if cls._stack:
            range_id = cls._stack.pop()
            if mstx:
                mstx.range_end(range_id)
        return len(cls._stack)

    @classmethod
    def range_start(cls, msg) -> int:
        mstx = cls._mstx()
        return mstx.range_start(str(msg)) if mstx else 0

    @classmethod
    def range_end(cls, range_id) -> None:
        mstx = cls._mstx()
        if mstx:
            mstx.range_end(range_id)

    @classmethod
    def mark(cls, msg) -> None:
        mstx = cls._mstx()
        if mstx:
            mstx.mark(str(msg))
