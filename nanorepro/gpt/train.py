"""The training loop: nanoGPT's `train.py` as a function, with exact resume (on the CPU) and one metrics file.

Resume is exact on the CPU: batch indices come from a dedicated generator checkpointed with the model,
optimizer, GradScaler and torch RNG (checkpoint.py), and evaluation draws from its own generator seeded
per iteration, so a resumed run logs the same losses at the same iterations as an uninterrupted one.
On a GPU the same state is restored but the losses match only closely: flash attention's backward
and Inductor's dropout RNG are not deterministic.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from nanorepro import __version__, envinfo, faults, fmt, memory, metrics
from nanorepro.config import PRETRAINED, Config, GPTConfig, from_dict, validate
from nanorepro.data import dataset
from nanorepro.errors import Interrupted, UserError, WontFit
from nanorepro.gpt import checkpoint, distributed, hardware, optim
from nanorepro.gpt.batches import Batches
from nanorepro.gpt.distributed import World
from nanorepro.gpt.model import GPT
from nanorepro.gpt.pretrained import load_pretrained, require_pretrained


def lr_at(it: int, cfg: Config) -> float:
    """Linear warmup, cosine decay to min_lr at lr_decay_iters, then min_lr (nanoGPT's get_lr)."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    span = max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * (it - cfg.warmup_iters) / span))
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


def train(cfg: Config, preset: str | None = None) -> dict[str, Any]:
    """Train (or resume, or skip when already finished) the run in `cfg.out_dir`; return its summary.
    Under torchrun every process calls this, and leaves the process group cleanly on every path."""
    cfg = validate(cfg)
    need = hardware.gpu_required_by(cfg.preset)
    world = distributed.start(cfg, lambda: hardware.resolve_device(cfg.device, need))  # touches no GPU yet
    try:
        result = _train(cfg, preset, world)
    except BaseException as e:
        distributed.finish(world, e)
        raise
    distributed.finish(world)
    return result


def train_seeds(cfg: Config, n: int, preset: str | None = None) -> list[dict[str, Any]]:
    """The same config over seeds seed..seed+n-1, each in `<out_dir>/seed-<s>`, for variance."""
    if n < 1:
        raise UserError(f"--seeds must be >= 1, got {n}", "use e.g. --seeds 3")
    return [train(dataclasses.replace(cfg, seed=s, out_dir=str(Path(cfg.out_dir) / f"seed-{s}")), preset=preset)
            for s in range(cfg.seed, cfg.seed + n)]


@dataclasses.dataclass
class _Run:
    """What the setup hands the loop: the resolved config, where and how it runs, model, data, start."""

    cfg: Config
    world: World
    out: Path
    device: str
    dtype: str
    attention: str  # the SDPA kernel: "default", or "math" where dtype=fast found it faster
    meta: dict[str, Any]
    model: GPT
    wrapped: torch.nn.Module  # what the step calls: the model, DDP around it, or FSDP-sharded
    optimizer: Any
    batches: Batches
    batch_gen: torch.Generator  # the training batches' own stream: exact resume
    scaler: torch.amp.GradScaler  # float16's loss scaling (disabled otherwise), checkpointed with the run
    iter_num: int = 0
    best_val: float = math.inf
    elapsed_before: float = 0.0  # seconds spent in earlier sessions of this run


def _train(cfg: Config, preset: str | None, world: World) -> dict[str, Any]:
    """Skip a finished run; else set up, then loop."""
    say = print if world.main else _silent
    out = Path(cfg.out_dir)
    if _finished_on_main(world, out, cfg):
        best = None  # on ranks other than 0, which may not have the records (another node's disk)
        if world.main:
            best = metrics.best_val_loss(metrics.read(out / metrics.METRICS_FILE))
            say(f"{out}: already finished at iter {cfg.max_iters} (best val {best:.4f}); nothing to do")
        return {"out_dir": str(out), "best_val_loss": best, "skipped": True}
    return _loop(_setup(cfg, world, preset, say), say)


def _finished_on_main(world: World, out: Path, cfg: Config) -> bool:
    """_finished_already as rank 0 answers it, on every rank: only rank 0 writes the run's records, and
    ranks on other nodes do not share its disk. A refusal on rank 0 is every rank's. On one node every
    rank reads the same file: no collective."""
    if not world.spans_nodes:
        return _finished_already(out, cfg)
    finished, refusal = False, None
    if world.main:
        try:
            finished = _finished_already(out, cfg)
        except UserError as e:
            refusal = e
    if world.any(refusal is not None):
        raise refusal or UserError("rank 0 refused to continue this run", "see rank 0's message")
    return world.any(finished)


def _setup(cfg: Config, world: World, preset: str | None, say) -> _Run:
    """Device, data, checkpoint, network, memory check, model, optimizer, records: in this order, so
    that every refusal comes before anything large is loaded."""
    device = world.device(hardware.resolve_device(cfg.device, hardware.gpu_required_by(cfg.preset)))
    hardware.use_device(device)  # cuda:N current before anything touches CUDA; its peak count reset (--seeds)
    dtype = hardware.resolve_dtype(device, cfg.dtype)
    device_type = torch.device(device).type
    data_dir = Path(cfg.data_root) / cfg.dataset
    meta = dataset.load_meta(data_dir)
    out = Path(cfg.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the run folder {out}: {e.strerror}", "pick a writable --out-dir") from e
    torch.manual_seed(cfg.seed)
    if device_type == "cuda":  # TF32 matmuls, as nanoGPT
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ckpt_path = out / checkpoint.CKPT_FILE
    ckpt_bytes = world.main_bytes(ckpt_path)  # rank 0 wrote it; on other nodes it is not on disk
    ckpt = checkpoint.load(ckpt_path, ckpt_bytes) if ckpt_bytes is not None else None
    del ckpt_bytes
    if device_type == "cpu":
        hardware.keep_freed_memory()
        if world.size == 1:  # torchrun gives each process OMP_NUM_THREADS=1
            hardware.set_cpu_threads()
    model_cfg = _network(cfg, meta, ckpt)
    dtype, attention = _settle_dtype(cfg, model_cfg, dtype, world, say)
    say(_check_memory(cfg, model_cfg, ckpt["iter_num"] if ckpt else None, device, dtype, world))
    model = _build_model(cfg, model_cfg, ckpt)  # only now are weights loaded
    cfg = dataclasses.replace(cfg, **model.config.to_dict())  # config.json records the network trained
    batches = Batches(data_dir, cfg.block_size, cfg.batch_size, device=device)
    model.to(device)
    wrapped = distributed.wrap(model, world, device, dtype, cfg.activation_checkpointing)  # FSDP: before the optimizer
    if world.active:
        torch.manual_seed(cfg.seed + world.rank)  # same init everywhere (above), own dropout masks from here
    optimizer = optim.build(model, cfg.optimizer, cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                            device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    run = _Run(cfg, world, out, device, dtype, attention, meta, model, wrapped, optimizer, batches,
               torch.Generator().manual_seed(cfg.seed), scaler)
    if ckpt is not None:
        run.iter_num, run.best_val, run.elapsed_before = checkpoint.restore_training(
            ckpt, model, optimizer, world, run.batch_gen, device, scaler)
        del ckpt  # the optimizer state can be large; keep one copy
        say(f"resuming {out} from iter {run.iter_num} (best val {run.best_val:.4f})")
    if world.main:
        _start_records(out, cfg, preset, run.iter_num, {
            "device": device, "dtype": dtype, "n_params": model.get_num_params(),
            "tokens_per_iter": cfg.tokens_per_iter, "dataset_encoding": meta["encoding"],
            "config": cfg.to_dict(), "world_size": world.size, "threads": torch.get_num_threads(),
            "attention": attention})
    say(f"{out}: {model.get_num_params() / 1e6:.2f}M parameters, {cfg.tokens_per_iter:,} tokens/iter, "
        f"{device} {dtype}, iters {run.iter_num}->{cfg.max_iters}")
    return run


def _loop(run: _Run, say) -> dict[str, Any]:
    """nanoGPT's training loop, one commented block per step; returns the run's summary."""
    cfg, world, model, optimizer, device, scaler = run.cfg, run.world, run.model, run.optimizer, run.device, run.scaler
    iter_num, best_val = run.iter_num, run.best_val
    log = metrics.append if world.main else _silent  # only rank 0 writes files
    metrics_path, ckpt_path = run.out / metrics.METRICS_FILE, run.out / checkpoint.CKPT_FILE
    device_type = torch.device(device).type
    autocast = hardware.StepContext(device_type, run.dtype, run.attention)  # autocast unless float32
    step_model = torch.compile(run.wrapped) if cfg.compile else run.wrapped
    t_origin = time.perf_counter() - run.elapsed_before  # elapsed_s counts earlier sessions of this run too
    window_t, window_iters = time.perf_counter(), 0  # tokens/s over the iterations since the last log
    loss_acc, loss_iters = torch.zeros((), device=device), 0  # summed on the device: one sync per log

    def save_checkpoint() -> None:
        if not cfg.save_checkpoint:
            return
        checkpoint.save_training(ckpt_path, model, optimizer, world, iter_num=iter_num, best_val_loss=best_val,
                                 elapsed_s=time.perf_counter() - t_origin, batch_gen=run.batch_gen, device=device,
                                 meta=run.meta, scaler=scaler)

    with _StopSignals() as stop, tqdm(total=cfg.max_iters, initial=iter_num, desc=run.out.name, unit="it",
                                      dynamic_ncols=True, mininterval=1.0, disable=not world.main) as bar:
        note = bar.write if world.main else _silent
        while True:
            # learning rate for this iteration
            lr = lr_at(iter_num, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # blocks in use: the first grow_from_layers up to grow_iter's evaluation, then all (below)
            if cfg.grow_from_layers:
                model.active_layers = cfg.n_layer if iter_num > cfg.grow_iter else cfg.grow_from_layers

            # evaluate every eval_interval iterations and at the end; checkpoint when better (or always)
            if (cfg.eval_only or iter_num == cfg.max_iters
                    or iter_num % cfg.eval_interval == 0 and (iter_num > 0 or cfg.eval_at_start)):
                losses = _evaluate(step_model, run.batches, cfg, world, autocast, device, iter_num)
                improved = losses["val"] < best_val
                best_val = min(best_val, losses["val"])
                log(metrics_path, {"kind": "eval", "iter": iter_num, "train_loss": losses["train"],
                                   "val_loss": losses["val"], "lr": lr, "elapsed_s": time.perf_counter() - t_origin,
                                   "best_val_loss": best_val})
                note(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                bar.set_postfix(val=f"{losses['val']:.4f}", refresh=False)
                if iter_num > 0 and not cfg.eval_only and (improved or cfg.always_save_checkpoint):
                    save_checkpoint()
                window_t, window_iters = time.perf_counter(), 0  # keep eval time out of tokens/s
            if iter_num >= cfg.max_iters or cfg.eval_only:  # eval_only: a resumed checkpoint is not trained on
                break

            # SIGINT/SIGTERM: checkpoint and stop, all ranks at the same iteration. Several processes agree
            # on it (a collective and a host sync) only every log_interval iterations, as nanoGPT syncs
            if _stop_now(world, bool(stop.received), iter_num, cfg.log_interval):
                save_checkpoint()
                name = signal.Signals(stop.signum).name
                log(metrics_path, {"kind": "end", "iter": iter_num, "best_val_loss": best_val,
                                   "elapsed_s": time.perf_counter() - t_origin, "status": "interrupted",
                                   "signal": name, "peak_memory_bytes": peak_memory_bytes(device)})
                if not cfg.save_checkpoint:
                    raise Interrupted(f"{name} at iter {iter_num}: metrics flushed, no checkpoint (save_checkpoint=false)",
                                      "run it again from the start, with save_checkpoint=true to be able to resume",
                                      stop.signum)
                raise Interrupted(f"{name} at iter {iter_num}: checkpoint saved to {ckpt_path}, metrics flushed",
                                  "run the same command again to resume from this iteration", stop.signum)

            # grow: the evaluation and checkpoint at grow_iter are of the network as it stood, so a run
            # resumed from that checkpoint grows here the same way
            if cfg.grow_from_layers and iter_num == cfg.grow_iter:
                _grow(model, cfg)
                note(f"step {iter_num}: all {cfg.n_layer} blocks train from here on (the first "
                     f"{cfg.grow_from_layers} until now{', copied into the others' if cfg.grow_by == 'copy' else ''})")

            _step(run, step_model, autocast, loss_acc)
            faults.hit("step")
            iter_num += 1
            window_iters += 1
            loss_iters += 1
            bar.update(1)

            # log every log_interval iterations
            if iter_num % cfg.log_interval == 0:
                lossf = world.mean(loss_acc).item() / loss_iters  # the one host sync per log interval
                loss_acc.zero_()
                loss_iters = 0
                dt = (time.perf_counter() - window_t) / max(1, window_iters)
                log(metrics_path, {"kind": "train", "iter": iter_num, "loss": lossf, "lr": lr,
                                   "tokens_per_s": cfg.tokens_per_iter / dt, "ms_per_iter": dt * 1000,
                                   "elapsed_s": time.perf_counter() - t_origin}, durable=False)
                bar.set_postfix(loss=f"{lossf:.4f}", refresh=False)
                window_t, window_iters = time.perf_counter(), 0

    return _end(run, iter_num, best_val, time.perf_counter() - t_origin, log, say)


def _end(run: _Run, iter_num: int, best_val: float, total: float, log, say) -> dict[str, Any]:
    """The run's end record and last line, saying whether it reached its target (target_val_loss); its summary."""
    cfg = run.cfg
    status = "finished" if not cfg.eval_only else "evaluated"
    target = metrics.target_verdict(cfg.target_val_loss, best_val) if status == "finished" else None
    verdict = {"target": target} if target else {}
    log(run.out / metrics.METRICS_FILE, {"kind": "end", "iter": iter_num, "best_val_loss": best_val, "elapsed_s": total,
                                         "status": status, "peak_memory_bytes": peak_memory_bytes(run.device),
                                         **verdict, "config": cfg.to_dict()})  # what a later launch must match
    say(f"{run.out}: {status} at iter {iter_num}, best val loss {best_val:.4f}, {total:.1f} s")
    if target and not target["reached"]:
        say(f"{run.out}: {metrics.missed_text(target, best_val, cfg.preset)}")
    return {"out_dir": str(run.out), "best_val_loss": best_val, "iter": iter_num, "elapsed_s": total, "skipped": False,
            **verdict}


def _step(run: _Run, step_model: torch.nn.Module, autocast: hardware.StepContext, loss_acc: torch.Tensor) -> None:
    """One optimizer step: forward and backward over the micro-steps with gradients accumulated (this rank's
    share of them), the gradient clipped, the optimizer stepped. The micro-steps' losses are added to loss_acc."""
    cfg, world, optimizer, scaler = run.cfg, run.world, run.optimizer, run.scaler
    mine = world.micro_steps(cfg.gradient_accumulation_steps)  # all of them in a single process
    for k in range(cfg.gradient_accumulation_steps):
        ix = run.batches.draw("train", run.batch_gen)  # every rank draws every micro-batch: one shared stream
        if k not in mine:
            continue
        x, y = run.batches.read("train", ix)
        with distributed.sync_gradients(run.wrapped, world, last=k == mine[-1]):
            with autocast:
                _, loss = step_model(x, y)
                loss = loss / len(mine)
            loss_acc += loss.detach()
            scaler.scale(loss).backward()
    if cfg.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def _grow(model: GPT, cfg: Config) -> None:
    """All n_layer blocks train from here on; with grow_by="copy" the trained ones are copied into the rest first."""
    if cfg.grow_by == "copy":
        model.stack(cfg.grow_from_layers)
    model.active_layers = cfg.n_layer


# ---------------------------------------------------------------------------------------------
# Setup, step by step


def _silent(*args: Any, **kwargs: Any) -> None:
    """What ranks other than 0 print and log: nothing."""


def _stop_now(world: World, received: bool, iter_num: int, log_interval: int) -> bool:
    """Whether to checkpoint and stop before this iteration's step: at once in a single process; under
    torchrun only at multiples of log_interval, where every rank asks the others (World.any)."""
    if not world.active:
        return received
    return iter_num % log_interval == 0 and world.any(received)


# fields that change how a run is watched or where it lives, not what it trains
_NOT_THE_RESULT = ("out_dir", "data_root", "log_interval", "compile", "save_checkpoint", "target_val_loss")


def _finished_already(out: Path, cfg: Config) -> bool:
    """Has `out` finished this very run? A run that finished with other settings is refused, not passed
    off as this one; its records stay as they are and its config.json says what it trained."""
    path = out / metrics.METRICS_FILE
    records = metrics.read(path) if path.exists() else []
    ends = metrics.of_kind(records, "end")
    if not (ends and ends[-1].get("status") == "finished" and ends[-1].get("iter") == cfg.max_iters):
        return False
    was = ends[-1].get("config") or metrics.meta(records).get("config") or {}
    ignore = set(_NOT_THE_RESULT)
    if cfg.init_from != "scratch":  # the run recorded the pretrained model's shape; init_from names it
        ignore |= {"n_layer", "n_head", "n_embd", "vocab_size", "bias"}
    differ = [f"{k}={was[k]!r} (finished) vs {v!r} (now)" for k, v in cfg.to_dict().items()
              if k in was and k not in ignore and v is not None and v != was[k]]
    if differ:
        if was:  # a notebook stage writes the new config.json before the job starts: put the run's back
            from_dict(was).save(out / "config.json")
        raise UserError(f"{out} holds a run that finished with other settings: {', '.join(differ)}",
                        f"use a new --out-dir for these settings, or delete {out} to train it again "
                        "(the finished run is kept)")
    return True


def _network(cfg: Config, meta: dict[str, Any], ckpt: dict[str, Any] | None) -> GPTConfig:
    """The network to train: the checkpoint's when resuming (refused if it is not this config's), else
    the config's own or a pretrained model's shape."""
    if cfg.init_from != "scratch" and meta["encoding"] != "gpt2":
        raise UserError(f"init_from={cfg.init_from} needs GPT-2 BPE data but dataset {cfg.dataset} is "
                        f"{meta['encoding']}-encoded", "use --dataset=shakespeare_gpt2 (see `nanorepro prepare`)")
    wanted = cfg.model_config(meta["vocab_size"])
    if ckpt is not None:
        checkpoint.check_resumable(ckpt, cfg, wanted, meta)
        return dataclasses.replace(checkpoint.model_config(ckpt), dropout=cfg.dropout)
    if wanted.vocab_size < meta["vocab_size"]:
        raise UserError(f"vocab_size={wanted.vocab_size} is smaller than the dataset's {meta['vocab_size']}",
                        "leave vocab_size unset to take it from the data")
    return wanted


def _settle_dtype(cfg: Config, model_cfg: GPTConfig, dtype: str, world: World, say) -> tuple[str, str]:
    """(dtype, attention kernel): `fast` timed on this CPU (hardware.fast_cpu_dtype); muon + float16 refused."""
    attention = "default"  # the SDPA kernel PyTorch picks; "math" where dtype=fast found it faster
    if dtype == "fast":
        dtype, attention, why = hardware.fast_cpu_dtype_cached(model_cfg, cfg.batch_size, dataset.default_cache_dir())
        if world.any(dtype != "bfloat16"):  # every rank must autocast alike
            dtype, attention = "float32", "default"
        say(f"dtype=fast -> {dtype}{', math attention' if attention == 'math' else ''}: {why}")
    if cfg.optimizer == "muon" and dtype == "float16":  # GradScaler unscales one torch optimizer, not a pair
        raise UserError("optimizer=muon cannot train in float16 (its loss scaling needs one optimizer)",
                        "use dtype=bfloat16 or float32, or optimizer=adamw")
    return dtype, attention


def _build_model(cfg: Config, model_cfg: GPTConfig, ckpt: dict[str, Any] | None) -> GPT:
    """The network with its weights: the checkpoint's, a pretrained GPT-2's (context cropped), or fresh."""
    if ckpt is None and cfg.init_from != "scratch":
        model, _ = load_pretrained(cfg.init_from, dropout=cfg.dropout)
        if model_cfg.block_size < model.config.block_size:
            model.crop_block_size(model_cfg.block_size)
        return model
    model = GPT(model_cfg)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    elif cfg.grow_from_layers:
        model.start_shallow(cfg.grow_from_layers)
    return model


def _start_records(out: Path, cfg: Config, preset: str | None, iter_num: int, info: dict[str, Any]) -> None:
    """metrics.jsonl cut back to the checkpoint (or started, with its meta record), config.json, env.json."""
    path = out / metrics.METRICS_FILE
    if path.exists():
        metrics.truncate_after(path, iter_num)  # a run killed before its first checkpoint starts over
    if not path.exists() or not metrics.meta(metrics.read(path)):
        path.unlink(missing_ok=True)
        metrics.append(path, {"kind": "meta", "run": out.name, "preset": preset, "nanorepro": __version__,
                              "started": fmt.utc_timestamp(), **info})
    cfg.save(out / "config.json")
    envinfo.write(out / "env.json", envinfo.capture(cfg.to_dict(), seeds=[cfg.seed]))


def _check_memory(cfg: Config, model_cfg: GPTConfig, start_iter: int | None, device: str, dtype: str,
                  world: World) -> str:
    """What the run needs (memory, and time on a known GPU) as one line; WontFit on every rank when it
    does not fit on any rank's device. `start_iter` is the checkpoint's iteration when resuming, else None."""
    gpu, gpus = None, 1
    if device.startswith("cuda"):
        free = cuda_free_bytes(device)
        gpu, gpus = torch.cuda.get_device_name(device), torch.cuda.device_count()
        where = f"{device} ({gpu})"
    elif device == "cpu":
        free = (memory.available_ram() or 0) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        where = "this machine's RAM" + (" (per process)" if world.size > 1 else "")
    else:  # MPS shares the machine's memory: nothing reliable to check against
        return f"{device}: memory not checked"
    refused: UserError | None = None
    est = None
    if free:
        try:
            est = memory.check(cfg, model_cfg, dtype, free, where, world.size, gpus)
        except WontFit as e:
            refused = e
            if start_iter is None and cfg.init_from in PRETRAINED:
                require_pretrained(cfg.init_from)  # weights that cannot be had here: say that first (exit 3)
    if world.any(refused is not None):
        refused = refused or WontFit("another rank's device cannot fit this run", "see rank 0's message")
        path = Path(cfg.out_dir) / metrics.METRICS_FILE
        if world.main and not path.exists():  # why this run has no losses, for reports and the size comparison
            metrics.append(path, {"kind": "stage", "name": f"train {Path(cfg.out_dir).name}", "status": metrics.NOT_RUN,
                                  "reason": f"does not fit: {refused.problem}; {refused.fix}"})
        raise refused
    line = f"memory: {est.describe()} of {fmt.human_bytes(free)} free on {where}" if est else "memory: not checked"
    secs = memory.estimate_seconds(cfg, model_cfg, gpu, world.size, dtype, start_iter or 0)
    if secs is not None:
        line += f"; time: ~{fmt.duration(secs)} at {memory.ASSUMED_MFU:.0%} MFU on {world.size}x {gpu}"
    return line


# ---------------------------------------------------------------------------------------------
# The loop's helpers


@torch.no_grad()
def _evaluate(step_model: torch.nn.Module, batches: Batches, cfg: Config, world: World,
              autocast: hardware.StepContext, device: str, iter_num: int) -> dict[str, float]:
    """Mean loss over `eval_iters` batches of each split, drawn from a generator seeded by the iteration
    (so a resumed run evaluates on the same batches), split over the ranks; with eval_whole_val, the val
    loss is over every window of the val split instead: exact, so evaluations differ only by the model."""
    step_model.eval()
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + iter_num)
    out = {}
    for split in ("train", "val"):
        total = torch.zeros((), device=device)
        if split == "val" and cfg.eval_whole_val:
            draws = batches.windows(split)
        else:
            draws = [batches.draw(split, gen) for _ in range(cfg.eval_iters)]  # the same on every rank
        mine, passes = world.eval_batches(len(draws))
        for j in range(passes):
            ix = draws[mine[j] if j < len(mine) else 0]
            x, y = batches.read(split, ix)
            with autocast:
                loss = step_model(x, y)[1].float()
            if j < len(mine):  # else a spare pass: FSDP's forward needs every rank
                total += loss * (len(ix) / batches.batch_size)  # a short last window batch weighs less
        out[split] = (world.total(total) / (sum(len(ix) for ix in draws) / batches.batch_size)).item()
        faults.hit("eval")
    step_model.train()
    return out


class _StopSignals:
    """SIGINT and SIGTERM noted, not acted on at once: the loop checkpoints and stops between iterations."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    @property
    def signum(self) -> int:
        return self.received[0] if self.received else signal.SIGTERM  # a rank the signal has not reached yet

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, lambda signum, frame: self.received.append(signum))
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def cuda_free_bytes(device: str) -> int:
    """Memory this process can still have on a GPU: what the driver reports free plus what PyTorch's
    caching allocator holds reserved but unused (an earlier --seeds run's blocks, reused, not freed)."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def peak_memory_bytes(device: str) -> int:
    """Most memory this process held: allocated CUDA memory on a GPU, resident set size on the CPU."""
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
