"""LoRA against full-parameter fine-tuning on a 308M Aquila2-shaped model: peak memory, optimizer-state bytes and
s/step, side by side in one run.

Both runs are ``python -m aquila_npu.pretrain`` with the same model (Aquila2-7B's vocabulary and layer layout at 8
layers, hidden 1024, FFN 2816, 8 heads: 307.6M parameters), seed, data (``--mock-data``), Adam, dtype and threads;
the LoRA run adds ``--lora-r 16 --lora-alpha 32`` on all four targets. Peak memory is the driver's "peak memory"
(the process's max RSS on a CPU, ``max_memory_allocated`` on a GPU), the optimizer state its "optimizer state" line
(Adam's moments, plus fp32 main weights under --bf16), s/step the median of the measured iterations.

    python benchmarks/lora.py [--seq-length 256] [--iters 5] [--warmup 2] [--bf16]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

from sample_data import REPO

STEP = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([0-9.]+) \|.*?"
                  r"peak memory \(GB\): ([0-9.]+)")
STATE = re.compile(r"optimizer state: ([0-9.]+) MiB")
TRAINABLE = re.compile(r"([0-9,]+) trainable parameters, ([0-9,]+) frozen")
MODEL = ["--model", "aquila2-7b", "--num-layers", "8", "--hidden-size", "1024", "--ffn-hidden-size", "2816",
         "--num-attention-heads", "8"]


def run(flags: list[str], threads: int) -> dict:
    command = [sys.executable, "-m", "aquila_npu.pretrain", *flags]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)},
                            cwd=REPO, check=False)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{output[-4000:]}")
    steps = [(int(m.group(1)), float(m.group(2)) / 1000, float(m.group(3))) for m in STEP.finditer(output)]
    trainable = TRAINABLE.search(output)
    return {"steps": steps, "state": float(STATE.search(output).group(1)),
            "trainable": int(trainable.group(1).replace(",", "")) if trainable else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    sys.path.insert(0, str(REPO))
    from aquila_npu import plugin_manager

    spec = plugin_manager.get().find_model("aquila2-7b")[1].replace(
        num_layers=8, hidden_size=1024, ffn_hidden_size=2816, num_attention_heads=8, num_query_groups=8)
    h, f = spec.hidden_size, spec.ffn_hidden_size
    parameters = 2 * spec.vocab_size * h + spec.num_layers * (4 * h * h + 3 * h * f + 2 * h) + h
    common = [*MODEL, "--mock-data", "--seq-length", str(args.seq_length), "--micro-batch-size",
              str(args.micro_batch_size), "--global-batch-size", str(args.micro_batch_size), "--train-iters",
              str(args.iters), "--optimizer", "adam", "--lr", "1e-4", "--lr-decay-style", "constant",
              "--log-interval", "1", "--eval-iters", "0", "--eval-interval", str(args.iters), "--seed", "1234",
              *(["--bf16"] if args.bf16 else [])]
    rows = {"full": run(common, args.threads),
            "lora r=16": run([*common, "--lora-r", "16", "--lora-alpha", "32"], args.threads)}
    print(f"308M Aquila2-shaped model ({parameters / 1e6:.1f}M parameters: {spec.num_layers} layers, hidden {h}, "
          f"FFN {f}, vocab {spec.vocab_size}); {args.micro_batch_size} x {args.seq_length} tokens a step, Adam, "
          f"{'bf16' if args.bf16 else 'fp32'}, {args.threads} threads; {args.iters} iterations, the first "
          f"{args.warmup} not measured")
    print(f"\n{'run':10} {'trainable':>12} {'optimizer state MiB':>20} {'peak GB':>8} {'s/step':>8}")
    for name, row in rows.items():
        seconds = [s for i, s, _ in row["steps"] if i > args.warmup]
        row["step"] = statistics.median(seconds)
        row["peak"] = max(m for *_, m in row["steps"])
        trainable = row["trainable"] or parameters
        print(f"{name:10} {trainable:12,} {row['state']:20.1f} {row['peak']:8.2f} {row['step']:8.3f}")
    full, lora = rows["full"], rows["lora r=16"]
    print(f"\nLoRA / full: optimizer state {lora['state'] / full['state']:.4f}x, peak memory "
          f"{lora['peak'] / full['peak']:.2f}x, s/step {lora['step'] / full['step']:.2f}x")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"({time.perf_counter() - start:.0f} s)")
