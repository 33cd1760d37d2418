"""Packed instruction data (``--pack``; training with ``--reset-position-ids --reset-attention-mask``): what the
preprocessing writes, what a packed sample holds, that no token attends across documents in any kernel, and that
packed training equals unpacked training, loss and gradients, at TP=1 and TP=2."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from conftest import BUNDLED_DATA, run_python

TOKENIZER = BUNDLED_DATA / "aquila2_tokenizer"
ALPACA = BUNDLED_DATA / "alpaca" / "alpaca_300.parquet"
CONVERSATIONS = BUNDLED_DATA / "conversations" / "alpaca_chat_200.jsonl"


def _preprocess(prefix, pack: bool, seq_length: int = 256, source=ALPACA, **options):
    from aquila_npu.preprocess import PreprocessOptions, preprocess

    alpaca = str(source).endswith(".parquet")
    handler = "GeneralInstructionHandler" if alpaca else "SharegptStyleInstructionHandler"
    return preprocess(PreprocessOptions(input=str(source), tokenizer=str(TOKENIZER), output_prefix=str(prefix),
                                        handler=handler, append_eod=alpaca, seq_length=seq_length,
                                        pack=pack, progress=False, **options))


def _records(prefix, key):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(f"{prefix}_packed_{key}_document")
    return [np.array(dataset[i]) for i in range(len(dataset))]


# ------------------------------------------------------------------ preprocessing
def test_best_fit_decreasing_keeps_every_sample_once_within_capacity():
    from aquila_npu.preprocess.packing import best_fit_decreasing

    lengths = np.random.RandomState(0).randint(1, 300, size=500)
    bins = best_fit_decreasing(lengths, 1024)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(lengths[b].sum() <= 1024 for b in bins) and all(b == sorted(b) for b in bins)
    assert len(bins) <= int(np.ceil(lengths.sum() / 1024)) + 1  # within one sequence of the lower bound
    assert best_fit_decreasing(np.array([5, 4, 3, 3, 1]), 8) == [[0, 2], [1, 3, 4]]  # 5+3, 4+3+1


@pytest.mark.parametrize("source", ["alpaca", "conversations"])
def test_packed_datasets_hold_the_unpacked_samples_whole_and_numbered(tmp_path, source):
    """Read back with megatron-core's IndexedDataset: each packed sequence is whole unpacked samples back to back
    (input ids and labels alike), numbered 1, 2, ... in attention_mask, at most seq_length + 1 tokens; together
    they are exactly the unpacked samples."""
    path = ALPACA if source == "alpaca" else CONVERSATIONS
    options = {} if path == ALPACA else {"prompt_type": "aquila-v1"}
    unpacked = _preprocess(tmp_path / "u", False, 256, path, **options)
    packed = _preprocess(tmp_path / "p", True, 256, path, **options)
    assert packed.packed == unpacked.samples and packed.samples < 0.7 * unpacked.samples
    assert packed.tokens == unpacked.tokens and packed.too_long == unpacked.too_long
    assert f"{unpacked.samples:,} samples packed into {packed.samples:,} sequences" in packed.summary()
    samples = {(tuple(i), tuple(l)) for i, l in zip(_records(tmp_path / "u", "input_ids"),
                                                    _records(tmp_path / "u", "labels"))}
    assert all(set(m.tolist()) == {1} for m in _records(tmp_path / "u", "attention_mask"))
    found = []
    for ids, labels, numbers in zip(*(_records(tmp_path / "p", k) for k in ("input_ids", "labels",
                                                                              "attention_mask"))):
        assert len(ids) <= 257 and numbers[0] == 1 and np.all(np.diff(numbers) >= 0)
        assert np.all(np.diff(numbers) <= 1)
        for n in range(1, numbers.max() + 1):
            found.append((tuple(ids[numbers == n]), tuple(labels[numbers == n])))
    assert len(found) == len(samples) and set(found) == samples


def test_pack_is_refused_where_it_cannot_apply(tmp_path):
    from aquila_npu.errors import AquilaNpuError
    from aquila_npu.preprocess import PreprocessOptions, preprocess

    with pytest.raises(AquilaNpuError, match=r"^--pack: give --seq-length"):
        _preprocess(tmp_path / "a", True, None)
    with pytest.raises(AquilaNpuError, match=r"^--pack: packs instruction and conversation samples, not "
                                             r"GeneralPretrainHandler"):
        preprocess(PreprocessOptions(input=str(ALPACA), tokenizer=str(TOKENIZER), output_prefix=str(tmp_path / "b"),
                                     seq_length=64, pack=True, progress=False))


# ------------------------------------------------------------------ a packed training sample
@pytest.fixture(scope="module")
def alpaca_256(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing")
    _preprocess(root / "u", False, 256)
    _preprocess(root / "p", True, 256)
    return {"unpacked": str(root / "u"), "packed": str(root / "p")}


def test_a_packed_sample_trains_each_document_as_it_would_alone(alpaca_256):
    """Per document of a packed sample: its inputs, targets and loss mask are those of the same record unpacked
    (bar its last token, whose next token is another document's), its positions restart at 0, cu_seqlens bound
    each document and then the padding."""
    from aquila_npu.training.data import InstructionDataset

    seq = 256
    unpacked_ids = {tuple(ids): i for i, ids in enumerate(_records(alpaca_256["unpacked"], "input_ids"))}
    numbers = _records(alpaca_256["packed"], "attention_mask")
    ids = _records(alpaca_256["packed"], "input_ids")
    packed = InstructionDataset(alpaca_256["packed"], np.arange(len(ids)), len(ids), seq, seed=1, pad=0,
                                packed=True)
    alone = InstructionDataset(alpaca_256["unpacked"], np.arange(len(unpacked_ids)), len(unpacked_ids), seq, seed=1,
                               pad=0)
    checked = 0
    for index in range(20):
        record = int(packed.order[index])
        sample = packed[index]
        cu = sample["cu_seqlens"].tolist()
        inputs = len(ids[record]) - 1
        assert sample["cu_seqlens"].dtype == torch.int32 and cu[0] == 0 and cu[-1] == seq
        assert cu[-2] == inputs or inputs == seq
        for doc, (start, end) in enumerate(zip(cu[:-1], cu[1:]), start=1):
            assert sample["position_ids"][start:end].tolist() == list(range(end - start))
            if start >= inputs:  # the padding: no loss
                assert not sample["loss_mask"][start:].any()
                continue
            document = ids[record][numbers[record] == doc]
            reference = alone[int(np.flatnonzero(alone.order == unpacked_ids[tuple(document)])[0])]
            length = len(document)
            n = length - 1  # the document's own predictions, as unpacked
            assert end - start == (length - 1 if end == inputs else length)
            assert sample["tokens"][start:start + n].tolist() == reference["tokens"][:n].tolist()
            assert sample["loss_mask"][start:start + n].tolist() == reference["loss_mask"][:n].tolist()
            masked = reference["loss_mask"][:n].bool()
            assert sample["labels"][start:start + n][masked].tolist() == reference["labels"][:n][masked].tolist()
            if end - start == length:  # its last token is an input whose next token is another document's
                assert sample["tokens"][end - 1] == document[-1] and sample["loss_mask"][end - 1] == 0
            checked += 1
    assert checked > 40


# ------------------------------------------------------------------ kernels: documents stay apart
def _documents(lengths, heads=4, groups=2, d=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    q = torch.randn(t, heads, d, generator=generator)
    k, v = (torch.randn(t, groups, d, generator=generator) for _ in range(2))
    return q, k, v, torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)


LENGTHS = [5, 1, 9, 3]


def test_the_reference_attends_within_each_document_causally():
    """Independent: each document through torch's causal scaled_dot_product_attention alone."""
    from aquila_npu.kernels import reference

    q, k, v, cu = _documents(LENGTHS)
    out = reference.packed_attention(q, k, v, 0.25, cu, cu)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qh, kh, vh = (x[start:end].permute(1, 0, 2) for x in (q, k, v))
        kh, vh = (x.repeat_interleave(2, dim=0) for x in (kh, vh))
        expected = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=0.25)
        torch.testing.assert_close(out[start:end], expected.permute(1, 0, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_and_megatron_core_packed_attention_match_the_reference(dtype):
    from kernel_checks import same_forward_backward
    from megatron.core.packed_seq_params import PackedSeqParams

    from aquila_npu.kernels import pytorch, reference

    q, k, v, cu = _documents(LENGTHS, seed=1)
    same_forward_backward(lambda q, k, v: pytorch.packed_attention(q, k, v, 0.25, cu, cu),
                          lambda q, k, v: reference.packed_attention(q, k, v, 0.25, cu, cu), [q, k, v], dtype)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=9, max_seqlen_kv=9)
    module = pytorch.SdpaAttention.__new__(pytorch.SdpaAttention)
    torch.nn.Module.__init__(module)
    module.scale = 0.25
    out = module(q, k, v, None, packed_seq_params=params)
    assert out.shape == (sum(LENGTHS), 4 * 16)
    torch.testing.assert_close(out, reference.packed_attention(q, k, v, 0.25, cu, cu).reshape(out.shape))


def test_flash_attn_varlen_contract(monkeypatch):
    """Contract test (flash-attn needs a GPU): half-precision packed documents go to flash_attn_varlen_func (the
    stand-in asserts its documented conventions) and equal the reference; fp32 stays on SDPA."""
    import sys

    import stand_in_flash_attn
    from kernel_checks import same_forward_backward

    from aquila_npu.kernels import flash, reference

    monkeypatch.setitem(sys.modules, "flash_attn", stand_in_flash_attn)
    stand_in_flash_attn.calls.clear()
    q, k, v, cu = _documents(LENGTHS, seed=2)
    same_forward_backward(lambda q, k, v: flash.packed_attention(q, k, v, 0.25, cu, cu, 9, 9),
                          lambda q, k, v: reference.packed_attention(q, k, v, 0.25, cu, cu), [q, k, v], torch.bfloat16)
    assert stand_in_flash_attn.calls == ["flash_attn_varlen_func"]
    flash.packed_attention(q, k, v, 0.25, cu, cu)
    assert stand_in_flash_attn.calls == ["flash_attn_varlen_func"]


def _packed_logits(model, documents, vocab):
    from aquila_npu.training.data import packed_seq_params

    tokens = torch.tensor(np.concatenate(documents))[None]
    cu = torch.tensor(np.concatenate([[0], np.cumsum([len(d) for d in documents])]), dtype=torch.int32)
    positions = torch.cat([torch.arange(len(d)) for d in documents])[None]
    with torch.no_grad():
        return model(tokens, positions, None, packed_seq_params=packed_seq_params(cu))[0, :, :vocab]


@pytest.mark.parametrize("attention", ["reference", "sdpa"])
def test_a_token_cannot_see_another_document(megatron_world, tiny_spec, attention):
    """aquila2-tiny on a packed sequence [A, B, C]: B's logits equal B's alone (positions restart, nothing of A
    reaches it), and changing A's tokens leaves B's and C's logits exactly as they were."""
    from aquila_npu import plugin_manager
    from aquila_npu.model import build_gpt_model, full_vocab_logits

    torch.manual_seed(3)
    kernels = plugin_manager.get().kernels("cpu", {"attention": attention == "sdpa"})
    model = build_gpt_model(tiny_spec, kernels=kernels, parallel_output=False).eval()
    rng = np.random.RandomState(4)
    a, b, c = (rng.randint(0, tiny_spec.vocab_size, size=n) for n in (7, 11, 4))
    vocab = tiny_spec.vocab_size
    packed = _packed_logits(model, [a, b, c], vocab)
    for document, start in ((a, 0), (b, 7), (c, 18)):
        alone = full_vocab_logits(model, torch.tensor(document)[None], vocab)[0]
        torch.testing.assert_close(packed[start:start + len(document)], alone, atol=1e-5, rtol=1e-5)
    changed = _packed_logits(model, [rng.randint(0, vocab, size=7), b, c], vocab)
    assert not torch.equal(changed[:7], packed[:7])
    assert torch.equal(changed[7:], packed[7:])


# ------------------------------------------------------------------ training: packed == unpacked
def _train(flags, nproc):
    """(losses in iteration order, output) of a driver run (test_training's runner)."""
    from test_training import train

    losses, output = train(*flags, nproc=nproc)
    return [losses[i] for i in sorted(losses)], output


@pytest.fixture(scope="module")
def some_samples(tmp_path_factory):
    """Alpaca records (the first 10 less any too long), unpacked and packed at --seq-length 256."""
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("some")
    pq.write_table(pq.read_table(ALPACA).slice(0, 10), root / "some.parquet")
    out = {}
    for name, pack in (("unpacked", False), ("packed", True)):
        result = _preprocess(root / name, pack, 256, source=root / "some.parquet")
        out[name], out[f"{name}_samples"] = str(root / name), result.samples
    assert 8 <= out["unpacked_samples"] <= 10 and out["packed_samples"] <= out["unpacked_samples"] / 2
    return out


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_packed_training_equals_unpacked_loss_and_gradients(tmp_path, some_samples, tiny_hf_dir, tp):
    """One SGD step from the same weights over the same samples, as padded rows in one micro-batch
    or packed into fewer sequences one a micro-batch: the same loss (1e-5) and the same weight update, i.e. the same
    gradient of every weight (read back from both checkpoints through the converter's reader)."""
    from conftest import convert_to_megatron

    from aquila_npu.convert import open_megatron
    from aquila_npu.convert.hf_format import load_state

    start = convert_to_megatron(tiny_hf_dir, tmp_path / "start", tensor_parallel=tp)
    common = ["--model", "aquila2-tiny", "--tokenizer-name-or-path", str(TOKENIZER), "--seq-length", "256",
              "--tensor-model-parallel-size", str(tp), "--optimizer", "sgd", "--lr", "1.0", "--weight-decay", "0",
              "--clip-grad", "0", "--lr-decay-style", "constant", "--train-iters", "1", "--split", "100,0,0",
              "--log-interval", "1", "--eval-iters", "0", "--seed", "5", "--is-instruction-dataset", "--load",
              str(start), "--finetune", "--ckpt-format", "torch"]
    packed, unpacked = some_samples["packed_samples"], str(some_samples["unpacked_samples"])
    losses = {
        "unpacked": _train([*common, "--data-path", some_samples["unpacked"], "--micro-batch-size", unpacked,
                            "--global-batch-size", unpacked, "--save", str(tmp_path / "unpacked")], tp)[0],
        "packed": _train([*common, "--data-path", some_samples["packed"], "--micro-batch-size", "1",
                          "--global-batch-size", str(packed), "--reset-position-ids", "--reset-attention-mask",
                          "--save", str(tmp_path / "packed")], tp)[0]}
    assert len(losses["packed"]) == len(losses["unpacked"]) == 1
    assert losses["packed"][0] == pytest.approx(losses["unpacked"][0], rel=1e-5)
    initial = load_state(str(tiny_hf_dir))
    after = {name: open_megatron(str(tmp_path / name)) for name in ("unpacked", "packed")}
    moved = 0
    for key, before in initial.items():
        step = {name: ckpt.tensor(key).float() - before.float() for name, ckpt in after.items()}
        torch.testing.assert_close(step["packed"], step["unpacked"], atol=1e-6, rtol=1e-4)
        moved += bool(step["packed"].abs().max() > 0)
    assert moved == len(initial)


@pytest.mark.parametrize("case", ["no flags", "micro-batch", "shorter seq-length"])
def test_packed_data_without_its_flags_is_one_line_and_exit_2(alpaca_256, case):
    flags = ["--model", "aquila2-tiny", "--tokenizer-name-or-path", str(TOKENIZER), "--data-path",
             alpaca_256["packed"], "--is-instruction-dataset", "--train-iters", "1", "--eval-iters", "0",
             "--lr", "1e-4", "--seq-length", "256", "--micro-batch-size", "1"]
    expected = ("add --reset-position-ids --reset-attention-mask (positions restart at each document; no token attends "
                "to another document)")
    if case != "no flags":
        flags += ["--reset-position-ids", "--reset-attention-mask"]
    if case == "micro-batch":
        flags[flags.index("--micro-batch-size") + 1] = "2"
        expected = "--micro-batch-size 2: packed sequences train one a micro-batch"
    if case == "shorter seq-length":
        flags[flags.index("256")] = "128"
        expected = "--seq-length 128: "
    result = run_python("-m", "aquila_npu.pretrain", *flags, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and expected in lines[0], result.stderr[-3000:]
