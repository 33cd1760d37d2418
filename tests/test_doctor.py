"""``aquila-npu doctor`` on a CPU-only machine (what CI has): it reports, and says what the NPU path lacks."""

from __future__ import annotations

import importlib.metadata

import pytest
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
    npu_attention = "torch_npu.npu_fusion_attention/npu_fused_infer_attention_score"
    assert rows["npu", "attention"].split()[2:] == ["--use-flash-attn", npu_attention, npu_attention]
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


def test_npu_missing_holds_torch_npu_to_the_build_rule(monkeypatch):
    """torch_npu A.B.C(.postN) is built for torch A.B.C: a build for another patch release is a gap, named with the
    requirement that fixes it."""
    import importlib.util

    from aquila_npu import doctor
    from aquila_npu.doctor import Report, npu_missing

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(doctor.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "torch_npu" else find_spec(name, *a))

    devices = [{"device": "npu", "available": "yes"}]
    for npu_version in ("2.13.0", "2.13.0.post2"):
        assert npu_missing(Report(versions={"torch": "2.13.0+cpu", "torch_npu": npu_version}, devices=devices),
                           cann="8.5.0") == []
    missing = npu_missing(Report(versions={"torch": "2.13.1", "torch_npu": "2.13.0"}, devices=devices), cann="8.5.0")
    assert missing == ['torch_npu 2.13.0 is not built for torch 2.13.1: `pip install "torch_npu==2.13.1.*"`']


# ------------------------------------------------------------------ doctor --check
@pytest.mark.slow
def test_doctor_check_passes_on_this_cpu_and_prints_its_table():
    """Every check the cpu device has: its fused kernels (PyTorch's rms_norm and SDPA, as --use-fused-rmsnorm /
    --use-flash-attn select them) at 7B shapes, fp32 and bf16, forward and backward; the tiny training step and
    the KV-cache decode against the reference kernels; an all-reduce over two gloo processes."""
    result = run_python("-m", "aquila_npu", "doctor", "--check", timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    lines = result.stdout.splitlines()
    table = {line.split("  ")[0].strip(): line for line in lines}
    assert lines[-1] == "verdict: cpu: all 9 checks passed", result.stdout
    for check in ("rms_norm: torch.nn.functional.rms_norm, 7B", "attention: torch scaled_dot_product_attention, 7B",
                  "attention: torch scaled_dot_product_attention, 34B GQA"):
        assert sum(line.startswith(check) and line.rstrip().endswith("ok") for line in lines) == 2, check
    assert "3/3 rows equal" in table["aquila2-tiny greedy decode, KV cache, left-padded batch, vs reference kernels"]
    assert table["all-reduce over 2 cpu processes (gloo)"].rstrip().endswith("ok")
    assert "skipped: the cpu device does not use CANN" in result.stdout


def test_a_broken_kernel_makes_doctor_check_fail_naming_the_op(monkeypatch, capfd):
    """rms_norm that forgets its weight: its kernel rows, the model's training step and the decode fail, the
    verdict names them (attention passes), and the command exits 1."""
    from aquila_npu import __main__ as cli
    from aquila_npu.kernels import pytorch, reference

    def forgets_the_weight(x, weight, eps):
        return reference.rms_norm(x, torch.ones_like(weight), eps)

    monkeypatch.setattr(pytorch.TorchRMSNorm, "kernel", staticmethod(forgets_the_weight))
    status = cli.main(["doctor", "--check", "--no-all-reduce"])
    out = capfd.readouterr().out
    assert status == 1
    verdict = out.strip().splitlines()[-1]
    assert verdict == ("verdict: cpu: 4 check(s) FAILED: rms_norm: torch.nn.functional.rms_norm, 7B [float32]; "
                       "rms_norm: torch.nn.functional.rms_norm, 7B [bfloat16]; aquila2-tiny training step (logits, "
                       "weight gradients) vs reference kernels [float32]; aquila2-tiny greedy decode, KV cache, "
                       "left-padded batch, vs reference kernels [bfloat16]"), out


def test_cann_release_of_a_torch_npu_comes_from_its_own_table():
    """torch_npu's compatibility table (its PyPI description, in the installed METADATA) names the CANN release of
    each torch_npu build; a build newer than the table needs at least the newest CANN listed."""
    from aquila_npu.doctor_check import cann_key, cann_required

    table = """| CANN Version          | Supported PyTorch Version | Supported Extension Version | Github Branch     |
|-----------------------|---------------------------|-----------------------------|-------------------|
| CANN 8.5.0            | 2.12.0                    | 2.12.0rc1                   | v2.12.0           |
|                       | 2.9.0                     | 2.9.0                       | v2.9.0-7.3.0      |
| CANN 8.1.RC1          | 2.5.1                     | 2.5.1                       | v2.5.1-7.0.0      |
|                       | 2.1.0                     | 2.1.0.post12                | v2.1.0-7.0.0      |"""
    assert cann_required(table, "2.1.0.post12") == ("8.1.RC1", True)
    assert cann_required(table, "2.9.0") == ("8.5.0", True)
    assert cann_required(table, "2.13.0") == ("8.5.0", False)
    assert cann_key("8.0.RC2") < cann_key("8.0.RC3") < cann_key("8.0.0") < cann_key("8.1.RC1") < cann_key("8.5.0")


@pytest.mark.parametrize("toolkit, verdict", [("8.5.0", "ok"), ("8.3.RC1", "FAIL"), (None, "FAIL")])
def test_cann_check_compares_the_toolkit_with_the_release(monkeypatch, toolkit, verdict):
    import importlib.metadata
    import types

    from aquila_npu import doctor, doctor_check

    payload = "| CANN 8.5.0 | 2.12.0 | 2.12.0rc1 | v2.12.0 |"
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.13.0")
    monkeypatch.setattr(importlib.metadata, "metadata", lambda name: types.SimpleNamespace(get_payload=lambda: payload))
    monkeypatch.setattr(doctor, "cann_version", lambda: (toolkit, "/usr/local/Ascend"))
    row = doctor_check.cann_row("npu")
    assert row.result.startswith(verdict), row
    assert row.tolerance == ">= 8.5.0 for torch_npu 2.13.0"
