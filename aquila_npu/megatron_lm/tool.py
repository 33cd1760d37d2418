"""``python -m aquila_npu.megatron_lm.tool SCRIPT [ARGS...]``: run an unmodified Megatron-LM tool script (for
example ``tools/preprocess_data.py``) with this machine's device patches applied.

Megatron-LM's tools import ``megatron.training``, which imports Triton and CUDA-only modules; on a CPU or NPU host
the device plugin's patches stand in for them, as they do for ``pretrain_gpt.py --plugin``. The script runs as
``__main__`` with its checkout on ``sys.path`` and its own arguments untouched. Used by the benchmarks and the
upstream tests to measure and cross-check against Megatron-LM's own tools.
"""

from __future__ import annotations

import os
import runpy
import sys


def main(argv: list[str]) -> None:
    if not argv or not os.path.isfile(argv[0]):
        sys.exit("usage: python -m aquila_npu.megatron_lm.tool MEGATRON_LM/tools/SCRIPT.py [ARGS...]")
    from aquila_npu import plugin_manager
    from aquila_npu.errors import AquilaNpuError

    plugins = plugin_manager.get()
    try:
        device = plugins.select_device(os.environ.get(plugin_manager.ENV_DEVICE))
    except AquilaNpuError as exc:
        sys.exit(f"aquila-npu megatron_lm.tool: error: {exc}")
    plugins.hook.aquila_npu_prepare_process(device=device)
    plugin_manager.set_active_device(device)
    plugins.patch_registry(device).apply()
    from aquila_npu import unpickling

    unpickling.install()  # a tool that loads a checkpoint unpickles data only, as our commands do
    script = os.path.abspath(argv[0])
    # the checkout root: tools/SCRIPT.py -> the folder that holds megatron/
    sys.path.insert(0, os.path.dirname(os.path.dirname(script)))
    sys.argv = [script, *argv[1:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
