"""Left-padded static batches: every prompt of a batch prefilled in one forward pass.

megatron-core's static batch aligns prompts on the left and prefills only up to the shortest one; each longer
prompt then runs through the model one token per step, so a batch whose prompts differ by ``d`` tokens takes
``d`` extra decode steps. Here the prompts of a batch are left-padded to the longest, which megatron-core then
prefills in one pass. Two things make that exact, not approximate:

* an attention mask per row hides the padding keys (a padding query attends only to itself, so no row is fully
  masked, whatever a fused kernel does with one);
* rotary embeddings per row: the rotation of cache slot ``t`` of a row padded by ``p`` is that of position
  ``t - p``, so every real token sees the positions it would see unpadded (each key is rotated with its own
  slot's row as it enters the KV cache, ``aquila_npu.kv_cache``; megatron-core slices the rotary table along the
  sequence only, so a ``[s, batch, 1, d]`` table works).
"""

from __future__ import annotations

import torch


def padded_wrapper_class():
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper

    class LeftPaddedGPTInferenceWrapper(GPTInferenceWrapper):
        """megatron-core's GPT wrapper; with ``pads`` set (one count per row), the batch is left-padded."""

        pads: list[int] | None = None

        def __init__(self, model, *args, **kwargs) -> None:
            super().__init__(model, *args, **kwargs)
            rotary = model.rotary_pos_emb
            table = rotary.forward
            cached: dict = {}  # the batch's per-row table, built once (every step of a batch asks for it)

            def per_row_rotary(max_seq_len, *a, **k):
                freqs = table(max_seq_len, *a, **k)  # [s, 1, 1, d]
                if self.pads is None:
                    return freqs
                key = (tuple(self.pads), freqs.shape[0])
                if key not in cached:
                    cached.clear()
                    pads = torch.tensor(self.pads, device=freqs.device)
                    index = (torch.arange(freqs.shape[0], device=freqs.device)[:, None] - pads[None, :]).clamp(min=0)
                    cached[key] = freqs[:, 0][index]  # [s, batch, 1, d]
                return cached[key]

            rotary.forward = per_row_rotary

        def prep_inference_input(self, prompts_tokens):
            inputs = super().prep_inference_input(prompts_tokens)
            if self.pads is not None:
                inputs["attention_mask"] = padding_mask(self.pads, prompts_tokens.shape[1], prompts_tokens.device)
            return inputs

    return LeftPaddedGPTInferenceWrapper


def padding_mask(pads: list[int], length: int, device) -> torch.Tensor:
    """``[batch, 1, length, length]``, True where attention is masked: the future, and padding keys (except a
    padding position's own key)."""
    positions = torch.arange(length, device=device)
    causal = positions[None, :] > positions[:, None]
    is_pad = positions[None, :] < torch.tensor(pads, device=device)[:, None]  # [batch, key]
    own = torch.eye(length, dtype=torch.bool, device=device)
    return (causal[None] | (is_pad[:, None, :] & ~own[None]))[:, None]


class LeftPadded:
    """While active, the batch's requests hold left-padded prompts and the wrapper knows the padding."""

    def __init__(self, wrapper, requests, pad_id: int) -> None:
        self.wrapper, self.requests, self.pad_id = wrapper, requests, pad_id
        self.originals = [request.prompt_tokens for request in requests]

    def __enter__(self) -> "LeftPadded":
        longest = max(len(tokens) for tokens in self.originals)
        pads = [longest - len(tokens) for tokens in self.originals]
        if any(pads):
            for request, tokens, pad in zip(self.requests, self.originals, pads):
                request.prompt_tokens = [self.pad_id] * pad + list(tokens)
            self.wrapper.pads = pads
        return self

    def __exit__(self, *exc) -> None:
        for request, tokens in zip(self.requests, self.originals):
            request.prompt_tokens = tokens
        self.wrapper.pads = None
