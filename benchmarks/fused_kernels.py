"""Kernel speed: each fused kernel that runs on this machine against the plain-PyTorch reference it replaces, side
by side in one process, on Aquila2-7B-shaped tensors (hidden 4096, 32 heads of 128, 8 key/value groups as GQA
would have them, SwiGLU width 11008).

Each figure is the median wall time of a forward and backward pass (``--repeat`` timed runs taken in turns, after
one warm-up run each, which also compiles what ``torch.compile`` compiles). The ratio is reference time over the
kernel's: above 1, the kernel is faster. The NPU kernels cannot run here and are not listed. No target is set by the
issue; these figures say what the flags buy on each device.

    python benchmarks/fused_kernels.py [--device cpu|cuda] [--dtype fp32|bf16] [--seq-length 1024] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

HIDDEN, HEADS, GROUPS, HEAD_DIM, FFN = 4096, 32, 8, 128, 11008


def timed(fn, inputs, device) -> float:
    """Seconds for one forward and backward of ``fn`` on fresh leaves of ``inputs``."""
    leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn(*leaves).float().sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def cases(seq: int, dtype, device):
    """(op, input tensors, {implementation: fn}) with the reference first."""
    from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl

    from aquila_npu.kernels import pytorch, reference

    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    x, w = randn(seq, 1, HIDDEN), 1 + 0.1 * randn(HIDDEN)
    yield "rms_norm", [x, w], {"reference": lambda x, w: reference.rms_norm(x, w, 1e-5),
                               "torch.nn.functional.rms_norm": lambda x, w: pytorch.rms_norm(x, w, 1e-5)}
    q, k, v = randn(seq, 1, HEADS, HEAD_DIM), randn(seq, 1, GROUPS, HEAD_DIM), randn(seq, 1, GROUPS, HEAD_DIM)
    scale = HEAD_DIM ** -0.5
    yield "attention (GQA, causal)", [q, k, v], {
        "reference": lambda q, k, v: reference.attention(q, k, v, scale),
        "torch SDPA": lambda q, k, v: pytorch.attention(q, k, v, scale)}
    fc1 = randn(seq, 1, 2 * FFN)
    yield "swiglu", [fc1], {"reference": reference.swiglu,
                            "megatron-core fused bias-SwiGLU": lambda t: bias_swiglu_impl(t, None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # megatron-core's import-time notes (no Apex, no Transformer Engine)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    print(f"device {args.device}, {args.dtype}, seq {args.seq_length}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {args.repeat} forward+backward runs")
    print(f"{'op':26} {'implementation':34} {'ms':>9} {'x reference':>12}")
    for op, inputs, implementations in cases(args.seq_length, dtype, args.device):
        for fn in implementations.values():
            timed(fn, inputs, args.device)  # warm-up (and torch.compile)
        times = {name: [] for name in implementations}
        for _ in range(args.repeat):
            for name, fn in implementations.items():
                times[name].append(timed(fn, inputs, args.device))
        reference_time = statistics.median(times["reference"])
        for name, values in times.items():
            median = statistics.median(values)
            print(f"{op:26} {name:34} {median * 1e3:9.2f} {reference_time / median:12.2f}")


if __name__ == "__main__":
    main()
