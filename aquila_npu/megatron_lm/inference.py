"""Inference hooks of the Megatron-LM route: the plugin ``megatron-lm-inference`` (registered by the start-up hook,
on this route only), for Megatron-LM's own generation scripts (``tools/run_text_generation_server.py``,
``examples/inference/gpt/gpt_static_inference.py``) on any device.

* The model family's tokenizer conventions: with ``--tokenizer-type HuggingFaceTokenizer``, the tokenizer either of
  Megatron-LM's tokenizer builders returns keeps its interface but tokenizes a prompt as the family's inference
  does (BOS first where the family says so, as ``python -m aquila_npu.generate`` does; no other special tokens) and
  ends a sequence at the family's end token. Training reads only ``eod``/``pad``/``vocab_size`` from it: unchanged.
* Padded vocabulary rows (tensor-parallel padding) are never sampled.
* The REST server answers every refused request with an HTTP error and keeps serving: validation messages megatron
  returns as a bare string (HTTP 200) become 400; prompts that are not strings are refused before any rank starts;
  a request that overflows ``--inference-max-seq-length`` fails on every rank alike (a 400, and the other ranks go
  back to waiting) instead of ending the non-zero ranks, and leaves nothing scheduled behind it.
* ``--host``: where the server binds (default: Megatron-LM's ``0.0.0.0``, every interface).
"""

from __future__ import annotations

import functools

from aquila_npu.hookspecs import hookimpl

OWNER = "megatron-lm-inference"
SERVER = "megatron.core.inference.text_generation_server"
CONTROLLER = "megatron.core.inference.text_generation_controllers.text_generation_controller.TextGenerationController"


@hookimpl
def aquila_npu_add_arguments(parser):
    if "--host" in parser._option_string_actions:  # a Megatron-LM that has its own
        return
    group = parser.add_argument_group("aquila-npu inference")
    group.add_argument("--host", default="0.0.0.0",
                       help="address tools/run_text_generation_server.py binds (Megatron-LM's default 0.0.0.0: "
                            "every interface; 127.0.0.1 keeps it on this machine)")


@hookimpl
def aquila_npu_register_patches(registry, device):
    for builder in ("megatron.training.global_vars.build_tokenizer",
                    "megatron.core.tokenizers.text.utils.build_tokenizer.build_tokenizer"):
        registry.register(
            builder, _with_family_conventions, owner=OWNER,
            reason="a Hugging Face tokenizer tokenizes with the tokenizer's own special tokens and ends at its EOS; "
                   "the model family's inference prepends its BOS (Aquila2's HF tokenizer adds none) and ends at "
                   "its end token")
    registry.register(
        f"{CONTROLLER}.tokenize_prompt", _prompt_as_the_family_tokenizes, owner=OWNER,
        reason="strips a leading BOS unless the caller asks for one (the static inference example never does); "
               "a family whose prompts begin with BOS keeps it")
    registry.register(
        "lm_eval.models.megatron_lm.MegatronLMEval.tok_encode", _text_ids_for_lm_eval, owner=OWNER,
        reason="lm-evaluation-harness's megatron_lm model tokenizes every context and continuation with "
               "tokenizer.tokenize, which on this route prepends the family's BOS to a prompt; lm-eval scores the "
               "text's own ids (its hf model's, and our aquila-npu model's, convention)")
    registry.register(
        f"{CONTROLLER}._torch_sampling_func", _never_a_padded_row, owner=OWNER,
        reason="samples over the padded vocabulary (tensor-parallel padding rows hold no token) and clamps the "
               "result; mask those rows instead")
    registry.register(
        f"{SERVER}.text_generation_server.MegatronGenerate.put", _refusals_as_http_errors, owner=OWNER,
        reason="returns several validation errors as a bare string with HTTP 200, and lets a non-string prompt "
               "fail after the other ranks were told to generate (they then wait forever); answer 400 first")
    registry.register(
        f"{SERVER}.run_mcore_engine.run_mcore_engine", _overflow_as_a_refusal, owner=OWNER,
        reason="a request longer than --inference-max-seq-length raises an error the server's other ranks do not "
               "catch (they exit and the server hangs); raise it as the ValueError they catch, and as HTTP 400 on "
               "the rank that serves; unschedule the failed batch, which the engine would otherwise run again with the next")
    registry.register(
        f"{SERVER}.text_generation_server.MegatronServer.run", _bind_where_asked, owner=OWNER,
        reason="binds 0.0.0.0 unconditionally; --host chooses the address (its default is the same 0.0.0.0)")


# ------------------------------------------------------------------------------------------ tokenizer conventions
class FamilyTokenizer:
    """A Megatron tokenizer that tokenizes and ends sequences as the model family's inference does (through
    ``aquila_npu.inference.InferenceTokenizer``, our driver's: the family's BOS and end token); every other attribute
    is the wrapped tokenizer's."""

    def __init__(self, wrapped, ours) -> None:
        self._wrapped = wrapped
        self._ours = ours
        self.bos, self.eod, self.eos_id = ours.bos, ours.eod, ours.eod

    def tokenize(self, text: str, **kwargs) -> list[int]:
        ids = self._ours.tokenize(text)
        return [self.bos, *ids] if self._ours.add_bos else ids

    def text_ids(self, text: str) -> list[int]:
        """The text's ids, no special tokens (what is scored, as opposed to a prompt)."""
        return self._ours.tokenize(text)

    def __getattr__(self, name: str):
        return getattr(self._wrapped, name)


def route_family():
    """The model family of the route's plugins (``--plugin``), if they declare exactly one."""
    import os

    from aquila_npu import plugin_manager

    names = [n for n in os.environ.get(plugin_manager.ENV_PLUGINS, "").split(",") if n]
    families = list(plugin_manager.get().families(names or None).values())
    return families[0] if len(families) == 1 else None


def _with_family_conventions(original):
    @functools.wraps(original)
    def build_tokenizer(args, *more, **kwargs):
        tokenizer = original(args, *more, **kwargs)
        family = route_family()
        if getattr(args, "tokenizer_type", None) != "HuggingFaceTokenizer" or family is None:
            return tokenizer
        from aquila_npu.inference import InferenceTokenizer

        return FamilyTokenizer(tokenizer, InferenceTokenizer(args.tokenizer_model, family.tokenizer))

    return build_tokenizer


def _text_ids_for_lm_eval(original):
    @functools.wraps(original)
    def tok_encode(self, string: str, add_special_tokens: bool = False):
        if isinstance(self.tokenizer, FamilyTokenizer) and not add_special_tokens:
            return self.tokenizer.text_ids(string)
        return original(self, string, add_special_tokens)

    return tok_encode


def _prompt_as_the_family_tokenizes(original):
    @functools.wraps(original)
    def tokenize_prompt(self, prompt, add_BOS=False):
        if isinstance(self.tokenizer, FamilyTokenizer):
            tokens = self.tokenizer.tokenize(prompt)
            return tokens if not add_BOS or tokens[:1] == [self.tokenizer.bos] else [self.tokenizer.bos, *tokens]
        return original(self, prompt, add_BOS)

    return tokenize_prompt


def _never_a_padded_row(original):
    @functools.wraps(original)
    def _torch_sampling_func(self, last_token_logits, temperature, top_k, top_p, vocab_size=None):
        real = getattr(self.tokenizer, "vocab_size", None)
        if real and last_token_logits.shape[-1] > real:
            last_token_logits = last_token_logits.clone()
            last_token_logits[..., real:] = float("-inf")
        return original(self, last_token_logits, temperature, top_k, top_p, vocab_size)

    return _torch_sampling_func


# ------------------------------------------------------------------------------------------ the REST server
def _refusals_as_http_errors(original):
    @functools.wraps(original)
    def put(self):
        from flask import request

        body = request.get_json()  # invalid JSON: flask answers 400 itself
        prompts = body.get("prompts") if isinstance(body, dict) else None
        if isinstance(prompts, list) and not all(isinstance(p, str) for p in prompts):
            return "prompts must be a list of strings", 400
        answer = original(self)
        # megatron's successes are jsonify()'d responses; a bare string is one of its refusals
        return (answer, 400) if isinstance(answer, str) else answer

    return put


def _overflow_as_a_refusal(original):
    @functools.wraps(original)
    def run_mcore_engine(engine, prompts=None, *args, **kwargs):
        from megatron.core.inference.contexts.dynamic_context import ContextOverflowError

        try:
            return original(engine, prompts, *args, **kwargs)
        except ContextOverflowError as exc:
            # the static engine keeps a failed batch scheduled; the next request would run it again
            scheduler = getattr(engine, "scheduler", None)
            for pool in ("active_request_pool", "waiting_request_pool"):
                getattr(scheduler, pool, {}).clear()
            message = f"{exc} (the server's limit is --inference-max-seq-length: prompt plus tokens to generate)"
            if prompts is None:  # a rank that only follows: its loop catches ValueError and waits again
                raise ValueError(message) from exc
            from werkzeug.exceptions import BadRequest

            raise BadRequest(message) from exc

    return run_mcore_engine


def _bind_where_asked(original):
    @functools.wraps(original)
    def run(self, url, port):
        from megatron.training import get_args

        return original(self, getattr(get_args(), "host", None) or url, port)

    return run
