"""megatron-core's text generation controller, extended where generation needs more than it does.

``controller_class()`` subclasses ``TextGenerationController`` (megatron-core is imported only when it is called):
* sampling in ``transformers``' order (temperature, then top-k, then top-p; megatron-core refuses top-k with top-p),
  never choosing a padded vocabulary row, and the same token on every tensor-parallel rank;
* per-request stopping that megatron-core's static batch lacks: ``stop`` strings and ``max_new_tokens`` end a row
  (and the batch, once every row has ended), and each new token is handed to a callback for streaming;
* left-padded batches (``aquila_npu.generate.batching``), so mixed-length prompts prefill in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from aquila_npu.generate.sampling import sample

TokenCallback = Callable[[int, int], None]  # (prompt index, token id)


def controller_class():
    """megatron-core's controller with HF-ordered sampling and per-request stopping (see the module doc)."""
    from megatron.core import parallel_state
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    class _Controller(TextGenerationController):
        batch: BatchState | None = None

        def _torch_sampling_func(self, last_token_logits, temperature, top_k, top_p, vocab_size=None):
            logits = last_token_logits.float()
            if logits.shape[-1] > self.tokenizer.vocab_size:  # padded vocabulary rows hold no token
                logits = logits.clone()
                logits[:, self.tokenizer.vocab_size:] = float("-inf")
            if temperature == 0.0:
                tokens = torch.argmax(logits, dim=-1)
            else:
                tokens = sample(logits, temperature, top_k, top_p, self.sampling_rng)
            if parallel_state.get_tensor_model_parallel_world_size() > 1:
                # every tensor-parallel rank must continue with the same token
                torch.distributed.broadcast(tokens, parallel_state.get_tensor_model_parallel_src_rank(),
                                            group=parallel_state.get_tensor_model_parallel_group())
            return tokens

        def generate_all_output_tokens_static_batch(self, active_requests, active_streams=None):
            from aquila_npu.generate.batching import LeftPadded

            batch = self.batch = BatchState(self, list(active_requests.values()))
            try:
                with LeftPadded(self.inference_wrapped_model, batch.requests, self.tokenizer.pad):
                    finished = super().generate_all_output_tokens_static_batch(active_requests, active_streams)
            finally:
                self.batch = None
            for row, request in enumerate(batch.requests):
                self.watch.results[request.request_id] = (batch.tokens[row], batch.reasons[row])
            return finished

        def update_generation_status(self, updated_prompts_tokens, generation_started, current_context_end_position,
                                     is_generation_done_tensor, generated_sequence_lengths, termination_id=None):
            done, lengths = super().update_generation_status(
                updated_prompts_tokens, generation_started, current_context_end_position, is_generation_done_tensor,
                generated_sequence_lengths, termination_id)
            if self.batch is not None:
                self.batch.step(updated_prompts_tokens[:, current_context_end_position], generation_started, done)
            return done, lengths

    return _Controller


class BatchState:
    """Per-row bookkeeping of one static batch: the tokens so far, stop strings, the streaming callback."""

    def __init__(self, controller, requests) -> None:
        self.requests = requests
        self.tokenizer = controller.tokenizer
        self.watch = controller.watch
        self.tokens: list[list[int]] = [[] for _ in requests]
        self.reasons: list[str | None] = [None] * len(requests)

    def step(self, latest: torch.Tensor, started: torch.Tensor, done: torch.Tensor) -> None:
        watch = self.watch
        latest_ids = latest.tolist()
        for row, (was_started, is_done) in enumerate(zip(started.tolist(), done.tolist())):
            if not was_started or self.reasons[row] is not None:
                continue
            if is_done:  # megatron-core ended the row: the end-of-sequence token
                self.reasons[row] = "eos"
                continue
            self.tokens[row].append(latest_ids[row])
            if watch.on_token is not None:
                watch.on_token(watch.index[self.requests[row].request_id], latest_ids[row])
            if watch.stop and self._hit_stop(self.tokens[row], watch.stop, watch.stop_window):
                self.reasons[row] = "stop"
            elif len(self.tokens[row]) >= watch.max_new_tokens:
                self.reasons[row] = "length"
            if self.reasons[row] is not None:
                done[row] = True  # ends the row now, and the batch once every row has ended

    def _hit_stop(self, tokens: list[int], stop: Sequence[str], window: int) -> bool:
        tail = self.tokenizer.detokenize(tokens[-window:])
        return any(s in tail for s in stop)


@dataclass
class Watch:
    """What the controller watches for during one ``generate`` call."""

    max_new_tokens: int
    stop: tuple[str, ...] = ()
    on_token: TokenCallback | None = None
    index: dict = field(default_factory=dict)  # request id -> prompt index
    results: dict = field(default_factory=dict)  # request id -> (generated ids, finish reason)

    @property
    def stop_window(self) -> int:
        # a stop string is found in the detokenised tail; every token contributes at least one byte
        return 4 * max(len(s) for s in self.stop) + 4
