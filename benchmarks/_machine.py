"""One line describing the machine a benchmark ran on."""

from __future__ import annotations

import os
import platform

import torch


def describe(device: str = "cpu") -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = "load avg %.2f %.2f %.2f" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    text = (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads, {load}")
    if device.startswith("cuda") and torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name()}"
    return text
