"""The optimizers a run can use: nanoGPT's AdamW, or Muon on the blocks' matrices with AdamW on the rest.

Both come from torch.optim. Muon (torch.optim.Muon: momentum, then the update orthogonalised by a
Newton-Schulz iteration) only takes 2-D parameters, so "muon" pairs it with AdamW for the embeddings,
LayerNorm gains and biases. Its updates are rescaled to AdamW's RMS (adjust_lr_fn="match_rms_adamw"),
so one learning_rate and one schedule serve both. On Tiny Shakespeare it learns much faster per step
(benchmarks/tuning-log.md: 2x192 after 1000 steps, val 1.73 against AdamW's 1.86; 4x256 at context
256 after 500 steps, 1.85 against 2.16), for ~15% more CPU time a step.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch


def _adamw(groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], device_type: str) -> torch.optim.AdamW:
    # The fused kernel does the whole update in one pass: one launch on CUDA, and on a CPU one sweep
    # over memory instead of ~10 (3.2M parameters: 1.7 ms instead of 25 ms a step here, see bench.py).
    fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


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
    muon = torch.optim.Muon(matrices, lr=learning_rate, weight_decay=weight_decay, momentum=0.95,
                            adjust_lr_fn="match_rms_adamw")
    adamw = _adamw([{"params": embeddings, "weight_decay": weight_decay},
                    {"params": no_decay, "weight_decay": 0.0}], learning_rate, betas, device_type)
    return Chain(muon, adamw)
