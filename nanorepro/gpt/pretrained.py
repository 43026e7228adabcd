"""OpenAI's GPT-2 weights (or a local Hugging Face GPT-2 folder) loaded into our GPT, through transformers.

Finds out before loading whether a model is cached or downloadable here, so an offline machine gets one
clear message at once instead of huggingface_hub's retries.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import threading
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import torch

from nanorepro.config import GPT2_SIZES, PRETRAINED, GPTConfig
from nanorepro.errors import ModelUnavailable, UserError
from nanorepro.gpt.model import GPT

OFFLINE_FIX = "connect to the internet once, or pass a local Hugging Face folder (init_from=PATH or --model PATH)"

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
