"""Start-up hook of the Megatron-LM route, imported by ``aquila_npu-autoload.pth``.

The ``.pth`` imports this module only when ``--plugin`` is on the command line or ``AQUILA_NPU_PLUGINS`` is set
(a parent process of the same job set it). Then:

* in a Megatron-LM script (``torchrun pretrain_gpt.py --plugin FAMILY --model NAME ...``): expand
  ``sys.argv`` into Megatron-LM's flags (``aquila_npu.megatron_lm.arguments``), select the device, export the
  choice to child processes, register the device's patches and those that keep checkpoint loading to data
  (``aquila_npu.unpickling``), and report our errors in one line;
* in a child process of such a job (``torch_dist`` checkpoint savers, data-loader workers started by spawn), or
  in any program the user started with ``AQUILA_NPU_PLUGINS`` set (lm-eval's ``megatron_lm`` model, which runs
  Megatron-LM inside lm-eval): register the same patches (the device: ``AQUILA_NPU_DEVICE``, else chosen here);
* anywhere else (our own ``python -m aquila_npu...`` drivers, the ``torchrun`` launcher): nothing.

Patches apply as their Megatron modules are imported, so nothing here imports Megatron: the script has not yet put
its own ``megatron`` package on ``sys.path`` when ``.pth`` files run.
"""

from __future__ import annotations

import os
import sys

from aquila_npu import plugin_manager
from aquila_npu.errors import USER_ERRORS

registry = None  # the applied PatchRegistry of this process, for `aquila-npu plugins --patches` and tests


def _is_megatron_script(argv: list[str], orig_argv: list[str]) -> bool:
    if not argv or not argv[0].endswith(".py"):
        return False  # -c, console scripts such as torchrun
    # `python -m aquila_npu...` (our drivers, the tool runner) puts the module's own file in argv[0]
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return not os.path.abspath(argv[0]).startswith(package + os.sep)


def _register_route_plugins(plugins) -> None:
    from aquila_npu.megatron_lm import route_plugins

    for name, module in route_plugins().items():
        plugins.pm.register(module, name=name)


def _activate(device: str) -> None:
    global registry
    from aquila_npu import unpickling

    plugins = plugin_manager.get()
    plugins.hook.aquila_npu_prepare_process(device=device)  # before anything takes names from torch.cuda
    unpickling.install()
    plugin_manager.set_active_device(device)
    registry = plugins.patch_registry(device)
    registry.apply()


def _one_line_for_our_errors(default):
    """Megatron-LM lets exceptions end the script; ours (a refused checkpoint file, a bad flag) are one line and
    exit status 2 there too, however deep inside Megatron-LM they were raised."""
    def excepthook(kind, exc, tb):
        from aquila_npu.convert.megatron_dist import first_failure

        cause = first_failure(exc)
        if isinstance(cause, USER_ERRORS):
            # the process's own stderr: Megatron-LM may have redirected sys.stderr while the error rose
            print(f"aquila-npu: error: {cause}", file=sys.__stderr__, flush=True)
            os._exit(2)
        default(kind, exc, tb)

    return excepthook


def main() -> None:
    argv, orig_argv = list(sys.argv), list(getattr(sys, "orig_argv", sys.argv))
    if _is_megatron_script(argv, orig_argv) and any(a == "--plugin" or a.startswith("--plugin=") for a in argv):
        from aquila_npu.megatron_lm import arguments

        plugins = plugin_manager.get()
        new_argv, ours, device = arguments.expand_argv(argv[1:], plugins)
        _register_route_plugins(plugins)
        sys.argv[1:] = new_argv
        # child processes of the job (torch_dist savers, spawned workers) re-activate from these
        os.environ[plugin_manager.ENV_PLUGINS] = ",".join(ours.plugins)
        os.environ[plugin_manager.ENV_DEVICE] = device
        os.environ[plugin_manager.ENV_KERNELS] = plugin_manager.encode_kernel_request(ours.kernels)
        os.environ.update(ours.environment)  # the device options, before the device runtime starts
        _activate(device)
        sys.excepthook = _one_line_for_our_errors(sys.excepthook)
        plugins.hook.aquila_npu_initialize_device(device=device, local_rank=int(os.environ.get("LOCAL_RANK", 0)))
        if int(os.environ.get("RANK", "0")) == 0:
            fused = ", ".join(sorted(plugin_manager.active_kernels().fused)) or "none"
            print(f"aquila-npu: plugins {', '.join(ours.plugins)} on {device}; model {ours.model or '(flags)'}; "
                  f"fused kernels: {fused}; {len(registry)} patches registered", file=sys.stderr)
    elif os.environ.get(plugin_manager.ENV_PLUGINS):
        # a child process of such a job; or a program that reaches Megatron-LM itself (lm-eval's megatron_lm
        # model), for which the user set the variable: the device is then chosen here, once, for the whole job
        plugins = plugin_manager.get()
        plugins.require(v for v in os.environ[plugin_manager.ENV_PLUGINS].split(",") if v)
        device = os.environ.get(plugin_manager.ENV_DEVICE) or plugins.select_device(None)
        os.environ[plugin_manager.ENV_DEVICE] = device
        _register_route_plugins(plugins)
        _activate(device)
        sys.excepthook = _one_line_for_our_errors(sys.excepthook)


try:
    main()
except USER_ERRORS as exc:
    print(f"aquila-npu: error: {exc}", file=sys.stderr, flush=True)
    # SystemExit cannot leave a .pth file cleanly (Python reports a fatal error in `site`)
    os._exit(2)
