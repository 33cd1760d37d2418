"""Kernel seams of the Aquila2 layer: the ops a device may replace with its own implementation.

A ``KernelSet`` is what a device plugin hands to the layer spec (``aquila_npu_kernels`` hook). Every field has a
plain-PyTorch reference in ``aquila_npu.kernels.reference``; the reference is what every other implementation is
tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional


@dataclass(frozen=True)
class KernelSet:
    """Implementations of the layer's kernel seams for one device.

    norm: module class built as ``norm(config=, hidden_size=, eps=)``; must honour ``config.sequence_parallel``.
    core_attention: megatron-core core-attention module class (``DotProductAttention``'s constructor).
    activation: optional module class for the whole gated MLP activation (input ``[..., 2 * ffn]``); ``None``
        keeps megatron-core's own ``silu(gate) * up``.
    rotary: optional replacement for megatron-core's ``apply_rotary_pos_emb``; ``None`` keeps megatron-core's.
    """

    name: str
    norm: type
    core_attention: type
    activation: Optional[type] = None
    rotary: Optional[Callable] = None


def reference_kernels() -> KernelSet:
    """The plain-PyTorch kernels (CPU, and the fallback on every device)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from aquila_npu.kernels.reference import RMSNorm

    return KernelSet(name="reference", norm=RMSNorm, core_attention=DotProductAttention)


def npu_kernels() -> KernelSet:
    """torch_npu's fused operators (``aquila_npu.kernels.npu``): RMSNorm, flash attention, SwiGLU."""
    from aquila_npu.kernels.npu import NpuFlashAttention, NpuRMSNorm, NpuSwiGLU

    return KernelSet(name="npu-fused", norm=NpuRMSNorm, core_attention=NpuFlashAttention, activation=NpuSwiGLU)
