"""Text generation on megatron-core's inference engine: KV cache, tensor parallelism, batches of mixed lengths.

``TextGenerator(GenerateOptions(...))`` loads a checkpoint (``aquila_npu.inference``) and wraps megatron-core's
``GPTInferenceWrapper`` (with a ``StaticInferenceContext``: the KV cache), a ``TextGenerationController`` and the
``StaticInferenceEngine``, which batches requests. Prompts of different lengths share a batch: megatron-core
prefills up to the shortest prompt, then steps one token at a time, feeding each longer prompt's own tokens
until it too starts generating, so every row sees exactly its own prefix.

The controller is megatron-core's with three additions (``_Controller``): sampling as Hugging Face orders it
(temperature, then top-k, then top-p, which megatron-core does not combine), the padded vocabulary rows never
sampled, and per-request stopping (end of sequence, ``stop`` strings, ``max_new_tokens``) that also ends the
batch early, with every new token handed to a callback for streaming. ``python -m aquila_npu.generate`` is the
command line.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from aquila_npu.errors import AquilaNpuError


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
class GenerateOptions:
    load: str
    tokenizer_name_or_path: str
    load_model_type: str = "mg"  # mg (Megatron, either format) | hf (converted in memory)
    model: str | None = None  # a named spec; otherwise from config.json / the checkpoint's saved arguments
    plugins: tuple[str, ...] = ()  # model-family plugins to look the spec up in (default: all)
    device: str | None = None
    tensor_model_parallel_size: int = 1
    params_dtype: str | None = None  # fp32 | fp16 | bf16; default: the checkpoint's
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


TokenCallback = Callable[[int, int], None]  # (prompt index, token id)


def _controller_class():
    """megatron-core's controller with HF-ordered sampling and per-request stopping (see the module doc)."""
    from megatron.core import parallel_state
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    class _Controller(TextGenerationController):
        batch: _BatchState | None = None

        def _torch_sampling_func(self, last_token_logits, temperature, top_k, top_p, vocab_size=None):
            logits = last_token_logits.float().clone()
            logits[:, self.tokenizer.vocab_size:] = float("-inf")  # padded vocabulary rows hold no token
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
            batch = self.batch = _BatchState(self, list(active_requests.values()))
            try:
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


class _BatchState:
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
class _Watch:
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


class TextGenerator:
    """A loaded model ready to generate (one per process; under torchrun every rank builds one)."""

    def __init__(self, options: GenerateOptions) -> None:
        from aquila_npu import distributed, plugin_manager
        from aquila_npu.inference import InferenceTokenizer, load_model, resolve_spec

        self.options = options
        plugins = plugin_manager.get()
        if options.plugins:
            plugins.require(options.plugins)
        spec = resolve_spec(options.load, options.load_model_type, options.model, plugins, options.plugins or None)
        spec.check_parallel(options.tensor_model_parallel_size)
        self.family = _family_of(spec, plugins)
        self.tokenizer = InferenceTokenizer(options.tokenizer_name_or_path,
                                            self.family.tokenizer if self.family else None)
        self.tokenizer.check_fits(spec)
        self.world = distributed.initialize(options.device, options.tensor_model_parallel_size)
        import torch.distributed as dist

        if dist.get_world_size() != options.tensor_model_parallel_size:
            raise AquilaNpuError(f"generation runs one model over all processes: start {options.tensor_model_parallel_size}"
                                 f" process(es) for --tensor-model-parallel-size {options.tensor_model_parallel_size}, "
                                 f"not {dist.get_world_size()}")
        loaded = load_model(options.load, options.load_model_type, spec, options.params_dtype)
        self.spec, self.model, self.dtype = spec, loaded.model, loaded.dtype
        self.max_sequence_length = options.max_sequence_length or spec.max_position_embeddings
        self.engine = self._engine()

    def _engine(self):
        from megatron.core.inference.contexts import StaticInferenceContext
        from megatron.core.inference.engines import StaticInferenceEngine
        from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
        from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import (
            InferenceWrapperConfig,
        )

        config = InferenceWrapperConfig(
            hidden_size=self.spec.hidden_size, params_dtype=self.dtype,
            inference_batch_times_seqlen_threshold=-1,  # no pipeline micro-batching (pipeline size 1)
            padded_vocab_size=self.spec.padded_vocab_size(self.options.tensor_model_parallel_size),
            inference_max_requests=self.options.max_batch_size, inference_max_seq_length=self.max_sequence_length)
        context = StaticInferenceContext(self.options.max_batch_size, self.max_sequence_length)
        controller = _controller_class()(GPTInferenceWrapper(self.model, config, context), self.tokenizer)
        controller.watch = _Watch(max_new_tokens=1)
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
                 add_bos: bool | None = None, stats: GenerationStats | None = None) -> list[Completion]:
        """Completions of ``prompts`` (in order). ``on_token(prompt_index, token_id)`` sees each new token."""
        from megatron.core.inference.sampling_params import SamplingParams

        sampling.check()
        if not prompts:
            return []
        encoded = [self.encode(p, add_bos) for p in prompts]
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
        watch = _Watch(sampling.max_new_tokens, tuple(sampling.stop), on_token)
        controller.watch = watch
        for index, (prompt, ids) in enumerate(zip(prompts, encoded)):
            request_id = self.engine.scheduler.add_request(prompt=prompt, prompt_tokens=ids, sampling_params=params)
            watch.index[request_id] = index
        started = time.perf_counter()
        try:
            self._run()
        finally:
            controller.watch = _Watch(max_new_tokens=1)
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


def _family_of(spec, plugins):
    for family in plugins.families().values():
        if spec.name in family.spec_names() or spec.name == f"{family.name}-custom":
            return family
    families = list(plugins.families().values())
    return families[0] if len(families) == 1 else None
