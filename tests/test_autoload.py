"""The Megatron-LM route's start-up hook: silent and cheap without --plugin, complete with it."""

from __future__ import annotations

import json
import site
import sysconfig
import textwrap
from pathlib import Path

import pytest

from aquila_npu import plugin_manager
from aquila_npu.megatron_lm import arguments as megatron_lm
from aquila_npu.errors import AquilaNpuError

from conftest import run_python

PTH = "aquila_npu-autoload.pth"


def _installed_pth() -> Path:
    for directory in [sysconfig.get_paths()["purelib"], *site.getsitepackages()]:
        if (Path(directory) / PTH).is_file():
            return Path(directory) / PTH
    pytest.fail(f"{PTH} is not installed in site-packages; reinstall aquila-npu")


def test_pth_is_installed_and_identical_to_the_repository_copy():
    repo_copy = Path(__file__).resolve().parent.parent / PTH
    assert _installed_pth().read_text() == repo_copy.read_text()


def test_without_plugin_start_up_imports_nothing():
    """(The cost of the .pth line is measured in benchmarks/startup.py.)"""
    assert _installed_pth().read_text().startswith("import ")
    result = run_python("-X", "importtime", "-c", "pass", check=True)
    imported = {row.split("|")[-1].strip().split(".")[0] for row in result.stderr.splitlines() if "|" in row}
    assert not imported & {"aquila_npu", "torch", "megatron", "pluggy"}


SCRIPT = textwrap.dedent("""
    import json, os, sys
    import multiprocessing as mp

    def child(queue):
        import megatron.core.tensor_parallel.random as random
        queue.put(random._set_cuda_rng_state.__module__)

    if __name__ == "__main__":
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=child, args=(queue,))
        proc.start(); proc.join()
        print(json.dumps({"argv": sys.argv[1:], "plugins": os.environ.get("AQUILA_NPU_PLUGINS"),
                          "device": os.environ.get("AQUILA_NPU_DEVICE"), "child_rng_setter": queue.get()}))
""")


@pytest.fixture
def fake_megatron_script(tmp_path) -> Path:
    path = tmp_path / "pretrain_gpt.py"
    path.write_text(SCRIPT)
    return path


def test_plugin_expands_argv_and_patches_reach_child_processes(fake_megatron_script):
    result = run_python(str(fake_megatron_script), "--plugin", "aquila2", "--model", "aquila2-tiny", "--device",
                        "cpu", "--num-layers", "4", "--tensor-model-parallel-size", "2", check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    argv = report["argv"]
    assert "--plugin" not in argv and "--model" not in argv
    assert argv[argv.index("--num-layers") + 1] == "4" and argv.count("--num-layers") == 1  # the user's flag wins
    assert argv[argv.index("--hidden-size") + 1] == "128"
    assert argv[argv.index("--num-query-groups") + 1] == "4" and "--group-query-attention" in argv
    assert argv[argv.index("--spec") + 1:argv.index("--spec") + 3] == list(megatron_lm.LAYER_SPEC)
    assert argv[argv.index("--distributed-backend") + 1] == "gloo"
    assert "--transformer-impl" in argv and "--use-cpu-initialization" in argv
    assert (report["plugins"], report["device"]) == ("aquila2", "cpu")
    # a spawned child (as torch_dist checkpoint savers are) runs with the cpu patches applied too
    assert report["child_rng_setter"] == "aquila_npu.plugins.cpu"


@pytest.mark.parametrize("args,message", [
    (["--plugin", "nope"], "aquila-npu: error: unknown plugin 'nope'; installed plugins: aquila2, cpu, cuda, npu"),
    (["--plugin", "aquila2", "--model", "aquila2-8b"], "aquila-npu: error: unknown model 'aquila2-8b'; known "
                                                       "models: aquila2-7b, aquila2-34b, aquila2-70b-expr, aquila2-7b-16k, "
                                                       "aquila2-34b-16k, aquila2-tiny"),
    (["--plugin", "aquila2", "--device", "npu"], "aquila-npu: error: device 'npu' was requested but is not "
                                                 "available: torch_npu is not installed"),
])
def test_bad_plugin_arguments_fail_with_one_line(fake_megatron_script, args, message):
    if "npu" in args and plugin_manager.get().device_available("npu"):
        pytest.skip("this machine has an NPU")
    result = run_python(str(fake_megatron_script), *args)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(message) and len(result.stderr.strip().splitlines()) == 1


def test_our_own_drivers_and_launchers_are_left_alone(tmp_path):
    result = run_python("-c", "import sys, os; print(sys.argv[1:], os.environ.get('AQUILA_NPU_PLUGINS'))",
                        "--plugin", "aquila2", check=True)
    assert result.stdout.strip() == "['--plugin', 'aquila2'] None"


# ----------------------------------------------------------------------------------- expand_argv, pure
def test_expand_argv_precedence_user_then_spec_then_device():
    plugins = plugin_manager.get()
    argv, ours, device = megatron_lm.expand_argv(
        ["--plugin=aquila2", "--model", "aquila2-34b", "--device", "cpu", "--transformer-impl", "local",
         "--seq-length=1024", "--spec", "my.module", "my_spec"], plugins)
    assert ours.plugins == ["aquila2"] and ours.model == "aquila2-34b" and device == "cpu"
    assert "--seq-length=1024" in argv and "--seq-length" not in argv
    assert argv[argv.index("--spec") + 1:argv.index("--spec") + 3] == ["my.module", "my_spec"]
    assert argv.count("--spec") == 1 and argv.count("--transformer-impl") == 1
    assert argv[argv.index("--num-layers") + 1] == "60"


def test_expand_argv_takes_the_kernel_switches_and_checks_them_against_the_device():
    """Megatron-LM never sees the kernel switches (its own --use-flash-attn only concerns legacy models); a fused
    kernel the device lacks fails at start-up, in one line."""
    plugins = plugin_manager.get()
    argv, ours, _ = megatron_lm.expand_argv(
        ["--plugin", "aquila2", "--device", "cpu", "--use-flash-attn", "--use-fused-rmsnorm", "--no-use-fused-swiglu",
         "--seq-length", "64"], plugins)
    assert ours.kernels == {"attention": True, "rms_norm": True, "swiglu": False}
    assert not any(flag.startswith(("--use-f", "--no-use-f")) for flag in argv)
    encoded = plugin_manager.encode_kernel_request(ours.kernels)
    assert plugins.kernels("cpu", ours.kernels).fused == {"attention", "rms_norm"}
    assert encoded == "attention=1,rms_norm=1,swiglu=0"
    with pytest.raises(AquilaNpuError, match="--use-fused-rotary-pos-emb: the cpu device has no fused rotary kernel"):
        megatron_lm.expand_argv(["--plugin", "aquila2", "--device", "cpu", "--use-fused-rotary-pos-emb"], plugins)


def test_expand_argv_needs_values():
    with pytest.raises(AquilaNpuError, match="--model needs a value"):
        megatron_lm.split_our_args(["--plugin", "aquila2", "--model"])
