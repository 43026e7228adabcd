"""Shared fixtures: the repo, Tiny Shakespeare and GPT-2's BPE files from the package's bundled
copies, prepared data roots, the loopback node. Nothing here reads outside the repository or needs the network.
The test tiers (the `slow` marker) and the guard that keeps them honest: tests/tiers.py, whose hooks are here.

Every test session runs with $NANOREPRO_CACHE pointed at a temp folder (autouse), so no test reads
or writes the user's ~/.cache/nanorepro, and with $NANOREPRO_INPUT and tiktoken's cache variables
removed so a developer's settings cannot change what a test prepares.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest
import sshd as sshd_helper
from tiers import (  # noqa: F401 (pytest hooks: the slow tier and its guard)
    pytest_collection_modifyitems,
    pytest_configure,
    pytest_fixture_setup,
    pytest_runtest_protocol,
    pytest_runtest_teardown,
)

from nanorepro.data import dataset

NODE_ENV = "NANOREPRO_TEST_NODE"  # exported in the loopback node's sessions: what marks its jobs

# One torch thread per process unless the caller chose: the tests train tiny models, for which a second thread
# gains little and, on a machine whose cores are busy (2 cores, several processes of the suite), costs many
# times over in threads waiting for each other (a whole-val evaluation of `tiny`: 100 s with 2 threads, 6 s
# with one). Set before anything imports torch; subprocesses (nanorepro train, torchrun, kernels) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


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


@pytest.fixture(scope="session")
def loopback_node(tmp_path_factory) -> sshd_helper.Sshd:
    """The loopback "node": one OpenSSH server on 127.0.0.1 for the whole session (tests/sshd.py), whose sessions
    find the node's stand-in tools first on PATH (`.bin_dir`, sshd.standins: nvidia-smi of one A100 on driver
    560, python3 and pip) and one torch thread (OMP_NUM_THREADS=1, as here). A test that changes the stand-ins
    (sshd.standins with other settings) changes them for itself: after each test that used the node,
    _reset_loopback_node writes the defaults back (and empties their logs) and stops any job the test left
    running on it. Its tests are in the slow tier (tiers.SLOW_FIXTURES)."""
    bin_dir = sshd_helper.standins(tmp_path_factory.mktemp("node-bin"))
    base = tmp_path_factory.mktemp("loopback-node")
    try:
        node = sshd_helper.start(base, path_first=bin_dir, env={NODE_ENV: str(base), "OMP_NUM_THREADS": "1"})
    except RuntimeError as e:
        pytest.fail(str(e))
    yield node
    node.stop()


@pytest.fixture(autouse=True)
def _reset_loopback_node(request):
    node = request.getfixturevalue("loopback_node") if "loopback_node" in request.fixturenames else None
    yield
    if node is not None:
        for pid in sshd_helper.jobs_left(node, f"{NODE_ENV}={node.dir}"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        sshd_helper.standins(node.bin_dir)
