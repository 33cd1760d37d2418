"""Argument expansion: turn ``pretrain_gpt.py --plugin aquila2 --model NAME ...`` into Megatron-LM's own flags.

``expand_argv`` is pure (tests call it directly); the start-up hook (``aquila_npu.megatron_lm.startup``) applies it
to ``sys.argv``.
Precedence, highest first: the user's flags, the model spec's architecture flags, the device's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aquila_npu import device_options
from aquila_npu.errors import AquilaNpuError
from aquila_npu.kernels.seams import FLAGS as KERNEL_FLAGS

OUR_FLAGS = ("--plugin", "--model", "--device")
# the kernel switches, on and off (Megatron-LM's own --use-flash-attn only concerns its legacy models)
KERNEL_SWITCHES = {**{flag: (op, True) for op, flag in KERNEL_FLAGS.items()},
                   **{"--no-" + flag[2:]: (op, False) for op, flag in KERNEL_FLAGS.items()}}
LAYER_SPEC = ("aquila_npu.megatron_lm.layer_spec", "layer_spec")


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
