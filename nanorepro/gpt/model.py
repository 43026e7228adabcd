"""The GPT-2 network as nanoGPT builds it, in one file: attention, MLP, blocks, the model and generation.

Module and parameter names follow GPT-2's (transformer.h.N.attn.c_attn, ...) so Hugging Face
weights map one to one (see pretrained.py) and checkpoints read the same as nanoGPT's.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
from torch.nn import functional as F

from nanorepro.config import GPTConfig
from nanorepro.errors import UserError


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

