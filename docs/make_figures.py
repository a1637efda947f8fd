"""Remake the figures of the part pages: run every ```python block of docs/part2.md, part3.md and
part4.md from the repository root (each writes its PNG under docs/images/). The part 4 blocks that
sample a trained model read runs/digits (the page says how it was trained).

    PYTHONPATH=src python docs/make_figures.py [docs/part3.md ...]

tests/test_docs.py runs the same blocks, and every other ```python block of the docs, in a
temporary folder. A block whose fence reads ```python no-run is shown, never run.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```[ \t]*$", re.S | re.M)
PAGES = ("docs/part2.md", "docs/part3.md", "docs/part4.md")


def python_blocks(path: Path) -> list[tuple[int, bool, str]]:
    """(line of the fence, runnable, code) of every ```python block of a Markdown file."""
    text = path.read_text()
    out = []
    for m in FENCE.finditer(text):
        info = m.group(1).split()
        out.append((text.count("\n", 0, m.start()) + 1, "no-run" not in info, m.group(2)))
    return out


def run_block(code: str, name: str) -> None:
    """Execute one block in a fresh namespace, as a script would run it."""
    exec(compile(code, name, "exec"), {"__name__": "__main__"})


def main(pages: list[str]) -> int:
    for page in pages or PAGES:
        for line, runnable, code in python_blocks(ROOT / page):
            if runnable:
                start = time.perf_counter()
                run_block(code, f"{page}:{line}")
                print(f"{page}:{line} ran in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
