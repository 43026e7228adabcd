"""nanorepro.data.dataset: exact token counts, the bundled copies (no network), the verified download, bad input,
atomic writes, batches."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from nanorepro.data import dataset
from nanorepro.errors import UserError
from nanorepro.gpt.batches import Batches


def _read_bin(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint16)


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# ---------------------------------------------------------------------------- Tiny Shakespeare, exact counts

def test_char_counts_and_roundtrip(char_data_root, shakespeare_path):
    text = shakespeare_path.read_text(encoding="utf-8")
    folder = char_data_root / "shakespeare_char"
    meta = dataset.load_meta(folder)
    assert (meta["name"], meta["encoding"], meta["dtype"]) == ("shakespeare", "char", "uint16")
    assert meta["vocab_size"] == 65 and len(meta["itos"]) == 65
    assert (meta["train_tokens"], meta["val_tokens"]) == (1_003_854, 111_540)
    assert meta["source_sha256"] == dataset.SHAKESPEARE_SHA256
    assert meta["source"] == str(shakespeare_path.resolve())
    assert sorted(os.listdir(folder)) == ["meta.json", "train.bin", "val.bin"]  # no temp files left
    train, val = _read_bin(folder / "train.bin"), _read_bin(folder / "val.bin")
    assert (len(train), len(val)) == (1_003_854, 111_540)
    assert int(max(train.max(), val.max())) == 64
    codec = dataset.Codec.from_meta(meta)
    assert codec.vocab_size == 65
    assert codec.decode(train) + codec.decode(val) == text
    assert codec.decode(val).startswith(text[1_003_854:1_003_900])
    assert codec.encode(text[:100]) == train[:100].tolist()
    assert dataset.summary(meta) == (f"shakespeare_char: char, vocab 65, train 1,003,854 tokens, "
                                  f"val 111,540 tokens -> {folder}")
    with pytest.raises(UserError, match="not in the dataset's vocabulary"):
        codec.encode("café")


def test_gpt2_counts_and_roundtrip(gpt2_data_root, shakespeare_path):
    text = shakespeare_path.read_text(encoding="utf-8")
    folder = gpt2_data_root / "shakespeare_gpt2"
    meta = dataset.load_meta(folder)
    assert (meta["encoding"], meta["vocab_size"], meta["dtype"]) == ("gpt2", 50257, "uint16")
    assert "itos" not in meta
    assert (meta["train_tokens"], meta["val_tokens"]) == (301_966, 36_059)
    train, val = _read_bin(folder / "train.bin"), _read_bin(folder / "val.bin")
    assert (len(train), len(val)) == (301_966, 36_059)
    codec = dataset.Codec.from_meta(meta)
    # split by characters first, then each part encoded: each part decodes back to its own text
    assert codec.decode(train) == text[:1_003_854]
    assert codec.decode(val) == text[1_003_854:]
    assert codec.encode("<|endoftext|>") == [50256]
    assert dataset.summary(meta).startswith("shakespeare_gpt2: gpt2, vocab 50,257, train 301,966 tokens, val 36,059")


# ---------------------------------------------------------------------------- the bundled copies, offline

# Run in a fresh process (tiktoken keeps a loaded encoding for the process's life) with every socket
# connection refused, so success means nothing needed the network.
_NO_NETWORK = """
import socket, sys
def refuse(self, address):
    print(f"connection attempted: {address}", file=sys.stderr)
    raise OSError(f"no network in this test ({address})")
socket.socket.connect = socket.socket.connect_ex = refuse
from nanorepro.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _no_network_env(tmp_path: Path, repo_root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")}
    return {**env, "PYTHONPATH": str(repo_root), "NANOREPRO_CACHE": str(tmp_path / "cache")}


@pytest.mark.slow  # by measurement: a nanorepro process of its own: ~3 s
def test_prepare_without_input_uses_the_bundled_copies_and_no_network(tmp_path, repo_root):
    r = subprocess.run([sys.executable, "-c", _NO_NETWORK, "prepare", "--encoding", "all"], cwd=tmp_path,
                       env=_no_network_env(tmp_path, repo_root), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "connection attempted" not in r.stderr
    assert r.stdout.splitlines() == [
        "shakespeare_char: char, vocab 65, train 1,003,854 tokens, val 111,540 tokens -> data/shakespeare_char",
        "shakespeare_gpt2: gpt2, vocab 50,257, train 301,966 tokens, val 36,059 tokens -> data/shakespeare_gpt2"]
    for enc in ("char", "gpt2"):
        meta = dataset.load_meta(tmp_path / "data" / f"shakespeare_{enc}")
        assert (meta["source"], meta["source_sha256"]) == (dataset.BUNDLED_SOURCE, dataset.SHAKESPEARE_SHA256)
    # tiktoken read GPT-2's files from nanorepro's cache, named as tiktoken names its downloads
    names = sorted(hashlib.sha1(url.encode()).hexdigest() for url, _ in dataset.GPT2_BPE_FILES.values())
    assert _entries(tmp_path / "cache" / "tiktoken") == names
    # the same again: reused, nothing read
    r = subprocess.run([sys.executable, "-c", _NO_NETWORK, "prepare"], cwd=tmp_path,
                       env=_no_network_env(tmp_path, repo_root), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.count("reusing data/shakespeare_") == 2, r.stdout + r.stderr


def test_bundled_gpt2_files_are_the_ones_tiktoken_checks(monkeypatch):
    from tiktoken_ext import openai_public

    seen: dict[str, str] = {}
    monkeypatch.setattr(openai_public, "data_gym_to_mergeable_bpe_ranks", lambda **kw: seen.update(kw) or {})
    openai_public.gpt2()  # tiktoken's own recipe for "gpt2": the URLs and sha256s it reads and checks
    assert sorted(dataset.GPT2_BPE_FILES.values()) == sorted([(seen["vocab_bpe_file"], seen["vocab_bpe_hash"]),
                                                           (seen["encoder_json_file"], seen["encoder_json_hash"])])
    for name, (_, sha256) in dataset.GPT2_BPE_FILES.items():
        assert hashlib.sha256(dataset.bundled(name, sha256)).hexdigest() == sha256


def test_bundled_copy_is_checked_and_the_cache_repaired(tmp_path, monkeypatch):
    text = dataset.shakespeare_text()
    assert len(text) == 1_115_394 and text.startswith("First Citizen:\n")
    with pytest.raises(UserError, match="does not match sha256") as err:
        dataset.bundled(dataset.SHAKESPEARE_BUNDLED, "0" * 64)
    assert "reinstall" in err.value.fix
    path = dataset.shakespeare_file(tmp_path)
    assert path == tmp_path / "tinyshakespeare" / "input.txt" and path.read_text(encoding="utf-8") == text
    path.write_bytes(path.read_bytes()[:-1])  # a changed copy is written again
    assert dataset.shakespeare_file(tmp_path).read_text(encoding="utf-8") == text

    # tiktoken's files: in the user's TIKTOKEN_CACHE_DIR when set, a damaged one replaced
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tk"))
    assert dataset.install_gpt2_bpe() == tmp_path / "tk"
    vocab_url, vocab_sha = dataset.GPT2_BPE_FILES["gpt2-vocab.bpe.gz"]
    vocab = tmp_path / "tk" / hashlib.sha1(vocab_url.encode()).hexdigest()
    vocab.write_bytes(b"not the vocabulary")
    dataset.install_gpt2_bpe()
    assert hashlib.sha256(vocab.read_bytes()).hexdigest() == vocab_sha
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # the user turned tiktoken's cache off: left alone
    assert dataset.install_gpt2_bpe() is None


def test_input_and_url_together_are_refused(tmp_path, shakespeare_path):
    with pytest.raises(UserError, match="both an input file and a URL") as err:
        dataset.prepare(input_path=shakespeare_path, url="http://127.0.0.1:9/input.txt", data_root=tmp_path)
    assert "--input" in err.value.fix and not (tmp_path / "shakespeare_char").exists()


def test_rerun_reuses_and_new_source_rewrites(tmp_path, capsys):
    src = tmp_path / "a.txt"
    src.write_text("abcdefghij" * 20, encoding="utf-8")
    root = tmp_path / "data"
    (first,) = dataset.prepare(input_path=src, name="toy", encodings=("char",), data_root=root)
    mtime = (root / "toy_char" / "train.bin").stat().st_mtime_ns
    capsys.readouterr()
    time.sleep(0.01)
    (again,) = dataset.prepare(input_path=src, name="toy", encodings=("char",), data_root=root)
    assert "reusing" in capsys.readouterr().out
    assert again["created"] == first["created"]
    assert (root / "toy_char" / "train.bin").stat().st_mtime_ns == mtime

    src.write_text("zyxwvutsrq" * 30, encoding="utf-8")  # same path, new content: must not be reused
    (third,) = dataset.prepare(input_path=src, name="toy", encodings=("char",), data_root=root)
    assert "reusing" not in capsys.readouterr().out
    assert third["itos"] == sorted("zyxwvutsrq") and third["train_tokens"] == 270
    assert dataset.load_meta(root / "toy_char")["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()

    (root / "toy_char" / "val.bin").write_bytes(b"\0\0")  # damaged bins are not reused either
    dataset.prepare(input_path=src, name="toy", encodings=("char",), data_root=root)
    assert "reusing" not in capsys.readouterr().out
    assert len(_read_bin(root / "toy_char" / "val.bin")) == 30


def test_failed_write_leaves_folder_incomplete(tmp_path, monkeypatch):
    src = tmp_path / "a.txt"
    src.write_text("hello world, " * 20, encoding="utf-8")
    root = tmp_path / "data"
    dataset.prepare(input_path=src, name="toy", encodings=("char",), data_root=root)
    src.write_text("another text! " * 20, encoding="utf-8")
    real_replace = os.replace

    def failing_replace(a, b):
        if Path(b).name == "meta.json":
            raise OSError(28, "No space left on device")
        real_replace(a, b)

    monkeypatch.setattr(dataset.os, "replace", failing_replace)
    with pytest.raises(UserError, match="No space left"):
        dataset.prepare(input_path=src, name="toy", encodings=("char",), data_root=root)
    # the old meta.json is gone, so the half-rewritten folder cannot pass as complete
    assert _entries(root / "toy_char") == ["train.bin", "val.bin"]
    with pytest.raises(UserError, match="nanorepro prepare"):
        dataset.load_meta(root / "toy_char")
    monkeypatch.setattr(dataset.os, "replace", real_replace)
    (meta,) = dataset.prepare(input_path=src, name="toy", encodings=("char",), data_root=root)
    assert dataset.load_meta(root / "toy_char")["itos"] == meta["itos"] == sorted(set("another text! "))


# ---------------------------------------------------------------------------- the download

class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        srv = self.server
        srv.requests.append(self.path)
        body = srv.body
        if self.path != "/input.txt":
            self.send_error(404)
            return
        if srv.mode == "tampered":
            body = body[:1000] + bytes([body[1000] ^ 1]) + body[1001:]
        if srv.mode == "slow":
            time.sleep(3)
        self.send_response(200)
        if srv.mode != "no-length":
            self.send_header("Content-Length", str(len(srv.body)))
        self.end_headers()
        if srv.mode in ("truncated", "no-length"):
            body = body[: len(body) // 2]  # then the connection closes early
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args):
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # the "slow" client hangs up first; the broken pipe is expected


@pytest.fixture
def server(shakespeare_path):
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.body, srv.mode, srv.requests = shakespeare_path.read_bytes(), "ok", []
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/input.txt"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_download_verifies_and_reuses_cache(server, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    path = dataset.fetch_shakespeare(cache_dir=cache, url=server.url)
    assert path.parent.parent == cache
    assert hashlib.sha256(path.read_bytes()).hexdigest() == dataset.SHAKESPEARE_SHA256
    assert server.requests == ["/input.txt"]
    assert "download input.txt" in capsys.readouterr().err  # the tqdm bar
    assert dataset.fetch_shakespeare(cache_dir=cache, url=server.url) == path
    assert len(server.requests) == 1  # served from the cache

    # through prepare, with the cache from $NANOREPRO_CACHE: still no request
    monkeypatch.setenv("NANOREPRO_CACHE", str(cache))
    (meta,) = dataset.prepare(encodings=("char",), data_root=tmp_path / "data", url=server.url)
    assert len(server.requests) == 1
    assert (meta["source"], meta["train_tokens"]) == (server.url, 1_003_854)

    # a cached copy changed on disk is re-verified and downloaded again
    path.write_bytes(path.read_bytes()[:-1])
    assert dataset.fetch_shakespeare(cache_dir=cache, url=server.url) == path
    assert len(server.requests) == 2
    assert hashlib.sha256(path.read_bytes()).hexdigest() == dataset.SHAKESPEARE_SHA256
    assert _entries(cache) == ["input.txt"]


@pytest.mark.parametrize("mode, message", [("tampered", "sha256"), ("truncated", "cut short"),
                                           ("no-length", "sha256")])
def test_bad_download_is_refused_and_not_cached(server, tmp_path, mode, message):
    cache = tmp_path / "cache"
    server.mode = mode
    with pytest.raises(UserError, match=message) as err:
        dataset.fetch_shakespeare(cache_dir=cache, url=server.url)
    assert "NANOREPRO_INPUT" in err.value.fix
    assert _entries(cache) == []  # neither the bad file nor a temp file is left behind
    server.mode = "ok"
    path = dataset.fetch_shakespeare(cache_dir=cache, url=server.url)  # a later call must download again
    assert len(server.requests) == 2
    assert hashlib.sha256(path.read_bytes()).hexdigest() == dataset.SHAKESPEARE_SHA256


def test_download_errors(server, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="404"):
        dataset.fetch_shakespeare(cache_dir=cache, url=server.url.replace("input.txt", "nope.txt"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    with pytest.raises(UserError, match="could not download"):
        dataset.fetch_shakespeare(cache_dir=cache, url=f"http://127.0.0.1:{closed_port}/input.txt")
    server.mode = "slow"  # answers after 3 s: only a timeout shorter than that gives "timed out"
    timeouts = []
    urlopen = urllib.request.urlopen
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **kw: timeouts.append(kw["timeout"]) or urlopen(*a, **kw))
    with pytest.raises(UserError, match="timed out"):
        dataset.fetch_shakespeare(cache_dir=cache, url=server.url, timeout=0.3)
    assert timeouts == [0.3]  # the caller's timeout reaches the socket
    with pytest.raises(UserError, match="could not download"):
        dataset.fetch_shakespeare(cache_dir=cache, url="not a url")
    assert _entries(cache) == []


# ---------------------------------------------------------------------------- user text files

def test_env_var_and_input_path(tmp_path, monkeypatch):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("aaaa bbbb\n" * 10, encoding="utf-8")
    b.write_text("xyz\n" * 30, encoding="utf-8")
    monkeypatch.setenv("NANOREPRO_INPUT", str(a))
    (meta,) = dataset.prepare(name="fromenv", encodings=("char",), data_root=tmp_path / "d")
    assert meta["source"] == str(a.resolve()) and meta["itos"] == ["\n", " ", "a", "b"]
    (meta,) = dataset.prepare(input_path=b, name="fromarg", encodings=("char",), data_root=tmp_path / "d")
    assert meta["source"] == str(b.resolve()) and meta["itos"] == ["\n", "x", "y", "z"]  # the argument wins


def test_user_text_both_encodings(tmp_path, tiktoken_offline):
    text = "Über allen Gipfeln ist Ruh — 静かな夜.\nIn allen Wipfeln spürest du kaum einen Hauch. 🌲\n" * 5
    src = tmp_path / "poem.txt"
    src.write_text(text, encoding="utf-8")
    metas = dataset.prepare(input_path=src, name="poem", data_root=tmp_path / "data")
    assert [m["encoding"] for m in metas] == ["char", "gpt2"]
    n = int(len(text) * 0.9)
    for meta in metas:
        folder = tmp_path / "data" / f"poem_{meta['encoding']}"
        assert dataset.load_meta(folder)["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
        codec = dataset.Codec.from_meta(meta)
        assert codec.decode(_read_bin(folder / "train.bin")) == text[:n]
        assert codec.decode(_read_bin(folder / "val.bin")) == text[n:]
    char, gpt2 = metas
    assert char["itos"] == sorted(set(text)) and char["vocab_size"] == len(set(text))
    assert (char["train_tokens"], char["val_tokens"]) == (n, len(text) - n)
    assert gpt2["vocab_size"] == 50257 and gpt2["train_tokens"] > gpt2["val_tokens"] > 0


def _distinct_chars(k: int) -> str:
    cps = (c for c in range(0x21, 0x110000) if not 0xD800 <= c <= 0xDFFF)
    return "".join(chr(next(cps)) for _ in range(k))


def test_char_vocab_limit(tmp_path):
    ok, too_big = tmp_path / "ok.txt", tmp_path / "big.txt"
    ok.write_text(_distinct_chars(65_535), encoding="utf-8")
    too_big.write_text(_distinct_chars(65_536), encoding="utf-8")
    (meta,) = dataset.prepare(input_path=ok, name="ok", encodings=("char",), data_root=tmp_path)
    assert meta["vocab_size"] == 65_535
    assert int(_read_bin(tmp_path / "ok_char" / "train.bin").max()) < 65_535
    with pytest.raises(UserError, match="65,536 distinct characters") as err:
        dataset.prepare(input_path=too_big, name="big", encodings=("char",), data_root=tmp_path)
    assert "gpt2" in err.value.fix
    assert not (tmp_path / "big_char").exists()


@pytest.mark.parametrize("content, kwargs, message", [
    (None, {}, "does not exist"),
    (b"", {}, "is empty"),
    (b"caf\xe9 au lait " * 10, {}, "not UTF-8"),
    (b"abc", {}, "too short"),
    (b"hello world " * 10, {"encodings": ("bpe",)}, "unknown encoding 'bpe'"),
    (b"hello world " * 10, {"encodings": ()}, "no encoding"),
    (b"hello world " * 10, {"name": "../evil"}, "bad dataset name"),
    (b"hello world " * 10, {"name": ""}, "bad dataset name"),
])
def test_bad_input(tmp_path, content, kwargs, message):
    src = tmp_path / "in.txt"
    if content is not None:
        src.write_bytes(content)
    with pytest.raises(UserError, match=message) as err:
        dataset.prepare(input_path=src, data_root=tmp_path / "data", **{"encodings": ("char",), **kwargs})
    assert err.value.fix
    assert not (tmp_path / "data").exists() or _entries(tmp_path / "data") == []


def test_input_is_a_directory(tmp_path):
    with pytest.raises(UserError, match="not a file"):
        dataset.prepare(input_path=tmp_path, encodings=("char",), data_root=tmp_path / "data")


def test_unprepared_dataset(tmp_path):
    with pytest.raises(UserError, match="not a prepared dataset") as err:
        dataset.load_meta(tmp_path / "shakespeare_nope")
    assert "nanorepro prepare" in err.value.fix
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "meta.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="cannot read"):
        dataset.load_meta(tmp_path / "broken")
    with pytest.raises(UserError, match="unknown encoding"):
        dataset.Codec("bytes", 256)


def _run_cli(args: list[str], cwd: Path, repo_root: Path, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(repo_root), **env}
    full_env.pop("NANOREPRO_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "nanorepro", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=60)


def test_cli_missing_input_is_one_line(tmp_path, repo_root):
    r = _run_cli(["prepare", "--input", "missing.txt"], tmp_path, repo_root)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("nanorepro: error: input file missing.txt does not exist (fix: ")
    assert not (tmp_path / "data").exists()


@pytest.mark.slow
def test_cli_prepare_and_tiktoken_without_files(tmp_path, repo_root):
    src = tmp_path / "in.txt"
    src.write_text("to be or not to be, that is the question\n" * 5, encoding="utf-8")
    with socket.socket() as s:  # a proxy that refuses: tiktoken's download fails at once, offline or not
        s.bind(("127.0.0.1", 0))
        proxy = f"http://127.0.0.1:{s.getsockname()[1]}"
    # tiktoken's cache turned off (set empty), so the bundled files cannot be handed to it
    env = {"TIKTOKEN_CACHE_DIR": "", "HTTPS_PROXY": proxy, "https_proxy": proxy, "NO_PROXY": "", "no_proxy": ""}
    r = _run_cli(["prepare", "--input", str(src), "--name", "q", "--encoding", "char"], tmp_path, repo_root, **env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("q_char: char, vocab 15, train 184 tokens, val 21 tokens -> data/q_char")
    r = _run_cli(["prepare", "--input", str(src), "--name", "q", "--encoding", "char"], tmp_path, repo_root, **env)
    assert "reusing data/q_char" in r.stdout
    r = _run_cli(["prepare", "--input", str(src), "--name", "q", "--encoding", "gpt2"], tmp_path, repo_root, **env)
    assert r.returncode == 3  # unavailable offline: a pipeline records "not run" and goes on
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "tiktoken could not get the GPT-2 BPE files" in r.stderr and "TIKTOKEN_CACHE_DIR" in r.stderr
    assert not (tmp_path / "data" / "q_gpt2" / "meta.json").exists()


def test_import_does_not_load_torch_or_tiktoken(repo_root):
    code = ("import sys, nanorepro.data.dataset; "
            "bad = [m for m in ('torch', 'tiktoken') if m in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(repo_root)},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------- batches

def test_batches(char_data_root):
    import torch

    folder = char_data_root / "shakespeare_char"
    b = Batches(folder, block_size=8, batch_size=4)

    def get(split, generator):
        return b.read(split, b.draw(split, generator))

    x, y = get("train", torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # the rows are the windows at the indices torch.randint draws from the same generator
    train = _read_bin(folder / "train.bin").astype(np.int64)
    ix = torch.randint(len(train) - 8, (4,), generator=torch.Generator().manual_seed(0))
    for row, i in enumerate(ix.tolist()):
        assert x[row].tolist() == train[i:i + 8].tolist() and y[row].tolist() == train[i + 1:i + 9].tolist()
    x2, y2 = get("train", torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = get("train", torch.Generator().manual_seed(1))
    assert not torch.equal(x, x3)
    xv, yv = get("val", torch.Generator().manual_seed(0))
    assert xv.shape == (4, 8) and int(xv.max()) < 65 and int(yv.min()) >= 0
    with pytest.raises(UserError, match="unknown split"):
        get("test", torch.Generator())


def test_windows_cover_the_split_once_in_order(char_data_root):
    import torch

    folder = char_data_root / "shakespeare_char"
    b = Batches(folder, block_size=256, batch_size=8)
    val = _read_bin(folder / "val.bin").astype(np.int64)
    rng = torch.get_rng_state()
    windows = b.windows("val")
    assert torch.equal(torch.get_rng_state(), rng)  # draws nothing: dropout masks and resumes stay as they were
    assert [len(ix) for ix in windows[:-1]] == [8] * (len(windows) - 1) and 1 <= len(windows[-1]) <= 8
    assert sum(len(ix) for ix in windows) == 435  # (111,540 - 256) / 256, rounded up
    targets = np.concatenate([b.read("val", ix)[1].flatten().numpy() for ix in windows])
    assert targets.tolist() == val[1:1 + 435 * 256].tolist()  # every target once, nothing past the end
    with pytest.raises(UserError, match="unknown split"):
        b.windows("test")


def test_batches_refuse_bad_data(char_data_root, tmp_path):
    folder = shutil.copytree(char_data_root / "shakespeare_char", tmp_path / "shakespeare_char")
    with pytest.raises(UserError, match="block_size 111540 is not shorter than the val split"):
        Batches(folder, block_size=111_540, batch_size=2)
    with pytest.raises(UserError, match="must be >= 1"):
        Batches(folder, block_size=0, batch_size=2)
    with open(folder / "train.bin", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(UserError, match="train.bin has 1,000 bytes") as err:
        Batches(folder, block_size=8, batch_size=2)
    assert "nanorepro prepare" in err.value.fix
    (folder / "val.bin").unlink()
    (folder / "train.bin").unlink()
    with pytest.raises(UserError, match="missing"):
        Batches(folder, block_size=8, batch_size=2)
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    assert meta["train_tokens"] == 1_003_854  # the shared fixture's folder was not touched
    assert dataset.load_meta(char_data_root / "shakespeare_char")["train_tokens"] == 1_003_854
