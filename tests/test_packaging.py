"""The wheel carries every subpackage and the sample data: a non-editable install (what `pip install aquila-npu`
gives) has no source tree to fall back on, so a package or file missing from pyproject would only fail for users. A
built wheel, installed in a fresh virtual environment, runs the quickstart in an unrelated folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import REPO, run_python


def test_every_subpackage_is_listed_in_pyproject():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    on_disk = set()
    for package, folder in setuptools["package-dir"].items():
        root = REPO / folder
        for init in root.rglob("__init__.py"):
            relative = init.parent.relative_to(root).parts
            on_disk.add(".".join((package, *relative)))
    assert on_disk - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"


SAMPLE_FILES = ("README.md", "aquila2_tokenizer/tokenizer.json", "aquila2_tokenizer/NOTICE",
                "alpaca/alpaca_300.parquet", "alpaca/DATA_LICENSE", "boolq/dev_300.jsonl", "boolq/LICENSE",
                "conversations/alpaca_chat_200.jsonl", "conversations/DATA_LICENSE")


def _run(command: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel built from this checkout (its dependencies from this machine's
    environment: nothing is downloaded); returns its interpreter."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"  # build from a copy: the checkout gets no build/ or egg-info
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__",
                                                                ".pytest_cache", "megatron-lm", "third_party"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w",
          str(root / "wheels"), str(source)], cwd=root)
    wheel = next((root / "wheels").glob("aquila_npu-*.whl"))
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(root / "venv")], cwd=root)
    python = root / "venv" / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)], cwd=root)
    return python


@pytest.mark.slow
def test_the_installed_wheel_runs_the_quickstart_in_an_unrelated_folder(installed, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    found = _run([str(installed), "-c", "import aquila_npu, aquila_npu.sample_data as s; print(aquila_npu.__file__); "
                                        "print(s.ROOT)"], cwd=elsewhere).stdout.split()
    venv = installed.parent.parent
    assert all(Path(p).is_relative_to(venv) for p in found), found  # the wheel's copy, not the checkout
    for name in SAMPLE_FILES:
        assert (Path(found[1]) / name).is_file(), name
        assert (Path(found[1]) / name).read_bytes() == (REPO / "examples" / "data" / name).read_bytes()
    result = _run([str(installed.parent / "aquila-npu"), "quickstart", "--workdir", "qs", "--skip-tp2",
                   "--stop-after", "preprocess"], cwd=elsewhere)
    for stage in ("model", "tokenize", "transformers", "megatron-core TP=1", "convert", "preprocess"):
        assert f"[ok] {stage}:" in result.stdout
    assert result.stdout.strip().endswith("quickstart passed")
    assert (elsewhere / "qs" / "data" / "alpaca_text_document.bin").is_file()


def test_from_the_repository_root_our_folders_are_no_top_level_packages(tmp_path):
    """With the checkout's root on sys.path (`python -c` run there), `transformers` probes for Hugging Face's own
    `kernels` package (a dependency of transformers since 5.25): it must find what it finds from any other folder,
    never a module of ours (our `kernels/` and `plugins/` folders are namespace portions without code), and none of
    our modules is imported."""
    code = ("import importlib.util, json, sys, transformers\n"
            "from transformers.utils import import_utils\n"
            "specs = [importlib.util.find_spec(name) for name in ('kernels', 'plugins')]\n"
            f"ours = [m for m, mod in list(sys.modules.items()) if (getattr(mod, '__file__', None) or '')"
            f".startswith({str(REPO) + '/'!r})]\n"
            "print(json.dumps({'origins': [s and s.origin for s in specs], "
            "'hub kernels': import_utils.is_kernels_available(), 'ours': ours}))")
    seen = {folder: json.loads(run_python("-c", code, cwd=folder, check=True).stdout.strip().splitlines()[-1])
            for folder in (REPO, tmp_path)}
    assert seen[REPO] == seen[tmp_path]
    assert seen[REPO]["ours"] == []
    assert not any((origin or "").startswith(str(REPO) + "/") for origin in seen[REPO]["origins"])
