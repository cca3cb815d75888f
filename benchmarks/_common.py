"""Shared pieces of the benchmark scripts: device naming, run metadata, timing, copy bandwidth.

Every number a script writes is one JSON record (see :func:`record`) carrying the device, the
library versions, the git commit, the date and the machine load at the time it was measured.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SCHEMA = 1
#: fields every record carries (tests check them)
RECORD_FIELDS = ("op", "provider", "shape", "dtype", "metric", "unit", "value", "device", "device_name",
                 "torch", "triton", "python", "commit", "date", "loadavg")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def device_name(device: str) -> str:
    """Folder name under results/: ``cpu-<model>-<n>c`` or the GPU name, as a slug."""
    if device == "cuda":
        return slug(torch.cuda.get_device_name())
    return f"cpu-{slug(cpu_model())}-{cpu_cores()}c"


def device_label(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()} ({cpu_cores()} cores)"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:  # noqa: BLE001 - triton missing or broken: just say so
        return "none"


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


class Meta:
    """The run-wide fields of every record (computed once per run)."""

    def __init__(self, device: str):
        self.device = device
        self.base = {
            "device": device,
            "device_name": device_label(device),
            "torch": torch.__version__,
            "triton": triton_version(),
            "python": platform.python_version(),
            "commit": git_commit(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "threads": torch.get_num_threads(),
        }

    def record(self, op: str, provider: str, shape, dtype: str, metric: str, unit: str, value, **extra) -> dict:
        rec = {"op": op, "provider": provider, "shape": shape, "dtype": dtype, "metric": metric, "unit": unit,
               "value": value, **self.base, "loadavg": loadavg()}
        rec.update(extra)
        return rec


def write_results(path: Path, records: list[dict], **header) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"schema": SCHEMA, "argv": sys.argv[1:], **header, "records": records}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def read_results(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------------------ timing
def quantiles(times: list[float]) -> tuple[float, float, float]:
    """(q20, median, q80) of a list of seconds."""
    if len(times) == 1:
        return times[0], times[0], times[0]
    qs = statistics.quantiles(sorted(times), n=10, method="inclusive")  # deciles
    return qs[1], statistics.median(times), qs[7]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench(fn, device: str, min_run_time: float = 1.0, min_samples: int = 5) -> tuple[float, float, float]:
    """(q20, median, q80) seconds of one call of ``fn``.

    GPU: ``triton.testing.do_bench`` (L2 flushed between calls, CUDA events). CPU:
    ``torch.utils.benchmark.Timer.blocked_autorange`` with threads = cores; slow calls get
    single-call samples until there are ``min_samples`` of them.
    """
    if device == "cuda":
        import triton.testing

        q50, q20, q80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25,
                                                rep=max(100, int(min_run_time * 1000)))
        return q20 / 1e3, q50 / 1e3, q80 / 1e3
    from torch.utils import benchmark as tb

    timer = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    times = list(m.times)
    while len(times) < min_samples:
        times.extend(timer.timeit(number=1).times)
    return quantiles(times)


def copy_bandwidth(device: str, nbytes: int, min_run_time: float = 1.0) -> dict:
    """Device copy bandwidth in bytes/s from a large fp32 tensor (read + write counted).

    ``clone``: ``x.clone()`` (the protocol's measure; on CPU it includes the page faults of a
    fresh allocation). ``copy_``: ``y.copy_(x)`` into a preallocated tensor. The larger of the
    two is the denominator of every "% of copy bandwidth" (the stricter yardstick).
    """
    n = nbytes // 4
    x = torch.randn(n, device=device)
    y = torch.empty_like(x)
    out = {}
    for name, fn in (("clone", lambda: x.clone()), ("copy_", lambda: y.copy_(x))):
        fn()
        q20, q50, q80 = bench(fn, device, min_run_time)
        out[name] = {"bytes": 2 * n * 4, "q20": q20, "median": q50, "q80": q80, "bytes_per_s": 2 * n * 4 / q50}
    out["best"] = max(out["clone"]["bytes_per_s"], out["copy_"]["bytes_per_s"])
    del x, y
    return out


def set_threads() -> int:
    """Use every core we may run on (torch defaults to the physical cores, which may be fewer)."""
    n = cpu_cores()
    torch.set_num_threads(n)
    return n


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
