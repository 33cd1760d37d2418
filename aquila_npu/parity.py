"""Logit parity: the megatron-core model built from our spec against Hugging Face ``transformers``, same weights.

``python -m aquila_npu.parity --hf-dir D --tokens T.json --out logits.safetensors`` computes the megatron-core
logits of a Hugging Face checkpoint at any tensor-parallel size (run it under ``torchrun``); rank 0 writes them.
The quickstart and the tests compare them with ``transformers``' logits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

SAMPLE_TEXTS = (
    "Aquila2 is a family of bilingual language models trained by the Beijing Academy of Artificial Intelligence.",
    "悟道·天鹰（Aquila2）是北京智源人工智能研究院发布的中英双语大语言模型，支持长文本和多轮对话。",
    "Megatron splits each layer across tensor-parallel ranks; the logits must not change when it does.",
)


def save_random_hf_model(spec, path: str, seed: int = 0) -> str:
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
    model.save_pretrained(path, safe_serialization=True)
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


def megatron_logits(hf_dir: str, tokens: torch.Tensor, sequence_parallel: bool = False) -> torch.Tensor:
    """Full-vocabulary logits of the megatron-core model on this rank's slice (call ``distributed.initialize``
    first). The spec is derived from ``config.json``; weights are read from the safetensors files."""
    from megatron.core import parallel_state
    from safetensors.torch import load_file

    from aquila_npu import plugin_manager, specs, weights
    from aquila_npu.model import build_gpt_model

    config = specs.load_hf_config(hf_dir)
    spec = plugin_manager.get().family_for_hf_config(config).spec_from_hf_config(config)
    hf_state = {}
    for name in sorted(os.listdir(hf_dir)):
        if name.endswith(".safetensors"):
            hf_state.update(load_file(os.path.join(hf_dir, name)))
    model = build_gpt_model(spec, parallel_output=False, params_dtype=torch.float32,
                            sequence_parallel=sequence_parallel).eval()
    weights.load_into(model, weights.hf_to_megatron(
        hf_state, spec, parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_rank()))
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    positions = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        logits = model(tokens, positions, None)
    return logits[..., :spec.vocab_size].float().cpu()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aquila_npu.parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--tokens", required=True, help="JSON file with a [batch, length] list of token ids")
    parser.add_argument("--out", required=True, help="where rank 0 writes the logits (safetensors)")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    parser.add_argument("--device", default=None)
    parser.add_argument("--sequence-parallel", action="store_true")
    args = parser.parse_args(argv)

    from safetensors.torch import save_file

    from aquila_npu import distributed

    with open(args.tokens, encoding="utf-8") as f:
        tokens = torch.tensor(json.load(f), dtype=torch.long)
    with distributed.megatron_world(device=args.device, tensor_model_parallel_size=args.tensor_model_parallel_size):
        logits = megatron_logits(args.hf_dir, tokens, args.sequence_parallel)
        if torch.distributed.get_rank() == 0:
            tmp = args.out + ".tmp"
            save_file({"logits": logits.contiguous()}, tmp)
            os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
