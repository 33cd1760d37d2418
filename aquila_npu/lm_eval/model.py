"""``aquila-npu``: lm-evaluation-harness's ``LM`` interface over our inference (any checkpoint, any TP size).

Registered with lm-eval's ``register_model`` when this module is imported (``python -m aquila_npu.lm_eval``
imports it; so does plain ``lm_eval --model aquila-npu``, through ``aquila_npu.lm_eval.autoload``). Requests are
tokenised exactly as lm-eval's ``hf`` model tokenises them (``TemplateLM``'s pairing, the HF tokenizer's own
special-token default, the same prefix token, left truncation) and then served by the code behind ``python -m
aquila_npu.evaluate`` and ``generate``:

* ``loglikelihood`` / ``loglikelihood_rolling``: ``aquila_npu.evaluate.scoring`` — rows sorted by length and
  batched, one context pass for every one-token continuation of the same context, the output layer only at the
  positions read;
* ``generate_until``: megatron-core's static engine with its KV cache (``aquila_npu.generate.TextGenerator``), with
  lm-eval's stop strings, ``max_gen_toks`` and its greedy / sampling arguments.

Under ``torchrun`` with ``tensor_model_parallel_size=N`` every rank loads its shard; rank 0 is the model lm-eval
sees, and the other ranks leave lm-eval inside this constructor to compute the same batches in lock-step
(``aquila_npu.lm_eval.lockstep``) until rank 0 finishes.
"""

from __future__ import annotations

import sys

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from aquila_npu.errors import AquilaNpuError

NAME = "aquila-npu"
DEFAULT_MICRO_BATCH_SIZE = 8


def _batch_size(value) -> int | None:
    """lm-eval's ``--batch_size``: an int, or ``auto[:N]`` (we take our default: rows are batched by length)."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return None
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise AquilaNpuError(f"--batch_size {value!r}: give a number (or auto)") from None
    if size < 1:
        raise AquilaNpuError(f"--batch_size must be at least 1, not {size}")
    return size


def _flag(value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise AquilaNpuError(f"--model_args: a kernel flag takes True or False, not {value!r}")


@register_model(NAME)
class AquilaNpuLM(TemplateLM):
    """``--model aquila-npu --model_args load=CKPT,tokenizer=TOK[,model=NAME,load_model_type=mg|hf,params_dtype=fp32|
    bf16|fp16,micro_batch_size=8,tensor_model_parallel_size=N,device=cpu|cuda|npu,lora_load=DIR,max_length=N,
    max_gen_toks=256,add_bos_token=True|False,prefix_token_id=ID,seed=1234,plugin=NAME,use_flash_attn=True|False,
    use_fused_rmsnorm=..,use_fused_rotary_pos_emb=..,use_fused_swiglu=..]`` (the kernel flags of our drivers).

    lm-eval's ``--batch_size`` is the micro-batch size unless ``micro_batch_size`` is given. lm-eval's ``--device``
    is not used (its default, ``cuda:0``, is not a choice the user made): the device is chosen as our drivers
    choose it (NPU, then CUDA, then CPU), or by ``device=`` in ``--model_args``.
    """

    def __init__(self, load: str, tokenizer: str | None = None, tokenizer_name_or_path: str | None = None,
                 model: str | None = None, load_model_type: str = "mg", plugin: str | None = None,
                 device: str | None = None, tensor_model_parallel_size: int = 1, params_dtype: str | None = None,
                 lora_load: str | None = None, micro_batch_size: int | None = None, batch_size=None,
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool | None = None,
                 prefix_token_id: int | None = None, seed: int = 1234, **unknown) -> None:
        super().__init__()
        unknown.pop("max_batch_size", None)  # lm-eval's, for its automatic batch size
        from aquila_npu.kernels.seams import FLAGS as KERNEL_FLAGS

        # the kernel flags of our drivers, spelt as model arguments (use_flash_attn=True, ...)
        kernels = {op: _flag(unknown.pop(flag[2:].replace("-", "_")))
                   for op, flag in KERNEL_FLAGS.items() if flag[2:].replace("-", "_") in unknown}
        if unknown:
            raise AquilaNpuError(f"--model_args: unknown argument(s) {', '.join(sorted(unknown))} for --model {NAME}")
        tokenizer = tokenizer or tokenizer_name_or_path
        if not tokenizer:
            raise AquilaNpuError(f"--model_args: give tokenizer=PATH (the model's tokenizer folder) for --model {NAME}")
        from aquila_npu.inference import ModelOptions, open_model

        self.options = ModelOptions(
            load=str(load), tokenizer_name_or_path=str(tokenizer), load_model_type=load_model_type,
            model=model, plugins=(plugin,) if plugin else (), device=device,
            tensor_model_parallel_size=int(tensor_model_parallel_size), params_dtype=params_dtype,
            lora_load=lora_load, kernels=kernels or None)
        self.micro_batch_size = (int(micro_batch_size) if micro_batch_size else _batch_size(batch_size)
                                 or DEFAULT_MICRO_BATCH_SIZE)
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.seed = int(seed)
        self.opened = open_model(self.options, purpose="lm-eval")
        self.tokenizer = self.opened.tokenizer
        self._max_length = int(max_length) if max_length else self.opened.spec.max_position_embeddings
        hf = self.tokenizer.hf
        self._prefix_token_id = (int(prefix_token_id) if prefix_token_id is not None
                                 else hf.bos_token_id if hf.bos_token_id is not None else self.tokenizer.eod)
        self._prefix_text = hf.decode(self._prefix_token_id)  # tok_encode's check, once rather than per request
        self._generator = None
        from aquila_npu.lm_eval.lockstep import Lockstep

        self.lockstep = Lockstep({"score": self._score, "generate": self._generate})
        if not self.lockstep.leads:
            self.lockstep.follow()  # returns only by leaving the process, with rank 0
            sys.exit(0)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """lm-eval's ``--model_args`` and its ``--batch_size`` / ``--max_batch_size`` / ``--device``; its device
        (``cuda:0`` unless given) is not ours to take, only ``device=`` in ``--model_args`` is."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k != "device"}
        return cls(**{**extra, **arg_dict})

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ------------------------------------------------------------------ what lm-eval asks of a model
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eod

    @property
    def prefix_token_id(self) -> int:
        return self._prefix_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.micro_batch_size

    @property
    def device(self):
        return self.opened.world.torch_device

    @property
    def tokenizer_name(self) -> str:
        return self.options.tokenizer_name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """lm-eval's ``HFLM.tok_encode``: the tokenizer's own special-token default unless told (``add_bos_token``
        or the caller), none when the text already starts with the prefix token."""
        hf = self.tokenizer.hf
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            if add_special_tokens is None and string.startswith(self._prefix_text):
                add_special_tokens = False
        ids = hf.encode(string, **({} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}))
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.hf.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """``requests``: ``((context, continuation) | None, context ids, continuation ids)``, as
        ``TemplateLM.loglikelihood`` and ``loglikelihood_rolling`` make them."""
        from aquila_npu.evaluate.scoring import token_pair_rows

        pairs = [(list(context), list(continuation)) for _, context, continuation in requests]
        for (key, _, _), (context, continuation) in zip(requests, pairs):
            if not continuation:
                raise AquilaNpuError(f"lm-eval request {key!r}: the continuation has no tokens to score")
        rows = token_pair_rows(pairs, self.max_length)
        scores, greedy = self.lockstep.lead("score", (rows, len(requests), disable_tqdm))
        results = []
        for index, (key, _, _) in enumerate(requests):
            answer = (sum(scores[(0, index)]), greedy[(0, index)])
            results.append(answer)
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """lm-eval's rolling windows (``get_rolling_token_windows``, each scored after one token of context)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owners = [], []
        for index, (string,) in enumerate(request.args for request in requests):
            for window in get_rolling_token_windows(token_list=self.tok_encode(string),
                                                    prefix_token=self.prefix_token_id,
                                                    max_seq_len=self.max_length, context_len=1):
                windows.append((None, *make_disjoint_window(window)))
                owners.append(index)
        scored = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm) if windows else []
        totals = [0.0] * len(requests)
        for index, (value, _) in zip(owners, scored):
            totals[index] += value
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests grouped by their generation arguments (as lm-eval's ``hf`` model groups them); each group is
        one call of the KV-cache engine, which batches it by length."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items(), key=lambda kv: kv[0])), []).append(index)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        results: list[str | None] = [None] * len(requests)
        bar = _bar(len(requests), "generate_until", disable_tqdm)
        for indices in groups.values():
            gen_kwargs = requests[indices[0]].args[1]
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            sampling = self._sampling(kwargs, until)
            if sampling.max_new_tokens >= self.max_length:
                raise AquilaNpuError(f"max_gen_toks {sampling.max_new_tokens} leaves no room for a context in the "
                                     f"model's {self.max_length} positions")
            contexts = [requests[i].args[0] for i in indices]
            prompt_ids = [self.tok_encode(c, left_truncate_len=self.max_length - sampling.max_new_tokens)
                          for c in contexts]
            generated = self.lockstep.lead("generate", (contexts, prompt_ids, sampling))
            for index, context, tokens in zip(indices, contexts, generated):
                text = postprocess_generated_text(self.tok_decode(tokens), until, None)
                results[index] = text
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            bar.update(len(indices))
        bar.close()
        return results

    def get_model_info(self) -> dict:
        return {"model_name": self.opened.spec.name, "model_dtype": str(self.opened.dtype).removeprefix("torch."),
                "load": self.options.load, "tensor_model_parallel_size": self.options.tensor_model_parallel_size}

    # ------------------------------------------------------------------ what every rank runs
    def _sampling(self, kwargs: dict, until: list[str]):
        """lm-eval's normalised generation arguments as ours; transformers' defaults where a task sets none
        (top_k 50, top_p 1.0), so sampled runs mean what they mean on the ``hf`` model."""
        from aquila_npu.generate import SamplingOptions

        max_new_tokens = int(kwargs.pop("max_gen_toks"))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        top_k = int(kwargs.pop("top_k", 50) or 0)
        top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
        return SamplingOptions(max_new_tokens=max_new_tokens, greedy=not do_sample or temperature == 0.0,
                               temperature=temperature or 1.0, top_k=top_k, top_p=top_p, seed=self.seed,
                               stop=tuple(s for s in until if s))

    def _score(self, rows, count: int, disable_tqdm: bool):
        from aquila_npu.evaluate.scoring import score_rows

        bar = _bar(count, "loglikelihood", disable_tqdm or not self.lockstep.leads)
        greedy: dict = {}
        scores = score_rows(self.opened.model, rows, self.tokenizer.vocab_size, self.tokenizer.pad,
                            self.micro_batch_size, on_batch=lambda batch: bar.update(sum(len(r.choices) for r in batch)),
                            greedy=greedy)
        bar.close()
        return scores, greedy

    def _generate(self, contexts, prompt_ids, sampling):
        return [c.tokens for c in self.generator.generate(contexts, sampling, prompt_tokens=prompt_ids)]

    @property
    def generator(self):
        """The KV-cache engine over the loaded model, made on the first generation request."""
        if self._generator is None:
            from aquila_npu.generate import GenerateOptions, TextGenerator

            options = GenerateOptions(**vars(self.options), max_batch_size=self.micro_batch_size,
                                      max_sequence_length=self.max_length)
            self._generator = TextGenerator(options, opened=self.opened)
        return self._generator


def _bar(total: int, what: str, disabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"aquila-npu {what}", unit="req", file=sys.stderr, disable=disabled)
