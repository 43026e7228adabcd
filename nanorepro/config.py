"""The one config type: nanoGPT's training knobs as a dataclass, its presets, overrides and checks.

Field names follow nanoGPT's `train.py` so its configs and command lines read the same here.
No torch import: the hub kernel validates configs before sending work to a node.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nanorepro.errors import UserError
from nanorepro.files import load_json, write_text_atomic

PRETRAINED = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


@dataclass(frozen=True)
class GPTConfig:
    """The network's shape: all that `model.GPT`, memory and FLOPs estimates, reports and checkpoints need."""

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64, as nanoGPT does for speed
    bias: bool = False
    dropout: float = 0.0
    # options from nanoGPT's successors (modded-nanogpt, nanochat); off: GPT-2 exactly
    rope: bool = False  # rotary positions instead of learned position embeddings
    qk_norm: bool = False  # RMS-normalised queries and keys
    relu_squared: bool = False  # relu(x)^2 in the MLP instead of GELU

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def block_params(self) -> int:
        """Parameters in one transformer block: 4 linear weights, 2 LayerNorm gains (+ their biases)."""
        C, b = self.n_embd, int(self.bias)
        return 12 * C * C + 2 * C + 11 * C * b

    @property
    def n_params(self) -> int:
        """Exact parameter count of `model.GPT`: the tied embedding/head once, position embeddings in."""
        C, b = self.n_embd, int(self.bias)
        return self.vocab_size * C + self.position_params + self.n_layer * self.block_params + C + C * b

    @property
    def position_params(self) -> int:
        return 0 if self.rope else self.block_size * self.n_embd

    @property
    def non_embedding_params(self) -> int:
        """nanoGPT's headline count (`get_num_params()`): position embeddings out, the tied head in."""
        return self.n_params - self.position_params

    def flops_per_token(self, block_size: int | None = None) -> float:
        """Forward + backward FLOPs per token (PaLM, appendix B), as nanoGPT's estimate_mfu counts them:
        6N for the matmuls (N without position embeddings), plus 12 L C T for attention over T tokens."""
        T = block_size or self.block_size
        return 6 * self.non_embedding_params + 12 * self.n_layer * self.n_embd * T


# OpenAI's GPT-2 checkpoints: context 1024, the unpadded 50257-token vocabulary, biases everywhere.
GPT2_SIZES: dict[str, GPTConfig] = {
    name: GPTConfig(n_layer=L, n_head=H, n_embd=C, block_size=1024, vocab_size=50257, bias=True)
    for name, (L, H, C) in zip(PRETRAINED, [(12, 12, 768), (24, 16, 1024), (36, 20, 1280), (48, 25, 1600)])
}


def pretrained_config(init_from: str) -> GPTConfig:
    """The shape of GPT-2 `init_from` (GPT2_SIZES) or of a local Hugging Face folder (its config.json, no weights)."""
    if init_from in GPT2_SIZES:
        return GPT2_SIZES[init_from]
    hf = load_json(Path(init_from) / "config.json", "the model's config",
                   "pass a Hugging Face GPT-2 folder (config.json + weights)")
    return GPTConfig(n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=hf.get("n_embd", 768),
                     block_size=hf.get("n_positions", 1024), vocab_size=hf.get("vocab_size", 50257), bias=True)


def _field(default: Any, meaning: str, allowed: tuple[str, ...] | None = None) -> Any:
    """A Config field with its meaning and allowed values, which validate() checks and --help-fields shows."""
    return dataclasses.field(default=default, metadata={"meaning": meaning, "allowed": allowed})


# Ranges of numeric fields, checked by validate() and listed by --help-fields: the fields, the test, the fix.
RANGES = {
    "> 0": (("n_layer", "n_head", "n_embd", "block_size", "batch_size", "gradient_accumulation_steps",
             "eval_interval", "eval_iters", "log_interval", "learning_rate"), lambda v: v > 0,
            "set {} to a positive value"),
    ">= 0": (("max_iters", "warmup_iters", "lr_decay_iters", "min_lr", "weight_decay", "grad_clip", "seed",
              "grow_from_layers", "grow_iter"),
             lambda v: v >= 0, "set {} to 0 or more"),
    "in [0, 1)": (("dropout", "beta1", "beta2"), lambda v: 0 <= v < 1, "use e.g. {}=0.2"),
}


@dataclass
class Config:
    """Everything a run needs; resolved once where a stage is launched and written to `config.json`."""

    # where things live
    out_dir: str = _field("runs/default", "the run folder: checkpoint, metrics, config (resumed if it holds one)")
    data_root: str = _field("data", "the folder holding the datasets")
    dataset: str = _field("shakespeare_char", "a folder under data_root made by `nanorepro prepare`")
    preset: str | None = _field(None, "the preset this config was resolved from (a record: resolve applies it)")
    # model (ignored fields are taken from the checkpoint when init_from is a GPT-2)
    n_layer: int = _field(12, "transformer blocks")
    n_head: int = _field(12, "attention heads per block (n_embd must be a multiple)")
    n_embd: int = _field(768, "channels of the residual stream")
    block_size: int = _field(1024, "context length in tokens")
    vocab_size: int | None = _field(None, "None: read from the dataset's meta.json")
    dropout: float = _field(0.0, "dropout probability")
    bias: bool = _field(False, "biases in the Linear and LayerNorm layers (GPT-2 has them)")
    rope: bool = _field(False, "rotary position embeddings instead of GPT-2's learned ones (from scratch only)")
    qk_norm: bool = _field(False, "RMS-normalise queries and keys before attention (from scratch only)")
    relu_squared: bool = _field(False, "relu(x)^2 in the MLP instead of GELU (from scratch only)")
    init_from: str = _field("scratch", "scratch, a GPT-2 name or a local Hugging Face folder",
                            ("scratch", *PRETRAINED, "FOLDER"))
    # optimisation
    batch_size: int = _field(12, "sequences per micro-step")
    gradient_accumulation_steps: int = _field(1, "micro-steps per optimizer step")
    max_iters: int = _field(5000, "optimizer steps in all")
    learning_rate: float = _field(6e-4, "the peak learning rate")
    weight_decay: float = _field(0.1, "AdamW's weight decay on the matrices")
    beta1: float = _field(0.9, "AdamW's beta1")
    beta2: float = _field(0.95, "AdamW's beta2")
    grad_clip: float = _field(1.0, "clip the gradient norm to this; 0 disables clipping")
    optimizer: str = _field("adamw", "muon: Muon on the blocks' matrices, AdamW on the rest (optim.py)",
                            ("adamw", "muon"))
    decay_lr: bool = _field(True, "cosine decay to min_lr after warm-up; False: constant learning rate")
    warmup_iters: int = _field(100, "steps of linear warm-up")
    lr_decay_iters: int = _field(5000, "the step where the decay reaches min_lr")
    min_lr: float = _field(6e-5, "the learning rate at the end of the decay")
    grow_from_layers: int = _field(0, "train only the first this many blocks until grow_iter, the others adding "
                                   "nothing (zeroed output projections) until then: a cheaper start; 0: all blocks")
    grow_iter: int = _field(0, "the step from which all n_layer blocks train (with grow_from_layers)")
    grow_by: str = _field("zero", "how the later blocks join at grow_iter: zero (as they started, adding nothing) "
                          "or copy (each a copy of one of the first grow_from_layers, in order: stacking)",
                          ("zero", "copy"))
    # evaluation, logging, checkpoints
    eval_interval: int = _field(250, "steps between evaluations (and checkpoints)")
    eval_iters: int = _field(200, "batches per evaluation")
    eval_whole_val: bool = _field(False, "val loss over every non-overlapping block_size window of the val split "
                                  "(exact, the same windows each time) instead of eval_iters random batches")
    eval_at_start: bool = _field(True, "evaluate the untrained model at step 0 too (nanoGPT does); False saves "
                                 "one evaluation where only the time to a target loss matters")
    target_val_loss: float | None = _field(None, "the best val loss this run is meant to reach (our presets' promise): "
                                           "a finished run above it says so at its end and in the report; None: no target")
    log_interval: int = _field(10, "steps between progress lines")
    eval_only: bool = _field(False, "evaluate once and stop")
    always_save_checkpoint: bool = _field(True, "False: save only when the val loss improves (nanoGPT)")
    save_checkpoint: bool = _field(True, "False: never write ckpt.pt (throughput benchmarks: a gpt2-xl checkpoint "
                                   "is ~19 GB); such a run cannot be resumed")
    # system
    device: str = _field("auto", "where to train; auto: a GPU if there is one",
                         ("auto", "cpu", "cuda", "cuda:N", "mps"))
    dtype: str = _field("auto", "auto: bf16 (or fp16) on a GPU, float32 elsewhere; fast: also bf16 on a CPU "
                        "where it is faster", ("auto", "fast", "float32", "bfloat16", "float16"))
    compile: bool = _field(False, "torch.compile the model")
    seed: int = _field(1337, "seeds the initialisation, the batches and dropout")
    parallel: str = _field("none", "several processes under torchrun, gradient_accumulation_steps split over them",
                           ("none", "ddp", "fsdp"))
    activation_checkpointing: bool = _field(False, "recompute each block's activations in backward: less memory")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "Config":
        """A config.json, checked like any other config."""
        return from_dict(load_json(path, "the config", "give the config.json of a run"))

    @property
    def tokens_per_iter(self) -> int:
        return self.gradient_accumulation_steps * self.batch_size * self.block_size

    def model_config(self, vocab_size: int | None = None) -> GPTConfig:
        """The network this run trains: its own shape fields (`vocab_size`, the dataset's, when the config
        leaves it unset), or a pretrained model's shape with this config's context and dropout."""
        if self.init_from == "scratch":
            vocab = self.vocab_size or vocab_size
            if vocab is None:
                raise UserError("the model needs vocab_size, which is not set",
                                "prepare the dataset first (its meta.json has it), or set vocab_size")
            return GPTConfig(self.n_layer, self.n_head, self.n_embd, self.block_size, int(vocab), self.bias,
                             self.dropout, rope=self.rope, qk_norm=self.qk_norm, relu_squared=self.relu_squared)
        base = pretrained_config(self.init_from)
        if self.block_size > base.block_size:  # refused before gigabytes of weights are loaded
            raise UserError(f"block_size={self.block_size} is above {self.init_from}'s {base.block_size}",
                            f"use --block_size={base.block_size} or less")
        return dataclasses.replace(base, block_size=self.block_size, dropout=self.dropout)


# Presets reproduce nanoGPT's configs field for field; comments name the source.
PRESETS: dict[str, dict[str, Any]] = {
    # config/train_shakespeare_char.py: the "baby GPT", ~3 min on one A100, best val 1.4697
    "shakespeare-char": dict(
        out_dir="runs/shakespeare-char", dataset="shakespeare_char",
        eval_interval=250, eval_iters=200, log_interval=10, always_save_checkpoint=False,
        gradient_accumulation_steps=1, batch_size=64, block_size=256,
        n_layer=6, n_head=6, n_embd=384, dropout=0.2,
        learning_rate=1e-3, max_iters=5000, lr_decay_iters=5000, min_lr=1e-4,
        beta2=0.99, warmup_iters=100, compile=True,
    ),
    # nanoGPT README's CPU command line on top of train_shakespeare_char.py: val ~1.88
    "shakespeare-char-cpu": dict(
        out_dir="runs/shakespeare-char-cpu", dataset="shakespeare_char",
        eval_interval=250, eval_iters=20, log_interval=1, always_save_checkpoint=False,
        gradient_accumulation_steps=1, batch_size=12, block_size=64,
        n_layer=4, n_head=4, n_embd=128, dropout=0.0,
        learning_rate=1e-3, max_iters=2000, lr_decay_iters=2000, min_lr=1e-4,
        beta2=0.99, warmup_iters=100, device="cpu", compile=False,
    ),
    # Tuned on a 2-core CPU (benchmarks/tuning-log.md), additions to nanoGPT's recipes: Muon (optim.py),
    # rotary positions, QK-norm and relu^2 (model.py), bf16 where the CPU has it and it is faster
    # (dtype=fast). Measured figures: benchmarks/RESULTS.md.
    # quick: nanoGPT's CPU target, val <= 1.88, as fast as possible: two narrow layers, twice the CPU
    # recipe's batch (it amortises Muon's per-step cost), 300 steps, one evaluation at the end.
    "shakespeare-char-cpu-quick": dict(
        out_dir="runs/shakespeare-char-cpu-quick", dataset="shakespeare_char",
        eval_interval=300, eval_iters=50, eval_at_start=False, log_interval=10, always_save_checkpoint=False,
        gradient_accumulation_steps=1, batch_size=24, block_size=64,
        n_layer=2, n_head=4, n_embd=128, dropout=0.0, optimizer="muon",
        rope=True, qk_norm=True, relu_squared=True,
        learning_rate=5e-3, max_iters=300, lr_decay_iters=300, min_lr=1e-5,
        beta2=0.99, warmup_iters=20, device="cpu", dtype="fast", compile=False, target_val_loss=1.88,
    ),
    # tuned: the baby GPT's 1.4697 on a CPU, with a margin: its context (256) at a third of its parameters, no
    # dropout (it slows learning more than it helps in 1500 steps: 1.5953 against 1.5357 at step 1000), weight
    # decay 1.0 against the overfitting instead (one AVX-512 thread, seed 1337: 0.1 ended at 1.4764, 0.5 at
    # 1.4549, 1.0 at 1.4523; benchmarks/tuning-log.md).
    # Its val loss is exact (the whole split, 55 batches); the train loss only shows the overfitting, so 20
    # batches of it, not 50: each evaluation runs 75 batches instead of 105.
    "shakespeare-char-cpu-tuned": dict(
        out_dir="runs/shakespeare-char-cpu-tuned", dataset="shakespeare_char",
        eval_interval=250, eval_iters=20, eval_whole_val=True, eval_at_start=False, log_interval=50, always_save_checkpoint=False,
        gradient_accumulation_steps=1, batch_size=8, block_size=256,
        n_layer=4, n_head=4, n_embd=256, dropout=0.0, weight_decay=1.0, optimizer="muon",
        rope=True, qk_norm=True, relu_squared=True,
        learning_rate=3e-3, max_iters=1500, lr_decay_iters=1500, min_lr=3e-5,
        beta2=0.99, warmup_iters=50, device="cpu", dtype="fast", compile=False,
        grow_from_layers=2, grow_iter=150, grow_by="copy", target_val_loss=1.4697,
    ),
    # gpu-fast: the baby GPT's network and batch with the CPU presets' Muon and architecture options,
    # aiming at its val 1.4697 in ~30 s of training on one A100/H100 (benchmarks/gpu.sh). A candidate:
    # not yet measured on a GPU.
    "shakespeare-char-gpu-fast": dict(
        out_dir="runs/shakespeare-char-gpu-fast", dataset="shakespeare_char",
        eval_interval=250, eval_iters=100, eval_at_start=False, log_interval=50, always_save_checkpoint=False,
        gradient_accumulation_steps=1, batch_size=64, block_size=256,
        n_layer=6, n_head=6, n_embd=384, dropout=0.2, optimizer="muon",
        rope=True, qk_norm=True, relu_squared=True,
        learning_rate=3e-3, max_iters=2000, lr_decay_iters=2000, min_lr=3e-5,
        beta2=0.99, warmup_iters=50, compile=True, target_val_loss=1.4697,
    ),
    # config/finetune_shakespeare.py: gpt2-xl, 20 iterations at a constant 3e-5
    "finetune-shakespeare": dict(
        out_dir="runs/finetune-shakespeare", dataset="shakespeare_gpt2",
        eval_interval=5, eval_iters=40, log_interval=1, always_save_checkpoint=False,
        init_from="gpt2-xl", batch_size=1, gradient_accumulation_steps=32,
        max_iters=20, learning_rate=3e-5, decay_lr=False,
    ),
    # the same recipe scaled to a laptop: gpt2 (124M), short context, a few iterations
    "finetune-shakespeare-cpu": dict(
        out_dir="runs/finetune-shakespeare-cpu", dataset="shakespeare_gpt2",
        eval_interval=5, eval_iters=4, log_interval=1, always_save_checkpoint=False,
        init_from="gpt2", batch_size=1, gradient_accumulation_steps=4, block_size=128,
        max_iters=10, learning_rate=3e-5, decay_lr=False, device="cpu",
    ),
    # config/train_gpt2.py: GPT-2 124M on OpenWebText, 12 x 1024 x 40 = 491,520 tokens per step
    # (nanoGPT: 8 GPUs x 5 accumulation steps), 600k steps: ~4 days on 8x A100 40GB, val ~2.85.
    # nanoGPT's model pads the 50257 tokens to 50304 ("rounded up for efficiency"): the extra ids are
    # never targets, and sampling never draws them (model.GPT.generate's vocab_size)
    "train-gpt2": dict(
        out_dir="runs/train-gpt2", dataset="openwebtext_gpt2", vocab_size=50304,
        eval_interval=1000, eval_iters=200, log_interval=10, always_save_checkpoint=True,
        batch_size=12, block_size=1024, gradient_accumulation_steps=5 * 8,
        n_layer=12, n_head=12, n_embd=768, dropout=0.0, bias=False,
        learning_rate=6e-4, max_iters=600000, lr_decay_iters=600000, min_lr=6e-5,
        weight_decay=1e-1, beta1=0.9, beta2=0.95, grad_clip=1.0, warmup_iters=2000, compile=True,
    ),
    # config/eval_gpt2*.py: OpenAI's checkpoints on OpenWebText, 500 batches of 8 x 1024 (README:
    # val 3.12 / 2.84 / 2.67 / 2.54)
    **{f"eval-{name}": dict(
        out_dir=f"runs/eval-{name}", dataset="openwebtext_gpt2", init_from=name,
        batch_size=8, block_size=1024, eval_iters=500, eval_only=True, dropout=0.0,
    ) for name in PRETRAINED},
    # seconds on any CPU: for tests and smoke runs
    "tiny": dict(
        out_dir="runs/tiny", dataset="shakespeare_char",
        eval_interval=10, eval_iters=2, log_interval=1, always_save_checkpoint=True,
        batch_size=4, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
        learning_rate=1e-3, max_iters=20, lr_decay_iters=20, min_lr=1e-4,
        warmup_iters=2, device="cpu",
    ),
}


# Set in every stage a Chameleon node runs (remote.JOB_SCRIPT): there "auto" must find the node's GPU.
ON_GPU_NODE = "NANOREPRO_ON_GPU_NODE"
# Presets made for GPUs: with device=auto they refuse to start on a CPU (hardware.pick_device); an
# explicit device=cpu still runs them there.
GPU_PRESETS = frozenset({"shakespeare-char", "shakespeare-char-gpu-fast", "finetune-shakespeare", "train-gpt2",
                         *(f"eval-{name}" for name in PRETRAINED)})

_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def coerce(name: str, value: Any) -> Any:
    """Convert a value (often a command-line string) to the type of field `name` (its type hint), or refuse."""
    types_ = typing.get_type_hints(Config)
    if name not in types_:
        close = [k for k in types_ if name.replace("-", "_") == k or name in k]
        hint = f"did you mean {close[0]!r}?" if close else "see `nanorepro train --help-fields`"
        raise UserError(f"unknown config field {name!r}", hint)
    optional = type(None) in typing.get_args(types_[name])
    kind = next(t for t in typing.get_args(types_[name]) or (types_[name],) if t is not type(None))
    if value is None or (kind is not str and isinstance(value, str) and value.lower() == "none"):
        if optional:
            return None
        raise UserError(f"{name} cannot be None", f"give a {kind.__name__} value")
    try:
        if isinstance(value, bool) or kind is bool:  # True is an int to Python, not to a config
            if kind is bool and (isinstance(value, bool) or (isinstance(value, str) and value.lower() in _WORDS)):
                return _WORDS.get(str(value).lower(), value)
        elif kind is int and not (isinstance(value, float) and not value.is_integer()):
            return int(value)
        elif kind is float or (kind is str and isinstance(value, str)):
            return kind(value)
    except (TypeError, ValueError):
        pass
    raise UserError(f"{name}={value!r} is not a valid {kind.__name__}", f"give {name} a {kind.__name__} value")


def validate(cfg: Config) -> Config:
    """Refuse values no run can use, naming the field and the fix. The one place each field is checked."""
    for rule, (names, ok, fix) in RANGES.items():
        for name in names:
            if not ok(getattr(cfg, name)):
                raise UserError(f"{name} must be {rule}, got {getattr(cfg, name)}", fix.format(name))
    if cfg.target_val_loss is not None and not cfg.target_val_loss > 0:
        raise UserError(f"target_val_loss must be > 0, got {cfg.target_val_loss}", "give a loss in nats, or None")
    if cfg.vocab_size is not None and cfg.vocab_size <= 0:
        raise UserError(f"vocab_size must be > 0, got {cfg.vocab_size}", "leave vocab_size unset to read it from the data")
    for name in ("optimizer", "dtype", "parallel", "device", "grow_by"):
        value, allowed = getattr(cfg, name), Config.__dataclass_fields__[name].metadata["allowed"]
        if value not in allowed and not (name == "device" and value.startswith("cuda:") and value[5:].isdigit()):
            raise UserError(f"unknown {name}={value!r}", f"use {', '.join(allowed)}"
                            + (" (the last two under torchrun)" if name == "parallel" else ""))
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}", "pick n_embd a multiple of n_head")
    if cfg.decay_lr and cfg.min_lr > cfg.learning_rate:
        raise UserError(f"min_lr={cfg.min_lr} is above learning_rate={cfg.learning_rate}", "lower min_lr")
    if cfg.optimizer == "muon" and cfg.parallel == "fsdp":
        raise UserError("optimizer=muon needs whole matrices, which FSDP shards", "use parallel=ddp, or optimizer=adamw")
    modern = [name for name in ("rope", "qk_norm", "relu_squared") if getattr(cfg, name)]
    if modern and cfg.init_from != "scratch":
        raise UserError(f"{', '.join(modern)} change the network, so GPT-2's weights ({cfg.init_from}) do not fit it",
                        f"leave {', '.join(modern)} off when fine-tuning, or train from scratch")
    if cfg.grow_from_layers:
        _check_growth(cfg)
    elif cfg.grow_by != "zero":
        raise UserError(f"grow_by={cfg.grow_by} says how a growing run's blocks join, but grow_from_layers=0",
                        "set grow_from_layers and grow_iter too, or leave grow_by unset")
    if cfg.init_from not in ("scratch",) + PRETRAINED and not Path(cfg.init_from).is_dir():
        raise UserError(f"init_from={cfg.init_from!r} is neither 'scratch', a GPT-2 name {PRETRAINED}, nor a local folder",
                        "give one of those or the path of a Hugging Face model folder")
    return cfg


def _check_growth(cfg: Config) -> None:
    """A run that starts with fewer blocks: only from scratch, in one process, growing at a given step."""
    if cfg.grow_from_layers >= cfg.n_layer:
        raise UserError(f"grow_from_layers={cfg.grow_from_layers} is not below n_layer={cfg.n_layer}",
                        f"use 1..{cfg.n_layer - 1} blocks to start with, or 0 to train all from the start")
    if cfg.init_from != "scratch":
        raise UserError(f"grow_from_layers starts a network from scratch, but init_from={cfg.init_from}",
                        "set grow_from_layers=0 when fine-tuning")
    if cfg.parallel != "none":  # idle blocks get no gradient, which DDP's reducer and FSDP refuse
        raise UserError(f"grow_from_layers needs every block in every step under parallel={cfg.parallel}",
                        "set grow_from_layers=0, or parallel=none")
    if cfg.grow_iter < 1:  # at or past max_iters is allowed: a shortened run is the start of the long one
        raise UserError(f"grow_from_layers={cfg.grow_from_layers} needs the step to grow at, but grow_iter={cfg.grow_iter}",
                        "set grow_iter, e.g. --grow_iter=300")


def from_dict(values: dict[str, Any]) -> Config:
    """Build a Config from plain values (JSON, notebook parameters), coercing and checking each."""
    return validate(Config(**{k: coerce(k, v) for k, v in values.items()}))


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn `key=value`, `--key=value` or `--key value` words into typed overrides."""
    out: dict[str, Any] = {}
    words = iter(args)
    for word in words:
        key, eq, value = word.removeprefix("--").partition("=")
        if not eq:  # `--key value`
            value = next(words, None) if word.startswith("--") else None
            if value is None:
                raise UserError(f"cannot read option {word!r}",
                                "write overrides as --field=value, e.g. --max_iters=100")
        key = key.replace("-", "_")
        out[key] = coerce(key, value)
    return out


def resolve(preset: str | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the preset, then overrides; checked as a whole."""
    if preset is not None and preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}", f"use one of: {', '.join(PRESETS)}")
    return from_dict({**PRESETS.get(preset, {}), "preset": preset, **(overrides or {})})


def describe_fields() -> str:
    """`nanorepro train --help-fields`: each field's type, default, allowed values or range, and meaning."""
    types_ = typing.get_type_hints(Config)
    rules = {name: rule for rule, (names, _, _) in RANGES.items() for name in names}
    lines = []
    for f in dataclasses.fields(Config):
        tp = types_[f.name]
        kind = tp.__name__ if isinstance(tp, type) else str(tp)
        allowed = " | ".join(f.metadata["allowed"]) if f.metadata["allowed"] else f"{kind} {rules.get(f.name, '')}"
        lines.append(f"  {f.name}: {allowed.strip()}, default {f.default!r}. {f.metadata['meaning']}")
    return "\n".join(lines)
