"""aquila-npu: Aquila2 on unmodified Megatron, on Ascend NPUs, NVIDIA GPUs and CPUs, through plugins.

Start with ``aquila_npu.hookspecs`` (the plugin contract) and ``aquila_npu.plugins.aquila2`` (the model family).
Importing this package stays cheap: torch and Megatron are imported only by the functions that need them.
"""

from aquila_npu.errors import AquilaNpuError
from aquila_npu.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["AquilaNpuError", "hookimpl", "__version__"]
