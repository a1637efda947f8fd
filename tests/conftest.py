import os

import pytest
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

# CI (.ci/run sets HYPOTHESIS_PROFILE=ci) runs the fuzz tests on fixed examples, so that a verdict is reproducible;
# a developer's run draws new ones each time and keeps any failure in .hypothesis/ to replay
settings.register_profile("ci", derandomize=True, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="module")
def one_thread():
    """Modules of tiny tensors run with one torch thread: thread-pool overhead dominates them, and two
    spinning threads on a shared 2-core machine are many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
