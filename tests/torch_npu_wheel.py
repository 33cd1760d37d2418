"""The real torch_npu, read from its wheel — never installed (its ``[torch.backends]`` entry point would make every
``import torch`` try to load it, and it cannot load without CANN).

``load()`` finds the wheel of the torch_npu build that matches the installed torch (the rule:
``aquila_npu.plugins.npu.torch_npu_requirement``): the file named by ``$AQUILA_NPU_TORCH_NPU_WHEEL``, else one in
the cache folder (``$AQUILA_NPU_WHEEL_CACHE``, default ``~/.cache/aquila-npu/wheels``), else it fetches it there with
``pip download`` from the package registry (once; about 42 MB). From the wheel it reads:

* the operator schemas, ``torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml`` (``torch_npu.npu_X`` is
  ``torch.ops.npu.npu_X``), parsed by torch's own schema parser;
* the operator docstrings, ``torch_npu/_op_plugin_docs.py``, read with ``ast`` (not executed).
"""

from __future__ import annotations

import ast
import functools
import os
import subprocess
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

SCHEMAS = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"
DOCSTRINGS = "torch_npu/_op_plugin_docs.py"
WHEEL_ENV = "AQUILA_NPU_TORCH_NPU_WHEEL"
CACHE_ENV = "AQUILA_NPU_WHEEL_CACHE"


@dataclass
class TorchNpuWheel:
    path: Path
    schemas: dict  # operator name -> torch.FunctionSchema (the overload without a suffix)
    docstrings: dict  # operator name -> its docstring

    def schema(self, name: str):
        if name not in self.schemas:
            raise KeyError(f"torch_npu ({self.path.name}) has no operator {name}")
        return self.schemas[name]


def _cache() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "aquila-npu" / "wheels")


def _find_or_fetch() -> tuple[Path | None, str]:
    from aquila_npu.plugins.npu import torch_npu_requirement

    given = os.environ.get(WHEEL_ENV)
    if given:
        return (Path(given), "") if Path(given).is_file() else (None, f"${WHEEL_ENV}={given} is not a file")
    requirement = torch_npu_requirement(torch.__version__)
    version = requirement.split("==")[-1].removesuffix(".*")  # torch_npu==2.13.0.* -> 2.13.0
    cache = _cache()
    found = sorted(cache.glob(f"torch_npu-{version}*.whl"))
    if found:
        return found[-1], ""
    cache.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                             "--disable-pip-version-check", "-q", "-d", str(cache), requirement],
                            capture_output=True, text=True, timeout=600)
    found = sorted(cache.glob(f"torch_npu-{version}*.whl"))
    if result.returncode or not found:
        why = (result.stderr.strip().splitlines() or ["no wheel for this platform"])[-1]
        return None, f"the torch_npu wheel ({requirement}) could not be fetched from the package registry: {why}"
    return found[-1], ""


def _docstrings(source: str) -> dict:
    docs = {}
    with warnings.catch_warnings():  # the docstrings' LaTeX: invalid escape sequences, harmless in a string
        warnings.simplefilter("ignore", (DeprecationWarning, SyntaxWarning))
        tree = ast.parse(source)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_add_torch_npu_docstr"
                and len(node.args) == 2 and all(isinstance(a, ast.Constant) for a in node.args)):
            docs[node.args[0].value] = node.args[1].value
    return docs


def _schemas(text: str) -> dict:
    import yaml

    schemas = {}
    for section in yaml.safe_load(text).values():
        for entry in section if isinstance(section, list) else []:
            func = entry.get("func") if isinstance(entry, dict) else None
            if func and "(" in func and "." not in func.split("(")[0]:  # a schema, the plain overload (not .out)
                schema = torch._C.parse_schema(f"npu::{func}")
                schemas[schema.name.split("::")[1]] = schema
    return schemas


@functools.cache
def load() -> tuple[TorchNpuWheel | None, str]:
    """(the wheel read, "") or (None, why it cannot be had)."""
    path, why = _find_or_fetch()
    if path is None:
        return None, why
    with zipfile.ZipFile(path) as wheel:
        return TorchNpuWheel(path, _schemas(wheel.read(SCHEMAS).decode()),
                             _docstrings(wheel.read(DOCSTRINGS).decode())), ""
