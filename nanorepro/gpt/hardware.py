"""What this machine can do: which device and dtype a run gets, physical cores, native bf16, the
device's peak FLOP/s (for bench's MFU), and the faster CPU dtype (train's `dtype=fast`)."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from nanorepro import memory
from nanorepro.config import GPU_PRESETS, ON_GPU_NODE, GPTConfig
from nanorepro.errors import UserError
from nanorepro.files import write_text_atomic
from nanorepro.gpt.model import GPT

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# bf16 must beat float32 by this factor to be picked: a tie is not worth the lower precision.
FAST_MARGIN = 1.1


def gpu_required_by(preset: str | None) -> str | None:
    """Why this run must not fall back to a CPU (None: it may): a preset made for GPUs, or a Chameleon node."""
    if os.environ.get(ON_GPU_NODE):
        return "it runs on a Chameleon GPU node, where a CPU run means the driver and torch disagree"
    if preset in GPU_PRESETS:
        return f"preset {preset} is made for GPUs (hours to days on a CPU)"
    return None


def pick_device(device: str = "auto", dtype: str = "auto", gpu_required: str | None = None) -> tuple[str, str]:
    """Resolve a config's `device` and `dtype`, refusing a device that is not there."""
    device = resolve_device(device, gpu_required)
    return device, resolve_dtype(device, dtype)


def resolve_device(device: str = "auto", gpu_required: str | None = None) -> str:
    """The device a config's `device` names, refused when absent. With `gpu_required` (why, from
    gpu_required_by) "auto" never falls back to the CPU: only an explicit device=cpu runs there. Creates
    no CUDA context (only counts GPUs), so a rank can still pick its own GPU (use_device) first."""
    if device == "auto":
        if not torch.cuda.is_available() and gpu_required:
            raise UserError(f"no CUDA GPU is visible to torch {torch.__version__} (CUDA build "
                            f"{torch.version.cuda}) and {gpu_required}",
                            "run it where torch sees a GPU, or pass --device=cpu to run it on this CPU on purpose")
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device={device} was asked for but no CUDA GPU is visible",
                            "use --device=cpu, or run on a GPU node (target=chameleon)")
        index = cuda_index(device)
        if index >= torch.cuda.device_count():
            raise UserError(f"device={device} does not exist: {torch.cuda.device_count()} GPU(s) visible",
                            f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
        device = f"cuda:{index}"  # torch.cuda.set_device refuses a device without an index
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("device=mps was asked for but MPS is not available", "use --device=cpu")
    return device


def cuda_index(device: str) -> int:
    """The GPU a CUDA device string names: its index, or for plain "cuda" the current device (GPU 0 in a
    process that has not touched CUDA yet: asking torch would initialise CUDA before a rank picks its GPU)."""
    try:
        index = torch.device(device).index
    except RuntimeError as e:
        raise UserError(f"device={device!r} is not a device torch knows", "use cpu, cuda, cuda:N, mps or auto") from e
    if index is not None:
        return index
    return torch.cuda.current_device() if torch.cuda.is_initialized() else 0


def use_device(device: str) -> None:
    """Make a CUDA `device` the current one before anything touches CUDA (else pinned memory, the bf16
    check and the context land on GPU 0), and start its peak-memory count afresh (one process may
    train several runs: --seeds). Nothing on other devices."""
    if device.startswith("cuda"):
        index = cuda_index(device)
        torch.cuda.set_device(index)
        torch.cuda.reset_peak_memory_stats(index)


def resolve_dtype(device: str, dtype: str = "auto") -> str:
    """A config's `dtype` on `device`: auto/fast -> bf16 or fp16 on CUDA (memory.gpu_dtype, of that GPU),
    float32 elsewhere; "fast" on a CPU is left for train to settle by timing (fast_cpu_dtype)."""
    if dtype in ("auto", "fast"):
        # nanoGPT trains in float32 on CPU and bf16 (else fp16) on CUDA
        if device.startswith("cuda"):
            dtype = "bfloat16" if torch.version.hip else memory.gpu_dtype(torch.cuda.get_device_capability(device))
        elif dtype == "auto" or device != "cpu":
            dtype = "float32"
    return dtype


def physical_cores() -> int:
    """Cores this process may run on, counting SMT siblings once (hyper-threads share the FPUs)."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def set_cpu_threads() -> int:
    """One torch thread per physical core unless the user chose (OMP_NUM_THREADS); return the count."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(physical_cores())
    return torch.get_num_threads()


# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks of up to 32 MiB for reuse instead of handing them back to the
    kernel; False where the C library is not glibc. By default every activation a step frees is returned,
    and the next step faults it in again page by page: on a 2-core VM, 4x the page faults and a forward
    pass ~30% slower. The cost: the process holds its peak memory (plus 64 MiB) until it exits."""
    if platform.libc_ver()[0] != "glibc":  # macOS, Windows, musl: no mallopt
        return False
    mallopt = ctypes.CDLL(None).mallopt  # this process's own C library
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, 32 << 20),  # glibc's ceiling: blocks above it are still mapped per allocation
        (_M_TRIM_THRESHOLD, 1 << 30),
        (_M_TOP_PAD, 64 << 20)))


# The CPU flags (torch.cpu.get_capabilities' names) of bf16 arithmetic in hardware: AVX512-BF16, AVX10
# (which includes it), AMX on x86; BF16 and SVE-BF16 on Arm.
BF16_FLAGS = ("avx512_bf16", "avx10_1", "amx_bf16", "bf16", "sve_bf16")


def native_bf16_from(capabilities: Mapping[str, Any], onednn_bf16: bool) -> bool:
    """oneDNN's "bf16 supported" also says yes on any AVX-512 core, where it emulates bf16 with AVX512-BW:
    on an Intel Xeon without AVX512-BF16, Muon's orthogonalisation of a 1024x256 matrix took 79 ms in
    bf16 against 8.7 ms in float32 (one thread). So a bf16 flag of the CPU's own is required too."""
    return onednn_bf16 and any(capabilities.get(flag) is True for flag in BF16_FLAGS)


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AVX512-BF16, AMX, Arm's BF16) rather than emulating it."""
    try:
        onednn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
    return native_bf16_from(torch.cpu.get_capabilities(), onednn_bf16)


def cpu_features() -> dict[str, Any]:
    """What decides CPU speed here, for every benchmark figure to name: the vector ISA torch dispatches
    to (e.g. AVX2, AVX512), the bf16 and AMX extensions, and whether bf16 matmuls are native."""
    caps = torch.cpu.get_capabilities()
    flags = ("avx2", "avx512_f", "avx512_bf16", "amx_bf16", "amx_tile", "neon", "bf16", "sve")
    return {"isa": torch.backends.cpu.get_cpu_capability(), **{k: bool(caps.get(k)) for k in flags if k in caps},
            "native_bf16": cpu_has_native_bf16()}


def describe_cpu_features(features: dict[str, Any]) -> str:
    """e.g. 'AVX2, bf16 emulated' or 'AVX512, AMX, bf16 native'."""
    parts = [features["isa"]] + (["AMX"] if features.get("amx_bf16") else [])
    return ", ".join(parts + ["bf16 native" if features["native_bf16"] else "bf16 emulated"])


class StepContext:
    """What every forward pass runs under: autocast to `dtype` (none for float32) and, if `attention`
    is "math", PyTorch's math SDPA kernel instead of its CPU flash kernel. Reusable: enter it once a step."""

    def __init__(self, device_type: str, dtype: str, attention: str = "default"):
        self.device_type, self.dtype, self.attention = device_type, dtype, attention

    def __enter__(self) -> "StepContext":
        self._stack = contextlib.ExitStack()
        if self.dtype != "float32":
            self._stack.enter_context(torch.autocast(self.device_type, dtype=DTYPES[self.dtype]))
        if self.attention == "math":
            self._stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        return self

    def __exit__(self, *exc) -> bool | None:
        return self._stack.__exit__(*exc)


def _step_seconds(model: torch.nn.Module, x: torch.Tensor, ctx: StepContext) -> float:
    """CPU seconds of one forward+backward pass under `ctx`, run on this thread alone."""
    t = time.thread_time()
    with ctx:
        _, loss = model(x, x)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.thread_time() - t


DTYPE_CACHE_FILE = "cpu-dtype.json"  # in the cache folder: what dtype=fast chose, per CPU, torch and shape


def fast_cpu_dtype_cached(model_cfg: GPTConfig, batch_size: int, cache_dir: Path) -> tuple[str, str, str]:
    """fast_cpu_dtype, remembered in `cache_dir`: the timing costs a launch ~1.5 s, and its answer depends
    only on the CPU (its model name and features), torch's version, the network and the batch, which
    are the key. A cache that cannot be read or written is ignored (the timing runs, as without one)."""
    key = json.dumps({"cpu": cpu_model_name(), "features": cpu_features(), "torch": torch.__version__,
                      "model": dataclasses.asdict(model_cfg), "batch_size": batch_size}, sort_keys=True)
    path = Path(cache_dir) / DTYPE_CACHE_FILE
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(hit := known.get(key), list) and len(hit) == 3:
        return hit[0], hit[1], f"{hit[2]}; measured by an earlier launch on this CPU ({path})"
    dtype, attention, why = fast_cpu_dtype(model_cfg, batch_size)
    if isinstance(known, dict):
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps({**known, key: [dtype, attention, why]}, indent=1) + "\n")
    return dtype, attention, why


def cpu_model_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what the platform module says."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def fast_cpu_dtype(model_cfg: GPTConfig, batch_size: int, budget_s: float = 2.0) -> tuple[str, str, str]:
    """(dtype, attention, why): the fastest way to train this model on this CPU.

    Times a few forward+backward passes of the run's own model (leaving the global RNG alone) in
    float32, bf16, and bf16 with the math attention kernel (PyTorch's CPU flash kernel can be much
    slower in bf16 at short contexts); bf16 must be native and beat float32 by FAST_MARGIN. One
    thread's CPU time is measured: on a shared machine, multi-threaded wall time swings 10-100x.
    """
    if not cpu_has_native_bf16():
        return "float32", "default", "this CPU has no native bf16 (emulated bf16 is slower)"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = GPT(model_cfg)
            x = torch.randint(model_cfg.vocab_size, (batch_size, model_cfg.block_size))
            ways = [("float32", "default"), ("bfloat16", "default"), ("bfloat16", "math")]
            first = [_step_seconds(model, x, StepContext("cpu", *w)) for w in ways]  # warm-up and size probe
            steps = int(min(6, max(3, budget_s / max(sum(first), 1e-3))))
            t = {w: float("inf") for w in ways}
            for _ in range(steps):  # interleaved, each way's fastest
                for w in ways:
                    t[w] = min(t[w], _step_seconds(model, x, StepContext("cpu", *w)))
    finally:
        torch.set_num_threads(threads)
    bf16 = min((k for k in t if k[0] == "bfloat16"), key=t.get)
    why = (f"a forward+backward took {t['float32', 'default'] * 1e3:.1f} ms in float32, "
           f"{t['bfloat16', 'default'] * 1e3:.1f} ms in bfloat16, {t['bfloat16', 'math'] * 1e3:.1f} ms in "
           f"bfloat16 with math attention (1 thread, CPU time, best of {steps})")
    if t["float32", "default"] > FAST_MARGIN * t[bf16]:
        return bf16[0], bf16[1], why
    return "float32", "default", why


def peak_flops(device: str, dtype: str) -> tuple[float | None, str]:
    """(peak FLOP/s, source) that MFU is measured against: a GPU's data sheet (memory.peak_flops, the
    one table), a timed matmul on a CPU, or (None, why not)."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        peak = memory.peak_flops(name, dtype)
        kind = "tf32" if dtype == "float32" else dtype
        return peak, f"{name}: data-sheet dense {kind} peak" if peak else f"{name}: no known peak"
    if device == "cpu":
        set_cpu_threads()  # as the runs will: MFU against the same thread count
        return measured_cpu_peak(dtype)
    return None, f"no known peak for {device}"


def measured_cpu_peak(dtype: str, sizes: tuple[int, ...] = (512, 1024, 2048), repeats: int = 6) -> tuple[float, str]:
    """(FLOP/s, source): the fastest square matmul in `dtype` with the current thread count, a bound
    training cannot reach. The best over sizes and repeats is what contention distorts least."""
    tdtype = DTYPES["bfloat16" if dtype == "bfloat16" else "float32"]
    gen = torch.Generator().manual_seed(0)
    best, best_n = 0.0, 0
    for n in sizes:
        a = torch.randn(n, n, generator=gen).to(tdtype)
        b = torch.randn(n, n, generator=gen).to(tdtype)
        for i in range(repeats + 1):  # the first one warms up
            t = time.perf_counter()
            a @ b
            dt = time.perf_counter() - t
            if i and 2 * n**3 / dt > best:
                best, best_n = 2 * n**3 / dt, n
    return best, (f"measured: fastest {best_n}x{best_n} {str(tdtype).replace('torch.', '')} matmul "
                  f"on {torch.get_num_threads()} thread(s)")
