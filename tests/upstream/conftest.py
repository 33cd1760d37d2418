"""Every test in this folder runs against a Megatron-LM checkout at MEGATRON_LM_PATH (tag core_v0.16.1) and is
skipped, with that reason, when it is unset; CI runs without it. All of them are slow (multi-process)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="set MEGATRON_LM_PATH to a Megatron-LM checkout (tag core_v0.16.1) to test against "
                                   "Megatron-LM's own pretrain_gpt.py and tools")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.upstream)
            item.add_marker(pytest.mark.slow)
            if not os.environ.get("MEGATRON_LM_PATH"):
                item.add_marker(skip)
