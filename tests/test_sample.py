"""`nanorepro sample`: from a run folder or a pretrained GPT-2 folder, prompt from text or file."""

import subprocess
import sys

from nanorepro.config import resolve
from nanorepro.train import train


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "nanorepro", "sample", *args], capture_output=True, text=True,
                          cwd=cwd, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def test_sample_cli_from_a_run_with_a_prompt_file(char_data_root, tmp_path):
    train(resolve("tiny", {"data_root": str(char_data_root), "out_dir": str(tmp_path / "run"), "max_iters": 5}))
    (tmp_path / "prompt.txt").write_text("JULIET:\n")
    r = cli("--run", str(tmp_path / "run"), "--prompt-file", "prompt.txt", "--num-samples", "2",
            "--max-new-tokens", "25", "--seed", "5", "--out", "out/s.txt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    samples = (tmp_path / "out" / "s.txt").read_text().split("\n---------------\n")
    assert len(samples) == 2 and all(s.startswith("JULIET:\n") for s in samples)
    assert len(samples[0]) == len("JULIET:\n") + 25
    assert "wrote 2 sample(s)" in r.stdout


def test_sample_cli_from_a_local_gpt2_folder(tiny_gpt2, tiktoken_offline, tmp_path):
    r = cli("--model", str(tiny_gpt2), "--prompt", "To be or not", "--max-new-tokens", "8", "--top-k", "5",
            "--temperature", "1.2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("To be or not")


def test_sample_cli_refuses_bad_settings_in_one_line(tmp_path):
    for args, needle in [(["--run", str(tmp_path / "none")], "has no config.json and ckpt.pt"),
                         (["--model", "gpt5"], "unknown pretrained model 'gpt5'"),
                         (["--run", str(tmp_path), "--temperature", "0"], "temperature must be > 0")]:
        r = cli(*args, cwd=tmp_path)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
