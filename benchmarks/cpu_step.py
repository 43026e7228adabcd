"""Per-step CPU time of the GPT at a few shapes: float32 vs bf16 autocast, and AdamW's implementations.

Prints one line per (shape, dtype, optimizer): the fastest and median step (forward, backward,
gradient clipping, AdamW) over --steps steps on random tokens. The fastest step is what contention
from other processes distorts least; report the load average with the numbers.

    OMP_NUM_THREADS=2 python benchmarks/cpu_step.py [--steps 20] [--shapes cpu-recipe,4x256]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import nullcontext

import torch

from nanorepro.config import resolve
from nanorepro.gpt.model import GPT

# name -> (n_layer, n_embd, block_size, batch_size); n_head = n_layer's usual match below
SHAPES = {
    "cpu-recipe": (4, 128, 64, 12),  # nanoGPT's README CPU command line
    "4x128-b128": (4, 128, 128, 16),
    "4x256-b256": (4, 256, 256, 8),
    "6x256-b256": (6, 256, 256, 8),
    "6x384-b256": (6, 384, 256, 8),  # the baby GPT's shape at batch 8
}


def step_times(shape: tuple[int, int, int, int], dtype: str, optimizer: str, steps: int) -> list[float]:
    n_layer, n_embd, block, batch = shape
    cfg = resolve(None, dict(n_layer=n_layer, n_head=max(1, n_embd // 64), n_embd=n_embd, block_size=block,
                             batch_size=batch, vocab_size=65, dropout=0.0))
    torch.manual_seed(0)
    model = GPT(cfg.model_config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **({"fused": True} if optimizer == "fused" else
                                                           {"foreach": False}))
    ctx = nullcontext() if dtype == "float32" else torch.autocast("cpu", dtype=torch.bfloat16)
    x = torch.randint(65, (batch, block))
    times = []
    for i in range(steps + 2):  # two warm-up steps
        t = time.perf_counter()
        with ctx:
            _, loss = model(x, x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads (OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}), load average {os.getloadavg()[0]:.2f}")
    for name in args.shapes.split(","):
        base = None
        for dtype in ("float32", "bfloat16"):
            for optimizer in ("for-loop", "fused"):
                t = step_times(SHAPES[name], dtype, optimizer, args.steps)
                best, med = min(t) * 1e3, statistics.median(t) * 1e3
                base = base or best
                print(f"{name:12s} {dtype:9s} AdamW {optimizer:8s} fastest {best:7.1f} ms  median {med:7.1f} ms"
                      f"  ({base / best:.2f}x the float32 for-loop step)", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
