"""The Megatron-LM route: turn ``pretrain_gpt.py --plugin aquila2 --model NAME ...`` into Megatron-LM's own flags.

``expand_argv`` is pure (tests call it directly); ``aquila_npu.autoload`` applies it to ``sys.argv`` at start-up.
Precedence, highest first: the user's flags, the model spec's architecture flags, the device's defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from aquila_npu import device_options
from aquila_npu.errors import AquilaNpuError
from aquila_npu.kernels.seams import FLAGS as KERNEL_FLAGS

OUR_FLAGS = ("--plugin", "--model", "--device")
# the kernel switches, on and off (Megatron-LM's own --use-flash-attn only concerns its legacy models)
KERNEL_SWITCHES = {**{flag: (op, True) for op, flag in KERNEL_FLAGS.items()},
                   **{"--no-" + flag[2:]: (op, False) for op, flag in KERNEL_FLAGS.items()}}
LAYER_SPEC = ("aquila_npu.megatron_lm_spec", "layer_spec")


@dataclass
class OurArgs:
    plugins: list[str] = field(default_factory=list)
    model: str | None = None
    device: str | None = None
    kernels: dict[str, bool] = field(default_factory=dict)
    device_options: dict[str, str] = field(default_factory=dict)  # {flag: value}
    environment: dict[str, str] = field(default_factory=dict)  # the device options, as environment variables


def split_our_args(argv: list[str], option_flags=()) -> tuple[OurArgs, list[str]]:
    """Take ``--plugin`` (repeatable, comma-separated), ``--model``, ``--device``, the kernel switches
    (``--use-fused-rmsnorm``, ``--no-use-fused-rmsnorm``, ...) and the device options ``option_flags`` out of
    ``argv``."""
    ours, rest = OurArgs(), []
    i = 0
    while i < len(argv):
        token = argv[i]
        flag, eq, value = token.partition("=")
        if token in KERNEL_SWITCHES:
            op, on = KERNEL_SWITCHES[token]
            ours.kernels[op] = on
        elif flag in OUR_FLAGS or flag in option_flags:
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                    raise AquilaNpuError(f"{flag} needs a value (see `aquila-npu plugins` for plugin and model names)")
                value = argv[i + 1]
                i += 1
            if flag in option_flags:
                ours.device_options[flag] = value
            elif flag == "--plugin":
                ours.plugins.extend(v for v in value.split(",") if v)
            elif flag == "--model":
                ours.model = value
            else:
                ours.device = value
        else:
            rest.append(token)
        i += 1
    return ours, rest


def _given(argv: list[str], flag: str) -> bool:
    return any(token == flag or token.startswith(flag + "=") for token in argv)


def merge_flags(argv: list[str], *layers: dict[str, str | None]) -> list[str]:
    """Append each flag of ``layers`` (earlier layers win) that ``argv`` does not already give."""
    out = list(argv)
    for flags in layers:
        for flag, value in flags.items():
            if _given(out, flag):
                continue
            out.append(flag)
            if value is not None:
                out.append(value)
    return out


def expand_argv(argv: list[str], plugins) -> tuple[list[str], OurArgs, str]:
    """``argv`` (without the program name) for Megatron-LM; returns (new argv, our arguments, the device). Our
    arguments (plugins, model, device, kernel switches, device options) are taken out: Megatron-LM never sees them."""
    ours, rest = split_our_args(argv, [option.flag for option in plugins.device_options()])
    plugins.require(ours.plugins)
    model_flags: dict[str, str | None] = {}
    if ours.model:
        _, spec = plugins.find_model(ours.model, ours.plugins)
        model_flags = spec.megatron_lm_flags()
    device = plugins.select_device(ours.device)
    plugins.kernels(device, ours.kernels)  # a fused kernel the device lacks fails now, not in the model builder
    ours.environment = device_options.environment(ours.device_options, device, plugins.device_options())
    spec_flags = {} if _given(rest, "--spec") else {"--spec": None}
    out = merge_flags(rest, model_flags, plugins.megatron_defaults(device), spec_flags)
    if "--spec" in spec_flags:
        index = out.index("--spec")
        out[index + 1:index + 1] = list(LAYER_SPEC)
    return out, ours, device


# --------------------------------------------------------------------------------------------- route patches
# This module is registered as the plugin "megatron-lm" by the autoload, on the Megatron-LM route only.
from aquila_npu.hookspecs import hookimpl  # noqa: E402


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

    def device_norm(original):
        from aquila_npu import plugin_manager

        return plugin_manager.active_kernels().rms_norm.load()

    registry.register(
        "megatron.core.transformer.transformer_block.LayerNormImpl", device_norm, owner="megatron-lm",
        reason="given a layer spec (--spec), megatron-core builds the block's final norm from this module-level "
               "default (Apex/torch), not from the spec; use the device's norm, which supports sequence parallelism")

    registry.register(
        "megatron.training.arguments.core_transformer_config_from_args", _config_with_kernel_fields,
        owner="megatron-lm",
        reason="the chosen kernels need TransformerConfig fields Megatron-LM has no flag for (use_te_activation_func "
               "for a device's SwiGLU module) or sets from its own fusion flags (apply_rope_fusion)")
    registry.register(
        "megatron.training.arguments.parse_args", _parse_args_with_plugins, owner="megatron-lm",
        reason="Megatron-LM's parser takes one extra_args_provider; chain the plugins' aquila_npu_add_arguments "
               "hook (--is-instruction-dataset) after the script's own; check that --save is writable before "
               "training, not at the first save")
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


def _parse_args_with_plugins(original):
    def parse_args(extra_args_provider=None, ignore_unknown_args=False):
        from aquila_npu import plugin_manager

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
    from aquila_npu.training.data import DatasetTokenizer, instruction_datasets

    args = get_args()
    prefix = instruction_prefix(args.data_path)
    pad = DatasetTokenizer(args.tokenizer_model, 0).pad
    return instruction_datasets(prefix, args.split, list(train_valid_test_num_samples), args.seq_length,
                                args.seed, pad, create_attention_mask=args.create_attention_mask_in_dataloader)
