"""What a checkpoint holds, and how it is written and read (nanochat's checkpoint_manager, in one file).

`<out_dir>/ckpt.pt` is one `torch.save`d dict of tensors and plain values, loaded with `weights_only=True`:
`model` and `optimizer` (full, single-process state dicts, gathered under FSDP), `model_args`
(`GPTConfig.to_dict()`, nanoGPT's key), `iter_num`, `best_val_loss`, `elapsed_s`, `rng` (the batch
stream's generator and each rank's torch RNG, for exact resume), `vocabulary` (what token ids mean)
and, for float16 runs, `scaler` (the GradScaler's scale and growth tracker: plain numbers).
Resume is exact on the CPU; on a GPU it is close, not bitwise (flash attention's backward and
Inductor's dropout RNG are not deterministic), so GPU tests compare resumed losses within a tolerance.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch

from nanorepro import faults
from nanorepro.config import Config, GPTConfig
from nanorepro.errors import UserError
from nanorepro.files import write_atomic
from nanorepro.gpt import distributed, optim
from nanorepro.gpt.distributed import World
from nanorepro.gpt.model import GPT

CKPT_FILE = "ckpt.pt"
# Fields that fix the network's shape: a checkpoint only resumes into the same ones (dropout may change).
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")


def save(path: Path, state: dict[str, Any]) -> None:
    """Write atomically (files.write_atomic): a crash never leaves a torn checkpoint, and a failed
    write (disk full) keeps the previous one as it was."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # a run killed mid-write leaves its temp file
        stale.unlink(missing_ok=True)

    def write(f) -> None:
        torch.save(state, f)
        f.flush()
        faults.hit("ckpt-write", lambda: f.truncate(f.tell() // 2))

    try:
        write_atomic(path, write)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        reason = e.__context__ if isinstance(e.__context__, OSError) else e  # the OSError torch.save hit
        kept = f"; the previous checkpoint {path} is intact" if path.exists() else ""
        raise UserError(f"cannot write checkpoint {path}: {reason}{kept}",
                        "free disk space (or use an --out-dir on a bigger disk) and run the same command "
                        "again to resume") from e
    faults.hit("ckpt-renamed")


def load(path: Path, data: bytes | None = None) -> dict[str, Any]:
    """The checkpoint's dict, read without unpickling anything: from `path`, or from `data`, the bytes
    of the file at `path` on another machine (a run over several nodes resumes from rank 0's)."""
    try:
        return torch.load(path if data is None else io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign or damaged file: never guess
        raise UserError(f"cannot read checkpoint {path}: {e.__class__.__name__}: {e}",
                        "move it away and start a fresh run in a new --out-dir") from e


def vocabulary(meta: dict[str, Any]) -> dict[str, Any]:
    """What token ids mean in a dataset: its encoding, size and (char) vocabulary's digest."""
    itos = meta.get("itos")
    digest = hashlib.sha256(json.dumps(itos).encode()).hexdigest() if itos is not None else None
    return {"encoding": meta["encoding"], "vocab_size": int(meta["vocab_size"]), "itos_sha256": digest}


def model_config(ckpt: dict[str, Any]) -> GPTConfig:
    """The network a checkpoint holds (checkpoints from before dropout was recorded get 0.0)."""
    known = {f.name for f in dataclasses.fields(GPTConfig)}
    return GPTConfig(**{k: v for k, v in ckpt["model_args"].items() if k in known})


def check_resumable(ckpt: dict[str, Any], cfg: Config, wanted: GPTConfig, meta: dict[str, Any]) -> None:
    """Refuse, keeping the checkpoint, to resume into another vocabulary, shape or optimizer."""
    was = ckpt.get("vocabulary", vocabulary(meta))
    if was != vocabulary(meta):
        raise UserError(f"the checkpoint in {cfg.out_dir} was trained on another vocabulary ({was['encoding']}, "
                        f"{was['vocab_size']} tokens) than dataset {cfg.dataset} ({meta['encoding']}, "
                        f"{meta['vocab_size']} tokens)", "use a new --out-dir for this dataset, or the "
                        "dataset the run was made with (the existing checkpoint is kept)")
    has = model_config(ckpt)
    mismatched = [f"{k} {getattr(has, k)} (checkpoint) vs {getattr(wanted, k)} (config)" for k in SHAPE_FIELDS
                  if k != "vocab_size" and getattr(has, k) != getattr(wanted, k)]
    if mismatched:
        raise UserError(f"the checkpoint in {cfg.out_dir} is for another model shape: {', '.join(mismatched)}",
                        "use a new --out-dir for this config (the existing checkpoint is kept)")
    if has.vocab_size < meta["vocab_size"]:
        raise UserError(f"the checkpoint's vocabulary ({has.vocab_size}) is smaller than dataset "
                        f"{cfg.dataset}'s ({meta['vocab_size']})", "use the dataset the run was made with")
    if (kind := optim.kind_of(ckpt["optimizer"])) != cfg.optimizer:
        raise UserError(f"the checkpoint in {cfg.out_dir} was trained with optimizer={kind}, the config says "
                        f"{cfg.optimizer}", f"resume with --optimizer={kind}, or use a new --out-dir "
                        "(the existing checkpoint is kept)")


def save_training(path: Path, model: GPT, optimizer: Any, world: World, *, iter_num: int, best_val_loss: float,
                  elapsed_s: float, batch_gen: torch.Generator, device: str, meta: dict[str, Any],
                  scaler: torch.amp.GradScaler | None = None) -> None:
    """Checkpoint a training run. Every rank calls this (gathering is collective under FSDP); rank 0 writes."""
    rng = {"batches": batch_gen.get_state(), "torch": torch.get_rng_state()}
    if device.startswith("cuda"):
        rng["cuda"] = torch.cuda.get_rng_state(device)
    ranks = distributed.rng_states(world, {k: v for k, v in rng.items() if k != "batches"})
    if ranks:
        rng["ranks"] = ranks
    state = {"model": distributed.model_state(model, world),
             "optimizer": distributed.optimizer_state(model, optimizer, world)}
    if world.main:
        scaling = {"scaler": scaler.state_dict()} if scaler is not None and scaler.is_enabled() else {}
        save(path, {**state, "model_args": model.config.to_dict(), "iter_num": iter_num,
                    "best_val_loss": best_val_loss, "elapsed_s": elapsed_s, "rng": rng, "vocabulary": vocabulary(meta),
                    **scaling})


def restore_training(ckpt: dict[str, Any], model: GPT, optimizer: Any, world: World, batch_gen: torch.Generator,
                     device: str, scaler: torch.amp.GradScaler | None = None) -> tuple[int, float, float]:
    """Load the optimizer state, the GradScaler's and every RNG a checkpoint saved;
    (iter_num, best_val_loss, elapsed_s)."""
    distributed.load_optimizer_state(model, optimizer, ckpt["optimizer"], world)
    if scaler is not None and scaler.is_enabled() and "scaler" in ckpt:  # else a fresh scale: skipped steps
        scaler.load_state_dict(ckpt["scaler"])
    batch_gen.set_state(ckpt["rng"]["batches"])
    ranks = ckpt["rng"].get("ranks") or []
    same_world = len(ranks) == world.size
    rng = ranks[world.rank] if same_world else ckpt["rng"]  # each rank its own dropout RNG
    torch.set_rng_state(rng["torch"])
    if device.startswith("cuda") and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)
    if world.active and world.size > 1 and not same_world:
        torch.manual_seed(rank_seed(world.rank, world.size))
    return int(ckpt["iter_num"]), float(ckpt["best_val_loss"]), float(ckpt.get("elapsed_s", 0.0))


def rank_seed(rank: int, size: int) -> int:
    """A seed for `rank` of `size` when a run resumes on another number of processes than saved it: all
    ranks restored one saved state (the same dropout masks everywhere); drawn from it, the same
    numbers on every rank, each rank takes its own. Deterministic, so such a resume repeats exactly."""
    return int(torch.randint(0, 2**62, (size,))[rank])


def load_model(run_dir: Path) -> tuple[GPT, Config]:
    """A run folder's trained network (dropout off) and its config, for sampling."""
    path = run_dir / CKPT_FILE
    if not (run_dir / "config.json").exists() or not path.exists():
        raise UserError(f"{run_dir} has no config.json and ckpt.pt", "train first: `nanorepro train --out-dir ...`")
    ckpt = load(path)
    model = GPT(dataclasses.replace(model_config(ckpt), dropout=0.0))
    model.load_state_dict(ckpt["model"])
    return model, Config.load(run_dir / "config.json")
