"""difflab's hand-written CPU kernels (``csrc/*.cpp``): compiled with the system C++ compiler on first
use, cached, and loaded with ctypes (plain C ABI, no torch headers, so a build takes about 3 s).

The build is tuned for the machine (``-march=native``: AVX-512 loops where the CPU has them, portable
loops elsewhere) and cached under
``$DIFFLAB_CACHE`` (default ``~/.cache/difflab``)``/kernels``, keyed by source, flags, compiler and CPU.
Without a compiler, or with ``DIFFLAB_CPU_KERNELS=0``, ``library()`` is None and callers fall back to
plain torch operations (same results, slower); the reason is in ``unavailable_reason()``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

import torch

from difflab.files import OutputError, atomic_write, write_text

SOURCE = Path(__file__).with_name("csrc") / "group_norm_act.cpp"
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]


def flags() -> list[str]:
    """Compiler flags: ``FLAGS`` and ``-march=$DIFFLAB_CPU_KERNEL_MARCH`` (default ``native``; the tests
    build the portable loops with ``x86-64-v2``)."""
    return [*FLAGS, f"-march={os.environ.get('DIFFLAB_CPU_KERNEL_MARCH') or 'native'}"]

_lock = threading.Lock()
_state: dict[str, object] = {}


def cache_dir() -> Path:
    """Where built kernels are kept: ``$DIFFLAB_CACHE/kernels`` (default ``~/.cache/difflab/kernels``)."""
    root = os.environ.get("DIFFLAB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "difflab"
    )
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    """The CPU model and feature flags, so a shared cache never hands one machine another's build."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "|".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _private_folder(folder: Path) -> Path:
    """``folder`` (created 0700), which must belong to this user and be writable by no one else, nor
    its parent: otherwise another user could plant a library that every difflab process would load."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for f in (folder, folder.parent):
        st = f.stat()
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise RuntimeError(f"{f} is writable by other users; make it private (chmod go-w {f}) or set "
                               "DIFFLAB_CACHE to a folder of your own")
    return folder


def _build(compiler: str) -> Path:
    """The kernel library for this source, flags, compiler and CPU: compiled once into the private cache
    folder, with its SHA-256 recorded beside it; a cached file is used only if it still has that digest."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), " ".join(flags()), version, _cpu_signature()]).encode()
    ).hexdigest()[:16]
    target = _private_folder(cache_dir()) / f"group_norm_act-{key}.so"
    digest_file = target.with_name(target.name + ".sha256")
    if target.exists() and digest_file.exists() and digest_file.read_text().strip() == _sha256(target):
        return target

    def compile_to(tmp: Path) -> None:
        proc = subprocess.run([compiler, *flags(), "-o", str(tmp), str(SOURCE)], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode:
            raise RuntimeError(f"{compiler} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")

    # both atomic: concurrent builders (several ranks) never see half a file
    try:
        atomic_write(target, compile_to)
        digest = _sha256(target)
        write_text(digest_file, digest + "\n")
    except OutputError as e:
        raise RuntimeError(str(e)) from e
    if _sha256(target) != digest:
        raise RuntimeError(f"{target} changed while it was built")
    return target


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i, f, l = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_long  # noqa: E741
    lib.difflab_group_norm_act_forward.argtypes = [p] * 8 + [l] * 4 + [i, i, f, i, i]
    lib.difflab_group_norm_act_backward.argtypes = [p] * 11 + [l] * 4 + [i, i, i, i]
    lib.difflab_group_norm_act_forward.restype = i
    lib.difflab_group_norm_act_backward.restype = i
    lib.difflab_kernels_avx512.restype = i
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on the first call; None where it cannot be had."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                lib, reason = None, None
                if os.environ.get("DIFFLAB_CPU_KERNELS", "1") == "0":
                    reason = "disabled by DIFFLAB_CPU_KERNELS=0"
                elif (compiler := _compiler()) is None:
                    reason = "no C++ compiler found (install g++ or set CXX)"
                else:
                    try:
                        lib = _declare(ctypes.CDLL(str(_build(compiler))))
                    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                        reason = f"building {SOURCE.name} failed: {e}"
                if reason and reason != "disabled by DIFFLAB_CPU_KERNELS=0":
                    warnings.warn(f"difflab: fused CPU GroupNorm unavailable, using plain torch (slower): {reason}",
                                  RuntimeWarning, stacklevel=2)
                _state["reason"] = reason
                _state["lib"] = lib
    return _state["lib"]  # type: ignore[return-value]


def available() -> bool:
    """Whether the CPU kernels can be used (a constant for torch.compile after :func:`prepare_compile`)."""
    return library() is not None


def prepare_compile() -> None:
    """Make :func:`available` a constant for torch.compile, before compiling a network that calls it.
    Not done at import: importing torch._dynamo costs a second or more, which every command (and the
    explorer's first image) would pay without compiling anything."""
    global available
    if not getattr(available, "_difflab_constant", False):
        available = torch._dynamo.assume_constant_result(available)
        available._difflab_constant = True


def unavailable_reason() -> str | None:
    """Why ``library()`` is None (None when it is loaded or not tried yet)."""
    return _state.get("reason")  # type: ignore[return-value]


def reset() -> None:
    """Forget the loaded state, so that the next ``library()`` call decides again (for tests)."""
    with _lock:
        _state.clear()
