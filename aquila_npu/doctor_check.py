"""``aquila-npu doctor --check``: does this build work on this machine's device? One command, one table, a verdict.

On the device it selects (npu, cuda or cpu; ``--device`` forces one) it runs:

* **kernels**: every fused kernel the device offers (and the inference operator where attention has its own)
  against the plain-PyTorch reference on Aquila2-7B-shaped tensors (hidden 4096, 32 heads of 128, FFN 11008; the
  attention also 34B's 48 heads over 8 groups), forward and backward, fp32 and bf16: the largest error beside its
  tolerance (fp32: the kernel tests'; bf16: bf16's own rounding, see ``compare_op``);
* **model**: on the model families' smoke-test model (``aquila2``'s tiny one), a training step (logits and every
  weight gradient) with the device's fused kernels against the reference kernels, from the same weights; a greedy
  bf16 decode with the KV cache (a left-padded batch of three prompts) with both kernel sets, token for token;
* **all-reduce** across the local devices through the device's backend (``torchrun``; the CPU: two gloo processes;
  one device: skipped, saying so);
* **CANN**: the toolkit's version against the one the installed torch_npu was released for (torch_npu's own
  compatibility table), on the npu device.

Exit status 1 when any check fails, naming it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import torch

from aquila_npu.errors import AquilaNpuError

TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}
SEQ, BATCH = 256, 1
SHAPES_7B = dict(hidden=4096, heads=32, groups=32, head_dim=128, ffn=11008)
SHAPES_34B_ATTENTION = dict(heads=48, groups=8, head_dim=128)
DECODE_PROMPTS = ["Aquila2 is", "悟道·天鹰（Aquila2）是北京智源人工智能研究院发布的", "Megatron splits each layer"]


@dataclass
class Row:
    check: str
    dtype: str = ""
    error: str = ""
    tolerance: str = ""
    result: str = "ok"  # ok | FAIL | skipped: why

    @property
    def failed(self) -> bool:
        return self.result.startswith("FAIL")


# ------------------------------------------------------------------------------------------------ kernels
def _inputs(op: str, role: str, generator: torch.Generator, shapes: dict) -> list[torch.Tensor]:
    s, b = SEQ, BATCH
    if op == "rms_norm":
        return [torch.randn(s, b, SHAPES_7B["hidden"], generator=generator),
                1 + 0.1 * torch.randn(SHAPES_7B["hidden"], generator=generator)]
    if op == "swiglu":
        return [torch.randn(s, b, 2 * SHAPES_7B["ffn"], generator=generator)]
    if op == "rotary":
        d = SHAPES_7B["head_dim"]
        freqs = torch.outer(torch.arange(s).float(), 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
        return [torch.randn(s, b, SHAPES_7B["heads"], d, generator=generator), angles.cos(), angles.sin()]
    heads, groups, d = shapes["heads"], shapes["groups"], shapes["head_dim"]
    q = torch.randn(s, b, heads, d, generator=generator)
    k, v = (torch.randn(s, b, groups, d, generator=generator) for _ in range(2))
    return [q, k, v]


def _reference(op: str) -> Callable:
    from aquila_npu.kernels import reference

    return {"rms_norm": lambda x, w: reference.rms_norm(x, w, 1e-5), "swiglu": reference.swiglu,
            "rotary": reference.apply_rotary,
            "attention": lambda q, k, v: reference.attention(q, k, v, q.shape[-1] ** -0.5)}[op]


def _bind(op: str, fn: Callable) -> Callable:
    if op == "rms_norm":
        return lambda x, w: fn(x, w, 1e-5)
    if op == "attention":
        return lambda q, k, v: fn(q, k, v, q.shape[-1] ** -0.5)
    return fn


def _max_error(ours: torch.Tensor, theirs: torch.Tensor, atol: float, rtol: float) -> tuple[float, bool]:
    ours, theirs = ours.detach().float().cpu(), theirs.detach().float().cpu()
    difference = (ours - theirs).abs()
    return float(difference.max()), bool((difference <= atol + rtol * theirs.abs()).all())


def _run(fn: Callable, inputs: list[torch.Tensor], dtype: torch.dtype, device: str, backward: bool
         ) -> list[torch.Tensor]:
    """[output, input gradients...] of ``fn`` on ``device`` in ``dtype``, as float32 on the CPU; the upstream
    gradient is the same for every run (seeded, of the output's shape)."""
    xs = [x.detach().to(device, dtype).requires_grad_(backward) for x in inputs]
    with torch.set_grad_enabled(backward):
        out = fn(*xs)
    results = [out]
    if backward:
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        out.backward(grad.to(device, dtype))
        results += [torch.zeros_like(x) if x.grad is None else x.grad for x in xs]  # no gradient: all wrong
    return [r.detach().float().cpu() for r in results]


def compare_op(fn: Callable, ref: Callable, inputs: list[torch.Tensor], dtype: torch.dtype, device: str,
               backward: bool = True) -> tuple[float, bool, str]:
    """(the largest error of ``fn`` on ``device`` — output, then each input gradient — whether it is within the
    tolerance, the tolerance). fp32: against the reference, within the kernel tests' tolerance. bf16: against the
    reference computed in fp32, per tensor no more than twice the reference's own bf16 error or 2% of the tensor's
    largest value (a few bf16 steps at its top), plus 1e-3: at 7B sizes bf16 rounding alone exceeds any fixed
    tolerance, so bf16's own rounding is the yardstick."""
    ours = _run(fn, inputs, dtype, device, backward)
    if dtype == torch.float32:
        atol, rtol = TOLERANCE[dtype]
        checks = [_max_error(a, b, atol, rtol) for a, b in zip(ours, _run(ref, inputs, dtype, "cpu", backward))]
        return max(e for e, _ in checks), all(ok for _, ok in checks), f"atol {atol:g}, rtol {rtol:g}"
    exact = _run(ref, inputs, torch.float32, "cpu", backward)
    rounded = _run(ref, inputs, dtype, "cpu", backward)
    worst, good, allowed = 0.0, True, 0.0
    for a, r, e in zip(ours, rounded, exact):
        error, own = float((a - e).abs().max()), float((r - e).abs().max())
        bound = max(2 * own, 2e-2 * float(e.abs().max())) + 1e-3
        worst, allowed, good = max(worst, error), max(allowed, bound), good and error <= bound
    return worst, good, f"bf16 rounding ({allowed:.2e})"


def kernel_rows(device: str, plugins, torch_device: str) -> list[Row]:
    rows = []
    offered = plugins.fused_kernels(device)
    if not offered:
        return [Row("kernels", result=f"skipped: the {device} device offers no fused kernel")]
    for op, kernel in offered.items():
        try:
            functions = kernel.functions()
        except ImportError as exc:
            rows.append(Row(f"{op}: {kernel.name}", result=f"FAIL: cannot import it ({exc})"))
            continue
        if not functions:
            rows.append(Row(f"{op}: {kernel.name}", result="skipped: inside a megatron-core module (model check)"))
        cases = [("7B", SHAPES_7B)] + ([("34B GQA", SHAPES_34B_ATTENTION)] if op == "attention" else [])
        for role, fn in functions.items():
            for shape_name, shapes in cases:
                for dtype in (torch.float32, torch.bfloat16):
                    label = f"{op}{' (inference)' if role else ''}: {kernel.name}, {shape_name}"
                    backward = role != "inference"
                    inputs = _inputs(op, role, torch.Generator().manual_seed(0), shapes)
                    row = Row(label, str(dtype).replace("torch.", ""))
                    try:
                        error, ok, row.tolerance = compare_op(_bind(op, fn), _reference(op), inputs, dtype,
                                                              torch_device, backward)
                        row.error = f"{error:.2e}"
                        row.result = "ok" if ok else "FAIL: beyond the tolerance"
                    except Exception as exc:  # a kernel that does not run on this device is a finding, not a crash
                        row.result = f"FAIL: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                    rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ model
def model_rows(device: str, plugins) -> list[Row]:
    """Inside the megatron world ``run`` brought up (with the device's fused kernels)."""
    from aquila_npu import plugin_manager
    from aquila_npu.kernels.seams import OPS

    offered = plugins.fused_kernels(device)
    if not offered:
        return [Row("model", result=f"skipped: the {device} device offers no fused kernel")]
    fused_request = {op: op in offered for op in OPS}
    reference_request = {op: False for op in OPS}
    spec = smoke_test_spec(plugins)
    rows = [_training_step_row(spec, plugins.kernels(device, fused_request), plugins.kernels(device,
                                                                                            reference_request))]
    try:
        rows.append(_decode_row(spec, fused_request, reference_request))
    finally:
        plugin_manager.set_kernel_request(fused_request)
    return rows


def smoke_test_spec(plugins):
    """The first model family's smoke-test model (the tiny one its tests and the quickstart run)."""
    names = [f.smoke_test_model for f in plugins.families().values() if f.smoke_test_model]
    if not names:
        raise AquilaNpuError("no installed model family names a smoke-test model; install the aquila2 plugin")
    return plugins.find_model(names[0])[1]


def _training_step_row(spec, fused, reference) -> Row:
    from aquila_npu.model import build_gpt_model

    row = Row(f"{spec.name} training step (logits, weight gradients) vs reference kernels", "float32",
              tolerance="atol 1e-5, rtol 1e-4")
    try:
        models = []
        for kernel_set in (reference, fused):
            torch.manual_seed(0)
            models.append(build_gpt_model(spec, kernels=kernel_set, parallel_output=False,
                                          params_dtype=torch.float32))
        models[1].load_state_dict(models[0].state_dict())
        device = next(models[0].parameters()).device
        tokens = torch.randint(0, spec.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1)).to(device)
        positions = torch.arange(32, device=device)[None].expand(2, 32)
        outputs = [model(tokens, positions, None) for model in models]
        worst, good = _max_error(outputs[1], outputs[0], 1e-5, 1e-4)
        for output in outputs:
            output.float().logsumexp(-1).sum().backward()
        grads = [dict(model.named_parameters()) for model in models]
        for name, parameter in grads[0].items():
            ours = grads[1][name].grad
            error, ok = _max_error(torch.zeros_like(parameter) if ours is None else ours, parameter.grad, 1e-5, 1e-4)
            worst, good = max(worst, error), good and ok
        row.error, row.result = f"{worst:.2e}", "ok" if good else "FAIL: beyond the tolerance"
    except Exception as exc:
        row.result = f"FAIL: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return row


def _decode_row(spec, fused_request, reference_request) -> Row:
    from aquila_npu import plugin_manager
    from aquila_npu import sample_data
    from aquila_npu.generate import GenerateOptions, SamplingOptions, TextGenerator
    from aquila_npu.parity import save_random_hf_model

    row = Row(f"{spec.name} greedy decode, KV cache, left-padded batch, vs reference kernels", "bfloat16",
              tolerance="same tokens")
    try:
        with tempfile.TemporaryDirectory(prefix="aquila-npu-doctor-") as folder:
            save_random_hf_model(spec, folder, seed=5)
            completions = []
            for request in (reference_request, fused_request):
                plugin_manager.set_kernel_request(request)
                generator = TextGenerator(GenerateOptions(
                    load=folder, tokenizer_name_or_path=str(sample_data.path("aquila2_tokenizer")),
                    load_model_type="hf", model=spec.name, params_dtype="bf16", max_batch_size=3))
                results = generator.generate(DECODE_PROMPTS, SamplingOptions(max_new_tokens=8, greedy=True))
                completions.append([r.tokens for r in results])
        same = sum(a == b for a, b in zip(*completions))
        row.error = f"{same}/{len(DECODE_PROMPTS)} rows equal"
        row.result = "ok" if same == len(DECODE_PROMPTS) else "FAIL: the tokens differ"
    except Exception as exc:
        row.result = f"FAIL: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return row


# ------------------------------------------------------------------------------------------------ all-reduce
def local_device_count(device: str) -> int:
    if device == "cpu":
        return 2  # two gloo processes: the CPU route's multi-rank jobs
    runtime = getattr(torch, device, None)
    return runtime.device_count() if runtime is not None else 0


def all_reduce_row(device: str) -> Row:
    from aquila_npu.distributed import free_port

    count = local_device_count(device)
    row = Row(f"all-reduce over {count} local {device} device(s)" if device != "cpu" else
              "all-reduce over 2 cpu processes (gloo)")
    if count < 2:
        row.result = f"skipped: this machine has {count} {device} device(s); an all-reduce needs two"
        return row
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(count), "--master-port",
               str(free_port()), "-m", "aquila_npu.doctor_check", "--all-reduce-worker", device]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    row.error = f"{time.perf_counter() - started:.1f} s"
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        row.result = f"FAIL: exit {result.returncode}: {last[:150]}"
    elif "all-reduce ok" not in result.stdout:
        row.result = "FAIL: the ranks did not report the expected sum"
    return row


def _all_reduce_worker(device: str) -> int:
    import torch.distributed as dist

    from aquila_npu import plugin_manager

    plugins = plugin_manager.get()
    plugins.hook.aquila_npu_prepare_process(device=device)
    torch_device = plugins.hook.aquila_npu_initialize_device(device=device,
                                                             local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=plugins.backend(device))
    rank, world = dist.get_rank(), dist.get_world_size()
    value = torch.full((1024,), float(rank + 1), device=torch_device)
    dist.all_reduce(value)
    expected = world * (world + 1) / 2
    ok = bool((value.cpu() == expected).all())
    dist.destroy_process_group()
    if rank == 0 and ok:
        print("all-reduce ok", flush=True)
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------------ CANN
def cann_required(metadata: str, torch_npu_version: str) -> tuple[str | None, bool]:
    """(the CANN release torch_npu's own compatibility table lists for this torch_npu version, exact): exact is
    False when the version is newer than the table's rows, and the newest CANN listed is then the minimum."""
    cann, newest = None, None
    for line in metadata.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not re.match(r"\d", cells[2] or ""):
            continue
        if cells[0].startswith("CANN"):
            cann = cells[0].removeprefix("CANN").strip()
            newest = newest or cann
        if cells[2] == torch_npu_version and cann:
            return cann, True
    return newest, False


def cann_key(version: str) -> tuple:
    """Sortable CANN release: 8.0.RC2 < 8.0.RC3 < 8.0.0 < 8.1.RC1."""
    parts = version.upper().split(".")
    numbers = [int(p) if p.isdigit() else -1 for p in parts[:3]]
    rc = next((int(p[2:]) for p in parts if p.startswith("RC") and p[2:].isdigit()), 0)
    return (*numbers, rc)


def cann_row(device: str) -> Row:
    import importlib.metadata

    from aquila_npu.doctor import cann_version

    row = Row("CANN toolkit vs the installed torch_npu")
    if device != "npu":
        row.result = f"skipped: the {device} device does not use CANN"
        return row
    try:
        version = importlib.metadata.version("torch_npu")
        metadata = importlib.metadata.metadata("torch_npu").get_payload() or ""
    except importlib.metadata.PackageNotFoundError:
        row.result = "FAIL: torch_npu is not installed as a distribution"
        return row
    found, home = cann_version()
    required, exact = cann_required(str(metadata), version)
    row.error = f"CANN {found or 'not found'}"
    row.tolerance = (f"{'' if exact else '>= '}{required} for torch_npu {version}" if required else
                     f"torch_npu {version}: no table")
    if found is None:
        row.result = "FAIL: no CANN toolkit found (source CANN's set_env.sh)"
    elif required and found != "unknown" and (cann_key(found) < cann_key(required) if not exact
                                             else cann_key(found)[:2] != cann_key(required)[:2]):
        row.result = f"FAIL: torch_npu {version} is released for CANN {required}"
    elif required is None or found == "unknown":
        row.result = "ok (not verifiable: no version to compare)"
    return row


# ------------------------------------------------------------------------------------------------ the command
def run(device: str | None = None, all_reduce: bool = True) -> tuple[list[Row], str]:
    from aquila_npu import distributed, plugin_manager
    from aquila_npu.kernels.seams import OPS

    plugins = plugin_manager.get()
    device = plugins.select_device(device)
    offered = plugins.fused_kernels(device)
    with distributed.megatron_world(device=device, kernels={op: op in offered for op in OPS}) as world:
        rows = kernel_rows(device, plugins, str(world.torch_device or "cpu"))
        rows += model_rows(device, plugins)
    if all_reduce:
        rows.append(all_reduce_row(device))
    rows.append(cann_row(device))
    return rows, device


def render(rows: list[Row], device: str) -> str:
    from aquila_npu.__main__ import _table

    table = _table([vars(r) | {"max error": r.error} for r in rows], ["check", "dtype", "max error", "tolerance",
                                                                      "result"])
    failed = [f"{r.check} [{r.dtype}]" if r.dtype else r.check for r in rows if r.failed]
    verdict = (f"verdict: {device}: all {sum(not r.result.startswith('skipped') for r in rows)} checks passed" if
               not failed else f"verdict: {device}: {len(failed)} check(s) FAILED: " + "; ".join(failed))
    return f"aquila-npu doctor --check on {device}\n{table}\n{verdict}"


if __name__ == "__main__" and sys.argv[1:2] == ["--all-reduce-worker"]:
    sys.exit(_all_reduce_worker(sys.argv[2]))
