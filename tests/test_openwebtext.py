"""OpenWebText preparation, offline: the same code path on a small local dataset built here (Tiny
Shakespeare's paragraphs as documents), checked token for token against a direct encoding of
nanoGPT's split; resume after an interruption while tokenising and while assembling; the disk
check; sources as a save_to_disk folder and as JSON lines through the CLI."""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nanorepro.data import dataset, openwebtext
from nanorepro.errors import UserError
from nanorepro.gpt.batches import Batches

SHARD_DOCS = 1500  # 7,222 documents: 5 train shards and 1 val shard


@pytest.fixture(scope="module")
def docs(shakespeare_path) -> list[str]:
    return [d for d in shakespeare_path.read_text(encoding="utf-8").split("\n\n") if d.strip()]


@pytest.fixture(scope="module")
def source(tmp_path_factory, docs) -> Path:
    import datasets

    path = tmp_path_factory.mktemp("owt") / "local-owt"
    datasets.Dataset.from_dict({"text": docs, "id": list(range(len(docs)))}).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def expected(docs, tiktoken_offline) -> dict[str, np.ndarray]:
    """nanoGPT's recipe done directly: split the documents, encode each, <|endoftext|> after it."""
    import datasets

    split = datasets.Dataset.from_dict({"text": docs}).train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    enc = dataset.gpt2_encoding()
    return {name: np.array([t for d in split[part]["text"] for t in enc.encode_ordinary(d) + [enc.eot_token]],
                           dtype=np.uint16) for name, part in (("train", "train"), ("val", "test"))}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, source, tiktoken_offline) -> dict:
    root = tmp_path_factory.mktemp("owt_data")
    started = time.time()
    meta = openwebtext.prepare(str(source), data_root=root, num_proc=2, shard_docs=SHARD_DOCS)
    print(f"prepared {meta['train_tokens']:,} tokens with 2 processes in {time.time() - started:.1f} s")
    return meta


def digests(folder: Path) -> dict[str, str]:
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in ("train.bin", "val.bin")}


def test_token_files_are_nanogpts_split_encoded_document_by_document(prepared, expected, docs):
    out = Path(prepared["data_dir"])
    for split in ("train", "val"):
        np.testing.assert_array_equal(np.fromfile(out / f"{split}.bin", dtype=np.uint16), expected[split])
    assert prepared["documents"] == {"train": len(docs) - math.ceil(0.0005 * len(docs)), "val": math.ceil(0.0005 * len(docs))}
    meta = dataset.load_meta(out)  # the layout training reads
    assert (meta["encoding"], meta["vocab_size"], meta["train_tokens"]) == ("gpt2", 50257, len(expected["train"]))
    assert out.name == "openwebtext_gpt2" and sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    batches = Batches(out, block_size=64, batch_size=2)
    x, y = batches.read("val", batches.draw("val"))
    assert x.shape == (2, 64) and (x[:, 1:] == y[:, :-1]).all()


def test_a_finished_folder_is_reused(prepared, source, capsys):
    out = Path(prepared["data_dir"])
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    openwebtext.prepare(str(source), data_root=out.parent, num_proc=2, shard_docs=SHARD_DOCS)
    assert "reusing" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_interrupted_tokenising_resumes_from_the_finished_shards(tmp_path, source, prepared, monkeypatch):
    real, calls = openwebtext._tokenize_shard, []

    def crash_on_third(docs, path, *args):
        calls.append(path.name)
        if calls == ["00000.bin", "00001.bin", "00002.bin"]:
            raise KeyboardInterrupt  # as a Ctrl-C while the third shard is tokenised
        return real(docs, path, *args)

    monkeypatch.setattr(openwebtext, "_tokenize_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        openwebtext.prepare(str(source), data_root=tmp_path, num_proc=2, shard_docs=SHARD_DOCS)
    out = tmp_path / "openwebtext_gpt2"
    assert not (out / "meta.json").exists()  # incomplete, and says so
    assert sorted(p.name for p in (out / ".parts" / "train").glob("*.bin")) == ["00000.bin", "00001.bin"]
    calls.clear()
    openwebtext.prepare(str(source), data_root=tmp_path, num_proc=2, shard_docs=SHARD_DOCS)
    assert calls == ["00002.bin", "00003.bin", "00004.bin", "00000.bin"]  # the rest of train, then val
    assert digests(out) == digests(Path(prepared["data_dir"]))


def test_interrupted_assembly_resumes_without_duplicating_tokens(tmp_path, source, prepared, monkeypatch):
    real, writes = openwebtext._write_json, []

    def die_recording_second_part(path, value):
        if path.name == "progress.json":
            writes.append(value)
            if len(writes) == 2:  # part 1 is already appended to train.bin.partial, not yet recorded
                raise OSError(28, "No space left on device")
        return real(path, value)

    monkeypatch.setattr(openwebtext, "_write_json", die_recording_second_part)
    with pytest.raises(UserError, match="finished shards are kept"):
        openwebtext.prepare(str(source), data_root=tmp_path, num_proc=2, shard_docs=SHARD_DOCS)
    out = tmp_path / "openwebtext_gpt2"
    assert (out / "train.bin.partial").stat().st_size > writes[0]["bytes"]  # the unrecorded append is there
    monkeypatch.setattr(openwebtext, "_write_json", real)
    openwebtext.prepare(str(source), data_root=tmp_path, num_proc=2, shard_docs=SHARD_DOCS)
    assert digests(out) == digests(Path(prepared["data_dir"]))


def test_not_enough_disk_is_refused_before_any_tokenising(tmp_path, source, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(openwebtext.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(UserError, match=r"not enough disk: token files need ~0\.[0-9] MB .* 0\.0 MB free") as e:
        openwebtext.prepare(str(source), data_root=tmp_path, num_proc=2, shard_docs=SHARD_DOCS)
    assert "--data-root on a bigger disk" in str(e.value)
    assert not list((tmp_path / "openwebtext_gpt2").rglob("0*.bin"))


def test_the_estimate_for_openwebtext_is_nanogpts_17_gib():
    # OpenWebText: 8,013,769 documents, ~39.8 GB of text (its Hugging Face card's dataset_size)
    est = openwebtext.estimate_bytes(39_769_491_688, 8_013_769)
    published = 2 * (9_035_582_198 + 4_434_897)  # nanoGPT's train.bin + val.bin token counts
    assert abs(est - published) / published < 0.03
    assert 16.5 < est / 2**30 < 17.5  # "~17GB" train.bin in nanoGPT's readme


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanorepro", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


@pytest.mark.slow
def test_cli_reads_json_lines_and_refuses_bad_sources_in_one_line(tmp_path, docs, tiktoken_offline):
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs[:400]), encoding="utf-8")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    base = ["prepare", "--dataset", "openwebtext", "--data-root", str(tmp_path / "data"), "--num-proc", "2"]
    r = run_cli([*base, "--source", str(src), "--text-column", "body", "--name", "mini"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "mini_gpt2: gpt2, vocab 50,257" in r.stdout and "token files need" in r.stdout
    meta = json.loads((tmp_path / "data" / "mini_gpt2" / "meta.json").read_text())
    assert meta["documents"] == {"train": 399, "val": 1}
    for args, code, message in [
        (["--source", str(src)], 2, "has no column 'text'"),
        (["--source", "./missing.jsonl"], 2, "does not exist"),
        (["--source", "nobody/no-such-dataset"], 3, "not available here"),
    ]:
        r = run_cli([*base, *args], env, tmp_path)
        assert r.returncode == code, r.stderr
        assert message in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
