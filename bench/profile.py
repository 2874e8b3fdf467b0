"""Sampling profiles of a running service process with py-spy, and a plain-text reading of them.

    python -m bench.profile bench/results/load-cache_ref.pyspy.txt   # summarize a recorded profile

The benchmarks record with `--profile`: py-spy attaches to the service's pid (no code change, no restart)
and writes collapsed stacks ("frame;frame;... count"), which this module reduces to the functions that
hold the most samples, inclusive and self.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

# py-spy frames read "function (path/to/file.py:line)"; the line is dropped so a function is one row.
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+)(?::\d+)?\)$")
_SITE = re.compile(r".*/site-packages/")
# Leaf frames of a thread that is parked, not working (anyio's idle worker threads, the idle selector).
_PARKED = ("Condition.wait", "Event.wait", "Queue.get", "EpollSelector.select")


def py_spy() -> str | None:
    """The py-spy binary: next to this interpreter (a venv) or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class Recorder:
    """py-spy record on a pid until stopped; the profile is written when py-spy gets SIGINT."""

    def __init__(self, pid: int, output: Path, rate: int = 250) -> None:
        binary = py_spy()
        if binary is None:
            raise RuntimeError("py-spy is not installed: pip install -e '.[bench]'")
        self.output = output
        self._popen = subprocess.Popen(
            [binary, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "-o", str(output)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def stop(self) -> Path:
        if self._popen.poll() is None:
            self._popen.send_signal(signal.SIGINT)
        try:
            self._popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._popen.kill()
            self._popen.wait()
        return self.output

    def __enter__(self) -> Recorder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _frame_name(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    path = _SITE.sub("", match["file"])
    for marker in ("/service/", "/bench/", "/lib/python3"):
        if marker in path:
            path = path[path.index(marker) + 1 :]
            break
    return f"{match['func']} ({path})"


def _stacks(path: Path) -> list[tuple[list[str], int]]:
    """(frames outermost first, sample count) for every busy stack of a collapsed-stacks file."""
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = [_frame_name(frame) for frame in stack.split(";") if frame]
        # Thread or process header frames carry no file; parked threads are not CPU.
        frames = [frame for frame in frames if "(" in frame]
        if frames and not frames[-1].startswith(_PARKED):
            stacks.append((frames, int(count_text)))
    return stacks


def summarize(path: Path, top: int = 25) -> dict[str, Any]:
    """Share of busy samples per function: inclusive (on the stack) and self (innermost frame)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for frames, count in _stacks(path):
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count

    def table(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": name, "percent": round(100 * count / max(total, 1), 1)}
            for name, count in counter.most_common(top)
        ]

    return {"samples": total, "inclusive": table(inclusive), "self": table(own)}


def grouped(path: Path, groups: dict[str, Sequence[str]]) -> dict[str, float]:
    """Percent of busy samples whose stack holds any of a group's substrings (first group wins)."""
    counts: Counter[str] = Counter()
    total = 0
    for frames, count in _stacks(path):
        stack = ";".join(frames)
        total += count
        for group, needles in groups.items():
            if any(needle in stack for needle in needles):
                counts[group] += count
                break
        else:
            counts["other"] += count
    return {group: round(100 * count / total, 1) for group, count in counts.most_common()} if total else {}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("profile", type=Path, help="a py-spy raw (collapsed stacks) file")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    print(json.dumps(summarize(args.profile, args.top), indent=2))


if __name__ == "__main__":
    main()
