"""The Aquila2 model family (BAAI): 7B, 34B, 70B-Expr, the 16K long-context chat models, and a tiny variant for tests.

This file is the only place in aquila-npu that knows Aquila2. Figures are those of the published checkpoints
(2023 releases with the 100,008-token tokenizer; see README "Which Aquila2"): RMSNorm (eps 1e-5), SwiGLU,
rotate-half RoPE with base 10000, no linear biases, untied embeddings, head dim 128.
"""

from aquila_npu.chat import ChatTemplate
from aquila_npu.hookspecs import hookimpl
from aquila_npu.specs import ModelFamily, ModelSpec, TokenizerDefaults

VOCAB_SIZE = 100_008  # 100,000 BPE entries + 8 special tokens

SPECS = (
    ModelSpec(name="aquila2-7b", num_layers=32, hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32,
              num_query_groups=32, seq_length=2048, max_position_embeddings=2048, vocab_size=VOCAB_SIZE,
              params_dtype="fp16", description="Aquila2-7B / AquilaChat2-7B (MHA)"),
    ModelSpec(name="aquila2-34b", num_layers=60, hidden_size=6144, ffn_hidden_size=24576, num_attention_heads=48,
              num_query_groups=8, seq_length=4096, max_position_embeddings=4096, vocab_size=VOCAB_SIZE,
              params_dtype="bf16", description="Aquila2-34B / AquilaChat2-34B (GQA, 8 groups)"),
    ModelSpec(name="aquila2-70b-expr", num_layers=80, hidden_size=8192, ffn_hidden_size=28672,
              num_attention_heads=64, num_query_groups=8, seq_length=4096, max_position_embeddings=4096,
              vocab_size=VOCAB_SIZE, params_dtype="bf16", description="Aquila2-70B-Expr (GQA, 8 groups)"),
    # AquilaChat2-7B-16K / -34B-16K: the 7B / 34B with linear RoPE scaling (2,048 x 8 and 4,096 x 4 positions)
    ModelSpec(name="aquila2-7b-16k", num_layers=32, hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32,
              num_query_groups=32, seq_length=16384, max_position_embeddings=16384, vocab_size=VOCAB_SIZE,
              rotary_seq_len_interpolation_factor=8.0, params_dtype="fp16",
              description="AquilaChat2-7B-16K (MHA, linear RoPE scaling x8)"),
    ModelSpec(name="aquila2-34b-16k", num_layers=60, hidden_size=6144, ffn_hidden_size=24576, num_attention_heads=48,
              num_query_groups=8, seq_length=16384, max_position_embeddings=16384, vocab_size=VOCAB_SIZE,
              rotary_seq_len_interpolation_factor=4.0, params_dtype="bf16",
              description="AquilaChat2-34B-16K (GQA, 8 groups, linear RoPE scaling x4)"),
    ModelSpec(name="aquila2-tiny", num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=8,
              num_query_groups=4, seq_length=256, max_position_embeddings=256, vocab_size=VOCAB_SIZE,
              params_dtype="fp32", description="2-layer Aquila2 with GQA, for tests and the CPU quickstart"),
)

# AquilaChat2's conversation templates as BAAI serves them (FlagAI-Open/Aquila2 ``predict.py``: FastChat-style
# templates, the prompt tokenised as ``get_prompt() + " "`` with no BOS; ``template_map`` picks the template per model)
_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
           "The assistant gives helpful, detailed, and polite answers to the human's questions.")
CHAT_TEMPLATES = (
    ChatTemplate(name="aquila-v1", user_role="<|startofpiece|>", assistant_role="<|endofpiece|>",
                 style="no_colon_two", sep="", sep2="</s>", generation_suffix=" ", stop=("</s>", "<|endoftext|>"),
                 description="AquilaChat2-7B (and 70B-Expr)"),
    ChatTemplate(name="aquila-legacy", user_role="### Human: ", assistant_role="### Assistant: ",
                 style="no_colon_two", system_message=_SYSTEM + "\n\n", sep="\n", sep2="</s>",
                 generation_suffix=" ", stop=("</s>", "[UNK]"), description="AquilaChat2-34B"),
    ChatTemplate(name="aquila", user_role="Human", assistant_role="Assistant", style="add_colon_two",
                 system_message=_SYSTEM, sep="###", sep2="</s>", generation_suffix=" ", stop=("</s>", "[UNK]"),
                 description="AquilaChat2-7B-16K and AquilaChat2-34B-16K"),
)

FAMILY = ModelFamily(
    name="aquila2",
    specs=SPECS,
    tokenizer=TokenizerDefaults(
        tokenizer_type="PretrainedFromHF",
        bos_token_id=100006,  # [CLS]
        eos_token_id=100007,  # </s>, also the end-of-document token
        pad_token_id=0,       # <|endoftext|>
        eod_token_id=100007,
        add_bos_token=True,   # BAAI: the HF tokenizer adds none; prepend BOS for SFT and inference
        sample_dir="aquila2_tokenizer",
    ),
    # Aquila2's own configs say AquilaForCausalLM; converted checkpoints say LlamaForCausalLM (same weights)
    hf_architectures=("AquilaForCausalLM", "LlamaForCausalLM"),
    hf_model_types=("aquila", "llama"),
    smoke_test_model="aquila2-tiny",
    description="BAAI Aquila2 (7B, 34B, 70B-Expr)",
    chat_templates=CHAT_TEMPLATES,
    chat_template_for={"aquila2-34b": "aquila-legacy", "aquila2-7b-16k": "aquila", "aquila2-34b-16k": "aquila"},
)


@hookimpl
def aquila_npu_model_family():
    return FAMILY
