"""The bad-input matrix: one table of wrong types, out-of-range numbers, unknown presets and fields, paths
that do not exist or cannot be written, non-UTF-8 text, vocabulary overflow, a block size above the
model's, CUDA without a GPU, a model too large for the device and missing credentials, through the CLI,
the notebook parameters (`run-notebooks -p/-f`) and the Python API.

Each must give one line naming the problem and the fix, a non-zero exit (a UserError from the API), no
traceback unless --debug, and nothing that looks like a finished result. CLI rows call `cli.main` in
this process (an escaping exception would be the traceback); `test_real_processes_...` checks the same
contract on real processes, with and without --debug.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nanorepro import cli, config, metrics
from nanorepro.cloud import chameleon, runner, ssh
from nanorepro.data import dataset
from nanorepro.errors import UserError
from nanorepro.gpt import sample
from nanorepro.gpt.train import train

REPO = Path(__file__).resolve().parent.parent
CUDA = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"  # a GPU that is not there
CUDA_SAYS = "no CUDA GPU is visible" if not torch.cuda.is_available() else "does not exist"


def tiny_cfg(c, **kw) -> config.Config:
    return config.resolve("tiny", {"data_root": str(c.data), "out_dir": str(c.tmp / "run"), **kw})


def train_argv(c, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", f"--data_root={c.data}", "--out-dir", str(c.tmp / "run"), *extra]


# (id, through, what: ctx -> argv for "cli"/"nb", or ctx -> None (raises) for "api", a regex the message must match)
CASES = [
    # -- the CLI: train ------------------------------------------------------------------------
    ("unknown-preset", "cli", lambda c: ["train", "--preset", "gpt5"], r"unknown preset 'gpt5'.*fix: use one of: "),
    ("wrong-type", "cli", lambda c: train_argv(c, "--max_iters=many"), r"max_iters='many' is not a valid int"),
    ("negative-number", "cli", lambda c: train_argv(c, "--max_iters=-5"), r"max_iters must be >= 0, got -5"),
    ("out-of-range-dropout", "cli", lambda c: train_argv(c, "--dropout=1.5"), r"dropout must be in \[0, 1\)"),
    ("unknown-field", "cli", lambda c: train_argv(c, "--max_iter=5"),
     r"unknown config field 'max_iter' \(fix: did you mean 'max_iters'\?\)"),
    ("unreadable-option", "cli", lambda c: train_argv(c, "oops"), r"cannot read option 'oops'"),
    ("argparse-wrong-type", "cli", lambda c: train_argv(c, "--seeds", "two"),
     r"argument --seeds: invalid int value: 'two' \(fix: see `nanorepro train --help`\)"),
    ("zero-seeds", "cli", lambda c: train_argv(c, "--seeds", "0"), r"--seeds must be >= 1"),
    ("heads-do-not-divide", "cli", lambda c: train_argv(c, "--n_embd=33"), r"n_embd=33 is not divisible by n_head=2"),
    ("data-does-not-exist", "cli", lambda c: ["train", "--preset", "tiny", f"--data_root={c.tmp / 'nowhere'}"],
     r"is not a prepared dataset \(no meta.json\) \(fix: run `nanorepro prepare`"),
    ("out-dir-not-writable", "cli",
     lambda c: ["train", "--preset", "tiny", f"--data_root={c.data}", "--out-dir", str(c.afile / "run")],
     r"cannot create the run folder .*afile/run: Not a directory \(fix: pick a writable --out-dir\)"),
    ("cuda-without-gpu", "cli", lambda c: train_argv(c, f"--device={CUDA}"), CUDA_SAYS + r".*fix: use"),
    ("model-too-large", "cli", lambda c: train_argv(c, "--n_layer=96", "--n_head=96", "--n_embd=12288"),
     r"a \d+M-parameter GPT needs .* but this machine's RAM has .*fix: (use|shard it)"),
    ("vocabulary-below-the-data", "cli", lambda c: train_argv(c, "--vocab_size=10"),
     r"vocab_size=10 is smaller than the dataset's 65"),
    ("block-size-above-the-model", "cli",
     lambda c: ["train", "--preset", "finetune-shakespeare-cpu", f"--init_from={c.tiny_gpt2()}", "--block_size=256",
                f"--data_root={c.gpt2_data()}", "--out-dir", str(c.tmp / "ft"), "--max_iters=1"],
     r"block_size=256 is above .*'s 128 \(fix: use --block_size=128 or less\)"),
    ("init-from-missing-folder", "cli", lambda c: train_argv(c, f"--init_from={c.tmp / 'no-model'}"),
     r"is neither 'scratch', a GPT-2 name"),
    # -- the CLI: prepare, sample, report, reserve ------------------------------------------------
    ("input-does-not-exist", "cli", lambda c: ["prepare", "--input", str(c.tmp / "nope.txt"), "--data-root", str(c.tmp)],
     r"input file .*nope.txt does not exist"),
    ("input-not-utf8", "cli", lambda c: ["prepare", "--input", str(c.latin1), "--data-root", str(c.tmp)],
     r"is not UTF-8 text \(byte 3: invalid continuation byte\) \(fix: convert it to UTF-8"),
    ("unknown-encoding", "cli", lambda c: ["prepare", "--input", str(c.text), "--encoding", "utf8", "--data-root",
                                           str(c.tmp)], r"unknown encoding 'utf8'"),
    ("bad-dataset-name", "cli", lambda c: ["prepare", "--input", str(c.text), "--name", "../up", "--data-root",
                                           str(c.tmp)], r"bad dataset name '../up'"),
    ("char-vocabulary-overflow", "cli", lambda c: ["prepare", "--input", str(c.many_chars), "--encoding", "char",
                                                   "--data-root", str(c.tmp)],
     r"70,000 distinct characters.*at most 65,535 \(fix: use --encoding gpt2"),
    ("data-root-not-writable", "cli", lambda c: ["prepare", "--input", str(c.text), "--encoding", "char",
                                                 "--data-root", str(c.afile / "data")],
     r"cannot write .*afile/data/shakespeare_char: .*Not a directory"),
    ("sample-from-nothing", "cli", lambda c: ["sample", "--run", str(c.tmp / "nothing")],
     r"has no config.json and ckpt.pt \(fix: train first"),
    ("sample-zero-temperature", "cli", lambda c: ["sample", "--model", "gpt2", "--temperature", "0"],
     r"temperature must be > 0, got 0.0"),
    ("prompt-file-not-utf8", "cli", lambda c: ["sample", "--model", "gpt2", "--prompt-file", str(c.latin1)],
     r"--prompt-file .* is not UTF-8 text"),
    ("report-missing-run", "cli", lambda c: ["report", str(c.tmp / "no-run")], r"run folder .*no-run does not exist"),
    ("lease-hours-out-of-range", "cli", lambda c: ["reserve", "--results-dir", str(c.tmp), "--hours", "500"],
     r"lease_hours=500.0 is outside \(0, 168\]"),
    ("reserve-no-nodes", "cli", lambda c: ["reserve", "--results-dir", str(c.tmp), "--nodes", "0"],
     r"nodes=0 is not a positive whole number of nodes \(fix: set nodes=1"),
    ("estimate-no-nodes", "cli", lambda c: ["estimate", "--preset", "train-gpt2", "--nodes", "0"],
     r"--nodes 0 is not a positive number \(fix: give --nodes 1 or more"),
    ("missing-credentials", "cli", lambda c: ["reserve", "--results-dir", str(c.tmp)],
     r"no Chameleon credentials in this environment.*fix: run on the Chameleon JupyterHub"),
    # -- the notebook parameters ----------------------------------------------------------------
    ("nb-wrong-type", "nb", lambda c: ["-p", "char_max_iters", "many"],
     r"notebook parameter char_max_iters='many' is not valid: it must be None or a whole number"),
    ("nb-negative-seed", "nb", lambda c: ["-p", "seed", "-1"], r"seed=-1 is not valid"),
    ("nb-type-of-the-notebooks-default", "nb", lambda c: ["-p", "site", "5"], r"site=5 is not valid: it must be None or a site name"),
    ("nb-unknown-preset", "nb", lambda c: ["-p", "char_preset", "gpt5"], r"char_preset='gpt5' .* one of the presets"),
    ("nb-unknown-target", "nb", lambda c: ["-p", "target", "aws"], r"target='aws' .* one of auto, local, chameleon"),
    ("nb-bad-config-override", "nb", lambda c: ["-p", "char_overrides", "{block_size: 0}"],
     r"notebook parameter char_overrides: block_size must be > 0, got 0"),
    ("nb-unknown-config-field", "nb", lambda c: ["-p", "finetune_overrides", "{blok_size: 64}"],
     r"finetune_overrides: unknown config field 'blok_size'"),
    ("train-config-with-overrides", "cli", lambda c: ["train", "--config", str(c.tmp / "config.json"), "--max_iters=5"],
     r"--config is a whole run's config"),
    ("train-config-missing", "cli", lambda c: ["train", "--config", str(c.tmp / "nope.json")],
     r"cannot read the config .*nope.json"),
    ("nb-unknown-parameter", "nb", lambda c: ["-p", "char_presett", "tiny"], r"unknown notebook parameter\(s\): char_presett"),
    ("nb-lease-hours-out-of-range", "nb", lambda c: ["-p", "lease_hours", "0"], r"lease_hours=0 is not valid"),
    ("nb-no-nodes", "nb", lambda c: ["-p", "nodes", "0"], r"nodes=0 is not valid: it must be a whole number of nodes"),
    ("nb-input-does-not-exist", "nb", lambda c: ["-p", "input_path", str(c.tmp / "nope.txt")],
     r"input_path=.* must be None or an existing text file"),
    ("nb-results-not-writable", "nb", lambda c: ["-p", "results_dir", str(c.afile / "results")],
     r"cannot create the results folder .*Not a directory \(fix: pass -p results_dir"),
    ("nb-value-not-yaml", "nb", lambda c: ["-p", "seed", "[1,"], r"cannot read the value of -p seed"),
    ("nb-params-file-not-utf8", "nb", lambda c: ["-f", str(c.latin1)], r"cannot read parameters file .*utf-8"),
    ("nb-params-file-not-a-mapping", "nb", lambda c: ["-f", str(c.yaml_list)], r"is not a mapping of parameter names"),
    ("nb-params-file-missing", "nb", lambda c: ["-f", str(c.tmp / "p.yaml")], r"parameters file .* does not exist"),
    # -- the Python API -------------------------------------------------------------------------
    ("api-bool-for-int", "api", lambda c: config.resolve("tiny", {"batch_size": True}),
     r"batch_size=True is not a valid int"),
    ("api-unknown-field", "api", lambda c: config.from_dict({"lr": 0.1}), r"unknown config field 'lr'"),
    ("api-unknown-preset", "api", lambda c: config.resolve("Tiny"), r"unknown preset 'Tiny'"),
    ("api-input-not-utf8", "api", lambda c: dataset.prepare(input_path=c.latin1, data_root=c.tmp), r"is not UTF-8 text"),
    ("api-cuda-without-gpu", "api", lambda c: train(tiny_cfg(c, device=CUDA)), CUDA_SAYS),
    ("api-model-too-large", "api", lambda c: train(tiny_cfg(c, n_layer=96, n_head=96, n_embd=12288)),
     r"needs .* but this machine's RAM has"),
    ("api-characters-outside-the-vocabulary", "api", lambda c: dataset.Codec("char", 3, ["a", "b", "c"]).encode("abz"),
     r"characters not in the dataset's vocabulary: 'z'"),
    ("api-sample-zero-samples", "api", lambda c: sample.sample(model="gpt2", num_samples=0), r"must be >= 1"),
    ("api-unknown-target", "api", lambda c: runner.get_runner("aws", c.tmp), r"unknown target 'aws'"),
    ("api-reserve-unknown-target", "api", lambda c: chameleon.reserve("aws"), r"unknown target 'aws'"),
    ("api-ssh-key-readable-by-others", "api", lambda c: ssh.check_key_file(c.loose_key),
     r"SSH private key .* is readable by other users \(mode 644\) \(fix: chmod 600 "),
]
assert len(CASES) >= 20 and len({c[0] for c in CASES}) == len(CASES)


@pytest.fixture
def ctx(tmp_path, char_data_root, request, monkeypatch):
    monkeypatch.chdir(REPO)  # run-notebooks finds notebooks/ from here
    monkeypatch.delenv("NANOREPRO_DEBUG", raising=False)
    for var in [v for v in os.environ if v.startswith("OS_")]:
        monkeypatch.delenv(var)  # no Chameleon credentials here
    torch.set_num_threads(1)
    (tmp_path / "afile").write_text("a regular file: nothing can be created under it\n")
    (tmp_path / "latin1.txt").write_bytes("Caf\u00e9 cr\u00e8me\n".encode("latin-1") * 20)
    (tmp_path / "text.txt").write_text("To be, or not to be: that is the question.\n" * 20, encoding="utf-8")
    (tmp_path / "many.txt").write_text("".join(chr(0x10000 + i) for i in range(70_000)), encoding="utf-8")
    (tmp_path / "list.yaml").write_text("- char_preset\n- tiny\n")
    key = tmp_path / "id_ed25519"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nnot a real key\n-----END OPENSSH PRIVATE KEY-----\n")
    key.chmod(0o644)
    return SimpleNamespace(tmp=tmp_path, data=char_data_root, afile=tmp_path / "afile", latin1=tmp_path / "latin1.txt",
                           text=tmp_path / "text.txt", yaml_list=tmp_path / "list.yaml", many_chars=tmp_path / "many.txt", loose_key=key,
                           gpt2_data=lambda: request.getfixturevalue("gpt2_data_root"),
                           tiny_gpt2=lambda: request.getfixturevalue("tiny_gpt2"))


def looks_finished(root: Path) -> list[str]:
    """Files that would tell a user (or a later step) that something finished."""
    found = []
    for path in root.rglob("*"):
        if path.name in ("meta.json", "REPORT.md", "report.json", "samples.txt") or path.suffix == ".ipynb":
            found.append(str(path))
        elif path.name == metrics.METRICS_FILE and metrics.of_kind(metrics.read(path), "end"):
            found.append(str(path))
        elif path.name == "ckpt.pt":
            found.append(str(path))
    return found


@pytest.mark.parametrize("name, through, what, says", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line_with_the_fix_and_no_result(name, through, what, says, ctx, capsys):
    if through == "api":
        with pytest.raises(UserError) as e:
            what(ctx)
        message = str(e.value)
        assert "\n" not in message and e.value.fix, message  # one line, with a fix
        assert re.search(says, message), message
    else:
        argv = what(ctx) if through == "cli" else ["run-notebooks", *what(ctx)]
        capsys.readouterr()  # what fixtures made on the way (a tiny GPT-2) printed
        try:
            code = cli.main(argv)  # anything but a UserError escapes here: that is the traceback
        except SystemExit as e:  # argparse's own refusals
            code = e.code
        out, err = capsys.readouterr()
        assert code not in (0, None), f"exit {code}: {out}{err}"
        assert err.count("\n") == 1 and err.startswith("nanorepro: error: ") and "Traceback" not in err, err
        assert "(fix: " in err, err
        assert re.search(says, err), err
        assert not re.search(r"finished at iter|^wrote |notebooks ran in", out, re.M), out
    assert not looks_finished(ctx.tmp)


@pytest.mark.slow
def test_real_processes_print_one_line_and_a_traceback_only_with_debug(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("na\u00efve\n".encode("latin-1"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("NANOREPRO_DEBUG", None)
    for argv in (["prepare", "--input", str(latin1), "--data-root", str(tmp_path)],
                 ["train", "--preset", "tiny", "--max_iters=many"]):
        r = subprocess.run([sys.executable, "-m", "nanorepro", *argv], capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=120)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith("nanorepro: error: ") and "(fix: " in r.stderr and not r.stdout
        d = subprocess.run([sys.executable, "-m", "nanorepro", "--debug", *argv], capture_output=True, text=True,
                           env=env, cwd=tmp_path, timeout=120)
        assert d.returncode != 0 and "Traceback (most recent call last)" in d.stderr
        assert "nanorepro.errors.UserError" in d.stderr
    assert not looks_finished(tmp_path)
