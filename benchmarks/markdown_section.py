"""Writes a benchmark's results into BENCHMARKS.md between its own start / end markers (the rest of the file stays)."""

from __future__ import annotations

from pathlib import Path


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
