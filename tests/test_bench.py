"""`nanorepro bench`: the record it writes, stopping at a target loss, and the side-by-side mode
against a stand-in nanoGPT checkout (a script printing nanoGPT's log lines: upstream is never
vendored or downloaded in tests). No assertion here depends on how fast this machine is."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from nanorepro import cli, config
from nanorepro.errors import UserError
from nanorepro.gpt import bench, hardware

REPO = Path(__file__).resolve().parent.parent

# nanoGPT's train.py as far as the bench sees it: it takes --key=value words, prints the same
# "step"/"iter" lines, and here also writes the arguments it got where the test can read them.
FAKE_TRAIN = textwrap.dedent('''
    import json, os, sys
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    os.makedirs(args["out_dir"], exist_ok=True)
    json.dump(args, open(os.path.join(args["out_dir"], "args.json"), "w"))
    max_iters, every = int(args["max_iters"]), int(args["eval_interval"])
    for it in range(max_iters + 1):  # nanoGPT runs one step past max_iters
        if it % every == 0:
            print(f"step {it}: train loss 4.0000, val loss 4.0000")
        print(f"iter {it}: loss 3.9000, time 5.00ms, mfu -100.00%")
''')
# its data/shakespeare_char/prepare.py: the char encoding of input.txt, 90/10 (or a wrong one)
FAKE_PREPARE = textwrap.dedent('''
    import pickle, numpy as np
    text = open("input.txt").read()
    chars = sorted(set(text))
    ids = np.array([chars.index(c) for c in text], dtype=np.uint16)
    n = int(len(text) * 0.9)
    ids[:n]{flip}.tofile("train.bin")
    ids[n:].tofile("val.bin")
    pickle.dump({{"vocab_size": len(chars)}}, open("meta.pkl", "wb"))
''')


def fake_nanogpt(root: Path, wrong_data: bool = False) -> Path:
    (root / "data" / "shakespeare_char").mkdir(parents=True)
    (root / "train.py").write_text(FAKE_TRAIN)
    (root / "model.py").write_text("")
    (root / "configurator.py").write_text("")
    (root / "data" / "shakespeare_char" / "prepare.py").write_text(FAKE_PREPARE.format(flip="[::-1]" if wrong_data else ""))
    return root


def tiny(data_root: Path, **more) -> dict:
    return {"data_root": str(data_root), **more}


@pytest.mark.slow
def test_a_throughput_run_writes_no_checkpoint(char_data_root, tmp_path, capsys):
    """Its last evaluation "improves" on nothing: a checkpoint there would be ~19 GB for gpt2-xl's shape."""
    bench.bench("tiny", tiny(char_data_root), iters=3, warmup=1, out=tmp_path / "b.json", keep=True)
    kept = Path(capsys.readouterr().out.split("kept the bench folder ")[1].split()[0])
    (run,) = [d for d in kept.iterdir() if d.is_dir()]
    assert (run / "metrics.jsonl").exists() and not list(kept.rglob("ckpt.pt"))
    assert json.loads((run / "config.json").read_text())["save_checkpoint"] is False


@pytest.mark.slow
def test_cli_bench_writes_a_well_formed_record(char_data_root, tmp_path, capsys):
    out = tmp_path / "b.json"
    code = cli.main(["bench", "--preset", "tiny", "--iters", "3", "--warmup", "1", "--out", str(out),
                     f"--data_root={char_data_root}", "--n_embd=48"])
    assert code == 0
    rec = json.loads(out.read_text())
    assert rec["kind"] == "bench" and rec["preset"] == "tiny" and rec["device"] == "cpu"
    assert rec["config"]["n_embd"] == 48 and rec["config"]["max_iters"] == 4  # override kept, 1 + 3 iterations
    (run,) = rec["runs"]
    assert run["impl"] == "nanorepro" and run["exit_code"] == 0 and run["dtype"] == "float32"
    assert run["ms_per_iter"]["n"] == 3  # exactly the timed iterations: warm-up and evaluations left out
    ms = run["ms_per_iter"]
    assert 0 < ms["min"] <= ms["p10"] <= ms["median"] <= ms["p90"] <= ms["max"]
    assert run["tokens_per_s"] == pytest.approx(4 * 32 / (ms["median"] / 1000))
    assert run["flops_per_s"] == pytest.approx(rec["flops_per_iter"] / (ms["median"] / 1000))
    assert run["peak_flops"] > 0 and "measured" in run["peak_source"]
    assert run["mfu"] == pytest.approx(run["flops_per_s"] / run["peak_flops"])
    assert run["peak_memory_mb"] > 0 and run["threads"] >= 1
    assert [e["iter"] for e in run["evals"]] == [0, 4]
    assert rec["n_params"] == config.resolve("tiny", {"n_embd": 48}).n_layer * 12 * 48 * 48 + 65 * 48 + 48 * (2 * 2 + 1)
    assert rec["summary"]["nanorepro"]["ms_per_iter_median"] == ms["median"]
    printed = capsys.readouterr().out
    assert rec["summary_line"] in printed and f"wrote {out}" in printed
    assert "tiny" in rec["summary_line"] and "ms/iter" in rec["summary_line"]


def test_mfu_is_nanogpts_estimate():
    """nanoGPT's estimate_mfu for the baby GPT: PaLM's 6N + 12*L*H*Q*T FLOPs per token, 64 x 256 tokens an
    iteration, against a peak (the model's own FLOPs formula lives in GPTConfig.flops_per_token)."""
    cfg = config.resolve("shakespeare-char")
    n_params, flops = bench.flops_per_iter(cfg, 65)
    per_seq = (6 * 10_646_784 + 12 * 6 * 6 * 64 * 256) * 256
    assert n_params == 10_646_784 and flops == 64 * per_seq
    for dt, peak in [(0.5, 1e12), (1.0, 312e12)]:
        run = bench._summarise({"steps": [(5, dt)], "lines": []}, 0, cfg, flops, peak)
        assert run["mfu"] == pytest.approx(64 * per_seq / dt / peak)
        assert run["tokens_per_s"] == 64 * 256 / dt


@pytest.mark.slow
def test_target_loss_stops_the_run_at_the_first_evaluation_reaching_it(char_data_root, tmp_path):
    # 5000 iterations would take minutes: the bench must stop the run once the target is met
    rec = bench.bench("tiny", tiny(char_data_root, max_iters=5000, lr_decay_iters=5000, eval_interval=5),
                      target_loss=3.9, warmup=0, out=tmp_path / "t.json")
    (run,) = rec["runs"]
    t = run["target"]
    assert t["reached"] and t["val_loss"] <= 3.9 and t["iter"] % 5 == 0 and t["iter"] > 0
    assert all(e["val_loss"] > 3.9 for e in run["evals"] if e["iter"] < t["iter"])  # the first one reaching it
    assert 0 < t["wall_s"] <= run["wall_s"]
    assert run["exit_code"] == 128 + 15  # stopped with SIGTERM (checkpoint written), not run to the end
    assert max(e["iter"] for e in run["evals"]) < 5000
    assert rec["summary"]["nanorepro"]["target_reached"] == "1/1"
    assert f"val <= 3.9 in {t['wall_s']:.1f} s" in rec["summary_line"]


@pytest.mark.slow
def test_side_by_side_alternates_and_gives_a_ratio_per_pair(char_data_root, shakespeare_path, tmp_path):
    upstream = fake_nanogpt(tmp_path / "nanoGPT")
    rec = bench.bench("tiny", tiny(char_data_root), iters=3, warmup=1, nanogpt=upstream, pairs=2,
                      input_path=str(shakespeare_path), out=tmp_path / "s.json", keep=True)
    assert [(r["impl"], r["pair"]) for r in rec["runs"]] == [
        ("nanorepro", 1), ("nanogpt", 1), ("nanogpt", 2), ("nanorepro", 2)]
    ng = [r for r in rec["runs"] if r["impl"] == "nanogpt"]
    assert all(r["ms_per_iter"]["median"] == 5.0 and r["ms_per_iter"]["n"] == 3 for r in ng)
    assert all(r["dtype"] == "float32" for r in ng)  # nanoGPT never autocasts on a CPU
    pairs = rec["summary"]["pairs"]
    for p in pairs:
        ours = next(r for r in rec["runs"] if r["impl"] == "nanorepro" and r["pair"] == p["pair"])
        assert p["speedup_per_iter"] == pytest.approx(5.0 / ours["ms_per_iter"]["median"])
    assert "nanoGPT 5.0 ms/iter" in rec["summary_line"] and "speedup per pair" in rec["summary_line"]
    # both MFUs from the same FLOPs per iteration and the same measured peak
    ng_mfu = rec["summary"]["nanogpt"]["mfu_median"]
    assert ng_mfu == pytest.approx(rec["flops_per_iter"] / 5e-3 / ng[0]["peak_flops"])
    assert f"nanoGPT 5.0 ms/iter, MFU {100 * ng_mfu:.1f}%" in rec["summary_line"]
    assert rec["cpu_affinity"] == sorted(os.sched_getaffinity(0))
    # upstream ran the same config, from a copy holding data its own prepare.py made
    cmd = ng[0]["command"]
    got = dict(a[2:].split("=", 1) for a in cmd[2:])
    cfg = config.resolve("tiny", {**tiny(char_data_root), **rec["forced"]})
    for k in bench.NANOGPT_FIELDS:
        assert ast.literal_eval(got[k]) == getattr(cfg, k) and type(ast.literal_eval(got[k])) is type(getattr(cfg, k))
    assert got["device"] == "cpu" and got["dataset"] == "shakespeare_char" and "dtype" not in got
    copy = Path(got["out_dir"]).parent / "nanoGPT"
    assert (copy / "data" / "shakespeare_char" / "input.txt").read_bytes() == shakespeare_path.read_bytes()
    assert not (upstream / "data" / "shakespeare_char" / "input.txt").exists()  # the user's checkout untouched


def test_side_by_side_refuses_upstream_data_that_differs(char_data_root, shakespeare_path, tmp_path):
    upstream = fake_nanogpt(tmp_path / "nanoGPT", wrong_data=True)
    with pytest.raises(UserError, match="train.bin differs"):
        bench.bench("tiny", tiny(char_data_root), iters=2, warmup=0, nanogpt=upstream,
                    input_path=str(shakespeare_path), out=tmp_path / "x.json")
    with pytest.raises(UserError, match="not a nanoGPT checkout"):
        bench.bench("tiny", tiny(char_data_root), iters=2, nanogpt=tmp_path, out=tmp_path / "x.json")


def test_time_to_target_ratio_counts_a_miss_by_nanogpt_as_its_whole_run():
    def run(impl, pair, reached, t, wall):
        return {"impl": impl, "pair": pair, "wall_s": wall, "peak_memory_mb": 1.0, "ms_per_iter": None,
                "target": {"reached": reached, "wall_s": t if reached else None}}

    rec = {"target_loss": 1.88, "runs": [run("nanorepro", 1, True, 20.0, 21.0), run("nanogpt", 1, False, None, 80.0),
                                         run("nanogpt", 2, True, 60.0, 61.0), run("nanorepro", 2, True, 30.0, 31.0)]}
    s = bench._summary(rec)
    assert [p["time_to_target_ratio"] for p in s["pairs"]] == [0.25, 0.5]
    assert [p["nanogpt_reached_target"] for p in s["pairs"]] == [False, True]
    assert s["nanorepro"]["time_to_target_s_median"] == 25.0 and s["nanogpt"]["target_reached"] == "1/2"


def test_the_compute_floor_counts_the_steps_to_the_target_at_their_depth():
    """The tuned preset trains 2 of its 4 blocks for its first 150 steps: those count at 2 blocks."""
    cfg = config.resolve("shakespeare-char-cpu-tuned")
    assert (cfg.grow_from_layers, cfg.grow_iter, cfg.n_layer, cfg.n_embd, cfg.block_size) == (2, 150, 4, 256, 256)

    def per_token(layers):  # 6N (blocks with their 2 LayerNorm gains, the tied head, ln_f; rope: no position
        return 6 * (layers * (12 * 256 * 256 + 2 * 256) + 65 * 256 + 256) + 12 * layers * 256 * 256  # table) + 12 L C T

    tokens = 8 * 256
    assert bench.training_flops(cfg, 65, 100) == 100 * per_token(2) * tokens
    assert bench.training_flops(cfg, 65, 1500) == (150 * per_token(2) + 1350 * per_token(4)) * tokens
    flat = config.resolve("shakespeare-char-cpu-tuned", {"grow_from_layers": 0, "grow_by": "zero"})
    assert bench.training_flops(flat, 65, 1500) == 1500 * per_token(4) * tokens

    reached = {"target": {"reached": True, "iter": 1500, "wall_s": 500.0}}
    assert bench.compute_floor_s(reached, cfg, 65, 2e11) == pytest.approx(bench.training_flops(cfg, 65, 1500) / 2e11)
    assert bench.compute_floor_s(reached, cfg, 65, None) is None  # no peak known: no floor
    assert bench.compute_floor_s({"target": {"reached": False, "iter": None}}, cfg, 65, 2e11) is None
    assert bench.compute_floor_s({}, cfg, 65, 2e11) is None  # a throughput run has no target


def test_the_compute_floor_is_compared_with_nanogpts_time_in_each_pair():
    def run(impl, pair, t, floor=None):
        return {"impl": impl, "pair": pair, "wall_s": t + 1, "peak_memory_mb": 1.0, "ms_per_iter": None,
                "target": {"reached": True, "wall_s": t, "loss": 1.465, "iter": 1500}, "compute_floor_s": floor}

    rec = {"target_loss": 1.465, "preset": "shakespeare-char-cpu-tuned", "device": "cpu", "host": "h", "dtype": "float32",
           "runs": [run("nanorepro", 1, 500.0, 200.0), run("nanogpt", 1, 100.0),
                    run("nanogpt", 2, 80.0), run("nanorepro", 2, 450.0, 200.0)]}
    rec["summary"] = bench._summary(rec)
    assert [p["compute_floor_ratio"] for p in rec["summary"]["pairs"]] == [2.0, 2.5]
    assert rec["summary"]["nanorepro"]["compute_floor_s_median"] == 200.0
    assert rec["summary"]["nanogpt"]["compute_floor_s_median"] is None  # nanoGPT's runs get none
    assert "at the peak, with no evaluation or start-up, at least 2.00, 2.50" in bench.summary_line(rec)
    assert "200.0 s at the peak" in bench._run_line({**rec["runs"][0], "label": "nanorepro-1", "cpu_s": 1.0})


def test_nanogpt_args_are_python_literals_of_the_config_types():
    cfg = config.resolve("shakespeare-char-cpu", {"dtype": "float32"})
    args = dict(a[2:].split("=", 1) for a in bench.nanogpt_args(cfg, "cpu", Path("/tmp/o")))
    assert ast.literal_eval(args["dropout"]) == 0.0 and isinstance(ast.literal_eval(args["dropout"]), float)
    assert args["compile"] == "False" and args["dtype"] == "float32" and args["n_embd"] == "128"
    with pytest.raises(UserError, match="from scratch"):
        bench.nanogpt_args(config.resolve("finetune-shakespeare-cpu"), "cpu", Path("/tmp/o"))


def test_fast_dtype_resolves_to_a_real_dtype_and_says_why(char_data_root, tmp_path):
    from nanorepro import metrics
    from nanorepro.gpt import train

    cfg = config.resolve("tiny", {"dtype": "fast"})
    dtype, attention, why = hardware.fast_cpu_dtype(cfg.model_config(65), cfg.batch_size, budget_s=0.2)
    assert (dtype, attention) in {("float32", "default"), ("bfloat16", "default"), ("bfloat16", "math")} and why
    if not hardware.cpu_has_native_bf16():
        assert dtype == "float32" and "no native bf16" in why
    else:
        assert "ms in float32" in why and "with math attention" in why
    # a run records what `fast` became, never "fast" itself
    run = tmp_path / "fast"
    train.train(config.resolve("tiny", {"dtype": "fast", "max_iters": 2, "data_root": str(char_data_root),
                                        "out_dir": str(run)}))
    meta = metrics.meta(metrics.read(run))
    assert meta["dtype"] in ("float32", "bfloat16") and meta["attention"] in ("default", "math")
    assert meta["threads"] == __import__("torch").get_num_threads()


def test_fast_dtype_is_timed_once_per_cpu_torch_and_shape(tmp_path, monkeypatch):
    """The cached choice is the timed one; another batch size is timed again; a corrupt cache is timed over."""
    timed = []
    real = hardware.fast_cpu_dtype

    def timing(model_cfg, batch_size):
        timed.append(batch_size)
        return real(model_cfg, batch_size, budget_s=0.1)

    monkeypatch.setattr(hardware, "fast_cpu_dtype", timing)
    model_cfg = config.resolve("tiny").model_config(65)
    first = hardware.fast_cpu_dtype_cached(model_cfg, 4, tmp_path)
    again = hardware.fast_cpu_dtype_cached(model_cfg, 4, tmp_path)
    assert timed == [4] and again[:2] == first[:2]
    assert again[2] == f"{first[2]}; measured by an earlier launch on this CPU ({tmp_path / hardware.DTYPE_CACHE_FILE})"
    hardware.fast_cpu_dtype_cached(model_cfg, 8, tmp_path)
    assert timed == [4, 8] and len(json.loads((tmp_path / hardware.DTYPE_CACHE_FILE).read_text())) == 2
    (tmp_path / hardware.DTYPE_CACHE_FILE).write_text("{not json")
    assert hardware.fast_cpu_dtype_cached(model_cfg, 4, tmp_path)[:2] == first[:2] and timed == [4, 8, 4]


def test_step_context_autocasts_and_picks_the_attention_kernel():
    import torch
    import torch.nn.functional as F

    q = torch.randn(2, 2, 8, 4)
    assert torch.backends.cuda.flash_sdp_enabled()  # PyTorch's backend switches (CPU's flash kernel too)
    with hardware.StepContext("cpu", "bfloat16", "math"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
        assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        assert F.scaled_dot_product_attention(q, q, q, is_causal=True).dtype == torch.bfloat16
    assert torch.backends.cuda.flash_sdp_enabled() and not torch.is_autocast_enabled("cpu")
    ctx = hardware.StepContext("cpu", "float32")
    for _ in range(2):  # reusable, as train enters it every step
        with ctx:
            assert not torch.is_autocast_enabled("cpu")
            assert F.linear(q, torch.randn(4, 4)).dtype == torch.float32
    assert 1 <= hardware.physical_cores() <= (__import__("os").cpu_count() or 1)


def test_per_iteration_speedup_only_compares_the_same_config():
    def run(impl, pair, ms, wall, reached_at):
        return {"impl": impl, "pair": pair, "ms_per_iter": {"median": ms}, "tokens_per_s": 1.0, "mfu": None,
                "peak_memory_mb": 1.0, "wall_s": wall, "cpu_s": 2 * wall,
                "target": {"loss": 1.88, "reached": reached_at is not None, "wall_s": reached_at}}

    runs = [run("nanorepro", 1, 20.0, 20.0, 19.0), run("nanogpt", 1, 35.0, 76.0, None)]
    other = bench._summary({"runs": runs, "target_loss": 1.88, "preset": "shakespeare-char-cpu-quick",
                            "nanogpt_preset": "shakespeare-char-cpu"})
    (pair,) = other["pairs"]
    assert "speedup_per_iter" not in pair  # different models: ms/iter ratios mean nothing
    assert pair["time_to_target_ratio"] == pytest.approx(19.0 / 76.0) and not pair["nanogpt_reached_target"]
    same = bench._summary({"runs": runs, "target_loss": 1.88, "preset": "shakespeare-char-cpu", "nanogpt_preset": None})
    assert same["pairs"][0]["speedup_per_iter"] == pytest.approx(35.0 / 20.0)


def test_bench_names_the_cpu_kind_each_figure_came_from():
    features = hardware.cpu_features()
    assert features["isa"] and isinstance(features["native_bf16"], bool)
    words = hardware.describe_cpu_features(features)
    assert words.startswith(features["isa"]) and words.endswith("native" if features["native_bf16"] else "emulated")
    assert words in bench._host("cpu")


def _gpu_script():
    spec = importlib.util.spec_from_file_location("gpu_script", REPO / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gpu_script_dry_run_runs_every_step_on_the_cpu(tmp_path):
    """benchmarks/gpu.sh is one command for whoever has a GPU; the dry run keeps it from rotting."""
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--dry-run", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    record = json.loads((tmp_path / "gpu.json").read_text())
    assert record["dry_run"] and list(record["steps"]) == ["gpu-tests", "shakespeare-char", "gpu-fast", "gpt2-xl"]
    assert [r["verdict"] for r in record["rows"]] == ["met"] * 4, record["rows"]
    assert {c["check"]: c["ok"] for c in record["preflight"]}["Python"] is True
    assert record["budget_s"] <= 600  # the README's promise: 10 minutes on one A100/H100
    assert "| gpt2-xl's shape, fine-tune recipe (1 x 32 x 1024 tokens) |" in r.stdout
    assert "| claim | measured | expected | verdict |" in r.stdout


@pytest.mark.slow
def test_gpu_script_reports_a_missed_target_as_missed(tmp_path):
    """The verdict comes from the figures: the run exits 0, but val 0.5 is never reached."""
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--dry-run", "--steps", "gpu-fast",
                        "--target-loss", "0.5", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    record = json.loads((tmp_path / "gpu.json").read_text())
    (row,) = record["rows"]
    assert row["verdict"] == "missed" and "val <= 0.5 not reached: best " in row["measured"]
    assert record["steps"]["gpu-fast"]["exit"] == 0  # bench itself succeeded: only the figures say "missed"
    assert "| missed |" in r.stdout


def test_a_step_past_its_budget_is_killed_with_everything_it_started(tmp_path):
    """bench runs its training in a session of its own: killing the step's group alone would leave it."""
    gpu = _gpu_script()
    pidfile = tmp_path / "pid"
    step = gpu.run_step(["bash", "-c", f"setsid sleep 300 & echo $! > {pidfile}; sleep 300"], 1, tmp_path / "log")
    assert step["timed_out"] and step["exit"] is None
    pid = int(pidfile.read_text())
    assert not gpu._alive(pid), f"pid {pid} outlived its step"
    row = gpu.target_row("x", step, 1.0, "y")
    assert row["verdict"] == "not measured" and "past its 1 s budget" in row["measured"]


@pytest.mark.slow
def test_bench_stopped_by_sigterm_stops_the_run_it_started(char_data_root, tmp_path):
    gpu = _gpu_script()
    proc = subprocess.Popen([sys.executable, "-m", "nanorepro", "bench", "--preset", "tiny", "--iters", "100000",
                             "--warmup", "1", f"--data_root={char_data_root}", "--out", str(tmp_path / "b.json")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.monotonic() + 60
    while not (kids := gpu.descendants(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert kids, "bench started no run"
    proc.send_signal(signal.SIGTERM)  # to bench alone, not its group: as a timeout or `kill PID` does
    assert proc.wait(timeout=60) != 0
    deadline = time.monotonic() + 30
    while any(gpu._alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(gpu._alive(k) for k in kids)
    assert not (tmp_path / "b.json").exists()


SMI_560 = ("| NVIDIA-SMI 560.35.03      Driver Version: 560.35.03      CUDA Version: 12.6     |\n"
           "GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-1)\n")


def test_gpu_preflight_names_the_torch_build_the_driver_can_run():
    gpu = _gpu_script()
    bad = gpu.driver_check(SMI_560, "13.0")  # PyPI's torch 2.13.0 on CC-Ubuntu24.04-CUDA's driver
    assert bad["ok"] is False and "torch is built for CUDA 13.0: it cannot run here" in bad["detail"]
    assert "--index-url https://download.pytorch.org/whl/cu126" in bad["fix"]
    assert gpu.driver_check(SMI_560, "12.6")["ok"] is True
    cpu = gpu.driver_check(SMI_560, None)
    assert cpu["ok"] is False and "CPU build" in cpu["detail"] and "cu126" in cpu["fix"]
    assert gpu.driver_check(SMI_560.replace("13.0", "").replace("560.35.03", "580.65.06").replace("12.6", "13.0"),
                            "13.0")["ok"] is True


@pytest.mark.slow  # by measurement: gpu.sh in a process of its own: ~3 s
def test_gpu_preflight_fails_before_any_work_without_nvidia_smi_or_a_compiler(tmp_path, monkeypatch):
    """No nvidia-smi: one failed check and exit 2 before anything is prepared or trained."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    env = {**os.environ, "PATH": str(bin_dir)}
    r = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "preflight failed: nothing was trained" in r.stderr, r.stdout + r.stderr
    assert "nvidia-smi: FAILED: nvidia-smi is not on PATH" in r.stdout and "Traceback" not in r.stderr
    assert "C compiler and Python headers: FAILED" in r.stdout and "python3-dev" in r.stdout
    assert not (tmp_path / "o" / "data").exists()  # nothing prepared, nothing trained
    monkeypatch.setenv("CC", "/bin/false")
    assert _gpu_script().compiler_check()["ok"] is False


@pytest.mark.slow  # by measurement: resolves the extras: ~4 s
def test_the_gpu_tests_need_only_the_train_and_test_extras(tmp_path):
    """A node with `pip install -e '.[train,test]'` collects them: no python-chi, papermill, jupyter, paramiko."""
    code = textwrap.dedent("""
        import sys
        class Refuse:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("chi", "papermill", "jupyterlab", "paramiko", "openstack", "nbformat"):
                    raise ImportError(f"{name} is not in the train and test extras")
        sys.meta_path.insert(0, Refuse())
        import pytest
        sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-m", "gpu", "--collect-only", "tests/test_gpu.py"]))
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0 and "tests collected" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]


@pytest.mark.slow
def test_runs_log_at_the_presets_interval_and_times_each_logging_window(char_data_root, tmp_path):
    """The bench no longer forces log_interval=1 (a host sync and a record every step biases 15-40 ms
    GPU steps): the run logs as it would for a user, each record giving its window's mean step time."""
    rec = bench.bench("tiny", tiny(char_data_root, log_interval=2), iters=6, warmup=2, out=tmp_path / "w.json")
    assert "log_interval" not in rec["forced"] and rec["config"]["log_interval"] == 2
    (run,) = rec["runs"]
    assert run["ms_per_iter"]["n"] == 3  # the windows of steps 2-3, 4-5, 6-7 (0-1 is warm-up)
    assert [e["iter"] for e in run["evals"]] == [0, 8]
    assert config.resolve("shakespeare-char").log_interval == 10  # what a GPU bench of the faithful preset keeps


def test_logging_windows_leave_evaluations_and_start_up_out(tmp_path):
    from nanorepro import metrics

    records = [{"kind": "meta"}, {"kind": "eval", "iter": 0},
               {"kind": "train", "iter": 4, "ms_per_iter": 9.0},  # steps 0-3: from the evaluation at 0 on
               {"kind": "train", "iter": 8, "ms_per_iter": 5.0},
               {"kind": "eval", "iter": 10},  # steps 8-9 went unlogged; the evaluation's time is in no window
               {"kind": "train", "iter": 12, "ms_per_iter": 6.0}, {"kind": "end", "iter": 12}]
    metrics.rewrite(tmp_path / metrics.METRICS_FILE, records)
    steps, info = bench._ours_steps(tmp_path, eval_interval=10)
    assert steps == [(0, 0.009), (4, 0.005), (10, 0.006)] and info["end"]["iter"] == 12
    metrics.rewrite(tmp_path / metrics.METRICS_FILE, [r for r in records if r["kind"] != "eval" or r["iter"]])
    assert bench._ours_steps(tmp_path, 10)[0] == [(4, 0.005), (10, 0.006)]  # resumed: no known start for 0-3


def test_same_progress_compares_the_time_each_side_took_to_nanogpts_best_validation_loss():
    def run(impl, evals):
        return {"impl": impl, "pair": 1, "wall_s": 100.0, "peak_memory_mb": 1.0, "ms_per_iter": None,
                "target": {"reached": False, "wall_s": None},
                "evals": [{"iter": i, "val_loss": v, "wall_s": t} for i, v, t in evals]}

    theirs = run("nanogpt", [(0, 4.2, 2.0), (250, 2.1, 30.0), (500, 1.90, 60.0), (750, 1.93, 90.0)])
    ours = run("nanorepro", [(100, 2.5, 10.0), (200, 1.95, 20.0), (300, 1.89, 30.0), (400, 1.70, 40.0)])
    (pair,) = bench._summary({"target_loss": 1.47, "runs": [ours, theirs]})["pairs"]
    # nanoGPT's best (1.90, first at 60 s), ours first at or below it at 30 s
    assert pair["same_progress"] == {"val_loss": 1.90, "nanogpt_s": 60.0, "nanogpt_iter": 500,
                                     "nanorepro_s": 30.0, "nanorepro_iter": 300, "ratio": 0.5}
    # a throughput run (no target) evaluates one batch at each end: no progress compared
    (pair,) = bench._summary({"target_loss": None, "runs": [ours, theirs]})["pairs"]
    assert "same_progress" not in pair
    slow = run("nanorepro", [(100, 2.5, 50.0), (200, 1.95, 70.0)])
    (pair,) = bench._summary({"target_loss": 1.47, "runs": [slow, theirs]})["pairs"]
    assert pair["same_progress"]["ratio"] is None and pair["same_progress"]["nanorepro_s"] is None


def test_a_run_that_starts_shallower_is_timed_only_once_every_block_trains():
    """Its early steps run two of four blocks; the MFU counts the whole network's FLOPs, so only the steps
    after grow_iter may be timed. nanoGPT's steps are all timed, and nanoGPT cannot grow."""
    cfg = config.resolve("shakespeare-char-cpu-tuned", {"grow_from_layers": 2, "grow_iter": 100})
    steps = [(50, 0.5), (100, 0.5), (150, 1.0), (200, 1.0), (250, 1.0)]  # log lines every 50 steps
    ours = bench._summarise({"impl": "nanorepro", "steps": steps}, 0, cfg, 1e9, 2e9)
    assert ours["ms_per_iter"]["n"] == 3 and ours["ms_per_iter"]["median"] == 1000 and ours["mfu"] == 0.5
    upstream = bench._summarise({"impl": "nanogpt", "steps": steps}, 0, cfg, 1e9, 2e9)
    assert upstream["ms_per_iter"]["n"] == 5
    with pytest.raises(UserError, match="nanoGPT cannot start with fewer blocks"):
        bench.bench("shakespeare-char-cpu-tuned", {"grow_from_layers": 2, "grow_iter": 100}, target_loss=1.5,
                    nanogpt="/nonexistent")


@pytest.mark.slow
def test_a_throughput_run_of_a_growing_config_times_the_whole_network(char_data_root, tmp_path):
    """A throughput run turns the growth off whole: leaving grow_by=copy without grow_from_layers would be
    refused by validation (the tuned preset's case), and a shallow start would time a smaller network."""
    assert config.resolve("shakespeare-char-cpu-tuned").grow_by == "copy"
    small = tiny(char_data_root, n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4, log_interval=1)
    rec = bench.bench("shakespeare-char-cpu-tuned", small, iters=2, warmup=1, out=tmp_path / "g.json")
    assert rec["config"]["grow_from_layers"] == 0 and rec["config"]["grow_by"] == "zero"
    (run,) = rec["runs"]
    assert run["exit_code"] == 0 and run["ms_per_iter"]["n"] == 2
