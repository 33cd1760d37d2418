"""The faults every cluster user meets — a full disk, a read-only or forbidden location, a path that is a file, a
damaged input, a conversion into its own source, a killed run — each end in one line (what, where, how to fix)
and exit status 2, leave nothing that looks complete, and keep earlier data intact. Disk and permission faults are
injected where Python meets the file system (``fault_injection``); everything above runs unchanged."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import fault_injection
from conftest import BUNDLED_DATA, make_hf_checkpoint, run_python

ALPACA = BUNDLED_DATA / "alpaca" / "alpaca_300.parquet"
BOOLQ = BUNDLED_DATA / "boolq" / "dev_300.jsonl"
FULL_DISK = ("no space left on the device", "is the disk full")


def one_line_error(result, verb: str, *fragments: str) -> str:
    """The command failed with exit status 2 and one stderr line that holds every fragment (a tuple: any of it)."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"aquila-npu {verb}: error: "), lines[-10:]
    for fragment in fragments:
        options = fragment if isinstance(fragment, tuple) else (fragment,)
        assert any(option in lines[0] for option in options), (fragment, lines[0])
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    """What a run left in ``folder`` that is no user data: temporary names and partial files."""
    return sorted(p.name for p in folder.rglob("*") if ".partial" in p.name or ".old-" in p.name)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tiny_spec) -> Path:
    return make_hf_checkpoint(tiny_spec, tmp_path_factory.mktemp("faults") / "hf", seed=11)


def convert(*args: str, env: dict | None = None, umask: int | None = None) -> subprocess.CompletedProcess:
    if umask is None:
        return run_python("-m", "aquila_npu.convert", "--no-progress", *args, env=env)
    command = [sys.executable, "-m", "aquila_npu.convert", "--no-progress", *args]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})},
                          preexec_fn=lambda: os.umask(umask), timeout=600)


# ----------------------------------------------------------------------------------- convert
@pytest.mark.parametrize("target", ["mg torch", "mg torch_dist", "hf"])
def test_convert_on_a_full_disk(tmp_path, hf_dir, target):
    disk = tmp_path / "disk"
    disk.mkdir()
    source = hf_dir
    if target == "hf":  # Megatron -> HF: the source is a Megatron checkpoint
        source = tmp_path / "mg"
        convert("--load-dir", str(hf_dir), "--save-dir", str(source))
    kind = target.split()
    args = ["--load-dir", str(source), "--save-dir", str(disk / "out")]
    args += ["--load-model-type", "mg", "--save-model-type", "hf"] if kind[0] == "hf" else ["--ckpt-format", kind[1]]
    result = convert(*args, env=fault_injection.environment(full_disk=(disk, 100_000)))
    one_line_error(result, "convert", f"--save-dir {disk / 'out'}", FULL_DISK)
    assert os.listdir(disk) == []


@pytest.mark.parametrize("fault,message", [("read_only", "read-only file system"),
                                           ("forbidden", "permission denied")])
def test_convert_into_a_location_it_cannot_write(tmp_path, hf_dir, fault, message):
    locked = tmp_path / "locked"
    locked.mkdir()
    result = convert("--load-dir", str(hf_dir), "--save-dir", str(locked / "out"),
                     env=fault_injection.environment(**{fault: locked}))
    one_line_error(result, "convert", f"--save-dir {locked / 'out'}", message)
    assert os.listdir(locked) == []


def test_save_dir_that_is_a_file(tmp_path, hf_dir):
    (tmp_path / "out").write_text("mine")
    one_line_error(convert("--load-dir", str(hf_dir), "--save-dir", str(tmp_path / "out")), "convert",
                   "is a file, not a folder")
    assert (tmp_path / "out").read_text() == "mine"


@pytest.mark.parametrize("where", ["same", "inside the source", "around the source"])
def test_a_conversion_never_replaces_its_own_source(tmp_path, hf_dir, where):
    source = tmp_path / "models" / "hf"
    shutil.copytree(hf_dir, source)
    before = tree(source)
    save = {"same": source, "inside the source": source / "mg", "around the source": tmp_path / "models"}[where]
    result = convert("--load-dir", str(source), "--save-dir", str(save), "--overwrite")
    one_line_error(result, "convert", "are the same folder or one holds the other")
    assert tree(source) == before


@pytest.mark.parametrize("umask,folder_mode,file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_outputs_get_the_permissions_the_umask_gives(tmp_path, hf_dir, umask, folder_mode, file_mode):
    result = convert("--load-dir", str(hf_dir), "--save-dir", str(tmp_path / "mg"), "--target-tensor-parallel-size",
                     "2", umask=umask)
    assert result.returncode == 0, result.stderr[-2000:]
    folders = [tmp_path / "mg", *[p for p in (tmp_path / "mg").rglob("*") if p.is_dir()]]
    files = [p for p in (tmp_path / "mg").rglob("*") if p.is_file()]
    assert folders and files
    assert {oct(p.stat().st_mode & 0o777) for p in folders} == {oct(folder_mode)}
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(file_mode)}


# the conversion dies by SIGKILL at a chosen moment, as a scheduler would kill it
KILLED_CONVERSION = """
import os, signal, sys
from aquila_npu.convert import hf_format
moment = sys.argv.pop(1)
if moment == "writing":
    def finish(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    hf_format.HFWriter.finish = finish
else:  # between moving the older output aside and renaming the new one into place
    original = os.replace
    def replace(source, target, *args, **kwargs):
        original(source, target, *args, **kwargs)
        if ".old-" in os.path.basename(str(target)):
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace
from aquila_npu.convert.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_conversions_debris_is_removed_by_the_next_run(tmp_path, hf_dir):
    mg = tmp_path / "mg"
    convert("--load-dir", str(hf_dir), "--save-dir", str(mg))
    args = ["--load-dir", str(mg), "--load-model-type", "mg", "--save-model-type", "hf", "--save-dir",
            str(tmp_path / "out"), "--no-progress"]
    killed = run_python("-c", KILLED_CONVERSION, "writing", *args)
    assert killed.returncode == -signal.SIGKILL
    debris = [name for name in os.listdir(tmp_path) if name.startswith(".out.partial-")]
    assert len(debris) == 1 and not (tmp_path / "out").exists()
    assert convert(*args).returncode == 0
    assert sorted(os.listdir(tmp_path)) == ["mg", "out"]


def test_an_older_output_a_killed_run_had_moved_aside_comes_back(tmp_path, hf_dir):
    mg = tmp_path / "mg"
    convert("--load-dir", str(hf_dir), "--save-dir", str(mg))
    args = ["--load-dir", str(mg), "--load-model-type", "mg", "--save-model-type", "hf", "--save-dir",
            str(tmp_path / "out"), "--no-progress"]
    assert convert(*args).returncode == 0
    older = tree(tmp_path / "out")
    killed = run_python("-c", KILLED_CONVERSION, "swapping", *args, "--overwrite")
    assert killed.returncode == -signal.SIGKILL and not (tmp_path / "out").exists()
    assert [n for n in os.listdir(tmp_path) if n.startswith(".out.old-")]
    # the next run puts the older output back before it decides anything: without --overwrite it keeps it
    one_line_error(convert(*args), "convert", "exists and is not empty")
    assert tree(tmp_path / "out") == older and leftovers(tmp_path) == []


def _damaged_hf(kind: str, tmp_path: Path, hf_dir: Path) -> Path:
    source = tmp_path / "src"
    shutil.copytree(hf_dir, source)
    if kind == "index not JSON":
        (source / "model.safetensors.index.json").write_text('{"weight_map": {"model.norm.weight": ')
    elif kind == "index without a weight map":
        (source / "model.safetensors.index.json").write_text('["model.safetensors"]')
    else:  # a header length field that claims more than the file: read nothing it asks for
        data = bytearray((source / "model.safetensors").read_bytes())
        data[:8] = struct.pack("<Q", 2 ** 62)
        (source / "model.safetensors").write_bytes(bytes(data))
    return source


@pytest.mark.parametrize("kind,message", [
    ("index not JSON", "model.safetensors.index.json is not valid JSON"),
    ("index without a weight map", "has no weight_map of tensor names to shard files"),
    ("absurd header length", "its header claims 4,611,686,018,427,387,904 bytes"),
])
def test_a_damaged_hugging_face_checkpoint(tmp_path, hf_dir, kind, message):
    source = _damaged_hf(kind, tmp_path, hf_dir)
    result = convert("--load-dir", str(source), "--save-dir", str(tmp_path / "out"))
    one_line_error(result, "convert", message)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_truncated_distcp_file(tmp_path, hf_dir, tokenizer_dir):
    dist = tmp_path / "dist"
    convert("--load-dir", str(hf_dir), "--save-dir", str(dist), "--ckpt-format", "torch_dist")
    for shard in (dist / "iter_0000001").glob("*.distcp"):
        os.truncate(shard, shard.stat().st_size // 2)
    result = convert("--load-dir", str(dist), "--load-model-type", "mg", "--save-model-type", "hf", "--save-dir",
                     str(tmp_path / "out"))
    one_line_error(result, "convert", f"{dist / 'iter_0000001'}: the torch_dist checkpoint cannot be loaded",
                   "truncated")
    result = run_python("-m", "aquila_npu.generate", "--load", str(dist), "--tokenizer-name-or-path",
                        str(tokenizer_dir), "--prompt", "hi", "--max-new-tokens", "1")
    one_line_error(result, "generate", "the torch_dist checkpoint cannot be loaded")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------- preprocess
def preprocess(prefix: Path, tokenizer_dir: Path, env: dict | None = None, tokenizer: Path | None = None):
    return run_python("-m", "aquila_npu.preprocess", "--input", str(ALPACA), "--tokenizer-name-or-path",
                      str(tokenizer or tokenizer_dir), "--output-prefix", str(prefix), "--no-progress", env=env)


def test_preprocess_on_a_full_disk_keeps_the_earlier_dataset(tmp_path, tokenizer_dir):
    assert preprocess(tmp_path / "data" / "alpaca", tokenizer_dir).returncode == 0
    before = tree(tmp_path / "data")
    result = preprocess(tmp_path / "data" / "alpaca", tokenizer_dir,
                        env=fault_injection.environment(full_disk=(tmp_path / "data", 20_000)))
    one_line_error(result, "preprocess", f"--output-prefix {tmp_path / 'data' / 'alpaca'}", FULL_DISK)
    assert tree(tmp_path / "data") == before


@pytest.mark.parametrize("fault,message", [("read_only", "read-only file system"),
                                           ("forbidden", "permission denied")])
def test_preprocess_into_a_location_it_cannot_write(tmp_path, tokenizer_dir, fault, message):
    (tmp_path / "data").mkdir()
    result = preprocess(tmp_path / "data" / "alpaca", tokenizer_dir,
                        env=fault_injection.environment(**{fault: tmp_path / "data"}))
    one_line_error(result, "preprocess", "--output-prefix", message)
    assert os.listdir(tmp_path / "data") == []


def test_a_tokenizer_that_needs_remote_code_is_one_line(tmp_path, tokenizer_dir):
    remote = tmp_path / "tokenizer"
    shutil.copytree(tokenizer_dir, remote)
    config = json.loads((remote / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="AquilaTokenizer",
                  auto_map={"AutoTokenizer": ["tokenization_aquila.AquilaTokenizer", None]})
    (remote / "tokenizer_config.json").write_text(json.dumps(config))
    one_line_error(preprocess(tmp_path / "out", tokenizer_dir, tokenizer=remote), "preprocess",
                   "asks for custom code", "which is never run")


# ----------------------------------------------------------------------------------- generate / evaluate --output
@pytest.fixture(scope="module")
def mg_dir(hf_dir, tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("faults-mg") / "mg"
    assert convert("--load-dir", str(hf_dir), "--save-dir", str(target)).returncode == 0
    return target


def _output_command(verb: str, mg_dir: Path, tokenizer_dir: Path, output: Path) -> list[str]:
    model = ["--load", str(mg_dir), "--tokenizer-name-or-path", str(tokenizer_dir), "--output", str(output)]
    if verb == "generate":
        return ["-m", "aquila_npu.generate", *model, "--prompt", "hi", "--max-new-tokens", "2"]
    return ["-m", "aquila_npu.evaluate", "boolq", *model, "--task-data-path", str(BOOLQ), "--limit", "2",
            "--no-progress"]


@pytest.mark.parametrize("verb", ["generate", "evaluate"])
@pytest.mark.parametrize("fault,message", [("read_only", "read-only file system"), ("forbidden", "permission denied"),
                                           ("folder", "is a folder; give a file path")])
def test_an_output_that_cannot_be_written_fails_before_the_model_loads(tmp_path, mg_dir, tokenizer_dir, verb, fault,
                                                                      message):
    locked = tmp_path / "results"
    locked.mkdir()
    output = locked if fault == "folder" else locked / "out.json"
    env = {} if fault == "folder" else fault_injection.environment(**{fault: locked})
    result = run_python(*_output_command(verb, mg_dir, tokenizer_dir, output), env=env)
    one_line_error(result, verb, f"--output {output}", message)
    assert "aquila2-tiny, float32" not in result.stderr  # the model was never opened
    assert os.listdir(locked) == []


@pytest.mark.parametrize("verb", ["generate", "evaluate"])
def test_an_output_on_a_full_disk_fails_before_the_model_loads_and_keeps_the_earlier_results(tmp_path, mg_dir,
                                                                                              tokenizer_dir, verb):
    output = tmp_path / "results" / "out.json"
    output.parent.mkdir()
    output.write_text("earlier results\n")
    result = run_python(*_output_command(verb, mg_dir, tokenizer_dir, output),
                        env=fault_injection.environment(full_disk=(output.parent, 0)))
    one_line_error(result, verb, f"--output {output}: no space left on the device")
    assert output.read_text() == "earlier results\n" and leftovers(output.parent) == []


# ----------------------------------------------------------------------------------- pretrain
TRAIN = ["-m", "aquila_npu.pretrain", "--model", "aquila2-tiny", "--micro-batch-size", "1", "--global-batch-size",
         "2", "--seq-length", "32", "--lr", "1e-4", "--eval-iters", "0", "--log-interval", "1", "--split", "100,0,0"]


@pytest.fixture(scope="module")
def text_dataset(tmp_path_factory, tokenizer_dir) -> Path:
    prefix = tmp_path_factory.mktemp("faults-data") / "alpaca"
    assert preprocess(prefix, tokenizer_dir).returncode == 0
    return Path(f"{prefix}_text_document")


def train(*args: str, tokenizer_dir: Path, data: Path | None = None, env: dict | None = None):
    source = ["--data-path", str(data), "--tokenizer-name-or-path", str(tokenizer_dir)] if data else ["--mock-data"]
    return run_python(*TRAIN, *source, *args, env=env)


@pytest.mark.parametrize("fault,message", [("read_only", "read-only file system"),
                                           ("forbidden", "permission denied")])
def test_save_that_cannot_be_written_fails_before_the_first_iteration(tmp_path, tokenizer_dir, fault, message):
    locked = tmp_path / "checkpoints"
    locked.mkdir()
    result = train("--train-iters", "5", "--save", str(locked / "run"), tokenizer_dir=tokenizer_dir,
                   env=fault_injection.environment(**{fault: locked}))
    one_line_error(result, "pretrain", f"--save {locked / 'run'}", message, "checked before training")
    assert " iteration " not in result.stdout
    assert os.listdir(locked) == []


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint_latest(tmp_path, tokenizer_dir, text_dataset):
    save = tmp_path / "ckpt"
    flags = ["--save", str(save), "--save-interval", "1"]
    assert train("--train-iters", "1", *flags, tokenizer_dir=tokenizer_dir, data=text_dataset).returncode == 0
    before = tree(save)
    result = train("--train-iters", "2", *flags, "--load", str(save), tokenizer_dir=tokenizer_dir, data=text_dataset,
                   env=fault_injection.environment(full_disk=(save, 1000)))
    one_line_error(result, "pretrain", f"--save {save}", FULL_DISK, "iteration 2 was not saved")
    assert "iteration        2/       2" in result.stdout  # the failure came at the save, after training
    assert tree(save) == before and leftovers(save) == []
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "1"


def test_seq_length_longer_than_the_positions_the_model_has(tmp_path, tokenizer_dir):
    result = train("--train-iters", "1", "--seq-length", "512", tokenizer_dir=tokenizer_dir)
    one_line_error(result, "pretrain", "--seq-length 512 is longer than aquila2-tiny's --max-position-embeddings 256")


def _damage_dataset(kind: str, tmp_path: Path, text_dataset: Path) -> Path:
    prefix = tmp_path / "damaged" / "alpaca_text_document"
    prefix.parent.mkdir()
    bin_file, idx_file = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    shutil.copyfile(f"{text_dataset}.bin", bin_file)
    shutil.copyfile(f"{text_dataset}.idx", idx_file)
    if kind == "truncated .bin":
        os.truncate(bin_file, bin_file.stat().st_size // 2)
    elif kind == ".idx of another dataset":
        import numpy as np
        import torch
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        builder = IndexedDatasetBuilder(str(tmp_path / "other.bin"), dtype=np.int32)
        builder.add_document(torch.arange(10), [10])
        builder.finalize(str(idx_file))
    else:
        idx_file.write_bytes(idx_file.read_bytes()[:30])
    return prefix


@pytest.mark.parametrize("kind", ["truncated .bin", ".idx of another dataset", "truncated .idx"])
def test_a_damaged_dataset_fails_before_training(tmp_path, tokenizer_dir, text_dataset, kind):
    prefix = _damage_dataset(kind, tmp_path, text_dataset)
    size = Path(f"{text_dataset}.bin").stat().st_size
    message = {"truncated .bin": f"holds {size // 2:,} bytes where its .idx describes {size:,}",
               ".idx of another dataset": f"holds {size:,} bytes where its .idx describes 40 (a truncated copy, or "
                                          f"the .idx of another dataset)",
               "truncated .idx": "alpaca_text_document.idx is not a readable Megatron index"}[kind]
    result = train("--train-iters", "1", tokenizer_dir=tokenizer_dir, data=prefix)
    one_line_error(result, "pretrain", f"--data-path {prefix}", message)
    assert " iteration " not in result.stdout


@pytest.mark.slow
def test_a_full_disk_while_saving_stops_every_rank_with_the_cause(tmp_path):
    """Two tensor-parallel ranks: the save fails on one, and both end in one line naming the cause (no rank waits
    forever for the other), nothing of the checkpoint is left."""
    save = tmp_path / "ckpt"
    result = run_python("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *TRAIN, "--mock-data",
                        "--tensor-model-parallel-size", "2", "--train-iters", "2", "--save", str(save),
                        "--save-interval", "2", env=fault_injection.environment(full_disk=(save, 1000)))
    errors = [line for line in result.stderr.splitlines() if line.startswith("aquila-npu pretrain: error: ")]
    assert len(errors) == 2 and len(set(errors)) == 1, result.stderr[-3000:]
    assert errors[0].startswith(f"aquila-npu pretrain: error: --save {save}: ")
    assert any(hint in errors[0] for hint in FULL_DISK)
    assert result.returncode != 0 and re.search(r"exitcode\s*:\s*2\b", result.stderr)  # torchrun's report
    assert os.listdir(save) == []
