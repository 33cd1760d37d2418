"""The patch registry: register by dotted target, apply now or on import, list, revert exactly."""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest

from aquila_npu.errors import AquilaNpuError
from aquila_npu.patching import PatchRegistry


@pytest.fixture
def fresh_package(tmp_path, monkeypatch):
    """A package `patchme_pkg` on disk, not yet imported."""
    root = tmp_path / "patchme_pkg"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "mod.py").write_text(textwrap.dedent("""
        def answer():
            return 42

        class Base:
            def describe(self):
                return "base"

        class Box(Base):
            @staticmethod
            def make():
                return "static"

            @classmethod
            def build(cls):
                return cls.__name__

        def uses_answer():
            return answer()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "patchme_pkg"
    for name in [n for n in sys.modules if n.startswith("patchme_pkg")]:
        del sys.modules[name]


def test_apply_and_revert_an_imported_module(fresh_package):
    mod = importlib.import_module(f"{fresh_package}.mod")
    original = mod.answer
    registry = PatchRegistry()
    registry.register(f"{fresh_package}.mod.answer", lambda orig: lambda: orig() + 1, reason="test", owner="t")
    registry.apply()
    assert mod.answer() == 43 and mod.uses_answer() == 43
    assert [row["state"] for row in registry.rows()] == ["applied"]
    registry.revert()
    assert mod.answer is original and mod.uses_answer() == 42
    assert [row["state"] for row in registry.rows()] == ["reverted"]


def test_a_module_imported_later_is_patched_right_after_its_import(fresh_package):
    registry = PatchRegistry()
    registry.register(f"{fresh_package}.mod.answer", lambda orig: lambda: -1, reason="test")
    registry.apply()
    assert f"{fresh_package}.mod" not in sys.modules  # registering and applying imported nothing
    assert registry.rows()[0]["state"] == "pending"
    from patchme_pkg import mod  # noqa: PLC0415

    assert mod.answer() == -1 and registry.rows()[0]["state"] == "applied"
    registry.revert()
    assert mod.answer() == 42
    assert not any(type(f).__name__ == "_PostImportHook" for f in sys.meta_path)


def test_a_module_importing_another_target_midway_is_patched_when_it_has_run(fresh_package, tmp_path):
    """`outer` imports `inner` (also patched) before it defines its own target: when `inner` finishes, `outer` is
    in sys.modules but still executing, and its patch must wait for it (Megatron-LM's training.py imports the
    inference controller this way)."""
    package = tmp_path / fresh_package
    (package / "inner.py").write_text("def value():\n    return 1\n")
    (package / "outer.py").write_text(textwrap.dedent("""
        from patchme_pkg import inner

        def value():
            return 10 + inner.value()
    """))
    registry = PatchRegistry()
    registry.register(f"{fresh_package}.outer.value", lambda orig: lambda: orig() * 2, reason="test")
    registry.register(f"{fresh_package}.inner.value", lambda orig: lambda: orig() + 100, reason="test")
    registry.apply()
    from patchme_pkg import outer  # noqa: PLC0415

    assert outer.value() == 2 * (10 + 101)
    assert [row["state"] for row in registry.rows()] == ["applied", "applied"]
    registry.revert()


def test_static_and_class_methods_stay_what_they_were(fresh_package):
    mod = importlib.import_module(f"{fresh_package}.mod")
    registry = PatchRegistry()
    registry.register(f"{fresh_package}.mod.Box.make", lambda orig: lambda: orig() + "!", reason="test")
    registry.register(f"{fresh_package}.mod.Box.build", lambda orig: lambda cls: orig(cls) * 2, reason="test")
    registry.register(f"{fresh_package}.mod.Box.describe", lambda orig: lambda self: "box", reason="inherited")
    registry.apply()
    assert mod.Box().describe() == "box" and mod.Base().describe() == "base"
    assert mod.Box.make() == "static!" and mod.Box().make() == "static!"
    assert mod.Box.build() == "BoxBox"
    registry.revert()
    assert mod.Box.make() == "static" and mod.Box.build() == "Box"
    assert isinstance(mod.Box.__dict__["make"], staticmethod)
    assert isinstance(mod.Box.__dict__["build"], classmethod)
    assert "describe" not in mod.Box.__dict__ and mod.Box().describe() == "base"


def test_module_stub_stands_in_until_reverted(fresh_package):
    import types

    registry = PatchRegistry()
    stub = types.ModuleType(f"{fresh_package}.mod")
    stub.answer = lambda: "stub"
    registry.register_module_stub(f"{fresh_package}.mod", lambda: stub, reason="test")
    registry.apply()
    from patchme_pkg import mod  # noqa: PLC0415

    assert mod.answer() == "stub"
    registry.revert()
    assert f"{fresh_package}.mod" not in sys.modules
    assert importlib.import_module(f"{fresh_package}.mod").answer() == 42


def test_registration_errors():
    registry = PatchRegistry()
    with pytest.raises(AquilaNpuError, match="dotted path"):
        registry.register("nodots", lambda o: o, reason="x")
    with pytest.raises(AquilaNpuError, match="needs a reason"):
        registry.register("a.b", lambda o: o, reason="")
    registry.register("json.dumps", lambda o: o, reason="x", owner="one")
    with pytest.raises(AquilaNpuError, match="json.dumps is patched twice"):
        registry.register("json.dumps", lambda o: o, reason="y", owner="two")


def test_a_missing_target_is_reported():
    registry = PatchRegistry()
    registry.register("json.JSONEncoder.renamed_upstream", lambda o: o, reason="x", owner="t")
    with pytest.raises(AquilaNpuError, match="json.JSONEncoder.renamed_upstream does not exist in the installed"):
        registry.apply()


def test_a_target_in_a_module_never_imported_stays_pending():
    registry = PatchRegistry()
    registry.register("json.never_a_submodule.attr", lambda o: o, reason="x")
    registry.apply()
    try:
        assert registry.rows()[0]["state"] == "pending"
    finally:
        registry.revert()


def test_cpu_patches_apply_to_megatron_and_revert_to_the_originals():
    """Every cpu patch target exists in the installed megatron-core / Megatron-LM, and revert restores it."""
    import megatron.core.optimizer.distrib_optimizer as distrib_optimizer
    import megatron.core.parallel_state as parallel_state
    import megatron.core.tensor_parallel.random as random
    import torch

    from aquila_npu import plugin_manager

    before = (random._set_cuda_rng_state, parallel_state.torch, torch.Tensor.cuda,
              distrib_optimizer.DistributedOptimizer.__dict__["_build_model_and_main_param_groups"])
    registry = plugin_manager.get().patch_registry("cpu")
    registry.apply()
    try:
        assert parallel_state.torch is not torch and parallel_state.torch.cuda.is_available()
        assert parallel_state.torch.cuda.current_device() == torch.device("cpu")
        assert torch.cuda.is_available() is torch.cuda.is_available()  # the real torch is untouched
        assert random._set_cuda_rng_state is not before[0]
        assert isinstance(distrib_optimizer.DistributedOptimizer.__dict__["_build_model_and_main_param_groups"],
                          classmethod)
        states = {row["state"] for row in registry.rows()}
        assert states <= {"applied", "pending", "skipped"}
    finally:
        registry.revert()
    after = (random._set_cuda_rng_state, parallel_state.torch, torch.Tensor.cuda,
             distrib_optimizer.DistributedOptimizer.__dict__["_build_model_and_main_param_groups"])
    assert all(a is b for a, b in zip(before, after))


def test_gradient_clipping_reports_cuda_names_wherever_the_optimizer_imported_it():
    """megatron-core's optimizer module holds its own imported copy of clip_grad_by_total_norm_fp32 (imported here
    before the patches, as a test process may): both copies run with the CUDA type names it asserts, and the
    renaming nests (the optimizer's patched methods call the patched clipping) without doubling the prefix."""
    import torch
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as optimizer_module

    from aquila_npu import plugin_manager
    from aquila_npu.plugins import cpu_bridge

    registry = plugin_manager.get().patch_registry("cpu")
    registry.apply()
    try:
        for module in (clip_grads, optimizer_module):
            parameter = torch.nn.Parameter(torch.ones(4))
            parameter.grad = torch.full((4,), 2.0)
            module.clip_grad_by_total_norm_fp32([parameter], max_norm=1.0, total_norm=4.0)
            assert torch.allclose(parameter.grad, torch.full((4,), 0.5), atol=1e-5), module.__name__
        with cpu_bridge.cuda_type_names(), cpu_bridge.cuda_type_names():
            assert torch.ones(1).type() == "torch.cuda.FloatTensor"
        assert torch.ones(1).type() == "torch.FloatTensor"
    finally:
        registry.revert()
    assert optimizer_module.clip_grad_by_total_norm_fp32 is clip_grads.clip_grad_by_total_norm_fp32
