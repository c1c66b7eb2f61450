"""What every benchmark reports about the machine it ran on."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

from fed_iotlm.atomic import atomic_write_text


def loadavg() -> float | None:
    """1-minute load average (other work on the cores skews timings; we report it)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def machine_info(**versions: str) -> dict:
    """CPU count, usable CPUs, platform, Python, plus the library versions given."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        **versions,
    }


def emit(result: dict, out: Path | None) -> dict:
    """Every benchmark's ending: the JSON on stdout (after whatever logs went before it),
    and, with ``--out``, the same text written atomically."""
    text = json.dumps(result, indent=2)
    if out is not None:
        atomic_write_text(out, text + "\n")
    sys.stdout.flush()
    print(text, flush=True)
    return result
