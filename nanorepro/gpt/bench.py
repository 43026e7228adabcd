"""`nanorepro bench`: how fast a preset trains here, optionally side by side with upstream nanoGPT.

Every run is a fresh child process doing exactly what a user types (`nanorepro train ...`, or
nanoGPT's `python train.py ...`), so start-up, evaluation and checkpoints cost what they cost.
From each run the bench takes per-iteration times after `warmup` (evaluations left out; a mean per
logging window, at the preset's own log_interval: the run syncs and logs as often as for a user),
tokens/s and MFU (nanoGPT's 6N + 12LHQT FLOPs per token) against the device's peak (a data sheet's
for known GPUs, a timed matmul on CPUs), peak memory, and with a target loss the wall time from
launch to the first evaluation at or below it (the run is then stopped), and the compute floor: how
long the training steps to that evaluation would take at the peak, which no code for the same
recipe can beat on that device.

Side by side (`nanogpt=PATH`): nanoGPT is never vendored. Its files are copied from the user's
checkout into a temp folder, whose data/shakespeare_char is made by nanoGPT's own prepare.py from
the same input.txt and checked byte for byte against ours. The two then run alternately (ours,
nanoGPT, nanoGPT, ours, ...) with the same config, and each pair gives a ratio.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from nanorepro import __version__, envinfo, fmt, metrics
from nanorepro import config as config_mod
from nanorepro.config import Config
from nanorepro.data import dataset
from nanorepro.errors import UserError
from nanorepro.files import sha256_file
from nanorepro.gpt import hardware

NANOGPT_FILES = ("train.py", "model.py", "configurator.py", "data/shakespeare_char/prepare.py")
# nanoGPT's command-line knobs that nanorepro's Config shares, by the same names
NANOGPT_FIELDS = ("batch_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias",
                  "gradient_accumulation_steps", "max_iters", "learning_rate", "weight_decay", "beta1", "beta2",
                  "grad_clip", "decay_lr", "warmup_iters", "lr_decay_iters", "min_lr", "eval_interval",
                  "eval_iters", "log_interval", "always_save_checkpoint", "compile")
NANOGPT_ITER_RE = re.compile(r"^iter (\d+): loss [-\d.naif]+, time ([\d.]+)ms")


def stats(values: list[float]) -> dict[str, float | int] | None:
    """Median and spread of a sample (None when empty)."""
    if not values:
        return None
    s = sorted(values)
    return {"n": len(s), "median": statistics.median(s), "p10": s[round(0.1 * (len(s) - 1))],
            "p90": s[round(0.9 * (len(s) - 1))], "min": s[0], "max": s[-1], "mean": statistics.fmean(s)}


def flops_per_iter(cfg: Config, vocab_size: int) -> tuple[int, float]:
    """(non-embedding parameter count, training FLOPs per iteration), as nanoGPT's estimate_mfu counts them."""
    model_cfg = cfg.model_config(vocab_size)
    return model_cfg.non_embedding_params, model_cfg.flops_per_token() * cfg.tokens_per_iter


def training_flops(cfg: Config, vocab_size: int, iters: int) -> float:
    """FLOPs of a run's first `iters` optimizer steps, as flops_per_iter counts them; a run that starts with
    fewer blocks (grow_from_layers) counts its steps before grow_iter at that depth."""
    full = flops_per_iter(cfg, vocab_size)[1]
    if not cfg.grow_from_layers:
        return iters * full
    shallow = flops_per_iter(dataclasses.replace(cfg, n_layer=cfg.grow_from_layers), vocab_size)[1]
    early = min(iters, cfg.grow_iter)
    return early * shallow + (iters - early) * full


def compute_floor_s(run: dict[str, Any], cfg: Config, vocab_size: int, peak: float | None) -> float | None:
    """The least time the training steps up to the run's target could take at the device's peak (MFU 100%; no
    optimizer, evaluation or start-up): a goal below it needs a recipe with fewer FLOPs, not faster code."""
    target = run.get("target") or {}
    if not (target.get("reached") and peak):
        return None
    return training_flops(cfg, vocab_size, target["iter"]) / peak


def nanogpt_args(cfg: Config, device: str, out_dir: Path) -> list[str]:
    """nanoGPT command-line overrides reproducing `cfg` (its configurator wants Python literals of the right type)."""
    if cfg.init_from != "scratch":
        raise UserError(f"side-by-side runs train from scratch; this config has init_from={cfg.init_from}",
                        "use a from-scratch preset (shakespeare-char, shakespeare-char-cpu, ...)")
    if cfg.dataset != "shakespeare_char":
        raise UserError(f"side-by-side supports the shakespeare_char dataset, not {cfg.dataset}",
                        "use a shakespeare_char preset")
    args = [f"--dataset={cfg.dataset}", f"--out_dir={out_dir}", f"--device={device}"]
    args += [f"--{k}={getattr(cfg, k)!r}" for k in NANOGPT_FIELDS]
    if cfg.dtype in ("float32", "bfloat16", "float16"):
        args.append(f"--dtype={cfg.dtype}")  # auto/fast: nanoGPT's default (bf16 or fp16 on CUDA; CPU is float32)
    return args


def _input_text(meta: dict[str, Any], input_path: str | None) -> Path:
    """A local file holding the exact text our dataset was made from (sha256 checked)."""
    want = meta.get("source_sha256")
    candidates = [Path(input_path or meta.get("source") or "")]
    if not input_path and want == dataset.SHAKESPEARE_SHA256:
        candidates.append(dataset.shakespeare_file())
    for path in candidates:
        if path.is_file() and sha256_file(path) == want:
            return path
    raise UserError(f"no local copy of the text dataset {meta.get('name')} was made from (sha256 {str(want)[:12]}...)",
                    "pass it with --input (the same input.txt given to `nanorepro prepare`)")


def prepare_nanogpt(checkout: str | Path, data_dir: Path, workdir: Path, input_path: str | None = None) -> Path:
    """A temp copy of nanoGPT with data/shakespeare_char made by its own prepare.py; returns its folder."""
    checkout = Path(checkout).expanduser()
    missing = [f for f in NANOGPT_FILES if not (checkout / f).is_file()]
    if missing:
        raise UserError(f"{checkout} is not a nanoGPT checkout (missing {', '.join(missing)})",
                        "git clone https://github.com/karpathy/nanoGPT and pass its folder to --nanogpt")
    dest = workdir / "nanoGPT"
    for f in NANOGPT_FILES:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(checkout / f, dest / f)
    prep = dest / "data" / "shakespeare_char"
    # prepare.py downloads input.txt only when it is absent: give it ours
    shutil.copyfile(_input_text(dataset.load_meta(data_dir), input_path), prep / "input.txt")
    done = subprocess.run([sys.executable, "prepare.py"], cwd=prep, capture_output=True, text=True)
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise UserError(f"nanoGPT's data/shakespeare_char/prepare.py failed: {tail}",
                        "it needs numpy and requests in this Python environment")
    for split in ("train", "val"):
        ours, theirs = data_dir / f"{split}.bin", prep / f"{split}.bin"
        if not theirs.is_file() or sha256_file(ours) != sha256_file(theirs):
            raise UserError(f"nanoGPT's {split}.bin differs from {ours}: the two would not train on the same data",
                            "re-run `nanorepro prepare` on the same input.txt, or pass it with --input")
    return dest


@dataclasses.dataclass
class _Child:
    """A child process whose stdout lines are read, time-stamped, by a thread."""

    proc: subprocess.Popen
    started: float = dataclasses.field(default_factory=time.perf_counter)
    lines: list[tuple[float, str]] = dataclasses.field(default_factory=list)
    rusage: Any = None

    def __post_init__(self) -> None:
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        with self.proc.stdout:
            for line in self.proc.stdout:
                self.lines.append((time.perf_counter() - self.started, line.rstrip("\n")))

    def poll(self, block: bool = False) -> int | None:
        """The exit code once the child ended, else None. Reaps it with wait4 (never Popen.poll,
        which would reap it first) to keep its resource usage, the max RSS, for the record."""
        if self.proc.returncode is None:
            pid, status, rusage = os.wait4(self.proc.pid, 0 if block else os.WNOHANG)
            if pid:
                self.rusage = rusage
                self.proc.returncode = os.waitstatus_to_exitcode(status)
        return self.proc.returncode

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)


def _evals(lines: list[tuple[float, str]]) -> list[tuple[float, int, float]]:
    """(seconds since launch, iteration, val loss) of each evaluation line."""
    return [(t, int(m.group(1)), float(m.group(3))) for t, line in lines if (m := metrics.EVAL_LINE.search(line))]


def _first_at(lines: list[tuple[float, str]], target_loss: float) -> tuple[float, int, float] | None:
    """The first evaluation at or below `target_loss`, if any."""
    return next((e for e in _evals(lines) if e[2] <= target_loss), None)


def run_one(impl: str, cmd: list[str], cwd: Path, env: dict[str, str], workdir: Path, label: str,
            total_iters: int, target_loss: float | None, progress_of) -> dict[str, Any]:
    """Launch one training child, follow it (progress bar, target loss), reap it; return the raw facts."""
    log = workdir / f"{label}.stderr"
    with open(log, "w") as err:
        child = _Child(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                                        bufsize=1, start_new_session=True))
    target = None
    try:
        with tqdm(total=total_iters, desc=label, unit="it", dynamic_ncols=True, mininterval=1.0, leave=False) as bar:
            while child.poll() is None:
                time.sleep(0.1)
                bar.update(max(0, progress_of(child) - bar.n))
                if target_loss is not None and target is None:
                    target = _first_at(child.lines, target_loss)
                    if target:
                        child.stop()
    finally:  # Ctrl-C or SIGTERM here: the child runs in its own session, so it must be stopped by hand
        if child.poll() is None:
            child.stop()
            child.poll(block=True)
    code = child.poll(block=True)
    wall = time.perf_counter() - child.started
    child.reader.join(timeout=5)  # the last lines
    if target_loss is not None and target is None:
        target = _first_at(child.lines, target_loss)
    if code != 0 and target is None:
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-4:])
        raise UserError(f"{impl} run {label} failed with exit code {code}: {tail}",
                        "run the same config with `nanorepro train` to see the whole error")
    return {"impl": impl, "label": label, "command": cmd, "exit_code": code, "wall_s": wall,
            "max_rss_mb": child.rusage.ru_maxrss / 1024 if child.rusage else None,
            # CPU seconds (user + system) the child used: with OMP_NUM_THREADS=1, a measure that
            # other processes competing for the cores barely change, unlike wall time
            "cpu_s": child.rusage.ru_utime + child.rusage.ru_stime if child.rusage else None,
            "evals": [{"iter": i, "val_loss": v, "wall_s": t} for t, i, v in _evals(child.lines)],
            "target": None if target_loss is None else {
                "loss": target_loss, "reached": target is not None,
                "wall_s": target[0] if target else None, "iter": target[1] if target else None,
                "val_loss": target[2] if target else None},
            "lines": child.lines}


def _ours_steps(run_dir: Path, eval_interval: int) -> tuple[list[tuple[int, float]], dict[str, Any]]:
    """[(first step, seconds per step)] of each logging window (log_interval steps; one with
    log_interval=1), and the end record (if any). A train record at iter k gives the mean time of the
    steps since the previous record or evaluation, whichever came later (train keeps evaluations out
    of it): the run syncs and writes only at its own log_interval, as nanoGPT does."""
    records = metrics.read(run_dir / metrics.METRICS_FILE) if (run_dir / metrics.METRICS_FILE).exists() else []
    steps, start = [], None
    for r in records:
        if r.get("kind") == "eval":
            start = r["iter"]  # the evaluation at k runs before step k
        elif r.get("kind") == "train":
            if start is not None and r["iter"] > start:  # a resumed run's first window has no known start
                steps.append((start, r["ms_per_iter"] / 1000))
            start = r["iter"]
    ends = metrics.of_kind(records, "end")
    return steps, {**(metrics.meta(records) or {}), **({"end": ends[-1]} if ends else {})}


def _nanogpt_steps(lines: list[tuple[float, str]], eval_interval: int) -> list[tuple[int, float]]:
    # nanoGPT's dt at an eval iteration includes the eval
    return [(int(m.group(1)), float(m.group(2)) / 1000) for _, line in lines
            if (m := NANOGPT_ITER_RE.match(line)) and int(m.group(1)) % eval_interval]


def _run_ours(preset: str | None, overrides_cli: list[str], cfg: Config, workdir: Path, label: str,
              env: dict[str, str], target_loss: float | None) -> dict[str, Any]:
    """One `nanorepro train` child; its steps from metrics.jsonl, its dtype and peak memory from its records."""
    run_dir = workdir / label
    cmd = [sys.executable, "-m", "nanorepro", "train", "--out-dir", str(run_dir),
           *(["--preset", preset] if preset else []), *overrides_cli]
    run = run_one("nanorepro", cmd, Path.cwd(), env, workdir, label, cfg.max_iters, target_loss,
                  lambda child: _last_iter(run_dir / metrics.METRICS_FILE))
    run["steps"], info = _ours_steps(run_dir, cfg.eval_interval)
    run["dtype"], run["threads"] = info.get("dtype"), info.get("threads")  # dtype=fast resolved by the run
    peak_bytes = (info.get("end") or {}).get("peak_memory_bytes")
    run["peak_memory_mb"] = peak_bytes / 2**20 if peak_bytes else run["max_rss_mb"]
    return run


def _run_nanogpt(upstream: Path, cfg: Config, device: str, workdir: Path, label: str, env: dict[str, str],
                 target_loss: float | None) -> dict[str, Any]:
    """One nanoGPT `python train.py ...` child in the prepared copy; its steps from its own log lines."""
    def progress(child: _Child) -> int:
        its = [int(m.group(1)) for _, line in child.lines[-5:] if (m := NANOGPT_ITER_RE.match(line))]
        return its[-1] if its else 0

    cmd = [sys.executable, "train.py", *nanogpt_args(cfg, device, workdir / label)]
    run = run_one("nanogpt", cmd, upstream, env, workdir, label, cfg.max_iters, target_loss, progress)
    run["steps"] = _nanogpt_steps(run["lines"], cfg.eval_interval)
    # nanoGPT autocasts only on CUDA: on a CPU it trains in float32 whatever --dtype says
    run["dtype"] = "float32" if device == "cpu" else hardware.pick_device(cfg.device, cfg.dtype)[1]
    run["peak_memory_mb"] = run["max_rss_mb"]  # host memory: nanoGPT does not report its CUDA peak
    return run


def _summarise(run: dict[str, Any], warmup: int, cfg: Config, flops: float, peak: float | None) -> dict[str, Any]:
    """The run's record: step-time statistics after warm-up, tokens/s and MFU at the median step. A run that
    starts with fewer blocks is timed from grow_iter on: the FLOPs counted are the whole network's."""
    grown = cfg.grow_from_layers and run["impl"] == "nanorepro"  # a log line averages the log_interval steps before it
    first = max(warmup, cfg.grow_iter + cfg.log_interval if grown else 0)
    ms = stats([s * 1000 for k, s in run["steps"] if k >= first])
    run = {k: v for k, v in run.items() if k not in ("lines", "steps")}
    run["ms_per_iter"] = ms
    if ms:
        dt = ms["median"] / 1000
        run["tokens_per_s"] = cfg.tokens_per_iter / dt
        run["flops_per_s"] = flops / dt
        run["mfu"] = flops / dt / peak if peak else None
    return run


def bench(preset: str | None = None, overrides: dict[str, Any] | None = None, iters: int = 50, warmup: int = 10,
          target_loss: float | None = None, out: str | Path | None = None, nanogpt: str | Path | None = None,
          nanogpt_preset: str | None = None, pairs: int = 1, input_path: str | None = None,
          keep: bool = False) -> dict[str, Any]:
    """Benchmark a preset (plus overrides), write a JSON record and return it. Without `target_loss`
    each run trains `warmup + iters` iterations, evaluating only at the two ends; with it, the config
    as given until an evaluation reaches the target. With `nanogpt`, upstream runs the same config
    (or `nanogpt_preset`) alternately with ours, `pairs` times."""
    if iters < 1 or warmup < 0 or pairs < 1:
        raise UserError(f"need iters >= 1, warmup >= 0, pairs >= 1 (got {iters}, {warmup}, {pairs})",
                        "e.g. --iters 50 --warmup 10 --pairs 3")
    overrides = dict(overrides or {})
    forced: dict[str, Any] = {}  # the preset's log_interval: the host syncs and logs as often as it would
    if target_loss is None:
        n = warmup + iters
        # every block from the first step: a throughput run times the whole network's step
        forced.update(max_iters=n, eval_interval=n, eval_iters=1, eval_whole_val=False, always_save_checkpoint=False,
                      save_checkpoint=False, grow_from_layers=0, grow_by="zero")
    runs_cfg = {k: v for k, v in forced.items() if k not in overrides}
    cfg = config_mod.resolve(preset, {**overrides, **runs_cfg})
    if nanogpt and cfg.grow_from_layers and not nanogpt_preset:
        raise UserError("nanoGPT cannot start with fewer blocks (grow_from_layers), so it would train another run",
                        "give --nanogpt-preset, or leave grow_from_layers unset")
    if cfg.eval_interval <= warmup and target_loss is None:
        raise UserError("eval_interval must exceed warmup", "leave eval_interval unset for throughput runs")
    device, dtype = hardware.pick_device(cfg.device, cfg.dtype, hardware.gpu_required_by(preset))
    data_dir = Path(cfg.data_root) / cfg.dataset
    meta = dataset.load_meta(data_dir)
    n_params, flops = flops_per_iter(cfg, meta["vocab_size"])
    other_cfg = (config_mod.resolve(nanogpt_preset, {**overrides, **runs_cfg, "grow_from_layers": 0})
                 if nanogpt_preset else cfg)
    if nanogpt and other_cfg.dataset != cfg.dataset:
        raise UserError("the nanoGPT preset uses another dataset", "pick presets on the same dataset")

    workdir = Path(tempfile.mkdtemp(prefix="nanorepro-bench-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    pkg_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pkg_parent, env.get("PYTHONPATH")]))
    load_before = os.getloadavg()
    main_thread = threading.current_thread() is threading.main_thread()
    # SIGTERM unwinds like Ctrl-C, stopping the run it started (run_one), instead of leaving it running
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main_thread else None
    try:
        upstream = prepare_nanogpt(nanogpt, data_dir, workdir, input_path) if nanogpt else None
        overrides_cli = [f"--{k}={v}" for k, v in {**overrides, **runs_cfg}.items()]
        results: list[dict[str, Any]] = []
        ours_dtype = dtype
        peak_for = functools.cache(lambda dt: hardware.peak_flops(device, dt))  # a CPU's is timed: once per dtype
        for pair in range(pairs):
            order = ["nanorepro", "nanogpt"] if pair % 2 == 0 else ["nanogpt", "nanorepro"]
            for impl in order if upstream else ["nanorepro"]:
                label = f"{impl}-{pair + 1}"
                if impl == "nanorepro":
                    run = _run_ours(preset, overrides_cli, cfg, workdir, label, env, target_loss)
                    ours_dtype = run["dtype"] or dtype
                    run_cfg = cfg
                else:
                    run = _run_nanogpt(upstream, other_cfg, device, workdir, label, env, target_loss)
                    run_cfg = other_cfg
                peak, peak_src = peak_for(run["dtype"] or dtype)
                run = _summarise(run, warmup, run_cfg, flops_per_iter(run_cfg, meta["vocab_size"])[1], peak)
                run.update(pair=pair + 1, peak_flops=peak, peak_source=peak_src,
                           compute_floor_s=compute_floor_s(run, run_cfg, meta["vocab_size"], peak))
                results.append(run)
                print(_run_line(run), flush=True)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        if keep:
            print(f"kept the bench folder {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    record = {
        "kind": "bench", "nanorepro": __version__, "created": fmt.utc_timestamp(),
        "preset": preset, "nanogpt_preset": (nanogpt_preset or preset) if nanogpt else None,
        "overrides": overrides, "forced": runs_cfg, "config": cfg.to_dict(), "device": device,
        "dtype": ours_dtype, "host": _host(device), "cpu_features": hardware.cpu_features(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpu_affinity": _affinity(),
        "torch": torch.__version__, "n_params": n_params, "flops_per_iter": flops,
        "tokens_per_iter": cfg.tokens_per_iter, "iters": iters, "warmup": warmup, "target_loss": target_loss,
        "nanogpt": str(nanogpt) if nanogpt else None, "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()), "runs": results,
    }
    record["summary"] = _summary(record)
    record["summary_line"] = summary_line(record)
    out = Path(out) if out else Path("results") / "bench" / (
        f"{preset or 'custom'}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n")
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror}", "pass a writable --out") from e
    record["out"] = str(out)
    print(record["summary_line"])
    print(f"wrote {out}")
    return record


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _last_iter(path: Path) -> int:
    """The iteration of the last complete line of a growing metrics.jsonl (0 when none)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line).get("iter", 0))
        except (ValueError, AttributeError):
            continue
    return 0


def _affinity() -> list[int] | None:
    """The CPUs the bench (and its runs, which inherit it) may use: `taskset -c 0` shows as [0]."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def _host(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return (f"{envinfo.cpu_model()}, {hardware.physical_cores()} physical cores, "
            f"{hardware.describe_cpu_features(hardware.cpu_features())}")


def _same_progress(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Time for the same progress: when nanoGPT's run first reached its best validation loss, and when
    ours first got at or below that loss (None if it never did). Unlike a fixed target, this compares any
    two runs, however far each goes, and favours neither: both pay their own evaluations."""
    if not theirs:
        return None
    best = min(e["val_loss"] for e in theirs)
    tb = next(e for e in theirs if e["val_loss"] == best)
    ta = next((e for e in ours if e["val_loss"] <= best), None)
    return {"val_loss": best, "nanogpt_s": tb["wall_s"], "nanogpt_iter": tb["iter"],
            "nanorepro_s": ta["wall_s"] if ta else None, "nanorepro_iter": ta["iter"] if ta else None,
            "ratio": ta["wall_s"] / tb["wall_s"] if ta else None}


def _summary(record: dict[str, Any]) -> dict[str, Any]:
    """Medians over runs per implementation, and per-pair ratios (nanoGPT / nanorepro: above 1 is ours faster)."""
    out: dict[str, Any] = {}
    def median(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    for impl in ("nanorepro", "nanogpt"):
        runs = [r for r in record["runs"] if r["impl"] == impl]
        if not runs:
            continue
        tt = [r["target"]["wall_s"] for r in runs if r.get("target") and r["target"]["reached"]]
        out[impl] = {
            "runs": len(runs),
            "ms_per_iter_median": median([r["ms_per_iter"]["median"] for r in runs if r.get("ms_per_iter")]),
            "tokens_per_s_median": median([r["tokens_per_s"] for r in runs if "tokens_per_s" in r]),
            "mfu_median": median([r["mfu"] for r in runs if r.get("mfu") is not None]),
            "peak_memory_mb_max": max((r["peak_memory_mb"] or 0) for r in runs),
            "wall_s_median": statistics.median([r["wall_s"] for r in runs]),
            "cpu_s_median": statistics.median([r.get("cpu_s") or 0 for r in runs]),
            "target_reached": (f"{len(tt)}/{len(runs)}" if record["target_loss"] is not None else None),
            "time_to_target_s_median": median(tt),
            "compute_floor_s_median": median([r["compute_floor_s"] for r in runs if r.get("compute_floor_s")]),
        }
    pairs = []
    for p in sorted({r["pair"] for r in record["runs"]}):
        by = {r["impl"]: r for r in record["runs"] if r["pair"] == p}
        if len(by) < 2:
            continue
        a, b = by["nanorepro"], by["nanogpt"]
        pair: dict[str, Any] = {"pair": p}
        # per-iteration speed compares only like with like: not when nanoGPT runs another preset
        if a.get("ms_per_iter") and b.get("ms_per_iter") and record.get("nanogpt_preset") in (None, record["preset"]):
            pair["speedup_per_iter"] = b["ms_per_iter"]["median"] / a["ms_per_iter"]["median"]
        if a.get("cpu_s") and b.get("cpu_s"):
            pair["cpu_s_ratio"] = a["cpu_s"] / b["cpu_s"]  # whole runs (stopped at the target, if any)
        if record["target_loss"] is not None:
            ta = a["target"]["wall_s"] if a["target"]["reached"] else None
            # nanoGPT missing the target: its whole run is the time it needed (a lower bound on the ratio)
            tb = b["target"]["wall_s"] if b["target"]["reached"] else b["wall_s"]
            pair["nanogpt_reached_target"] = b["target"]["reached"]
            pair["time_to_target_ratio"] = (ta / tb) if ta is not None else None
            if a.get("compute_floor_s"):  # the ratio no code could beat with this recipe on this device
                pair["compute_floor_ratio"] = a["compute_floor_s"] / tb
        # a throughput run evaluates on eval_iters=1 batch at its two ends: too noisy to compare progress on
        same = _same_progress(a.get("evals") or [], b.get("evals") or []) if record["target_loss"] is not None else None
        if same:
            pair["same_progress"] = same
        pairs.append(pair)
    if pairs:
        out["pairs"] = pairs
    return out


def _run_line(run: dict[str, Any]) -> str:
    ms = run.get("ms_per_iter")
    parts = [f"{run['label']}: " + (f"{ms['median']:.1f} ms/iter (p10 {ms['p10']:.1f}, p90 {ms['p90']:.1f}, "
                                    f"n={ms['n']})" if ms else "no timed iterations")]
    if run.get("tokens_per_s"):
        parts.append(f"{run['tokens_per_s'] / 1e3:.1f}k tok/s")
    if run.get("mfu") is not None:
        parts.append(f"MFU {100 * run['mfu']:.1f}%")
    if run.get("target"):
        t = run["target"]
        parts.append(f"val <= {t['loss']} at iter {t['iter']} after {t['wall_s']:.1f} s" if t["reached"]
                     else f"val <= {t['loss']} not reached")
    if run.get("compute_floor_s"):
        parts.append(f"{run['compute_floor_s']:.1f} s at the peak")
    parts.append(f"wall {run['wall_s']:.1f} s (CPU {run['cpu_s'] or 0:.1f} s), "
                 f"peak mem {run['peak_memory_mb'] or 0:.0f} MB")
    return ", ".join(parts)


def summary_line(record: dict[str, Any]) -> str:
    """One line: the preset, device, speed, MFU, memory, time to target, and ratios against nanoGPT."""
    s = record["summary"]
    ours = s.get("nanorepro", {})
    head = f"bench {record['preset'] or 'custom'} on {record['device']} ({record['host']}), {record['dtype']}"
    parts = [head]
    if ours.get("ms_per_iter_median"):
        parts.append(f"{ours['ms_per_iter_median']:.1f} ms/iter, {ours['tokens_per_s_median'] / 1e3:.1f}k tok/s")
    if ours.get("mfu_median") is not None:
        peak = next(r["peak_flops"] for r in record["runs"] if r["impl"] == "nanorepro")
        parts.append(f"MFU {100 * ours['mfu_median']:.1f}% of {peak / 1e9:.0f} GFLOP/s")
    parts.append(f"peak mem {ours.get('peak_memory_mb_max', 0):.0f} MB")
    if record["target_loss"] is not None:
        t = ours.get("time_to_target_s_median")
        parts.append(f"val <= {record['target_loss']} in {t:.1f} s ({ours['target_reached']} runs)" if t is not None
                     else f"val <= {record['target_loss']} not reached")
    ng = s.get("nanogpt")
    if ng:
        if ng.get("ms_per_iter_median"):
            mfu = f", MFU {100 * ng['mfu_median']:.1f}%" if ng.get("mfu_median") is not None else ""
            parts.append(f"nanoGPT {ng['ms_per_iter_median']:.1f} ms/iter{mfu}")
        ratios = [p["speedup_per_iter"] for p in s.get("pairs", []) if "speedup_per_iter" in p]
        if ratios:
            parts.append("speedup per pair " + ", ".join(f"{r:.2f}x" for r in ratios))
        tt = [p["time_to_target_ratio"] for p in s.get("pairs", []) if p.get("time_to_target_ratio") is not None]
        if tt:
            parts.append("time to target ours/nanoGPT " + ", ".join(f"{r:.2f}" for r in tt))
        floors = [p["compute_floor_ratio"] for p in s.get("pairs", []) if p.get("compute_floor_ratio") is not None]
        if floors:
            parts.append("at the peak, with no evaluation or start-up, at least "
                         + ", ".join(f"{r:.2f}" for r in floors))
        same = [p["same_progress"] for p in s.get("pairs", []) if p.get("same_progress")]
        if same:
            parts.append(f"time to nanoGPT's best val ({same[0]['val_loss']:.4f}) ours/nanoGPT "
                         + ", ".join(f"{p['ratio']:.2f}" if p["ratio"] is not None else "never" for p in same))
    return "; ".join(parts)
