"""The optimizers a run can use: nanoGPT's AdamW, or Muon on the blocks' matrices with AdamW on the rest.

AdamW comes from torch.optim. Muon is torch.optim.Muon (momentum, then the update orthogonalised by a
Newton-Schulz iteration) with one change: torch always orthogonalises in bfloat16, which a CPU without
native bf16 (no AVX512_BF16 or AMX, e.g. AVX2-only x86 machines) only emulates, many times slower than
float32. Here the iteration runs in bf16 where the hardware has it and in float32 elsewhere.
Muon only takes 2-D parameters, so "muon" pairs it with AdamW for the embeddings, LayerNorm gains and
biases. Its updates are rescaled to AdamW's RMS (adjust_lr_fn="match_rms_adamw"), so one learning_rate
and one schedule serve both; benchmarks/tuning-log.md has how it compares with AdamW on Tiny Shakespeare.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch

from nanorepro.gpt import hardware


def _adamw(groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], device_type: str) -> torch.optim.AdamW:
    # The fused kernel does the whole update in one pass: one launch on CUDA, and on a CPU one sweep
    # over memory instead of ~10 (3.2M parameters: 1.7 ms instead of 25 ms a step here, see bench.py).
    fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def native_bf16(device_type: str) -> bool:
    """Does this device compute bf16 matmuls natively? GPUs from Ampere on; CPUs where oneDNN has bf16
    kernels (AVX512-BF16, AMX). Elsewhere bf16 is emulated, and slower than float32."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
    return device_type == "cpu" and hardware.cpu_has_native_bf16()


def orthogonalise(g: torch.Tensor, steps: int, coefficients: tuple[float, float, float], eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration (as torch.optim.Muon computes it), in `dtype`: an
    approximately orthogonal matrix with g's singular vectors."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= 1
    if dtype == torch.float32 and x.size(1) > 1.5 * x.size(0):
        x = _orthogonalise_in_gram_space(x, steps, coefficients)
    else:
        for _ in range(steps):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def _orthogonalise_in_gram_space(x: torch.Tensor, steps: int, coefficients: tuple[float, float, float]) -> torch.Tensor:
    """The same iteration for a wide x (m x n, n > 1.5 m), with every product but two m x m.

    Each step multiplies x on the left by p(G) = a + b G + c G^2, G = x x^T, so after k steps x_k = q_k x_0
    with q_k a polynomial in G_0; and G_{k+1} = p(G_k) G_k p(G_k)^T = p(G_k)^2 G_k, as polynomials in G_0
    commute. So q and G can be iterated as m x m matrices and x formed once at the end: 2 m^2 n + (4 steps - 3)
    m^3 multiply-adds instead of steps (2 m^2 n + m^3), 34-44% fewer for a block's c_attn and MLP matrices.
    It squares x's condition number, which float32 holds for this purpose; bf16 keeps torch's iteration."""
    a, b, c = coefficients
    gram = x @ x.T
    q: torch.Tensor | None = None
    for k in range(steps):
        p = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        p.diagonal().add_(a)
        q = p if q is None else p @ q
        if k < steps - 1:
            gram = p @ (p @ gram)
    return x if q is None else q @ x


class Muon(torch.optim.Muon):
    """torch.optim.Muon whose orthogonalisation runs in `ns_dtype`. With bfloat16 its steps equal
    torch's bit for bit (tested); state dicts are interchangeable with torch's."""

    def __init__(self, params: Any, ns_dtype: torch.dtype = torch.bfloat16, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            bufs: list[torch.Tensor] = []
            self._init_group(group, params, grads, bufs)
            lr, wd, momentum = float(group["lr"]), group["weight_decay"], group["momentum"]
            for p, grad, buf in zip(params, grads, bufs):
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = orthogonalise(update, group["ns_steps"], group["ns_coefficients"], group["eps"], self.ns_dtype)
                rows, cols = p.shape
                if group["adjust_lr_fn"] == "match_rms_adamw":
                    scale = 0.2 * math.sqrt(max(rows, cols))
                else:  # torch's "original"
                    scale = math.sqrt(max(1, rows / cols))
                p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr * scale)
        return loss


class Chain:
    """Several optimizers stepped as one: what train.py needs of an optimizer (param_groups to set the
    learning rate on, step, zero_grad, state_dict / load_state_dict for checkpoints)."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"chain": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        parts = state.get("chain")
        if parts is None or len(parts) != len(self.optimizers):
            raise ValueError("this checkpoint's optimizer state is not from the same optimizer")
        for o, s in zip(self.optimizers, parts):
            o.load_state_dict(s)


def kind_of(state: dict[str, Any]) -> str:
    """Which optimizer wrote this state dict (a checkpoint's "optimizer"): "muon" (a Chain's) or "adamw"."""
    return "muon" if "chain" in state else "adamw"


def build(model: torch.nn.Module, kind: str, weight_decay: float, learning_rate: float,
          betas: tuple[float, float], device_type: str) -> torch.optim.Optimizer | Chain:
    """The optimizer for `model` (a GPT): weight decay on matrices and embeddings, none on biases and gains."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = [p for _, p in named if p.dim() < 2]
    if kind == "adamw":
        decay = [p for _, p in named if p.dim() >= 2]
        return _adamw([{"params": decay, "weight_decay": weight_decay},
                       {"params": no_decay, "weight_decay": 0.0}], learning_rate, betas, device_type)
    if kind != "muon":
        raise ValueError(f"unknown optimizer {kind!r}")
    # the blocks' matrices; embeddings (wte is tied to lm_head) are lookups, not linear maps, and stay with AdamW
    matrices = [p for n, p in named if p.dim() == 2 and ".h." in f".{n}"]
    embeddings = [p for n, p in named if p.dim() >= 2 and ".h." not in f".{n}"]
    ns_dtype = torch.bfloat16 if native_bf16(device_type) else torch.float32
    muon = Muon(matrices, ns_dtype=ns_dtype, lr=learning_rate, weight_decay=weight_decay, momentum=0.95,
                adjust_lr_fn="match_rms_adamw")
    adamw = _adamw([{"params": embeddings, "weight_decay": weight_decay},
                    {"params": no_decay, "weight_decay": 0.0}], learning_rate, betas, device_type)
    return Chain(muon, adamw)
