"""Text from a trained run folder or a pretrained GPT-2 (nanoGPT's `sample.py` as a function)."""

from __future__ import annotations

from pathlib import Path

import torch

from nanorepro.data import dataset
from nanorepro.errors import UserError
from nanorepro.gpt import checkpoint, hardware
from nanorepro.gpt.pretrained import load_pretrained


def sample(run_dir: str | Path | None = None, model: str | None = None, prompt: str = "\n",
           num_samples: int = 1, max_new_tokens: int = 500, temperature: float = 0.8, top_k: int | None = 200,
           seed: int = 1337, device: str = "auto", data_root: str | None = None, dtype: str = "auto") -> list[str]:
    """`num_samples` continuations of `prompt` (the prompt included), decoded to text. On a GPU the
    forward passes run under autocast (bf16, or fp16 where bf16 is emulated) as in training."""
    if num_samples < 1 or max_new_tokens < 1:
        raise UserError("num_samples and max_new_tokens must be >= 1", "use e.g. --num-samples 1 --max-new-tokens 200")
    if temperature <= 0:  # before anything is loaded
        raise UserError(f"temperature must be > 0, got {temperature}", "use e.g. --temperature 0.8")
    if top_k is not None and top_k < 1:
        top_k = None
    if dtype != "auto" and dtype not in hardware.DTYPES:
        raise UserError(f"unknown dtype={dtype!r} for sampling", f"use auto, {', '.join(hardware.DTYPES)}")
    dev = hardware.resolve_device(device, hardware.gpu_required_by(None))
    hardware.use_device(dev)
    autocast = hardware.StepContext(torch.device(dev).type, hardware.resolve_dtype(dev, dtype))  # float32: none
    if run_dir is not None:
        net, cfg = checkpoint.load_model(Path(run_dir))
        codec = dataset.Codec.from_meta(dataset.load_meta(Path(data_root or cfg.data_root) / cfg.dataset))
    elif model is not None:
        net, _ = load_pretrained(model)
        codec = dataset.Codec.from_meta({"encoding": "gpt2", "vocab_size": dataset.GPT2_VOCAB_SIZE})
    else:
        raise UserError("nothing to sample from", "give a run folder (--run) or a model name (--model)")
    net.eval().to(dev)
    ids = codec.encode(prompt)
    if not ids:
        raise UserError("the prompt encodes to no tokens", "give a non-empty prompt")
    gen = torch.Generator(device=dev).manual_seed(seed)
    x = torch.tensor([ids], dtype=torch.long, device=dev)
    with autocast:  # the model's vocabulary may be padded past the codec's: those ids are never drawn
        return [codec.decode(net.generate(x, max_new_tokens, temperature, top_k, generator=gen,
                                          vocab_size=codec.vocab_size)[0].tolist()) for _ in range(num_samples)]
