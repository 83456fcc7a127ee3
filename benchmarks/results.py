"""What every benchmark records about the machine, and where its JSON goes.

Imports neither jax nor gpt2jax, so benchmarks that measure other processes (benchmarks.data,
whose parent must stay small) can use it too.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import socket
from pathlib import Path


def load_average() -> list[float] | None:
  try:
    return list(os.getloadavg())
  except OSError:
    return None


def load_1min() -> float | None:
  """The 1-minute load average, None where the system has none."""
  load = load_average()
  return load[0] if load else None


def machine() -> dict:
  """The host, its CPU, memory, Python and load average."""
  cpu = platform.processor()
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return {"host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count(),
          "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9,
          "python": platform.python_version(), "load_average": load_average()}


def write(results: dict, out_dir: str | Path, name: str = "") -> Path:
  """results as out_dir/[<name>-]<time>-<host>.json; -> its path."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  path = out_dir / f"{name + '-' if name else ''}{stamp}-{socket.gethostname()}.json"
  path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
  return path
