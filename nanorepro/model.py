"""The GPT-2 network as nanoGPT builds it, in one file: model, pretrained loading, generation.

Module and parameter names follow GPT-2's (transformer.h.N.attn.c_attn, ...) so Hugging Face
weights map one to one and checkpoints read the same as nanoGPT's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import threading
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn import functional as F

from .config import GPT2_SIZES, PRETRAINED, GPTConfig
from .errors import ModelUnavailable, UserError

OFFLINE_FIX = "connect to the internet once, or pass a local Hugging Face folder (init_from=PATH or --model PATH)"


class Rotary(nn.Module):
    """Rotary position embeddings (Su et al. 2021), `rope=True`: each pair of a head's channels is turned
    by an angle that grows with the position, so q.k depends on how far apart two tokens are."""

    def __init__(self, head_size: int, block_size: int, base: float = 10000.0):
        super().__init__()
        freqs = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
        angles = torch.outer(torch.arange(block_size, dtype=torch.float32), freqs)  # (T, head_size / 2)
        # recomputed, not saved: checkpoints stay the same for any block_size
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.size(-2)
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and earlier positions."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qk_norm = cfg.qk_norm
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.rotary = Rotary(cfg.n_embd // cfg.n_head, cfg.block_size) if cfg.rope else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_head, T, head_size): heads attend independently
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm:  # unit-RMS queries and keys bound the logits, which allows higher learning rates
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class ReLUSquared(nn.Module):
    """relu(x)^2 (So et al. 2021, "Primer"), `relu_squared=True`: learns faster than GELU in small GPTs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class MLP(nn.Module):
    """Position-wise feed-forward: widen 4x, GELU (tanh form, as GPT-2 was trained), project back."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = ReLUSquared() if cfg.relu_squared else nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2: token + learned position embeddings, n_layer blocks, final LayerNorm, tied output head."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise UserError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}",
                            "pick n_embd a multiple of n_head")
        self.config = cfg  # frozen: crop_block_size replaces it
        self.active_layers = cfg.n_layer  # the blocks forward runs: a run may start shallower (start_shallow)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            **({} if cfg.rope else {"wpe": nn.Embedding(cfg.block_size, cfg.n_embd)}),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # Weight tying (Press & Wolf 2017): one matrix embeds tokens and scores them, as in GPT-2.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2 scales the projections that write into the residual stream, so its variance
        # does not grow with depth: two such writes per block.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def start_shallow(self, n_blocks: int) -> None:
        """Zero the output projections of the blocks after the first `n_blocks`: each then adds nothing to
        the residual stream, so the network computes the same whether they run or not, and forward skips
        them until `active_layers` is raised. They receive no gradient while skipped, so they stay neutral
        until they join (zero output projections, as modded-nanogpt initialises every block)."""
        for block in self.transformer.h[n_blocks:]:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                nn.init.zeros_(proj.weight)
                if proj.bias is not None:
                    nn.init.zeros_(proj.bias)
        self.active_layers = n_blocks

    def stack(self, n_blocks: int) -> None:
        """Make block i a copy of block i % n_blocks for every i from n_blocks on (growth by stacking,
        Gong et al. 2019): the later blocks join as copies of the trained ones instead of neutral ones."""
        blocks = self.transformer.h
        with torch.no_grad():
            for i in range(n_blocks, len(blocks)):
                for mine, theirs in zip(blocks[i].parameters(), blocks[i % n_blocks].parameters()):
                    mine.copy_(theirs)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; like nanoGPT, position embeddings are left out by default (token embeddings
        stay in: they are the output head's weights too)."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields the tied matrix once
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def forward(self, idx: torch.Tensor,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits, loss). With targets: logits (B, T, vocab) and the mean
        cross-entropy (targets of -1 ignored); without: the last position's logits (B, 1, vocab), None."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise UserError(f"a sequence of {T} tokens is longer than the model's block_size={self.config.block_size}",
                            f"feed at most the last {self.config.block_size} tokens")
        x = self.transformer.wte(idx)
        if "wpe" in self.transformer:  # with rope, positions enter in attention instead
            x = x + self.transformer.wpe(torch.arange(T, dtype=torch.long, device=idx.device))
        x = self.transformer.drop(x)
        for block in self.transformer.h[: self.active_layers]:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def crop_block_size(self, block_size: int) -> None:
        """Use a shorter context than the model was built with (e.g. 1024 for GPT-2) by dropping position rows."""
        if block_size > self.config.block_size:
            raise UserError(f"block_size={block_size} is larger than this model's context of {self.config.block_size}",
                            f"use block_size <= {self.config.block_size}")
        self.config = dataclasses.replace(self.config, block_size=block_size)
        if "wpe" not in self.transformer:
            return
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size].detach().clone())

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, vocab_size: int | None = None) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx (B, T), the context cropped to block_size. Call
        model.eval() first; pass a seeded torch.Generator on idx's device for reproducible samples.
        `vocab_size`: the tokenizer's, when the model's is padded (50304 for 50257): ids from it on are
        never drawn."""
        if temperature <= 0:
            raise UserError(f"temperature must be > 0, got {temperature}",
                            "use e.g. temperature=0.8, or top_k=1 for greedy decoding")
        if top_k is not None and top_k < 1:
            raise UserError(f"top_k must be >= 1, got {top_k}", "use e.g. top_k=200, or leave it unset")
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:])
            logits = logits[:, -1, :vocab_size].float() / temperature  # fp32 softmax under autocast
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            next_id = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, next_id), dim=1)
        return idx


# ---------------------------------------------------------------------------------------------
# Pretrained GPT-2 through Hugging Face transformers

# HF's GPT-2 uses Conv1D, which stores weights as (in, out); nn.Linear wants (out, in).
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _offline() -> bool:
    """HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE, read now (huggingface_hub reads them once, at import)."""
    from huggingface_hub import constants

    env = (os.environ.get(k, "").strip().upper() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(v in {"1", "ON", "YES", "TRUE"} for v in env) or bool(constants.HF_HUB_OFFLINE)


def _reachable(url: str, timeout: float = 5.0) -> bool:
    """Can a TCP connection to url's host be opened within timeout (DNS included, hence the thread)?
    huggingface_hub would retry a refused connection for tens of seconds."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(ok)


def _check_hf_config(hf: dict[str, Any], where: str) -> None:
    """Refuse GPT-2 variants our network does not compute the same way."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{where} holds a {hf.get('model_type')!r} model, not GPT-2",
                        "pass a GPT-2 Hugging Face folder")
    n_embd = hf.get("n_embd", 768)
    checks = [
        ("activation_function", hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
         "gelu_new"),
        ("n_inner", hf.get("n_inner") in (None, 4 * n_embd), f"None or {4 * n_embd}"),
        ("layer_norm_epsilon", abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) < 1e-12, "1e-05"),
        ("scale_attn_weights", hf.get("scale_attn_weights", True) is True, "true"),
        ("scale_attn_by_inverse_layer_idx", hf.get("scale_attn_by_inverse_layer_idx", False) is False,
         "false"),
        ("tie_word_embeddings", hf.get("tie_word_embeddings", True) is True, "true"),
        ("add_cross_attention", hf.get("add_cross_attention", False) is False, "false"),
    ]
    for field, ok, want in checks:
        if not ok:
            raise UserError(f"{where} sets {field}={hf.get(field)!r}, which this GPT does not implement",
                            f"use a GPT-2 model with {field}={want}")


def _load_hf(name_or_path: str) -> tuple[Any, GPTConfig]:
    """The Hugging Face GPT2LMHeadModel (fp32) and its shape; never waits long for a network that is not there."""
    from transformers import GPT2LMHeadModel

    kwargs = dict(dtype=torch.float32)
    if name_or_path not in GPT2_SIZES:  # a local folder
        folder = Path(name_or_path).resolve()
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            raise UserError(f"{folder} has no config.json, so it is not a Hugging Face model folder",
                            "pass a folder written by save_pretrained, or one of " + ", ".join(PRETRAINED))
        _check_hf_config(json.loads(cfg_file.read_text()), str(folder))
        try:
            hf = GPT2LMHeadModel.from_pretrained(str(folder), local_files_only=True, **kwargs)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load a GPT-2 from {folder}: {str(e).splitlines()[0]}",
                            "pass a folder written by GPT2LMHeadModel.save_pretrained (config.json + weights)") from e
        return hf, _shape_of(hf)

    name = name_or_path
    from huggingface_hub import constants

    def checked(hf: Any) -> tuple[Any, GPTConfig]:
        # transformers prefers a folder of the same name in the working directory over the hub
        if _shape_of(hf) != GPT2_SIZES[name]:
            raise UserError(f"{name} loaded with shape {_shape_of(hf)}, not GPT-2's {GPT2_SIZES[name]}",
                            f"rename the local folder ./{name}, or pass its path to use it")
        return hf, GPT2_SIZES[name]

    # The cache first: no network at all when the weights are already here.
    for repo in (name, f"openai-community/{name}"):
        try:
            return checked(GPT2LMHeadModel.from_pretrained(repo, local_files_only=True, **kwargs))
        except OSError:
            pass
    require_download_possible(name)
    try:
        import httpx

        net_errors: tuple[type[BaseException], ...] = (OSError, httpx.HTTPError)
    except ImportError:
        net_errors = (OSError,)
    try:
        hf = GPT2LMHeadModel.from_pretrained(name, **kwargs)
    except net_errors as e:
        raise ModelUnavailable(f"{name} is not available offline: not in the Hugging Face cache "
                               f"({constants.HF_HUB_CACHE}) and the download failed ({str(e).splitlines()[0]})",
                               OFFLINE_FIX) from e
    return checked(hf)


def _shape_of(hf: Any) -> GPTConfig:
    c = hf.config
    return GPTConfig(c.n_layer, c.n_head, c.n_embd, block_size=c.n_positions, vocab_size=c.vocab_size, bias=True)


def require_download_possible(name: str) -> None:
    """ModelUnavailable, at once, when `name` is not cached and the hub is off or out of reach."""
    from huggingface_hub import constants

    where = f"not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if _offline():
        raise ModelUnavailable(f"{name} is not available offline: {where} and HF_HUB_OFFLINE is set", OFFLINE_FIX)
    # behind a proxy a direct probe says nothing: let huggingface_hub try
    if not urllib.request.getproxies().keys() & {"https", "http", "all"} and not _reachable(constants.ENDPOINT):
        raise ModelUnavailable(f"{name} is not available offline: {where} and {constants.ENDPOINT} cannot be reached",
                               OFFLINE_FIX)


def require_pretrained(name_or_path: str) -> None:
    """ModelUnavailable when OpenAI's `name_or_path` is neither cached nor downloadable here, found
    without loading anything (the same places, in the same order, as load_pretrained looks in)."""
    from huggingface_hub import try_to_load_from_cache

    if Path(name_or_path).is_dir() or any(isinstance(try_to_load_from_cache(repo, "config.json"), str)
                                          for repo in (name_or_path, f"openai-community/{name_or_path}")):
        return
    require_download_possible(name_or_path)


def load_pretrained(name_or_path: str, dropout: float = 0.0) -> tuple[GPT, GPTConfig]:
    """A GPT with OpenAI's GPT-2 weights ("gpt2" ... "gpt2-xl") or a local Hugging Face GPT-2 folder:
    the model (fp32, train mode, its full context) and its config."""
    name_or_path = str(name_or_path)
    if name_or_path not in GPT2_SIZES and not Path(name_or_path).is_dir():
        raise UserError(f"unknown pretrained model {name_or_path!r}: neither a GPT-2 name nor an existing folder",
                        f"use one of {', '.join(PRETRAINED)}, or the path of a local Hugging Face GPT-2 folder")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"dropout must be in [0, 1), got {dropout}", "use e.g. dropout=0.0 for fine-tuning")
    hf, shape = _load_hf(name_or_path)
    shape = dataclasses.replace(shape, dropout=float(dropout))

    state = hf.state_dict()
    del hf  # from here the only references to the weights are in `state`, released one by one below
    # Built on the meta device: no memory and no random init for weights about to be replaced.
    with torch.device("meta"):
        model = GPT(shape)
    ours = set(model.state_dict())
    converted: dict[str, torch.Tensor] = {}
    for key in list(state):
        tensor = state.pop(key)
        # causal-mask buffers of older transformers; the head is tied to wte (checked above), set below
        if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
            continue
        if key not in ours:
            raise UserError(f"unexpected weight {key!r} in {name_or_path}",
                            "pass a plain GPT-2 (GPT2LMHeadModel) checkpoint")
        if key.endswith(_CONV1D):
            tensor = tensor.t()
        # Always a copy in ordinary memory: HF's tensors may be views of the memory-mapped weights
        # file, which stays mapped (and resident) as long as any of them is alive.
        converted[key] = tensor.to(dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)
        del tensor
    converted["lm_head.weight"] = converted["transformer.wte.weight"]
    missing = ours - set(converted)
    if missing:
        raise UserError(f"{name_or_path} lacks weights {sorted(missing)[:3]}", "pass a complete GPT-2 checkpoint")
    model.load_state_dict(converted, strict=True, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign=True replaced both; tie them again
    return model, shape
