"""Summaries of py-spy's raw (collapsed-stack) profiles: where the daemon's time goes.

    python bench/profiles.py bench/out/run-*/profile/r1-down-twisted_novnc.txt

Each raw line is ``frame;frame;...;leaf COUNT`` with frames like ``name (path/file.py:123)``.
The summary ranks functions by self time (the leaf of a sample) and by inclusive time (anywhere
in the stack, once per sample), and files by self time.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Iterable

_FRAME = re.compile(r"^(?P<name>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_SHORTEN = re.compile(r"^.*/(site-packages|lib/python3\.\d+)/")


def _function(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip(), ""
    return m.group("name"), _SHORTEN.sub("", m.group("file"))


def parse(text: str) -> Iterable[tuple[list[str], int]]:
    for line in text.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        yield stack.split(";"), int(count)


def summarise(text: str, title: str = "profile", top: int = 30) -> str:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    files: Counter[str] = Counter()
    total = 0
    for stack, count in parse(text):
        total += count
        frames = [_function(f) for f in stack if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        name, path = frames[-1]
        self_time[f"{name} ({path})"] += count
        files[path] += count
        for key in {f"{n} ({p})" for n, p in frames}:
            inclusive[key] += count
    if not total:
        return f"# {title}\n\nNo samples.\n"

    def table(counter: Counter[str], head: str) -> list[str]:
        rows = [f"| {head} | samples | % |", "|---|---|---|"]
        rows += [f"| `{k}` | {v} | {100 * v / total:.1f} |" for k, v in counter.most_common(top)]
        return rows

    lines = [f"# {title}", "", f"{total} samples.", "", "## Self time (leaf frames)", ""]
    lines += table(self_time, "function")
    lines += ["", "## Self time by file", "", *table(files, "file")]
    lines += ["", "## Inclusive time", "", *table(inclusive, "function")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    for path in sys.argv[1:]:
        with open(path, encoding="utf-8") as f:
            print(summarise(f.read(), title=path))
