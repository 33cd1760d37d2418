"""Choosing the next token the way ``transformers`` does: temperature, then top-k, then top-p."""

from __future__ import annotations

import torch


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from fp32 ``logits`` [batch, vocab], drawn from ``filtered_logits``."""
    probabilities = filtered_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probabilities, 1, generator=generator).view(-1)


def filtered_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus: the smallest set of tokens whose probability exceeds
    ``top_p``), in ``transformers``' order and definitions; filtered tokens get -inf."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        ascending, order = torch.sort(logits, dim=-1)
        remove = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        remove[:, -1] = False
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return logits
