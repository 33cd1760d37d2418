"""Fine-tuning throughput on Alpaca: packed sequences (``--pack``) against one padded sample a sequence.

Side by side in one run, with the same model, starting weights, seed, threads and global batch of sequences: the
Alpaca instruction data preprocessed twice (one sample a sequence, and ``--pack``), each fine-tuned with
``python -m aquila_npu.pretrain --is-instruction-dataset`` at ``--seq-length``. The figure that matters is
**response tokens trained per second** (tokens with loss: what fine-tuning learns from), counted from the samples
each measured iteration consumed (the datasets' own order); the step time is the median of the driver's "elapsed time
per iteration" after the warm-up. Target (issue 17): packed / padded >= 8x at --seq-length 2048.

    python benchmarks/finetune.py [--model aquila2-tiny] [--seq-length 2048] [--iters 8] [--warmup 2]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sample_data import REPO, sample

STEP = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([0-9.]+) \|.*?lm loss: "
                  r"([0-9.E+-]+).*?peak memory \(GB\): ([0-9.]+)")


def run(command: list[str], threads: int) -> list[tuple[int, float, float, float]]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{output[-4000:]}")
    return [(int(m.group(1)), float(m.group(2)), float(m.group(3)), float(m.group(4))) for m in STEP.finditer(output)]


def response_tokens(prefix: str, packed: bool, seq_length: int, samples: int, seed: int) -> np.ndarray:
    """Tokens with loss in each of the first ``samples`` training samples, in the order the driver draws them."""
    from aquila_npu.training.data import instruction_datasets

    train, _, _ = instruction_datasets(prefix, "100,0,0", [samples, 0, 0], seq_length, seed, pad=0, packed=packed)
    return np.array([float(train[i]["loss_mask"].sum()) for i in range(samples)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="aquila2-tiny")
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--global-batch-size", type=int, default=4, help="sequences a step, both runs")
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from aquila_npu import parity, plugin_manager
    from aquila_npu.convert import ConvertOptions, convert
    from aquila_npu.preprocess import PreprocessOptions, preprocess

    spec = plugin_manager.get().find_model(args.model)[1]
    positions = max(spec.max_position_embeddings, args.seq_length)  # aquila2-tiny has 256; RoPE extends as is
    spec = spec.replace(max_position_embeddings=positions)
    work = Path(tempfile.mkdtemp(prefix="finetune-bench-"))
    tokenizer = str(sample("aquila2_tokenizer"))
    alpaca = str(sample("alpaca/alpaca_5000.parquet", "alpaca/alpaca_300.parquet"))
    data = {}
    for name, pack in (("padded", False), ("packed", True)):
        result = preprocess(PreprocessOptions(input=alpaca, tokenizer=tokenizer, output_prefix=str(work / name),
                                              handler="GeneralInstructionHandler", append_eod=True,
                                              seq_length=args.seq_length, pack=pack, progress=False))
        data[name] = (str(work / name), result)
    parity.save_random_hf_model(spec, str(work / "hf"))
    convert(ConvertOptions(load_dir=str(work / "hf"), save_dir=str(work / "start"), ckpt_format="torch_dist",
                           progress=False))
    gbs, seed = args.global_batch_size, 1234
    common = ["--model", args.model, "--max-position-embeddings", str(positions), "--tokenizer-name-or-path",
              tokenizer, "--seq-length", str(args.seq_length),
              "--micro-batch-size", "1", "--global-batch-size", str(gbs), "--train-iters", str(args.iters),
              "--lr", "1e-5", "--lr-decay-style", "constant", "--split", "100,0,0", "--seed", str(seed),
              "--log-interval", "1", "--eval-iters", "0", "--is-instruction-dataset", "--load", str(work / "start"),
              "--finetune"]
    rows = {}
    for name in ("padded", "packed"):
        prefix, _ = data[name]
        flags = ["--reset-position-ids", "--reset-attention-mask"] if name == "packed" else []
        steps = run([sys.executable, "-m", "aquila_npu.pretrain", *common, "--data-path", prefix, *flags],
                    args.threads)
        per_step = response_tokens(prefix, name == "packed", args.seq_length, args.iters * gbs, seed)
        per_step = per_step.reshape(args.iters, gbs).sum(axis=1)[args.warmup:]
        seconds = np.array([ms for _, ms, _, _ in steps][args.warmup:]) / 1000
        rows[name] = dict(step=statistics.median(seconds), rate=per_step.sum() / seconds.sum(),
                          per_step=per_step.mean(), memory=max(m for *_, m in steps))

    padded, packed = data["padded"][1], data["packed"][1]
    print(f"{args.model}: {spec.num_layers} layers, hidden {spec.hidden_size}, vocab {spec.vocab_size}; "
          f"--seq-length {args.seq_length}, {gbs} sequences a step (micro-batch 1), {args.threads} threads; "
          f"{args.iters} iterations, the first {args.warmup} not measured")
    print(f"data: {Path(alpaca).name}, {padded.samples:,} samples ({padded.too_long} over the length dropped), "
          f"{padded.tokens['input_ids'] / padded.samples:.0f} tokens each on average; packed into "
          f"{packed.samples:,} sequences ({padded.samples / packed.samples:.1f} samples each)")
    print(f"\n{'data':8} {'s/step':>8} {'response tokens/step':>21} {'response tokens/s':>18} {'peak GB':>8}")
    for name, row in rows.items():
        print(f"{name:8} {row['step']:8.3f} {row['per_step']:21.0f} {row['rate']:18.1f} {row['memory']:8.2f}")
    print(f"\npacked / padded response tokens/s: {rows['packed']['rate'] / rows['padded']['rate']:.1f}x  "
          f"(target >= 8x)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"({time.perf_counter() - start:.0f} s)")
