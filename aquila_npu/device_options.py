"""Device options: a device runtime's environment variables as command-line flags.

Ascend's runtime is configured through environment variables read when torch_npu and HCCL start (``NPU_ASD_ENABLE``
and friends); ModelLink's scripts ``export`` them. A device plugin declares each as a ``DeviceOption`` (hook
``aquila_npu_device_options``); every route then takes the flag, checks it, and sets the variable before the device
is initialised, in every process of the job. A flag of another device than the one the job runs on is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from aquila_npu.errors import AquilaNpuError


@dataclass(frozen=True)
class DeviceOption:
    device: str
    flag: str  # --npu-asd-enable
    env: str  # NPU_ASD_ENABLE
    help: str
    choices: tuple[str, ...] | None = None
    positive_int: bool = False

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")

    def check(self, value: str) -> str:
        if self.choices is not None and value not in self.choices:
            raise AquilaNpuError(f"{self.flag} {value}: choose one of {', '.join(self.choices)}")
        if self.positive_int and not (value.isdigit() and int(value) > 0):
            raise AquilaNpuError(f"{self.flag} {value}: give a whole number of seconds above 0")
        return value


def add_arguments(parser, options: Iterable[DeviceOption]) -> None:
    group = parser.add_argument_group("device options (set the device runtime's environment variable)")
    for option in options:
        group.add_argument(option.flag, dest=option.dest, default=None, metavar=option.env,
                           help=f"[{option.device}] {option.help}")


def given(args, options: Iterable[DeviceOption]) -> dict[str, str]:
    """``{flag: value}`` of the options given in parsed ``args``."""
    return {o.flag: getattr(args, o.dest) for o in options if getattr(args, o.dest, None) is not None}


def environment(values: dict[str, str], device: str, options: Iterable[DeviceOption]) -> dict[str, str]:
    """The environment variables ``values`` (``{flag: value}``) set for ``device``, each value checked."""
    by_flag = {o.flag: o for o in options}
    env = {}
    for flag, value in values.items():
        option = by_flag[flag]
        if option.device != device:
            raise AquilaNpuError(f"{flag} is an option of the {option.device} device; this job runs on {device}")
        env[option.env] = option.check(str(value))
    return env
