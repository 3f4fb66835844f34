"""Device, dtype and seed resolution that behaves the same on CUDA, MPS and CPU.

``auto`` picks cuda, then mps, then cpu. Asking for a device that is not there is a user error
that lists the devices that are, rather than a crash deep inside the first ``.to()``.
"""

from __future__ import annotations

import os
import random
import resource
import sys
from typing import Any

from xsae_cli.core.errors import XsaeError

DTYPES = ("float32", "bfloat16", "float16")


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def available_devices() -> list[str]:
    """Every device this process can use, most capable first."""
    import torch

    out = []
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        out.append("mps")
    out.append("cpu")
    return out


def resolve_device(spec: str = "auto") -> Any:
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a ``torch.device`` that exists here."""
    import torch

    spec = (spec or "auto").strip().lower()
    have = available_devices()
    if spec == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device(f"cuda:{local % torch.cuda.device_count()}")
        return torch.device("mps" if _mps_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not _mps_available():
            raise XsaeError("device 'mps' is not available on this machine (it needs Apple silicon and a PyTorch build with MPS)", f"available devices: {', '.join(have)}")
        return torch.device("mps")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise XsaeError(f"device '{spec}' is not available: this PyTorch sees no CUDA GPU", f"available devices: {', '.join(have)}")
        if spec == "cuda":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        try:
            index = int(spec.split(":", 1)[1])
        except ValueError:
            raise XsaeError(f"bad device '{spec}'", "use cuda:N with N a GPU index") from None
        if index >= torch.cuda.device_count():
            raise XsaeError(f"device '{spec}' does not exist: {torch.cuda.device_count()} GPU(s) here", f"available devices: {', '.join(have)}")
        return torch.device("cuda", index)
    raise XsaeError(f"unknown device '{spec}'", "use auto, cpu, cuda, cuda:N or mps")


def resolve_dtype(name: str, device: Any) -> Any:
    """Turn ``float32|bfloat16|float16`` into a torch dtype the device supports."""
    import torch

    name = (name or "float32").lower()
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16", "float": "float32"}
    name = aliases.get(name, name)
    if name not in DTYPES:
        raise XsaeError(f"unknown dtype '{name}'", f"use one of {', '.join(DTYPES)}")
    dtype = getattr(torch, name)
    kind = getattr(device, "type", str(device))
    if kind == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise XsaeError(f"{device} does not support bfloat16 (it needs compute capability 8.0+)", "use --dtype float16 or float32")
    if kind == "mps" and dtype is torch.bfloat16:
        try:
            torch.zeros(1, dtype=dtype, device="mps")
        except (RuntimeError, TypeError):
            raise XsaeError("this macOS/MPS build does not support bfloat16 (it needs macOS 14+)", "use --dtype float16 or float32") from None
    return dtype


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a CPU run repeats bit for bit."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def memory_report(device: Any = None) -> dict[str, Any]:
    import psutil
    import torch

    rss = psutil.Process().memory_info().rss
    report: dict[str, Any] = {"rss_bytes": rss, "peak_rss_bytes": max(rss, peak_rss_bytes())}
    kind = getattr(device, "type", None)
    if kind == "cuda":
        report["cuda_allocated_bytes"] = torch.cuda.memory_allocated(device)
        report["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    elif kind == "mps":
        report["mps_allocated_bytes"] = torch.mps.current_allocated_memory()
    return report


def device_summary() -> dict[str, Any]:
    """What ``xsae doctor`` prints about the hardware."""
    import torch

    out: dict[str, Any] = {
        "devices": available_devices(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
        "mps": _mps_available(),
    }
    if torch.cuda.is_available():
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return out


PACKAGES = ("torch", "transformers", "accelerate", "deepspeed", "peft", "transformer_lens", "safetensors", "gguf", "typer", "rich")


def package_versions() -> dict[str, str | None]:
    """Installed versions (None when absent), read from metadata so nothing heavy is imported."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = version(name.replace("_", "-"))
        except PackageNotFoundError:
            try:
                out[name] = version(name)
            except PackageNotFoundError:
                out[name] = None
    return out
