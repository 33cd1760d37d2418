"""Logit parity: the megatron-core model built from our spec against Hugging Face ``transformers``, same weights.

``python -m aquila_npu.parity --hf-dir D --tokens T.json --out logits.safetensors`` computes the megatron-core
logits of a Hugging Face checkpoint at any tensor-parallel size (run it under ``torchrun``); rank 0 writes them.
``--megatron-dir D`` instead loads a converted per-rank Megatron checkpoint with megatron-core's own loader.
The quickstart and the tests compare them with ``transformers``' logits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from aquila_npu.kernels import seams as kernels

SAMPLE_TEXTS = (
    "Aquila2 is a family of bilingual language models trained by the Beijing Academy of Artificial Intelligence.",
    "悟道·天鹰（Aquila2）是北京智源人工智能研究院发布的中英双语大语言模型，支持长文本和多轮对话。",
    "Megatron splits each layer across tensor-parallel ranks; the logits must not change when it does.",
)


def save_random_hf_model(spec, path: str, seed: int = 0, dtype: torch.dtype = torch.float32,
                         max_shard_size: str | None = None) -> str:
    """A random ``LlamaForCausalLM`` shaped like ``spec`` (Aquila2's exact weight layout), saved as safetensors.

    Every weight is random, norms included (all-ones norms would hide a swapped norm in a weight mapping).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from aquila_npu.weights import llama_config_dict

    config = llama_config_dict(spec)
    config.update(initializer_range=0.02, torch_dtype="float32")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**config))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.copy_(1.0 + 0.1 * torch.randn_like(param))
    model.to(dtype).save_pretrained(path, safe_serialization=True,
                                    **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return path


def encode(tokenizer_dir: str, texts=SAMPLE_TEXTS, length: int | None = None) -> torch.Tensor:
    """Token ids ``[batch, length]`` of ``texts`` from the tokenizer at ``tokenizer_dir``, cut to one length."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = [tokenizer(text)["input_ids"] for text in texts]
    length = length or min(len(i) for i in ids)
    return torch.tensor([i[:length] for i in ids], dtype=torch.long)


def hf_logits(hf_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def hf_greedy(hf_dir: str, prompts: list[list[int]], max_new_tokens: int, eos_token_id: int | None) -> list[list[int]]:
    """``transformers``' greedy completions (``generate(do_sample=False)``, KV cache), one prompt at a time so no
    padding is involved; the end-of-sequence token is not included."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    completions = []
    for ids in prompts:
        ids = torch.tensor([ids])
        out = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                             pad_token_id=0)[0, ids.shape[1]:].tolist()
        completions.append(out[:out.index(eos_token_id)] if eos_token_id in out else out)
    return completions


def hf_loglikelihoods(hf_dir: str, tokenizer_dir: str, contexts: list[str], continuations, max_length: int):
    """``[[log-likelihood of each continuation] per context]`` from ``transformers``, lm-evaluation-harness's way
    (its ``_encode_pair`` and left truncation), one sequence at a time."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from aquila_npu.evaluate.scoring import encode_pair

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenize = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    scores = []
    for context in contexts:
        row = []
        for continuation in continuations:
            ctx, cont = encode_pair(tokenize, context, continuation)
            inp = (ctx + cont)[-(max_length + 1):][:-1]
            with torch.no_grad():
                log_probs = model(torch.tensor([inp])).logits[0].float().log_softmax(-1)
            row.append(sum(log_probs[p, t].item() for p, t in zip(range(len(inp) - len(cont), len(inp)), cont)))
        scores.append(row)
    return scores


def megatron_logits(hf_dir: str, tokens: torch.Tensor, sequence_parallel: bool = False) -> torch.Tensor:
    """Full-vocabulary logits of the megatron-core model on this rank's slice (call ``distributed.initialize``
    first). The spec is derived from ``config.json``; weights are read from the safetensors files."""
    from megatron.core import parallel_state

    from aquila_npu import plugin_manager, weights
    from aquila_npu.convert.hf_format import load_state, read_spec
    from aquila_npu.model import build_gpt_model, full_vocab_logits

    spec = read_spec(hf_dir, plugin_manager.get())
    hf_state = load_state(hf_dir)
    model = build_gpt_model(spec, parallel_output=False, params_dtype=torch.float32,
                            sequence_parallel=sequence_parallel).eval()
    weights.load_into(model, weights.hf_to_megatron(
        hf_state, spec, parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_rank()))
    return full_vocab_logits(model, tokens, spec.vocab_size)


def megatron_checkpoint_logits(load_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of a converted Megatron checkpoint (pipeline size 1) loaded by megatron-core itself: a per-rank
    ``torch`` checkpoint through ``GPTModel.load_state_dict(strict=True)`` of this rank's file, a ``torch_dist``
    one through ``dist_checkpointing.load`` of the model's sharded state dict (at any tensor-parallel size)."""
    from megatron.core import dist_checkpointing, parallel_state

    from aquila_npu.convert import open_megatron
    from aquila_npu.convert.megatron_dist import MegatronDistCheckpoint
    from aquila_npu.convert.megatron_format import rank_dir
    from aquila_npu.model import build_gpt_model, full_vocab_logits
    from aquila_npu.unpickling import load_weights_only

    checkpoint = open_megatron(load_dir)
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    if isinstance(checkpoint, MegatronDistCheckpoint):
        dtype = next(iter(checkpoint.metadata.values())).dtype
        model = build_gpt_model(checkpoint.spec, parallel_output=False, params_dtype=dtype).eval()
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, checkpoint.root)
        model.load_state_dict(loaded["model"], strict=True)
    else:
        if (checkpoint.parallel.tp, checkpoint.parallel.pp) != (tp, 1):
            raise ValueError(f"{load_dir} is split TP{checkpoint.parallel.tp}/PP{checkpoint.parallel.pp}; "
                             f"run at TP{tp}")
        path = os.path.join(checkpoint.root, rank_dir(rank, 0, 1), "model_optim_rng.pt")
        state = load_weights_only(path)["model"]
        model = build_gpt_model(checkpoint.spec, parallel_output=False,
                                params_dtype=next(iter(state.values())).dtype).eval()
        model.load_state_dict(state, strict=True)
    return full_vocab_logits(model, tokens, checkpoint.spec.vocab_size)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aquila_npu.parity", description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-dir", help="a Hugging Face checkpoint (weights mapped by aquila_npu.weights)")
    source.add_argument("--megatron-dir", help="a per-rank Megatron torch checkpoint at this tensor-parallel size")
    parser.add_argument("--tokens", required=True, help="JSON file with a [batch, length] list of token ids")
    parser.add_argument("--out", required=True, help="where rank 0 writes the logits (safetensors)")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    parser.add_argument("--device", default=None)
    parser.add_argument("--sequence-parallel", action="store_true")
    kernels.add_arguments(parser)
    args = parser.parse_args(argv)

    from aquila_npu import distributed

    return distributed.run_command("parity", lambda: _write_logits(args))


def _write_logits(args) -> None:
    from safetensors.torch import save_file

    from aquila_npu import distributed

    with open(args.tokens, encoding="utf-8") as f:
        tokens = torch.tensor(json.load(f), dtype=torch.long)
    with distributed.megatron_world(device=args.device, tensor_model_parallel_size=args.tensor_model_parallel_size,
                                    kernels=kernels.request_from_args(args)):
        if args.hf_dir:
            logits = megatron_logits(args.hf_dir, tokens, args.sequence_parallel)
        else:
            logits = megatron_checkpoint_logits(args.megatron_dir, tokens)
        if torch.distributed.get_rank() == 0:
            tmp = args.out + ".tmp"
            save_file({"logits": logits.contiguous()}, tmp)
            os.replace(tmp, args.out)


if __name__ == "__main__":
    sys.exit(main())
