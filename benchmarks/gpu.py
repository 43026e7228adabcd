"""One command that measures a GPU: `bash benchmarks/gpu.sh [--nanogpt PATH] [--out DIR]`.

At most ~10 minutes on one A100/H100/H200, no network. In order:
1. the environment (nvidia-smi, torch, CUDA) into the record;
2. the CUDA-only tests (`pytest -m gpu`: bf16 autocast, flash SDPA, torch.compile, fused AdamW,
   NCCL DDP/FSDP in one process, the memory estimate against the measured peak, and issue 18's GPU
   path: native-bf16 choice, cuda:N current, fp16 GradScaler resume, bf16 FSDP, sampling autocast);
3. the faithful `shakespeare-char` preset, timed per iteration (side by side with nanoGPT when
   --nanogpt gives a checkout);
4. the fast GPU preset trained to val <= 1.4697 (the baby GPT's published result);
5. a gpt2-xl-shaped model from random init with the fine-tune recipe: tokens/s, MFU, peak memory.
Then one table, and the whole record as JSON in --out.

`--dry-run` does the same on the CPU with tiny sizes (the test suite runs it), so the script cannot rot.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
A100_TARGET = 1.4697  # nanoGPT README: the baby GPT's best val loss on one A100


def run(cmd: list[str], timeout: float, log: Path) -> tuple[int, float]:
    """Run cmd with its output to log (and a one-line status here); (exit code, seconds)."""
    print(f"-> {' '.join(cmd)}", flush=True)
    started = time.monotonic()
    with open(log, "w") as f:
        try:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO).returncode
        except subprocess.TimeoutExpired:
            code = 124
    took = time.monotonic() - started
    print(f"   exit {code} in {took:.0f} s (log: {log})", flush=True)
    return code, took


def bench(name: str, args: list[str], out: Path, timeout: float) -> dict:
    """One `nanorepro bench` run; its record's summary, or why there is none."""
    record = out / f"{name}.json"
    code, took = run([sys.executable, "-m", "nanorepro", "bench", *args, "--out", str(record)], timeout,
                     out / f"{name}.log")
    if code != 0 or not record.exists():
        return {"status": f"failed (exit {code})", "seconds": took}
    rec = json.loads(record.read_text())
    return {"status": "ok", "seconds": took, "summary": rec["summary"], "line": rec["summary_line"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks the script, measures nothing")
    ap.add_argument("--nanogpt", help="a nanoGPT checkout to run side by side with the faithful preset")
    ap.add_argument("--out", default="results/gpu", help="folder for the logs and gpu.json")
    args = ap.parse_args()
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    dry = args.dry_run
    # Dry run: same steps, tiny models, a handful of iterations on the CPU.
    device = ["--device=cpu"] if dry else ["--device=cuda"]
    tiny = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=4", "--eval_iters=2",
            "--compile=false", "--dtype=float32"] if dry else []
    record: dict = {"kind": "gpu-check", "dry_run": dry, "steps": {}}

    # 1. environment
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True) if not dry else None
    record["nvidia_smi"] = smi.stdout.strip() if smi and smi.returncode == 0 else None
    import torch  # after argument parsing: --help stays instant

    record["torch"] = torch.__version__
    record["cuda"] = torch.version.cuda
    record["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if not dry and not record["gpus"]:
        print("no CUDA GPU visible to torch: run with --dry-run on a CPU machine, or fix the driver/wheel", file=sys.stderr)
        return 2

    # data: the bundled Tiny Shakespeare, char and GPT-2 BPE (offline)
    code, _ = run([sys.executable, "-m", "nanorepro", "prepare", "--data-root", str(data)], 300, out / "prepare.log")
    if code != 0:
        print(f"preparing the data failed: see {out / 'prepare.log'}", file=sys.stderr)
        return code
    common = [f"--data_root={data}", *device]

    # 2. CUDA-only tests (a dry run only checks that they collect)
    pytest = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"] + (["--collect-only"] if dry else [])
    code, took = run(pytest, 300, out / "pytest-gpu.log")
    record["steps"]["pytest -m gpu"] = {"status": "ok" if code == 0 else f"failed (exit {code})", "seconds": took}

    # 3. the faithful preset per iteration (and nanoGPT beside it)
    faithful = ["--preset", "shakespeare-char", "--iters", "5" if dry else "300", "--warmup", "2" if dry else "50",
                *common, *tiny, "--eval_interval=1000"]
    if args.nanogpt:
        faithful += ["--nanogpt", args.nanogpt, "--pairs", "1"]
    record["steps"]["shakespeare-char per iteration"] = bench("faithful", faithful, out, 150)

    # 4. the fast GPU preset to the A100's val loss
    fast = ["--preset", "shakespeare-char-gpu-fast", "--target-loss", "4.0" if dry else str(A100_TARGET), *common,
            *tiny, *(["--max_iters=20", "--eval_interval=10"] if dry else [])]
    record["steps"][f"val <= {A100_TARGET}"] = bench("fast", fast, out, 150)

    # 5. gpt2-xl's shape from random init, the fine-tune recipe (batch 1 x 32 x 1024)
    xl = (["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--gradient_accumulation_steps=2",
           "--compile=false", "--dtype=float32"] if dry else
          ["--n_layer=48", "--n_head=25", "--n_embd=1600", "--block_size=1024", "--vocab_size=50304", "--bias=true"])
    record["steps"]["gpt2-xl shape, fine-tune recipe"] = bench(
        "gpt2-xl", ["--preset", "finetune-shakespeare", "--init_from=scratch", "--iters", "3" if dry else "12",
                    "--warmup", "1" if dry else "3", "--eval_interval=1000", *common, *xl], out, 180)

    (out / "gpu.json").write_text(json.dumps(record, indent=2) + "\n")
    print("\n| step | status | seconds | figures |\n|---|---|---|---|")
    for name, step in record["steps"].items():
        print(f"| {name} | {step['status']} | {step['seconds']:.0f} | {step.get('line', '')} |")
    print(f"\nrecord: {out / 'gpu.json'}")
    return 0 if all(s["status"] == "ok" for s in record["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
