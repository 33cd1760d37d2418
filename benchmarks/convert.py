"""Checkpoint conversion at 7B scale: wall time, GB/s and peak memory, against `cp` of the same bytes.

Generates a synthetic Aquila2-7B-shaped Hugging Face checkpoint (random bf16, ~13.5 GB, in shards; never held whole
in memory), converts it to Megatron TP2/PP2 and back with `python -m aquila_npu.convert`, checks the round trip is
bit-exact, and copies the same bytes with `cp` as the disk-speed reference. Targets (issue 3): peak RSS <= 3 GB,
wall time <= 1.5x the copy.

    python benchmarks/convert.py [--workdir DIR] [--layers 32] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent


def synthetic_hf(path: Path, layers: int, shard_bytes: int = 2 * 2**30) -> int:
    """A 7B-shaped bf16 checkpoint written shard by shard; returns its size in bytes."""
    sys.path.insert(0, str(REPO))
    from aquila_npu.plugins.aquila2 import FAMILY
    from aquila_npu.weights import hf_shapes, llama_config_dict

    spec = FAMILY.spec("aquila2-7b").replace(num_layers=layers)
    path.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    shard, size, files, weight_map, total = {}, 0, [], {}, 0

    def flush():
        nonlocal shard, size
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for name, shape in hf_shapes(spec).items():
        tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        nbytes = tensor.numel() * 2
        if shard and size + nbytes > shard_bytes:
            flush()
        shard[name] = tensor
        size += nbytes
        total += nbytes
    flush()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    config = llama_config_dict(spec, 100006, 100007, 0)
    config["torch_dtype"] = "bfloat16"
    (path / "config.json").write_text(json.dumps(config))
    return total


# the step, then `sync`: each step pays for writing its own bytes to disk, none inherits another's dirty pages
PEAK_OF_CHILD = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
                 "subprocess.run(['sync'], check=True); "
                 "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def timed(command: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of one command and the `sync` of its writes, measured by a fresh parent so steps
    do not mix; earlier writes are flushed before the clock starts."""
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", PEAK_OF_CHILD, *command], check=True, capture_output=True,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    seconds = time.perf_counter() - start
    return seconds, int(result.stdout.strip().splitlines()[-1]) / 2**20


def same_tensors(a: Path, b: Path) -> bool:
    """Tensor-by-tensor comparison, one tensor in memory at a time."""
    def index(path):
        where = {}
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                where.update({k: file for k in f.keys()})
        return where

    left, right = index(a), index(b)
    if sorted(left) != sorted(right):
        return False
    for name in left:
        with safe_open(str(left[name]), framework="pt") as f, safe_open(str(right[name]), framework="pt") as g:
            x, y = f.get_tensor(name), g.get_tensor(name)
            if x.dtype != y.dtype or not torch.equal(x, y):
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/aquila-npu-convert-bench")
    parser.add_argument("--layers", type=int, default=32, help="32 = Aquila2-7B")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    nbytes = synthetic_hf(work / "hf", args.layers)
    print(f"synthetic checkpoint: {nbytes / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s", flush=True)
    subprocess.run(["sync"], check=True)

    rows = []
    seconds, rss = timed(["cp", "-r", str(work / "hf"), str(work / "copy")])
    rows.append(("cp -r (disk reference)", seconds, rss))
    shutil.rmtree(work / "copy")
    convert = [sys.executable, "-m", "aquila_npu.convert", "--no-progress"]
    seconds, rss = timed(convert + ["--load-dir", str(work / "hf"), "--save-dir", str(work / "mg"),
                                    "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2"])
    rows.append(("HF -> Megatron TP2/PP2 (torch)", seconds, rss))
    seconds, rss = timed(convert + ["--load-dir", str(work / "mg"), "--save-dir", str(work / "back"),
                                    "--load-model-type", "mg", "--save-model-type", "hf"])
    rows.append(("Megatron TP2/PP2 -> HF", seconds, rss))
    exact = same_tensors(work / "hf", work / "back")

    copy_seconds = rows[0][1]
    print(f"\n7B-shaped ({args.layers} layers) bf16 checkpoint, {nbytes / 1e9:.2f} GB; round trip bit-exact: {exact}")
    print(f"{'step':34} {'seconds':>8} {'GB/s':>7} {'peak RSS GB':>12} {'x cp time':>10}")
    for name, seconds, rss in rows:
        print(f"{name:34} {seconds:8.1f} {nbytes / seconds / 1e9:7.2f} {rss:12.2f} {seconds / copy_seconds:10.2f}")
    print("targets: peak RSS <= 3 GB, wall time <= 1.5x cp")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
