"""What a figure was measured on: the machine, the date and the device's peak FLOP/s."""
from __future__ import annotations

import datetime
import os
import platform

import torch

# Dense (no sparsity) peak tensor-core FLOP/s by device-name substring, for bf16/fp16 and
# tf32 (used for fp32 matmuls), from the vendors' data sheets; first match wins.
PEAK_FLOPS = [
    ("H200", {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 494.7e12}),
    ("H100 PCIe", {"bf16": 756.0e12, "fp16": 756.0e12, "fp32": 378.0e12}),
    ("H100", {"bf16": 989.4e12, "fp16": 989.4e12, "fp32": 494.7e12}),
    ("A100", {"bf16": 312.0e12, "fp16": 312.0e12, "fp32": 156.0e12}),
]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict:
    """The machine (CPU model and cores, GPU name and count) and today's date."""
    info = {"date": datetime.date.today().isoformat(), "cpu": cpu_name(), "cpu_cores": os.cpu_count(),
            "torch": torch.__version__, "host": platform.node()}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count())
    return info


def label(info: dict) -> str:
    """One line naming the hardware of a result, for tables."""
    where = f"{info['gpu']}" if "gpu" in info else f"{info['cpu']}, {info['cpu_cores']} cores"
    return f"{where} ({info['date']})"


def peak_flops(precision: str, device: str | None = None) -> float | None:
    """The peak FLOP/s at `precision` (bf16, fp16, fp32) of the GPU named `device` (default:
    this machine's); None on CPU or for a GPU not in PEAK_FLOPS."""
    if device is None:
        if not torch.cuda.is_available():
            return None
        device = torch.cuda.get_device_name(0)
    return next((table[precision] for key, table in PEAK_FLOPS if key in device), None)
