"""``aquila-npu doctor`` on a CPU-only machine (what CI has): it reports, and says what the NPU path lacks."""

from __future__ import annotations

import importlib.metadata

import torch

from conftest import run_python


def test_doctor_reports_this_cpu_machine():
    result = run_python("-m", "aquila_npu", "doctor", check=True)
    out = result.stdout
    assert f"torch                {torch.__version__}" in out
    assert f"megatron-core        {importlib.metadata.version('megatron-core')}" in out
    devices = out.split("devices (")[1].split("selected device")[0]
    rows = {line.split()[0]: line.split() for line in devices.splitlines() if line.split()[:1] in (["cpu"], ["cuda"],
                                                                                                   ["npu"])}
    assert rows["cpu"][1:4] == ["100", "yes", "gloo"]
    assert rows["npu"][1:4] == ["300", "no", "hccl"]
    assert "selected device: cpu" in out
    kernels = out.split("kernels per device")[1].split("NPU path")[0]
    rows = {tuple(line.split()[:2]): line for line in kernels.splitlines()[3:] if line.strip()}
    assert len(rows) == 12  # four ops on each of the three devices
    assert "reference RMSNorm" in rows["cpu", "rms_norm"] and "torch.nn.functional.rms_norm" in rows["cpu", "rms_norm"]
    assert rows["cpu", "rotary"].endswith("none (the flag is an error)")
    assert rows["npu", "attention"].split()[2:] == ["--use-flash-attn", "torch_npu.npu_fusion_attention",
                                                   "torch_npu.npu_fusion_attention"]
    assert "NPU path: missing" in out and "torch_npu: `pip install \"aquila-npu[npu]\"`" in out


def test_cann_version_is_read_from_the_toolkit(tmp_path):
    from aquila_npu.doctor import cann_version

    (tmp_path / "version.cfg").write_text("# CANN\nversion=8.0.RC2\n")
    assert cann_version({"ASCEND_TOOLKIT_HOME": str(tmp_path)}) == ("8.0.RC2", str(tmp_path))
    assert cann_version({"ASCEND_HOME_PATH": str(tmp_path / "absent")})[0] in (None, cann_version({})[0])


def test_npu_missing_names_each_gap():
    from aquila_npu.doctor import Report, npu_missing

    report = Report(versions={"torch": "2.13.0+cpu", "torch_npu": "not installed"},
                    devices=[{"device": "npu", "available": "no", "why not": "no NPU"}])
    missing = npu_missing(report, cann=None)
    assert any("CANN" in m for m in missing) and any("torch_npu" in m for m in missing)
    assert npu_missing(Report(versions=report.versions, devices=[]), cann="8.0")[-1].startswith(
        "the npu device plugin")
