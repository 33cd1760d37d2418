"""Plain-PyTorch reference kernels (forward and backward by autograd)."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as Aquila2/Llama compute it: normalise in fp32, cast back, then scale."""
    dtype = x.dtype
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(dtype)


class RMSNorm(torch.nn.Module):
    """RMSNorm module for megatron-core layer specs.

    Unlike megatron-core's ``WrappedTorchNorm`` it supports ``--sequence-parallel``: its weight is marked
    ``sequence_parallel`` so megatron-core all-reduces its gradient over the tensor-parallel group
    (``finalize_model_grads``), as Transformer Engine's and Apex's norms do.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.config = config
        self.eps = eps
        # where megatron-core's own layers put their weights (torch_npu's bridge maps torch.cuda to the NPU)
        on_accelerator = not config.use_cpu_initialization and torch.cuda.is_available()
        device = torch.cuda.current_device() if on_accelerator else "cpu"
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
