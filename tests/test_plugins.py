"""The plugin contract and the `aquila-npu plugins` command line."""

from __future__ import annotations

import importlib.metadata
import inspect
import types

import pytest

from aquila_npu import hookimpl, hookspecs, plugin_manager
from aquila_npu.errors import AquilaNpuError
from aquila_npu.specs import ModelFamily, ModelSpec

from conftest import run_python

BUILT_IN = {"aquila2", "cpu", "cuda", "npu"}


def test_built_in_plugins_are_registered_through_entry_points():
    group = importlib.metadata.entry_points(group=plugin_manager.ENTRY_POINT_GROUP)
    assert BUILT_IN <= {ep.name for ep in group}
    assert all(ep.value.startswith("aquila_npu.") for ep in group if ep.name in BUILT_IN)
    assert BUILT_IN <= set(plugin_manager.get().names())


def test_every_hookspec_is_documented_and_every_hookimpl_is_known():
    specs = {name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("aquila_npu_")}
    assert len(specs) >= 9
    for name in specs:
        assert (getattr(hookspecs, name).__doc__ or "").strip(), f"{name} has no docstring"
    plugins = plugin_manager.get()
    plugins.pm.check_pending()  # raises for a hookimpl without a hookspec
    for name in BUILT_IN:
        assert set(plugins.hooks_of(name)) <= specs


def test_only_the_aquila2_plugin_knows_aquila2():
    """The family is declared in one file; every other module finds it through the hooks."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    offenders = [str(p.relative_to(root)) for p in [*root.glob("aquila_npu/**/*.py"), *root.glob("plugins/*.py"),
                                                   *root.glob("kernels/*.py")]
                 if p.name != "aquila2.py" and "aquila2-" in p.read_text()]
    assert offenders == []


def test_device_selection_on_this_machine():
    plugins = plugin_manager.get()
    assert list(plugins.devices())[:3] == ["npu", "cuda", "cpu"]
    assert plugins.select_device("cpu") == "cpu"
    expected = next(d for d in ("npu", "cuda", "cpu") if plugins.device_available(d))
    assert plugins.select_device() == expected == plugins.select_device("auto")


def test_unavailable_and_unknown_devices_fail_clearly():
    plugins = plugin_manager.get()
    if not plugins.device_available("npu"):
        with pytest.raises(AquilaNpuError, match=r"device 'npu' was requested but is not available: torch_npu"):
            plugins.select_device("npu")
    with pytest.raises(AquilaNpuError, match=r"unknown device 'tpu'; known devices: npu, cuda, cpu"):
        plugins.select_device("tpu")


def test_a_third_party_plugin_adds_a_family_and_a_device():
    plugins = plugin_manager.Plugins(plugin_manager.get().pm)
    spec = ModelSpec(name="toy-1", num_layers=1, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                     num_query_groups=4, seq_length=32, max_position_embeddings=32, vocab_size=1000)
    plugin = types.ModuleType("toy_plugin")
    plugin.aquila_npu_model_family = hookimpl(lambda: ModelFamily(name="toy", specs=(spec,)))
    plugin.aquila_npu_devices = hookimpl(lambda: {"toydev": 999})
    plugin.aquila_npu_device_available = hookimpl(lambda device: (device == "toydev") or None)
    plugin.aquila_npu_distributed_backend = hookimpl(lambda device: "gloo" if device == "toydev" else None)
    plugins.pm.register(plugin, name="toy")
    try:
        assert plugins.find_model("toy-1") == (plugins.families()["toy"], spec)
        assert plugins.model_names(["toy"]) == ["toy-1"]
        assert plugins.select_device() == "toydev" and plugins.backend("toydev") == "gloo"
        with pytest.raises(AquilaNpuError, match="unknown model 'aquila2-7b'; known models: toy-1"):
            plugins.find_model("aquila2-7b", ["toy"])
    finally:
        plugins.pm.unregister(plugin)


# ----------------------------------------------------------------------------------- command line
def test_cli_lists_plugins_hooks_specs_and_devices():
    result = run_python("-m", "aquila_npu", "plugins", check=True)
    out = result.stdout
    for name in BUILT_IN:
        assert f"aquila_npu.plugins.{name}" in out
    assert "model_family" in out and "register_patches" in out
    for model, row in {"aquila2-7b": "32      4096    11008  32     32", "aquila2-34b": "60      6144    24576  48     8"}.items():
        line = next(line for line in out.splitlines() if line.startswith(model + " "))
        assert " ".join(row.split()) in " ".join(line.split())
    assert "cpu     100       yes        gloo" in out


def test_cli_shows_one_spec_with_its_megatron_flags():
    out = run_python("-m", "aquila_npu", "plugins", "--model", "aquila2-34b", check=True).stdout
    assert "--num-query-groups 8" in out and "--group-query-attention" in out and "--num-layers 60" in out


@pytest.mark.parametrize("args,message", [
    (["--plugin", "nope"], "aquila-npu: error: unknown plugin 'nope'; installed plugins: aquila2, cpu, cuda, npu"),
    (["--model", "aquila2-8b"], "aquila-npu: error: unknown model 'aquila2-8b'; known models: aquila2-7b, "
                                "aquila2-34b, aquila2-70b-expr, aquila2-7b-16k, aquila2-34b-16k, aquila2-tiny"),
    (["--patches", "--device", "tpu"], "aquila-npu: error: unknown device 'tpu'; known devices: npu, cuda, cpu"),
])
def test_cli_unknown_names_fail_with_one_line(args, message):
    result = run_python("-m", "aquila_npu", "plugins", *args)
    assert result.returncode == 2
    assert result.stderr.strip() == message
    assert "Traceback" not in result.stderr


def test_cli_lists_patches_with_targets_and_reasons():
    result = run_python("-m", "aquila_npu", "plugins", "--patches", "--device", "cpu", check=True)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("patches registered for device cpu")
    registry = plugin_manager.get().patch_registry("cpu")
    for patch in registry:
        row = next(line for line in lines if f" {patch.target} " in line + " ")
        assert patch.reason[:40] in row
    assert any("megatron.core.tensor_parallel.random._set_cuda_rng_state" in line for line in lines)
    route = [line for line in lines if "megatron.core.transformer.transformer_block.LayerNormImpl" in line]
    assert route and route[0].startswith("megatron-lm")


def test_device_options_become_checked_environment_variables():
    from aquila_npu import device_options

    options = plugin_manager.get().device_options()
    assert {o.env for o in options} >= {"NPU_ASD_ENABLE", "NPU_ASD_CONFIG", "HCCL_CONNECT_TIMEOUT"}
    given = {"--npu-asd-enable": "3", "--hccl-connect-timeout": "600"}
    assert device_options.environment(given, "npu", options) == {"NPU_ASD_ENABLE": "3", "HCCL_CONNECT_TIMEOUT": "600"}
    for values, message in (({"--npu-asd-enable": "5"}, "--npu-asd-enable 5: choose one of 0, 1, 2, 3"),
                            ({"--hccl-connect-timeout": "-1"}, "--hccl-connect-timeout -1: give a whole number"),
                            ({"--npu-asd-enable": "1"}, None)):
        if message is None:  # on another device
            with pytest.raises(AquilaNpuError, match="an option of the npu device; this job runs on cpu"):
                device_options.environment(values, "cpu", options)
        else:
            with pytest.raises(AquilaNpuError, match=message):
                device_options.environment(values, "npu", options)
