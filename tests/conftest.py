"""Shared fixtures: data locations, tiny random Aquila2-shaped checkpoints, subprocess helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# the repository's own samples only: a fresh clone and a developer's machine test the same data
BUNDLED_DATA = REPO / "examples" / "data"


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    """The real Aquila2 tokenizer (the bundled copy)."""
    return BUNDLED_DATA / "aquila2_tokenizer"


def run_python(*args: str, env: dict | None = None, cwd: str | Path | None = None, timeout: int = 600,
               check: bool = False) -> subprocess.CompletedProcess:
    merged = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=merged, cwd=cwd,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\n"
                             f"stderr:\n{result.stderr[-3000:]}")
    return result


def convert_to_megatron(hf_dir: Path, target: Path, tensor_parallel: int = 1) -> Path:
    """``hf_dir`` converted to a per-rank torch Megatron checkpoint at ``target``."""
    from aquila_npu.convert import ConvertOptions, convert

    convert(ConvertOptions(load_dir=str(hf_dir), save_dir=str(target), target_tensor_parallel_size=tensor_parallel,
                           progress=False))
    return target


def make_hf_checkpoint(spec, path: Path, seed: int = 0) -> Path:
    from aquila_npu import parity

    parity.save_random_hf_model(spec, str(path), seed=seed)
    return path


@pytest.fixture(scope="session")
def tiny_spec():
    from aquila_npu.plugins.aquila2 import FAMILY

    return FAMILY.spec("aquila2-tiny")


@pytest.fixture(scope="session")
def tiny_mha_spec(tiny_spec):
    """A 7B-shaped (multi-head attention: one query group per head) tiny variant."""
    return tiny_spec.replace(name="aquila2-tiny-mha", num_query_groups=tiny_spec.num_attention_heads)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, tiny_spec) -> Path:
    return make_hf_checkpoint(tiny_spec, tmp_path_factory.mktemp("hf-tiny") / "model")


@pytest.fixture(scope="session")
def sample_tokens(tokenizer_dir):
    from aquila_npu import parity

    return parity.encode(str(tokenizer_dir))


@pytest.fixture(scope="session")
def tokens_file(tmp_path_factory, sample_tokens) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens.json"
    path.write_text(json.dumps(sample_tokens.tolist()))
    return path


@pytest.fixture(scope="module")
def megatron_world():
    """A one-process megatron-core world on this machine's device (patches applied, reverted afterwards)."""
    from aquila_npu import distributed

    with distributed.megatron_world() as world:
        yield world
