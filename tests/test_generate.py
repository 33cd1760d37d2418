"""Generation on megatron-core's inference engine against ``transformers`` ``generate`` on the same weights.

A tiny random Aquila2-shaped Hugging Face model is converted to Megatron (per-rank ``torch`` split TP=2, and
``torch_dist``); greedy completions of prompts of different lengths, batched, must equal ``transformers``'
``generate(do_sample=False)`` token for token at TP=1 and TP=2.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from conftest import convert_to_megatron, make_hf_checkpoint, run_python

PROMPTS = [
    "Aquila2 is a family of bilingual language models trained by",
    "短",
    "悟道·天鹰（Aquila2）是北京智源人工智能研究院发布的中英双语大语言模型",
    "Megatron splits each layer across tensor-parallel ranks; the next token",
]
NEW_TOKENS = 12
BOS, EOS = 100006, 100007


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_spec):
    return make_hf_checkpoint(tiny_spec, tmp_path_factory.mktemp("gen-hf") / "model", seed=3)


@pytest.fixture(scope="module")
def mg_tp2_dir(hf_dir, tmp_path_factory):
    return convert_to_megatron(hf_dir, tmp_path_factory.mktemp("gen-mg") / "tp2", tensor_parallel=2)


@pytest.fixture(scope="module")
def mg_dist_dir(hf_dir, tmp_path_factory):
    target = tmp_path_factory.mktemp("gen-dist") / "dist"
    run_python("-m", "aquila_npu.convert", "--load-dir", str(hf_dir), "--save-dir", str(target), "--ckpt-format",
               "torch_dist", "--no-progress", check=True)
    return target


@pytest.fixture(scope="module")
def reference(hf_dir, tokenizer_dir):
    """transformers' greedy completions, one prompt at a time (no padding: the definition of right)."""
    from transformers import AutoTokenizer

    from aquila_npu.parity import hf_greedy

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    prompts = [[BOS] + tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    completions = hf_greedy(str(hf_dir), prompts, NEW_TOKENS, EOS)
    assert all(completions)
    return completions


@pytest.fixture(scope="module")
def generator(megatron_world, mg_tp2_dir, tokenizer_dir):
    """A TP=1 generator over the TP=2 per-rank checkpoint (resplit on load); three rows, so four prompts take
    two static batches."""
    from aquila_npu.generate import GenerateOptions, TextGenerator

    return TextGenerator(GenerateOptions(load=str(mg_tp2_dir), tokenizer_name_or_path=str(tokenizer_dir),
                                         model="aquila2-tiny", max_batch_size=3))


def greedy(max_new_tokens=NEW_TOKENS, **kwargs):
    from aquila_npu.generate import SamplingOptions

    return SamplingOptions(max_new_tokens=max_new_tokens, greedy=True, **kwargs)


def test_greedy_batch_matches_transformers_tp1(generator, reference):
    completions = generator.generate(PROMPTS, greedy())
    assert [c.tokens for c in completions] == reference
    assert [c.prompt for c in completions] == PROMPTS
    assert all(c.prompt_tokens[0] == BOS for c in completions)
    assert len({len(c.prompt_tokens) for c in completions}) == len(PROMPTS)  # mixed lengths in one batch
    assert [c.text for c in completions] == [generator.tokenizer.detokenize(r) for r in reference]


def test_sampling_is_reproducible_and_top_k_1_is_greedy(generator):
    from aquila_npu.generate import SamplingOptions

    sampled = lambda **kw: [c.tokens for c in generator.generate(PROMPTS, SamplingOptions(max_new_tokens=8, **kw))]
    first, again = sampled(seed=7, top_k=0, top_p=1.0, temperature=1.0), sampled(seed=7, top_k=0, top_p=1.0,
                                                                                  temperature=1.0)
    assert first == again
    assert sampled(seed=8, top_k=0, top_p=1.0, temperature=1.0) != first  # the seed matters
    greedy_tokens = [c.tokens for c in generator.generate(PROMPTS, greedy(8))]
    assert greedy_tokens != first
    assert sampled(seed=9, top_k=1, temperature=1.5, top_p=0.9) == greedy_tokens


def test_filters_match_transformers_warpers():
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from aquila_npu.generate.sampling import filtered_logits

    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0)) * 3
    for temperature, top_k, top_p in [(0.7, 50, 0.95), (1.0, 0, 0.5), (1.3, 10, 1.0), (0.5, 0, 0.0)]:
        warpers = [TemperatureLogitsWarper(temperature)]
        warpers += [TopKLogitsWarper(top_k)] if top_k else []
        warpers += [TopPLogitsWarper(top_p)] if 0 < top_p < 1 else []
        expected = LogitsProcessorList(warpers)(None, logits.clone())
        ours = filtered_logits(logits, temperature, top_k, top_p)
        assert torch.equal(torch.isinf(ours), torch.isinf(expected))
        kept = ~torch.isinf(expected)
        torch.testing.assert_close(ours[kept], expected[kept])


def test_stop_string_ends_a_completion_early(generator, reference):
    full = generator.generate(PROMPTS[:1], greedy())[0]
    stop = generator.tokenizer.detokenize(full.tokens[3:5])
    cut = generator.generate(PROMPTS[:1], greedy(stop=(stop,)))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.index(stop)]
    assert cut.tokens == full.tokens[:len(cut.tokens)] and len(cut.tokens) <= 5
    assert full.finish_reason == "length" and len(full.tokens) == NEW_TOKENS


def test_end_of_sequence_ends_only_its_row(generator, reference, monkeypatch):
    # make a token the model will produce the end-of-sequence id: that row ends there, the others run on
    monkeypatch.setattr(generator.tokenizer, "eod", reference[1][2])
    completions = generator.generate(PROMPTS, greedy())
    assert completions[1].tokens == reference[1][:2] and completions[1].finish_reason == "eos"
    for completion, expected in zip(completions, reference):
        if reference[1][2] not in expected:
            assert completion.tokens == expected


def test_streamed_text_equals_the_completion(generator):
    from aquila_npu.generate.stream import TextStream

    pieces = []
    stream = TextStream(generator.tokenizer.detokenize, pieces.append)
    completion = generator.generate(PROMPTS[2:3], greedy(20), on_token=lambda i, t: stream.feed(t))[0]
    stream.close()
    assert "".join(pieces) == completion.text and len(pieces) > 3
    assert not any("\ufffd" in p for p in pieces[:-1])


def test_text_stream_holds_back_partial_characters_and_stop_strings(tokenizer_dir):
    from aquila_npu.generate.stream import TextStream
    from aquila_npu.inference import InferenceTokenizer

    tokenizer = InferenceTokenizer(str(tokenizer_dir))
    text = "天鹰 says hello<|endoftext|> and more"
    ids = tokenizer.tokenize(text)
    pieces = []
    stream = TextStream(tokenizer.detokenize, pieces.append, stop=("<|endoftext|>",))
    for token in ids:
        stream.feed(token)
    stream.close()
    assert "".join(pieces) == "天鹰 says hello"
    assert all("\ufffd" not in p and "<" not in p for p in pieces)


def test_prompt_longer_than_the_cache_is_a_clear_error(generator):
    from aquila_npu.errors import AquilaNpuError

    with pytest.raises(AquilaNpuError, match="prompt 1 has .* --max-sequence-length 256"):
        generator.generate(["word " * 300], greedy())


# --------------------------------------------------------------------------------------------- chat template
MESSAGES = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi!"},
            {"role": "user", "content": "How are you?"}]
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the human's questions.")


def test_chat_templates_render_as_aquilachat2_expects():
    """The texts BAAI's templates give for this conversation (FlagAI-Open/Aquila2 predict.py: FastChat's
    get_prompt, then the prompt + " " that predict() tokenises)."""
    from aquila_npu.plugins.aquila2 import FAMILY

    v1 = FAMILY.chat_template("aquila2-7b")
    assert v1.name == "aquila-v1"
    assert v1.render(MESSAGES) == "<|startofpiece|>Hello!<|endofpiece|>Hi!</s><|startofpiece|>How are you?<|endofpiece|> "
    legacy = FAMILY.chat_template("aquila2-34b")
    assert legacy.name == "aquila-legacy"
    assert legacy.render(MESSAGES) == (SYSTEM + "\n\n### Human: Hello!\n### Assistant: Hi!</s>### Human: How are "
                                                "you?\n### Assistant:  ")
    assert FAMILY.chat_template(template="aquila").render(MESSAGES) == (
        SYSTEM + "###Human: Hello!###Assistant: Hi!</s>Human: How are you?###Assistant: ")
    with_system = [{"role": "system", "content": "Be brief."}] + MESSAGES[:1]
    assert v1.render(with_system) == "Be brief.<|startofpiece|>Hello!<|endofpiece|> "
    assert v1.reply_text(" Fine, thanks.<|endoftext|>junk") == "Fine, thanks."


@pytest.mark.parametrize("messages, match", [
    ([{"role": "assistant", "content": "x"}], "role 'assistant' where 'user'"),
    (MESSAGES[:2], "must end with a user message"),
    ([{"role": "user", "content": 3}], "content must be a string"),
])
def test_chat_template_rejects_malformed_conversations(messages, match):
    from aquila_npu.errors import AquilaNpuError
    from aquila_npu.plugins.aquila2 import FAMILY

    with pytest.raises(AquilaNpuError, match=match):
        FAMILY.chat_template().render(messages)


def test_chat_prompt_tokens_are_bosless_rendered_text(generator):
    template = generator.chat_template()
    completion = generator.generate([template.render(MESSAGES)], greedy(4), add_bos=template.add_bos)[0]
    assert completion.prompt_tokens == generator.tokenizer.tokenize(template.render(MESSAGES))
    assert completion.prompt_tokens[0] == 100000  # <|startofpiece|>, a special token of its own


# --------------------------------------------------------------------------------------------- command line
def _cli(*args, stdin=None, launcher=()):
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *launcher, "-m", "aquila_npu.generate", *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=600)


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_cli_tp2_torch_dist_greedy_matches_transformers(mg_dist_dir, tokenizer_dir, reference, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in PROMPTS), "utf-8")
    out = tmp_path / "out.jsonl"
    result = _cli("--plugin", "aquila2", "--model", "aquila2-tiny", "--load", str(mg_dist_dir),
                  "--tokenizer-name-or-path", str(tokenizer_dir), "--tensor-model-parallel-size", "2",
                  "--prompt-file", str(prompts), "--greedy", "--max-new-tokens", str(NEW_TOKENS), "--output", str(out),
                  launcher=("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    records = _read_jsonl(out)
    assert [r["prompt"] for r in records] == PROMPTS
    assert [r["tokens"] for r in records] == reference
    assert "tokens/s" in result.stderr


@pytest.mark.slow
def test_cli_hf_folder_prompts_from_stdin_with_fused_kernels(hf_dir, tokenizer_dir, reference, tmp_path):
    """Also the seed's --use-flash-attn --use-fused-rmsnorm: PyTorch's SDPA (left-padded batch, KV cache) and RMSNorm
    on the CPU generate what transformers does."""
    out = tmp_path / "out.jsonl"
    result = _cli("--load", str(hf_dir), "--load-model-type", "hf", "--tokenizer-name-or-path", str(tokenizer_dir),
                  "--greedy", "--max-new-tokens", str(NEW_TOKENS), "--output", str(out), "--use-flash-attn",
                  "--use-fused-rmsnorm", stdin="\n".join(PROMPTS))
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"attention", "rms_norm"} <= set(re.search(r"fused kernels: (.*)", result.stderr).group(1).split(", "))
    assert [r["tokens"] for r in _read_jsonl(out)] == reference
    assert not [p for p in os.listdir(tmp_path) if ".partial" in p]


@pytest.mark.slow
def test_cli_chat_interactive_and_from_a_file(hf_dir, tokenizer_dir, tmp_path):
    common = ("--load", str(hf_dir), "--load-model-type", "hf", "--tokenizer-name-or-path", str(tokenizer_dir),
              "--chat", "--greedy", "--max-new-tokens", "6")
    result = _cli(*common, stdin="Hello!\nclear\nHow are you?\nexit\nnever read\n")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("Assistant: ") == 2 and "(history cleared)" in result.stderr
    conversations = tmp_path / "chats.jsonl"
    conversations.write_text(json.dumps({"messages": MESSAGES}) + "\n" + json.dumps({"messages": MESSAGES[:1]}) + "\n")
    out = tmp_path / "replies.jsonl"
    result = _cli(*common, "--prompt-file", str(conversations), "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    records = _read_jsonl(out)
    from aquila_npu.plugins.aquila2 import FAMILY

    assert [r["prompt"] for r in records] == [FAMILY.chat_template().render(MESSAGES),
                                              FAMILY.chat_template().render(MESSAGES[:1])]
    assert all(len(r["tokens"]) <= 6 and isinstance(r["text"], str) for r in records)


@pytest.mark.parametrize("case", ["missing checkpoint", "tp not a divisor", "vocabulary too small", "bad prompt file",
                                  "bad sampling"])
def test_cli_bad_input_is_one_line(case, hf_dir, tokenizer_dir, tmp_path, tiny_spec):
    args = ["--load", str(hf_dir), "--load-model-type", "hf", "--tokenizer-name-or-path", str(tokenizer_dir),
            "--prompt", "hi"]
    expected = {"missing checkpoint": "no such checkpoint folder", "tp not a divisor": "tensor-parallel size 3",
                "vocabulary too small": "the tokenizer has 100008 ids but the model's vocabulary has 1000",
                "bad prompt file": "line 2: invalid JSON", "bad sampling": "--top-p must be in"}[case]
    if case == "missing checkpoint":
        args[1] = str(tmp_path / "nowhere")
    elif case == "tp not a divisor":
        args += ["--tensor-model-parallel-size", "3"]
    elif case == "vocabulary too small":
        args[1] = str(make_hf_checkpoint(tiny_spec.replace(vocab_size=1000), tmp_path / "small"))
    elif case == "bad prompt file":
        bad = tmp_path / "p.jsonl"
        bad.write_text('{"prompt": "ok"}\n{"prompt": \n')
        args += ["--prompt-file", str(bad)]
    else:
        args += ["--top-p", "1.5"]
    result = _cli(*args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("aquila-npu generate: error: ")
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_mixed_lengths_prefill_in_one_pass(generator, reference):
    """Left-padded batches: one prefill pass and then one step per new token, however different the prompts'
    lengths (megatron-core's own static batch would step through the longer prompts token by token)."""
    wrapper = generator.engine.controller.inference_wrapped_model
    calls = []
    original = wrapper.run_one_forward_step
    wrapper.run_one_forward_step = lambda inputs: calls.append(inputs["tokens"].shape) or original(inputs)
    try:
        completions = generator.generate(PROMPTS[:3], greedy())
    finally:
        del wrapper.run_one_forward_step
    lengths = [len(c.prompt_tokens) for c in completions]
    assert len(set(lengths)) == 3 and [c.tokens for c in completions] == reference[:3]
    assert len(calls) == NEW_TOKENS and calls[0] == (3, max(lengths)) and all(c == (3, 1) for c in calls[1:])


def test_padding_mask_hides_padding_keys_only():
    from aquila_npu.generate.batching import padding_mask

    mask = padding_mask([2, 0], 4, "cpu")
    assert mask.shape == (2, 1, 4, 4)
    allowed = ~mask[:, 0]
    assert allowed[1].tolist() == torch.ones(4, 4, dtype=torch.bool).tril().tolist()  # no padding: causal
    # row 0: positions 0-1 are padding; real queries see real keys only, a padding query only itself
    assert allowed[0].tolist() == [[True, False, False, False], [False, True, False, False],
                                   [False, False, True, False], [False, False, True, True]]


def test_a_decode_step_rotates_only_its_own_new_keys(generator, reference, monkeypatch):
    """Keys enter the KV cache rotated (aquila_npu.kv_cache): after the prefill, every rotary application of a
    decode step is over one position (its query and its new key), however long the cache has grown — megatron-core
    alone re-rotates the whole cache at every step — and the angles' cos/sin are taken once for the whole generation,
    not per layer and step. Nothing is left for megatron-core's own RoPE. The completion still equals
    transformers'."""
    from megatron.core.transformer import attention

    from aquila_npu import kv_cache

    rotated, cosines, megatron_rotations = [], [], []
    original_rotate, original_cosines = kv_cache.rotate, kv_cache.RotatedKeyCacheSelfAttention._cosines

    def recording_rotate(t, cos, sin):
        rotated.append(t.shape[0])
        return original_rotate(t, cos, sin)

    def recording_cosines(self, *args):
        cosines.append(original_cosines(self, *args))
        return cosines[-1]

    monkeypatch.setattr(kv_cache, "rotate", recording_rotate)
    monkeypatch.setattr(kv_cache.RotatedKeyCacheSelfAttention, "_cosines", recording_cosines)
    monkeypatch.setattr(attention, "apply_rotary_pos_emb", lambda *a, **k: megatron_rotations.append(1))
    prompt_length = len(generator.encode(PROMPTS[0]))
    result = generator.generate([PROMPTS[0]], greedy())[0]
    assert result.tokens == reference[0]
    layers = 2 * generator.spec.num_layers  # a query and a key per layer
    assert rotated[:layers] == [prompt_length] * layers
    assert set(rotated[layers:]) == {1} and len(rotated[layers:]) == layers * (len(result.tokens) - 1)
    assert len({id(cos) for cos, _ in cosines}) == 1 and len(cosines) == len(rotated) // 2
    assert not megatron_rotations


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, rotary_dim", [(1, 32), (3, 32), (3, 16)])
def test_rotation_with_cosines_taken_once_equals_megatron_cores_bit_for_bit(dtype, rows, rotary_dim):
    """``kv_cache.rotate`` with the cos/sin of the whole angle table, sliced to the step's positions, against
    megatron-core's ``apply_rotary_pos_emb`` of the step's slice of the angles (which takes cos/sin itself): equal
    bit for bit, for one shared table and a per-row table (left-padded batches), and for a rotary dimension smaller
    than the head (the rest passes through)."""
    import types

    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    from aquila_npu import kv_cache

    config = types.SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=False, multi_latent_attention=False)
    generator = torch.Generator().manual_seed(rows * rotary_dim)
    inverse = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    positions = torch.arange(40).float()[:, None, None] - torch.arange(rows).float()[None, :, None]  # per-row offsets
    angles = torch.outer(positions.reshape(-1), inverse).reshape(40, rows, 1, -1)
    table = torch.cat((angles, angles), dim=-1)  # [s, rows, 1, rotary_dim], megatron-core's layout
    cos, sin = torch.cos(table).to(dtype), torch.sin(table).to(dtype)
    for start, length in ((0, 17), (17, 1), (39, 1)):
        t = torch.randn(length, rows, 4, 32, generator=generator).to(dtype)
        step = slice(start, start + length)
        ours = kv_cache.rotate(t, cos[step], sin[step])
        theirs = apply_rotary_pos_emb(t, table[step], config=config, cp_group=object())
        assert ours.dtype == theirs.dtype == dtype
        assert torch.equal(ours, theirs)


def test_cpu_inference_stores_linear_weights_column_major_with_the_same_values(generator, hf_dir, monkeypatch):
    """The cpu plugin's ``aquila_npu_prepare_inference_model``: every fp32 tensor-parallel linear weight but the
    output layer's is stored column-major (``[in, out]`` rows: MKL's fast operand for few-row products); the output
    layer keeps its row-major weight beside a column-major copy and picks by row count; the embedding stays
    row-major; values are the checkpoint's bit for bit, and the output layer's product equals ``x @ W.t()`` at any
    row count (the greedy tests above run on this layout and equal transformers)."""
    from megatron.core.tensor_parallel import layers
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from safetensors.torch import load_file

    model = generator.model
    gpt = next(m for m in model.modules() if hasattr(m, "output_layer"))
    linears = [m for m in model.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))
               and m is not gpt.output_layer]
    assert len(linears) == 4 * generator.spec.num_layers
    assert all(m.weight.stride(0) == 1 and m.weight.stride(1) >= m.weight.shape[0] for m in linears)
    assert all(not m.weight.is_contiguous() for m in linears)
    assert gpt.embedding.word_embeddings.weight.is_contiguous()
    assert gpt.output_layer.weight.is_contiguous() and "_forward_impl" in vars(gpt.output_layer)
    assert not any(p.requires_grad for p in model.parameters())  # frozen: megatron-core's frozen-weight products
    hf = {}
    for shard in sorted(hf_dir.glob("*.safetensors")):
        hf.update(load_file(shard))
    assert torch.equal(gpt.output_layer.weight, hf["lm_head.weight"])
    for index, layer in enumerate(gpt.decoder.layers):
        assert torch.equal(layer.mlp.linear_fc2.weight, hf[f"model.layers.{index}.mlp.down_proj.weight"])
        assert torch.equal(layer.self_attention.linear_proj.weight, hf[f"model.layers.{index}.self_attn.o_proj.weight"])
    weight = hf["lm_head.weight"].float()
    megatron_products = []
    for name in ("linear_with_frozen_weight", "linear_with_grad_accumulation_and_async_allreduce"):
        original = getattr(layers, name)
        monkeypatch.setattr(layers, name, lambda *args, _original=original, **kwargs: (
            megatron_products.append(1), _original(*args, **kwargs))[1])
    torch.manual_seed(0)
    with torch.inference_mode():
        for sequence, batch in ((1, 1), (1, 2), (1, 8), (5, 3)):
            hidden = torch.randn(sequence, batch, weight.shape[1])
            logits, _ = gpt.output_layer(hidden)
            torch.testing.assert_close(logits, hidden @ weight.t(), rtol=1e-5, atol=1e-5)
    assert not megatron_products  # the output layer's own product served every row count
