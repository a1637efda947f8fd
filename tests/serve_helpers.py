"""What the explorer's tests share: a tiny trained run in a runs folder, a server on a free loopback
port, an SSE reader, and a headless Chromium (Debian's package) that may talk only to that server."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest

SECRET = b"root:$6$not-for-the-page:19000:0:99999:7:::\n"  # a private file the explorer must never send
CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None)


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory):
    """A runs folder holding 'tiny' (class-conditional, digits 8x8, a few steps) and a non-run folder."""
    from difflab.config import TrainConfig
    from difflab.training.trainer import Trainer

    root = tmp_path_factory.mktemp("runs")
    cfg = TrainConfig(data="digits", out=str(root / "tiny"), model="tiny", steps=6, batch_size=16, log_every=2,
                      checkpoint_every=6, sample_every=0, sample_steps=4, warmup=2, lr=1e-3, conditioning="class",
                      process="cosine", prediction="v", noise_sampling="uniform")  # (the explorer on flow: test_flow.py)
    Trainer(cfg, progress=False, log=lambda *a: None).run()
    (root / "notes").mkdir()  # not a run: never listed
    return root


@pytest.fixture(scope="session")
def server(runs_dir):
    from difflab.serve import ExplorerServer

    srv = ExplorerServer(runs_dir, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def request(server, path, body=None, headers=None, raw: bytes | None = None, method=None):
    """(status, parsed JSON) of one request to ``server``."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    h = {"Content-Type": "application/json"} if data is not None else {}
    h.update(headers or {})
    req = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", data=data, headers=h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def events(server, job: str, stop_after=None, on_event=None) -> list[dict]:
    """The events of a job, read over server-sent events until it ends."""
    out = []
    url = f"http://127.0.0.1:{server.port}/api/jobs/{job}/events"
    with urllib.request.urlopen(url, timeout=120) as r:
        for line in r:
            if not line.startswith(b"data: "):
                continue
            ev = json.loads(line[6:])
            out.append(ev)
            if on_event is not None:
                on_event(ev)
            if ev["type"] in ("done", "error", "cancelled"):
                return out
    return out


def png_array(url: str) -> np.ndarray:
    """A data URL's PNG as uint8 [C, H, W]."""
    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def launch_browser(playwright):
    """Headless Chromium from the Debian package (never a browser download)."""
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); .ci/run installs it")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])


def guarded_page(browser, server):
    """A page whose every request is checked: anything not for the server's own host:port is aborted and
    recorded in ``page.foreign`` (the tests assert it stays empty); console errors go to ``page.errors``."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
    page = context.new_page()
    origin = f"http://127.0.0.1:{server.port}/"
    page.foreign, page.errors = [], []

    def route(r):
        url = r.request.url
        if url.startswith(origin) or url.startswith("data:"):
            r.continue_()
        else:
            page.foreign.append(url)
            r.abort()

    context.route("**/*", route)
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    return page


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def snapshot(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root`` (links and FIFOs are neither followed nor opened) and its bytes."""
    out = {}
    for folder, _dirs, names in os.walk(root):
        for name in names:
            p = Path(folder, name)
            if p.is_file() and not p.is_symlink():
                out[p.relative_to(root).as_posix()] = p.read_bytes()
    return out
