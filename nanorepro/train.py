"""The training loop: nanoGPT's `train.py` as a function, with exact resume and one metrics file.

Reads top to bottom: pick the device, load the data, build or load the model, then loop:
evaluate and checkpoint every `eval_interval` iterations, step the optimizer with gradient
accumulation, log to `metrics.jsonl` and a progress bar.

Resume is exact: batch indices come from a dedicated generator whose state is checkpointed with
the model, optimizer and torch RNG; evaluation draws from its own generator seeded per iteration.
A resumed run therefore logs the same losses at the same iterations as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import signal
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import __version__, data, distributed, envinfo, faults, hardware, memory, metrics, optim
from .config import PRETRAINED, Config, validate
from .errors import Interrupted, UserError
from .model import GPT, load_pretrained

CKPT_FILE = "ckpt.pt"
# Fields that fix the network's shape: a checkpoint only resumes into the same ones.
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")


def pick_device(cfg: Config) -> tuple[str, str]:
    """Resolve `device` and `dtype`, refusing a device that is not there."""
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device={device} was asked for but no CUDA GPU is visible",
                            "use --device=cpu, or run on a GPU node (target=chameleon)")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"device={device} does not exist: {torch.cuda.device_count()} GPU(s) visible",
                            f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UserError("device=mps was asked for but MPS is not available", "use --device=cpu")
    dtype = cfg.dtype
    if dtype in ("auto", "fast"):
        # nanoGPT trains in float32 on CPU and bf16 (else fp16) on CUDA; "fast" on a CPU is left
        # for train() to settle by timing the run's own model (hardware.fast_cpu_dtype)
        if device.startswith("cuda"):
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        elif dtype == "auto" or device != "cpu":
            dtype = "float32"
    return device, dtype


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


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a crash never leaves a torn ckpt.

    A failed write (disk full) removes the temp file and keeps the previous checkpoint as it was."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            faults.hit("ckpt-write", lambda: f.truncate(f.tell() // 2))
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        tmp.unlink(missing_ok=True)
        reason = e.__context__ if isinstance(e.__context__, OSError) else e  # the OSError torch.save hit
        kept = f"; the previous checkpoint {path} is intact" if path.exists() else ""
        raise UserError(f"cannot write checkpoint {path}: {reason}{kept}",
                        "free disk space (or use an --out-dir on a bigger disk) and run the same command "
                        "again to resume") from e
    faults.hit("ckpt-renamed")


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign or damaged file: never guess
        raise UserError(f"cannot read checkpoint {path}: {e.__class__.__name__}: {e}",
                        "move it away and start a fresh run in a new --out-dir") from e


def vocabulary(meta: dict[str, Any]) -> dict[str, Any]:
    """What token ids mean in a dataset: its encoding, size and (char) vocabulary's digest; kept in ckpt.pt."""
    itos = meta.get("itos")
    digest = hashlib.sha256(json.dumps(itos).encode()).hexdigest() if itos is not None else None
    return {"encoding": meta.get("encoding"), "vocab_size": int(meta["vocab_size"]), "itos_sha256": digest}


def _model_for(cfg: Config, meta: dict[str, Any], ckpt: dict[str, Any] | None) -> tuple[GPT, Config]:
    """Build the network: from a checkpoint's shape, a pretrained GPT-2, or from scratch."""
    if ckpt is not None:
        if ckpt.get("vocabulary", vocabulary(meta)) != vocabulary(meta):
            was = ckpt["vocabulary"]
            raise UserError(f"the checkpoint in {cfg.out_dir} was trained on another vocabulary ({was['encoding']}, "
                            f"{was['vocab_size']} tokens) than dataset {cfg.dataset} ({meta.get('encoding')}, "
                            f"{meta['vocab_size']} tokens)", "use a new --out-dir for this dataset, or the "
                            "dataset the run was made with (the existing checkpoint is kept)")
        shape = ckpt["model_args"]
        mismatched = {k: (shape[k], getattr(cfg, k)) for k in SHAPE_FIELDS
                      if k in shape and getattr(cfg, k) is not None and k != "vocab_size" and cfg.init_from == "scratch"
                      and shape[k] != getattr(cfg, k)}
        if mismatched:
            what = ", ".join(f"{k} {a} (checkpoint) vs {b} (config)" for k, (a, b) in mismatched.items())
            raise UserError(f"the checkpoint in {cfg.out_dir} is for another model shape: {what}",
                            "use a new --out-dir for this config (the existing checkpoint is kept)")
        cfg = dataclasses.replace(cfg, **{k: shape[k] for k in SHAPE_FIELDS})
        if cfg.vocab_size < meta["vocab_size"]:
            raise UserError(f"the checkpoint's vocabulary ({cfg.vocab_size}) is smaller than dataset "
                            f"{cfg.dataset}'s ({meta['vocab_size']})", "use the dataset the run was made with")
        model = GPT(cfg)
        model.load_state_dict(ckpt["model"])
        return model, cfg
    if cfg.init_from == "scratch":
        cfg = dataclasses.replace(cfg, vocab_size=cfg.vocab_size or meta["vocab_size"])
        if cfg.vocab_size < meta["vocab_size"]:
            raise UserError(f"vocab_size={cfg.vocab_size} is smaller than the dataset's {meta['vocab_size']}",
                            "leave vocab_size unset to take it from the data")
        return GPT(cfg), cfg
    if meta.get("encoding") != "gpt2":
        raise UserError(f"init_from={cfg.init_from} needs GPT-2 BPE data but dataset {cfg.dataset} is "
                        f"{meta.get('encoding')}-encoded", "use --dataset=shakespeare_gpt2 (see `nanorepro prepare`)")
    context = memory.shape_of(dataclasses.replace(cfg, block_size=1 << 30)).block_size  # the model's n_positions
    if cfg.block_size > context:  # refused before gigabytes of weights are loaded
        raise UserError(f"block_size={cfg.block_size} is above {cfg.init_from}'s {context}",
                        f"use --block_size={context} or less")
    model, shape = load_pretrained(cfg.init_from, dropout=cfg.dropout)
    if cfg.block_size < shape["block_size"]:
        model.crop_block_size(cfg.block_size)
    elif cfg.block_size > shape["block_size"]:
        raise UserError(f"block_size={cfg.block_size} is above {cfg.init_from}'s {shape['block_size']}",
                        f"use --block_size={shape['block_size']} or less")
    shape = {k: v for k, v in shape.items() if k in SHAPE_FIELDS and k != "block_size"}
    return model, dataclasses.replace(cfg, **shape)


def peak_memory_bytes(device: str) -> int | None:
    """Most memory this process held: allocated CUDA memory on a GPU, resident set size on the CPU."""
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
    except (ImportError, OSError):
        return None


def _check_memory(cfg: Config, meta: dict[str, Any], ckpt: dict[str, Any] | None, device: str, dtype: str,
                  world: distributed.World) -> str:
    """What the run needs (memory, and time on a known GPU) as one line; WontFit on every rank when
    it does not fit on any rank's device, naming the largest setting that would (memory.py)."""
    shape = memory.shape_of(cfg, meta["vocab_size"], ckpt["model_args"] if ckpt is not None else None)
    gpu, gpus = None, 1
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(device)
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
            est = memory.check(cfg, shape, dtype, free, where, world.size, gpus)
        except memory.WontFit as e:
            refused = e
            if ckpt is None and cfg.init_from in PRETRAINED:
                _require_pretrained(cfg.init_from)  # weights that cannot be had here: say that first (exit 3)
    if world.any(refused is not None):
        refused = refused or memory.WontFit("another rank's device cannot fit this run", "see rank 0's message")
        path = Path(cfg.out_dir) / metrics.METRICS_FILE
        if world.main and not path.exists():  # why this run has no losses, for reports and the size comparison
            metrics.append(path, {"kind": "stage", "name": f"train {Path(cfg.out_dir).name}", "status": metrics.NOT_RUN,
                                  "reason": f"does not fit: {refused.problem}; {refused.fix}"})
        raise refused
    line = f"memory: {est.describe()} of {free / memory.GiB:.1f} GiB free on {where}" if est else "memory: not checked"
    secs = memory.estimate_seconds(cfg, shape, gpu, world.size, dtype, int(ckpt["iter_num"]) if ckpt else 0)
    if secs is not None:
        line += f"; time: ~{memory.human_time(secs)} at {memory.ASSUMED_MFU:.0%} MFU on {world.size}x {gpu}"
    return line


def _require_pretrained(name: str) -> None:
    """ModelUnavailable when OpenAI's `name` is neither cached nor downloadable here, found without
    loading anything (the same order of places as model.load_pretrained looks in)."""
    from huggingface_hub import try_to_load_from_cache

    from .model import require_download_possible

    if Path(name).is_dir() or any(isinstance(try_to_load_from_cache(repo, "config.json"), str)
                                  for repo in (name, f"openai-community/{name}")):
        return
    require_download_possible(name)


def _finished_already(out: Path, cfg: Config) -> bool:
    path = out / metrics.METRICS_FILE
    if not path.exists():
        return False
    records = metrics.read(path)
    ends = metrics.of_kind(records, "end")
    return bool(ends) and ends[-1].get("status") == "finished" and ends[-1].get("iter") == cfg.max_iters


def _silent(*args: Any, **kwargs: Any) -> None:
    """What ranks other than 0 print and log: nothing."""


def train(cfg: Config, preset: str | None = None) -> dict[str, Any]:
    """Train (or resume, or skip when already finished) the run in `cfg.out_dir`; return its summary.

    Under torchrun with parallel=ddp|fsdp every process calls this (see distributed.py); each
    leaves the process group cleanly on every path, errors included."""
    cfg = validate(cfg)
    world = distributed.start(cfg, lambda: pick_device(cfg)[0])
    try:
        result = _train(cfg, preset, world)
    except BaseException as e:
        distributed.finish(world, e)
        raise
    distributed.finish(world)
    return result


def _train(cfg: Config, preset: str | None, world: distributed.World) -> dict[str, Any]:
    say = print if world.main else _silent
    log = metrics.append if world.main else _silent  # only rank 0 writes files
    out = Path(cfg.out_dir)
    if _finished_already(out, cfg):
        records = metrics.read(out / metrics.METRICS_FILE)
        say(f"{out}: already finished at iter {cfg.max_iters} (best val {metrics.best_val_loss(records):.4f}); "
              "nothing to do")
        return {"out_dir": str(out), "best_val_loss": metrics.best_val_loss(records), "skipped": True}
    device, dtype = pick_device(cfg)
    device = world.device(device)
    device_type = "cuda" if device.startswith("cuda") else device
    data_dir = Path(cfg.data_root) / cfg.dataset
    meta = data.load_meta(data_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the run folder {out}: {e.strerror}", "pick a writable --out-dir") from e

    torch.manual_seed(cfg.seed)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ckpt_path = out / CKPT_FILE
    ckpt = load_checkpoint(ckpt_path) if ckpt_path.exists() else None
    if device_type == "cpu" and world.size == 1:  # torchrun gives each process OMP_NUM_THREADS=1
        hardware.set_cpu_threads()
    attention = "default"  # the SDPA kernel PyTorch picks; "math" where dtype=fast found it faster
    if dtype == "fast":  # bf16 autocast if it is faster for this model here (CPU; see hardware.py)
        shape = memory.shape_of(cfg, meta["vocab_size"], ckpt["model_args"] if ckpt is not None else None)
        dtype, attention, why = hardware.fast_cpu_dtype(cfg, shape)
        if world.any(dtype != "bfloat16"):  # every rank must autocast alike
            dtype, attention = "float32", "default"
        say(f"dtype=fast -> {dtype}{', math attention' if attention == 'math' else ''}: {why}")
    if ckpt is not None and (was := optim.kind_of(ckpt["optimizer"])) != cfg.optimizer:
        raise UserError(f"the checkpoint in {out} was trained with optimizer={was}, the config says {cfg.optimizer}",
                        f"resume with --optimizer={was}, or use a new --out-dir (the existing checkpoint is kept)")
    if cfg.optimizer == "muon" and dtype == "float16":  # GradScaler unscales one torch optimizer, not a pair
        raise UserError("optimizer=muon cannot train in float16 (its loss scaling needs one optimizer)",
                        "use dtype=bfloat16 or float32, or optimizer=adamw")
    say(_check_memory(cfg, meta, ckpt, device, dtype, world))  # before any model is loaded
    model, cfg = _model_for(cfg, meta, ckpt)
    batches = data.Batches(data_dir, cfg.block_size, cfg.batch_size, device=device)
    model.to(device)
    wrapped = distributed.wrap(model, world, device, dtype, cfg.activation_checkpointing)  # FSDP: before the optimizer
    if world.active:
        torch.manual_seed(cfg.seed + world.rank)  # same init everywhere (above), own dropout masks from here
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type,
                                           cfg.optimizer)
    batch_gen = torch.Generator().manual_seed(cfg.seed)
    iter_num, best_val, elapsed_before = 0, float("inf"), 0.0
    metrics_path = out / metrics.METRICS_FILE
    if ckpt is not None:
        distributed.load_optimizer_state(model, optimizer, ckpt["optimizer"], world)
        iter_num, best_val = int(ckpt["iter_num"]), float(ckpt["best_val_loss"])
        elapsed_before = float(ckpt.get("elapsed_s", 0.0))
        batch_gen.set_state(ckpt["rng"]["batches"])
        ranks = ckpt["rng"].get("ranks") or []
        rng = ranks[world.rank] if len(ranks) == world.size else ckpt["rng"]  # each rank its own dropout RNG
        torch.set_rng_state(rng["torch"])
        if device_type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
        del ckpt  # the optimizer state can be large; keep one copy
        if metrics_path.exists() and world.main:
            metrics.truncate_after(metrics_path, iter_num)
        say(f"resuming {out} from iter {iter_num} (best val {best_val:.4f})")
    elif metrics_path.exists() and world.main:
        metrics.truncate_after(metrics_path, 0)  # killed before its first checkpoint: it starts over
    if world.main and (not metrics_path.exists() or not metrics.meta(metrics.read(metrics_path))):
        if metrics_path.exists():
            metrics_path.unlink()
        metrics.append(metrics_path, {
            "kind": "meta", "run": out.name, "preset": preset, "nanorepro": __version__,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": device, "dtype": dtype, "n_params": model.get_num_params(),
            "tokens_per_iter": cfg.tokens_per_iter, "dataset_encoding": meta.get("encoding"),
            "config": cfg.to_dict(), "world_size": world.size, "threads": torch.get_num_threads(),
            "attention": attention,
        })
    if world.main:
        cfg.save(out / "config.json")
        envinfo.write(out / "env.json", envinfo.capture(cfg.to_dict(), seeds=[cfg.seed]))

    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    autocast = hardware.StepContext(device_type, dtype, attention)  # autocast unless float32
    step_model = torch.compile(wrapped) if cfg.compile else wrapped

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        step_model.eval()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + iter_num)
        out_losses = {}
        for split in ("train", "val"):
            total = torch.zeros((), device=device)
            draws = [batches.draw(split, gen) for _ in range(cfg.eval_iters)]  # the same on every rank
            mine, passes = world.eval_batches(cfg.eval_iters)
            for j in range(passes):
                x, y = batches.read(split, draws[mine[j] if j < len(mine) else 0])
                with autocast:
                    loss = step_model(x, y)[1].float()
                if j < len(mine):  # else a spare pass: FSDP's forward needs every rank
                    total += loss
            out_losses[split] = (world.total(total) / cfg.eval_iters).item()
            faults.hit("eval")
        step_model.train()
        return out_losses

    def checkpoint() -> None:
        rng = {"batches": batch_gen.get_state(), "torch": torch.get_rng_state()}
        if device_type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        ranks = distributed.rng_states(world, {k: v for k, v in rng.items() if k != "batches"})
        if ranks:
            rng["ranks"] = ranks
        # collectives under FSDP (every rank gathers), then only rank 0 writes
        state = {"model": distributed.model_state(model, world),
                 "optimizer": distributed.optimizer_state(model, optimizer, world)}
        if not world.main:
            return
        save_checkpoint(ckpt_path, {
            **state,
            "model_args": {k: getattr(cfg, k) for k in SHAPE_FIELDS}, "iter_num": iter_num,
            "best_val_loss": best_val, "elapsed_s": elapsed(), "rng": rng, "vocabulary": vocabulary(meta),
        })

    start = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - start

    say(f"{out}: {model.get_num_params() / 1e6:.2f}M parameters, {cfg.tokens_per_iter:,} tokens/iter, "
          f"{device} {dtype}, iters {iter_num}->{cfg.max_iters}")
    stop: list[int] = []  # the signal that asked us to stop: acted on between iterations
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, lambda signum, frame: stop.append(signum))
    bar = tqdm(total=cfg.max_iters, initial=iter_num, desc=out.name, unit="it", dynamic_ncols=True,
               mininterval=1.0, disable=not world.main)
    note = bar.write if world.main else _silent
    try:
        window_t, window_iters = time.perf_counter(), 0
        loss_acc, loss_iters = torch.zeros((), device=device), 0
        while True:
            lr = lr_at(iter_num, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
                losses = evaluate()
                improved = losses["val"] < best_val
                best_val = min(best_val, losses["val"])
                log(metrics_path, {"kind": "eval", "iter": iter_num, "train_loss": losses["train"],
                                   "val_loss": losses["val"], "lr": lr, "elapsed_s": elapsed(),
                                   "best_val_loss": best_val})
                note(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                bar.set_postfix(val=f"{losses['val']:.4f}", refresh=False)
                if iter_num > 0 and (improved or cfg.always_save_checkpoint):
                    checkpoint()
                window_t, window_iters = time.perf_counter(), 0  # keep eval time out of tokens/s
            if iter_num >= cfg.max_iters or (iter_num == 0 and cfg.eval_only):
                break
            if world.any(bool(stop)):  # all ranks stop at the same iteration
                bar.close()
                checkpoint()
                signum = stop[0] if stop else signal.SIGTERM  # a rank the signal has not reached yet
                name = signal.Signals(signum).name
                log(metrics_path, {"kind": "end", "iter": iter_num, "best_val_loss": best_val,
                                   "elapsed_s": elapsed(), "status": "interrupted", "signal": name,
                                   "peak_memory_bytes": peak_memory_bytes(device)})
                raise Interrupted(f"{name} at iter {iter_num}: checkpoint saved to {ckpt_path}, metrics flushed",
                                  "run the same command again to resume from this iteration", signum)

            mine = world.micro_steps(cfg.gradient_accumulation_steps)  # all of them in a single process
            for k in range(cfg.gradient_accumulation_steps):
                ix = batches.draw("train", batch_gen)  # every rank draws every micro-batch: one shared stream
                if k not in mine:
                    continue
                x, y = batches.read("train", ix)
                with distributed.sync_gradients(wrapped, world, last=k == mine[-1]):
                    with autocast:
                        _, loss = step_model(x, y)
                        loss = loss / len(mine)
                    loss_acc += loss.detach()
                    scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            faults.hit("step")
            iter_num += 1
            window_iters += 1
            loss_iters += 1
            bar.update(1)
            if iter_num % cfg.log_interval == 0:
                lossf = world.mean(loss_acc).item() / loss_iters  # the one host sync per log interval
                loss_acc.zero_()
                loss_iters = 0
                dt = (time.perf_counter() - window_t) / max(1, window_iters)
                log(metrics_path, {"kind": "train", "iter": iter_num, "loss": lossf, "lr": lr,
                                   "tokens_per_s": cfg.tokens_per_iter / dt, "ms_per_iter": dt * 1000,
                                   "elapsed_s": elapsed()})
                bar.set_postfix(loss=f"{lossf:.4f}", refresh=False)
                window_t, window_iters = time.perf_counter(), 0
        bar.close()
    finally:
        bar.close()  # before any error message, so the error is the last line
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    total = elapsed()
    status = "finished" if not cfg.eval_only else "evaluated"
    log(metrics_path, {"kind": "end", "iter": iter_num, "best_val_loss": best_val,
                       "elapsed_s": total, "status": status, "peak_memory_bytes": peak_memory_bytes(device)})
    say(f"{out}: {status} at iter {iter_num}, best val loss {best_val:.4f}, {total:.1f} s")
    return {"out_dir": str(out), "best_val_loss": best_val, "iter": iter_num, "elapsed_s": total, "skipped": False}


def train_seeds(cfg: Config, n: int, preset: str | None = None) -> list[dict[str, Any]]:
    """The same config over seeds seed..seed+n-1, each in `<out_dir>/seed-<s>`, for variance."""
    if n < 1:
        raise UserError(f"--seeds must be >= 1, got {n}", "use e.g. --seeds 3")
    return [train(dataclasses.replace(cfg, seed=s, out_dir=str(Path(cfg.out_dir) / f"seed-{s}")), preset=preset)
            for s in range(cfg.seed, cfg.seed + n)]
