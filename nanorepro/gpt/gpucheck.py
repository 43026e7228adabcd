"""What torch sees of the GPUs, as one JSON line: run on a node after the install
(`python -m nanorepro.gpt.gpucheck`) to prove the wheel matches the driver before hours are spent training.

For each visible GPU: its name and whether a bf16 matmul runs on it (and its error if not). The caller
(nodeinstall.check_gpus) compares the count with nvidia-smi's.
"""

from __future__ import annotations

import json
import sys


def report() -> dict:
    import torch

    out: dict = {"torch": torch.__version__, "cuda": torch.version.cuda, "devices": []}
    try:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception as e:  # a driver/wheel mismatch can raise here instead of returning False
        out["error"] = f"{type(e).__name__}: {e}"
        return out
    for i in range(count):
        dev = {"index": i, "name": torch.cuda.get_device_name(i)}
        try:
            a = torch.randn(256, 256, device=f"cuda:{i}", dtype=torch.bfloat16)
            value = float((a @ a).float().abs().sum())
            torch.cuda.synchronize(i)
            dev["bf16_matmul"] = value == value  # not NaN
        except Exception as e:
            dev["bf16_matmul"], dev["error"] = False, f"{type(e).__name__}: {e}"
        out["devices"].append(dev)
    return out


if __name__ == "__main__":
    print(json.dumps(report()), flush=True)
    sys.exit(0)
