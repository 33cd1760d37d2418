"""Training checkpoints in Megatron-LM's layout: ``torch_dist`` (megatron-core dist_checkpointing) or the per-rank
``torch`` format, with optimizer, LR scheduler and RNG state, under ``{save}/iter_{N:07d}/`` and the tracker file
``latest_checkpointed_iteration.txt``.

An iteration is written to ``iter_{N:07d}.partial`` and renamed, and the tracker replaced, only after every rank has
finished writing; a run killed while saving leaves the previous checkpoint as the latest, complete and loadable.
"""

from __future__ import annotations

import os
import random
import shutil

import numpy as np
import torch

from aquila_npu.errors import AquilaNpuError, reported_os_errors, write_failure_message
from aquila_npu.lora import is_adapter_key

TRACKER = "latest_checkpointed_iteration.txt"
PARTIAL = ".partial"
CHECKPOINT_VERSION = 3.0


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_tracker(root: str) -> tuple[str, int] | None:
    """(folder, iteration) of the latest complete checkpoint under ``root``; None when there is none."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path, encoding="utf-8").read().strip()
    if text == "release":
        return os.path.join(root, "release"), 0
    try:
        iteration = int(text)
    except ValueError:
        raise AquilaNpuError(f"{path}: expected an iteration number or 'release', found {text!r}") from None
    return iteration_dir(root, iteration), iteration


def rng_state() -> dict:
    """This rank's random states, in Megatron-LM's keys; numpy's key array as a tensor so that the per-rank format
    loads with weights_only."""
    from megatron.core import tensor_parallel

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"random_rng_state": random.getstate(),
             "np_rng_state": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
             "torch_rng_state": torch.get_rng_state(),
             "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(_as_tuple(state["random_rng_state"]))
    name, keys, pos, has_gauss, cached = state["np_rng_state"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch_rng_state"])
    if "cuda_rng_state" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def _unwrapped(model) -> list:
    """The GPTModels inside the DDP / Float16Module wrappers: checkpoints hold the model's own key names."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(model)


def _model_keys(model) -> list[str]:
    return ["model"] if len(model) == 1 else [f"model{i}" for i in range(len(model))]


def _in_part(key: str, part: str) -> bool:
    """Whether a model key belongs to ``part``: "all", "adapters" (LoRA's) or "base" (everything else)."""
    return part == "all" or is_adapter_key(key) == (part == "adapters")


def _sharded_state(model, optimizer, scheduler, common: dict, with_optim: bool, with_rng: bool, loading: bool,
                   part: str = "all"):
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = dict(common)
    for key, chunk in zip(_model_keys(model), _unwrapped(model)):
        state[key] = {k: v for k, v in chunk.sharded_state_dict().items() if _in_part(k, part)}
    if with_optim:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=loading)
        state["opt_param_scheduler"] = scheduler.state_dict()
    if with_rng:
        state["rng_state"] = ShardedObject(
            "rng_state", [rng_state()],
            (parallel_state.get_pipeline_model_parallel_world_size(),
             parallel_state.get_tensor_model_parallel_world_size()),
            (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
            replica_id=parallel_state.get_data_parallel_rank())
    return state


def _rank_file(folder: str) -> str:
    from megatron.core import parallel_state

    tp, pp = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()
    name = f"mp_rank_{tp:02d}" if parallel_state.get_pipeline_model_parallel_world_size() == 1 \
        else f"mp_rank_{tp:02d}_{pp:03d}"
    return os.path.join(folder, name, "model_optim_rng.pt")


def check_writable(root: str) -> None:
    """Fail now, on every rank, when rank 0 cannot create ``--save`` or write a file into it: before the first
    iteration, not after the last."""
    import torch.distributed as dist

    from aquila_npu.files import check_writable_folder

    message = [None]
    if dist.get_rank() == 0:
        try:
            check_writable_folder(root, "--save")
        except AquilaNpuError as exc:
            message[0] = str(exc)
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(message, src=0)
    if message[0]:
        raise AquilaNpuError(f"{message[0]} (checked before training)")


def save(root: str, iteration: int, model, optimizer, scheduler, saved_args, fmt: str, with_optim: bool = True,
         with_rng: bool = True, distributed_optimizer: bool = False, adapters_only: bool = False) -> str:
    """Write a checkpoint of ``iteration`` on every rank; returns its folder once it is complete and latest. A
    failed write on any rank (a full disk) is one error on every rank, and leaves the previous checkpoint latest
    and nothing of this one. ``adapters_only``: the model's LoRA adapters without the (frozen) base weights."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from aquila_npu.convert import megatron_dist

    final = iteration_dir(root, iteration)
    work = final + PARTIAL
    part = "adapters" if adapters_only else "all"
    where = f"--save {root}"
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)  # debris of an earlier killed save
        os.makedirs(work)
    dist.barrier()
    common = {"args": saved_args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration}
    failure, here = None, True  # what failed, and whether it failed on this rank
    try:
        if fmt == "torch_dist":
            megatron_dist.save(_sharded_state(model, optimizer, scheduler, common, with_optim, with_rng, False,
                                              part), work, where)
        else:
            state = dict(common)
            for key, chunk in zip(_model_keys(model), _unwrapped(model)):
                state[key] = {k: v for k, v in chunk.state_dict().items() if _in_part(k, part)}
            if with_optim:
                state["optimizer"] = optimizer.state_dict()
                state["opt_param_scheduler"] = scheduler.state_dict()
            if with_rng:
                state["rng_state"] = [rng_state()]
            path = _rank_file(work)
            if parallel_state.get_data_parallel_rank() == 0:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            if with_optim and distributed_optimizer:  # a collective: the shards gathered to data-parallel rank 0
                optimizer.save_parameter_state(os.path.join(os.path.dirname(path), "distrib_optim.pt"))
            if parallel_state.get_data_parallel_rank() == 0:
                torch.save(state, path)
    except AquilaNpuError as exc:
        failure, here = str(exc), not isinstance(exc, megatron_dist.OtherRankFailed)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as either
        failure = write_failure_message(exc, where)
    failures = [(failure, here)]
    if dist.get_world_size() > 1:
        failures = [None] * dist.get_world_size()
        dist.all_gather_object(failures, (failure, here))
    if any(message for message, _ in failures):
        if dist.get_rank() == 0:
            shutil.rmtree(work, ignore_errors=True)
        # every rank reports the cause: the first rank's own failure, where one rank failed for all
        cause = next((message for message, own in failures if message and own), None) or failure
        raise AquilaNpuError(f"{cause} (iteration {iteration} was not saved; the latest checkpoint there is "
                             f"unchanged)")
    if dist.get_rank() == 0:
        with reported_os_errors(where):
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(work, final)
            tracker = os.path.join(root, TRACKER)
            with open(tracker + PARTIAL, "w", encoding="utf-8") as f:
                f.write(str(iteration))
            os.replace(tracker + PARTIAL, tracker)
    dist.barrier()
    return final


def _open(root: str, flag: str):
    """(folder, iteration, whether torch_dist, the saved common state, the per-rank state or None) of the latest
    checkpoint under ``root``."""
    from aquila_npu.convert import megatron_dist

    found = read_tracker(root)
    if found is None:
        raise AquilaNpuError(f"{flag} {root}: no {TRACKER} there; give the --save folder of a training run or "
                             f"a converted checkpoint")
    folder, iteration = found
    if not os.path.isdir(folder):
        raise AquilaNpuError(f"{flag} {root}: the tracker names {os.path.basename(folder)}, which is missing")
    if os.path.isfile(os.path.join(folder, "metadata.json")):
        return folder, iteration, True, megatron_dist.load_common(folder), None
    return folder, iteration, False, None, None


def saved_args(root: str, flag: str = "--load"):
    """The arguments saved with the latest checkpoint under ``root`` (None when it saved none)."""
    folder, _, is_dist, common, _ = _open(root, flag)
    if is_dist:
        return common.get("args")
    from aquila_npu.unpickling import load_weights_only

    ranks = sorted(n for n in os.listdir(folder) if n.startswith("mp_rank_"))
    if not ranks:
        raise AquilaNpuError(f"{flag} {folder}: no mp_rank_XX folder; not a Megatron checkpoint")
    return load_weights_only(os.path.join(folder, ranks[0], "model_optim_rng.pt"), mmap=True).get("args")


def load(root: str, model, optimizer, scheduler, with_optim: bool, with_rng: bool, part: str = "all",
         flag: str = "--load"):
    """Load the latest checkpoint under ``root``, in whichever format it was saved, into the model (and optimizer,
    scheduler, RNG when asked); returns (iteration, saved args).

    ``part``: "all"; "base" (a model with LoRA adapters: every weight but the adapters, from a converted or fully
    trained checkpoint); "adapters" (the adapters only, from an adapter checkpoint of a LoRA run)."""
    from aquila_npu.convert import megatron_dist

    folder, iteration, is_dist, common, state = _open(root, flag)
    if not is_dist:
        from aquila_npu.unpickling import load_weights_only

        path = _rank_file(folder)
        if not os.path.isfile(path):
            raise AquilaNpuError(f"{flag} {folder}: no {os.path.relpath(path, folder)}; the checkpoint was saved "
                                 f"with another tensor/pipeline split (convert it with python -m aquila_npu.convert)")
        common = state = load_weights_only(path, mmap=True)
    stored = (megatron_dist.load_tensors_metadata(folder) if is_dist
              else {k: v for key in _model_keys(model) for k, v in state.get(key, {}).items()})
    _check_part(stored, part, flag, folder)
    if with_optim and "opt_param_scheduler" not in common:
        raise AquilaNpuError(f"{flag} {folder}: the checkpoint holds no optimizer state (a converted "
                             f"checkpoint?); add --finetune, or --no-load-optim --no-load-rng")
    if is_dist:
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        sharded = _sharded_state(model, optimizer, scheduler, {}, with_optim, with_rng, True, part)
        requested = {item.key: tuple(item.global_shape) for key in _model_keys(model)
                     for item in sharded[key].values() if isinstance(item, ShardedTensor)}
        _check_shapes(requested, {k: tuple(v.global_shape) for k, v in stored.items()}, flag, folder)
        _check_keys([k for k in requested if k not in stored], [], flag, folder)
        state = megatron_dist.load(sharded, folder)
    for key, chunk in zip(_model_keys(model), _unwrapped(model)):
        own = {k: v for k, v in chunk.state_dict().items() if _in_part(k, part)}
        given = {k: v for k, v in state[key].items() if _in_part(k, part)}
        if not is_dist:
            _check_shapes({k: tuple(v.shape) for k, v in own.items() if isinstance(v, torch.Tensor)},
                          {k: tuple(v.shape) for k, v in given.items() if isinstance(v, torch.Tensor)}, flag, folder)
        missing, unexpected = chunk.load_state_dict(given, strict=False)
        _check_keys([k for k in missing if _in_part(k, part)], unexpected, flag, folder)
    if with_optim:
        optimizer.load_state_dict(state["optimizer"])
        distrib = os.path.join(os.path.dirname(_rank_file(folder)), "distrib_optim.pt")
        if not is_dist and os.path.isfile(distrib):
            optimizer.load_parameter_state(distrib)
        scheduler.load_state_dict(state["opt_param_scheduler"])
    if with_rng and "rng_state" in state:
        set_rng_state(state["rng_state"][0])
    return iteration, common.get("args")


def _check_part(stored, part: str, flag: str, folder: str) -> None:
    """A base checkpoint where adapters are wanted, or the reverse: one line saying which flag takes which."""
    keys = [k for k in stored if not k.endswith("_extra_state")]
    adapters = sum(is_adapter_key(k) for k in keys)
    if part == "adapters" and not adapters:
        raise AquilaNpuError(f"{flag} {folder}: no LoRA adapters in this checkpoint; give a LoRA run's --save "
                             f"folder as --lora-load (the base model goes to --load)")
    if part != "adapters" and keys and adapters == len(keys):
        raise AquilaNpuError(f"{flag} {folder}: this checkpoint holds LoRA adapters only; give it as --lora-load "
                             f"(with --lora-r), and the base model it was trained on as --load")


def _check_keys(missing: list, unexpected: list, flag: str, folder: str) -> None:
    if missing:
        raise AquilaNpuError(f"{flag} {folder}: {len(missing)} of this model's weights are not in the checkpoint "
                             f"(first: {missing[0]}); it was saved for another model or other "
                             f"--lora-target-modules")
    if unexpected:
        raise AquilaNpuError(f"{flag} {folder}: the checkpoint holds {len(unexpected)} weights this model lacks "
                             f"(first: {unexpected[0]}); check --model and the LoRA flags")


def _check_shapes(expected: dict, stored: dict, flag: str, folder: str) -> None:
    for key, shape in expected.items():
        if key in stored and stored[key] != shape:
            raise AquilaNpuError(f"{flag} {folder}: {key} is {list(stored[key])} there but {list(shape)} in this "
                                 f"model; the checkpoint belongs to another model or LoRA rank (check --model, "
                                 f"--lora-r and the --load base)")
