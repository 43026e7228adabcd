"""The one config type: presets match nanoGPT's configs, overrides are typed, bad values refused."""

import dataclasses
import json
import subprocess
import sys

import pytest

from nanorepro import config
from nanorepro.errors import UserError


def test_presets_match_nanogpt_configs():
    char = config.resolve("shakespeare-char")
    # config/train_shakespeare_char.py, field for field
    assert (char.n_layer, char.n_head, char.n_embd, char.block_size, char.batch_size) == (6, 6, 384, 256, 64)
    assert (char.dropout, char.learning_rate, char.min_lr, char.max_iters, char.lr_decay_iters) == (0.2, 1e-3, 1e-4, 5000, 5000)
    assert (char.beta2, char.warmup_iters, char.eval_interval, char.eval_iters) == (0.99, 100, 250, 200)
    assert char.gradient_accumulation_steps == 1 and not char.always_save_checkpoint
    cpu = config.resolve("shakespeare-char-cpu")
    # nanoGPT README: --device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64
    # --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0
    assert (cpu.device, cpu.compile, cpu.eval_iters, cpu.log_interval, cpu.block_size, cpu.batch_size) == \
        ("cpu", False, 20, 1, 64, 12)
    assert (cpu.n_layer, cpu.n_head, cpu.n_embd, cpu.max_iters, cpu.lr_decay_iters, cpu.dropout) == \
        (4, 4, 128, 2000, 2000, 0.0)
    ft = config.resolve("finetune-shakespeare")
    # config/finetune_shakespeare.py
    assert (ft.init_from, ft.batch_size, ft.gradient_accumulation_steps, ft.max_iters) == ("gpt2-xl", 1, 32, 20)
    assert (ft.learning_rate, ft.decay_lr, ft.eval_interval, ft.eval_iters, ft.block_size) == (3e-5, False, 5, 40, 1024)
    assert ft.tokens_per_iter == 32 * 1024


def test_overrides_are_typed_in_every_spelling():
    o = config.parse_overrides(["--max_iters=10", "batch_size=3", "--dropout", "0.1", "--compile=false",
                                "--vocab_size=None", "--device=cuda:1"])
    assert o == {"max_iters": 10, "batch_size": 3, "dropout": 0.1, "compile": False, "vocab_size": None,
                 "device": "cuda:1"}
    cfg = config.resolve("tiny", o | {"device": "cpu"})
    assert cfg.max_iters == 10 and cfg.n_layer == 2  # preset kept, override applied


@pytest.mark.parametrize("args, needle", [
    (["--max_iters=-1"], "max_iters must be >= 0"),
    (["--n_layer=0"], "n_layer must be > 0"),
    (["--bogus=1"], "unknown config field 'bogus'"),
    (["--batch_size=ten"], "batch_size='ten' is not a valid int"),
    (["--dropout=1.5"], "dropout must be in [0, 1)"),
    (["--n_embd=33"], "not divisible by n_head"),
    (["--device=tpu"], "unknown device='tpu'"),
    (["--dtype=int8"], "unknown dtype"),
    (["--init_from=gpt5"], "init_from='gpt5'"),
    (["--min_lr=1"], "min_lr=1.0 is above learning_rate"),
    (["max_iters"], "cannot read option"),
    (["--optimizer=sgd"], "unknown optimizer='sgd'"),
    (["--optimizer=muon", "--parallel=fsdp"], "FSDP shards"),
    (["--grow_from_layers=2", "--grow_iter=5"], "grow_from_layers=2 is not below n_layer=2"),
    (["--grow_from_layers=1"], "needs the step to grow at, but grow_iter=0"),
    (["--grow_from_layers=1", "--grow_iter=5", "--parallel=ddp"], "every block in every step"),
    (["--grow_from_layers=1", "--grow_iter=5", "--init_from=gpt2"], "starts a network from scratch"),
    (["--grow_from_layers=-1"], "grow_from_layers must be >= 0"),
    (["--grow_by=copy"], "grow_by=copy says how a growing run's blocks join, but grow_from_layers=0"),
    (["--grow_from_layers=1", "--grow_iter=5", "--grow_by=stack"], "grow_by"),
])
def test_bad_values_are_refused_with_the_field_named(args, needle):
    with pytest.raises(UserError) as e:
        config.resolve("tiny", config.parse_overrides(args))
    assert needle in str(e.value) and "fix:" in str(e.value)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(UserError, match="shakespeare-char-cpu"):
        config.resolve("shakespeare-xl")


def test_config_round_trips_through_json(tmp_path):
    cfg = config.resolve("shakespeare-char-cpu", {"seed": 7})
    cfg.save(tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 7
    assert config.Config.load(tmp_path / "config.json") == cfg


@pytest.mark.slow
def test_cli_refuses_bad_field_in_one_line_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "nanorepro", "train", "--preset", "tiny", "--max_iters=-5"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "max_iters must be >= 0" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "runs").exists()


def test_light_modules_do_not_import_torch():
    code = ("import sys, nanorepro, nanorepro.config, nanorepro.metrics, nanorepro.cloud.runner, nanorepro.pipeline, "
            "nanorepro.notebooks, nanorepro.cli; nanorepro.cli.build_parser(); print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


def test_help_fields_shows_allowed_values_and_meaning_from_the_source_validate_checks(tmp_path):
    r = subprocess.run([sys.executable, "-m", "nanorepro", "train", "--help-fields"], capture_output=True, text=True,
                       cwd=tmp_path, check=True)
    lines = {line.split(":")[0].strip(): line for line in r.stdout.splitlines()}
    assert set(lines) == {f.name for f in dataclasses.fields(config.Config)}  # every field, one line each
    assert lines["parallel"].startswith("  parallel: none | ddp | fsdp, default 'none'. ")
    assert "torchrun" in lines["parallel"]
    assert "block_size: int > 0, default 1024. context length" in lines["block_size"]
    for f in dataclasses.fields(config.Config):
        for value in f.metadata["allowed"] or ():
            if value.isupper() or value.endswith(":N"):  # a placeholder: FOLDER, cuda:N
                continue
            # with what each needs: muon + fsdp is refused on purpose, grow_by only means something with growth
            needs = {"optimizer": {"parallel": "ddp"}, "grow_by": {"grow_from_layers": 1, "grow_iter": 5}}
            config.resolve("tiny", {f.name: value, **needs.get(f.name, {})})  # each one passes
            assert value in lines[f.name]
        if f.metadata["allowed"] and f.name != "init_from":
            with pytest.raises(UserError, match=f"unknown {f.name}='bogus'.*fix: use {f.metadata['allowed'][0]}"):
                config.resolve("tiny", {f.name: "bogus"})


@pytest.mark.slow
def test_a_run_config_file_is_what_train_reads(tmp_path):
    cfg = config.resolve("tiny", {"max_iters": 0, "out_dir": str(tmp_path / "run"), "data_root": str(tmp_path)})
    cfg.save(tmp_path / "config.json")
    assert config.Config.load(tmp_path / "config.json") == cfg and cfg.preset == "tiny"
    bad = json.loads((tmp_path / "config.json").read_text()) | {"block_size": 0}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    r = subprocess.run([sys.executable, "-m", "nanorepro", "train", "--config", str(tmp_path / "bad.json")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "block_size must be > 0, got 0" in r.stderr and not (tmp_path / "run").exists()
