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
import math
import os
import signal
import threading
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import __version__, data, envinfo, metrics
from .config import Config, validate
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
    if dtype == "auto":
        # nanoGPT trains in float32 on CPU and bf16 (else fp16) on CUDA
        if device.startswith("cuda"):
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
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
    """Write to a temp file in the same folder, fsync, then rename: a crash never leaves a torn ckpt."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign or damaged file: never guess
        raise UserError(f"cannot read checkpoint {path}: {e.__class__.__name__}: {e}",
                        "move it away and start a fresh run in a new --out-dir") from e


def _model_for(cfg: Config, meta: dict[str, Any], ckpt: dict[str, Any] | None) -> tuple[GPT, Config]:
    """Build the network: from a checkpoint's shape, a pretrained GPT-2, or from scratch."""
    if ckpt is not None:
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
    model, shape = load_pretrained(cfg.init_from, dropout=cfg.dropout)
    if cfg.block_size < shape["block_size"]:
        model.crop_block_size(cfg.block_size)
    elif cfg.block_size > shape["block_size"]:
        raise UserError(f"block_size={cfg.block_size} is above {cfg.init_from}'s {shape['block_size']}",
                        f"use --block_size={shape['block_size']} or less")
    shape = {k: v for k, v in shape.items() if k in SHAPE_FIELDS and k != "block_size"}
    return model, dataclasses.replace(cfg, **shape)


def _finished_already(out: Path, cfg: Config) -> bool:
    path = out / metrics.METRICS_FILE
    if not path.exists():
        return False
    records = metrics.read(path)
    ends = metrics.of_kind(records, "end")
    return bool(ends) and ends[-1].get("status") == "finished" and ends[-1].get("iter") == cfg.max_iters


def train(cfg: Config, preset: str | None = None) -> dict[str, Any]:
    """Train (or resume, or skip when already finished) the run in `cfg.out_dir`; return its summary."""
    cfg = validate(cfg)
    out = Path(cfg.out_dir)
    if _finished_already(out, cfg):
        records = metrics.read(out / metrics.METRICS_FILE)
        print(f"{out}: already finished at iter {cfg.max_iters} (best val {metrics.best_val_loss(records):.4f}); "
              "nothing to do")
        return {"out_dir": str(out), "best_val_loss": metrics.best_val_loss(records), "skipped": True}
    device, dtype = pick_device(cfg)
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
    model, cfg = _model_for(cfg, meta, ckpt)
    batches = data.Batches(data_dir, cfg.block_size, cfg.batch_size, device=device)
    model.to(device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
    batch_gen = torch.Generator().manual_seed(cfg.seed)
    iter_num, best_val, elapsed_before = 0, float("inf"), 0.0
    metrics_path = out / metrics.METRICS_FILE
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        iter_num, best_val = int(ckpt["iter_num"]), float(ckpt["best_val_loss"])
        elapsed_before = float(ckpt.get("elapsed_s", 0.0))
        batch_gen.set_state(ckpt["rng"]["batches"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device_type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], device)
        del ckpt  # the optimizer state can be large; keep one copy
        if metrics_path.exists():
            metrics.truncate_after(metrics_path, iter_num)
        print(f"resuming {out} from iter {iter_num} (best val {best_val:.4f})")
    if not metrics_path.exists() or not metrics.meta(metrics.read(metrics_path)):
        if metrics_path.exists():
            metrics_path.unlink()
        metrics.append(metrics_path, {
            "kind": "meta", "run": out.name, "preset": preset, "nanorepro": __version__,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": device, "dtype": dtype, "n_params": model.get_num_params(),
            "tokens_per_iter": cfg.tokens_per_iter, "dataset_encoding": meta.get("encoding"),
            "config": cfg.to_dict(),
        })
    cfg.save(out / "config.json")
    envinfo.write(out / "env.json", envinfo.capture(cfg.to_dict(), seeds=[cfg.seed]))

    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    autocast = nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=ptdtype)
    step_model = torch.compile(model) if cfg.compile else model

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        step_model.eval()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + iter_num)
        out_losses = {}
        for split in ("train", "val"):
            total = torch.zeros((), device=device)
            for _ in range(cfg.eval_iters):
                x, y = batches.get(split, gen)
                with autocast:
                    total += step_model(x, y)[1].float()
            out_losses[split] = (total / cfg.eval_iters).item()
        step_model.train()
        return out_losses

    def checkpoint() -> None:
        rng = {"batches": batch_gen.get_state(), "torch": torch.get_rng_state()}
        if device_type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "model_args": {k: getattr(cfg, k) for k in SHAPE_FIELDS}, "iter_num": iter_num,
            "best_val_loss": best_val, "elapsed_s": elapsed(), "rng": rng,
        })

    start = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - start

    print(f"{out}: {model.get_num_params() / 1e6:.2f}M parameters, {cfg.tokens_per_iter:,} tokens/iter, "
          f"{device} {dtype}, iters {iter_num}->{cfg.max_iters}")
    stop: list[int] = []  # the signal that asked us to stop: acted on between iterations
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, lambda signum, frame: stop.append(signum))
    try:
        bar = tqdm(total=cfg.max_iters, initial=iter_num, desc=out.name, unit="it", dynamic_ncols=True,
                   mininterval=1.0)
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
                metrics.append(metrics_path, {"kind": "eval", "iter": iter_num, "train_loss": losses["train"],
                                              "val_loss": losses["val"], "lr": lr, "elapsed_s": elapsed(),
                                              "best_val_loss": best_val})
                bar.write(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                bar.set_postfix(val=f"{losses['val']:.4f}", refresh=False)
                if iter_num > 0 and (improved or cfg.always_save_checkpoint):
                    checkpoint()
                window_t, window_iters = time.perf_counter(), 0  # keep eval time out of tokens/s
            if iter_num >= cfg.max_iters or (iter_num == 0 and cfg.eval_only):
                break
            if stop:
                bar.close()
                checkpoint()
                name = signal.Signals(stop[0]).name
                metrics.append(metrics_path, {"kind": "end", "iter": iter_num, "best_val_loss": best_val,
                                              "elapsed_s": elapsed(), "status": "interrupted", "signal": name})
                raise Interrupted(f"{name} at iter {iter_num}: checkpoint saved to {ckpt_path}, metrics flushed",
                                  "run the same command again to resume from this iteration", stop[0])

            for _ in range(cfg.gradient_accumulation_steps):
                x, y = batches.get("train", batch_gen)
                with autocast:
                    _, loss = step_model(x, y)
                    loss = loss / cfg.gradient_accumulation_steps
                loss_acc += loss.detach()
                scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            window_iters += 1
            loss_iters += 1
            bar.update(1)
            if iter_num % cfg.log_interval == 0:
                lossf = loss_acc.item() / loss_iters  # the one host sync per log interval
                loss_acc.zero_()
                loss_iters = 0
                dt = (time.perf_counter() - window_t) / max(1, window_iters)
                metrics.append(metrics_path, {"kind": "train", "iter": iter_num, "loss": lossf, "lr": lr,
                                              "tokens_per_s": cfg.tokens_per_iter / dt, "ms_per_iter": dt * 1000,
                                              "elapsed_s": elapsed()})
                bar.set_postfix(loss=f"{lossf:.4f}", refresh=False)
                window_t, window_iters = time.perf_counter(), 0
        bar.close()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    total = elapsed()
    status = "finished" if not cfg.eval_only else "evaluated"
    metrics.append(metrics_path, {"kind": "end", "iter": iter_num, "best_val_loss": best_val,
                                  "elapsed_s": total, "status": status})
    print(f"{out}: {status} at iter {iter_num}, best val loss {best_val:.4f}, {total:.1f} s")
    return {"out_dir": str(out), "best_val_loss": best_val, "iter": iter_num, "elapsed_s": total, "skipped": False}


def train_seeds(cfg: Config, n: int, preset: str | None = None) -> list[dict[str, Any]]:
    """The same config over seeds seed..seed+n-1, each in `<out_dir>/seed-<s>`, for variance."""
    if n < 1:
        raise UserError(f"--seeds must be >= 1, got {n}", "use e.g. --seeds 3")
    return [train(dataclasses.replace(cfg, seed=s, out_dir=str(Path(cfg.out_dir) / f"seed-{s}")), preset=preset)
            for s in range(cfg.seed, cfg.seed + n)]
