"""``aquila-npu doctor``: what this machine has for aquila-npu, and what the NPU path still lacks.

It reports the versions that matter (Python, torch, torch_npu, CANN, CUDA, megatron-core, transformers), every
device plugin's verdict on this machine (available, or why not) with its distributed backend, which implementation
each kernel seam of the layer uses on each device (by default, and under its flag), and a list of what is missing
before Aquila2 can run on an Ascend NPU. It only looks: nothing is initialised, no device memory is touched, and it
never fails on a machine that lacks something — that is what it reports.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
from dataclasses import dataclass, field

# where CANN's toolkit says which version it is (set_env.sh exports ASCEND_TOOLKIT_HOME / ASCEND_HOME_PATH)
CANN_HOMES = ("ASCEND_TOOLKIT_HOME", "ASCEND_HOME_PATH")
CANN_DEFAULT_HOME = "/usr/local/Ascend/ascend-toolkit/latest"
CANN_VERSION_FILES = ("version.cfg", "version.info", "compiler/version.info", "runtime/version.info")


@dataclass
class Report:
    versions: dict[str, str] = field(default_factory=dict)
    devices: list[dict] = field(default_factory=list)
    kernels: list[dict] = field(default_factory=list)
    npu_missing: list[str] = field(default_factory=list)
    selected: str | None = None


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cann_version(environ=os.environ) -> tuple[str | None, str | None]:
    """(version, toolkit folder) of the CANN toolkit, if one is found."""
    homes = [environ[name] for name in CANN_HOMES if environ.get(name)] + [CANN_DEFAULT_HOME]
    for home in homes:
        for name in CANN_VERSION_FILES:
            path = os.path.join(home, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8", errors="replace") as f:
                    for line in f:
                        key, _, value = line.partition("=")
                        if key.strip().lower() in ("version", "toolkit_version", "runtime_version") and value.strip():
                            return value.strip().strip('"'), home
                return "unknown", home
    return None, None


def collect() -> Report:
    import torch

    from aquila_npu import plugin_manager

    report = Report()
    cann, cann_home = cann_version()
    report.versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_npu": _version("torch_npu"),
        "CANN": f"{cann} ({cann_home})" if cann else "not found",
        "CUDA (torch build)": torch.version.cuda or "none (CPU build)",
        "megatron-core": _version("megatron-core"),
        "transformers": _version("transformers"),
        "aquila-npu": _version("aquila-npu"),
    }
    plugins = plugin_manager.get()
    for device, priority in plugins.devices().items():
        available = plugins.device_available(device)
        why = "" if available else (plugins.hook.aquila_npu_device_unavailable_reason(device=device) or "not available")
        report.devices.append({"device": device, "priority": priority, "available": "yes" if available else "no",
                               "backend": plugins.backend(device) or "", "why not": why})
        report.kernels += kernel_rows(device, plugins)
    report.selected = next((d["device"] for d in report.devices if d["available"] == "yes"), None)
    report.npu_missing = npu_missing(report, cann)
    return report


def kernel_rows(device: str, plugins) -> list[dict]:
    """Per op: its flag, what runs without the flag, and the device's fused kernel (what the flag selects)."""
    from aquila_npu.kernels.seams import FLAGS, OPS

    offered = plugins.fused_kernels(device)
    default = plugins.kernels(device).describe()
    return [{"device": device, "op": op, "flag": FLAGS[op], "without the flag": default[op],
             "fused kernel": offered[op].name if op in offered else "none (the flag is an error)"} for op in OPS]


def npu_missing(report: Report, cann: str | None) -> list[str]:
    """What stands between this machine and the NPU path, one line each (empty when nothing does)."""
    missing = []
    if cann is None:
        missing.append(f"the CANN toolkit: install it and `source set_env.sh` (looked at ${' / $'.join(CANN_HOMES)} "
                       f"and {CANN_DEFAULT_HOME})")
    if importlib.util.find_spec("torch_npu") is None:
        missing.append("torch_npu: `pip install \"aquila-npu[npu]\"`, or `pip install -e \".[npu]\"` in a checkout (a "
                       f"build matching torch {report.versions['torch'].split('+')[0]})")
    else:
        from aquila_npu.plugins.npu import torch_npu_matches, torch_npu_requirement

        torch_version, npu_version = report.versions["torch"], report.versions["torch_npu"]
        if not torch_npu_matches(torch_version, npu_version):
            missing.append(f"torch_npu {npu_version} is not built for torch {torch_version}: "
                           f"`pip install \"{torch_npu_requirement(torch_version)}\"`")
    npu = next((d for d in report.devices if d["device"] == "npu"), None)
    if npu is None:
        missing.append("the npu device plugin (aquila_npu.plugins.npu) is not registered: reinstall aquila-npu")
    elif npu["available"] != "yes" and not missing:
        missing.append(f"an NPU: {npu['why not']}")
    return missing


def render(report: Report) -> str:
    from aquila_npu.__main__ import _table

    lines = ["versions:"] + [f"  {name:20} {value}" for name, value in report.versions.items()]
    lines += ["", "devices (automatic selection takes the first available):",
              _table(report.devices, ["device", "priority", "available", "backend", "why not"])]
    lines += ["", f"selected device: {report.selected or 'none'}"]
    lines += ["", "kernels per device (the layer's seams; --no-<flag> selects the reference):",
              _table(report.kernels, ["device", "op", "flag", "without the flag", "fused kernel"])]
    lines += ["", "NPU path: " + ("ready" if not report.npu_missing else "missing")]
    lines += [f"  - {item}" for item in report.npu_missing]
    return "\n".join(lines)
