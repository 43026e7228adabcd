"""torch.cuda as a machine with GPUs shows it, on a CPU-only torch, and exactly as strict as torch 2.13.0.

Every faked function first treats its arguments as the real one does (torch's own validator,
`torch.cuda._utils._get_device_index`, with the same `optional` / `allow_cpu` flags, then the same range
check and the same exception type), and only then answers from the configured machine. What the real
torch would refuse, this refuses: the single-GPU crash of `set_device(torch.device("cuda"))` went unseen
for as long as the tests' stand-in accepted it.

The first thing that would really touch CUDA (a tensor or module moved there, pinned memory, a CUDA
generator) calls `torch.cuda._lazy_init`, which raises `ReachedCuda`: that is as far as a CPU can go,
and a test asserts that an entry point gets there.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.cuda._utils import _get_device_index

GiB = 2**30

# The torch.cuda functions this stand-in fakes. tests/test_cuda_path.py fails when nanorepro or
# benchmarks call a torch.cuda / torch.backends.cuda* function that is not here (a call to it would
# reach the real, CPU-only torch and pass or fail for reasons no GPU machine shares).
CUDA_FUNCTIONS = frozenset({
    "is_available", "device_count", "is_initialized", "init", "current_device", "set_device",
    "get_device_properties", "get_device_capability", "get_device_name", "is_bf16_supported",
    "mem_get_info", "memory_allocated", "memory_reserved", "max_memory_allocated", "reset_peak_memory_stats",
    "synchronize", "get_rng_state", "set_rng_state", "manual_seed", "manual_seed_all",
})
CUDNN_VERSION = 91002  # what torch.backends.cudnn.version() says on a CUDA build (None on a CPU one)
COVERED = frozenset({f"torch.cuda.{name}" for name in CUDA_FUNCTIONS} | {"torch.backends.cudnn.version"})


class ReachedCuda(Exception):
    """Raised where torch would initialise CUDA for real: as far as a CPU-only torch can go."""


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str = "NVIDIA A100-SXM4-80GB"
    capability: tuple[int, int] = (8, 0)
    total_memory: int = 80 * GiB
    free_memory: int = 79 * GiB


class StrictCuda:
    """The fake machine: its GPUs, which one is current, whether CUDA is initialised, and every call
    made (name, "cuda:N" or None), so a test can assert the order in which devices were named."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, gpus: list[Gpu]):
        self.gpus = gpus
        self.current = 0
        self.initialized = False
        # the caching allocator's figures per GPU, for a test to set: bytes held by tensors, reserved, peak
        self.allocated, self.reserved, self.peak = [0] * len(gpus), [0] * len(gpus), [0] * len(gpus)
        self.calls: list[tuple[str, str | None]] = []
        # the CUDA default generators torch.manual_seed seeds once CUDA is initialised (CPU ones stand in)
        self.generators = tuple(torch.Generator() for _ in gpus)
        monkeypatch.setattr(torch.cuda, "default_generators", self.generators)
        for name in CUDA_FUNCTIONS:
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        monkeypatch.setattr(torch.backends.cudnn, "version", lambda: CUDNN_VERSION)
        monkeypatch.setattr(torch.cuda, "_lazy_init", self._lazy_init)

    # -- what torch does first in each real function -------------------------------------------------

    def _record(self, name: str, index: int | None) -> None:
        self.calls.append((name, None if index is None else f"cuda:{index}"))

    def _index(self, device: Any, optional: bool, allow_cpu: bool = False) -> int:
        """torch's own validator, as the real function calls it (its `optional` falls back on current_device)."""
        return _get_device_index(device, optional=optional, allow_cpu=allow_cpu)

    def _valid(self, index: int, error: type[Exception], message: str) -> int:
        if not 0 <= index < len(self.gpus):
            raise error(message.format(index=index))
        return index

    def _lazy_init(self) -> None:
        raise ReachedCuda("torch would initialise CUDA here: a tensor, module or generator is going to a GPU")

    def _init(self) -> None:  # what the real functions that call _lazy_init() get from it
        self.initialized = True

    # -- the faked functions, each with the real one's signature ----------------------------------

    def is_available(self) -> bool:
        return bool(self.gpus)

    def device_count(self) -> int:
        return len(self.gpus)

    def is_initialized(self) -> bool:
        return self.initialized

    def init(self) -> None:
        self._init()

    def current_device(self) -> int:
        self._init()
        return self.current

    def set_device(self, device: Any) -> None:
        index = self._index(device, optional=False)  # torch.device("cuda") -> ValueError, as in torch
        self._record("set_device", index)
        if index >= 0:  # a negative index is a no-op in torch
            self._init()
            self._valid(index, RuntimeError, "CUDA error: invalid device ordinal (device {index})")
            self.current = index

    def get_device_properties(self, device: Any = None) -> SimpleNamespace:
        self._init()
        index = self._index(device, optional=True)
        self._valid(index, AssertionError, "Invalid device id")
        self._record("get_device_properties", index)
        gpu = self.gpus[index]
        return SimpleNamespace(name=gpu.name, major=gpu.capability[0], minor=gpu.capability[1],
                               total_memory=gpu.total_memory, multi_processor_count=108)

    def get_device_capability(self, device: Any = None) -> tuple[int, int]:
        props = self.get_device_properties(device)
        return props.major, props.minor

    def get_device_name(self, device: Any = None) -> str:
        return self.get_device_properties(device).name

    def is_bf16_supported(self, including_emulation: bool = True) -> bool:
        if self.get_device_properties(self.current_device()).major >= 8:
            return True
        return including_emulation  # torch then tries a bf16 tensor, which works on any CUDA GPU

    def mem_get_info(self, device: Any = None) -> tuple[int, int]:
        if device is None:
            device = self.current_device()
        index = self._index(device, optional=True)
        self._init()  # cudaMemGetInfo on that device
        self._valid(index, RuntimeError, "CUDA error: invalid device ordinal (device {index})")
        self._record("mem_get_info", index)
        return self.gpus[index].free_memory, self.gpus[index].total_memory

    def _stats(self, name: str, device: Any) -> int | None:
        """memory_stats' path: nothing before CUDA is initialised, then the device's allocator (which
        refuses an index it has none for)."""
        if not self.initialized:
            return None
        index = self._index(device, optional=True)
        self._valid(index, RuntimeError, "Invalid device argument {index}: did you call init?")
        self._record(name, index)
        return index

    def memory_allocated(self, device: Any = None) -> int:
        index = self._stats("memory_allocated", device)
        return 0 if index is None else self.allocated[index]

    def memory_reserved(self, device: Any = None) -> int:
        index = self._stats("memory_reserved", device)
        return 0 if index is None else self.reserved[index]

    def max_memory_allocated(self, device: Any = None) -> int:
        index = self._stats("max_memory_allocated", device)
        return 0 if index is None else self.peak[index]

    def reset_peak_memory_stats(self, device: Any = None) -> None:
        index = self._index(device, optional=True)
        if not self.initialized:
            raise RuntimeError(f"Invalid device argument {index}: did you call init?")
        self._valid(index, RuntimeError, "Invalid device argument {index}: did you call init?")
        self._record("reset_peak_memory_stats", index)
        self.peak[index] = 0

    def synchronize(self, device: Any = None) -> None:
        self._init()
        index = self._index(device, optional=True)  # torch.cuda.device(device) validates it this way
        self._valid(index, RuntimeError, "CUDA error: invalid device ordinal (device {index})")
        self._record("synchronize", index)

    def _rng_index(self, device: int | str | torch.device) -> int:
        if isinstance(device, str):
            device = torch.device(device)
        elif isinstance(device, int):
            device = torch.device("cuda", device)
        index = device.index if device.index is not None else self.current_device()  # the type is not checked
        if index >= len(self.gpus):  # torch: default_generators[idx]
            raise IndexError("tuple index out of range")
        return index

    def get_rng_state(self, device: int | str | torch.device = "cuda") -> torch.Tensor:
        self._init()
        index = self._rng_index(device)
        self._record("get_rng_state", index)
        return self.generators[index].get_state()

    def set_rng_state(self, new_state: torch.Tensor, device: int | str | torch.device = "cuda") -> None:
        new_state = new_state.clone(memory_format=torch.contiguous_format)  # a tensor, as torch requires
        index = self._rng_index(device)
        self._record("set_rng_state", index)
        self.generators[index].set_state(new_state)

    def manual_seed(self, seed: int) -> None:
        seed = int(seed)
        if self.initialized:
            self.generators[self.current].manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        seed = int(seed)
        if self.initialized:  # torch queues it until CUDA is initialised
            for gen in self.generators:
                gen.manual_seed(seed)


@pytest.fixture
def strict_cuda(monkeypatch):
    """`strict_cuda(n=2, gpu=Gpu(...))` makes torch.cuda show n such GPUs for the rest of the test."""

    def make(n: int = 1, gpu: Gpu = Gpu()) -> StrictCuda:
        return StrictCuda(monkeypatch, [gpu] * n)

    return make
