"""Training: the loss falls, checkpoints round-trip, resume is exact, failures are clean."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from difflab.config import TrainConfig
from difflab.errors import CheckpointError, TrainingDiverged, UsageError
from difflab.runs.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from difflab.runs.draw import load_run
from difflab.training.trainer import Trainer

quiet = dict(progress=False, log=lambda *a: None)


def cfg(tmp_path, name="run", **kw):
    base = dict(data="digits", out=str(tmp_path / name), model="tiny", steps=12, batch_size=16, log_every=4,
                checkpoint_every=6, sample_every=0, sample_steps=4, warmup=2, lr=1e-3)
    base.update(kw)
    return TrainConfig(**base)


def weights(folder):
    tensors, meta = latest_checkpoint(Path(folder) / "checkpoints")
    return tensors, meta


def test_exact_resume_is_bit_identical(tmp_path):
    Trainer(cfg(tmp_path, "full"), **quiet).run()
    Trainer(cfg(tmp_path, "half", steps=6), **quiet).run()
    Trainer(cfg(tmp_path, "half", steps=12), resume=True, **quiet).run()
    a, ma = weights(tmp_path / "full")
    b, mb = weights(tmp_path / "half")
    assert ma["step"] == mb["step"] == 12
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_with_grad_accum_matches_plain_batch(tmp_path):
    # float32 on every CPU: under bf16 autocast (auto on CPUs with AVX-512 BF16 or AMX) a split batch rounds
    # differently from the whole one, and Adam amplifies that past any useful tolerance
    Trainer(cfg(tmp_path, "plain", steps=4, checkpoint_every=4, precision="fp32"), **quiet).run()
    Trainer(cfg(tmp_path, "accum", steps=4, checkpoint_every=4, grad_accum=2, precision="fp32"), **quiet).run()
    a, _ = weights(tmp_path / "plain")
    b, _ = weights(tmp_path / "accum")
    for k in a:
        if k.startswith("model."):
            assert torch.allclose(a[k], b[k], atol=2e-4), k  # Adam amplifies float noise of near-zero grads


def test_loss_falls_on_tiny_dataset(tmp_path):
    # 80 steps: the last logged loss is 0.63-0.65 of the first for seeds 0-2 (0.69 at 50 steps)
    c = cfg(tmp_path, steps=80, batch_size=32, log_every=10, checkpoint_every=80, lr=3e-3, warmup=10)
    Trainer(c, **quiet).run()
    rows = (tmp_path / "run" / "loss.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[1]) for r in rows]
    assert losses[-1] < 0.72 * losses[0], losses
    assert (tmp_path / "run" / "loss.png").exists() and (tmp_path / "run" / "samples" / "final.png").exists()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_runs_channels_last(tmp_path, precision):
    tr = Trainer(cfg(tmp_path, steps=2, precision=precision), **quiet)
    assert tr.net.down[0].res.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x, _, _ = tr.batch(0, 0)
    assert x.stride()[1] == 1  # one channel: strides say channels-last unambiguously
    assert torch.isfinite(tr.train_step(0))


def test_checkpoint_round_trip_and_retention(tmp_path):
    t = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, t, {"hello": "world"}, keep=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-0000003.json", "step-0000004.json"]
    back, meta = load_checkpoint(tmp_path / names[-1])
    assert torch.equal(back["a"], t["a"]) and torch.equal(back["b"], t["b"]) and meta["hello"] == "world"
    assert not list(tmp_path.glob("*.tmp"))


def test_corrupt_checkpoint_is_detected(tmp_path):
    save_checkpoint(tmp_path, 1, {"a": torch.ones(100)}, {})
    st = tmp_path / "step-0000001.safetensors"
    data = bytearray(st.read_bytes())
    data[-5] ^= 0xFF
    st.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        latest_checkpoint(tmp_path)


def test_half_written_checkpoint_is_never_used(tmp_path):
    save_checkpoint(tmp_path, 1, {"a": torch.ones(3)}, {})
    (tmp_path / ".step-0000002.safetensors.tmp").write_bytes(b"partial")
    (tmp_path / "step-0000002.safetensors").write_bytes(b"no json beside me")  # killed before the JSON
    tensors, meta = latest_checkpoint(tmp_path)
    assert meta["step"] == 1


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tmp_path, monkeypatch):
    tr = Trainer(cfg(tmp_path, steps=20, checkpoint_every=4), **quiet)
    real = tr.method.loss

    def loss(net, x, cond, step, seeds):
        value = real(net, x, cond, step, seeds)
        return value * float("nan") if step == 9 else value

    monkeypatch.setattr(tr.method, "loss", loss)
    with pytest.raises(TrainingDiverged, match="step 10"):
        tr.run()
    found = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert found[-1].name == "step-0000008.json"
    tensors, _ = load_checkpoint(found[-1])
    assert all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())


def test_refuses_to_overwrite_and_checks_resume_flags(tmp_path):
    Trainer(cfg(tmp_path, steps=4, checkpoint_every=4), **quiet).run()
    with pytest.raises(UsageError, match="--resume"):
        Trainer(cfg(tmp_path, steps=8), **quiet)
    changed = cfg(tmp_path, steps=8, lr=5e-3)
    with pytest.raises(UsageError, match="--lr"):
        Trainer(changed, resume=True, given={"steps", "lr"}, **quiet)


def test_time_limit_stops_and_saves(tmp_path):
    res = Trainer(cfg(tmp_path, steps=100_000, time_limit=0.05, checkpoint_every=100_000), **quiet).run()
    assert res.stopped_by == "time-limit" and 0 < res.step < 100_000
    assert weights(tmp_path / "run")[1]["step"] == res.step
    run = load_run(tmp_path / "run")
    imgs = run.sample(4, steps=3)
    assert imgs.dtype == torch.uint8 and imgs.shape == (4, 1, 8, 8)


def test_run_sampling_reproducible_and_batch_independent(tmp_path):
    Trainer(cfg(tmp_path, steps=4, checkpoint_every=4), **quiet).run()
    run = load_run(tmp_path / "run")
    a = run.sample(6, seed=3, steps=5, batch_size=6)
    b = run.sample(6, seed=3, steps=5, batch_size=4)
    assert torch.equal(a, b)


def test_bf16_sampling_follows_float32(tmp_path):
    Trainer(cfg(tmp_path, steps=30, checkpoint_every=30, lr=3e-3), **quiet).run()
    run = load_run(tmp_path / "run")
    ref = run.sample(8, seed=1, steps=5).float()
    run.speed_up(bf16=True)
    conv = run.net.down[0].res.conv1.weight
    assert conv.dtype == torch.bfloat16 and conv.is_contiguous(memory_format=torch.channels_last)
    out = run.sample(8, seed=1, steps=5).float()
    assert (out - ref).abs().mean() < 4  # uint8 levels: bf16 rounding, not another image


@pytest.mark.slow
def test_compiled_cpu_sampling_matches_eager(tmp_path):
    Trainer(cfg(tmp_path, steps=4, checkpoint_every=4), **quiet).run()
    run = load_run(tmp_path / "run")
    ref = run.sample(5, seed=2, steps=3).float()
    out = run.speed_up(compile=True).sample(5, seed=2, steps=3, batch_size=3).float()  # batches of 3 and 2
    assert (out - ref).abs().max() <= 1
    import torch._inductor.config as inductor_config

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:  # a batch of 16 splits over two threads that call the compiled net at once
        split = run.sample(16, seed=2, steps=3, batch_size=16).float()
    finally:
        torch.set_num_threads(old)
    assert (split[:5] - ref).abs().max() <= 1
    assert inductor_config.freezing is False and inductor_config.cpp_wrapper is False  # this thread's settings untouched


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "difflab", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.mark.parametrize("args,msg", [
    (["train", "--data", "nonexistent-set", "--out", "OUT"], "nonexistent-set"),
    (["train", "--data", "digits", "--steps", "0", "--out", "OUT"], "--steps"),
    (["train", "--data", "digits", "--method", "bogus"], "invalid choice"),
    (["sample", "--run", "does/not/exist", "--out", "x.png"], "does not exist"),
    (["sample", "--run", "OUT", "--n", "0"], "--n"),
])
def test_cli_usage_errors_are_one_line_exit_2(tmp_path, args, msg):
    args = [a.replace("OUT", str(tmp_path / "o")) for a in args]
    r = _cli(*args)
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_corrupt_checkpoint_is_exit_2_and_untouched(tmp_path):
    Trainer(cfg(tmp_path, steps=4, checkpoint_every=4), **quiet).run()
    st = next((tmp_path / "run" / "checkpoints").glob("*.safetensors"))
    st.write_bytes(st.read_bytes()[:-10])
    before = st.read_bytes()
    r = _cli("sample", "--run", str(tmp_path / "run"), "--n", "2", "--out", str(tmp_path / "g.png"))
    assert r.returncode == 2 and "corrupt" in r.stderr and "Traceback" not in r.stderr
    r = _cli("train", "--data", "digits", "--model", "tiny", "--out", str(tmp_path / "run"), "--resume",
             "--steps", "8")
    assert r.returncode == 2 and "corrupt" in r.stderr
    assert st.read_bytes() == before
    assert json.loads((tmp_path / "run" / "config.json").read_text())["steps"] == 4


def test_cli_train_and_sample_npz(tmp_path):
    out = tmp_path / "cli"
    r = _cli("train", "--data", "digits", "--model", "tiny", "--out", str(out), "--steps", "3", "--batch-size",
             "8", "--sample-every", "0", "--sample-steps", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    r = _cli("sample", "--run", str(out), "--n", "5", "--steps", "3", "--out", str(tmp_path / "g.png"),
             "--save-npz", str(tmp_path / "s.npz"), "--sampler", "ddpm")
    assert r.returncode == 0, r.stderr
    import numpy as np

    arr = np.load(tmp_path / "s.npz")["images"]
    assert arr.shape == (5, 8, 8, 1) and arr.dtype == np.uint8
    assert (tmp_path / "g.png").exists()


def test_optimizer_state_keeps_the_memory_format_of_channels_last_weights():
    """Fused AdamW reads state and weight as flat buffers: restored moments must share the weight's strides."""
    from difflab.runs.checkpoint import optimizer_from_tensors, optimizer_to_tensors

    def make():
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
        return conv, torch.optim.AdamW(conv.parameters(), lr=1e-2, fused=True)

    def step(conv, opt, seed):
        torch.manual_seed(seed)
        conv(torch.randn(2, 3, 5, 5)).square().sum().backward()
        opt.step()
        opt.zero_grad()

    a, opt_a = make()
    step(a, opt_a, 1)
    tensors, meta = optimizer_to_tensors(opt_a)
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}  # as safetensors gives them back
    b, opt_b = make()
    b.load_state_dict(a.state_dict())
    optimizer_from_tensors(opt_b, tensors, meta)
    assert opt_b.state[b.weight]["exp_avg"].stride() == b.weight.stride()
    step(a, opt_a, 2)
    step(b, opt_b, 2)
    assert torch.equal(a.weight, b.weight)
