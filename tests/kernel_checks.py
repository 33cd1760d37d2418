"""Shared checks of a kernel implementation against the plain-PyTorch reference (``aquila_npu.kernels.reference``):
forward and input gradients of one op, and a whole model's logits and weight gradients."""

from __future__ import annotations

import torch

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


# the devices a kernel check runs on: this CPU, and a GPU when the machine has one
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def same_forward_backward(fn, ref_fn, inputs, dtype, device="cpu") -> None:
    """``fn`` on ``device`` and ``ref_fn`` on the CPU give the same output and the same input gradients for the same
    upstream gradient (boolean inputs such as masks are moved, not differentiated)."""
    ours = [x.detach().clone().to(device, dtype if x.is_floating_point() else x.dtype)
            .requires_grad_(x.is_floating_point()) for x in inputs]
    theirs = [x.detach().clone().to(dtype if x.is_floating_point() else x.dtype)
              .requires_grad_(x.is_floating_point()) for x in inputs]
    out, expected = fn(*ours), ref_fn(*theirs)
    torch.testing.assert_close(out.cpu(), expected, **TOLERANCE[dtype])
    grad = torch.randn_like(expected)
    out.backward(grad.to(device))
    expected.backward(grad)
    for a, b in zip(ours, theirs):
        if a.requires_grad:
            torch.testing.assert_close(a.grad.cpu(), b.grad, **TOLERANCE[dtype])


def rotary_tables(s: int, d: int, layout: str = "sbhd"):
    """(cos, sin) of Aquila2's rotate-half RoPE angles, ``[s, 1, 1, d]`` (sbhd) or ``[1, s, 1, d]`` (bshd)."""
    angles = rotary_angles(s, d)
    table = angles[:, None, None, :] if layout == "sbhd" else angles[None, :, None, :]
    return table.cos(), table.sin()


def rotary_angles(s: int, d: int) -> torch.Tensor:
    freqs = torch.outer(torch.arange(s).float(), 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
    return torch.cat((freqs, freqs), dim=-1)


def attention_inputs(s: int, b: int, heads: int, groups: int, d: int, padded: bool, seed: int):
    """q ``[s, b, heads, d]``, k and v ``[s, b, groups, d]``, and the left-padding mask generation uses (rows 1 and
    2 start with 2 and 4 padding keys) or None (causal)."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(s, b, heads, d, generator=generator)
    k, v = (torch.randn(s, b, groups, d, generator=generator) for _ in range(2))
    mask = None
    if padded:
        from aquila_npu.generate.batching import padding_mask

        mask = padding_mask([0, 2, 4][:b], s, "cpu")
    return q, k, v, mask


def same_model_outputs(spec, kernels, reference_kernels, atol=1e-5, rtol=1e-4, packed: list[int] | None = None
                       ) -> None:
    """aquila2-shaped ``spec`` built with ``kernels`` and with ``reference_kernels`` from the same weights: equal
    logits and equal gradients of every weight. ``packed``: one sequence of documents of these lengths (megatron-core's
    THD layout, as packed training runs) instead of two rows of 16 tokens."""
    from aquila_npu.model import build_gpt_model

    models = []
    for kernel_set in (reference_kernels, kernels):
        torch.manual_seed(0)
        models.append(build_gpt_model(spec, kernels=kernel_set, parallel_output=False, params_dtype=torch.float32))
    models[1].load_state_dict(models[0].state_dict())
    device = next(models[0].parameters()).device  # the megatron world's: a GPU where there is one
    extra = {}
    if packed:
        from aquila_npu.training.data import packed_seq_params

        tokens = torch.randint(0, spec.vocab_size, (1, sum(packed)), generator=torch.Generator().manual_seed(1))
        positions = torch.cat([torch.arange(n) for n in packed])[None]
        cu_seqlens = torch.tensor([0, *torch.tensor(packed).cumsum(0).tolist()], dtype=torch.int32, device=device)
        extra["packed_seq_params"] = packed_seq_params(cu_seqlens)
        tokens, positions = tokens.to(device), positions.to(device)
    else:
        tokens = torch.randint(0, spec.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
        positions = torch.arange(16, device=device)[None].expand(2, 16)
    outputs = [model(tokens, positions, None, **extra) for model in models]
    torch.testing.assert_close(outputs[1], outputs[0], atol=atol, rtol=rtol)
    for output in outputs:
        output.float().logsumexp(-1).sum().backward()
    grads = [{n: p.grad for n, p in model.named_parameters()} for model in models]
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=atol, rtol=rtol, msg=name)
