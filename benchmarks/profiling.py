"""Sampling profiles of running processes with py-spy, summarised as top functions.

py-spy is found on PATH, beside the running Python (``pip install -e '.[bench]'``) or in
``var/bench/tools``; without it, profiling is skipped with a note.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .common import ROOT


def py_spy() -> str | None:
    """py-spy on PATH, beside this Python (the `bench` extra), or in var/bench/tools."""
    found = shutil.which("py-spy")
    if found:
        return found
    for candidate in (
        Path(sys.executable).with_name("py-spy"),
        ROOT / "var" / "bench" / "tools" / "bin" / "py-spy",
    ):
        if candidate.exists():
            return str(candidate)
    return None


@dataclass
class Profile:
    """Collapsed stacks of some processes: where their samples fell."""

    name: str
    samples: int = 0
    self_counts: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)
    idle: int = 0

    def add_collapsed(self, path: Path) -> None:
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [f for f in stack.split(";") if f and not f.startswith("process ")]
            if not frames:
                continue
            self.samples += count
            leaf = _short(frames[-1])
            self.self_counts[leaf] += count
            for frame in {_short(f) for f in frames}:
                self.inclusive[frame] += count

    def top(self, counter: Counter[str], n: int) -> list[tuple[str, float]]:
        if not self.samples:
            return []
        return [(name, count / self.samples * 100) for name, count in counter.most_common(n)]

    def lines(self, n: int = 12) -> list[str]:
        out = [f"{self.name}: {self.samples} samples"]
        out.append("  self time:")
        out += [f"    {pct:5.1f}%  {name}" for name, pct in self.top(self.self_counts, n)]
        out.append("  inclusive time:")
        out += [f"    {pct:5.1f}%  {name}" for name, pct in self.top(self.inclusive, n)]
        return out


def _short(frame: str) -> str:
    """``func (path/to/module.py:12)`` -> ``func (module.py)``."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file_part = where.rsplit(":", 1)[0]
    parts = Path(file_part).parts
    short = "/".join(parts[-2:]) if len(parts) >= 2 else file_part
    return f"{name} ({short})"


class Sampler:
    """``py-spy record`` on several processes at once, for a fixed time."""

    def __init__(self, name: str, pids: list[int], seconds: float, outdir: Path) -> None:
        self.name = name
        self.outdir = outdir
        self.procs: list[tuple[subprocess.Popen[bytes], Path]] = []
        binary = py_spy()
        if binary is None:
            return
        outdir.mkdir(parents=True, exist_ok=True)
        for pid in pids:
            out = outdir / f"{name}-{pid}.txt"
            argv = [
                binary,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(max(1, round(seconds))),
                "--rate",
                "200",
                "--format",
                "raw",
                "--output",
                str(out),
                "--nonblocking",
            ]
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.procs.append((proc, out))

    @property
    def available(self) -> bool:
        return bool(self.procs)

    def finish(self) -> Profile:
        profile = Profile(self.name)
        for proc, out in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if out.exists():
                profile.add_collapsed(out)
        return profile
