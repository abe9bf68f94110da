"""What the machine is doing, without importing torch (the stage scripts ask before torch loads:
OpenMP reads its wait policy once, when it starts)."""
from __future__ import annotations

import os
import time

BUSY = 0.5  # cores kept busy by other work from which a run counts the machine as shared


def cpu_threads(cores: int, load: float) -> int:
    """Threads for a CPU run: the cores that are not already busy (1-minute load average),
    at least one. Two jobs that each take every core of a 2-core machine run about 10x slower
    each (OpenMP threads spin waiting for each other); with one thread each, about half speed."""
    return max(1, min(cores, round(cores - load)))


def busy_cores(seconds: float = 0.3) -> float | None:
    """How many cores other processes keep busy right now: /proc/stat sampled over ``seconds``
    while this process waits (the load average lags by a minute and would count the stage that
    just ended). None where /proc/stat is not available."""
    def sample():
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)  # total, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    cores = os.cpu_count() or 1
    return cores * (1 - (idle1 - idle0) / max(total1 - total0, 1))


_last: tuple[float, float | None] | None = None  # (when, busy cores) of the latest measurement


def recent_busy_cores(max_age: float = 10.0) -> float | None:
    """``busy_cores``, measured once per start: a caller within ``max_age`` seconds of the last
    measurement reuses it (a stage script asks for its OpenMP policy, then its thread count) instead
    of waiting another 0.3 s; a later run in the same process measures again."""
    global _last
    if _last is None or time.monotonic() - _last[0] > max_age:
        load = busy_cores()
        _last = (time.monotonic(), load)
    return _last[1]


def omp_wait_policy(load: float | None) -> str | None:
    """OpenMP's wait policy for a CPU run: None (OpenMP's own: waiting threads spin, fastest alone)
    on a quiet machine; PASSIVE (they sleep) when other work keeps a core busy, so two jobs share
    the cores instead of fighting over them. Measured on 2 cores, one stage-2 epoch alone: PASSIVE
    took 53.0 s against 45.6 s (docs/benchmarks.md), so it is only for a shared machine."""
    return "PASSIVE" if load is not None and load >= BUSY else None
