"""``import torch_npu`` with this folder on PYTHONPATH: the stand-in runtime (tests/stand_in_torch_npu.py) installs
itself as torch_npu, with $AQUILA_NPU_TEST_NPUS NPUs (default 1) — for tests of whole processes on the npu device,
where the start-up hook must find a torch_npu before the test's own code runs."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import stand_in_torch_npu  # noqa: E402

stand_in_torch_npu.install_runtime(int(os.environ.get("AQUILA_NPU_TEST_NPUS", "1")))
