"""The megatron-core training driver on the CPU (gloo): loss curves across parallel layouts, exact resume in both
checkpoint formats, a kill during a save, and instruction fine-tuning."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BUNDLED_DATA, run_python

LOSS = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*\| lm loss: ([0-9.E+-]+) \|")
TOKENIZER = BUNDLED_DATA / "aquila2_tokenizer"
ALPACA = BUNDLED_DATA / "alpaca" / "alpaca_300.parquet"
# small and fast: the 100,008-token output layer dominates every step
COMMON = ["--model", "aquila2-tiny", "--tokenizer-name-or-path", str(TOKENIZER), "--micro-batch-size", "2",
          "--global-batch-size", "4", "--seq-length", "64", "--lr", "1e-3", "--lr-decay-style", "cosine",
          "--lr-warmup-fraction", "0.1", "--split", "100,0,0", "--log-interval", "1", "--seed", "1234",
          "--eval-iters", "0"]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, str]:
    from aquila_npu.preprocess import PreprocessOptions, preprocess

    root = tmp_path_factory.mktemp("data")
    common = dict(input=str(ALPACA), tokenizer=str(TOKENIZER), output_prefix=str(root / "alpaca"), progress=False)
    pretrain = preprocess(PreprocessOptions(**common, append_eod=True))
    preprocess(PreprocessOptions(**common, handler="GeneralInstructionHandler", append_eod=True))
    return {"text": pretrain.outputs["text"], "instruction": str(root / "alpaca")}


def train(*flags: str, nproc: int = 1):
    """Run the driver (torchrun for several processes); returns ({iteration: loss}, output)."""
    if nproc == 1:
        command = ["-m", "aquila_npu.pretrain", *flags]
    else:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m",
                   "aquila_npu.pretrain", *flags]
    result = run_python(*command, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    return {int(m.group(1)): float(m.group(3)) for m in LOSS.finditer(output)}, output


def _close(a: dict, b: dict, rtol: float) -> None:
    assert sorted(a) == sorted(b)
    for i in a:
        assert abs(a[i] - b[i]) <= rtol * abs(b[i]), (i, a[i], b[i])


@pytest.mark.slow
def test_pretraining_loss_falls_clearly_over_30_iterations(tmp_path, datasets):
    losses, output = train(*COMMON, "--data-path", datasets["text"], "--train-iters", "30", "--tensorboard-dir",
                           str(tmp_path / "tb"), "--data-cache-path", str(tmp_path / "cache"))
    assert any((tmp_path / "cache").rglob("*.npy")), "GPTDataset's index cache goes to --data-cache-path"
    assert sorted(losses) == list(range(1, 31))
    first, last = np.mean([losses[i] for i in (1, 2, 3)]), np.mean([losses[i] for i in (28, 29, 30)])
    assert last < first - 1.5, (first, last)
    assert "tokens/p/s:" in output and "s/step:" in output
    # the TensorBoard events, read back with TensorBoard's own reader, hold the logged losses
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("lm loss")}
    assert sorted(logged) == list(range(1, 31))
    assert logged[30] == pytest.approx(losses[30], rel=1e-6)


@pytest.fixture(scope="module")
def initial_weights(tmp_path_factory, tiny_hf_dir) -> str:
    """One set of starting weights for every layout: each layout draws its own random initialisation in its own
    order (as Megatron-LM does), so curves are compared from a torch_dist checkpoint, loadable at any split."""
    from aquila_npu.convert import ConvertOptions, convert

    path = str(tmp_path_factory.mktemp("initial") / "torch_dist")
    convert(ConvertOptions(load_dir=str(tiny_hf_dir), save_dir=path, ckpt_format="torch_dist", progress=False))
    return path


@pytest.mark.slow
def test_tensor_pipeline_and_data_parallel_follow_one_process(datasets, initial_weights):
    flags = [*COMMON, "--data-path", datasets["text"], "--train-iters", "10", "--load", initial_weights,
             "--finetune"]
    reference, _ = train(*flags)
    tp2, _ = train(*flags, "--tensor-model-parallel-size", "2", nproc=2)
    _close(tp2, reference, 1e-3)
    pp2, _ = train(*flags, "--pipeline-model-parallel-size", "2", nproc=2)
    _close(pp2, reference, 1e-3)
    # without shared storage no rank writes (or waits for) a dataset index cache file
    dp2, _ = train(*flags, "--no-shared-storage", "--data-cache-path", str(initial_weights) + "-cache", nproc=2)
    assert not Path(str(initial_weights) + "-cache").exists()
    dp2_distributed, _ = train(*flags, "--use-distributed-optimizer", nproc=2)
    _close(dp2, reference, 1e-3)
    _close(dp2_distributed, dp2, 1e-5)


@pytest.mark.slow
def test_interleaved_pipeline_follows_one_process(tmp_path, datasets, tiny_spec):
    """PP=2 with two virtual stages each (4 layers: one a chunk) against one process, from the same weights."""
    from aquila_npu import parity
    from aquila_npu.convert import ConvertOptions, convert

    parity.save_random_hf_model(tiny_spec.replace(num_layers=4), str(tmp_path / "hf"))
    convert(ConvertOptions(load_dir=str(tmp_path / "hf"), save_dir=str(tmp_path / "start"), ckpt_format="torch_dist",
                           progress=False))
    flags = [*COMMON, "--num-layers", "4", "--data-path", datasets["text"], "--train-iters", "6",
             "--global-batch-size", "8", "--load", str(tmp_path / "start"), "--finetune"]
    reference, _ = train(*flags)
    interleaved, output = train(*flags, "--pipeline-model-parallel-size", "2",
                                "--num-layers-per-virtual-pipeline-stage", "1", nproc=2)
    assert "PP=2 VP=2" in output
    _close(interleaved, reference, 1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("ckpt_format", ["torch_dist", "torch"])
def test_resume_from_iteration_5_matches_an_uninterrupted_run(tmp_path, datasets, ckpt_format):
    flags = [*COMMON, "--data-path", datasets["text"], "--train-iters", "10", "--ckpt-format", ckpt_format]
    whole, _ = train(*flags, "--save", str(tmp_path / "whole"), "--save-interval", "5")
    assert (tmp_path / "whole" / "latest_checkpointed_iteration.txt").read_text() == "10"
    # the iteration-5 checkpoint of the same run, as the latest of a folder of its own
    resume = tmp_path / "resume"
    shutil.copytree(tmp_path / "whole" / "iter_0000005", resume / "iter_0000005")
    (resume / "latest_checkpointed_iteration.txt").write_text("5")
    resumed, output = train(*flags, "--load", str(resume), "--save", str(resume))
    assert "loaded" in output and "at iteration 5" in output
    assert sorted(resumed) == [6, 7, 8, 9, 10]
    # as Megatron-LM, the first logged iteration of a run does not reset the interval: line 7 averages 6 and 7
    assert [resumed[i] for i in (6, 8, 9, 10)] == [whole[i] for i in (6, 8, 9, 10)], (resumed, whole)
    assert resumed[7] == pytest.approx((whole[6] + whole[7]) / 2, rel=1e-6)
    # and the weights after iteration 10 are the same bits
    for name in ("whole", "resume"):
        run_python("-m", "aquila_npu.convert", "--load-dir", str(tmp_path / name), "--save-dir",
                   str(tmp_path / f"{name}-hf"), "--load-model-type", "mg", "--save-model-type", "hf",
                   "--no-progress", check=True)
    from aquila_npu.convert.hf_format import load_state

    a, b = load_state(str(tmp_path / "whole-hf")), load_state(str(tmp_path / "resume-hf"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


# the process dies once every rank has written iteration 10, before it is renamed into place and made latest
KILL_DURING_SECOND_SAVE = """
import os, signal, sys
original = os.replace
def replace(source, target, *args, **kwargs):
    if str(source).endswith("iter_0000010.partial"):
        os.kill(os.getpid(), signal.SIGKILL)
    return original(source, target, *args, **kwargs)
os.replace = replace
from aquila_npu.training.loop import main
sys.exit(main(sys.argv[1:]))
"""


def _killed_run(flags: list[str], log: Path) -> str:
    """Run the driver under KILL_DURING_SECOND_SAVE in a session of its own. The kill takes the main process only,
    as a scheduler's would; the torch_dist writer's forked helper is cleaned up with the session afterwards."""
    import os
    import signal
    import subprocess
    import sys

    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-c", KILL_DURING_SECOND_SAVE, *flags], stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
        code = process.wait(timeout=600)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    assert code == -signal.SIGKILL, log.read_text()[-3000:]
    return log.read_text()


@pytest.mark.slow
def test_a_kill_while_saving_leaves_the_previous_checkpoint_latest(tmp_path, datasets):
    flags = [*COMMON, "--data-path", datasets["text"], "--train-iters", "10", "--save", str(tmp_path / "ckpt"),
             "--save-interval", "5"]
    output = _killed_run(flags, tmp_path / "killed.log")
    assert "saved checkpoint at iteration 5" in output
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "5"
    assert not (tmp_path / "ckpt" / "iter_0000010").exists()
    resumed, output = train(*flags, "--load", str(tmp_path / "ckpt"))
    assert sorted(resumed) == [6, 7, 8, 9, 10] and "at iteration 5" in output
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "10"


def test_prompt_and_padding_tokens_carry_no_loss(datasets):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from aquila_npu.preprocess.handlers import IGNORE_INDEX
    from aquila_npu.training.data import InstructionDataset
    from aquila_npu.training.loop import _masked_loss

    prefix = datasets["instruction"]
    labels = IndexedDataset(f"{prefix}_packed_labels_document")
    seq = 256
    dataset = InstructionDataset(prefix, np.arange(len(labels)), 20, seq, seed=7, pad=0)
    for index in range(len(dataset)):
        sample = dataset[index]
        record = labels[int(dataset.order[index])][:seq + 1]
        prompt_length = int(np.sum(record == IGNORE_INDEX))
        targets = record[1:]
        # the first target that carries loss is the first response token; nothing after the sample does
        expected = np.zeros(seq, dtype=np.float32)
        expected[prompt_length - 1:len(targets)] = 1
        assert sample["loss_mask"].numpy().tolist() == expected.tolist()
        assert sample["labels"][prompt_length - 1:len(targets)].tolist() == targets[prompt_length - 1:].tolist()
        # and the loss is blind to whatever the model says at those positions
        per_token = torch.rand(1, seq, requires_grad=True)
        loss, tokens, _ = _masked_loss(sample["loss_mask"].unsqueeze(0), per_token)
        loss.backward()
        assert int(tokens) == int(expected.sum())
        assert (per_token.grad[0][expected == 0] == 0).all() and (per_token.grad[0][expected == 1] == 1).all()


@pytest.mark.slow
def test_instruction_fine_tuning_from_a_pretrained_checkpoint_lowers_the_loss(tmp_path, datasets):
    base = [*COMMON, "--train-iters", "5"]
    train(*base, "--data-path", datasets["text"], "--save", str(tmp_path / "pretrained"))
    flags = [*COMMON, "--data-path", datasets["instruction"], "--is-instruction-dataset", "--train-iters", "20",
             "--load", str(tmp_path / "pretrained"), "--finetune", "--seq-length", "128"]
    losses, output = train(*[f for f in flags])
    assert "(weights only: --finetune)" in output and sorted(losses) == list(range(1, 21))
    assert np.mean([losses[i] for i in (18, 19, 20)]) < np.mean([losses[i] for i in (1, 2, 3)]) - 0.5


def test_unsupported_flag_is_one_clear_error():
    result = run_python("-m", "aquila_npu.pretrain", *COMMON, "--mock-data", "--train-iters", "1",
                        "--use-magic-kernels")
    assert result.returncode == 2
    assert "unrecognized arguments: --use-magic-kernels" in result.stderr


def test_seed_flag_set_is_accepted(tmp_path):
    """The seed guide's Aquila2-7B flags, as written (scaled to the tiny model), parse and train one step."""
    seed_flags = ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1", "--sequence-parallel",
                  "--num-layers", "2", "--hidden-size", "256", "--ffn-hidden-size", "688", "--num-attention-heads",
                  "4", "--tokenizer-type", "PretrainedFromHF", "--tokenizer-name-or-path", str(TOKENIZER),
                  "--seq-length", "32", "--max-position-embeddings", "2048", "--micro-batch-size", "1",
                  "--global-batch-size", "1", "--make-vocab-size-divisible-by", "1", "--lr", "1.0e-7",
                  "--train-iters", "1", "--lr-decay-style", "cosine", "--untie-embeddings-and-output-weights",
                  "--disable-bias-linear", "--attention-dropout", "0.0", "--init-method-std", "0.01",
                  "--hidden-dropout", "0.0", "--position-embedding-type", "rope", "--normalization", "RMSNorm",
                  "--use-fused-rmsnorm", "--swiglu", "--use-flash-attn", "--no-masked-softmax-fusion",
                  "--attention-softmax-in-fp32", "--min-lr", "1.0e-8", "--weight-decay", "1e-1",
                  "--lr-warmup-fraction", "0.01", "--clip-grad", "1.0", "--adam-beta1", "0.9",
                  "--initial-loss-scale", "65536", "--adam-beta2", "0.95", "--no-gradient-accumulation-fusion",
                  "--no-load-optim", "--no-load-rng", "--use-mcore-models", "--mock-data", "--split", "100,0,0",
                  "--log-interval", "1", "--save-interval", "1000", "--eval-interval", "1000", "--eval-iters", "0",
                  "--distributed-backend", "nccl"]
    losses, output = train(*seed_flags)
    assert list(losses) == [1] and "training from-flags" in output
    fused = re.search(r"; fused kernels: (.*)", output).group(1).split(", ")
    assert {"attention", "rms_norm"} <= set(fused)  # the seed's two switches (on a CPU: PyTorch's kernels)


@pytest.mark.parametrize("case", ["no dataset", "no checkpoint", "converted checkpoint without --finetune",
                                  "a fused kernel the device lacks", "an option of another device"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, case, datasets, tiny_hf_dir):
    flags = [*COMMON, "--train-iters", "1", "--data-path", datasets["text"]]
    if case == "no dataset":
        flags[-1], message = str(tmp_path / "nothing_text_document"), "nothing_text_document.bin/.idx; give the prefix"
    elif case == "a fused kernel the device lacks":
        flags += ["--use-fused-swiglu"]
        message = "--use-fused-swiglu: the cpu device has no fused swiglu kernel"
    elif case == "an option of another device":
        flags += ["--npu-asd-enable", "2"]
        message = "--npu-asd-enable is an option of the npu device; this job runs on cpu"
    elif case == "no checkpoint":
        flags += ["--load", str(tmp_path)]
        message = "no latest_checkpointed_iteration.txt there"
    else:
        run_python("-m", "aquila_npu.convert", "--load-dir", str(tiny_hf_dir), "--save-dir", str(tmp_path / "mg"),
                   "--no-progress", check=True)
        flags += ["--load", str(tmp_path / "mg")]
        message = "holds no optimizer state (a converted checkpoint?); add --finetune"
    result = run_python("-m", "aquila_npu.pretrain", *flags)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("aquila-npu pretrain: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]
