"""Where the trainer's numbers and sample grids go (``--logger``).

``loss.csv`` is always written: it is the run's own record (``loss.png``, the explorer and a resume read
it). ``--logger tensorboard`` also writes the loss, the learning rate, images/s and every periodic sample
grid as TensorBoard events into ``RUN/tensorboard/`` (``tensorboard --logdir RUN``). A resumed run marks
the step after its checkpoint in the events, so TensorBoard drops what was logged after the checkpoint and keeps
the rows up to it, as the CSV does.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from difflab.errors import UsageError

LOGGERS = ("csv", "tensorboard")
TENSORBOARD_DIR = "tensorboard"  # under the run folder
CSV_HEADER = ["step", "loss", "lr", "images_per_second", "seconds"]
SCALAR_TAGS = {"loss": "train/loss", "lr": "train/lr", "images_per_second": "train/images_per_second"}
IMAGE_TAG = "samples"


class RunLogger:
    """Appends loss.csv rows and, for ``kind="tensorboard"``, the same numbers and the sample grids as
    events. Construct it before training (a missing package is a UsageError then); :meth:`open` on the
    writing rank before the first row; :meth:`close` at the end."""

    def __init__(self, out: str | Path, kind: str = "csv"):
        if kind not in LOGGERS:
            raise UsageError(f"--logger must be one of {', '.join(LOGGERS)}, got '{kind}'")
        if kind == "tensorboard":
            try:
                import tensorboard  # noqa: F401  (torch.utils.tensorboard writes through it)
            except ImportError:
                raise UsageError("--logger tensorboard needs the tensorboard package: "
                                 "pip install 'difflab[tensorboard]'") from None
        self.out, self.kind, self._writer = Path(out), kind, None

    def open(self, start_step: int) -> None:
        """Start writing events at ``start_step`` (the checkpoint's step: its row and grid were written before it
        was saved); events of later steps written before are dropped."""
        if self.kind == "tensorboard" and self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.out / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None)

    def scalars(self, step: int, loss: float, lr: float, images_per_second: float, seconds: float) -> None:
        """One log row: the mean loss since the last row, the learning rate, throughput, elapsed time."""
        path = self.out / "loss.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(CSV_HEADER)
            w.writerow([step, f"{loss:.6g}", f"{lr:.3g}", f"{images_per_second:.1f}", f"{seconds:.1f}"])
        if self._writer is not None:
            values = {"loss": loss, "lr": lr, "images_per_second": images_per_second}
            for key, tag in SCALAR_TAGS.items():
                self._writer.add_scalar(tag, values[key], step)
            self._writer.flush()  # a running TensorBoard sees each row as it comes

    def image(self, step: int, grid: np.ndarray) -> None:
        """A sample grid (H x W x C uint8, :func:`difflab.figures.grid`) at ``step``."""
        if self._writer is not None:
            self._writer.add_image(IMAGE_TAG, grid, step, dataformats="HWC")
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
