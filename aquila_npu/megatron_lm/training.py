"""Training hooks of the Megatron-LM route: the plugin ``megatron-lm`` (registered by the start-up hook, on this
route only) — the patches that let ``pretrain_gpt.py`` run on the selected device with our arguments, layer-spec
config fields and instruction datasets, and the arguments it adds to Megatron-LM's parser.
"""

from __future__ import annotations

import os
import sys

from aquila_npu.hookspecs import hookimpl


def _wheel_dataset_helpers() -> str | None:
    """The prebuilt C++ dataset helpers of the installed megatron-core wheel, if they exist."""
    import glob
    import importlib.metadata
    import sysconfig

    try:
        dist = importlib.metadata.distribution("megatron-core")
    except importlib.metadata.PackageNotFoundError:
        return None
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    found = glob.glob(str(dist.locate_file("megatron/core/datasets")) + f"/helpers_cpp{suffix}")
    return found[0] if found else None


def _checkout_has_helpers(script: str) -> bool:
    import glob

    return bool(glob.glob(os.path.join(os.path.dirname(os.path.abspath(script)), "megatron", "core", "datasets",
                                       "helpers_cpp*.so")))


@hookimpl
def aquila_npu_register_patches(registry, device):
    import sys

    from aquila_npu.megatron_lm import lora as lora_route

    def device_norm(original):
        from aquila_npu import plugin_manager

        return plugin_manager.active_kernels().rms_norm.load()

    registry.register(
        "megatron.core.transformer.transformer_block.LayerNormImpl", device_norm, owner="megatron-lm",
        reason="given a layer spec (--spec), megatron-core builds the block's final norm from this module-level "
               "default (Apex/torch), not from the spec; use the device's norm, which supports sequence parallelism")

    registry.register(
        "gpt_builders.GPTModel", _gpt_model_with_rope_interpolation_and_lora, owner="megatron-lm",
        reason="Megatron-LM's gpt_builder hands --rotary-seq-len-interpolation-factor to its legacy model only; "
               "megatron-core's GPTModel gets it too (linear RoPE scaling: the 16K models); with --lora-r (or "
               "--lora-load) the model gets LoRA adapters before Megatron-LM wraps it, its base frozen")
    for target in ("megatron.training.checkpointing.load_checkpoint", "megatron.training.training.load_checkpoint"):
        registry.register(
            target, lora_route.load_checkpoint_in_parts, owner="megatron-lm",
            reason="a LoRA run's --load is the frozen base and --lora-load its adapters (MindSpeed-LLM's flags): two "
                   "loads of Megatron-LM's own, each of one part of the model's state, strictly (the training loop "
                   "and the generation scripts each call their own imported name)")
    registry.register(
        "megatron.training.arguments.core_transformer_config_from_args", _config_with_kernel_fields,
        owner="megatron-lm",
        reason="the chosen kernels need TransformerConfig fields Megatron-LM has no flag for (use_te_activation_func "
               "for a device's SwiGLU module) or sets from its own fusion flags (apply_rope_fusion)")
    registry.register(
        "megatron.training.arguments.parse_args", _parse_args_with_plugins, owner="megatron-lm",
        reason="Megatron-LM's parser takes one extra_args_provider; chain the plugins' aquila_npu_add_arguments "
               "hook (--is-instruction-dataset) after the script's own; expand our --plugin/--model flags in an "
               "argument list built after start-up (lm-eval's megatron_lm model); check that --save is writable "
               "before training, not at the first save")
    registry.register(
        "megatron.training.utils.get_batch_on_this_tp_rank", _packed_batch_on_every_tp_rank, owner="megatron-lm",
        reason="packed instruction data (THD): at core_v0.16.1 the tensor-parallel ranks that receive the batch "
               "never receive max_seqlen (pretrain_gpt.get_batch then fails on them) and cu_seqlens stays [1, n] "
               "where PackedSeqParams needs [n]; every rank derives both from the broadcast cu_seqlens instead")
    registry.register(
        "megatron.training.training.build_train_valid_test_datasets", _instruction_datasets_when_asked,
        owner="megatron-lm",
        reason="--is-instruction-dataset: the packed GeneralInstructionHandler datasets (loss on response tokens "
               "only) instead of the script's GPTDataset provider")

    wheel_helpers = _wheel_dataset_helpers()
    if wheel_helpers and sys.argv and not _checkout_has_helpers(sys.argv[0]):
        def load_wheel_helpers():
            import importlib.machinery
            import importlib.util

            name = "megatron.core.datasets.helpers_cpp"
            loader = importlib.machinery.ExtensionFileLoader(name, wheel_helpers)
            spec = importlib.util.spec_from_file_location(name, wheel_helpers, loader=loader)
            module = importlib.util.module_from_spec(spec)
            loader.exec_module(module)
            return module

        registry.register_module_stub(
            "megatron.core.datasets.helpers_cpp", load_wheel_helpers, owner="megatron-lm",
            reason="the checkout's C++ dataset helpers are not built (Megatron-LM runs `make` with pybind11 at "
                   "start-up); use the identical prebuilt ones from the installed megatron-core wheel")
        registry.register(
            "megatron.core.datasets.utils.compile_helpers", lambda original: lambda: None, owner="megatron-lm",
            reason="nothing to compile: the dataset helpers come prebuilt from the megatron-core wheel")


@hookimpl
def aquila_npu_add_arguments(parser):
    group = parser.add_argument_group("aquila-npu")
    group.add_argument("--is-instruction-dataset", action="store_true",
                       help="--data-path is the --output-prefix of a GeneralInstructionHandler preprocessing run: "
                            "train on its packed samples, loss on response tokens only")
    from aquila_npu import lora

    lora.add_arguments(parser)


def _gpt_model_with_rope_interpolation_and_lora(original):
    import functools

    @functools.wraps(original)
    def GPTModel(*args, **kwargs):
        from megatron.training import get_args

        run = get_args()
        factor = getattr(run, "rotary_seq_len_interpolation_factor", None)
        if factor is not None:
            kwargs.setdefault("seq_len_interpolation_factor", factor)
        from aquila_npu.megatron_lm import lora as lora_route

        return lora_route.adapt(original(*args, **kwargs), run)

    return GPTModel


def _parse_args_with_plugins(original):
    def parse_args(extra_args_provider=None, ignore_unknown_args=False):
        from aquila_npu import plugin_manager

        _expand_our_flags(plugin_manager.get())

        def provider(parser):
            if extra_args_provider is not None:
                parser = extra_args_provider(parser)
            plugin_manager.get().hook.aquila_npu_add_arguments(parser=parser)
            return parser

        args = original(provider, ignore_unknown_args)
        if getattr(args, "save", None) and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            from aquila_npu.files import check_writable_folder

            check_writable_folder(args.save, "--save")  # now, not after the last iteration
        return args

    return parse_args


def _expand_our_flags(plugins) -> None:
    """Our flags (``--plugin``, ``--model``, ...) in the argument list a program builds for Megatron-LM itself, after
    start-up (lm-eval's ``megatron_lm`` model passes ``extra_args="--model NAME"`` through): expanded as the
    start-up hook expands a script's command line. A script's own command line was expanded at start-up already."""
    from aquila_npu.megatron_lm import arguments

    if not any(token.partition("=")[0] in arguments.OUR_FLAGS for token in sys.argv[1:]):
        return
    from aquila_npu import plugin_manager

    argv = sys.argv[1:]
    if not any(token.partition("=")[0] == "--plugin" for token in argv):  # the plugins the job was started with
        argv = ["--plugin", os.environ.get(plugin_manager.ENV_PLUGINS, ""), *argv]
    new_argv, ours, _ = arguments.expand_argv(argv, plugins)
    os.environ.update(ours.environment)
    sys.argv[1:] = new_argv


def _config_with_kernel_fields(original):
    def core_transformer_config_from_args(*args, **kwargs):
        from aquila_npu import plugin_manager

        config = original(*args, **kwargs)
        for name, value in plugin_manager.active_kernels().config_overrides().items():
            setattr(config, name, value)
        return config

    return core_transformer_config_from_args


def _instruction_datasets_when_asked(original):
    def build_train_valid_test_datasets(provider, train_valid_test_num_samples=None, *args, **kwargs):
        from megatron.training import get_args

        margs = get_args()
        if getattr(margs, "is_instruction_dataset", False):
            provider = _instruction_provider
        return original(provider, train_valid_test_num_samples, *args, **kwargs)

    return build_train_valid_test_datasets


def _instruction_provider(train_valid_test_num_samples, vp_stage=None):
    from megatron.training import get_args

    from aquila_npu.training.arguments import instruction_prefix
    from aquila_npu.training.data import (
        DatasetTokenizer,
        check_packed_training,
        instruction_datasets,
    )

    args = get_args()
    prefix = instruction_prefix(args.data_path)
    pad = DatasetTokenizer(args.tokenizer_model, 0).pad
    # packed data carries no max_seqlen: _packed_batch_on_every_tp_rank derives it on every rank
    packed = check_packed_training(prefix, args, per_token_loss_flag=True)
    return instruction_datasets(prefix, args.split, list(train_valid_test_num_samples), args.seq_length,
                                args.seed, pad, create_attention_mask=args.create_attention_mask_in_dataloader,
                                packed=packed)


def _packed_batch_on_every_tp_rank(original):
    import functools

    @functools.wraps(original)
    def get_batch_on_this_tp_rank(*args, **kwargs):
        batch = original(*args, **kwargs)
        cu_seqlens = batch.get("cu_seqlens")
        if cu_seqlens is not None and batch.get("local_cp_size") is None:
            cu_seqlens = cu_seqlens.reshape(-1)
            batch["cu_seqlens"] = cu_seqlens
            batch["max_seqlen"] = cu_seqlens.diff().max().reshape(1).to(cu_seqlens.dtype)
        return batch

    return get_batch_on_this_tp_rank
