"""What a process knows about its own device: memory, utilisation, CPU time.

On a cluster wandb's system monitor runs in the driver, on the GPU-less head node, so it records no GPU statistics
at all; each reward actor and the learner therefore measure themselves with :class:`DeviceMonitor` and ship the
numbers with their results (``learner/monitoring.py`` turns them into the logged metrics).

Sizes are in GB (1e9 bytes). On a GPU the memory that matters is torch's (``max_memory_allocated`` is the tensors'
peak, ``max_memory_reserved`` the caching allocator's, which is what runs into the card's limit); on a CPU it is the
process's resident set (``VmRSS``, peak ``VmHWM``). Utilisations are fractions: ``gpu_util`` is the card's
(NVML: share of the last sample period some kernel ran, whichever process ran it; absent without ``nvidia-ml-py``),
``cpu_util`` the process's CPU seconds per wall second since the previous reading (1.0 = one core busy).
"""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
GB = 1e9
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _proc_status_kb(field: str) -> int | None:
    """One ``kB`` field of ``/proc/self/status`` (Linux), or None where there is no such file or field."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_bytes() -> int:
    """The process's resident set size now (0 where it cannot be read)."""
    kb = _proc_status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    try:  # not Linux: psutil comes with ray[default]
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:
        return 0


def peak_rss_bytes() -> int:
    """The process's peak resident set size (since start, or since :func:`reset_peak_rss`)."""
    kb = _proc_status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    # ru_maxrss is kB on Linux, bytes on macOS; only reached off Linux, where it is bytes.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0: ``5`` into ``clear_refs``); False where that is refused."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class DeviceMonitor:
    """Memory, utilisation and CPU time of this process on ``device``; one instance per actor or learner.

    :meth:`stats` is cheap (a few allocator counters, one ``/proc`` read and, on a GPU, one NVML query), so it is
    read once per work item or update. ``cpu_util`` covers the time since the previous :meth:`stats` call.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        dev = torch.device(device)
        self.on_gpu = dev.type == "cuda" and torch.cuda.is_available()
        self.index = (dev.index if dev.index is not None else torch.cuda.current_device()) if self.on_gpu else None
        self.device = f"cuda:{self.index}" if self.on_gpu else "cpu"
        self._nvml_ok = self.on_gpu  # becomes False after the first failed query: no NVML, don't ask again
        self._wall = time.monotonic()
        self._cpu = time.process_time()
        self.started = self._wall

    def reset_peak(self) -> None:
        """Start the peak counters afresh: after loading something that was freed again (the learner's LLM)."""
        if self.on_gpu:
            torch.cuda.reset_peak_memory_stats(self.index)
        reset_peak_rss()

    def gpu_util(self) -> float | None:
        """The card's utilisation (0..1), or None without NVML (``torch.cuda.utilization`` needs ``pynvml``)."""
        if not self._nvml_ok:
            return None
        try:
            return float(torch.cuda.utilization(self.index)) / 100.0
        except Exception as exc:  # no pynvml / driver mismatch: say so once, then stop asking
            log.info("GPU utilisation unavailable on %s: %s", self.device, exc)
            self._nvml_ok = False
            return None

    def stats(self, advance: bool = True) -> dict[str, float]:
        """The current readings (floats only, so they travel in any status dict and log as metrics).

        ``advance``: start the next ``cpu_util`` window here (False for a look that must not shorten the window of
        the readings the results carry).

        ``peak_gb`` and ``mem_gb`` are the numbers that hit this device's limit: torch's reserved memory on a GPU,
        the resident set on a CPU. ``total_gb`` (GPU only) is the card's memory, ``peak_frac`` the peak's share of it.
        """
        now, cpu = time.monotonic(), time.process_time()
        wall = now - self._wall
        out: dict[str, float] = {
            "on_gpu": float(self.on_gpu),
            "rss_gb": rss_bytes() / GB,
            "rss_peak_gb": peak_rss_bytes() / GB,
            "cpu_util": (cpu - self._cpu) / wall if wall > 0 else 0.0,
            "uptime_s": now - self.started,
        }
        if advance:
            self._wall, self._cpu = now, cpu
        if self.on_gpu:
            i = self.index
            total = torch.cuda.get_device_properties(i).total_memory
            out.update(
                allocated_gb=torch.cuda.memory_allocated(i) / GB,
                allocated_peak_gb=torch.cuda.max_memory_allocated(i) / GB,
                reserved_gb=torch.cuda.memory_reserved(i) / GB,
                reserved_peak_gb=torch.cuda.max_memory_reserved(i) / GB,
                total_gb=total / GB,
            )
            out["mem_gb"], out["peak_gb"] = out["reserved_gb"], out["reserved_peak_gb"]
            out["peak_frac"] = out["reserved_peak_gb"] / out["total_gb"] if total else 0.0
            util = self.gpu_util()
            if util is not None:
                out["gpu_util"] = util
        else:
            out["mem_gb"], out["peak_gb"] = out["rss_gb"], out["rss_peak_gb"]
        return out

    def info(self) -> dict[str, Any]:
        """Where this monitor measures (for ``info()`` calls): the device name beside the current readings."""
        name = torch.cuda.get_device_name(self.index) if self.on_gpu else "cpu"
        return {"device": self.device, "device_name": name, **self.stats(advance=False)}
