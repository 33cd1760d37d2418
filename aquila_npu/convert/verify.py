"""``--verify``: after converting, compare the logits of the source and the converted model on a fixed prompt.

A Hugging Face side runs in ``transformers``; a Megatron side is read back through ``MegatronCheckpoint`` and runs in
megatron-core (one process, tensor-parallel size 1, fp32). The check runs on the temporary output, before it is
renamed into place, so a conversion that fails verification leaves nothing behind. It holds the model in fp32
twice: meant for small models, or hosts with the memory for them.
"""

from __future__ import annotations

import torch

from aquila_npu.errors import AquilaNpuError

TOLERANCE = 1e-4


def fixed_tokens(vocab_size: int, length: int = 32, batch: int = 2) -> torch.Tensor:
    """Deterministic, tokenizer-free ids spread over the vocabulary."""
    return (torch.arange(batch * length).reshape(batch, length) * 7919 + 17) % vocab_size


def _hf_logits(path: str, tokens: torch.Tensor, round_to: torch.dtype | None) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=round_to or torch.float32, trust_remote_code=False)
    model = model.float().eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def _megatron_logits(source, spec, tokens: torch.Tensor, round_to: torch.dtype | None) -> torch.Tensor:
    from aquila_npu import distributed, weights
    from aquila_npu.model import build_gpt_model, full_vocab_logits

    state = {name: source.tensor(name).to(round_to or torch.float32).float() for name in weights.hf_names(spec)}
    with distributed.megatron_world():
        model = build_gpt_model(spec, parallel_output=False, params_dtype=torch.float32).eval()
        weights.load_into(model, weights.hf_to_megatron(state, spec))
        return full_vocab_logits(model, tokens, spec.vocab_size)


def logits(path: str, kind: str, spec, round_to: torch.dtype | None = None) -> torch.Tensor:
    """fp32 logits of the model at ``path``; ``round_to`` first rounds its weights to that dtype."""
    tokens = fixed_tokens(spec.vocab_size)
    if kind == "hf":
        return _hf_logits(path, tokens, round_to)
    from aquila_npu.convert import open_megatron

    return _megatron_logits(open_megatron(path, spec), spec, tokens, round_to)


def verify(source_dir: str, source_kind: str, target_dir: str, target_kind: str, spec,
           params_dtype: torch.dtype | None = None, tolerance: float = TOLERANCE) -> float:
    """The max abs logit difference; raises when it is above ``tolerance``. With ``params_dtype`` (a dtype
    change), the source's weights are rounded to it first, so only the conversion itself is judged."""
    source = logits(source_dir, source_kind, spec, params_dtype)
    diff = (source - logits(target_dir, target_kind, spec)).abs().max().item()
    print(f"verify: max |logit diff| source vs converted = {diff:.3e} (tolerance {tolerance:g})", flush=True)
    if not diff <= tolerance:
        raise AquilaNpuError(f"verification failed: the converted model's logits differ by {diff:.3e} "
                             f"(> {tolerance:g}); nothing was written")
    return diff
