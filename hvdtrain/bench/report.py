"""The pure parts of the benchmarks: sizes, bandwidth formulas, statistics, JSON and the machine they ran on
(the benchmarks' own tables and plots are in tables.py and plots.py, drawn with hvdtrain.render).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from hvdtrain.errors import UsageError
from hvdtrain.files import write_json  # noqa: F401  (re-exported: the bench workers write their JSON with it)

_UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "KIB": 1024, "M": 1024**2, "MB": 1024**2, "MIB": 1024**2}
_UNITS.update({"G": 1024**3, "GB": 1024**3, "GIB": 1024**3})
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([A-Za-z]*)\s*$")
ELEMENT_BYTES = 4  # the benchmarks reduce float32 tensors
LARGE_BYTES = 16 * 1024**2  # above this, fewer timed iterations (see iterations_for)


# --------------------------------------------------------------------------------------------------
# Message sizes
# --------------------------------------------------------------------------------------------------


def parse_size(text: str, flag: str = "--sizes") -> int:
    """'4', '4B', '1K', '1KiB', '64MiB', '1G' -> bytes (K, M, G are binary multiples, as in nccl-tests)."""
    m = _SIZE_RE.match(str(text))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS:
        raise UsageError(f"{flag}: cannot read size '{text}': expected a byte count like 4, 1KiB, 64MiB or 1G")
    size = int(m.group(1)) * _UNITS[unit]
    if size < ELEMENT_BYTES or size % ELEMENT_BYTES:
        raise UsageError(f"{flag}: size '{text}' = {size} B must be a positive multiple of 4 B (float32 elements)")
    return size


def size_range(min_bytes: int, max_bytes: int, factor: int = 2) -> list[int]:
    """min, min*factor, ... up to max inclusive (max itself is always included)."""
    if min_bytes > max_bytes:
        raise UsageError(f"--min-bytes {min_bytes} is larger than --max-bytes {max_bytes}; swap them")
    if factor < 2:
        raise UsageError(f"--step-factor {factor}: must be at least 2")
    sizes, s = [], min_bytes
    while s < max_bytes:
        sizes.append(s)
        s *= factor
    sizes.append(max_bytes)
    return sizes


def parse_sizes(text: str) -> list[int]:
    """A comma-separated list of sizes ('4,1KiB,64MiB'), sorted, duplicates removed."""
    items = [t for t in text.split(",")]
    if not text.strip() or any(not t.strip() for t in items):
        raise UsageError(f"--sizes: bad list '{text}': expected sizes separated by commas, e.g. 4,1KiB,64MiB")
    return sorted({parse_size(t) for t in items})


def format_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def iterations_for(size: int, iters: int, minimum: int = 3) -> int:
    """Timed iterations for one message size: `iters` up to 16 MiB, then fewer so each size takes about as
    long as the 16 MiB one (never fewer than `minimum`, never more than `iters`). Pure, so every rank agrees."""
    if size <= LARGE_BYTES:
        return iters
    return max(min(minimum, iters), iters * LARGE_BYTES // size)


# --------------------------------------------------------------------------------------------------
# Formulas and statistics
# --------------------------------------------------------------------------------------------------


def algbw(size_bytes: float, seconds: float) -> float:
    """Algorithm bandwidth in GB/s (10^9 bytes/s): message size over the time of one allreduce."""
    if seconds <= 0:
        raise ValueError(f"time must be positive, got {seconds}")
    return size_bytes / seconds / 1e9


def bus_factor(n: int) -> float:
    """2(n-1)/n: the share of the message every rank sends (and receives) in a ring allreduce."""
    if n < 1:
        raise ValueError(f"the number of ranks must be at least 1, got {n}")
    return 2.0 * (n - 1) / n


def busbw(algbw_gbps: float, n: int) -> float:
    """Bus bandwidth (the nccl-tests convention): algbw x 2(n-1)/n, comparable to the link's peak."""
    return algbw_gbps * bus_factor(n)


def ring_time(size_bytes: float, n: int, bandwidth_gbps: float, latency_s: float) -> float:
    """Cost model of a ring allreduce: 2(n-1)/n x S/B plus a latency term."""
    return bus_factor(n) * size_bytes / (bandwidth_gbps * 1e9) + latency_s


def summary_stats(values: Sequence[float]) -> dict[str, float]:
    """Mean, standard deviation (population, as numpy's np.std) and the 95% half-width 1.96 sigma."""
    if not values:
        raise ValueError("no values")
    mean = statistics.fmean(values)
    sd = statistics.pstdev(values) if len(values) > 1 else 0.0
    return {"mean": mean, "sd": sd, "conf": 1.96 * sd, "n": len(values)}


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    """a / b, or None when either is missing or b is not positive."""
    if a is None or b is None or not b > 0:
        return None
    return a / b


def find(rows: Sequence[dict], **keys: Any) -> Optional[dict]:
    """The first row whose values match all of `keys`, else None."""
    return next((r for r in rows if all(r.get(k) == v for k, v in keys.items())), None)


def efficiency(total_at_np: float, np: int, single_rank: float) -> Optional[float]:
    """Weak-scaling efficiency: total throughput on np ranks over np x the one-rank throughput."""
    return ratio(total_at_np, np * single_rank)


def efficiency_spread(total: dict[str, float], np: int, single: dict[str, float]) -> Optional[float]:
    """First-order propagated 95% half-width of `efficiency` from both measurements' half-widths."""
    eff = efficiency(total["mean"], np, single["mean"])
    if eff is None or not total["mean"] > 0:
        return None
    return eff * math.hypot(total["conf"] / total["mean"], single["conf"] / single["mean"])


# --------------------------------------------------------------------------------------------------
# Output: JSON, where it ran
# --------------------------------------------------------------------------------------------------


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def machine_info() -> dict[str, Any]:
    """Where the numbers were taken: host, cores, load, time (UTC)."""
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "hostname": platform.node(),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "load_avg_1_5_15": load,
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


HOROVOD_KNOBS = (
    "HOROVOD_CYCLE_TIME", "HOROVOD_FUSION_THRESHOLD", "HOROVOD_CACHE_CAPACITY", "HOROVOD_AUTOTUNE",
    "HOROVOD_HIERARCHICAL_ALLREDUCE", "HOROVOD_CONTROLLER", "HOROVOD_CPU_OPERATIONS", "OMP_NUM_THREADS",
)  # fmt: skip


def tuning_env(environ) -> dict[str, str]:
    """The Horovod and threading settings a rank ran with (unset ones are Horovod's defaults)."""
    return {k: environ[k] for k in HOROVOD_KNOBS if k in environ}
