"""Batch splitting over CPU threads, and the process-wide CPU settings."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch

from difflab import threads
from difflab.denoiser import Denoiser
from difflab.nets import from_preset
from difflab.processes.gaussian import cosine_schedule
from difflab.samplers import generate


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def test_cpu_split_ranges(two_threads, monkeypatch):
    assert threads.cpu_split(0, 64, "cpu") == [(0, 32), (32, 64)]
    assert threads.cpu_split(10, 27, "cpu") == [(10, 18), (18, 27)]  # uneven: sizes differ by one at most
    assert threads.cpu_split(0, 15, "cpu") == [(0, 15)]  # fewer than 8 per thread: whole
    assert threads.cpu_split(0, 64, "cuda") == [(0, 64)]
    monkeypatch.setenv("DIFFLAB_SPLIT_BATCH", "0")
    assert threads.cpu_split(0, 64, "cpu") == [(0, 64)]
    monkeypatch.delenv("DIFFLAB_SPLIT_BATCH")
    torch.set_num_threads(1)
    assert threads.cpu_split(0, 64, "cpu") == [(0, 64)]


def test_run_split_runs_concurrently_with_one_torch_thread_each(two_threads):
    seen, barrier = [], threading.Barrier(2, timeout=30)

    def fn(lo, hi):
        barrier.wait()  # both parts are in flight at once, or this times out
        seen.append((torch.get_num_threads(), torch.is_grad_enabled(), threading.get_ident()))
        return lo, hi

    with torch.no_grad():
        assert threads.run_split(fn, [(0, 4), (4, 8)]) == [(0, 4), (4, 8)]
    assert sorted(s[:2] for s in seen) == [(1, False), (1, False)] and len({s[2] for s in seen}) == 2
    assert torch.get_num_threads() == 2  # restored


def test_run_split_reraises_the_first_error_and_restores_threads(two_threads):
    def fn(lo, hi):
        if lo:
            raise ValueError("part failed")
        return lo

    with pytest.raises(ValueError, match="part failed"):
        threads.run_split(fn, [(0, 4), (4, 8)])
    assert torch.get_num_threads() == 2


def test_generate_gives_the_same_samples_split_or_whole(two_threads, monkeypatch):
    torch.manual_seed(0)
    net = from_preset("tiny", num_classes=2).to(memory_format=torch.channels_last).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    # v-prediction keeps the samples of order one: an eps-model with random weights gives values near 1e5
    # (x0 = y - sigma eps at the cosine schedule's top, sigma ~ 2e4), where float32 rounding of split and
    # whole batches (other kernels, other summation orders) differs by more than any fixed atol
    den = Denoiser(net, cosine_schedule(), "v")
    labels = torch.arange(20) % 2

    cond_threads = set()

    def cond_fn(s):  # made in the caller's thread: a cond_fn (a prompt cache, say) need not be thread-safe
        cond_threads.add(threading.get_ident())
        return {"class_labels": labels[s]}

    def draw():
        return generate(den, 20, (1, 32, 32), seed=3, sampler="ddpm", steps=4, batch_size=20, cond_fn=cond_fn)

    calls = []
    real = threads.run_split
    monkeypatch.setattr(threads, "run_split", lambda fn, r: calls.append([p[:2] for p in r]) or real(fn, r))
    split = draw()
    assert calls == [[(0, 10), (10, 20)]]
    assert cond_threads == {threading.get_ident()}
    monkeypatch.setenv("DIFFLAB_SPLIT_BATCH", "0")
    whole = draw()
    assert calls[-1] == [(0, 20)]
    assert 0.1 < float(split.std()) < 10  # values of order one, so the tolerance below means something
    # per-sample seeds and labels: the same samples, up to float32 rounding
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(split[:10], split[10:], rtol=1e-2, atol=1e-2)


def test_tune_malloc_sets_glibc_options_unless_disabled():
    code = "from difflab.runtime import tune_malloc; print(tune_malloc(), tune_malloc())"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"DIFFLAB_TUNE_MALLOC": "0", "PATH": ""})
    import platform

    expected = "True True" if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc" else "False False"
    assert on.stdout.strip() == expected, on.stderr
    assert off.stdout.strip() == "False False", off.stderr


def test_cpu_compiled_compiles_new_inputs_alone_with_its_settings():
    """Two threads meeting an input shape first compile one after the other; later calls overlap.
    Freezing and the C++ wrapper are on during every call, in every thread (inductor's settings are
    context variables: a thread does not see another's), and restored after."""
    import time

    import torch._inductor.config as inductor_config

    from difflab.runs.draw import CpuCompiled, _signature

    before = (inductor_config.freezing, inductor_config.cpp_wrapper)
    lock, state, seen = threading.Lock(), {"now": 0, "peak": 0}, []

    class FakeCompiled(torch.nn.Module):  # notes how many calls are in flight, and the settings
        def forward(self, x, **kw):
            with lock:
                state["now"] += 1
                state["peak"] = max(state["peak"], state["now"])
            seen.append((inductor_config.freezing, inductor_config.cpp_wrapper))
            time.sleep(0.2)
            with lock:
                state["now"] -= 1
            return x

    net = CpuCompiled(torch.nn.Identity())
    net.compiled = FakeCompiled()

    def together(shape):
        state["peak"], barrier = 0, threading.Barrier(2, timeout=30)

        def call():
            barrier.wait()
            net(torch.zeros(shape), cond={"labels": torch.zeros(shape[0])})

        workers = [threading.Thread(target=call) for _ in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return state["peak"]

    assert together((2, 3)) == 1  # new: one at a time
    assert together((2, 3)) == 2  # seen: side by side
    assert together((4, 3)) == 1  # another shape compiles again
    assert set(seen) == {(True, True)}
    assert (inductor_config.freezing, inductor_config.cpp_wrapper) == before
    x = torch.zeros(2, 3)
    assert _signature((x,), {}) != _signature((x.t(),), {}) != _signature((x.bfloat16(),), {})
    assert _signature((x,), {"c": [x]}) != _signature((x,), {"c": [x[:1]]})
