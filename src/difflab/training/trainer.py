"""The training loop: one loop for every method, on one device or many (DDP).

Everything random is a pure function of (seed, step, sample position), and the
data order is a per-epoch permutation of (seed, epoch), so the only state is the
weights, the EMA and the optimiser; a resumed run continues bit-identically and a
run can resume with another number of processes. The loss is kept on the device
and read back every ``log_every`` steps: those are the only host-device syncs.

Under torchrun every rank takes its slice of each global batch, and after every
step the ranks vote on stopping (a signal or the time limit on any rank) over a
small CPU collective, so all ranks stop after the same step; only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import signal
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from difflab import nets, recipe, runtime, threads
from difflab.conditioning import Conditioner
from difflab.config import TrainConfig, save_json
from difflab.data import to_model
from difflab.data.augment import RandomCrops
from difflab.data.captions import caption_ids
from difflab.data.loader import BatchLoader, BatchOrder
from difflab.data.source import ImageSource
from difflab.ema_lengths import parse_lengths
from difflab.errors import CheckpointError, TrainingDiverged, UsageError
from difflab.figures import grid, plot_loss, save_image
from difflab.files import OutputError, check_run_folder, write_text
from difflab.methods.method import Method, make_method
from difflab.nets.fit import network_config, speed_warning
from difflab.runs import grid_bottom
from difflab.runs import lock as runlock
from difflab.runs.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    non_finite,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_checkpoint,
    verify_checkpoint,
)
from difflab.runs.data import RESUME_OVERRIDES, describe_run, make_conditioner, open_data, pick_device, prompt_cache
from difflab.runs.distributed import DistContext
from difflab.runs.ema import build_emas
from difflab.runs.posthoc_ema import drop_snapshots_after, save_snapshot
from difflab.training.loggers import RunLogger


@dataclass
class TrainResult:
    step: int
    checkpoint: Path | None
    grid: Path | None
    images_per_second: float
    seconds: float
    stopped_by: str  # "steps", "time-limit", "signal"
    signal: int = 0  # the signal number when stopped by one (the same on every rank)


class Trainer:
    """Trains one run folder. ``resume=True`` continues the latest checkpoint in ``cfg.out``: of the settings
    ``given`` (by the user; None: every field of ``cfg``), only the ones a resumed run may change may differ
    from the run's own. ``data`` (default: ``cfg.data`` as the run layer loads it) is the same on every resume."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, progress: bool = True, log=print,
                 data: ImageSource | None = None, evaluation=None, given: Collection[str] | None = None,
                 method: Method | None = None, initial: dict[str, torch.Tensor] | None = None):
        """``method``: the method to train (default: ``cfg.method``'s); ``initial``: the network's starting
        weights (a run tuned from another, :mod:`difflab.distill`), replaced by the checkpoint's on resume."""
        self.log = log
        self.out = Path(cfg.out)
        saved = None
        if resume and (self.out / "config.json").exists():
            saved = self._merge_resume_config(cfg, given)
            cfg = saved
        elif not resume and list_checkpoints(self.out / "checkpoints"):
            raise UsageError(f"'{self.out}' already holds a trained run; pass --resume to continue it "
                             "or choose another --out")
        if saved is None:  # a new run never replaces files that are not a difflab run's
            _check_new_run_folder(self.out)
        self.cfg = cfg
        self.device = pick_device(cfg.device, 0)
        self.dist = DistContext.from_env(self.device.type)
        if self.dist.active:
            self.device = pick_device(cfg.device, self.dist.local_rank)
            if cfg.batch_size % (cfg.grad_accum * self.dist.world):
                raise UsageError(f"--batch-size {cfg.batch_size} must be divisible by --grad-accum x processes "
                                 f"= {cfg.grad_accum * self.dist.world}")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            runtime.tune_cpu()  # flush denormals (6x on the mnist-small step), keep freed memory for reuse
        self.progress = progress and self.dist.main
        self.logger = RunLogger(self.out, cfg.logger)  # loss.csv (+ TensorBoard events); checks its package now

        data = open_data(cfg) if data is None else data
        self.data = data
        self.shape = data.shape
        self.method: Method = method if method is not None else make_method(cfg)
        self.method.prepare(data)  # (impossible settings fail before anything is written)
        self.conditioner = self._conditioner(data)
        context_dim = self.conditioner.prompts.dim if cfg.conditioning == "text" else None

        torch.manual_seed(cfg.seed)
        self.net_config = (self.method.network(data)
                           or network_config(cfg, data, self.device, context_dim, self.method.preset))
        # channels-last convolutions are faster on GPUs and CPUs alike (see nets/layout.py)
        self.net = nets.build(self.net_config).to(self.device).to(memory_format=torch.channels_last)
        if initial is not None:
            self.net.load_state_dict(initial)
        self.cfg = cfg = recipe.resolve(cfg, self.device, nets.count_parameters(self.net))  # lr 0, precision auto
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     fused=self.device.type in ("cuda", "cpu"))
        # the main EMA (samples, ``ema.*`` in checkpoints) and the power EMAs snapshotted for post-hoc EMA
        self.ema, self.tracked = build_emas(self.net, cfg.ema_length, cfg.ema_decay, parse_lengths(cfg.ema_track))
        self._emas = [self.ema, *(e for e in self.tracked if e is not self.ema)]  # each updated once a step
        self._small_cpu_net = self.device.type == "cpu" and sum(p.numel() for p in self.net.parameters()) <= 4_000_000
        self.step = 0
        self._lock = runlock.acquire(self.out) if self.dist.main else None  # one writer per run folder
        if resume:
            try:
                self._restore()
            except BaseException:
                self._release_lock()
                raise
        self._train_net: nn.Module | None = self._wrap_for_training()  # DDP broadcasts rank 0's weights
        self.autocast = self._autocast()
        self.order = BatchOrder(len(data), cfg.seed, cfg.batch_size, cfg.grad_accum, self.dist.world, self.dist.rank)
        self._crops = data if isinstance(data, RandomCrops) else None  # the loader reads the larger images
        self.loader = BatchLoader(data.source if self._crops else data, self.order, self.method.batch_index, self.device,
                                  cfg.grad_accum)
        # a text run on its images' captions is conditioned on each image's caption (an index into the distinct ones)
        self._caption_ids = caption_ids(data.captions)[1] if cfg.conditioning == "text" and data.captions else None
        self._pending = 0  # a signal received on this rank and not yet acted on
        self._signal = 0  # the signal number that stopped the run (agreed by all ranks), 0 if none
        # "loop", then "final" (the last save and grid): a repeated Ctrl-C aborts only the loop. A signal during
        # the final grid lets it finish (it is bounded by --sample-steps): raising out of the sampler while its
        # threads run a batch aborts the process
        self._phase = "loop"
        self._evaluation: dict[str, float] | None = None  # the value of this step's evaluation, for its log row
        # the planner of --eval-every (difflab.evaluate.during_training.plan, passed in by the front ends: the
        # evaluation package sits above training, whose Trainer it uses for its judge classifier)
        self._plan = evaluation
        try:  # an explicit --eval-every without the Inception weights fails here, before training
            self.evaluator, self._eval_line = self._plan_evaluation()
        except BaseException:
            self._release_lock()
            raise

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @property
    def train_net(self) -> nn.Module:
        """The module a training step calls: the net, wrapped in DistributedDataParallel across processes
        and compiled with ``--compile``; :meth:`run` drops it at its end (see :meth:`release_process_group`)
        and the next step builds it again."""
        if self._train_net is None:
            self._train_net = self._wrap_for_training()
        return self._train_net

    def _wrap_for_training(self) -> nn.Module:
        net: nn.Module = self.net
        if self.dist.active:
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if not self.cfg.compile:
            return net
        from difflab.nets import cpu_kernels

        cpu_kernels.prepare_compile()
        return torch.compile(net)

    def release_process_group(self) -> None:
        """Drop the DDP wrapper, whose C++ reducer holds the process group, so that the group dies with
        its Python handle (``destroy_process_group``), which frees it without the GIL. When the reducer
        holds the last reference instead, freeing it joins gloo's worker thread while holding the GIL,
        and that thread may be waiting for the GIL to free a tensor: the process hangs at exit."""
        if self.dist.active:
            self._train_net = None

    # --- set-up ---------------------------------------------------------------------------------
    def _merge_resume_config(self, cfg: TrainConfig, given: Collection[str] | None) -> TrainConfig:
        from difflab.config import load_run_config

        saved = load_run_config(self.out)
        changed = {}
        for name in (given if given is not None else cfg.to_json()):
            new, old = getattr(cfg, name), getattr(saved, name)
            if name in RESUME_OVERRIDES:
                changed[name] = new
            elif new != old:
                raise UsageError(f"--{name.replace('_', '-')} {new} differs from the run being resumed ({old}); "
                                 "only steps, time limit, logging, sampling and checkpoint settings may change")
        return replace(saved, **changed)

    def _conditioner(self, data: ImageSource) -> Conditioner:
        return make_conditioner(self.cfg, data.num_classes or 0, data.class_names, data.name,
                                lambda: prompt_cache(self.out), data.captions)

    def _autocast(self):
        if self.cfg.precision != "bf16":  # (auto was resolved when the network was built)
            return contextlib.nullcontext
        return lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _restore(self) -> None:
        found = latest_checkpoint(self.out / "checkpoints", self.device)
        if found is None:
            if self.dist.main:
                self.log(f"no checkpoint in {self.out}; starting a new run")
            return
        tensors, meta = found
        saved_world = int(meta.get("world_size", 1))
        try:
            self.net.load_state_dict(nets.split_prefix(tensors, "model"))
            self.ema.load_state_dict(nets.split_prefix(tensors, "ema"), meta["ema_updates"])
            for i, e in enumerate(self._emas[1:]):
                e.load_state_dict(nets.split_prefix(tensors, f"ema-tracked{i}"), meta["ema_tracked_updates"][i])
            optimizer_from_tensors(self.opt, nets.split_prefix(tensors, "opt"), meta["optimizer"])
        except (RuntimeError, KeyError, ValueError) as e:
            raise CheckpointError(f"checkpoint step {meta.get('step')} in {self.out} does not fit this network "
                                  f"({str(e).splitlines()[0]})") from e
        self.step = int(meta["step"])
        if self.dist.main:
            procs = (f" (saved by {saved_world} processes, continuing with {self.dist.world})"
                     if saved_world != self.dist.world else "")
            self.log(f"resumed {self.out} at step {self.step}{procs}")

    # --- data -----------------------------------------------------------------------------------
    def batch(self, step: int, micro: int):
        """This rank's share of micro-batch ``micro`` of the global batch of ``step``: (x, labels, seeds)."""
        cfg = self.cfg
        images, labels, idx = self.loader.get(step, micro)
        if self._caption_ids is not None:
            labels = self._caption_ids[idx].to(self.device)
        lo = self.order.first_position(micro)
        pos = torch.arange(lo, lo + self.order.per_rank, device=self.device)
        seeds = pos.to(torch.int64) + cfg.seed * (1 << 32)
        if self._crops is not None:
            images = self._crops.crop(images, seeds, step)
        x = to_model(images)
        if cfg.hflip:
            from difflab.noise import seeded_uniform

            flip = seeded_uniform(seeds, step, (), self.device, salt=0xF11F) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        x = nets.match_layout(x)
        return x, labels, seeds

    # --- the loop -------------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        if cfg.lr_decay == "cosine":
            u = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
            return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, u)))
        return cfg.lr

    def _handle_signals(self):
        """SIGTERM/SIGINT ask to stop after the current step. Alone, a second Ctrl-C aborts at once; under
        torchrun repeats are ignored (a worker may get one Ctrl-C from the terminal and one from
        torchrun, and one rank must not abort alone: torchrun's --shutdown-timeout is the hard stop)."""
        def handler(signum, _frame):
            repeat = bool(self._pending)
            self._pending = self._pending or signum
            if repeat and signum == signal.SIGINT and not self.dist.active and self._phase == "loop":
                raise KeyboardInterrupt

        old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in old:
            signal.signal(s, handler)
        return old

    def train_step(self, step: int) -> torch.Tensor:
        """One optimiser step (all micro-batches); returns the loss as a device tensor (no sync)."""
        cfg = self.cfg
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(step)
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            x, labels, seeds = self.batch(step, micro)
            cond = self.conditioner.training(labels, seeds, step)
            sync = contextlib.nullcontext()
            if self.dist.active and micro < cfg.grad_accum - 1:
                sync = self.train_net.no_sync()
            with sync:
                with self.autocast():
                    loss = self.method.loss(self.train_net, x, cond, step, seeds) / cfg.grad_accum
                loss.backward()
            total += loss.detach()
        # one thread for the weight updates of a small net on a CPU: clipping, AdamW and the EMA run a few
        # small kernels per parameter tensor, and with two threads each wakes the other (mnist-small,
        # 168 tensors: fused AdamW 16.6 ms with two threads, 1.8 ms with one, on the 2-core CI machine)
        with threads.one_torch_thread(self._small_cpu_net):
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.net.parameters(), cfg.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            for ema in self._emas:
                ema.update(self.net)
        return total

    def _stop_reason(self, deadline: float | None) -> str | None:
        """Whether to stop after this step, agreed by all ranks: "signal", "time-limit" or None."""
        over = deadline is not None and time.monotonic() >= deadline
        signum, over = self.dist.agree_max([self._pending, int(over)])
        if signum:
            self._signal = signum
            return "signal"
        return "time-limit" if over else None

    def run(self) -> TrainResult:
        """Train to ``cfg.steps`` (or the time limit, or a signal), save, and write the final grid. SIGTERM or
        SIGINT at any moment, also during the last save or grid, ends with that checkpoint complete."""
        old_handlers = self._handle_signals()
        try:
            return self._run()
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            self.logger.close()
            self._release_lock()

    def _run(self) -> TrainResult:
        cfg, main = self.cfg, self.dist.main
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.method.draws_samples:
                (self.out / "samples").mkdir(exist_ok=True)
            self._truncate_log(self.step)  # first: a damaged log stops the run before anything is written
            self.logger.open(self.step)
            save_json(self.out / "config.json", cfg.to_json())
            if cfg.conditioning == "text":
                self.conditioner.prompts.save(self.out / "prompts.safetensors")
            drop_snapshots_after(self.out, self.step)
            self.log(self.describe())
            self.log(recipe.describe(cfg))
            warning = speed_warning(cfg, self.net_config, self.shape, self.device, self.dist.world)
            if warning:
                self.log(warning)
            if self._eval_line:
                self.log(self._eval_line)
            if self.dist.active and not self.method.per_sample_seeds:
                self.log(f"note: {cfg.method} draws its noise per batch, not per sample, so each rank's slice "
                         "sees the same draws and the result depends on the number of processes")
        start_step, t0 = self.step, time.monotonic()
        deadline = t0 + cfg.time_limit * 60 if cfg.time_limit else None
        buf = torch.zeros(cfg.log_every, device=self.device)
        last_logged, last_ckpt, ckpt_path, stopped_by = self.step, None, None, "steps"
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, unit="step", dynamic_ncols=True, mininterval=1.0,
                       file=sys.stderr)
        self.net.train()
        try:
            while self.step < cfg.steps:
                buf[self.step % cfg.log_every] = self.train_step(self.step)
                self.step += 1
                if bar is not None:
                    bar.update(1)
                evaluated = self._evaluate()
                stop = self._stop_reason(deadline)
                if stop or evaluated or self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self._check_and_log(buf, last_logged, t0, start_step, bar)
                    last_logged = self.step
                if stop:
                    stopped_by = stop
                    break
                if main and cfg.ema_snapshot_every and self.step % cfg.ema_snapshot_every == 0:
                    save_snapshot(self.out, self.step, self.tracked)
                if self.step % cfg.checkpoint_every == 0:
                    if last_logged != self.step:
                        self._check_and_log(buf, last_logged, t0, start_step, bar)
                        last_logged = self.step
                    ckpt_path = self.save()
                    last_ckpt = self.step
                if main and cfg.sample_every and self.step % cfg.sample_every == 0 and self.step < cfg.steps:
                    self.sample_grid(self.out / "samples" / f"step-{self.step:07d}.png")
        finally:
            if bar is not None:
                bar.close()
            self.loader.close()
            self.release_process_group()
        self._phase = "final"  # from here a repeated Ctrl-C no longer aborts: the last save completes
        if last_ckpt != self.step:
            if last_logged != self.step:
                self._check_and_log(buf, last_logged, t0, start_step, None)
            ckpt_path = self.save()
        seconds = time.monotonic() - t0
        ips = (self.step - start_step) * cfg.batch_size / max(seconds, 1e-9)
        grid = None
        if main:
            if stopped_by != "signal" and not self._pending:  # a signal asks for a quick exit
                grid_bottom.measure_training(self.out, self.method, self.ema.model, self.data, self.conditioner,
                                             self.step, self.device)
                grid = self.sample_grid(self.out / "samples" / "final.png")
            if (self.out / "loss.csv").exists():
                plot_loss(self.out / "loss.csv", self.out / "loss.png")
        self.dist.barrier()
        if self._pending and not self._signal:  # a signal during the final save or grid
            self._signal, stopped_by = self._pending, "signal"
        return TrainResult(self.step, ckpt_path, grid, ips, seconds, stopped_by, self._signal)

    def describe(self) -> str:
        cfg, d = self.cfg, self.data
        return describe_run(cfg, d, self.method.describe(d), self.net_config, nets.count_parameters(self.net), self.device,
                            self.dist.world if self.dist.active else None, self.step)

    def _check_and_log(self, buf, last_logged: int, t0: float, start_step: int, bar) -> None:
        """Read the losses since the last log (the one sync), stop on NaN/inf, append to loss.csv."""
        n = self.step - last_logged
        if n <= 0:
            return
        idx = [(last_logged + i) % self.cfg.log_every for i in range(n)]
        vals = self.dist.mean(buf[idx].float()).cpu()  # every rank sees the same global losses
        bad = (~torch.isfinite(vals)).nonzero()
        if len(bad):
            step = last_logged + int(bad[0]) + 1
            self._diverged(f"the loss became {float(vals[int(bad[0])])} at step {step}")
        # the loss is computed before each update: the weights after the last one are checked too
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.net.parameters()]).all()):
            self._diverged(f"the weights became NaN or infinite by step {self.step}")
        loss = float(vals.mean())
        elapsed = time.monotonic() - t0
        ips = (self.step - start_step) * self.cfg.batch_size / max(elapsed, 1e-9)
        if bar is not None:
            bar.set_postfix_str(f"loss {loss:.4f} | {ips:.0f} img/s", refresh=False)
        if self.dist.main:
            self.logger.scalars(self.step, loss, self.lr_at(self.step - 1), ips, elapsed, self._evaluation)
            self._evaluation = None

    # --- evaluation during training (--eval-every) ------------------------------------------------------------
    def _plan_evaluation(self):
        """(the evaluator or None, the line the run starts with): see difflab.evaluate.during_training; none
        when the Trainer was made without a planner (a judge classifier, a test)."""
        cfg = self.cfg
        if self._plan is None or not self.method.draws_samples or cfg.eval_every == 0:
            return None, ""
        if self.dist.active and cfg.eval_every < 0:  # auto: the ranks could measure differently
            return None, "evaluation: off (auto is not measured under torchrun; pass --eval-every N)"
        return self._plan(cfg, self.data, self.device, self._eval_samples, self._step_seconds)

    def _evaluate(self) -> bool:
        """At --eval-every steps: the metric of the EMA's samples (rank 0), for this step's log row."""
        if self.evaluator is None or not self.evaluator.due(self.step):
            return False
        if self.dist.main:
            self._evaluation = {self.cfg.eval_metric: self.evaluator(self.step)}
        return True

    @torch.no_grad()
    def _eval_samples(self, n: int, seed: int) -> torch.Tensor:
        """n EMA samples (uint8), drawn as ``difflab sample --run OUT --n N --seed SEED`` draws them."""
        from difflab.runs.draw import drawing
        from difflab.runs.request import SampleRequest

        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            return drawing(self._as_run(), SampleRequest(n=n, seed=seed)).images()

    def _as_run(self):
        """This run as :func:`difflab.runs.draw.load_run` would load it now: its EMA network and its settings."""
        from difflab.runs.draw import Run

        return Run(self.out, self.cfg, self.method, self.ema.model, self.conditioner, self.shape, self.data.class_names,
                   self.step, self.device, network=self.net_config)

    def _step_seconds(self) -> float:
        """Seconds of one training step, estimated as 3 forward passes of the loss (forward + backward) on the
        first batch, without touching the weights, the optimiser or any random state."""
        x, labels, seeds = self.batch(0, 0)
        cond = self.conditioner.training(labels, seeds, 0)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices), self.autocast():
            self.method.loss(self.net, x, cond, 0, seeds)  # warm-up
            start = time.perf_counter()
            self.method.loss(self.net, x, cond, 0, seeds)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        return 3 * (time.perf_counter() - start) * self.cfg.grad_accum

    def _diverged(self, what: str) -> None:
        found = list_checkpoints(self.out / "checkpoints")
        good = next((p for p in reversed(found) if verify_checkpoint(p)), None)
        keep = f"the last good checkpoint ({good.stem}) is kept" if good else "no checkpoint was written yet"
        raise TrainingDiverged(f"error: {what}; {keep} in {self.out}. Lower --lr or --weight-decay, keep "
                               "--grad-clip on, or use --precision fp32")

    def _truncate_log(self, step: int) -> None:
        """On resume, drop log rows written after the checkpoint (they will be trained again)."""
        path = self.out / "loss.csv"
        if not path.exists():
            return
        try:
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            kept = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step and math.isfinite(float(r[1]))]
        except (OSError, UnicodeDecodeError, csv.Error, ValueError, IndexError) as e:
            raise CheckpointError(f"{path} is damaged ({e.__class__.__name__}: {e}); repair or delete it to "
                                  "continue this run") from None
        if len(kept) != len(rows):
            text = io.StringIO()
            csv.writer(text).writerows(kept)
            write_text(path, text.getvalue())

    def save(self) -> Path | None:
        """Write a checkpoint (rank 0) and wait for it on every rank."""
        path = None
        if self.dist.main:
            opt_t, opt_meta = optimizer_to_tensors(self.opt)
            tensors = {**{f"model.{k}": v for k, v in self.net.state_dict().items()},
                       **{f"ema.{k}": v for k, v in self.ema.state_dict().items()},
                       **{f"ema-tracked{i}.{k}": v for i, e in enumerate(self._emas[1:]) for k, v in e.state_dict().items()},
                       **{f"opt.{k}": v for k, v in opt_t.items()}}
            meta = {"config": self.cfg.to_json(), "network": self.net_config, "optimizer": opt_meta,
                    "ema_updates": self.ema.updates, "ema_tracked_updates": [e.updates for e in self._emas[1:]],
                    "data_fingerprint": self.data.fingerprint,
                    "image_shape": list(self.shape), "class_names": self.data.class_names,
                    "world_size": self.dist.world}
            bad = non_finite(tensors)  # a checkpoint is written only when every tensor is finite
            if bad:
                self._diverged(f"{bad[0]} became NaN or infinite by step {self.step}")
            phase, self._phase = self._phase, "final"  # a repeated Ctrl-C does not abort a save
            try:
                if self.cfg.ema_snapshot_every:  # the last step always has a snapshot
                    save_snapshot(self.out, self.step, self.tracked)
                path = save_checkpoint(self.out / "checkpoints", self.step, tensors, meta, keep=self.cfg.keep)
            except OutputError as e:
                good = list_checkpoints(self.out / "checkpoints")
                keep = f"the last good checkpoint ({good[-1].stem}) is kept" if good else "no checkpoint was kept"
                raise CheckpointError(f"{e}; {keep}") from e
            finally:
                self._phase = phase
        self.dist.barrier()
        return path

    @torch.no_grad()
    def sample_grid(self, path: Path, n: int = 64) -> Path | None:
        """A grid of n EMA samples of seed 0 drawn as ``difflab sample --run OUT --n N --seed 0`` draws them
        (the run's own settings, the same grid layout); None for a method that draws no samples (a classifier)."""
        from difflab.runs.draw import drawing
        from difflab.runs.request import SampleRequest

        if not self.method.draws_samples:
            return None
        imgs = drawing(self._as_run(), SampleRequest(n=n, seed=0)).images()
        tiles = grid(imgs)
        self.logger.image(self.step, tiles)
        return save_image(tiles, path, scale=2)


def _check_new_run_folder(out: Path) -> None:
    """``--out`` of a new run: new, empty, or a difflab run's own files (no one else's are replaced)."""
    check_run_folder(out)
    if (out / "config.json").exists():
        from difflab.config import load_run_config

        try:
            load_run_config(out)
            ours = {"data", "method", "steps"} <= set(json.loads((out / "config.json").read_text()))
        except UsageError as e:
            raise UsageError(f"--out {out} holds a config.json that is not a difflab run's ({e}); choose a new "
                             "or empty folder") from e
        if not ours:
            raise UsageError(f"--out {out} holds a config.json that is not a difflab run's; choose a new or empty "
                             "folder")
    log = out / "loss.csv"
    if log.exists() and not log.read_bytes().startswith(b"step,loss,"):
        raise UsageError(f"--out {out} holds a loss.csv that is not a difflab run's; choose a new or empty folder")
