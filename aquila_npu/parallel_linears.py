"""megatron-core's parallel linears for the layer spec, whose forward without gradients at one tensor-parallel rank
is the bare product.

A decode step of megatron-core's ``ColumnParallelLinear`` / ``RowParallelLinear`` goes through three autograd
functions per linear, even with gradients off and one rank, where they are identities around one matmul: the copy
to the tensor-parallel region, the linear's own (``LinearWithFrozenWeight``), the reduction from the region — and,
in the row-parallel linear, a deprecation warning for its ``tp_group=None``. Four linears a layer make that the
largest share of the per-token overhead found in issue 16 (``benchmarks/README.md``, "Bare linears without
gradients"). These subclasses compute ``torch.matmul(input, weight.t())`` (plus the bias, as megatron-core adds it)
directly in that case: the same operation on the same operands as megatron-core's autograd function, so the same
values bit for bit (``tests/test_parallel_linears.py``).

Everything else — gradients on (training, LoRA), more than one tensor-parallel rank (collectives), sequence
parallelism, a weight passed in, gathered outputs, expert communication, deferred embedding gradients, CPU
offloading, autocast, an instance whose ``_forward_impl`` was replaced — is megatron-core's own forward. Parameters,
state dicts and checkpoint sharding are megatron-core's unchanged: these are the same modules to a checkpoint.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import layers as megatron_layers


def _takes_the_bare_product(linear) -> bool:
    config = linear.config
    return (not torch.is_grad_enabled() and not torch.is_autocast_enabled() and not linear.sequence_parallel
            and not linear.explicit_expert_comm and linear.tp_group.size() == 1
            and config._cpu_offloading_context is None and not config.defer_embedding_wgrad_compute
            and "_forward_impl" not in vars(linear))


def _bare_product(linear, input_):
    """``(output, output_bias)`` as megatron-core's forward returns them: the bias added, or handed back with
    ``skip_bias_add``."""
    output = torch.matmul(input_, linear.weight.t())
    if linear.skip_bias_add:
        return output, linear.bias
    return (output + linear.bias if linear.bias is not None else output), None


class ColumnParallelLinear(megatron_layers.ColumnParallelLinear):
    """megatron-core's ``ColumnParallelLinear``; without gradients at one rank, the bare product (module doc)."""

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if weight is None and self.weight is not None and _takes_the_bare_product(self):
            return _bare_product(self, input_)
        return super().forward(input_, weight, runtime_gather_output)


class RowParallelLinear(megatron_layers.RowParallelLinear):
    """megatron-core's ``RowParallelLinear``; without gradients at one rank, the bare product (module doc)."""

    def forward(self, input_):
        if _takes_the_bare_product(self):
            return _bare_product(self, input_)
        return super().forward(input_)
