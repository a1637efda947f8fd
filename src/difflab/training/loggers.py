"""Where the trainer's numbers and sample grids go (``--logger``).

``loss.csv`` is always written (step, loss, lr, images/s, seconds, and KID or FID in the rows of the steps
evaluated with ``--eval-every``): it is the run's own record (``loss.png``, the explorer and a resume read
it). ``--logger tensorboard`` also writes the loss, the learning rate, images/s and every periodic sample
grid as TensorBoard events into ``RUN/tensorboard/`` (``tensorboard --logdir RUN``). A resumed run marks
the step after its checkpoint in the events, so TensorBoard drops what was logged after the checkpoint and keeps
the rows up to it, as the CSV does.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from difflab.errors import UsageError
from difflab.files import write_text

LOGGERS = ("csv", "tensorboard")
TENSORBOARD_DIR = "tensorboard"  # under the run folder
EVAL_COLUMNS = ["kid", "fid"]  # empty but in the rows of the steps evaluated (--eval-every)
CSV_HEADER = ["step", "loss", "lr", "images_per_second", "seconds", *EVAL_COLUMNS]
SCALAR_TAGS = {"loss": "train/loss", "lr": "train/lr", "images_per_second": "train/images_per_second",
               **{m: f"eval/{m}" for m in EVAL_COLUMNS}}
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
        was saved); events of later steps written before are dropped. A loss.csv of an older difflab gets the
        evaluation columns (empty) first."""
        self._widen_csv()
        if self.kind == "tensorboard" and self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.out / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None)

    def _widen_csv(self) -> None:
        path = self.out / "loss.csv"
        if not path.exists():
            return
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows or rows[0] == CSV_HEADER:
            return
        pad = len(CSV_HEADER) - len(rows[0])
        text = io.StringIO()
        csv.writer(text).writerows([CSV_HEADER] + [r + [""] * pad for r in rows[1:] if r])
        write_text(path, text.getvalue())

    def scalars(self, step: int, loss: float, lr: float, images_per_second: float, seconds: float,
                evaluation: dict[str, float] | None = None) -> None:
        """One log row: the mean loss since the last row, the learning rate, throughput, elapsed time, and the
        ``evaluation`` of this step ({"kid": value} or {"fid": value}) when there was one."""
        path = self.out / "loss.csv"
        new = not path.exists()
        evaluation = evaluation or {}
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(CSV_HEADER)
            w.writerow([step, f"{loss:.6g}", f"{lr:.3g}", f"{images_per_second:.1f}", f"{seconds:.1f}",
                        *(f"{evaluation[m]:.6g}" if m in evaluation else "" for m in EVAL_COLUMNS)])
        if self._writer is not None:
            values = {"loss": loss, "lr": lr, "images_per_second": images_per_second, **evaluation}
            for key, tag in SCALAR_TAGS.items():
                if key in values:
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
