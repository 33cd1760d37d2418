"""Text generation on megatron-core's inference engine: KV cache, tensor parallelism, batches of mixed lengths.

``TextGenerator(GenerateOptions(...))`` loads a checkpoint (``aquila_npu.inference``) and wraps megatron-core's
``GPTInferenceWrapper`` (with a ``StaticInferenceContext``: the KV cache), a ``TextGenerationController`` and the
``StaticInferenceEngine``, which batches requests. Prompts of different lengths share a batch, left-padded
so that one forward pass prefills them all, with masks and rotary positions that make every row see exactly what
it would see alone (``aquila_npu.generate.batching``); the controller adds HF-ordered sampling, per-request
stopping and streaming (``aquila_npu.generate.controller``). ``python -m aquila_npu.generate`` is the command line.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Sequence

from aquila_npu.errors import AquilaNpuError
from aquila_npu.generate.controller import TokenCallback, Watch, controller_class
from aquila_npu.inference import ModelOptions, open_model


@dataclass
class SamplingOptions:
    """How each next token is chosen (defaults: ModelLink's generation defaults)."""

    max_new_tokens: int = 128
    greedy: bool = False
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.95
    seed: int = 1234
    stop: tuple[str, ...] = ()

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise AquilaNpuError(f"--max-new-tokens must be at least 1, not {self.max_new_tokens}")
        if not self.greedy:
            if not self.temperature > 0:
                raise AquilaNpuError(f"--temperature must be > 0 (use --greedy for argmax), not {self.temperature}")
            if self.top_k < 0:
                raise AquilaNpuError(f"--top-k must be >= 0 (0: no top-k filter), not {self.top_k}")
            if not 0.0 <= self.top_p <= 1.0:
                raise AquilaNpuError(f"--top-p must be in [0, 1] (0 or 1: no top-p filter), not {self.top_p}")


@dataclass
class GenerateOptions(ModelOptions):
    """The model (``ModelOptions``: checkpoint, tokenizer, device, tensor parallelism, dtype) and the engine."""

    max_batch_size: int = 8
    max_sequence_length: int | None = None  # prompt + new tokens; default: the model's max positions
    add_bos: bool | None = None  # default: the model family's tokenizer default


@dataclass
class Completion:
    prompt: str
    text: str  # the generated continuation (cut before a stop string)
    tokens: list[int]  # the generated ids (end of sequence not included)
    finish_reason: str  # "eos" | "stop" | "length"
    prompt_tokens: list[int] = field(default_factory=list)


@dataclass
class GenerationStats:
    prompts: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0


class TextGenerator:
    """A loaded model ready to generate (one per process; under torchrun every rank builds one)."""

    def __init__(self, options: GenerateOptions, opened=None) -> None:
        """``opened``: the ``OpenModel`` of ``options`` when the caller has loaded it already (one model for
        generation and scoring)."""
        self.options = options
        opened = opened or open_model(options, purpose="generation")
        self.spec, self.model, self.dtype = opened.spec, opened.model, opened.dtype
        self.family, self.tokenizer, self.world = opened.family, opened.tokenizer, opened.world
        self.max_sequence_length = options.max_sequence_length or self.spec.max_position_embeddings
        self.engine = self._engine()

    def _engine(self):
        from megatron.core.inference.contexts import StaticInferenceContext
        from megatron.core.inference.engines import StaticInferenceEngine
        from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import (
            InferenceWrapperConfig,
        )

        from aquila_npu.generate.batching import padded_wrapper_class

        config = InferenceWrapperConfig(
            hidden_size=self.spec.hidden_size, params_dtype=self.dtype,
            inference_batch_times_seqlen_threshold=-1,  # no pipeline micro-batching (pipeline size 1)
            padded_vocab_size=self.spec.padded_vocab_size(self.options.tensor_model_parallel_size),
            inference_max_requests=self.options.max_batch_size, inference_max_seq_length=self.max_sequence_length)
        context = StaticInferenceContext(self.options.max_batch_size, self.max_sequence_length)
        controller = controller_class()(padded_wrapper_class()(self.model, config, context), self.tokenizer)
        controller.watch = Watch(max_new_tokens=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "the static engine will be deprecated": it is the KV-cache batch path
            return StaticInferenceEngine(controller, max_batch_size=self.options.max_batch_size, legacy=True)

    def chat_template(self, name: str | None = None):
        """The conversation template ``name``, else the one the model family gives this model."""
        if self.family is None:
            raise AquilaNpuError(f"{self.spec.name}: no model family declares it, so there is no chat template")
        return self.family.chat_template(self.spec.name, name)

    def encode(self, prompt: str, add_bos: bool | None = None) -> list[int]:
        add_bos = self._add_bos() if add_bos is None else add_bos
        return ([self.tokenizer.bos] if add_bos else []) + self.tokenizer.tokenize(prompt)

    def _add_bos(self) -> bool:
        return self.tokenizer.add_bos if self.options.add_bos is None else self.options.add_bos

    def generate(self, prompts: Sequence[str], sampling: SamplingOptions, on_token: TokenCallback | None = None,
                 add_bos: bool | None = None, stats: GenerationStats | None = None,
                 prompt_tokens: Sequence[list[int]] | None = None) -> list[Completion]:
        """Completions of ``prompts`` (in order). ``on_token(prompt_index, token_id)`` sees each new token.
        ``prompt_tokens``: the prompts' ids when the caller has tokenised them (``add_bos`` is then not used)."""
        from megatron.core.inference.sampling_params import SamplingParams

        sampling.check()
        if not prompts:
            return []
        encoded = ([list(ids) for ids in prompt_tokens] if prompt_tokens is not None
                   else [self.encode(p, add_bos) for p in prompts])
        for index, ids in enumerate(encoded):
            if not ids:
                raise AquilaNpuError(f"prompt {index + 1} is empty (and no BOS is added); give some text")
            if len(ids) + sampling.max_new_tokens > self.max_sequence_length:
                raise AquilaNpuError(
                    f"prompt {index + 1} has {len(ids)} tokens; with --max-new-tokens {sampling.max_new_tokens} that "
                    f"exceeds --max-sequence-length {self.max_sequence_length}; shorten it or generate fewer tokens")
        params = SamplingParams(
            temperature=0.0 if sampling.greedy else sampling.temperature, top_k=0 if sampling.greedy else sampling.top_k,
            top_p=0.0 if sampling.greedy else sampling.top_p, num_tokens_to_generate=sampling.max_new_tokens)
        controller = self.engine.controller
        controller.sampling_rng.manual_seed(sampling.seed)
        watch = Watch(sampling.max_new_tokens, tuple(sampling.stop), on_token)
        controller.watch = watch
        # longest first: the engine batches requests in arrival order, and similar lengths pad least
        for index in sorted(range(len(prompts)), key=lambda i: -len(encoded[i])):
            request_id = self.engine.scheduler.add_request(prompt=prompts[index], prompt_tokens=encoded[index],
                                                           sampling_params=params)
            watch.index[request_id] = index
        started = time.perf_counter()
        try:
            self._run()
        except BaseException:
            # an interrupted call leaves no requests behind for the next one to run
            for pool in (self.engine.scheduler.active_request_pool, self.engine.scheduler.waiting_request_pool):
                pool.clear()
            raise
        finally:
            controller.watch = Watch(max_new_tokens=1)
        seconds = time.perf_counter() - started
        completions = []
        for request_id, index in sorted(watch.index.items(), key=lambda item: item[1]):
            tokens, reason = watch.results[request_id]
            completions.append(self._completion(prompts[index], encoded[index], tokens, reason, sampling.stop))
            self.engine.scheduler.completed_request_pool.pop(request_id, None)
        if stats is not None:
            stats.prompts += len(prompts)
            stats.generated_tokens += sum(len(c.tokens) for c in completions)
            stats.seconds += seconds
        return completions

    def _run(self) -> None:
        """The engine's ``run_engine`` loop (static batches of up to ``max_batch_size`` requests) without its
        progress bar, which would interleave with streamed text."""
        engine = self.engine
        while engine.scheduler.have_requests_pending():
            active = engine.scheduler.active_request_pool.copy()
            engine.scheduler.update_requests_pools(
                result_dict=engine.controller.generate_all_output_tokens_static_batch(active, None))

    def _completion(self, prompt: str, prompt_ids: list[int], tokens: list[int], reason: str | None,
                    stop: Sequence[str]) -> Completion:
        text = self.tokenizer.detokenize(tokens)
        if reason == "stop":
            cut = min((text.index(s) for s in stop if s in text), default=len(text))
            text = text[:cut]
        return Completion(prompt=prompt, text=text, tokens=tokens, finish_reason=reason or "length",
                          prompt_tokens=prompt_ids)
