"""Several processes, one run: torchrun's environment, DDP or FSDP2 (`fully_shard`), and a clean exit.

`torchrun --standalone --nproc_per_node=N -m nanorepro train --parallel=ddp ...` starts N copies of
`nanorepro train`; each reads RANK / LOCAL_RANK / WORLD_SIZE, joins one process group (gloo on CPU,
NCCL on CUDA) and takes its share of every iteration's micro-batches. How the work is split:

- Every rank walks the SAME batch stream (one generator, seeded once) and reads only its block of
  each iteration's micro-batches: N ranks train on exactly the samples one process would, and the
  stream's state is all a checkpoint needs for exact resume (exact on the CPU; close on GPUs, whose
  kernels are not deterministic). Evaluation batches are split likewise.
- Only rank 0 writes, into its own folder. Ranks on other nodes (torchrun --nnodes) share no disk
  with it, so what a run reads back from that folder (is it finished? its checkpoint) is rank 0's,
  sent to them (`main_bytes`). FSDP checkpoints are gathered into the same full state dict a single process
  writes, so `nanorepro sample` and a single-process resume read it unchanged.
With `parallel="none"` nothing here touches torch.distributed.
"""

from __future__ import annotations

import gc
import math
import os
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
import torch.distributed as dist

from nanorepro.config import Config
from nanorepro.errors import UserError

PARALLEL = ("none", "ddp", "fsdp")
# How long the error path waits for the other ranks before leaving anyway: a rank that failed alone
# must not hang; torchrun then stops the rest.
ERROR_BARRIER_S = 60


@dataclass
class World:
    """This process's place in the run: rank, local rank (its GPU), world size, how the model is split."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    parallel: str = "none"
    backend: str | None = None  # None: no process group (a single process)
    spans_nodes: bool = False  # ranks on more than one machine (torchrun --nnodes > 1): no shared disk
    control: Any = field(default=None, repr=False)  # a gloo group for the bounded error-path barrier

    @property
    def main(self) -> bool:
        """Rank 0: the one process that prints and writes files."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.backend is not None

    def device(self, device: str) -> str:
        """Each rank owns the GPU of its local rank."""
        return f"cuda:{self.local_rank}" if self.active and device.startswith("cuda") else device

    def micro_steps(self, total: int) -> range:
        """This rank's share of an iteration's `total` micro-batches (a contiguous block)."""
        per = total // self.size
        return range(self.rank * per, (self.rank + 1) * per)

    def eval_batches(self, total: int) -> tuple[list[int], int]:
        """(this rank's evaluation batches out of `total`, forward passes every rank must make: FSDP's
        forward is collective, so a rank with a batch fewer runs a spare one)."""
        return list(range(self.rank, total, self.size)), math.ceil(total / self.size)

    def total(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of `t` over ranks (in place); `t` itself for a single process."""
        if self.active:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean of `t` over ranks (gloo has no AVG: sum, then divide)."""
        return self.total(t) / self.size if self.active else t

    def main_bytes(self, path: Path) -> bytes | None:
        """The bytes of `path` as rank 0 reads them, on every rank (None: rank 0 has no such file).
        Within one node every rank reads the file itself; across nodes rank 0 sends it (collective)."""
        if not self.spans_nodes:
            return path.read_bytes() if path.is_file() else None
        data = path.read_bytes() if self.main and path.is_file() else None
        size = torch.tensor([-1 if data is None else len(data)], dtype=torch.int64)
        dist.broadcast(size, src=0, group=self.control)  # on the gloo group: CPU tensors, under NCCL too
        n = int(size.item())
        if n <= 0:
            return None if n < 0 else b""
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.main else torch.empty(n, dtype=torch.uint8)
        dist.broadcast(buf, src=0, group=self.control)
        return data if self.main else buf.numpy().tobytes()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any: decisions (stop now) all ranks must share."""
        if not self.active:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32,
                         device=f"cuda:{self.local_rank}" if self.backend == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, local_rank, world_size) set by torchrun, or None when not launched by it."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])
    except ValueError as e:
        raise UserError(f"RANK/LOCAL_RANK/WORLD_SIZE are not integers: {e}", "launch with torchrun") from e


def start(cfg: Config, device_of: Callable[[], str]) -> World:
    """Join the process group torchrun set up (refusing combinations that cannot work); a single
    process gets World() and no process group at all. `device_of()` resolves the device (only
    called for parallel runs, so a single process keeps its own order of checks)."""
    env = torchrun_env()
    if cfg.parallel == "none":
        if env is not None and env[2] > 1:
            raise UserError(f"{env[2]} processes were started by torchrun but parallel=none: each would train "
                            "the same model into the same folder",
                            "add --parallel=ddp (or fsdp), or run `nanorepro train` without torchrun")
        return World()
    if env is None:
        raise UserError(f"parallel={cfg.parallel} needs one process per device, started by torchrun",
                        "launch it as `torchrun --standalone --nproc_per_node=2 -m nanorepro train ... "
                        f"--parallel={cfg.parallel}` "
                        "(--nproc_per_node = your GPU count), or use --parallel=none")
    rank, local_rank, size = env
    spans_nodes = size > int(os.environ.get("LOCAL_WORLD_SIZE", size))
    if cfg.gradient_accumulation_steps % size:
        ok = [n for n in range(1, cfg.gradient_accumulation_steps + 1) if cfg.gradient_accumulation_steps % n == 0]
        raise UserError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} cannot be split evenly "
                        f"over {size} processes (each rank takes an equal share, as nanoGPT does)",
                        f"use a multiple of {size}, e.g. --gradient_accumulation_steps="
                        f"{size * max(1, round(cfg.gradient_accumulation_steps / size))}, "
                        f"or run {', '.join(map(str, ok[-4:]))} processes")
    device = device_of()
    if device.startswith("cuda"):
        if ":" in cfg.device and size > 1:  # what was asked: resolve_device always gives an index
            raise UserError(f"device={cfg.device} pins every rank to one GPU",
                            "use --device=cuda (or auto): each rank takes the GPU of its LOCAL_RANK")
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible",
                            "start at most as many processes per node as there are GPUs (--nproc_per_node)")
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device(f"cuda:{local_rank}"))
        control = dist.new_group(backend="gloo")  # NCCL has no barrier with a timeout
        world = World(rank, local_rank, size, cfg.parallel, "nccl", spans_nodes, control)
    elif device == "cpu":
        dist.init_process_group("gloo")
        world = World(rank, local_rank, size, cfg.parallel, "gloo", spans_nodes, dist.group.WORLD)
    else:
        raise UserError(f"parallel={cfg.parallel} runs on CUDA GPUs (NCCL) or on the CPU (gloo), not {device}",
                        "use --device=cuda or --device=cpu")
    return world


def finish(world: World, error: BaseException | None = None) -> None:
    """Leave the process group cleanly on every path (else gloo aborts at exit): free the model and
    optimizer (after an error, held by the traceback's frames), barrier, destroy. After an error the
    barrier is bounded: a rank that failed alone leaves after ERROR_BARRIER_S."""
    if not world.active or not dist.is_initialized():
        return
    if error is not None and error.__traceback__ is not None:
        traceback.clear_frames(error.__traceback__)
    gc.collect()
    if world.backend == "nccl":
        torch.cuda.synchronize()
    try:
        if error is None:
            dist.barrier()
        else:
            dist.monitored_barrier(group=world.control, timeout=timedelta(seconds=ERROR_BARRIER_S),
                                   wait_all_ranks=True)
    except RuntimeError as e:  # another rank is gone or stuck: leave anyway
        if world.main:
            print(f"rank {world.rank}: not every rank reached the exit barrier ({str(e).splitlines()[0]})")
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Wrapping the model

def wrap(model: torch.nn.Module, world: World, device: str, dtype: str,
         activation_checkpointing: bool = False) -> torch.nn.Module:
    """The module the training step calls: the model itself, DDP around it, or the model sharded
    in place by FSDP2 (each block, then the root that holds the tied embedding/head)."""
    if activation_checkpointing:  # keep each block's input, recompute the rest: ~one block's activations
        from torch.utils.checkpoint import checkpoint

        for block in model.transformer.h:
            block.forward = lambda x, f=block.forward: checkpoint(f, x, use_reentrant=False)
    if world.parallel == "none" or not world.active:
        return model
    if world.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[world.local_rank] if device.startswith("cuda") else None)
    if dtype == "float16":
        raise UserError("parallel=fsdp trains in bfloat16 or float32 here; float16 needs a gradient scaler "
                        "that knows sharded gradients", "use --dtype=bfloat16, or --parallel=ddp")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (world.size,))
    policy = mixed_precision(dtype)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, **policy)
    fully_shard(model, mesh=mesh, **policy)
    return model


def mixed_precision(dtype: str) -> dict[str, Any]:
    """fully_shard's keyword for a bf16 run: gather the weights in bf16 (half the all-gather traffic,
    what autocast would cast them to anyway) and reduce-scatter gradients in fp32 (sums of many
    ranks' bf16 gradients lose bits); float32 runs keep FSDP's default (everything fp32)."""
    if dtype != "bfloat16":
        return {}
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return {"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)}


def sync_gradients(wrapped: torch.nn.Module, world: World, last: bool) -> ContextManager:
    """Reduce gradients over the ranks once an iteration, on its last micro-step: DDP all-reduces
    (no_sync before it), FSDP reduce-scatters (set_requires_gradient_sync(False) before it: the
    micro-steps before accumulate unsharded fp32 gradients, which memory.estimate counts)."""
    if not world.active:
        return nullcontext()
    if world.parallel == "ddp" and not last:
        return wrapped.no_sync()
    if world.parallel == "fsdp":
        wrapped.set_requires_gradient_sync(last)
    return nullcontext()


# ---------------------------------------------------------------------------------------------
# Checkpoints: always one full, single-process state dict

def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state(model: torch.nn.Module, world: World) -> dict[str, torch.Tensor]:
    """The full model state dict (complete on rank 0; FSDP gathers it, a collective)."""
    if world.parallel == "fsdp" and world.active:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_full_options())
    return model.state_dict()


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Fully qualified names of the optimizer's parameters, in the order its state_dict numbers them."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: World) -> dict[str, Any]:
    """The optimizer state dict in the single-process layout (parameters numbered 0..n-1 in
    group order); FSDP's full, name-keyed one is renumbered to it (a collective)."""
    if not (world.parallel == "fsdp" and world.active):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if not world.main:
        return {}
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    return {"state": {index[name]: s for name, s in full["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in full["param_groups"]]}


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                         world: World) -> None:
    """Load a single-process-layout optimizer state (from any run) into this run's optimizer."""
    if not (world.parallel == "fsdp" and world.active):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _param_names(model, optimizer)
    named = {"state": {names[int(i)]: s for i, s in state["state"].items()},
             "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))


def rng_states(world: World, local: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]] | None:
    """Every rank's torch RNG states (dropout masks differ per rank), gathered for rank 0's checkpoint."""
    if not world.active:
        return None
    states: list[Any] = [None] * world.size
    dist.all_gather_object(states, local, group=world.control)
    return states
