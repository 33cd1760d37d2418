"""LoRA over megatron-core's parallel linears (``aquila_npu.lora``): a new adapter changes nothing, a trained one
adds exactly its low-rank update, only the adapters train, and tensor parallelism (with and without sequence
parallelism) computes what one process computes."""

from __future__ import annotations


import pytest
import torch
from conftest import BUNDLED_DATA, make_hf_checkpoint, run_python

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
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=distributed,
                                                       bf16=False, clip_grad=1.0), [ddp])
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


def _adapters_tp1_layout(save, tp, spec, iteration=5):
    """The adapter factors of a torch-format save, TP slices joined into the TP=1 layout (linear_fc1's B rows are
    [gate; up] within each rank, as its weight's)."""
    from aquila_npu.unpickling import load_weights_only

    ranks = [load_weights_only(str(save / f"iter_{iteration:07d}" / f"mp_rank_{r:02d}" / "model_optim_rng.pt"))["model"]
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


ADAM = ["--optimizer", "adam", "--lr", "1e-2"]  # megatron-core's distributed optimizer takes Adam only


@pytest.fixture(scope="module")
def trained(lora_run):
    """Adapter checkpoints of five steps at TP=1, TP=2, TP=2 with sequence parallelism, and two data-parallel
    ranks with the plain and the distributed optimizer: {name: (losses, save, output)}."""
    flags, root = lora_run
    runs = {}
    for name, nproc, extra in (("tp1", 1, []), ("tp2", 2, ["--tensor-model-parallel-size", "2"]),
                               ("tp2-sp", 2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
                               ("dp2", 2, ADAM), ("dp2-distributed", 2, [*ADAM, "--use-distributed-optimizer"])):
        losses, output = _train([*flags, *extra, "--save", str(root / name)], nproc)
        runs[name] = (losses, root / name, output)
    return runs


@pytest.mark.slow
def test_tensor_and_sequence_parallel_lora_follow_one_process(trained, tiny_spec):
    """Five SGD steps (learning rate 1, gradient clipping on): TP=2, and TP=2 with sequence parallelism, give one
    process's losses (1e-5) and its adapter factors (1e-5), every replicated factor equal on both ranks."""
    reference, save, output = trained["tp1"]
    assert "LoRA r=8 alpha=16 on linear_qkv linear_proj linear_fc1 linear_fc2" in output and len(reference) == 5
    expected = _adapters_tp1_layout(save, 1, tiny_spec)
    for name in ("tp2", "tp2-sp"):
        losses, save, _ = trained[name]
        assert losses == pytest.approx(reference, rel=1e-5), name
        adapters = _adapters_tp1_layout(save, 2, tiny_spec)
        assert adapters.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(adapters[key], expected[key], atol=1e-5, rtol=1e-5, msg=f"{name} {key}")
    assert any(t.abs().max() > 0 for k, t in expected.items() if "lora_B" in k)


@pytest.mark.slow
def test_the_distributed_optimizer_trains_the_adapters_as_the_plain_one(trained, tiny_spec):
    """Two data-parallel ranks, Adam: megatron-core's distributed optimizer (the adapters' state sharded over them)
    and the plain one give the same losses and adapters (1e-5)."""
    plain, save, _ = trained["dp2"]
    distributed, distributed_save, _ = trained["dp2-distributed"]
    assert distributed == pytest.approx(plain, rel=1e-5) and len(plain) == 5
    ours, theirs = (_adapters_tp1_layout(s, 1, tiny_spec) for s in (distributed_save, save))
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=1e-5, msg=key)
    assert (distributed_save / "iter_0000005" / "mp_rank_00" / "distrib_optim.pt").is_file()


@pytest.mark.slow
def test_adapter_checkpoints_hold_the_adapters_only(trained):
    from aquila_npu.unpickling import load_weights_only

    for rank in range(2):
        state = load_weights_only(str(trained["tp2"][1] / "iter_0000005" / f"mp_rank_{rank:02d}" /
                                      "model_optim_rng.pt"))
        assert state["model"] and all(".lora_" in key for key in state["model"])
        assert state["args"].lora_r == 8 and state["args"].lora_alpha == 16
        assert "optimizer" in state and "opt_param_scheduler" in state


def _megatron_reference(spec, base, adapters):
    """Logits of the model with LoraLinear adapters (the training modules), base and adapters loaded through the
    driver's checkpoint loader: what the exports must reproduce."""
    from aquila_npu import lora
    from aquila_npu.training import checkpointing

    model = _model(spec, lora.LoraOptions(rank=8, alpha=16), seed=0)
    checkpointing.load(str(base), [model], None, None, False, False, part="base")
    checkpointing.load(str(adapters), [model], None, None, False, False, part="adapters", flag="--lora-load")
    assert any(m.lora_B.weight.abs().max() > 0 for m in model.modules() if isinstance(m, lora.LoraLinear))
    with torch.no_grad():
        return model, _logits(model, spec)[..., :spec.vocab_size]


@pytest.mark.slow
def test_merged_and_peft_exports_give_the_megatron_models_logits(trained, lora_run, tiny_hf_dir, megatron_world,
                                                                  tiny_spec, tmp_path):
    """Adapters trained at TP=2 (per-rank files), exported merged into an HF checkpoint and as a PEFT folder
    loaded by peft onto the HF base: the logits of the TP=1 Megatron model with its adapters (1e-4, fp32)."""
    peft = pytest.importorskip("peft")
    import transformers

    _, root = lora_run
    _, reference = _megatron_reference(tiny_spec, root / "start", trained["tp1"][1])
    adapters = str(trained["tp2"][1])
    run_python("-m", "aquila_npu.convert", "--load-dir", str(root / "start"), "--load-model-type", "mg",
               "--lora-load", adapters, "--save-model-type", "hf", "--save-dir", str(tmp_path / "merged"),
               "--no-progress", check=True)
    run_python("-m", "aquila_npu.convert", "--load-dir", str(tiny_hf_dir), "--lora-load", adapters,
               "--save-model-type", "peft", "--save-dir", str(tmp_path / "peft"), "--no-progress", check=True)
    tokens = torch.randint(0, tiny_spec.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
        base = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)
        plain = base(tokens).logits
        adapted = peft.PeftModel.from_pretrained(base, tmp_path / "peft")
        for name, logits in (("merged", merged(tokens).logits), ("peft", adapted(tokens).logits)):
            torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4, msg=name)
    assert (plain - reference).abs().max() > 1e-2  # the adapters matter
    config = __import__("json").loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["peft_type"] == "LORA"


@pytest.mark.slow
def test_generation_and_evaluation_load_adapters_merged(trained, lora_run, megatron_world, tiny_spec):
    """``--lora-load`` in generation and evaluation (inference.load_model): a torch_dist base with adapters saved at
    TP=2 gives the adapted training model's logits."""
    from aquila_npu.inference import load_model

    _, root = lora_run
    _, reference = _megatron_reference(tiny_spec, root / "start", trained["tp1"][1])
    loaded = load_model(str(root / "start"), "mg", tiny_spec, "fp32", lora_load=str(trained["tp2"][1]))
    with torch.no_grad():
        torch.testing.assert_close(_logits(loaded.model, tiny_spec)[..., :tiny_spec.vocab_size], reference,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_resuming_from_an_adapter_checkpoint_reproduces_the_uninterrupted_run(lora_run, tmp_path, fmt):
    """Six Adam steps in one run, and three + three through an adapter-only checkpoint (--lora-load, the base again
    from --load): the same losses and the same final adapters."""
    flags, _ = lora_run
    flags = [f for f in flags if f not in ("--finetune",)]
    flags[flags.index("--optimizer") + 1], flags[flags.index("--lr") + 1] = "adam", "1e-2"
    flags[flags.index("--train-iters") + 1], flags[flags.index("--ckpt-format") + 1] = "6", fmt
    flags[flags.index("--save-interval") + 1] = "3"
    whole, _ = _train([*flags, "--save", str(tmp_path / "whole")], 1)
    first, _ = _train([*flags, "--save", str(tmp_path / "split"), "--exit-interval", "3"], 1)
    second, output = _train([*flags, "--save", str(tmp_path / "split"), "--lora-load", str(tmp_path / "split")], 1)
    assert f"loaded the adapters of {tmp_path / 'split'} at iteration 3" in output
    # each run's log averages its second iteration with its first (Megatron-LM's logging): the resumed run's
    # iteration-5 line is the mean of iterations 4 and 5
    assert len(whole) == 6 and first + second[:1] + second[2:] == pytest.approx(whole[:4] + whole[5:], rel=1e-6)
    assert second[1] == pytest.approx((whole[3] + whole[4]) / 2, rel=1e-6)
    if fmt == "torch":
        ours, theirs = (_adapters_tp1_layout(tmp_path / name, 1, None, iteration=6) for name in ("whole", "split"))
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], atol=0, rtol=0, msg=key)


@pytest.mark.slow
def test_adapters_on_the_wrong_base_or_with_other_options_are_one_line(lora_run, tmp_path, tiny_spec):
    """An adapter checkpoint given as --load, a base as --lora-load, another rank than the adapters', and adapters
    merged onto a base of another shape: one line each, exit 2."""
    flags, root = lora_run
    flags = [f for f in flags if f not in ("--finetune",)]
    flags[flags.index("--train-iters") + 1] = "1"
    _train([*flags, "--save", str(tmp_path / "adapters")], 1)
    cases = [
        ([*flags, "--lora-load", str(root / "start")], r"--lora-load .*start.*: no LoRA adapters in this checkpoint"),
        ([*flags, "--lora-load", str(tmp_path / "adapters"), "--lora-r", "4"],
         r"--lora-r 4: the --lora-load adapters were trained with --lora-r 8"),
        ([*[f if f != str(root / "start") else str(tmp_path / "adapters") for f in flags],
          "--lora-load", str(tmp_path / "adapters")], r"--load .*adapters.*: this checkpoint holds LoRA adapters only"),
    ]
    no_base = [f for i, f in enumerate(flags) if f != "--load" and (i == 0 or flags[i - 1] != "--load")]
    cases.append(([*no_base, "--ffn-hidden-size", "384", "--lora-load", str(tmp_path / "adapters")],
                  (r"--lora-load .*adapters.*: decoder\.layers\..*linear_fc[12]\.lora_[AB]\.weight is \[.*\] there "
                   r"but \[.*\] in this model")))
    for argv, message in cases:
        _one_line_error(run_python("-m", "aquila_npu.pretrain", *argv), message)
    other = make_hf_checkpoint(tiny_spec.replace(ffn_hidden_size=384), tmp_path / "other-base")
    for kind in ("peft", "hf"):
        _one_line_error(run_python("-m", "aquila_npu.convert", "--load-dir", str(other), "--lora-load",
                                   str(tmp_path / "adapters"), "--save-model-type", kind, "--save-dir",
                                   str(tmp_path / kind), "--no-progress"),
                        r"the adapters were trained on a model with ffn-hidden-size 256, the base at --load-dir .* has "
                        r"384")
        assert not (tmp_path / kind).exists()


def _one_line_error(result, pattern: str) -> None:
    import re

    lines = [line for line in result.stderr.splitlines() if ": error: " in line]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.slow
def test_generate_at_tp2_with_lora_load_equals_transformers_on_the_merged_export(trained, lora_run, tmp_path):
    """``python -m aquila_npu.generate --lora-load`` over two processes (a torch_dist base, read whole on each rank,
    and per-rank adapters): transformers' greedy tokens on the merged HF export, which differ from the base's."""
    import json

    import transformers

    from aquila_npu.plugins.aquila2 import FAMILY

    _, root = lora_run
    adapters = str(trained["tp1"][1])
    run_python("-m", "aquila_npu.convert", "--load-dir", str(root / "start"), "--load-model-type", "mg",
               "--lora-load", adapters, "--save-model-type", "hf", "--save-dir", str(tmp_path / "merged"),
               "--no-progress", check=True)
    prompts, new_tokens = ["Hello", "北京是中国的首都，也是"], 8
    output = tmp_path / "generated.jsonl"
    run_python("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "aquila_npu.generate",
               "--load", str(root / "start"), "--lora-load", adapters, "--tokenizer-name-or-path", str(TOKENIZER),
               "--tensor-model-parallel-size", "2", *[a for p in prompts for a in ("--prompt", p)], "--greedy",
               "--max-new-tokens", str(new_tokens), "--no-stream", "--output", str(output), check=True, timeout=900)
    ours = [json.loads(line)["tokens"] for line in output.read_text(encoding="utf-8").splitlines()]
    tokenizer = transformers.AutoTokenizer.from_pretrained(TOKENIZER)
    expected, base = [], []
    for folder, into in ((tmp_path / "merged", expected), (root / "hf", base)):
        if folder == root / "hf":
            run_python("-m", "aquila_npu.convert", "--load-dir", str(root / "start"), "--load-model-type", "mg",
                       "--save-model-type", "hf", "--save-dir", str(folder), "--no-progress", check=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        for prompt in prompts:
            ids = [FAMILY.tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False).input_ids
            with torch.no_grad():
                generated = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                                           eos_token_id=FAMILY.tokenizer.eos_token_id, pad_token_id=0)
            into.append(generated[0, len(ids):].tolist())
    assert ours == [e[:len(o)] for e, o in zip(expected, ours)] and all(ours)
    assert expected != base  # the adapters change what the model says
