"""Hugging Face Llama/Aquila2 weight layout <-> megatron-core ``GPTModel`` layout, one tensor-parallel rank at a time.

Megatron-core packs attention as ``linear_qkv``: per query group, that group's query heads, then one key head and
one value head; tensor parallelism splits it by whole groups. The SwiGLU ``linear_fc1`` holds, on each rank, that
rank's chunk of the gate projection followed by its chunk of the up projection. Row-parallel layers (``linear_proj``,
``linear_fc2``) split the input dimension; the vocabulary is padded, then split; norms are replicated.
"""

from __future__ import annotations

from typing import Iterator, Mapping

import torch

from aquila_npu.specs import ModelSpec

HF_LAYER = "model.layers.{i}."
MC_LAYER = "decoder.layers.{i}."


class Pieces:
    """A tensor given as consecutive row blocks (each contiguous): writers store the blocks one after the other,
    so packing needs no concatenated copy. ``materialize()`` builds the tensor."""

    def __init__(self, parts: list[torch.Tensor], shape: tuple[int, ...]) -> None:
        self.parts, self.shape = [p.contiguous() for p in parts], tuple(shape)
        self.dtype = parts[0].dtype

    def materialize(self) -> torch.Tensor:
        return torch.cat([p.reshape(-1) for p in self.parts]).reshape(self.shape)

    def numel(self) -> int:
        return sum(p.numel() for p in self.parts)

    def element_size(self) -> int:
        return self.parts[0].element_size()


def as_tensor(value: torch.Tensor | Pieces) -> torch.Tensor:
    return value.materialize() if isinstance(value, Pieces) else value


def qkv_pieces(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: ModelSpec, tp_size: int = 1,
               tp_rank: int = 0) -> Pieces:
    """HF ``q/k/v_proj`` weights -> this rank's megatron-core ``linear_qkv`` weight, as row blocks: per query group
    of this rank, that group's query heads, then its key head, then its value head."""
    groups, d, hidden = spec.num_query_groups, spec.kv_channels, spec.hidden_size
    heads_per_group = spec.num_attention_heads // groups
    per_rank = groups // tp_size
    q, k, v = q.reshape(groups, heads_per_group * d, hidden), k.reshape(groups, d, hidden), v.reshape(groups, d, hidden)
    parts = []
    for g in range(tp_rank * per_rank, (tp_rank + 1) * per_rank):
        parts += [q[g], k[g], v[g]]
    return Pieces(parts, (per_rank * (heads_per_group + 2) * d, hidden))


def pack_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: ModelSpec, tp_size: int = 1,
             tp_rank: int = 0) -> torch.Tensor:
    """HF ``q/k/v_proj`` weights -> this rank's megatron-core ``linear_qkv`` weight."""
    return qkv_pieces(q, k, v, spec, tp_size, tp_rank).materialize()


def fc1_pieces(gate: torch.Tensor, up: torch.Tensor, tp_size: int = 1, tp_rank: int = 0) -> Pieces:
    """HF ``gate_proj``/``up_proj`` -> this rank's SwiGLU ``linear_fc1``: its gate rows, then its up rows."""
    g, u = gate.chunk(tp_size)[tp_rank], up.chunk(tp_size)[tp_rank]
    return Pieces([g, u], (g.shape[0] + u.shape[0], g.shape[1]))


def unpack_qkv(packed: list[torch.Tensor], spec: ModelSpec) -> tuple[Pieces, Pieces, Pieces]:
    """The tensor-parallel ranks' ``linear_qkv`` weights -> HF ``q_proj``, ``k_proj``, ``v_proj`` as row blocks
    (each group's rows are contiguous inside its rank's tensor; ranks hold whole groups in order). Any matrix laid
    out by those rows splits the same way (a LoRA B factor: ``[rows, r]``)."""
    d, hidden = spec.kv_channels, packed[0].shape[-1]
    heads_per_group = spec.num_attention_heads // spec.num_query_groups
    q, k, v = [], [], []
    for rank in packed:
        groups = rank.reshape(-1, (heads_per_group + 2) * d, hidden)
        for g in range(groups.shape[0]):
            q.append(groups[g, :heads_per_group * d])
            k.append(groups[g, heads_per_group * d:(heads_per_group + 1) * d])
            v.append(groups[g, (heads_per_group + 1) * d:])
    return (Pieces(q, (spec.num_attention_heads * d, hidden)), Pieces(k, (spec.num_query_groups * d, hidden)),
            Pieces(v, (spec.num_query_groups * d, hidden)))


def unpack_fc1(ranks: list[torch.Tensor]) -> tuple[Pieces, Pieces]:
    """The tensor-parallel ranks' SwiGLU ``linear_fc1`` weights (each ``[gate_r; up_r]``) -> HF gate, up."""
    halves = [r.chunk(2) for r in ranks]
    rows = sum(g.shape[0] for g, _ in halves)
    return Pieces([g for g, _ in halves], (rows, ranks[0].shape[1])), Pieces([u for _, u in halves],
                                                                           (rows, ranks[0].shape[1]))


def megatron_to_hf_layer(ranks: list[Mapping[str, torch.Tensor]], prefix: str, spec: ModelSpec,
                         layer: int, as_pieces: bool = False) -> dict[str, torch.Tensor | Pieces]:
    """HF tensors of global layer ``layer`` from every tensor-parallel rank's state (keys under ``prefix``).
    With ``as_pieces`` the row concatenations (q/k/v, gate/up) come as ``Pieces`` for a writer to store."""
    get = lambda name: [r[prefix + name] for r in ranks]  # noqa: E731
    q, k, v = unpack_qkv(get("self_attention.linear_qkv.weight"), spec)
    gate, up = unpack_fc1(get("mlp.linear_fc1.weight"))
    if not as_pieces:
        q, k, v, gate, up = (p.materialize() for p in (q, k, v, gate, up))
    out = HF_LAYER.format(i=layer)
    return {
        out + "input_layernorm.weight": ranks[0][prefix + "input_layernorm.weight"],
        out + "self_attn.q_proj.weight": q,
        out + "self_attn.k_proj.weight": k,
        out + "self_attn.v_proj.weight": v,
        out + "self_attn.o_proj.weight": torch.cat(get("self_attention.linear_proj.weight"), dim=1),
        out + "post_attention_layernorm.weight": ranks[0][prefix + "pre_mlp_layernorm.weight"],
        out + "mlp.gate_proj.weight": gate,
        out + "mlp.up_proj.weight": up,
        out + "mlp.down_proj.weight": torch.cat(get("mlp.linear_fc2.weight"), dim=1),
    }


def hf_names(spec: ModelSpec) -> list[str]:
    """Every HF tensor name of ``spec``, in checkpoint order."""
    layer = ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    names = ["model.embed_tokens.weight"]
    names += [HF_LAYER.format(i=i) + f"{n}.weight" for i in range(spec.num_layers) for n in layer]
    names += ["model.norm.weight"] + (["lm_head.weight"] if spec.untie_embeddings_and_output_weights else [])
    return names


def hf_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    h, f, d = spec.hidden_size, spec.ffn_hidden_size, spec.kv_channels
    q, kv = spec.num_attention_heads * d, spec.num_query_groups * d
    per_layer = {"input_layernorm": (h,), "self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h),
                 "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, q), "post_attention_layernorm": (h,),
                 "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}
    shapes = {}
    for name in hf_names(spec):
        if name.startswith("model.layers."):
            shapes[name] = per_layer[name.split(".", 3)[3].rsplit(".", 1)[0]]
        else:
            shapes[name] = (h,) if name == "model.norm.weight" else (spec.vocab_size, h)
    return shapes


def pad_vocab(weight: torch.Tensor, padded_size: int) -> torch.Tensor:
    """Rows beyond the tokenizer's vocabulary are zeros (they never receive a token)."""
    if weight.shape[0] == padded_size:
        return weight
    return torch.cat([weight, weight.new_zeros(padded_size - weight.shape[0], weight.shape[1])])


def iter_hf_to_megatron(hf: Mapping[str, torch.Tensor], spec: ModelSpec, tp_size: int = 1, tp_rank: int = 0,
                        layers: range | None = None, pre_process: bool = True, post_process: bool = True,
                        as_pieces: bool = False) -> Iterator[tuple[str, torch.Tensor | Pieces]]:
    """The megatron-core state of one tensor-parallel rank (and pipeline stage, given its global ``layers``), one
    tensor at a time and in a fixed order; each is computed (and its HF inputs read) only when reached.

    Layer indices are local to the stage, as megatron-core numbers them. With ``as_pieces`` the packed tensors
    (``linear_qkv``, ``linear_fc1``) come as ``Pieces`` for writers that store them without concatenating.
    """
    pack = (lambda pieces: pieces) if as_pieces else (lambda pieces: pieces.materialize())
    layers = range(spec.num_layers) if layers is None else layers
    padded = spec.padded_vocab_size(tp_size)
    if pre_process:
        yield "embedding.word_embeddings.weight", pad_vocab(hf["model.embed_tokens.weight"], padded).chunk(
            tp_size)[tp_rank].contiguous()
    for local, i in enumerate(layers):
        src, dst = HF_LAYER.format(i=i), MC_LAYER.format(i=local)
        yield dst + "input_layernorm.weight", hf[src + "input_layernorm.weight"].contiguous()
        yield dst + "self_attention.linear_qkv.weight", pack(qkv_pieces(
            hf[src + "self_attn.q_proj.weight"], hf[src + "self_attn.k_proj.weight"],
            hf[src + "self_attn.v_proj.weight"], spec, tp_size, tp_rank))
        yield dst + "self_attention.linear_proj.weight", hf[src + "self_attn.o_proj.weight"].chunk(
            tp_size, dim=1)[tp_rank].contiguous()
        yield dst + "pre_mlp_layernorm.weight", hf[src + "post_attention_layernorm.weight"].contiguous()
        yield dst + "mlp.linear_fc1.weight", pack(fc1_pieces(hf[src + "mlp.gate_proj.weight"],
                                                             hf[src + "mlp.up_proj.weight"], tp_size, tp_rank))
        yield dst + "mlp.linear_fc2.weight", hf[src + "mlp.down_proj.weight"].chunk(tp_size, dim=1)[
            tp_rank].contiguous()
    if post_process:
        yield "decoder.final_layernorm.weight", hf["model.norm.weight"].contiguous()
        if spec.untie_embeddings_and_output_weights:
            yield "output_layer.weight", pad_vocab(hf["lm_head.weight"], padded).chunk(tp_size)[tp_rank].contiguous()


def hf_to_megatron(hf: Mapping[str, torch.Tensor], spec: ModelSpec, tp_size: int = 1, tp_rank: int = 0,
                   layers: range | None = None, pre_process: bool = True,
                   post_process: bool = True) -> dict[str, torch.Tensor]:
    """``iter_hf_to_megatron`` as a state dict."""
    return dict(iter_hf_to_megatron(hf, spec, tp_size, tp_rank, layers, pre_process, post_process))


def load_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``model``; every parameter must be covered (Transformer Engine's ``_extra_state``
    buffers aside), and shapes must match exactly."""
    missing, unexpected = [], set(state)
    for name, tensor in _named_weights(model):
        if name not in state:
            missing.append(name)
            continue
        unexpected.discard(name)
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(state[name].shape)} != model {tuple(tensor.shape)}")
        with torch.no_grad():
            tensor.copy_(state[name])
    if missing or unexpected:
        raise ValueError(f"weights do not match the model: missing {missing[:5]}, unexpected {sorted(unexpected)[:5]}")


def _named_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not name.endswith("_extra_state"):
            yield name, tensor


def llama_config_dict(spec: ModelSpec, bos_token_id: int | None = None, eos_token_id: int | None = None,
                      pad_token_id: int | None = None) -> dict:
    """A ``config.json`` that ``transformers`` loads as ``LlamaForCausalLM`` (same weights as Aquila2's own); linear
    RoPE scaling as ``rope_scaling``, the spelling of BAAI's own configs, which transformers 4 and 5 both read."""
    scaling = spec.rotary_seq_len_interpolation_factor
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.ffn_hidden_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_query_groups,
        "head_dim": spec.kv_channels,
        "max_position_embeddings": spec.max_position_embeddings,
        "vocab_size": spec.vocab_size,
        "rms_norm_eps": spec.norm_epsilon,
        "rope_theta": spec.rotary_base,
        **({"rope_scaling": {"type": "linear", "factor": float(scaling)}} if scaling is not None else {}),
        "tie_word_embeddings": not spec.untie_embeddings_and_output_weights,
        "attention_bias": spec.add_bias_linear,
        "mlp_bias": spec.add_bias_linear,
        "initializer_range": spec.init_method_std,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "torch_dtype": {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[spec.params_dtype],
    }
