"""What a run needs before it starts: training memory (weights, gradients, AdamW state, activations)
against the device's, the largest setting that fits when it does not, and a time estimate.

The accounting follows what this repository's GPT keeps alive at the peak (the start of backward):
- fp32 weights, gradients and AdamW's two moments: 16 B/param (gpt2-xl: 24.9 GB before activations);
  under autocast, the half-precision weight copies saved for backward (2 B/param); DDP's gradient
  buckets (4 B/param); FSDP shards all of it but gathers a block (two, with prefetch) and the root,
  and a rank with several micro-steps accumulates whole fp32 gradients (reduce-scattered once a step);
- per token, per layer: LayerNorm inputs in fp32 and 15 C-wide tensors at the compute precision s,
  (8 + 15 s) C bytes (SDPA's fused kernels: no T x T matrix); activation checkpointing keeps only
  each block's fp32 input;
- the head: the fp32 log-softmax (4V bytes per token) kept for backward plus 8V transient: with
  GPT-2's 50257-token vocabulary this outweighs a 12-layer body at small widths.
No torch here: the hub kernel sizes runs before sending them to a node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from nanorepro.config import Config, GPTConfig
from nanorepro.errors import UserError, WontFit
from nanorepro.fmt import GiB, human_bytes

OVERHEAD_BYTES = GiB // 2  # CUDA context / interpreter and torch runtime, not in the tensors above
# Dense bf16 tensor-core peak FLOP/s by GPU name (fp32 runs use TF32: half of it): the one table
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 SXM": 989e12, "H100 80GB HBM3": 989e12, "H100 PCIe": 756e12, "H100": 756e12,
                   "A100": 312e12, "A30": 165e12, "A10": 125e12, "A40": 150e12, "L40S": 362e12, "RTX 6000 Ada": 364e12,
                   "RTX A6000": 155e12, "V100": 125e12, "T4": 65e12}
# Compute capability by GPU name (NVIDIA's CUDA GPUs page), longest name first when matching: which
# precision a run gets there (gpu_dtype), before any GPU is at hand
GPU_CAPABILITY = {"H200": (9, 0), "H100": (9, 0), "A100": (8, 0), "A30": (8, 0), "A10": (8, 6), "A40": (8, 6),
                  "L40S": (8, 9), "RTX 6000 Ada": (8, 9), "RTX A6000": (8, 6), "Quadro RTX 6000": (7, 5),
                  "V100": (7, 0), "T4": (7, 5), "P100": (6, 0)}
# Model FLOPs utilisation assumed for time estimates: nanoGPT's 124M run (4 days on 8x A100) is ~0.3
ASSUMED_MFU = 0.3
# Share of the one-node rate each GPU keeps when a run spans several nodes (assumed, not measured): nanoGPT's
# 0.3 MFU is 8 GPUs on one node's NVLink; across nodes DDP's gradient all-reduce (once an optimizer step, fp32:
# 0.5 GB for GPT-2 124M) crosses the nodes' Ethernet (10-25 Gb/s on Chameleon) in ~0.2-0.4 s against ~0.6 s
# of compute per step, partly overlapped with backward.
INTER_NODE_EFFICIENCY = 0.7
SKIP_ENV = "NANOREPRO_SKIP_MEMORY_CHECK"  # 1: run even when the estimate says it will not fit
LIMIT_ENV = "NANOREPRO_MEMORY_LIMIT_GIB"  # use at most this much of the device (a shared GPU, tests)


@dataclass
class Estimate:
    """Bytes at the peak of one training step, per process, by part."""

    parts: dict[str, int]
    shape: GPTConfig
    batch_size: int
    block_size: int
    dtype: str
    parallel: str = "none"
    world_size: int = 1
    activation_checkpointing: bool = False
    training: bool = True

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        """e.g. '~15.2 GiB (weights 0.46, gradients 0.46, ... GiB; 12 x 1024 tokens per micro-batch, bfloat16)'."""
        unit, scale = ("GiB", GiB) if self.total >= GiB else ("MiB", 1024**2)
        parts = ", ".join(f"{k.replace('_', ' ')} {v / scale:.2f}" for k, v in self.parts.items() if v)
        how = [f"{self.batch_size} x {self.block_size} tokens per micro-batch", self.dtype]
        if self.activation_checkpointing:
            how.append("activation checkpointing")
        if self.parallel != "none":
            how.append(f"{self.parallel} x{self.world_size}")
        return f"~{self.total / scale:.1f} {unit} ({parts} {unit}; {', '.join(how)})"


def estimate(shape: GPTConfig, batch_size: int, dtype: str = "bfloat16", parallel: str = "none", world_size: int = 1,
             activation_checkpointing: bool = False, training: bool = True, block_size: int | None = None,
             micro_steps: int = 1) -> Estimate:
    """Peak memory of one training step (or one evaluation forward, `training=False`) per process;
    `micro_steps`: each rank's share of gradient_accumulation_steps."""
    T = block_size or shape.block_size
    N, C, L, V = shape.n_params, shape.n_embd, shape.n_layer, shape.vocab_size
    s = 4 if dtype == "float32" else 2  # bytes per value at the compute precision
    tokens = batch_size * T
    layer = (8 + 15 * s) * C  # per token: LayerNorm inputs in fp32, the rest at compute precision
    ids = 16  # token ids and targets (int64) kept by the embedding and the loss
    parts: dict[str, int] = {}
    if not training:  # no graph kept: one layer's tensors and the logits at a time
        parts["weights"] = 4 * N
        parts["activations"] = tokens * (layer + ids)
        parts["logits"] = tokens * (s + 8) * V
        return Estimate(parts, shape, batch_size, T, dtype, parallel, world_size, False, False)
    W = world_size if parallel == "fsdp" else 1
    # FSDP: each rank holds 1/W of the blocks, whole root (gathered for forward and backward) and two
    # gathered blocks in flight (the current one and the prefetched next)
    root = N - L * shape.block_params  # embeddings and final LayerNorm: FSDP's root unit
    sharded = N if W == 1 else (N - root) / W + root + 2 * shape.block_params
    parts["weights"] = int(4 * sharded)
    # FSDP skips the reduce-scatter before a step's last micro-step (distributed.sync_gradients)
    parts["gradients"] = int(4 * (N if W > 1 and micro_steps > 1 else sharded))
    parts["adamw_state"] = int(8 * (N / W))
    if parallel == "ddp" and world_size > 1:
        parts["ddp_buckets"] = 4 * N
    if s == 2:
        parts["half_weight_copies"] = 2 * N  # autocast's casts, saved by the matmuls for backward
    if activation_checkpointing:
        parts["activations"] = tokens * (L * 4 * C + layer + ids)  # block inputs + one block recomputed
    else:
        parts["activations"] = tokens * (L * layer + ids)
    parts["logits"] = tokens * ((4 + s) * C + 4 * V + 8 * V)  # head inputs, log-softmax kept, backward's transients
    return Estimate(parts, shape, batch_size, T, dtype, parallel, world_size, activation_checkpointing, True)


def estimate_for(cfg: Config, shape: GPTConfig, dtype: str, world_size: int = 1) -> Estimate:
    return estimate(shape, cfg.batch_size, dtype, cfg.parallel, world_size, cfg.activation_checkpointing,
                    training=not cfg.eval_only, block_size=min(cfg.block_size, shape.block_size),
                    micro_steps=max(1, cfg.gradient_accumulation_steps // world_size))


# ---------------------------------------------------------------------------------------------
# Fitting

def capacity_limit(capacity: int) -> int:
    """The device's memory, capped by $NANOREPRO_MEMORY_LIMIT_GIB when set."""
    limit = os.environ.get(LIMIT_ENV)
    if limit:
        try:
            return min(capacity, int(float(limit) * GiB))
        except ValueError:
            raise UserError(f"{LIMIT_ENV}={limit!r} is not a number of GiB", f"unset it or give e.g. {LIMIT_ENV}=40")
    return capacity


def _splits(global_batch: int, below: int, multiple_of: int) -> list[tuple[int, int]]:
    """(batch_size, gradient_accumulation_steps) with the same sequences per step, largest batch first."""
    return [(b, global_batch // b) for b in range(min(below, global_batch), 0, -1)
            if global_batch % b == 0 and (global_batch // b) % multiple_of == 0]


def _fits(est: Estimate, capacity: int) -> bool:
    return est.total + OVERHEAD_BYTES <= capacity


def suggest(cfg: Config, shape: GPTConfig, dtype: str, capacity: int, world_size: int = 1,
            gpus_on_node: int = 1) -> tuple[str, Estimate] | None:
    """The largest setting that fits, keeping the tokens per step: a smaller micro-batch with more
    accumulation, then activation checkpointing, then FSDP over the node's GPUs. None if nothing does."""
    G = cfg.batch_size * cfg.gradient_accumulation_steps
    T = min(cfg.block_size, shape.block_size)
    tries = [(world_size, cfg.activation_checkpointing, cfg.parallel)]
    if not cfg.activation_checkpointing:
        tries.append((world_size, True, cfg.parallel))
    if gpus_on_node > 1 and cfg.parallel != "fsdp":
        tries += [(gpus_on_node, False, "fsdp"), (gpus_on_node, True, "fsdp")]
    for W, ac, parallel in tries:
        for b, gas in _splits(G, cfg.batch_size, W):
            est = estimate(shape, b, dtype, parallel, W, ac, block_size=T, micro_steps=gas // W)
            if _fits(est, capacity):
                flags = (["--parallel=fsdp"] if parallel != cfg.parallel else []) + \
                    (["--activation_checkpointing=true"] if ac != cfg.activation_checkpointing else []) + \
                    [f"--batch_size={b}", f"--gradient_accumulation_steps={gas}"]
                how = " ".join(flags)
                if parallel != cfg.parallel:
                    how = f"torchrun --nproc_per_node={W} ... with {how}"
                return how, est
    return None


def min_fsdp_gpus(cfg: Config, shape: GPTConfig, dtype: str, capacity: int, most: int = 64) -> int | None:
    """Fewest GPUs of this size over which FSDP (batch 1, activation checkpointing) would fit."""
    T = min(cfg.block_size, shape.block_size)
    for W in range(2, most + 1):
        if _fits(estimate(shape, 1, dtype, "fsdp", W, True, block_size=T), capacity):
            return W
    return None


def check(cfg: Config, shape: GPTConfig, dtype: str, capacity: int, where: str, world_size: int = 1,
          gpus_on_node: int = 1) -> Estimate:
    """The estimate when it fits `capacity` bytes; else WontFit naming the largest setting that would."""
    est = estimate_for(cfg, shape, dtype, world_size)
    capacity = capacity_limit(capacity)
    if _fits(est, capacity) or os.environ.get(SKIP_ENV, "").strip() in ("1", "true", "yes"):
        return est
    what = cfg.init_from if cfg.init_from != "scratch" else f"a {shape.n_params / 1e6:.0f}M-parameter GPT"
    problem = (f"{Path(what).name} needs {est.describe()} plus ~{OVERHEAD_BYTES / GiB:.1f} GiB of runtime "
               f"to {'train' if est.training else 'evaluate'}, but {where} has {human_bytes(capacity)}")
    hint = f"(the estimate is approximate: {SKIP_ENV}=1 runs it anyway)"
    if not est.training:
        b = next((b for b in range(cfg.batch_size - 1, 0, -1)
                  if _fits(estimate(shape, b, dtype, training=False, block_size=est.block_size), capacity)), None)
        fix = f"use --batch_size={b}" if b else "use a device with more memory"
        raise WontFit(problem, f"{fix} {hint}")
    found = suggest(cfg, shape, dtype, capacity, world_size, gpus_on_node)
    if found:
        raise WontFit(problem, f"use {found[0]} (same tokens per step, ~{human_bytes(found[1].total)}) {hint}")
    n = min_fsdp_gpus(cfg, shape, dtype, capacity)
    fix = (f"shard it: --parallel=fsdp --activation_checkpointing=true --batch_size=1 under torchrun over at least "
           f"{n} devices like this one" if n else "use a device with more memory, or a smaller model")
    raise WontFit(problem, f"{fix} {hint}")


# ---------------------------------------------------------------------------------------------
# Time

def gpu_dtype(capability: tuple[int, int]) -> str:
    """bf16 on GPUs that compute it natively (compute capability 8.0 on: A100, H100, ...); else fp16
    with a GradScaler, as nanoGPT intends. Not torch.cuda.is_bf16_supported(): by default it also says
    yes where bf16 is only emulated (T4, V100, RTX 6000), and it asks the *current* device."""
    return "bfloat16" if tuple(capability) >= (8, 0) else "float16"


def _by_name(table: dict, gpu_name: str):
    for key in sorted(table, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key.lower() in gpu_name.lower():
            return table[key]
    return None


def dtype_for(gpu_name: str | None, gpu_preset: bool) -> tuple[str, str]:
    """(dtype, why) that dtype=auto gives a run: on a named GPU, its native precision; with no GPU named,
    bf16 for a preset made for GPUs (as on the A100 it was published on), else float32 (a CPU)."""
    if gpu_name:
        cap = _by_name(GPU_CAPABILITY, gpu_name)
        if cap is None:
            return "bfloat16", f"dtype auto: bfloat16 assumed ({gpu_name}'s compute capability is not known here)"
        return gpu_dtype(cap), f"dtype auto: {gpu_dtype(cap)} on {gpu_name} (compute capability {cap[0]}.{cap[1]})"
    if gpu_preset:
        return "bfloat16", "dtype auto: bfloat16, as on the A100 this preset was made for (--gpu NAME for another GPU)"
    return "float32", "dtype auto: float32, as on a CPU (--gpu NAME for a GPU's precision)"


def peak_flops(gpu_name: str | None, dtype: str) -> float | None:
    """Dense peak FLOP/s of a named GPU at the run's precision; None when unknown (or a CPU).
    hardware.peak_flops adds a CPU's, measured."""
    peak = _by_name(PEAK_BF16_FLOPS, gpu_name) if gpu_name else None
    return None if peak is None else peak / (2 if dtype == "float32" else 1)


def flops_per_second(gpu_name: str | None, n_gpus: int, dtype: str, nodes: int = 1) -> float | None:
    """FLOP/s a run achieves on `n_gpus` GPUs in all, over `nodes` nodes: ASSUMED_MFU of their peak, times
    INTER_NODE_EFFICIENCY when it spans more than one node; None on unknown hardware."""
    peak = peak_flops(gpu_name, dtype)
    if peak is None:
        return None
    return peak * ASSUMED_MFU * max(1, n_gpus) * (INTER_NODE_EFFICIENCY if nodes > 1 else 1.0)


def estimate_seconds(cfg: Config, shape: GPTConfig, gpu_name: str | None, n_gpus: int, dtype: str,
                     start_iter: int = 0, nodes: int = 1) -> float | None:
    """Wall time of the rest of the run on `n_gpus` GPUs in all (over `nodes` nodes) at flops_per_second();
    None on unknown hardware."""
    rate = flops_per_second(gpu_name, n_gpus, dtype, nodes)
    if rate is None:
        return None
    T = min(cfg.block_size, shape.block_size)
    if cfg.eval_only:  # forward only (a third of forward + backward), both splits
        flops = 2 * cfg.eval_iters * cfg.batch_size * T * shape.flops_per_token(T) / 3
    else:
        flops = max(0, cfg.max_iters - start_iter) * cfg.tokens_per_iter * shape.flops_per_token(T)
    return flops / rate


def available_ram() -> int | None:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
