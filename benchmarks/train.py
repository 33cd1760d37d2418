"""Training throughput: the megatron-core driver against Megatron-LM's pretrain_gpt.py with our plugin.

Side by side in one run, with the same model, data, seed, parallelism and threads: ``python -m aquila_npu.pretrain``
and (when ``MEGATRON_LM_PATH`` is set) ``pretrain_gpt.py --plugin aquila2``, both under torchrun. Each step time is
the median of Megatron-LM's "elapsed time per iteration" over the iterations after the warm-up; tokens/p/s is
tokens per second per device, as in the seed's table. Model FLOPs utilisation (MFU) is the model's training FLOPs
(6 x matmul parameters + 12 x layers x hidden x sequence, per token) per second per device against this machine's
measured fp32 matmul peak per process. Target (issue 5): driver / Megatron-LM >= 1.0.

    python benchmarks/train.py [--nproc 1] [--tp 1] [--iters 20] [--seq-length 256] [--micro-batch-size 4]
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

from sample_data import REPO, sample

STEP = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?elapsed time per iteration \(ms\): ([0-9.]+) \|.*?lm loss: ([0-9.E+-]+)")


def matmul_peak(threads: int, size: int = 2048, repeat: int = 10) -> float:
    """fp32 matmul FLOP/s with ``threads`` threads: the best of ``repeat`` square products."""
    code = (f"import time, torch; torch.set_num_threads({threads}); a = torch.randn({size}, {size}); b = torch.randn("
            f"{size}, {size}); a @ b; best = min((lambda s: (a @ b, time.perf_counter() - s)[1])(time.perf_counter())"
            f" for _ in range({repeat})); print(2 * {size} ** 3 / best)")
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def model_flops_per_token(spec, seq: int) -> float:
    h, layers, ffn, vocab = spec.hidden_size, spec.num_layers, spec.ffn_hidden_size, spec.padded_vocab_size(1)
    kv = spec.num_query_groups * spec.kv_channels
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * ffn  # qkv, proj, fc1 (gate + up), fc2
    matmul_params = layers * per_layer + h * vocab       # the output layer is a matmul, the embedding is not
    return 6 * matmul_params + 12 * layers * h * seq


def run(command: list[str], cwd: str | None, threads: int) -> tuple[list[float], list[float], str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{output[-4000:]}")
    steps = [(int(m.group(1)), float(m.group(2)), float(m.group(3))) for m in STEP.finditer(output)]
    return [ms for _, ms, _ in steps], [loss for _, _, loss in steps], output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="aquila2-tiny")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="OMP threads per process (default: cores / nproc)")
    args = parser.parse_args()
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.nproc)

    sys.path.insert(0, str(REPO))
    from aquila_npu import plugin_manager
    from aquila_npu.preprocess import PreprocessOptions, preprocess

    spec = plugin_manager.get().find_model(args.model)[1]
    work = Path(tempfile.mkdtemp(prefix="train-bench-"))
    tokenizer = str(sample("aquila2_tokenizer"))
    alpaca = str(sample("alpaca/alpaca_5000.parquet", "alpaca/alpaca_300.parquet"))
    prefix = preprocess(PreprocessOptions(input=alpaca, tokenizer=tokenizer, output_prefix=str(work / "alpaca"),
                                          append_eod=True, progress=False)).outputs["text"]
    # both routes start from the same weights (a random checkpoint converted to torch_dist), so their losses agree
    from aquila_npu import parity
    from aquila_npu.convert import ConvertOptions, convert

    parity.save_random_hf_model(spec, str(work / "hf"))
    convert(ConvertOptions(load_dir=str(work / "hf"), save_dir=str(work / "start"), ckpt_format="torch_dist",
                           progress=False))
    gbs = args.micro_batch_size * args.nproc // args.tp
    flags = ["--plugin", "aquila2", "--model", args.model, "--tensor-model-parallel-size", str(args.tp),
             "--seq-length", str(args.seq_length), "--micro-batch-size", str(args.micro_batch_size),
             "--global-batch-size", str(gbs), "--train-iters", str(args.iters), "--lr", "1e-4",
             "--lr-decay-style", "cosine", "--lr-warmup-fraction", "0.1", "--split", "100,0,0", "--seed", "1234",
             "--log-interval", "1", "--eval-interval", str(args.iters + 1), "--eval-iters", "0",
             "--data-path", prefix, "--load", str(work / "start"), "--finetune"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}"]
    rows = []
    ms, losses, _ = run([*launcher, "-m", "aquila_npu.pretrain", "--tokenizer-name-or-path", tokenizer, *flags],
                        None, threads)
    rows.append(("aquila_npu.pretrain (megatron-core driver)", ms, losses))
    megatron_lm = os.environ.get("MEGATRON_LM_PATH")
    if megatron_lm:
        ms, losses, _ = run([*launcher, "pretrain_gpt.py", "--tokenizer-type", "HuggingFaceTokenizer",
                             "--tokenizer-model", tokenizer, *flags, "--no-load-optim", "--no-load-rng"], megatron_lm, threads)
        rows.append(("Megatron-LM pretrain_gpt.py --plugin aquila2", ms, losses))

    peak = matmul_peak(threads)
    tokens = gbs * args.seq_length
    flops_per_token = model_flops_per_token(spec, args.seq_length)
    print(f"{args.model}: {spec.num_layers} layers, hidden {spec.hidden_size}, vocab {spec.vocab_size}; TP={args.tp}, "
          f"{args.nproc} process(es) x {threads} threads, micro-batch {args.micro_batch_size} x {args.seq_length}, "
          f"global batch {gbs}; {args.iters} iterations, median of iterations {args.warmup + 1}-{args.iters}")
    print(f"fp32 matmul peak, {threads} threads: {peak / 1e9:.1f} GFLOP/s per process")
    print(f"\n{'route':46} {'s/step':>8} {'tokens/s':>10} {'tokens/p/s':>11} {'MFU':>7} {'losses equal':>13}")
    reference = rows[-1][2]
    for name, ms, losses in rows:
        step = statistics.median(ms[args.warmup:]) / 1000
        per_device = tokens / step / args.nproc
        mfu = per_device * flops_per_token / peak
        print(f"{name:46} {step:8.3f} {tokens / step:10.1f} {per_device:11.1f} {mfu:7.1%} "
              f"{str(losses == reference):>13}")
    if len(rows) == 2:
        ratio = statistics.median(rows[1][1][args.warmup:]) / statistics.median(rows[0][1][args.warmup:])
        print(f"\ndriver / Megatron-LM throughput: {ratio:.2f}  (target >= 1.0)")
    else:
        print("\nMegatron-LM: not measured (set MEGATRON_LM_PATH to a Megatron-LM checkout)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"({time.perf_counter() - start:.0f} s)")
