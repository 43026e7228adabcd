"""Shared fixtures: the repo, Tiny Shakespeare and GPT-2's BPE files from the package's bundled
copies, prepared data roots. Nothing here reads outside the repository or needs the network.

Every test session runs with $NANOREPRO_CACHE pointed at a temp folder (autouse), so no test reads
or writes the user's ~/.cache/nanorepro, and with $NANOREPRO_INPUT and tiktoken's cache variables
removed so a developer's settings cannot change what a test prepares.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nanorepro.data import dataset


@pytest.fixture(scope="session", autouse=True)
def _isolated_nanorepro_env(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOREPRO_CACHE", str(tmp_path_factory.mktemp("nanorepro_cache")))
        for var in ("NANOREPRO_INPUT", "TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
            mp.delenv(var, raising=False)
        yield


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def shakespeare_path(tmp_path_factory) -> Path:
    """Tiny Shakespeare's input.txt, written (sha256-checked) from the package's bundled copy."""
    return dataset.shakespeare_file(tmp_path_factory.mktemp("tinyshakespeare"))


@pytest.fixture(scope="session")
def tiktoken_offline(tmp_path_factory) -> Path:
    """A TIKTOKEN_CACHE_DIR (set for the rest of the session, so subprocesses use it too) holding
    GPT-2's BPE files, put there from the package's bundled copy."""
    cache = tmp_path_factory.mktemp("tiktoken_cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    assert dataset.install_gpt2_bpe() == cache
    yield cache
    mp.undo()


@pytest.fixture(scope="session")
def char_data_root(tmp_path_factory, shakespeare_path) -> Path:
    """A data root holding shakespeare_char, prepared once from the bundled copy's input.txt."""
    root = tmp_path_factory.mktemp("data_char")
    dataset.prepare(input_path=shakespeare_path, encodings=("char",), data_root=root)
    return root


@pytest.fixture(scope="session")
def gpt2_data_root(tmp_path_factory, shakespeare_path, tiktoken_offline) -> Path:
    """A data root holding shakespeare_gpt2, prepared once from the bundled copy's input.txt."""
    root = tmp_path_factory.mktemp("data_gpt2")
    dataset.prepare(input_path=shakespeare_path, encodings=("gpt2",), data_root=root)
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
