"""Faults injected into real runs: SIGKILL at chosen points of checkpoint writes, evaluations and metric
appends; a full disk under a checkpoint or the prepared data; a truncated token file; a checkpoint from
another vocabulary; a torn metrics line. Each test checks what a user is left with: a clear message,
nothing lost beyond one checkpoint interval, nothing half-written that a later step trusts. The node and
the cloud failing are in test_faults_remote.py.

Covered elsewhere, not repeated here: SIGTERM/SIGINT save and say how to resume (test_train.py), tampered
and cut-short downloads (test_data.py), a failing notebook cell is named and its notebook kept
(test_notebooks.py::test_a_failing_cell_names_the_notebook_and_keeps_it), a dropped SSH connection
(test_remote.py), lease ERROR / build ERROR / refused lease (test_chameleon.py).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from nanorepro import metrics
from nanorepro.config import Config, resolve
from nanorepro.data import dataset
from nanorepro.errors import UserError
from nanorepro.gpt import checkpoint
from nanorepro.gpt.model import GPT
from nanorepro.gpt.train import train
from nanorepro.results import report

REPO = Path(__file__).resolve().parent.parent
# one torch thread per process: two processes fighting over 2 cores run ~100x slower
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def nanorepro(*args: str, env: dict | None = None, cwd: Path | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanorepro", *args], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, cwd=cwd or REPO, timeout=300, **kw)


def error_line(stderr: str) -> str:
    """The last line of stderr (progress bars end their lines with \\r)."""
    return re.split(r"[\r\n]+", stderr.strip())[-1]


def quiet_read(path: Path) -> list[dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a torn line left by the kill is expected here
        return metrics.read(path)


def losses(path: Path) -> list[tuple]:
    return [(r["kind"], r["iter"], r.get("loss"), r.get("train_loss"), r.get("val_loss"))
            for r in metrics.read(path) if r["kind"] in ("train", "eval")]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- SIGKILL at random points --------------------------------------------------------------------
# site -> the range of n to kill at (n-th pass in that process); small enough that every attempt dies
SITES = {"ckpt-write": (1, 2), "ckpt-renamed": (1, 2), "eval": (1, 4), "step": (1, 15), "metrics": (1, 20)}
MAX_ITERS, INTERVAL = 300, 10


@pytest.mark.slow
def test_sigkill_at_random_points_never_corrupts_or_loses_more_than_one_interval(char_data_root, tmp_path):
    seed = int(os.environ.get("NANOREPRO_FAULT_SEED") or random.SystemRandom().randrange(10**6))
    rng = random.Random(seed)
    sites = [s for s in SITES for _ in range(2)] + rng.sample(sorted(SITES), 2)  # each site at least twice
    rng.shuffle(sites)
    points = [(s, rng.randint(*SITES[s])) for s in sites]
    args = ["train", "--preset", "tiny", f"--data_root={char_data_root}", f"--max_iters={MAX_ITERS}",
            f"--eval_interval={INTERVAL}", f"--lr_decay_iters={MAX_ITERS}", "--eval_iters=1"]
    ref = nanorepro(*args, "--out-dir", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-2000:]

    run = tmp_path / "killed"
    ckpt_before = 0
    for site, n in points:
        where = f"NANOREPRO_FAULT_SEED={seed}, killed at {site}:{n} in {points}"
        r = nanorepro(*args, "--out-dir", str(run), env={"NANOREPRO_FAULT": f"{site}:{n}"})
        assert r.returncode == -signal.SIGKILL, f"{where}: the resumed run did not reach the fault: {r.stderr[-2000:]}"
        ckpt_iter = 0
        if (run / "ckpt.pt").exists():
            ckpt = torch.load(run / "ckpt.pt", weights_only=True)  # never torn: the rename is atomic
            ckpt_iter = ckpt["iter_num"]
            GPT(checkpoint.model_config(ckpt)).load_state_dict(ckpt["model"])
        assert ckpt_iter % INTERVAL == 0 and ckpt_iter >= ckpt_before, where  # never goes back
        logged = [r["iter"] for r in metrics.of_kind(quiet_read(run / "metrics.jsonl"), "train")]
        assert max(logged, default=0) - ckpt_iter <= INTERVAL, f"{where}: more than one interval of work lost"
        ckpt_before = ckpt_iter

    r = nanorepro(*args, "--out-dir", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the resume rewrote the file: no torn line is left
        records = metrics.read(run / "metrics.jsonl")
    assert [r["iter"] for r in metrics.of_kind(records, "train")] == list(range(1, MAX_ITERS + 1))
    assert [r["iter"] for r in metrics.of_kind(records, "eval")] == list(range(0, MAX_ITERS + 1, INTERVAL))
    assert [r["status"] for r in metrics.of_kind(records, "end")] == ["finished"]
    assert len(metrics.of_kind(records, "meta")) == 1
    # exact resume: twelve kills later, the same losses at the same iterations as the run never killed
    assert losses(run / "metrics.jsonl") == losses(tmp_path / "ref" / "metrics.jsonl"), f"seed {seed}"
    assert not list(run.glob("*.tmp"))


# -- a full disk ---------------------------------------------------------------------------------
class SmallDisk:
    """A folder that runs out of space: a real tmpfs where this user may mount one (root, or passwordless
    sudo as on CI runners); otherwise the writing process gets a file-size limit (RLIMIT_FSIZE), which
    fails the same writes with EFBIG instead of ENOSPC. `real` says which one this is."""

    def __init__(self, path: Path, size: int):
        self.path, self.size, self.limit = path, size, None
        path.mkdir(parents=True)
        sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
        self.real = False
        if not os.environ.get("NANOREPRO_TEST_NO_TMPFS"):  # set, the fallback is tested
            try:
                self.real = subprocess.run([*sudo, "mount", "-t", "tmpfs", "-o", f"size={size},mode=1777", "tmpfs",
                                            str(path)], capture_output=True, timeout=30).returncode == 0
            except (OSError, subprocess.SubprocessError):
                pass
        self._sudo = sudo
        self.error = "No space left on device" if self.real else "File too large"

    def leave_free(self, nbytes: int) -> None:
        """From now on only about `nbytes` more fit (in any one file, for the fallback)."""
        if self.real:
            st = os.statvfs(self.path)
            (self.path / "filler").write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - nbytes))
        else:
            self.limit = nbytes

    def free_up(self) -> None:
        (self.path / "filler").unlink(missing_ok=True)
        self.limit = None

    def preexec(self):
        import resource

        limit = self.limit if self.limit is not None else (self.size if not self.real else None)
        return (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))) if limit else None

    def close(self) -> None:
        if self.real:
            if subprocess.run([*self._sudo, "umount", str(self.path)], capture_output=True).returncode:
                subprocess.run([*self._sudo, "umount", "-l", str(self.path)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    disks = []

    def make(size: int) -> SmallDisk:
        disks.append(SmallDisk(tmp_path / f"disk{len(disks)}", size))
        return disks[-1]

    yield make
    for d in disks:
        d.close()


@pytest.mark.slow
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(char_data_root, small_disk):
    disk = small_disk(4 << 20)
    run = disk.path / "run"
    args = ["train", "--preset", "tiny", f"--data_root={char_data_root}", "--out-dir", str(run),
            "--eval_interval=10", "--lr_decay_iters=20", "--eval_iters=1"]
    assert nanorepro(*args, "--max_iters=10").returncode == 0
    before = sha(run / "ckpt.pt")
    disk.leave_free(150_000)  # room for the metrics lines, not for a 360 kB checkpoint
    r = nanorepro(*args, "--max_iters=20", preexec_fn=disk.preexec())
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    line = error_line(r.stderr)
    assert line.startswith(f"nanorepro: error: cannot write checkpoint {run / 'ckpt.pt'}") and disk.error in line
    assert "the previous checkpoint" in line and "is intact" in line and "(fix: free disk space" in line
    assert sha(run / "ckpt.pt") == before and torch.load(run / "ckpt.pt", weights_only=True)["iter_num"] == 10
    assert not list(run.glob("*.tmp"))  # the half-written temp file is gone
    assert not metrics.of_kind(quiet_read(run / "metrics.jsonl"), "end")  # nothing says "finished"
    disk.free_up()
    r = nanorepro(*args, "--max_iters=20")
    assert r.returncode == 0 and "resuming" in r.stdout, r.stderr[-2000:]
    records = metrics.read(run / "metrics.jsonl")
    assert [x["iter"] for x in metrics.of_kind(records, "train")] == list(range(1, 21))
    assert metrics.finished(records)


@pytest.mark.slow
def test_disk_full_while_preparing_data_leaves_no_folder_a_later_step_trusts(shakespeare_path, small_disk, tmp_path):
    disk = small_disk(1 << 20)  # Tiny Shakespeare's train.bin alone is 2 MB
    small = tmp_path / "small.txt"
    small.write_text("To be, or not to be, that is the question. " * 40, encoding="utf-8")
    root = disk.path / "data"
    ok = nanorepro("prepare", "--input", str(small), "--encoding", "char", "--data-root", str(root))
    assert ok.returncode == 0, ok.stderr  # a complete folder from before
    r = nanorepro("prepare", "--input", str(shakespeare_path), "--encoding", "char", "--data-root", str(root),
                  preexec_fn=disk.preexec())
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"nanorepro: error: cannot write {root / 'shakespeare_char'}")
    assert "(fix: check that --data-root is writable and has space)" in r.stderr
    assert not disk.real or "; the disk is full (" in r.stderr
    folder = root / "shakespeare_char"
    assert not (folder / "meta.json").exists()  # the old meta went first: old bins + no meta = not a dataset
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    t = nanorepro("train", "--preset", "tiny", f"--data_root={root}", "--out-dir", str(tmp_path / "run"))
    assert t.returncode == 2 and "is not a prepared dataset (no meta.json)" in t.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_truncated_train_bin_is_refused_and_prepare_repairs_it(char_data_root, shakespeare_path, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(char_data_root / "shakespeare_char", root / "shakespeare_char")
    with open(root / "shakespeare_char" / "train.bin", "r+b") as f:
        f.truncate(1_000_000)  # a copy cut short
    args = ["train", "--preset", "tiny", f"--data_root={root}", "--out-dir", str(tmp_path / "run"), "--max_iters=5"]
    r = nanorepro(*args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "train.bin has 1,000,000 bytes (500,000 tokens), but meta.json says 1,003,854 (truncated or changed)" \
        in r.stderr and "(fix: re-run `nanorepro prepare`" in r.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "ckpt.pt").exists()
    p = nanorepro("prepare", "--input", str(shakespeare_path), "--encoding", "char", "--data-root", str(root))
    assert p.returncode == 0 and "reusing" not in p.stdout  # the size check caught it: rewritten
    assert (root / "shakespeare_char" / "train.bin").stat().st_size == 2 * 1_003_854
    assert nanorepro(*args).returncode == 0


# -- a checkpoint from another vocabulary; a torn metrics line -----------------------------------------
def tiny(root: Path, out: Path, **kw) -> Config:
    return resolve("tiny", {"data_root": str(root), "out_dir": str(out), "eval_iters": 1, **kw})


@pytest.mark.parametrize("text", [
    "to be or not to be, that is the question. " * 200,  # a smaller vocabulary
    "".join(chr(0x100 + i) for i in range(65)) * 100,  # the same size, other characters
], ids=["smaller", "same-size"])
def test_checkpoint_from_another_vocabulary_is_refused_and_kept(char_data_root, tmp_path, text):
    torch.set_num_threads(1)
    run = tmp_path / "run"
    train(tiny(char_data_root, run, max_iters=10))
    before = sha(run / "ckpt.pt")
    (tmp_path / "other.txt").write_text(text, encoding="utf-8")
    dataset.prepare(input_path=tmp_path / "other.txt", name="shakespeare", encodings=("char",), data_root=tmp_path / "d")
    with pytest.raises(UserError, match=r"was trained on another vocabulary \(char, 65 tokens\) than dataset") as e:
        train(tiny(tmp_path / "d", run, max_iters=20))
    assert "new --out-dir" in e.value.fix and "\n" not in str(e.value)
    assert sha(run / "ckpt.pt") == before
    assert not metrics.of_kind(metrics.read(run / "metrics.jsonl"), "train")[10:]  # nothing trained on it


def test_a_torn_metrics_line_is_skipped_with_a_warning_and_the_run_resumes(char_data_root, tmp_path):
    torch.set_num_threads(1)
    run = tmp_path / "run"
    train(tiny(char_data_root, run, max_iters=10, eval_interval=10, lr_decay_iters=20))
    path = run / "metrics.jsonl"
    good = metrics.read(path)
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"kind": "train", "iter": 11, "loss": 3.9')  # a writer killed mid-line
    with pytest.warns(UserWarning, match=r"line \d+ is not valid JSON \(a torn write\?\); skipped it"):
        assert metrics.read(path) == good  # the rest is read
    with pytest.warns(UserWarning, match="torn write"):
        assert report.summarize_run(run)["best_val_loss"] == metrics.best_val_loss(good)  # reports still work
    metrics.append(tmp_path / "copy.jsonl", {"kind": "meta"})
    with open(tmp_path / "copy.jsonl", "a") as f:
        f.write('{"kind": "tr')
    metrics.append(tmp_path / "copy.jsonl", {"kind": "end"})  # starts on a new line: only the torn one is lost
    with pytest.warns(UserWarning):
        assert metrics.read(tmp_path / "copy.jsonl") == [{"kind": "meta"}, {"kind": "end"}]

    with pytest.warns(UserWarning, match="torn write"):  # the resume reads it once more, then rewrites it
        train(tiny(char_data_root, run, max_iters=20, eval_interval=10, lr_decay_iters=20))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        records = metrics.read(path)
    assert [r["iter"] for r in metrics.of_kind(records, "train")] == list(range(1, 21))
    assert [r["iter"] for r in metrics.of_kind(records, "eval")] == [0, 10, 20] and metrics.finished(records)
