"""Kernel seams of the Aquila2 layer: four ops a device may run with its own fused implementation
(flags as MindSpeed names them).

* ``rms_norm`` (``--use-fused-rmsnorm``): the layer spec's norms and the block's final norm;
* ``attention`` (``--use-flash-attn``): the layer spec's core attention (``DotProductAttention``'s place);
* ``rotary`` (``--use-fused-rotary-pos-emb``): megatron-core's fused-RoPE slot
  (``rope_utils.fused_apply_rotary_pos_emb``, used when ``apply_rope_fusion`` is set);
* ``swiglu`` (``--use-fused-swiglu``): the MLP's activation module (``use_te_activation_func``) or megatron-core's
  fused bias-SwiGLU (``bias_activation_fusion``).

A device plugin offers its fused implementations through the ``aquila_npu_kernels`` hook, as ``{op: Kernel}``;
``choose`` turns that and the user's flags into the ``KernelSet`` the layer spec is built from. A flag left out
takes the device's default (each ``Kernel`` says whether it is on by default); ``--no-<flag>`` picks the reference;
a flag asking for an op the device does not offer is an error naming what it does offer. Every op has a plain-PyTorch
reference (``aquila_npu.kernels.reference``) that every other implementation is tested against.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from aquila_npu.errors import AquilaNpuError

OPS = ("rms_norm", "attention", "rotary", "swiglu")
FLAGS = {"rms_norm": "--use-fused-rmsnorm", "attention": "--use-flash-attn",
         "rotary": "--use-fused-rotary-pos-emb", "swiglu": "--use-fused-swiglu"}


@dataclass(frozen=True)
class Kernel:
    """One implementation of one op.

    name: what it is, as ``doctor`` and the start-up log print it.
    module: dotted path of the layer-spec module (norm, core attention, MLP activation), imported only when a model
        is built (choosing kernels imports no Megatron); ``None`` keeps megatron-core's own.
    config: the ``TransformerConfig`` fields this implementation needs (e.g. ``apply_rope_fusion``).
    default: used when its flag is not given (per device: on for NPU and CUDA, off for the CPU).
    function: dotted path of the op as a function with the reference's signature, for ``aquila-npu doctor
        --check``; default: the module's ``kernel`` (and ``inference_kernel``) attribute.
    """

    name: str
    module: Optional[str] = None
    config: Mapping[str, Any] = field(default_factory=dict)
    default: bool = True
    function: Optional[str] = None

    def functions(self) -> dict[str, Callable]:
        """``{"": op}`` (and ``{"inference": op}`` where inference has its own operator), or ``{}`` where the op
        exists only inside a megatron-core module (checked through the whole model instead)."""
        if self.function is not None:
            path, _, name = self.function.rpartition(".")
            return {"": getattr(importlib.import_module(path), name)}
        module = self.load()
        found = {"": getattr(module, "kernel", None), "inference": getattr(module, "inference_kernel", None)}
        return {role: fn for role, fn in found.items() if fn is not None}

    def load(self) -> Optional[type]:
        if self.module is None:
            return None
        path, _, name = self.module.rpartition(".")
        return getattr(importlib.import_module(path), name)


@dataclass(frozen=True)
class KernelSet:
    """The implementation of every op the layer is built with; ``fused`` names the ops not on the reference."""

    rms_norm: Kernel
    attention: Kernel
    rotary: Kernel
    swiglu: Kernel
    fused: frozenset = frozenset()

    def config_overrides(self) -> dict[str, Any]:
        """``TransformerConfig`` fields the chosen implementations need (stated both ways, so they also override a
        Megatron-LM flag that says otherwise)."""
        values: dict[str, Any] = {}
        for op in OPS:
            values.update(getattr(self, op).config)
        return values

    def describe(self) -> dict[str, str]:
        return {op: getattr(self, op).name for op in OPS}


def reference_kernels() -> dict[str, Kernel]:
    """The plain-PyTorch implementations (megatron-core's own where it already computes exactly that)."""
    return {
        "rms_norm": Kernel("reference RMSNorm (fp32 statistics)", "aquila_npu.kernels.reference.RMSNorm"),
        # packed sequences (thd) included: megatron-core's own refuses them without Transformer Engine; without
        # autograd, grouped-query heads read the KV cache in place (megatron-core copies it, repeated, every step)
        "attention": Kernel("megatron-core DotProductAttention", "aquila_npu.kernels.megatron_core.DotProductAttention"),
        "rotary": Kernel("megatron-core rotate-half RoPE", None, {"apply_rope_fusion": False}),
        "swiglu": Kernel("megatron-core silu(gate) * up", None,
                         {"use_te_activation_func": False, "bias_activation_fusion": False}),
    }


def choose(device: str, offered: Mapping[str, Kernel] | None, requested: Mapping[str, bool | None] | None = None
           ) -> KernelSet:
    """The kernel set for ``device``: per op, the device's fused ``offered`` implementation when its flag asks for
    it (or, not given, when it is on by default), else the reference."""
    offered = dict(offered or {})
    requested = dict(requested or {})
    unknown = set(requested) - set(OPS)
    if unknown:
        raise AquilaNpuError(f"unknown kernel op(s) {', '.join(sorted(unknown))}; the ops are {', '.join(OPS)}")
    reference = reference_kernels()
    chosen, fused = {}, set()
    for op in OPS:
        want = requested.get(op)
        kernel = offered.get(op)
        if want and kernel is None:
            has = ", ".join(FLAGS[o] for o in OPS if o in offered) or "none"
            raise AquilaNpuError(f"{FLAGS[op]}: the {device} device has no fused {op} kernel (its fused kernels: "
                                 f"{has}); drop the flag, or run on a device that has one (see `aquila-npu doctor`)")
        use_fused = kernel is not None and (want if want is not None else kernel.default)
        chosen[op] = kernel if use_fused else reference[op]
        if use_fused:
            fused.add(op)
    return KernelSet(**chosen, fused=frozenset(fused))


def request_from_args(args) -> dict[str, bool | None]:
    """``{op: True/False/None}`` from the flags ``add_arguments`` defines (None: the device's default)."""
    return {op: getattr(args, FLAGS[op][2:].replace("-", "_"), None) for op in OPS}


def add_arguments(parser) -> None:
    """The four kernel flags, each ``--flag`` / ``--no-flag``, default: the device's choice."""
    import argparse

    group = parser.add_argument_group("kernels (default: the device's; see `aquila-npu doctor`)")
    for op in OPS:
        group.add_argument(FLAGS[op], action=argparse.BooleanOptionalAction, default=None,
                           help=f"the device's fused {op} kernel (--no-... : the plain-PyTorch reference)")


def megatron_rotary_slot(apply_rotary: Callable) -> Callable:
    """``apply_rotary(t, cos, sin)`` in the shape of megatron-core's fused-RoPE slot
    (``rope_utils.fused_apply_rotary_pos_emb(t, freqs, transpose_output_memory=False, interleaved=False)``), which
    megatron-core calls for ``sbhd`` tensors when ``apply_rope_fusion`` is set; ``freqs`` are the angles
    ``[s, 1|b, 1, rot_dim]``; a rotary dimension smaller than the head passes the rest through, as megatron-core's
    own does."""
    import torch

    def fused_apply_rotary_pos_emb(t, freqs, transpose_output_memory=False, interleaved=False):
        if interleaved:
            raise AquilaNpuError("interleaved rotary embeddings have no fused kernel here; drop --rotary-interleaved "
                                 "or --no-use-fused-rotary-pos-emb")
        rot_dim = freqs.shape[-1]
        rotated = apply_rotary(t[..., :rot_dim], torch.cos(freqs).to(t.dtype), torch.sin(freqs).to(t.dtype))
        return rotated if rot_dim == t.shape[-1] else torch.cat((rotated, t[..., rot_dim:]), dim=-1)

    return fused_apply_rotary_pos_emb


def megatron_rotary_thd_slot(apply_rotary: Callable) -> Callable:
    """``apply_rotary(t, cos, sin)`` in the shape of megatron-core's fused-RoPE slot for packed sequences
    (``rope_utils.fused_apply_rotary_pos_emb_thd(t, cu_seqlens, freqs, cp_size=1, cp_rank=0)``, called for ``thd``
    tensors ``[t, heads, d]`` when ``apply_rope_fusion`` is set): positions restart at each document, as in
    megatron-core's own ``_apply_rotary_pos_emb_thd``."""
    import torch

    sbhd = megatron_rotary_slot(apply_rotary)

    def fused_apply_rotary_pos_emb_thd(t, cu_seqlens, freqs, cp_size=1, cp_rank=0):
        if cp_size != 1:
            raise AquilaNpuError("packed sequences with context parallelism have no fused rotary kernel here; use "
                                 "--no-use-fused-rotary-pos-emb")
        lengths = cu_seqlens.reshape(-1).diff().tolist()
        packed = torch.cat([freqs[:length] for length in lengths])  # [t, 1, 1, rot_dim]
        return sbhd(t.unsqueeze(1), packed).squeeze(1)

    return fused_apply_rotary_pos_emb_thd


def pytorch_kernels(default: bool) -> dict[str, Kernel]:
    """PyTorch's own fused operators (``aquila_npu.kernels.pytorch``): ``rms_norm`` and scaled-dot-product attention
    (FlashAttention-2 / memory-efficient backends on CUDA, a flash kernel on the CPU)."""
    return {"rms_norm": Kernel("torch.nn.functional.rms_norm", "aquila_npu.kernels.pytorch.TorchRMSNorm",
                               default=default),
            "attention": Kernel("torch scaled_dot_product_attention", "aquila_npu.kernels.pytorch.SdpaAttention",
                                default=default)}


def npu_kernels() -> dict[str, Kernel]:
    """torch_npu's fused operators (``aquila_npu.kernels.npu``), all on by default. The rotary one needs the npu
    plugin's patch that puts ``npu_rotary_mul`` into megatron-core's fused-RoPE slot."""
    return {
        "rms_norm": Kernel("torch_npu.npu_rms_norm", "aquila_npu.kernels.npu.NpuRMSNorm"),
        # training / inference (generation, evaluation)
        "attention": Kernel("torch_npu.npu_fusion_attention/npu_fused_infer_attention_score",
                            "aquila_npu.kernels.npu.NpuFlashAttention"),
        "rotary": Kernel("torch_npu.npu_rotary_mul", None, {"apply_rope_fusion": True},
                         function="aquila_npu.kernels.npu.apply_rotary"),
        "swiglu": Kernel("torch_npu.npu_swiglu", "aquila_npu.kernels.npu.NpuSwiGLU",
                         {"use_te_activation_func": True, "bias_activation_fusion": False}),
    }
