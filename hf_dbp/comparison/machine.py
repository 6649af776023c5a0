"""Running a command alone and measuring the CPU other processes took meanwhile: a timing taken while others used
the CPU is no figure, so each run of a comparison carries its machine's load and is marked busy above
`BUSY_FRACTION`."""

from __future__ import annotations

import os
import resource
import subprocess
import time

from .records import MachineLoad

BUSY_FRACTION = 0.05
"""A run during which other processes used more than this share of the machine's CPU time is marked busy."""


def _busy_cpu_seconds() -> float | None:
    """CPU seconds every process of the machine has used since boot (Linux /proc/stat; None elsewhere)."""
    try:
        with open("/proc/stat") as file:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, file.readline().split()[1:9])
    except (OSError, ValueError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run_alone(command: list[str]) -> MachineLoad:
    """Run `command` and measure how much CPU other processes took meanwhile: the machine's busy CPU seconds less
    the run's own (and its children's). A timing taken while others used the CPU is not a figure."""
    busy, own, start = _busy_cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    subprocess.run(command, check=True)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    own_seconds = (after.ru_utime - own.ru_utime) + (after.ru_stime - own.ru_stime)
    if busy is None:
        return MachineLoad(wall_seconds=wall, own_cpu_seconds=own_seconds, other_cpu_fraction=None, busy=None)
    others = max(0.0, _busy_cpu_seconds() - busy - own_seconds)
    fraction = others / (wall * (os.cpu_count() or 1))
    return MachineLoad(
        wall_seconds=wall,
        own_cpu_seconds=own_seconds,
        other_cpu_seconds=others,
        other_cpu_fraction=fraction,
        busy=fraction > BUSY_FRACTION,
    )
