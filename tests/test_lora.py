"""LoRA over megatron-core's parallel linears (``aquila_npu.lora``): a new adapter changes nothing, a trained one
adds exactly its low-rank update, only the adapters train, and tensor parallelism (with and without sequence
parallelism) computes what one process computes."""

from __future__ import annotations


import pytest
import torch
from conftest import BUNDLED_DATA, run_python

TOKENIZER = BUNDLED_DATA / "aquila2_tokenizer"


def _model(spec, options=None, seed=0):
    from aquila_npu import lora
    from aquila_npu.model import build_gpt_model

    torch.manual_seed(seed)
    model = build_gpt_model(spec, parallel_output=False, params_dtype=torch.float32)
    if options is not None:
        lora.apply_lora(model, options, seed=7)
    return model


def _logits(model, spec):
    tokens = torch.randint(0, spec.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(12)[None].expand(2, 12)
    return model(tokens, positions, None)


def test_new_adapters_leave_the_logits_unchanged(megatron_world, tiny_spec):
    from aquila_npu import lora

    base, adapted = _model(tiny_spec), _model(tiny_spec, lora.LoraOptions(rank=4, alpha=8))
    names = {n for n, _ in adapted.named_parameters()}
    assert {n for n, _ in base.named_parameters()} == {n for n in names if not lora.is_adapter_key(n)}
    assert len(names) - len(dict(base.named_parameters())) == 2 * 4 * tiny_spec.num_layers  # A and B, 4 targets
    with torch.no_grad():
        assert torch.equal(_logits(adapted, tiny_spec), _logits(base, tiny_spec))
    assert all(p.requires_grad == lora.is_adapter_key(n) for n, p in adapted.named_parameters())


def test_adapted_logits_equal_the_base_with_the_update_folded_in(megatron_world, tiny_spec):
    """With trained (random) factors the model computes W x + (alpha / r) B A x at every target: the same logits as
    the base model whose target weights the test replaces by W + (alpha / r) B @ A."""
    from aquila_npu import lora

    options = lora.LoraOptions(rank=4, alpha=16, targets=("linear_qkv", "linear_fc2", "linear_fc1", "linear_proj"))
    adapted, merged = _model(tiny_spec, options), _model(tiny_spec)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, module in adapted.named_modules():
            if isinstance(module, lora.LoraLinear):
                module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=generator) * 0.05)
                target = merged.get_submodule(name)
                update = module.lora_B.weight.double() @ module.lora_A.weight.double() * 16 / 4
                target.weight.copy_((target.weight.double() + update).float())
        ours, expected = _logits(adapted, tiny_spec), _logits(merged, tiny_spec)
    assert (ours - _logits(_model(tiny_spec), tiny_spec).detach()).abs().max() > 1e-2  # the update matters
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("distributed", [False, True])
def test_only_the_adapters_have_gradients_buffers_and_optimizer_state(megatron_world, tiny_spec, distributed):
    """megatron-core's DDP and optimizer over a LoRA model: the gradient buffers, the optimizer's parameters and,
    after a step, its state hold the adapters and nothing else; the base weights do not move."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from aquila_npu import lora

    model = _model(tiny_spec, lora.LoraOptions(rank=4, alpha=8))
    adapters = {n: p for n, p in model.named_parameters() if lora.is_adapter_key(n)}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not lora.is_adapter_key(n)}
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(
        use_distributed_optimizer=distributed), model)
    # no clipping: in a test process megatron-core's optimizer module may have been imported before the cpu plugin's
    # patch of its clipping function (the driver applies patches before any such import)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=distributed,
                                                       bf16=False, clip_grad=0.0), [ddp])
    adapter_elements = sum(p.numel() for p in adapters.values())
    assert sum(b.numel_unpadded for b in ddp.buffers) == adapter_elements
    in_optimizer = [p for g in optimizer.optimizer.param_groups for p in g["params"]]
    assert sum(p.numel() for p in in_optimizer) == adapter_elements
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    _logits(ddp, tiny_spec).float().logsumexp(-1).sum().backward()
    ddp.finish_grad_sync()
    assert optimizer.step()[0]
    state = optimizer.optimizer.state
    assert sum(s["exp_avg"].numel() for s in state.values()) == adapter_elements
    for name, before in frozen.items():
        assert torch.equal(dict(model.named_parameters())[name], before), name
    assert any(p.abs().sum() > 0 for n, p in adapters.items() if "lora_B" in n)  # B left zero


def test_bad_lora_options_are_one_line():
    from aquila_npu import lora
    from aquila_npu.errors import AquilaNpuError

    with pytest.raises(AquilaNpuError, match=r"^--lora-target-modules q_proj: choose among linear_qkv"):
        lora.LoraOptions(rank=8, alpha=16, targets=("q_proj",))
    with pytest.raises(AquilaNpuError, match=r"^--lora-r 0: "):
        lora.LoraOptions(rank=0, alpha=16)


# ------------------------------------------------------------------ the driver, across parallel layouts
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_hf_dir):
    from aquila_npu.preprocess import PreprocessOptions, preprocess

    root = tmp_path_factory.mktemp("lora")
    preprocess(PreprocessOptions(input=str(BUNDLED_DATA / "alpaca" / "alpaca_300.parquet"), tokenizer=str(TOKENIZER),
                                 output_prefix=str(root / "alpaca"), handler="GeneralInstructionHandler",
                                 append_eod=True, progress=False))
    start = root / "start"  # torch_dist: loads at any tensor-parallel size
    run_python("-m", "aquila_npu.convert", "--load-dir", str(tiny_hf_dir), "--save-dir", str(start), "--ckpt-format",
               "torch_dist", "--no-progress", check=True)
    flags = ["--model", "aquila2-tiny", "--tokenizer-name-or-path", str(TOKENIZER), "--micro-batch-size", "2",
             "--global-batch-size", "4", "--seq-length", "128", "--optimizer", "sgd", "--lr", "1",
             "--split", "100,0,0", "--log-interval", "1", "--seed", "1", "--eval-iters", "0", "--data-path",
             str(root / "alpaca"), "--is-instruction-dataset", "--train-iters", "5", "--load", str(start),
             "--finetune", "--lora-r", "8", "--lora-alpha", "16", "--ckpt-format", "torch", "--save-interval", "5"]
    return flags, root


def _train(flags, nproc):
    """(losses in iteration order, output) of a driver run (test_training's runner)."""
    from test_training import train

    losses, output = train(*flags, nproc=nproc)
    return [losses[i] for i in sorted(losses)], output


def _adapters_tp1_layout(save, tp, spec):
    """The adapter factors of a torch-format save, TP slices joined into the TP=1 layout (linear_fc1's B rows are
    [gate; up] within each rank, as its weight's)."""
    from aquila_npu.unpickling import load_weights_only

    ranks = [load_weights_only(str(save / "iter_0000005" / f"mp_rank_{r:02d}" / "model_optim_rng.pt"))["model"]
             for r in range(tp)]
    joined = {}
    for key in ranks[0]:
        if ".lora_" not in key:
            continue
        parts = [r[key] for r in ranks]
        column = any(t in key for t in ("linear_qkv", "linear_fc1"))
        if column and "lora_B" in key:
            if "linear_fc1" in key:
                halves = [p.chunk(2) for p in parts]
                joined[key] = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
            else:
                joined[key] = torch.cat(parts)
        elif not column and "lora_A" in key:
            joined[key] = torch.cat(parts, dim=1)
        else:
            assert all(torch.equal(p, parts[0]) for p in parts), key  # replicated factors agree
            joined[key] = parts[0]
    return joined


@pytest.mark.slow
def test_tensor_and_sequence_parallel_lora_follow_one_process(lora_run, tiny_spec):
    """Five SGD steps (learning rate 1, gradient clipping on): TP=2, and TP=2 with sequence parallelism, give one
    process's losses (1e-5) and its adapter factors (1e-5), every replicated factor equal on both ranks."""
    flags, root = lora_run
    reference, output = _train([*flags, "--save", str(root / "tp1")], 1)
    assert "LoRA r=8 alpha=16 on linear_qkv linear_proj linear_fc1 linear_fc2" in output and len(reference) == 5
    expected = _adapters_tp1_layout(root / "tp1", 1, tiny_spec)
    for name, extra in (("tp2", []), ("tp2-sp", ["--sequence-parallel"])):
        losses, _ = _train([*flags, "--tensor-model-parallel-size", "2", *extra, "--save", str(root / name)], 2)
        assert losses == pytest.approx(reference, rel=1e-5), name
        adapters = _adapters_tp1_layout(root / name, 2, tiny_spec)
        assert adapters.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(adapters[key], expected[key], atol=1e-5, rtol=1e-5, msg=f"{name} {key}")
    assert any(t.abs().max() > 0 for k, t in expected.items() if "lora_B" in k)
