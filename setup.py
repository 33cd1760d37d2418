"""Installs the start-up hook ``aquila_npu-autoload.pth`` next to the package.

Everything else lives in pyproject.toml. Python runs a ``.pth`` line that begins with ``import`` at start-up; ours
only imports ``aquila_npu.megatron_lm.startup`` when ``--plugin`` is on the command line (or a parent process of the job set
``AQUILA_NPU_PLUGINS``), so that ``torchrun pretrain_gpt.py --plugin aquila2`` works on an unmodified Megatron-LM.
setuptools has no declarative way to put a file at the root of site-packages, hence this small build_py hook; it
handles both regular and editable (PEP 660) installs.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "aquila_npu-autoload.pth"


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), PTH_NAME), encoding="utf-8") as f:
            content = f.read()
        if getattr(self, "editable_mode", False):
            # editable_wheel packs install_lib (the unpacked wheel root), not build_lib
            root = self.get_finalized_command("install").install_lib
        else:
            root = self.build_lib
        os.makedirs(root, exist_ok=True)
        target = os.path.join(root, PTH_NAME)
        with open(target, "w", encoding="utf-8") as f:
            f.write(content)
        self._pth_output = target

    def get_outputs(self, include_bytecode=True):
        outputs = list(super().get_outputs(include_bytecode))
        if getattr(self, "_pth_output", None):
            outputs.append(self._pth_output)
        return outputs


setup(cmdclass={"build_py": build_py_with_pth})
