"""A crafted checkpoint never runs code: torch_dist ``.metadata``, ``common.pt`` and the objects inside ``.distcp``
files, opened by every command that loads a checkpoint (convert, generate, evaluate, pretrain --load) and on the
Megatron-LM route. Each attack file carries a payload that creates a marker file when unpickled; each test checks
the one-line refusal naming the file, the exit status, that the marker does not exist, and that the file really
is an attack (plain unpickling does create the marker)."""

from __future__ import annotations

import io
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import BUNDLED_DATA, make_hf_checkpoint, run_python


class Payload:
    """Unpickling this creates ``marker``: what a crafted checkpoint would do with any code of its choice."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def good_dist(tmp_path_factory, tiny_spec) -> Path:
    """A tiny torch_dist checkpoint as the converter writes it."""
    from aquila_npu.convert import ConvertOptions, convert

    root = tmp_path_factory.mktemp("untrusted")
    hf = make_hf_checkpoint(tiny_spec, root / "hf", seed=3)
    convert(ConvertOptions(load_dir=str(hf), save_dir=str(root / "dist"), ckpt_format="torch_dist", progress=False))
    return root / "dist"


@pytest.fixture(scope="module")
def dist_with_object_payload(tmp_path_factory, tiny_spec, good_dist) -> tuple[Path, Path]:
    """A torch_dist checkpoint whose first stored object (a layer's ``_extra_state``, inside a ``.distcp`` file)
    is the payload, written by megatron-core's own saver."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from aquila_npu.convert import ConvertOptions, convert

    root = tmp_path_factory.mktemp("untrusted-object")
    marker = root / "object-payload-ran"
    original = dist_checkpointing.save

    def save_with_payload(state, folder, *args, **kwargs):
        next(v for v in nested_values(state) if isinstance(v, ShardedObject)).data = Payload(marker)
        return original(state, folder, *args, **kwargs)

    dist_checkpointing.save = save_with_payload
    try:
        convert(ConvertOptions(load_dir=str(good_dist), load_model_type="mg", save_dir=str(root / "dist"),
                               ckpt_format="torch_dist", progress=False))
    finally:
        dist_checkpointing.save = original
    assert not marker.exists()
    return root / "dist", marker


def _crafted(kind: str, tmp_path: Path, good_dist: Path, object_payload) -> tuple[Path, Path, Path]:
    """(checkpoint folder, marker, the crafted file) for ``kind``."""
    if kind == "object in .distcp":
        folder, marker = object_payload
        return folder, marker, folder / "iter_0000001"
    folder, marker = tmp_path / "crafted", tmp_path / f"{kind}-payload-ran"
    shutil.copytree(good_dist, folder)
    target = folder / "iter_0000001" / (".metadata" if kind == ".metadata" else "common.pt")
    if kind == ".metadata":
        target.write_bytes(pickle.dumps(Payload(marker)))
    else:
        torch.save({"args": Payload(marker), "iteration": 1}, target)
    return folder, marker, target


def _command(verb: str, checkpoint: Path, tmp_path: Path, tokenizer_dir: Path) -> list[str]:
    model = ["--load", str(checkpoint), "--tokenizer-name-or-path", str(tokenizer_dir)]
    if verb == "convert":
        return ["-m", "aquila_npu.convert", "--load-dir", str(checkpoint), "--load-model-type", "mg",
                "--save-model-type", "hf", "--save-dir", str(tmp_path / "out"), "--no-progress"]
    if verb == "generate":
        return ["-m", "aquila_npu.generate", *model, "--prompt", "hello", "--max-new-tokens", "2"]
    if verb == "evaluate":
        return ["-m", "aquila_npu.evaluate", "boolq", *model, "--task-data-path",
                str(BUNDLED_DATA / "boolq" / "dev_300.jsonl"), "--limit", "2", "--no-progress"]
    return ["-m", "aquila_npu.pretrain", "--model", "aquila2-tiny", "--mock-data", "--micro-batch-size", "1",
            "--seq-length", "16", "--lr", "1e-4", "--train-iters", "1", "--eval-iters", "0", "--load",
            str(checkpoint), "--finetune"]


def _unpickle_plainly(kind: str, crafted: Path) -> None:
    """What the readers did before: plain pickle for .metadata, full unpickling for objects."""
    if kind == ".metadata":
        pickle.loads(crafted.read_bytes())
    elif kind == "common.pt":
        torch.load(crafted, weights_only=False)
    else:  # every stored object of the folder, as torch's planner unpickled them
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(str(crafted)).read_metadata()
        for index, info in metadata.storage_data.items():
            if "_extra_state" in index.fqn:
                with open(crafted / info.relative_path, "rb") as f:
                    f.seek(info.offset)
                    torch.load(io.BytesIO(f.read(info.length)), weights_only=False)


CASES = [(kind, verb) for kind in (".metadata", "common.pt") for verb in ("convert", "generate", "evaluate",
                                                                         "pretrain")]
CASES += [("object in .distcp", verb) for verb in ("generate", "evaluate", "pretrain")]


@pytest.mark.parametrize("kind,verb", CASES)
def test_a_crafted_file_is_refused_in_one_line_and_runs_nothing(kind, verb, tmp_path, good_dist,
                                                                 dist_with_object_payload, tokenizer_dir):
    checkpoint, marker, crafted = _crafted(kind, tmp_path, good_dist, dist_with_object_payload)
    result = run_python(*_command(verb, checkpoint, tmp_path, tokenizer_dir))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"aquila-npu {verb}: error: "), lines
    assert str(crafted if kind != "object in .distcp" else "_extra_state") in lines[0], lines[0]
    assert "refusing to unpickle" in lines[0]
    assert not marker.exists(), "the payload ran"
    assert not (tmp_path / "out").exists()
    _unpickle_plainly(kind, crafted)
    assert marker.exists(), "the crafted file is no attack: the test proves nothing"
    marker.unlink()


def test_the_megatron_lm_route_refuses_a_crafted_metadata_file(tmp_path, good_dist):
    """Through the autoload of ``pretrain_gpt.py --plugin``: megatron-core's own reader, deep inside the script."""
    checkpoint, marker, crafted = _crafted(".metadata", tmp_path, good_dist, None)
    script = tmp_path / "load_gpt.py"
    script.write_text("import sys\nfrom megatron.core import dist_checkpointing\n"
                      "dist_checkpointing.load_tensors_metadata(sys.argv[1])\nprint('loaded')\n")
    result = run_python(str(script), "--plugin", "aquila2", "--device", "cpu", str(checkpoint / "iter_0000001"))
    assert result.returncode == 2, result.stderr[-3000:]
    # Megatron-LM's own start-up messages come first; the refusal is the last line and the only error
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"aquila-npu: error: {crafted} holds io.open"), lines[-5:]
    assert "Traceback" not in result.stderr and "loaded" not in result.stdout
    assert not marker.exists()


def test_real_metadata_reads_the_same_through_the_restricted_unpickler(good_dist, tmp_path):
    from aquila_npu import unpickling

    metadata_file = good_dist / "iter_0000001" / ".metadata"
    with open(metadata_file, "rb") as f:
        ours = unpickling.load_checkpoint_metadata(f, str(metadata_file))
    assert ours == pickle.loads(metadata_file.read_bytes())
    assert ours.state_dict_metadata and ours.storage_data


def test_a_training_checkpoint_with_optimizer_and_rng_state_loads_weights_only(tmp_path):
    """The objects a training checkpoint stores (RNG state, optimizer step) pass the weights-only loader, and the
    run resumes from them."""
    flags = ["--model", "aquila2-tiny", "--mock-data", "--micro-batch-size", "1", "--seq-length", "16", "--lr", "1e-4",
             "--eval-iters", "0", "--save", str(tmp_path / "ckpt"), "--save-interval", "1", "--log-interval", "1"]
    run_python("-m", "aquila_npu.pretrain", *flags, "--train-iters", "1", check=True)
    result = run_python("-m", "aquila_npu.pretrain", *flags, "--train-iters", "2", "--load", str(tmp_path / "ckpt"),
                        check=True)
    assert "loaded" in result.stdout and "iteration        2/       2" in result.stdout


def test_the_patches_are_listed_and_reversible():
    from aquila_npu import unpickling
    from aquila_npu.patching import PatchRegistry

    registry = PatchRegistry()
    unpickling.register_patches(registry)
    assert {p.target.rsplit(".", 1)[-1] for p in registry} == {"pickle", "load_bytes", "load_common"}
    result = run_python("-m", "aquila_npu", "plugins", "--patches", "--device", "cpu", check=True)
    for patch in registry:
        assert any(line.startswith("aquila-npu") and patch.target in line for line in result.stdout.splitlines())
    import torch.distributed.checkpoint.filesystem as filesystem

    unpickling.uninstall()
    assert filesystem.pickle is pickle
    unpickling.install()
    assert filesystem.pickle is not pickle and sys.modules["pickle"] is pickle  # only torch's reader sees it
