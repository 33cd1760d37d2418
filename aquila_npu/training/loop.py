"""The megatron-core training driver: model, optimizer and schedule set up as Megatron-LM's ``pretrain`` does, from
megatron-core's own pieces (GPTModel from our spec, DistributedDataParallel, get_megatron_optimizer,
OptimizerParamScheduler, get_forward_backward_func, dist_checkpointing), with Megatron-LM's log lines.
"""

from __future__ import annotations

import math
import resource
import time
from functools import partial

import torch

from aquila_npu import device_options, distributed, lora, plugin_manager
from aquila_npu.errors import AquilaNpuError
from aquila_npu.kernels import seams as kernels
from aquila_npu.specs import ModelSpec
from aquila_npu.training import checkpointing, data
from aquila_npu.training.arguments import ARCHITECTURE

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_spec(args, plugins, vocab_size: int | None) -> ModelSpec:
    """--model's spec with the explicit architecture flags applied, or a spec from the flags alone."""
    overrides = {f: getattr(args, f) for f in ARCHITECTURE if getattr(args, f) is not None}
    if not args.group_query_attention:
        overrides.pop("num_query_groups", None)  # Megatron ignores it without --group-query-attention
    if args.model:
        _, spec = plugins.find_model(args.model, args.plugin or None)
        if not args.group_query_attention and "num_attention_heads" in overrides:
            overrides["num_query_groups"] = overrides["num_attention_heads"]
        spec = spec.replace(**overrides)
    else:
        missing = [f"--{f.replace('_', '-')}" for f in ("num_layers", "hidden_size", "num_attention_heads")
                   if f not in overrides]
        if missing:
            raise AquilaNpuError(f"give --model NAME (see aquila-npu plugins) or the architecture flags "
                                 f"({', '.join(missing)} missing)")
        if not args.swiglu:
            raise AquilaNpuError("the driver builds SwiGLU / RMSNorm / RoPE models (Aquila2, Llama): add --swiglu")
        if vocab_size is None:
            raise AquilaNpuError("--tokenizer-name-or-path: needed for the vocabulary size without --model")
        heads = overrides["num_attention_heads"]
        overrides.setdefault("num_query_groups", heads)
        overrides.setdefault("ffn_hidden_size", 4 * overrides["hidden_size"])
        overrides.setdefault("max_position_embeddings", args.seq_length)
        spec = ModelSpec(name="from-flags", seq_length=args.seq_length, vocab_size=vocab_size,
                         untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
                         add_bias_linear=not args.disable_bias_linear, **overrides)
    if vocab_size is not None and vocab_size > spec.vocab_size:
        raise AquilaNpuError(f"the tokenizer has {vocab_size} ids but {spec.name} only {spec.vocab_size}")
    return spec


def _dtype_name(args) -> str:
    return "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"


class Trainer:
    def __init__(self, args) -> None:
        self.args = args
        self.plugins = plugin_manager.get()
        if args.plugin:
            self.plugins.require(args.plugin)
        self.tokenizer = None
        if args.tokenizer_name_or_path:
            self.tokenizer = data.DatasetTokenizer(args.tokenizer_name_or_path, 0)
        self.spec = resolve_spec(args, self.plugins, self.tokenizer.vocab_size if self.tokenizer else None)
        if args.seq_length > self.spec.max_position_embeddings:  # Megatron-LM's validate_args refuses it too
            raise AquilaNpuError(f"--seq-length {args.seq_length} is longer than {self.spec.name}'s "
                                 f"--max-position-embeddings {self.spec.max_position_embeddings}: lower --seq-length, "
                                 f"or raise --max-position-embeddings to train the model on longer positions")
        if self.tokenizer is None:
            self.tokenizer = data.DatasetTokenizer(None, self.spec.vocab_size)
        self.dtype = DTYPES[_dtype_name(args)]
        tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
        self.vp = None
        if args.num_layers_per_virtual_pipeline_stage:
            per_stage = self.spec.num_layers // pp
            if pp < 2 or per_stage % args.num_layers_per_virtual_pipeline_stage:
                raise AquilaNpuError(f"--num-layers-per-virtual-pipeline-stage "
                                     f"{args.num_layers_per_virtual_pipeline_stage}: needs pipeline parallelism and "
                                     f"must divide the {per_stage} layers of a stage")
            self.vp = per_stage // args.num_layers_per_virtual_pipeline_stage
        self.world = distributed.initialize(args.device, tp, pp, seed=args.seed,
                                            virtual_pipeline_model_parallel_size=self.vp,
                                            kernels=kernels.request_from_args(args),
                                            device_options=device_options.given(args, self.plugins.device_options()))
        from megatron.core import parallel_state

        _set_random_seed(args.seed)
        self.dp = parallel_state.get_data_parallel_world_size()
        if args.global_batch_size is None:
            args.global_batch_size = args.micro_batch_size * self.dp
        if args.global_batch_size % (args.micro_batch_size * self.dp):
            raise AquilaNpuError(f"--global-batch-size {args.global_batch_size} must be a multiple of "
                                 f"--micro-batch-size x data-parallel size ({args.micro_batch_size} x {self.dp})")
        self.num_microbatches = args.global_batch_size // (args.micro_batch_size * self.dp)
        # packed instruction data: the loss is the mean over the global batch's response tokens (megatron-core's
        # calculate_per_token_loss), as unpacked samples give it, whichever sequence each document landed in
        self.packed = bool(args.is_instruction_dataset and not args.mock_data
                           and data.check_packed_training(args.data_path[0], args))
        if args.use_distributed_optimizer and args.optimizer != "adam":
            raise AquilaNpuError(f"--use-distributed-optimizer: megatron-core's distributed optimizer takes "
                                 f"--optimizer adam only, not {args.optimizer}")
        self.lora = lora.options_from_args(args, checkpointing.saved_args(args.lora_load, "--lora-load")
                                           if args.lora_load else None)
        if args.lora_load and self.lora is None:
            raise AquilaNpuError(f"--lora-load {args.lora_load}: the checkpoint records no LoRA adapters; give a LoRA "
                                 f"run's --save folder")
        self.sequence_parallel = args.sequence_parallel and tp > 1
        if args.save:
            checkpointing.check_writable(args.save)
        self._build_model_and_optimizer()

    # --- set-up ---------------------------------------------------------------------------------------------
    def _build_model_and_optimizer(self) -> None:
        from megatron.core import parallel_state
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
        )
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        from megatron.core.transformer.module import Float16Module

        from aquila_npu.model import build_gpt_model

        args = self.args
        dropout = {k: getattr(args, k) for k in ("hidden_dropout", "attention_dropout") if getattr(args, k) is not None}
        # gloo runs a batch of P2P operations one at a time, and the interleaved schedule's batched sends and
        # receives between the same two ranks then pair up the wrong tensors (measured: PP=2 x VP=2 loses the
        # non-interleaved losses from the first step); unbatched P2P keeps them in order
        p2p = {"batch_p2p_comm": False} if self.plugins.backend(self.world.device) == "gloo" else {}
        chunks = []
        for stage in range(self.vp or 1):
            vp_stage = stage if self.vp else None
            chunk = build_gpt_model(
                self.spec, vp_stage=vp_stage,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                params_dtype=self.dtype, pipeline_dtype=self.dtype, sequence_parallel=self.sequence_parallel,
                virtual_pipeline_model_parallel_size=self.vp,
                calculate_per_token_loss=self.packed or args.calculate_per_token_loss, **dropout, **p2p)
            if self.lora is not None:  # before the wrappers: DDP and the optimizer see the adapters only
                lora.apply_lora(chunk, self.lora, args.seed)
            if args.fp16 or args.bf16:
                chunk = Float16Module(chunk.config, chunk)
            chunks.append(chunk)
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=args.bf16, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=args.use_distributed_optimizer)
        self.model = [DistributedDataParallel(config=c.config if hasattr(c, "config") else c.module.config,
                                              ddp_config=ddp_config, module=c, disable_bucketing=i > 0)
                      for i, c in enumerate(chunks)]
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer=args.optimizer, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
            fp16=args.fp16, bf16=args.bf16, params_dtype=self.dtype, loss_scale=args.loss_scale,
            initial_loss_scale=args.initial_loss_scale, min_loss_scale=args.min_loss_scale,
            loss_scale_window=args.loss_scale_window, hysteresis=args.hysteresis, adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, sgd_momentum=args.sgd_momentum,
            use_distributed_optimizer=args.use_distributed_optimizer, clip_grad=args.clip_grad), self.model)
        # Megatron-LM's arithmetic, in samples: the warmup fraction is of the decay samples and stays fractional
        gbs = args.global_batch_size
        decay_steps = (args.lr_decay_iters or args.train_iters) * gbs
        warmup_steps = (args.lr_warmup_fraction * decay_steps if args.lr_warmup_fraction is not None
                        else args.lr_warmup_iters * gbs)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=warmup_steps,
            lr_decay_steps=decay_steps, lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay,
            end_wd=args.weight_decay, wd_incr_steps=args.train_iters * gbs, wd_incr_style="constant")
        config = self.model[0].config
        config.grad_scale_func = self.optimizer.scale_loss
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = [m.no_sync for m in self.model] if len(self.model) > 1 else self.model[0].no_sync

    def saved_args(self, consumed_train: int, consumed_valid: int):
        from aquila_npu.convert.megatron_format import Parallelism, megatron_args

        saved = megatron_args(self.spec, Parallelism(self.args.tensor_model_parallel_size,
                                                     self.args.pipeline_model_parallel_size, self.vp or 1),
                              self.dtype)
        saved.consumed_train_samples, saved.consumed_valid_samples = consumed_train, consumed_valid
        for key in ("micro_batch_size", "global_batch_size", "train_iters", "lr", "min_lr", "seed",
                    "data_path", "split", "is_instruction_dataset", "sequence_parallel", "use_distributed_optimizer"):
            setattr(saved, key, getattr(self.args, key))
        saved.seq_length = self.args.seq_length
        if self.lora is not None:
            vars(saved).update(lora.saved_fields(self.lora))
        return saved

    # --- steps ----------------------------------------------------------------------------------------------
    def _forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        device = self.world.torch_device
        tokens = batch["tokens"].to(device)
        labels = batch["labels"].to(device)
        loss_mask = batch["loss_mask"].to(device)
        position_ids = batch["position_ids"].to(device)
        packed = data.packed_seq_params(batch["cu_seqlens"].to(device)) if "cu_seqlens" in batch else None
        output = model(tokens, position_ids, None, labels=labels, packed_seq_params=packed)
        return output, partial(_masked_loss, loss_mask)

    def _iterators(self, dataset, consumed: int):
        if dataset is None:
            return None
        iterators = [data.micro_batch_iterator(dataset, consumed, self.args.micro_batch_size, self.args.num_workers)
                     for _ in range(self.vp or 1)]
        return iterators if self.vp else iterators[0]

    def _run(self, iterators, forward_only: bool) -> torch.Tensor | None:
        """One global batch through the schedule; the [loss sum, tokens] over it and the data-parallel group on the
        last pipeline stage, else None."""
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        losses = get_forward_backward_func()(
            forward_step_func=self._forward_step, data_iterator=iterators, model=self.model,
            num_microbatches=self.num_microbatches, seq_length=self.args.seq_length,
            micro_batch_size=self.args.micro_batch_size, forward_only=forward_only)
        if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            return None
        total = torch.stack([item["lm loss"] for item in losses]).sum(dim=0).float()
        torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
        return total

    def train_step(self, iterators):
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        total = self._run(iterators, forward_only=False)
        updated, grad_norm, _ = self.optimizer.step()
        if updated:
            self.scheduler.step(increment=self.args.global_batch_size)
        return total, grad_norm, not updated

    def evaluate(self, dataset, consumed: int) -> float | None:
        for chunk in self.model:
            chunk.eval()
        iterators = self._iterators(dataset, consumed)
        total = torch.zeros(2)
        with torch.no_grad():
            for _ in range(self.args.eval_iters):
                result = self._run(iterators, forward_only=True)
                if result is not None:
                    total += result.cpu()
        for chunk in self.model:
            chunk.train()
        return (total[0] / total[1]).item() if total[1] > 0 else None

    # --- the loop -------------------------------------------------------------------------------------------
    def train(self) -> list[tuple[int, float]]:
        args = self.args
        iteration, consumed_train, consumed_valid = 0, 0, 0
        # with LoRA, --load is the frozen base (its weights only) and --lora-load the run that is resumed
        resumed = args.lora_load if self.lora is not None else args.load
        if self.lora is not None and args.load:
            checkpointing.load(args.load, self.model, self.optimizer, self.scheduler, False, False, part="base")
            _print_last(f"loaded the base model from {args.load}")
        if resumed:
            with_optim = not (args.finetune or args.no_load_optim)
            iteration, saved = checkpointing.load(
                resumed, self.model, self.optimizer, self.scheduler, with_optim,
                not (args.finetune or args.no_load_rng), part="adapters" if self.lora is not None else "all",
                flag="--lora-load" if self.lora is not None else "--load")
            if args.finetune:
                iteration = 0
            elif saved is not None:
                consumed_train = getattr(saved, "consumed_train_samples", iteration * args.global_batch_size)
                consumed_valid = getattr(saved, "consumed_valid_samples", 0)
            _print_last(f"loaded {'the adapters of ' if self.lora is not None else ''}{resumed} at iteration "
                        f"{iteration}{' (weights only: --finetune)' if args.finetune else ''}")
        train_ds, valid_ds, _ = data.build_datasets(args, self.tokenizer, self.packed)
        if train_ds is None:
            raise AquilaNpuError(f"--split {args.split}: the training split is empty")
        iterators = self._iterators(train_ds, consumed_train)
        start_iteration = iteration
        writer = _tensorboard(args.tensorboard_dir)
        history: list[tuple[int, float]] = []
        interval = _new_interval()
        tokens_per_iteration = args.global_batch_size * args.seq_length
        devices = torch.distributed.get_world_size()
        _print_last(f"training {self.spec.name}: TP={args.tensor_model_parallel_size} "
                    f"PP={args.pipeline_model_parallel_size}{f' VP={self.vp}' if self.vp else ''} DP={self.dp}, "
                    f"{self.num_microbatches} micro-batches of {args.micro_batch_size} x {args.seq_length} tokens, "
                    f"{_dtype_name(args)}, on {self.world.device}; fused kernels: "
                    f"{', '.join(sorted(self.world.kernels.fused)) or 'none'}")
        if self.lora is not None:
            counts = [sum(p.numel() for chunk in self.model for p in chunk.parameters() if p.requires_grad == trainable)
                      for trainable in (True, False)]
            _print_last(f"LoRA r={self.lora.rank} alpha={self.lora.alpha:g} on {' '.join(self.lora.targets)}: "
                        f"{counts[0]:,} trainable parameters, {counts[1]:,} frozen (this rank)")
        while iteration < args.train_iters:
            total, grad_norm, skipped = self.train_step(iterators)
            iteration += 1
            consumed_train += args.global_batch_size
            if total is not None:
                loss = (total[0] / total[1]).item()
                history.append((iteration, loss))
                # Megatron-LM's interval loss: the mean of the iterations' losses, skipped iterations left out
                if skipped:
                    interval["nan"] += int(not math.isfinite(loss))
                else:
                    interval["loss"] += loss
                    interval["advanced"] += 1
            interval["iterations"] += 1
            interval["skipped"] += int(skipped)
            # Megatron-LM logs the first iteration of every run too, without resetting the interval's sums, so
            # its next line averages from there; the same here, so that logs and parsers agree line for line
            first = iteration == start_iteration + 1
            if iteration % args.log_interval == 0 or first:
                elapsed = (time.perf_counter() - interval["start"]) / interval["iterations"]
                loss = interval["loss"] / interval["advanced"] if interval["advanced"] else None
                tokens_per_device = tokens_per_iteration / elapsed / devices
                line = (f" iteration {iteration:8d}/{args.train_iters:8d} | consumed samples: {consumed_train:12d} | "
                        f"elapsed time per iteration (ms): {elapsed * 1000:.1f} | s/step: {elapsed:.3f} | "
                        f"tokens/p/s: {tokens_per_device:.1f} | learning rate: "
                        f"{self.optimizer.param_groups[0]['lr']:.6E} | global batch size: {args.global_batch_size:5d} |"
                        + (f" lm loss: {loss:.6E} |" if loss is not None else "")
                        + f" loss scale: {self.optimizer.get_loss_scale().item():.1f} |"
                        + (f" grad norm: {grad_norm:.3f} |" if grad_norm is not None else "")
                        + f" number of skipped iterations: {interval['skipped']:3d} | number of nan iterations: "
                          f"{interval['nan']:3d} | peak memory (GB): {_peak_memory_gb():.2f} |")
                _print_last(line)
                if first:
                    _print_last(f"optimizer state: {_optimizer_state_bytes(self.optimizer) / 2**20:.1f} MiB (this rank)")
                if writer is not None and loss is not None:
                    writer.add_scalar("lm loss", loss, iteration)
                    writer.add_scalar("learning-rate", self.optimizer.param_groups[0]["lr"], iteration)
                    writer.add_scalar("tokens per second per device", tokens_per_device, iteration)
                if not first:
                    interval = _new_interval()
            if valid_ds is not None and args.eval_iters and iteration % args.eval_interval == 0:
                value = self.evaluate(valid_ds, consumed_valid)
                consumed_valid += args.eval_iters * args.global_batch_size
                if value is not None:
                    _print_last(f"validation loss at iteration {iteration} | lm loss value: {value:.6E} | "
                                f"lm loss PPL: {math.exp(min(value, 20)):.6E} |")
                    if writer is not None:
                        writer.add_scalar("validation lm loss", value, iteration)
            if args.save and args.save_interval and iteration % args.save_interval == 0:
                self.save(iteration, consumed_train, consumed_valid)
            if args.exit_interval and iteration % args.exit_interval == 0:
                break
        if args.save and iteration > start_iteration and (not args.save_interval or iteration % args.save_interval):
            self.save(iteration, consumed_train, consumed_valid)
        if writer is not None:
            writer.close()
        return history

    def save(self, iteration: int, consumed_train: int, consumed_valid: int) -> None:
        start = time.perf_counter()
        folder = checkpointing.save(self.args.save, iteration, self.model, self.optimizer, self.scheduler,
                                    self.saved_args(consumed_train, consumed_valid), self.args.ckpt_format,
                                    with_optim=not self.args.no_save_optim, with_rng=not self.args.no_save_rng,
                                    distributed_optimizer=self.args.use_distributed_optimizer,
                                    adapters_only=self.lora is not None)
        _print_last(f"saved {'adapter ' if self.lora is not None else ''}checkpoint at iteration {iteration} to "
                    f"{folder} ({self.args.ckpt_format}, "
                    f"{time.perf_counter() - start:.1f} s)")


def _new_interval() -> dict:
    return {"loss": 0.0, "advanced": 0, "iterations": 0, "skipped": 0, "nan": 0, "start": time.perf_counter()}


def _set_random_seed(seed: int) -> None:
    """Megatron-LM's seeding (``_set_random_seed``): one seed per pipeline stage, the same across tensor- and
    data-parallel ranks, for python, numpy, torch and the model-parallel RNG tracker."""
    import random

    import numpy as np
    from megatron.core import parallel_state, tensor_parallel

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _masked_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron-LM's loss: the mean over tokens whose mask is set; reported as [sum, tokens] so logging can
    average over micro-batches and data-parallel ranks exactly."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    tokens = mask.sum().to(torch.int)
    return loss, tokens, {"lm loss": torch.stack([loss.detach(), tokens.float()])}


def _optimizer_state_bytes(optimizer) -> int:
    """Bytes of the optimizer's per-parameter state (Adam's moments; fp32 main copies of fp16/bf16 weights)."""
    total = 0
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_optimizer = inner.optimizer
        for state in torch_optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in state.values()
                         if isinstance(v, torch.Tensor) and v.dim() > 0)
        for group in getattr(inner, "fp32_from_float16_groups", None) or []:
            total += sum(p.numel() * p.element_size() for p in group)
        if getattr(inner, "shard_fp32_from_float16_groups", None):
            total += sum(p.numel() * p.element_size() for g in inner.shard_fp32_from_float16_groups for p in g)
    return total


def _peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _tensorboard(folder: str | None):
    if not folder:
        return None
    if torch.distributed.get_rank() != torch.distributed.get_world_size() - 1:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise AquilaNpuError("--tensorboard-dir: install tensorboard (pip install tensorboard)") from None
    return SummaryWriter(log_dir=folder)


def _print_last(message: str) -> None:
    """Megatron-LM's print_rank_last: the last rank holds the loss."""
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        print(message, flush=True)


def main(argv: list[str] | None = None) -> int:
    from aquila_npu.training.arguments import parse

    def run() -> None:
        Trainer(parse(argv)).train()

    return distributed.run_command("pretrain", run)
