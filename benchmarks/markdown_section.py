"""Writes a benchmark's results into BENCHMARKS.md between its own start / end markers (the rest of the file stays),
and names the CPU the results came from."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or what `platform` knows where that file is missing."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def write_section(path: Path, section: str, start: str, end: str) -> None:
    """Replaces the text between `start` and `end` in `path` by `section`, or appends the marked block when the markers
    are not there yet (a new file starts with a "# Benchmarks" title)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{section}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
