"""`nanorepro sample`: from a run folder or a pretrained GPT-2 folder, prompt from text or file."""

import subprocess
import sys

import pytest

from nanorepro.config import resolve
from nanorepro.gpt.train import train


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "nanorepro", "sample", *args], capture_output=True, text=True,
                          cwd=cwd, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.slow
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


@pytest.mark.slow
def test_sample_cli_from_a_local_gpt2_folder(tiny_gpt2, tiktoken_offline, tmp_path):
    r = cli("--model", str(tiny_gpt2), "--prompt", "To be or not", "--max-new-tokens", "8", "--top-k", "5",
            "--temperature", "1.2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("To be or not")


@pytest.mark.slow
def test_sample_cli_refuses_bad_settings_in_one_line(tmp_path):
    for args, needle in [(["--run", str(tmp_path / "none")], "has no config.json and ckpt.pt"),
                         (["--model", "gpt5"], "unknown pretrained model 'gpt5'"),
                         (["--run", str(tmp_path), "--temperature", "0"], "temperature must be > 0")]:
        r = cli(*args, cwd=tmp_path)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_sampling_autocasts_where_training_would_and_not_on_a_cpu_by_default(char_data_root, tmp_path, monkeypatch):
    """On a GPU `dtype=auto` resolves to bf16 (fp16 where bf16 is emulated): the forward passes run under
    autocast as training's do. Asked for explicitly, a CPU shows the same path; by default it stays fp32."""
    import torch

    from nanorepro.gpt.model import GPT
    from nanorepro.gpt.sample import sample

    train(resolve("tiny", {"data_root": str(char_data_root), "out_dir": str(tmp_path / "run"), "max_iters": 2}))
    seen = []
    forward = GPT.forward
    monkeypatch.setattr(GPT, "forward", lambda self, *a: (seen.append(torch.is_autocast_enabled("cpu") and
                                                                      torch.get_autocast_dtype("cpu")), forward(self, *a))[1])
    kw = dict(run_dir=tmp_path / "run", prompt="ROMEO:", max_new_tokens=5, data_root=str(char_data_root))
    plain = sample(**kw)
    assert seen == [False] * 5
    seen.clear()
    half = sample(**kw, dtype="bfloat16")
    assert seen == [torch.bfloat16] * 5 and len(half[0]) == len(plain[0])


def test_a_padded_vocabulary_never_yields_ids_the_tokenizer_lacks(char_data_root, tmp_path):
    """A model whose vocabulary is padded past the data's (train-gpt2: 50304 for 50257) samples only real
    tokens, even where the extra ids are as likely as any (made so here: every logit 0)."""
    import torch

    from nanorepro.gpt import checkpoint
    from nanorepro.gpt.sample import sample

    run = tmp_path / "run"
    train(resolve("tiny", {"data_root": str(char_data_root), "out_dir": str(run), "max_iters": 2, "vocab_size": 80}))
    model, _ = checkpoint.load_model(run)
    assert model.config.vocab_size == 80
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()  # the head sees zeros: uniform over all 80 ids
    x = torch.zeros(1, 1, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    assert (model.eval().generate(x, 200, generator=gen)[0] >= 65).any()  # what the guard is for
    assert (model.generate(x, 200, generator=gen, vocab_size=65)[0] < 65).all()
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "model": model.state_dict()}, run / "ckpt.pt")
    text = sample(run_dir=run, prompt="ROMEO:", max_new_tokens=200, top_k=None, data_root=str(char_data_root))
    assert text[0].startswith("ROMEO:") and len(text[0]) == len("ROMEO:") + 200
