"""One command that measures a GPU: `bash benchmarks/gpu.sh [--nanogpt PATH] [--out DIR] [--steps ...]`.

The first thing to run on a GPU machine (after `make install`, or `pip install -e '.[train,test]'`): it
checks in seconds what would otherwise fail minutes in, then measures each GPU claim the README makes,
each step in a time budget, in order:

  preflight       Python >= 3.11; a C compiler and Python's headers (torch.compile builds C); nvidia-smi;
                  the driver's CUDA against the installed torch's build (with the exact fix); the GPU
  prepare         the bundled Tiny Shakespeare, char and GPT-2 BPE (offline)
  gpu-tests       `pytest -m gpu tests/test_gpu.py`: what only a CUDA GPU shows
  shakespeare-char  the faithful baby GPT to val <= 1.4697: time, ms/iter, MFU (nanoGPT beside it with --nanogpt)
  gpu-fast        shakespeare-char-gpu-fast: time to val <= 1.4697
  gpt2-xl         gpt2-xl's shape from random init, the fine-tune recipe: ms/iter, MFU, peak memory

Budgets add up to 10 minutes on one A100/H100 (--nanogpt adds its run's budget); a step past its budget is
killed with every process it started. Each verdict comes from the step's figures (target reached or not,
peak memory against the estimate), never from an exit code alone. It ends with one table (claim, measured,
expected, verdict), also written as gpu.json in --out.

`--dry-run` does the same on the CPU with tiny sizes (the test suite runs it), so the script cannot rot.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # nanorepro from this checkout, installed or not

from nanorepro import memory  # noqa: E402
from nanorepro.cloud import nodeinstall  # noqa: E402 (torch-free: the preflight stays fast)
from nanorepro.config import resolve  # noqa: E402

A100_TARGET = 1.4697  # nanoGPT README: the baby GPT's best val loss on one A100
MIN_PYTHON = (3, 11)
# Seconds each step may take on one A100/H100; their sum is the promise the README makes (10 minutes)
BUDGETS = {"preflight": 20, "prepare": 30, "gpu-tests": 150, "shakespeare-char": 200, "gpu-fast": 70, "gpt2-xl": 110}
NANOGPT_BUDGET = 200  # --nanogpt: nanoGPT's own baby GPT run beside ours
STEPS = ("gpu-tests", "shakespeare-char", "gpu-fast", "gpt2-xl")
GRACE_S = 10  # after SIGTERM, before SIGKILL
XL_SHAPE = dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024, vocab_size=50304, bias=True)


# ---------------------------------------------------------------------------------------------
# Running a step: its own process group, killed whole (every descendant) past its budget


def _children() -> dict[int, list[int]]:
    """Every process's children, from /proc (a process that left its group, e.g. bench's training run in
    its own session, is still found through its parent)."""
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(stat.parent.name))
    return kids


def descendants(pid: int) -> list[int]:
    kids, out, todo = _children(), [], [pid]
    while todo:
        for child in kids.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGTERM the step's group and every descendant (a checkpoint may be written on the way out), then
    SIGKILL what is left after GRACE_S."""
    tree = descendants(proc.pid)
    for send in (lambda p: os.killpg(p, signal.SIGTERM), lambda p: os.kill(p, signal.SIGTERM)):
        for pid in [proc.pid, *tree]:
            try:
                send(pid)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and (proc.poll() is None or any(_alive(p) for p in tree)):
        time.sleep(0.2)
    for pid in [proc.pid, *tree]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


def run_step(cmd: list[str], budget: float, log: Path) -> dict[str, Any]:
    """Run cmd (output to log) in its own process group within `budget` seconds; {exit, seconds, timed_out}."""
    print(f"-> {' '.join(cmd)}  (budget {budget:.0f} s)", flush=True)
    started = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        try:
            code, timed_out = proc.wait(timeout=budget), False
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            code, timed_out = None, True
        except BaseException:  # Ctrl-C here: take the step down with us
            kill_tree(proc)
            raise
    took = time.monotonic() - started
    print(f"   {'timed out' if timed_out else f'exit {code}'} in {took:.0f} s (log: {log})", flush=True)
    return {"exit": code, "seconds": round(took, 1), "timed_out": timed_out, "budget_s": budget, "log": str(log)}


# ---------------------------------------------------------------------------------------------
# Preflight: seconds, before any training


def _check(name: str, ok: bool | None, detail: str, fix: str = "") -> dict[str, Any]:
    return {"check": name, "ok": ok, "detail": detail, "fix": "" if ok or ok is None else fix}


def compiler_check() -> dict[str, Any]:
    """A C compiler that can include this Python's headers: what Triton does at torch.compile's first step."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    fix = f"install them: sudo apt-get install -y {' '.join(nodeinstall.SYSTEM_PACKAGES)} (or run with --compile=false)"
    if not cc:
        return _check("C compiler and Python headers", False, "no C compiler (cc, gcc, clang) on PATH", fix)
    include = sysconfig.get_paths()["include"]
    r = subprocess.run([cc, "-fsyntax-only", "-x", "c", f"-I{include}", "-"], input="#include <Python.h>\nint main(void) { return 0; }\n",
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        return _check("C compiler and Python headers", False, f"{cc} cannot compile against {include}/Python.h", fix)
    return _check("C compiler and Python headers", True, f"{cc}; {include}/Python.h")


def nvidia_smi() -> tuple[str | None, str]:
    """(nvidia-smi's output with -L's after it, or None; why not)."""
    if not shutil.which("nvidia-smi"):
        return None, "nvidia-smi is not on PATH (no NVIDIA driver installed?)"
    try:
        out = [subprocess.run(["nvidia-smi", *a], capture_output=True, text=True, timeout=30) for a in ([], ["-L"])]
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"nvidia-smi failed: {e}"
    if out[0].returncode != 0:
        return None, f"nvidia-smi exited {out[0].returncode}: {(out[0].stdout + out[0].stderr).strip()[:200]}"
    return out[0].stdout + "\n" + out[1].stdout, ""


def driver_check(smi: str, torch_cuda: str | None) -> dict[str, Any]:
    """The driver's CUDA must be at least the torch build's (PyPI's torch 2.13.0 is CUDA 13.0: driver >= 580)."""
    driver, cuda, _ = nodeinstall.parse_nvidia_smi(smi)
    name = "driver CUDA vs torch build"
    if cuda is None:
        return _check(name, False, "nvidia-smi shows no CUDA version", "reinstall the NVIDIA driver")
    try:
        build = nodeinstall.torch_build(cuda, driver)
        fix = (f"install the build for this driver: {sys.executable} -m pip install torch=={nodeinstall.TORCH_VERSION} "
               f"--index-url {nodeinstall.TORCH_INDEX.format(build=build)}")
    except Exception as e:  # no build this driver can run: the driver is the fix
        fix = str(e)
    if not torch_cuda:
        return _check(name, False, f"driver {driver} (CUDA {cuda[0]}.{cuda[1]}) but torch is a CPU build", fix)
    need = tuple(int(x) for x in torch_cuda.split(".")[:2])
    ok = need <= cuda
    return _check(name, ok, f"driver {driver} supports CUDA {cuda[0]}.{cuda[1]}; torch is built for CUDA {torch_cuda}"
                  + ("" if ok else ": it cannot run here"), fix)


def preflight(dry: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(checks, environment facts for the record); a check with ok False stops the script."""
    env: dict[str, Any] = {"python": sys.version.split()[0]}
    checks = [_check("Python", sys.version_info >= MIN_PYTHON, sys.version.split()[0],
                     f"use Python {'.'.join(map(str, MIN_PYTHON))} or newer (image {nodeinstall.CUDA_IMAGE} has 3.12)"),
              compiler_check()]
    if dry and checks[1]["ok"] is False:  # the dry run trains with compile=false: say it, go on
        checks[1] = {**checks[1], "ok": None, "detail": checks[1]["detail"] + " (a GPU run with compile=true would fail)"}
    import torch  # a few seconds; after the checks that need nothing

    env.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
    if dry:
        checks.append(_check("GPU", None, "dry run: tiny sizes on the CPU, no GPU checked"))
        return checks, env
    smi, why = nvidia_smi()
    env["nvidia_smi"] = smi
    if smi is None:
        checks.append(_check("nvidia-smi", False, why, f"boot a GPU image ({nodeinstall.CUDA_IMAGE}) or install the driver"))
        return checks, env
    driver, cuda, gpus = nodeinstall.parse_nvidia_smi(smi)
    env.update(driver=driver, driver_cuda=f"{cuda[0]}.{cuda[1]}" if cuda else None)
    checks.append(driver_check(smi, torch.version.cuda))
    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = [torch.cuda.get_device_name(i) for i in range(seen)]
    env["gpus"] = names
    listed = nodeinstall.gpu_models(smi)
    model = names[0] if names else (listed[0] if listed else "none")
    known = memory.peak_flops(model, "bfloat16") is not None
    restricted = "CUDA_VISIBLE_DEVICES" in os.environ  # fewer than nvidia-smi lists, on purpose
    checks.append(_check("GPU", bool(seen) and (seen == gpus or restricted),
                         f"{seen} of {gpus} GPU(s) nvidia-smi lists are visible to torch: {model}"
                         + ("" if known else " (no data-sheet peak here: no MFU)"),
                         "fix the driver/torch pair (above) or CUDA_VISIBLE_DEVICES"))
    return checks, env


# ---------------------------------------------------------------------------------------------
# The measured steps and their verdicts


def bench_step(name: str, args: list[str], out: Path, budget: float) -> dict[str, Any]:
    """One `nanorepro bench`; its record (or why there is none)."""
    record = out / f"{name}.json"
    record.unlink(missing_ok=True)
    step = run_step([sys.executable, "-m", "nanorepro", "bench", *args, "--out", str(record)], budget, out / f"{name}.log")
    if record.exists():
        step["record"] = json.loads(record.read_text())
    return step


def why_not(step: dict[str, Any]) -> str:
    if step.get("timed_out"):
        return f"not measured: past its {step['budget_s']:.0f} s budget (killed; log {step['log']})"
    return f"not measured: exit {step['exit']} (log {step['log']})"


def _runs(rec: dict[str, Any], impl: str) -> list[dict[str, Any]]:
    return [r for r in rec["runs"] if r["impl"] == impl]


def _figures(run: dict[str, Any]) -> str:
    ms, mfu = run.get("ms_per_iter"), run.get("mfu")
    return ", ".join(filter(None, [ms and f"{ms['median']:.1f} ms/iter", mfu is not None and f"MFU {100 * mfu:.1f}%"]))


def target_row(claim: str, step: dict[str, Any], target: float, expected: str, impl: str = "nanorepro") -> dict[str, Any]:
    """A time-to-target claim: met only when an evaluation reached the target."""
    row = {"claim": claim, "expected": expected}
    rec = step.get("record")
    if not rec:
        return {**row, "measured": why_not(step), "verdict": "not measured"}
    (run,) = _runs(rec, impl)[:1] or [None]
    if run is None:
        return {**row, "measured": "no run recorded", "verdict": "not measured"}
    t = run.get("target") or {}
    best = min((e["val_loss"] for e in run.get("evals") or []), default=None)
    if t.get("reached"):
        measured = f"val {t['val_loss']:.4f} <= {target} at iter {t['iter']} after {t['wall_s']:.1f} s"
        verdict = "met"
    else:
        measured = f"val <= {target} not reached: best {best:.4f}" if best is not None else f"val <= {target} not reached"
        measured += f" after {run['wall_s']:.1f} s"
        verdict = "missed"
    figures = _figures(run)
    return {**row, "measured": measured + (f"; {figures}" if figures else ""), "verdict": verdict,
            "seconds_to_target": t.get("wall_s"), "best_val": best}


def tests_row(step: dict[str, Any]) -> dict[str, Any]:
    """The gpu tests: met when pytest reports passes and no failure or error."""
    row = {"claim": "what only a CUDA GPU shows (pytest -m gpu tests/test_gpu.py)", "expected": "all pass"}
    if step.get("timed_out"):
        return {**row, "measured": why_not(step), "verdict": "not measured"}
    text = Path(step["log"]).read_text(errors="replace")
    counts = dict((k, int(n)) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", text))
    passed, bad = counts.get("passed", 0), counts.get("failed", 0) + counts.get("error", 0) + counts.get("errors", 0)
    ok = step["exit"] == 0 and passed > 0 and not bad
    measured = ", ".join(f"{n} {k}" for k, n in counts.items()) or f"no summary (exit {step['exit']})"
    return {**row, "measured": measured, "verdict": "met" if ok else "missed"}


def dry_tests_row(step: dict[str, Any]) -> dict[str, Any]:
    text = Path(step["log"]).read_text(errors="replace")
    n = re.search(r"(\d+) tests? collected", text)
    ok = step["exit"] == 0 and bool(n) and int(n[1]) > 0
    return {"claim": "the gpu tests collect with the train and test extras", "expected": "collected, no error",
            "measured": f"{n[1]} collected" if n else f"exit {step['exit']}", "verdict": "met" if ok else "missed"}


def xl_row(step: dict[str, Any], dry: bool, xl: dict[str, Any]) -> dict[str, Any]:
    """gpt2-xl's shape: the steps ran; peak memory within what nanorepro's estimate says (it must bound the
    run: the fit check relies on it); MFU against the 30% the time estimates assume."""
    cfg = resolve("finetune-shakespeare", {"init_from": "scratch", **xl})
    shape = cfg.model_config(xl.get("vocab_size", 50304))
    est = memory.estimate_for(cfg, shape, "float32" if dry else "bfloat16").total
    row = {"claim": "gpt2-xl's shape, fine-tune recipe (1 x 32 x 1024 tokens)",
           "expected": f"peak <= estimate {est / 2**30:.1f} GiB; MFU >= {memory.ASSUMED_MFU:.0%} (what time estimates assume)"}
    rec = step.get("record")
    if not rec:
        return {**row, "measured": why_not(step), "verdict": "not measured"}
    (run,) = _runs(rec, "nanorepro")
    peak = (run.get("peak_memory_mb") or 0) * 2**20
    mfu = run.get("mfu")
    measured = f"{_figures(run)}; peak {peak / 2**30:.1f} GiB"
    if not run.get("ms_per_iter"):
        verdict = "missed"
    elif not dry and peak > est:  # a CPU's peak is the process's RSS (torch itself included): not comparable
        verdict = "missed: peak above the estimate"
    elif dry or mfu is None:
        verdict = "met" if dry else "met (no MFU: unknown GPU)"
    else:
        verdict = "met" if mfu >= memory.ASSUMED_MFU else f"missed: MFU below {memory.ASSUMED_MFU:.0%}"
    return {**row, "measured": measured, "verdict": verdict, "peak_bytes": peak, "estimate_bytes": est, "mfu": mfu}


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks the script, measures nothing")
    ap.add_argument("--nanogpt", help="a nanoGPT checkout to run beside the faithful preset")
    ap.add_argument("--out", default="results/gpu", help="folder for the logs and gpu.json")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"which of {', '.join(STEPS)} (comma-separated)")
    ap.add_argument("--target-loss", type=float, help=f"val loss the runs aim at (default {A100_TARGET}; dry run 4.0)")
    args = ap.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if unknown := [s for s in steps if s not in STEPS]:
        ap.error(f"unknown step(s) {', '.join(unknown)}: pick from {', '.join(STEPS)}")
    dry = args.dry_run
    target = args.target_loss if args.target_loss is not None else (4.0 if dry else A100_TARGET)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    budget = sum(BUDGETS[s] for s in ("preflight", "prepare", *steps)) + (NANOGPT_BUDGET if args.nanogpt else 0)
    print(f"benchmarks/gpu.sh: steps {', '.join(steps)}; at most {budget / 60:.1f} min in all", flush=True)
    record: dict[str, Any] = {"kind": "gpu-check", "dry_run": dry, "target_loss": target, "budget_s": budget,
                              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "steps": {}, "rows": []}

    started = time.monotonic()
    checks, env = preflight(dry)
    record.update(preflight=checks, environment=env)
    for c in checks:
        mark = "ok" if c["ok"] else "skipped" if c["ok"] is None else "FAILED"
        print(f"   preflight {c['check']}: {mark}: {c['detail']}" + (f"\n      fix: {c['fix']}" if c["fix"] else ""))
    print(f"   preflight took {time.monotonic() - started:.1f} s", flush=True)
    if any(c["ok"] is False for c in checks):
        (out / "gpu.json").write_text(json.dumps(record, indent=2) + "\n")
        print("preflight failed: nothing was trained (fix above, then run it again)", file=sys.stderr)
        return 2

    data = out / "data"
    prep = run_step([sys.executable, "-m", "nanorepro", "prepare", "--data-root", str(data)], BUDGETS["prepare"],
                    out / "prepare.log")
    if prep["exit"] != 0:
        print(f"preparing the data failed: see {out / 'prepare.log'}", file=sys.stderr)
        return 2
    device = ["--device=cpu"] if dry else ["--device=cuda"]
    tiny = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=2",
            "--compile=false", "--dtype=float32"] if dry else []
    common = [f"--data_root={data}", *device]

    if "gpu-tests" in steps:
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/test_gpu.py"]
        step = run_step(cmd + (["--collect-only"] if dry else []), BUDGETS["gpu-tests"], out / "pytest-gpu.log")
        record["steps"]["gpu-tests"] = step
        record["rows"].append(dry_tests_row(step) if dry else tests_row(step))

    if "shakespeare-char" in steps:
        args_ = ["--preset", "shakespeare-char", "--target-loss", str(target), *common, *tiny,
                 *(["--max_iters=40", "--eval_interval=10"] if dry else [])]
        if args.nanogpt:
            args_ += ["--nanogpt", args.nanogpt, "--pairs", "1"]
        step = bench_step("shakespeare-char", args_, out,
                          BUDGETS["shakespeare-char"] + (NANOGPT_BUDGET if args.nanogpt else 0))
        record["steps"]["shakespeare-char"] = step
        expected = f"val <= {target} (nanoGPT's best on one A100, ~3 min)"
        record["rows"].append(target_row(f"shakespeare-char to val <= {target}", step, target, expected))
        if args.nanogpt:
            record["rows"].append(target_row(f"nanoGPT's own run to val <= {target}", step, target,
                                             "the same recipe, same machine", impl="nanogpt"))

    if "gpu-fast" in steps:
        step = bench_step("gpu-fast", ["--preset", "shakespeare-char-gpu-fast", "--target-loss", str(target), *common,
                                       *tiny, *(["--max_iters=40", "--eval_interval=10"] if dry else [])],
                          out, BUDGETS["gpu-fast"])
        record["steps"]["gpu-fast"] = step
        row = target_row(f"shakespeare-char-gpu-fast to val <= {target}", step, target,
                         f"val <= {target}, faster than shakespeare-char")
        faithful = next((r for r in record["rows"] if r["claim"].startswith("shakespeare-char to")), None)
        if row["verdict"] == "met" and faithful and faithful.get("seconds_to_target") and not dry:  # tiny: noise
            ratio = row["seconds_to_target"] / faithful["seconds_to_target"]
            row["measured"] += f"; {ratio:.2f}x shakespeare-char's time"
            if ratio >= 1:
                row["verdict"] = "missed: not faster than shakespeare-char"
        record["rows"].append(row)

    if "gpt2-xl" in steps:
        xl = ({"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "gradient_accumulation_steps": 2,
               "compile": False, "dtype": "float32"} if dry else dict(XL_SHAPE))
        step = bench_step("gpt2-xl", ["--preset", "finetune-shakespeare", "--init_from=scratch", "--iters",
                                      "3" if dry else "6", "--warmup", "1" if dry else "2", "--eval_interval=1000",
                                      *common, *(f"--{k}={v}" for k, v in xl.items())], out, BUDGETS["gpt2-xl"])
        record["steps"]["gpt2-xl"] = step
        record["rows"].append(xl_row(step, dry, xl))

    record["seconds"] = round(time.monotonic() - started, 1)
    (out / "gpu.json").write_text(json.dumps(record, indent=2) + "\n")
    gpu = ", ".join(env.get("gpus") or []) or ("CPU (dry run)" if dry else "?")
    print(f"\n{gpu}; driver {env.get('driver') or '-'}; torch {env['torch']} (CUDA build {env['torch_cuda']}); "
          f"{record['seconds']:.0f} s of a {budget:.0f} s budget\n")
    print("| claim | measured | expected | verdict |\n|---|---|---|---|")
    for r in record["rows"]:
        print(f"| {r['claim']} | {r['measured']} | {r['expected']} | {r['verdict']} |")
    print(f"\nrecord: {out / 'gpu.json'}")
    return 0 if all(r["verdict"] == "met" or r["verdict"].startswith("met ") for r in record["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
