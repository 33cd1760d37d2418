"""What Megatron's CUDA calls mean on a CPU: a stand-in ``torch`` for Megatron's modules.

Megatron calls ``torch.cuda.*`` and puts tensors on ``device="cuda"`` throughout. On a CPU-only torch those calls
raise, and answering "CUDA is available" process-wide breaks torch's own code (inductor, autocast). So the answer
is given only to Megatron: each listed Megatron module gets, as its global ``torch``, a proxy that forwards
everything to the real torch except

* ``torch.cuda``: is_available/device_count say one device; the current device is the CPU; streams, events and
  synchronisation are no-ops; the RNG functions act on the CPU generator (so megatron-core's model-parallel RNG
  tracker keeps distinct, checkpointable states per tensor-parallel rank);
* tensor factories (``torch.empty(..., device="cuda")``, ``torch.Generator(device=0)``, ...) and ``torch.device``:
  a CUDA device means the CPU.

This is the same idea as torch_npu's ``transfer_to_npu`` on Ascend, scoped to Megatron's modules.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import types
from typing import Any

import torch

_CPU = torch.device("cpu")


def to_cpu_device(device: Any) -> Any:
    """Map a CUDA device (``"cuda"``, ``"cuda:1"``, ``torch.device("cuda")``, a bare index) to the CPU."""
    if isinstance(device, bool) or device is None:
        return device
    if isinstance(device, int):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


def _map_device_kwarg(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = to_cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    return wrapper


class _MappedTypeMeta(type):
    """A stand-in class: constructing it maps CUDA devices to the CPU; isinstance checks the real type."""

    def __call__(cls, *args, **kwargs):
        if cls._real is torch.device:
            if args and isinstance(args[0], str) and args[0].startswith("cuda"):
                return _CPU
            return torch.device(*args, **kwargs)
        if "device" in kwargs:
            kwargs["device"] = to_cpu_device(kwargs["device"])
        return cls._real(*args, **kwargs)

    def __instancecheck__(cls, obj):
        return isinstance(obj, cls._real)

    def __getattr__(cls, name):
        return getattr(cls._real, name)


def _mapped_type(real: type) -> type:
    return _MappedTypeMeta(real.__name__, (), {"_real": real})


class _Stream:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, *args, **kwargs) -> None:
        pass

    def wait_event(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event=None):
        return event or _Event()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


class _Event:
    """A CUDA event stand-in whose ``elapsed_time`` is real wall time (ms), for Megatron's timers."""

    def __init__(self, *args, **kwargs) -> None:
        self._time = None

    def record(self, stream=None) -> None:
        import time

        self._time = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "_Event") -> float:
        return (end._time - self._time) * 1000.0


class _DeviceProperties:
    name = "cpu"
    major = 0
    minor = 0
    multi_processor_count = 1

    @property
    def total_memory(self) -> int:
        import psutil

        return psutil.virtual_memory().total


def _cpu_cuda_namespace() -> types.SimpleNamespace:
    real = torch.cuda
    nvtx = types.SimpleNamespace(range_push=lambda *a, **k: None, range_pop=lambda *a, **k: None,
                                 range=lambda *a, **k: contextlib.nullcontext(), mark=lambda *a, **k: None)
    rng = types.SimpleNamespace(get_rng_state=lambda device="cuda": torch.get_rng_state(),
                                set_rng_state=lambda state, device="cuda": torch.set_rng_state(state),
                                manual_seed=lambda seed: torch.manual_seed(seed))
    namespace = dict(
        random=rng,
        is_available=lambda: True,
        is_initialized=lambda: True,
        device_count=lambda: 1,
        current_device=lambda: _CPU,
        set_device=lambda device: None,
        synchronize=lambda device=None: None,
        empty_cache=lambda: None,
        get_device_name=lambda device=None: "cpu",
        get_device_properties=lambda device=None: _DeviceProperties(),
        get_device_capability=lambda device=None: (0, 0),
        Stream=_Stream,
        Event=_Event,
        current_stream=lambda device=None: _Stream(),
        default_stream=lambda device=None: _Stream(),
        stream=lambda stream=None: contextlib.nullcontext(),
        # the model-parallel RNG tracker keeps its states in the CPU generator
        get_rng_state=lambda device="cuda": torch.get_rng_state(),
        set_rng_state=lambda state, device="cuda": torch.set_rng_state(state),
        manual_seed=lambda seed: torch.manual_seed(seed),
        manual_seed_all=lambda seed: torch.manual_seed(seed),
        default_generators=(torch.default_generator,),
        memory_allocated=lambda device=None: 0,
        max_memory_allocated=lambda device=None: 0,
        memory_reserved=lambda device=None: 0,
        max_memory_reserved=lambda device=None: 0,
        reset_peak_memory_stats=lambda device=None: None,
        memory_stats=lambda device=None: collections.defaultdict(int),  # every counter 0
        mem_get_info=lambda device=None: (_DeviceProperties().total_memory, _DeviceProperties().total_memory),
        nvtx=nvtx,
        FloatTensor=real.FloatTensor,
        HalfTensor=real.HalfTensor,
        BFloat16Tensor=real.BFloat16Tensor,
        amp=getattr(real, "amp", None),
    )
    return types.SimpleNamespace(**namespace)


_FACTORIES = ("tensor", "as_tensor", "empty", "zeros", "ones", "full", "arange", "rand", "randn", "randint",
              "randperm", "eye", "linspace", "empty_like", "zeros_like", "ones_like", "full_like", "rand_like",
              "randn_like", "empty_strided")


class TorchForMegatron(types.ModuleType):
    """The ``torch`` seen by a patched Megatron module."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.__dict__["cuda"] = _cpu_cuda_namespace()
        self.__dict__["device"] = _mapped_type(torch.device)
        self.__dict__["Generator"] = _mapped_type(torch.Generator)
        for name in _FACTORIES:
            self.__dict__[name] = _map_device_kwarg(getattr(torch, name))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


@functools.lru_cache(maxsize=1)
def torch_for_megatron() -> TorchForMegatron:
    return TorchForMegatron()


def tensor_cuda(self: torch.Tensor, device=None, non_blocking: bool = False, **kwargs) -> torch.Tensor:
    """``Tensor.cuda()`` on a machine without CUDA: the tensor stays on the CPU."""
    return self


def module_cuda(self: torch.nn.Module, device=None) -> torch.nn.Module:
    """``Module.cuda()`` on a machine without CUDA: the module stays on the CPU."""
    return self


@contextlib.contextmanager
def cuda_type_names():
    """While active, ``tensor.type()`` names CPU tensors as CUDA ones (``torch.cuda.FloatTensor``).

    Megatron's optimizers dispatch on, and its gradient clipping asserts, these type strings. Only the functions
    that do so run under this context (see the cpu plugin), so nothing else ever sees the CUDA names. Reentrant: a
    patched function calling another (the optimizer's step calling the clipping) keeps the one renaming.
    """
    if _TYPE_NAMES["depth"]:
        _TYPE_NAMES["depth"] += 1
        try:
            yield
        finally:
            _TYPE_NAMES["depth"] -= 1
        return
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            return "torch.cuda." + name[len("torch."):] if self.device.type == "cpu" else name
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    _TYPE_NAMES["depth"] = 1
    try:
        yield
    finally:
        _TYPE_NAMES["depth"] = 0
        torch.Tensor.type = original


_TYPE_NAMES = {"depth": 0}  # nesting of cuda_type_names (one process, one thread renaming at a time)


def with_cuda_type_names(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with cuda_type_names():
            return fn(*args, **kwargs)

    return wrapper
