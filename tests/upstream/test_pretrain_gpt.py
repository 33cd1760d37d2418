"""The Megatron-LM route: unmodified `pretrain_gpt.py` with `--plugin aquila2`, on this machine's device.

Needs a Megatron-LM checkout (tag core_v0.16.1) at MEGATRON_LM_PATH; skipped otherwise. CI runs without it.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest

from conftest import run_python

MEGATRON_LM_PATH = os.environ.get("MEGATRON_LM_PATH")
LOSS = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*\| lm loss: ([0-9.E+-]+) \|")


def test_pretrain_gpt_runs_with_the_plugin_at_tp2(tmp_path, tokenizer_dir):
    script = Path(MEGATRON_LM_PATH) / "pretrain_gpt.py"
    assert script.is_file(), f"{script} not found: MEGATRON_LM_PATH must be a Megatron-LM checkout"
    result = run_python(
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
        "--plugin", "aquila2", "--model", "aquila2-tiny", "--tensor-model-parallel-size", "2",
        "--mock-data", "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer_dir),
        "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3",
        "--lr", "1e-4", "--log-interval", "1", "--eval-interval", "100", "--eval-iters", "0",
        "--save", str(tmp_path / "ckpt"), "--save-interval", "3", "--ckpt-format", "torch_dist",
        "--use-flash-attn", "--use-fused-rmsnorm", cwd=MEGATRON_LM_PATH, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    losses = [(int(m.group(1)), float(m.group(3))) for m in LOSS.finditer(output)]
    assert [i for i, _ in losses] == [1, 2, 3]
    assert all(math.isfinite(loss) and 5 < loss < 13 for _, loss in losses)
    assert "aquila-npu: plugins aquila2 on" in output and "fused kernels: attention, rms_norm;" in output
    # torch_dist save ran (in every process of the job) and completed
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"


def test_a_fused_kernel_the_device_lacks_stops_the_job_at_start_up(tokenizer_dir):
    result = run_python(str(Path(MEGATRON_LM_PATH) / "pretrain_gpt.py"), "--plugin", "aquila2", "--model",
                        "aquila2-tiny", "--device", "cpu", "--use-fused-rotary-pos-emb", "--mock-data",
                        cwd=MEGATRON_LM_PATH, timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip() == ("aquila-npu: error: --use-fused-rotary-pos-emb: the cpu device has no fused "
                                     "rotary kernel (its fused kernels: --use-fused-rmsnorm, --use-flash-attn); drop "
                                     "the flag, or run on a device that has one (see `aquila-npu doctor`)")


def _first_loss(output: str) -> float:
    match = LOSS.search(output)
    assert match, output[-4000:]
    return float(match.group(3))


def test_megatron_lm_loads_converted_checkpoints_in_both_formats(tmp_path, tokenizer_dir, tiny_hf_dir):
    """HF -> torch (TP2) and HF -> torch_dist, each loaded by pretrain_gpt.py --finetune at TP2: same first loss."""
    losses = {}
    for fmt in ("torch", "torch_dist"):
        run_python("-m", "aquila_npu.convert", "--load-dir", str(tiny_hf_dir), "--save-dir", str(tmp_path / fmt),
                   "--target-tensor-parallel-size", "2", "--ckpt-format", fmt, "--no-progress", check=True)
        result = run_python(
            "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            str(Path(MEGATRON_LM_PATH) / "pretrain_gpt.py"), "--plugin", "aquila2", "--model", "aquila2-tiny",
            "--tensor-model-parallel-size", "2", "--mock-data", "--tokenizer-type", "HuggingFaceTokenizer",
            "--tokenizer-model", str(tokenizer_dir), "--seq-length", "64", "--micro-batch-size", "2",
            "--global-batch-size", "4", "--train-iters", "1", "--lr", "1e-4", "--log-interval", "1",
            "--eval-interval", "100", "--eval-iters", "0", "--load", str(tmp_path / fmt), "--ckpt-format", fmt,
            "--finetune", "--no-load-optim", "--no-load-rng", cwd=MEGATRON_LM_PATH, timeout=900)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-4000:]
        assert "successfully loaded checkpoint" in output
        losses[fmt] = _first_loss(output)
    assert losses["torch"] == losses["torch_dist"]


@pytest.fixture(scope="module")
def upstream_data(tmp_path_factory, tokenizer_dir):
    from conftest import BUNDLED_DATA

    from aquila_npu.preprocess import PreprocessOptions, preprocess

    root = tmp_path_factory.mktemp("upstream-data")
    common = dict(input=str(BUNDLED_DATA / "alpaca" / "alpaca_300.parquet"), tokenizer=str(tokenizer_dir),
                  output_prefix=str(root / "alpaca"), progress=False, append_eod=True)
    text = preprocess(PreprocessOptions(**common)).outputs["text"]
    preprocess(PreprocessOptions(**common, handler="GeneralInstructionHandler"))
    packed = dict(common, output_prefix=str(root / "packed"))
    preprocess(PreprocessOptions(**packed, handler="GeneralInstructionHandler", seq_length=256, pack=True))
    return {"text": text, "instruction": str(root / "alpaca"), "packed": str(root / "packed")}


@pytest.mark.parametrize("data", ["text", "instruction", "packed"])
def test_upstream_route_and_driver_train_to_the_same_losses(tmp_path, tokenizer_dir, tiny_hf_dir, upstream_data,
                                                            data):
    """pretrain_gpt.py --plugin aquila2 and python -m aquila_npu.pretrain, same starting weights, data, seed and
    schedule, TP=2: the same loss at every iteration (pretraining text, --is-instruction-dataset, and packed
    instruction data: Megatron-LM's THD batches, whose TP receivers our patch gives max_seqlen)."""
    start = tmp_path / "start"
    run_python("-m", "aquila_npu.convert", "--load-dir", str(tiny_hf_dir), "--save-dir", str(start),
               "--ckpt-format", "torch_dist", "--no-progress", check=True)
    shared = ["--tensor-model-parallel-size", "2", "--seq-length", "64", "--micro-batch-size", "2",
              "--global-batch-size", "4", "--train-iters", "6", "--lr", "1e-3", "--lr-decay-style", "cosine",
              "--lr-warmup-fraction", "0.1", "--split", "100,0,0", "--seed", "1234", "--log-interval", "1",
              "--eval-interval", "100", "--eval-iters", "0", "--load", str(start), "--finetune",
              "--data-path", upstream_data[data]]
    upstream_only = []
    if data in ("instruction", "packed"):
        shared.append("--is-instruction-dataset")
    if data == "packed":  # one packed sequence a micro-batch; the loss over all response tokens of the batch
        shared[shared.index("--micro-batch-size") + 1] = "1"
        shared[shared.index("--seq-length") + 1] = "256"  # about two Alpaca samples a sequence
        shared += ["--reset-position-ids", "--reset-attention-mask"]
        upstream_only.append("--calculate-per-token-loss")
    upstream = run_python(
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        str(Path(MEGATRON_LM_PATH) / "pretrain_gpt.py"), "--plugin", "aquila2", "--model", "aquila2-tiny",
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer_dir), *shared,
        *upstream_only, "--no-load-optim", "--no-load-rng", cwd=MEGATRON_LM_PATH, timeout=900)
    driver = run_python(
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "aquila_npu.pretrain",
        "--plugin", "aquila2", "--model", "aquila2-tiny", "--tokenizer-name-or-path", str(tokenizer_dir), *shared,
        timeout=900)
    losses = {}
    for name, result in (("upstream", upstream), ("driver", driver)):
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{name}:\n{output[-4000:]}"
        losses[name] = {int(m.group(1)): float(m.group(3)) for m in LOSS.finditer(output)}
    assert sorted(losses["upstream"]) == list(range(1, 7))
    assert losses["driver"] == losses["upstream"]


def test_a_crafted_torch_dist_checkpoint_is_refused_by_pretrain_gpt(tmp_path, tokenizer_dir, tiny_hf_dir):
    """`pretrain_gpt.py --plugin --load` of a torch_dist checkpoint whose .metadata is a crafted pickle: Megatron-LM's
    own loader reaches it deep inside torch.distributed.checkpoint; the job ends with our one line, and the payload
    never runs."""
    import pickle

    from test_untrusted_checkpoints import Payload

    run_python("-m", "aquila_npu.convert", "--load-dir", str(tiny_hf_dir), "--save-dir", str(tmp_path / "dist"),
               "--ckpt-format", "torch_dist", "--no-progress", check=True)
    marker, metadata = tmp_path / "payload-ran", tmp_path / "dist" / "iter_0000001" / ".metadata"
    metadata.write_bytes(pickle.dumps(Payload(marker)))
    result = run_python(
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
        str(Path(MEGATRON_LM_PATH) / "pretrain_gpt.py"), "--plugin", "aquila2", "--model", "aquila2-tiny",
        "--mock-data", "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer_dir),
        "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "1",
        "--lr", "1e-4", "--eval-interval", "100", "--eval-iters", "0", "--load", str(tmp_path / "dist"),
        "--ckpt-format", "torch_dist", "--finetune", "--no-load-optim", "--no-load-rng", cwd=MEGATRON_LM_PATH,
        timeout=600)
    output = result.stdout + result.stderr
    assert f"aquila-npu: error: {metadata} holds io.open" in output, output[-4000:]
    assert "failed (exitcode: 2)" in output and not marker.exists()  # torchrun reports the worker's one-line exit


def test_a_save_folder_pretrain_gpt_cannot_write_fails_before_training(tmp_path, tokenizer_dir):
    import fault_injection

    locked = tmp_path / "locked"
    locked.mkdir()
    result = run_python(
        str(Path(MEGATRON_LM_PATH) / "pretrain_gpt.py"), "--plugin", "aquila2", "--model", "aquila2-tiny",
        "--device", "cpu", "--mock-data", "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
        str(tokenizer_dir), "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "2",
        "--train-iters", "1", "--lr", "1e-4", "--eval-interval", "100", "--eval-iters", "0", "--save",
        str(locked / "ckpt"), "--save-interval", "1", cwd=MEGATRON_LM_PATH, timeout=600,
        env=fault_injection.environment(read_only=locked))
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (f"aquila-npu: error: --save {locked / 'ckpt'}: read-only file "
                                                      f"system; choose a writable location")
    assert "iteration" not in result.stdout and os.listdir(locked) == []


def test_lora_on_pretrain_gpt_trains_as_the_driver_and_resumes_its_adapter_checkpoints(tmp_path, tokenizer_dir,
                                                                                      tiny_hf_dir, upstream_data):
    """pretrain_gpt.py --plugin aquila2 --lora-r 8 at TP=2 from a converted base: the driver's losses at every
    iteration; Megatron-LM's own checkpointing saves the adapters only; --lora-load (the LoRA flags read from the
    checkpoint) resumes the run where it stopped."""
    start = tmp_path / "start"
    run_python("-m", "aquila_npu.convert", "--load-dir", str(tiny_hf_dir), "--save-dir", str(start),
               "--ckpt-format", "torch_dist", "--no-progress", check=True)
    shared = ["--tensor-model-parallel-size", "2", "--seq-length", "64", "--micro-batch-size", "2",
              "--global-batch-size", "4", "--train-iters", "4", "--optimizer", "adam", "--lr", "1e-2",
              "--lr-decay-style", "constant", "--split", "100,0,0", "--seed", "1234", "--log-interval", "1",
              "--eval-interval", "100", "--eval-iters", "0", "--load", str(start), "--data-path",
              upstream_data["instruction"], "--is-instruction-dataset"]
    lora = ["--lora-r", "8", "--lora-alpha", "16"]
    upstream = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                str(Path(MEGATRON_LM_PATH) / "pretrain_gpt.py"), "--plugin", "aquila2", "--model", "aquila2-tiny",
                "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer_dir), *shared]
    runs = {
        "upstream": upstream + [*lora, "--save", str(tmp_path / "adapters"), "--save-interval", "2"],
        "driver": ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "aquila_npu.pretrain",
                   "--plugin", "aquila2", "--model", "aquila2-tiny", "--tokenizer-name-or-path", str(tokenizer_dir),
                   *shared, *lora],
        "stopped": upstream + [*lora, "--save", str(tmp_path / "resumed"), "--save-interval", "2",
                               "--exit-interval", "2"],
    }
    runs["resumed"] = upstream + ["--lora-load", str(tmp_path / "resumed"), "--save", str(tmp_path / "resumed"),
                                  "--save-interval", "2"]
    losses = {}
    for name, command in runs.items():
        result = run_python(*command, cwd=MEGATRON_LM_PATH, timeout=900)
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{name}:\n{output[-4000:]}"
        losses[name] = {int(m.group(1)): float(m.group(3)) for m in LOSS.finditer(output)}
    assert sorted(losses["upstream"]) == [1, 2, 3, 4] and losses["driver"] == losses["upstream"]
    assert losses["stopped"] == {i: losses["upstream"][i] for i in (1, 2)}
    # Megatron-LM's log line after a restart averages its first two iterations
    assert losses["resumed"][3] == losses["upstream"][3]
    assert losses["resumed"][4] == pytest.approx((losses["upstream"][3] + losses["upstream"][4]) / 2, rel=1e-6)
    from aquila_npu import distributed
    from aquila_npu.convert import megatron_dist

    with distributed.megatron_world():
        stored = megatron_dist.load_tensors_metadata(str(tmp_path / "adapters" / "iter_0000004"))
    assert stored and all(".lora_" in key for key in stored), sorted(stored)[:5]
