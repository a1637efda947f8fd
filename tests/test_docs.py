"""Every ```python block of README.md and docs/*.md runs, in a temporary folder.

Blocks that sample a trained model name runs/demo or runs/digits; here both are one tiny run
(the `tiny` network, a few steps on the 8x8 digits), so the code is checked,
not the pictures. A block fenced ```python no-run is only listed (NO_RUN says which, and why).
"""

import importlib.util
import os
from pathlib import Path

import pytest

from difflab.config import TrainConfig
from difflab.training.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("make_figures", ROOT / "docs" / "make_figures.py")
make_figures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_figures)

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(p.relative_to(ROOT).as_posix(), line, runnable, code)
          for p in PAGES for line, runnable, code in make_figures.python_blocks(p)]
# the blocks that cannot run in a test, by page: part 5's measurement script (a trained conditional
# run, a noisy classifier and 10,000 MNIST test images through the judge)
NO_RUN = {"docs/part5.md": 1}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder with docs/images/ and runs/demo, runs/digits (one tiny trained run)."""
    root = tmp_path_factory.mktemp("docs")
    (root / "docs" / "images").mkdir(parents=True)
    cfg = TrainConfig(data="digits", out=str(root / "runs" / "demo"), model="tiny", steps=4,
                      batch_size=8, log_every=2, checkpoint_every=4, sample_every=0, sample_steps=2, warmup=1)
    Trainer(cfg, progress=False, log=lambda *a: None).run()
    os.symlink(root / "runs" / "demo", root / "runs" / "digits")
    return root


def test_no_run_blocks_are_the_listed_few():
    found = {}
    for page, _, runnable, _ in BLOCKS:
        if not runnable:
            found[page] = found.get(page, 0) + 1
    assert found == NO_RUN
    assert sum(runnable for *_, runnable, _ in BLOCKS) >= 10  # the part pages' examples are all found


@pytest.mark.parametrize("page,line,code", [(p, ln, c) for p, ln, r, c in BLOCKS if r],
                         ids=[f"{p}:{ln}" for p, ln, r, _ in BLOCKS if r])
def test_block_runs(page, line, code, workdir, monkeypatch, one_thread):
    monkeypatch.chdir(workdir)
    make_figures.run_block(code, f"{page}:{line}")
