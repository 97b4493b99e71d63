"""Names and ordering of the files in a KvStore data directory.

Segments are ordered by a *generation* ``(major, minor)``, packed as ``major << 16 | minor``:

- ``(major, 0)``: a segment written by the store's writers, one after another; the active
  segment is always the one with the largest major.
- ``(major, k)`` with ``k >= 1``: the k-th output file of the compaction that merged every
  segment up to and including ``(major, 0)``. It sorts after its inputs and before
  ``(major + 1, 0)``, where writers were appending while it was being made: replaying files in
  generation order therefore applies every record in the order it was acknowledged
  (a compaction output only holds copies of records older than ``(major + 1, 0)``).

File names: ``{major:010d}.{minor:05d}.log`` (records), ``… .hint`` (hint file of a compaction
output), ``compaction-{major:010d}.done`` (marker: the outputs of compaction ``major`` are
complete and durable; its inputs may be deleted), and ``*.tmp`` (files being written).
"""

from __future__ import annotations

import re
from pathlib import Path

MINOR_BITS = 16
_SEGMENT_RE = re.compile(r"^(\d{10})\.(\d{5})\.log$")
_MARKER_RE = re.compile(r"^compaction-(\d{10})\.done$")


def gen(major: int, minor: int = 0) -> int:
    """The packed generation of ``(major, minor)``."""
    return (major << MINOR_BITS) | minor


def major_of(generation: int) -> int:
    return generation >> MINOR_BITS


def minor_of(generation: int) -> int:
    return generation & ((1 << MINOR_BITS) - 1)


def stem(generation: int) -> str:
    return f"{major_of(generation):010d}.{minor_of(generation):05d}"


def log_name(generation: int) -> str:
    return stem(generation) + ".log"


def hint_name(generation: int) -> str:
    return stem(generation) + ".hint"


def marker_name(major: int) -> str:
    return f"compaction-{major:010d}.done"


def list_segments(directory: Path) -> list[int]:
    """Generations of the segment files in ``directory``, oldest first."""
    found = []
    for entry in directory.iterdir():
        m = _SEGMENT_RE.match(entry.name)
        if m:
            found.append(gen(int(m.group(1)), int(m.group(2))))
    return sorted(found)


def list_markers(directory: Path) -> list[int]:
    """Majors of the compaction markers in ``directory``, oldest first."""
    return sorted(int(m.group(1)) for e in directory.iterdir() if (m := _MARKER_RE.match(e.name)))
