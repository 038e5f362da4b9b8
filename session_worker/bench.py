"""``session-worker bench``: run the benchmarks of a source checkout (``benchmarks/``).

The benchmarks are scripts that measure and print, kept next to the package rather than in
it; this module finds them from the installed (editable) package and hands them the
arguments. ``session-worker bench --help`` lists their options.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]


def main(argv: Sequence[str]) -> int:
    if not (CHECKOUT / "benchmarks" / "run.py").is_file():
        print(
            f"session-worker bench: no benchmarks/ next to {CHECKOUT / 'session_worker'}; "
            "the benchmarks ship with a source checkout (pip install -e .)",
            file=sys.stderr,
        )
        return 2
    if str(CHECKOUT) not in sys.path:
        sys.path.insert(0, str(CHECKOUT))
    from benchmarks.run import main as run_benchmarks

    return run_benchmarks(argv)
