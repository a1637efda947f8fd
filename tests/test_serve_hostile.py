"""The explorer against a hostile runs folder and hostile clients: links out of the runs folder or a run,
FIFOs, damaged JSON, foreign data folders, thousands of runs; bad JSON bodies, event ids and floods of
jobs. Every case ends in a listed damaged run or a 4xx answer of one line, no file is read outside the
runs folder, and every file that was in the runs folder is byte-identical afterwards."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serve_helpers import SECRET, guarded_page, launch_browser, request, runs_dir, server, snapshot  # noqa: F401 - fixtures

from difflab.errors import CheckpointError, DataError, UsageError


def serve(root: Path):
    from difflab.serve import ExplorerServer

    srv = ExplorerServer(root, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv


@pytest.fixture
def served():
    """serve(root) for this test; every server started is shut down at the end."""
    started = []

    def start(root: Path):
        started.append(serve(root))
        return started[-1]

    yield start
    for srv in started:
        srv.shutdown()
        srv.server_close()


def in_time(fn, seconds: float = 20.0):
    """fn()'s result, failing the test (instead of hanging it) when it takes longer than ``seconds``."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn} hung for over {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def one_line(answer) -> str:
    assert isinstance(answer, dict) and isinstance(answer.get("error"), str), answer
    assert "\n" not in answer["error"] and "Traceback" not in answer["error"], answer
    return answer["error"]


def newest_json(run: Path) -> Path:
    from difflab.runs.checkpoint import list_checkpoints

    return list_checkpoints(run / "checkpoints")[-1]


@pytest.fixture
def hostile(runs_dir, tmp_path):  # noqa: F811
    """A runs folder: 'good' (the tiny run), a secret file and a run outside it, and a helper to add runs."""
    root = tmp_path / "runs"
    root.mkdir()
    shutil.copytree(runs_dir / "tiny", root / "good")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "shadow").write_bytes(SECRET)
    shutil.copytree(runs_dir / "tiny", outside / "elsewhere")
    return root, outside


# --- the runs folder is untrusted --------------------------------------------------------------------------
def test_a_run_folder_that_links_elsewhere_is_not_listed(hostile, served):
    root, outside = hostile
    (root / "linked").symlink_to(outside / "elsewhere", target_is_directory=True)
    (root / "inside-link").symlink_to(root / "good", target_is_directory=True)
    srv = served(root)
    status, answer = request(srv, "/api/runs")
    assert status == 200 and [r["name"] for r in answer["runs"]] == ["good"]
    for path, body in (("/api/sample", {"run": "linked", "steps": 1, "count": 1}),
                       ("/api/forward", {"run": "inside-link", "process": "mask"})):
        status, answer = request(srv, path, body)
        assert status == 400 and "unknown run" in one_line(answer)
    assert request(srv, "/api/dataset?run=linked")[0] == 400


def test_a_link_out_of_a_run_is_never_served(hostile, served):
    root, outside = hostile
    run = root / "good"
    zzz = run / "samples" / "zzz.png"
    zzz.symlink_to(outside / "shadow")
    os.utime(zzz, follow_symlinks=False)  # the newest entry of samples/
    os.utime(outside / "shadow")
    (run / "samples" / "up.png").symlink_to(Path("..") / ".." / ".." / "outside" / "shadow")
    before = snapshot(root.parent)
    srv = served(root)
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/api/monitor?run=good", timeout=30) as r:
        line = next(ln for ln in r if ln.startswith(b"data: "))
    state = json.loads(line[6:])
    assert state["grid"]["name"] == "final.png" and state["rows"]  # the run's own grid and loss
    assert b"not-for-the-page" not in line and "shadow" not in line.decode()
    catalog = srv.catalog
    with pytest.raises(CheckpointError, match="links outside"):
        catalog.read_file("good", "samples/zzz.png", 1 << 20)
    assert catalog.newest_grid("good")[0] == "final.png"
    assert snapshot(root.parent) == before


def test_a_run_whose_checkpoints_or_log_link_out_is_damaged_not_followed(hostile, served):
    root, outside = hostile
    shutil.copytree(root / "good", root / "ckpt-out", symlinks=True)
    shutil.rmtree(root / "ckpt-out" / "checkpoints")
    (root / "ckpt-out" / "checkpoints").symlink_to(outside / "elsewhere" / "checkpoints", target_is_directory=True)
    shutil.copytree(root / "good", root / "log-out")
    (root / "log-out" / "loss.csv").unlink()
    (root / "log-out" / "loss.csv").symlink_to(outside / "shadow")
    shutil.copytree(root / "good", root / "config-out")
    (root / "config-out" / "config.json").unlink()
    (root / "config-out" / "config.json").symlink_to(outside / "elsewhere" / "config.json")
    shutil.copytree(root / "good", root / "tensors-out")
    tensors = newest_json(root / "tensors-out").with_suffix(".safetensors")
    tensors.unlink()
    tensors.symlink_to(outside / "elsewhere" / "checkpoints" / tensors.name)
    srv = served(root)
    runs = {r["name"]: r for r in request(srv, "/api/runs")[1]["runs"]}
    for name in ("ckpt-out", "config-out", "tensors-out"):
        assert runs[name]["damaged"] and "links outside" in runs[name]["error"], name
    assert runs["good"]["step"] == 6 and runs["log-out"]["step"] == 6
    status, answer = request(srv, "/api/sample", {"run": "ckpt-out", "steps": 1, "count": 1})
    assert status == 400 and "damaged" in one_line(answer)
    status, answer = request(srv, "/api/monitor?run=log-out")
    assert status == 400 and "links outside" in one_line(answer) and "not-for-the-page" not in answer["error"]


@pytest.mark.parametrize("where", ["config", "checkpoint", "tensors", "grid", "log"])
def test_a_fifo_never_hangs_the_listing_or_a_request(hostile, served, where):
    root, _ = hostile
    run = root / "fifo"
    shutil.copytree(root / "good", run)
    target = {"config": run / "config.json", "checkpoint": run / "checkpoints" / "step-0000009.json",
              "tensors": newest_json(run).with_suffix(".safetensors"), "grid": run / "samples" / "zzz.png",
              "log": run / "loss.csv"}[where]
    target.unlink(missing_ok=True)
    os.mkfifo(target)
    if where == "checkpoint":
        (run / "checkpoints" / "step-0000009.safetensors").write_bytes(b"")
    srv = served(root)
    runs = {r["name"]: r for r in in_time(lambda: request(srv, "/api/runs"))[1]["runs"]}
    assert runs["good"]["step"] == 6 and "error" not in runs["good"]
    if where in ("config", "checkpoint", "tensors"):
        assert runs["fifo"]["damaged"] and "not a regular file" in runs["fifo"]["error"]
        status, answer = in_time(lambda: request(srv, "/api/sample", {"run": "fifo", "steps": 1, "count": 1}))
        assert status == 400 and "not a regular file" in one_line(answer)
    elif where == "grid":
        assert srv.catalog.newest_grid("fifo")[0] == "final.png"
    else:
        status, answer = in_time(lambda: request(srv, "/api/monitor?run=fifo"))
        assert status == 400 and "not a regular file" in one_line(answer)
    assert in_time(lambda: request(srv, "/api/runs"))[0] == 200  # and the server still answers


def test_a_damaged_loss_log_shows_the_rows_before_the_damage(hostile, served):
    import urllib.request

    root, _ = hostile
    log = root / "good" / "loss.csv"
    log.write_text(log.read_text() + "8," + "9" * 200_000 + "\n")
    srv = served(root)
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/api/monitor?run=good", timeout=30) as r:
        state = json.loads(next(ln for ln in r if ln.startswith(b"data: "))[6:])
    assert [row[0] for row in state["rows"]] == [2, 4, 6]


def _damage(root: Path, name: str, how: str) -> None:
    run = root / name
    if how.startswith("diffusers"):
        run.mkdir()
        (run / "diffusion_pytorch_model.safetensors").write_bytes(b"")
        cfg = {"diffusers [1]": [1], "diffusers sample_size abc": {"sample_size": "abc", "in_channels": 1},
               "diffusers sample_size huge": {"sample_size": 100000}, "diffusers binary": None}[how]
        (run / "config.json").write_bytes(b"\xff\xfe\x00binary" if cfg is None else json.dumps(cfg).encode())
        return
    shutil.copytree(root / "good", run)
    js = newest_json(run)
    meta = json.loads(js.read_text())
    if how == "checkpoint [1]":
        js.write_text("[1]")
    elif how == "checkpoint binary":
        js.write_bytes(bytes(range(256)) * 4)
    elif how == "checkpoint step x":
        js.write_text(json.dumps({**meta, "step": "x"}))
    elif how == "checkpoint shape":
        js.write_text(json.dumps({**meta, "image_shape": [1, 50000, 50000]}))
    elif how == "checkpoint deep":
        js.write_text("[" * 100_000 + "]" * 100_000)
    elif how == "config [1]":
        (run / "config.json").write_text("[1]")
    elif how == "config T x":
        (run / "config.json").write_text(json.dumps({**json.loads((run / "config.json").read_text()), "T": "x"}))
    elif how == "config huge":
        (run / "config.json").write_bytes(b" " * (5 << 20) + b"{}")


DAMAGES = {"checkpoint [1]": "not a JSON object", "checkpoint binary": "not valid JSON",
           "checkpoint step x": "'step' has the wrong type", "checkpoint shape": "image_shape",
           "checkpoint deep": "not valid JSON", "config [1]": "not a JSON object", "config T x": "config.json",
           "config huge": "at most 4 MiB", "diffusers [1]": "not a JSON object",
           "diffusers sample_size abc": "sample_size", "diffusers sample_size huge": "sample_size",
           "diffusers binary": "not valid JSON"}


@pytest.mark.parametrize("how", list(DAMAGES))
def test_a_damaged_run_is_listed_with_its_reason_beside_the_others(hostile, served, how):
    root, _ = hostile
    _damage(root, "bad", how)
    before = snapshot(root)
    srv = served(root)
    status, answer = request(srv, "/api/runs")
    assert status == 200, answer
    runs = {r["name"]: r for r in answer["runs"]}
    assert runs["good"]["step"] == 6 and runs["good"]["shape"] == [1, 8, 8]
    assert runs["bad"]["damaged"] is True and DAMAGES[how] in runs["bad"]["error"]
    assert "\n" not in runs["bad"]["error"]
    for path, body in (("/api/sample", {"run": "bad", "steps": 1, "count": 1}), ("/api/load", {"run": "bad"})):
        status, answer = request(srv, path, body)
        assert status == 400 and "damaged" in one_line(answer)
    assert request(srv, "/api/sample", {"run": "good", "steps": 1, "count": 1})[0] == 202
    assert snapshot(root) == before


def test_data_is_shown_only_when_it_is_the_runs_own(hostile, served, tmp_path):
    root, _ = hostile
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(photos / f"private-{i}.png")
    for name, change in (("foreign", {"data": str(photos)}), ("no-print", None)):
        shutil.copytree(root / "good", root / name)
        if change:
            cfg = json.loads((root / name / "config.json").read_text())
            (root / name / "config.json").write_text(json.dumps({**cfg, **change}))
        else:
            js = newest_json(root / name)
            js.write_text(json.dumps({k: v for k, v in json.loads(js.read_text()).items() if k != "data_fingerprint"}))
    srv = served(root)
    status, data = request(srv, "/api/dataset?run=good&n=2")
    assert status == 200 and len(data["images"]) == 2
    status, answer = request(srv, "/api/dataset?run=foreign&n=2")
    assert status == 400 and "not the data it was trained on" in one_line(answer)
    status, answer = request(srv, "/api/forward", {"run": "foreign", "process": "mask"})
    assert status == 400 and "not the data it was trained on" in one_line(answer)
    status, answer = request(srv, "/api/dataset?run=no-print")
    assert status == 400 and "no fingerprint" in one_line(answer)
    with pytest.raises(DataError, match="trained on"):
        srv.catalog.training_data("foreign")


def test_a_cold_runs_foreign_data_is_never_sampled_from(runs_dir, tmp_path):  # noqa: F811
    from difflab.serve.catalog import Catalog

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(photos / f"private-{i}.png")
    root = tmp_path / "runs"
    shutil.copytree(runs_dir / "tiny", root / "cold")
    cfg = json.loads((root / "cold" / "config.json").read_text())
    (root / "cold" / "config.json").write_text(json.dumps({**cfg, "method": "cold", "conditioning": "none",
                                                           "data": str(photos)}))
    with pytest.raises(DataError, match="trained on"):
        Catalog(root).model("cold")


def test_the_listing_is_cached_until_a_file_it_read_changes(hostile):
    from difflab.serve.catalog import Catalog

    root, _ = hostile
    catalog = Catalog(root)
    assert catalog.info("good").step == 6
    js = newest_json(root / "good")
    meta = json.loads(js.read_text())
    shutil.copy(js.with_suffix(".safetensors"), js.with_name("step-0000008.safetensors"))
    js.with_name("step-0000008.json").write_text(json.dumps({**meta, "step": 8,
                                                             "tensors": "step-0000008.safetensors"}))
    assert catalog.info("good").step == 8  # a new checkpoint
    js.with_name("step-0000008.json").write_text(json.dumps({**meta, "step": 9, "tensors": "step-0000008.safetensors"}))
    assert catalog.info("good").step == 9  # a JSON rewritten in place
    cfg = root / "good" / "config.json"
    cfg.write_text(cfg.read_text().replace('"conditioning": "class"', '"conditioning": "none"'))
    assert catalog.info("good").conditioning == "none"
    shutil.rmtree(root / "good")
    assert catalog.names() == []


def _many_runs(root: Path, src: Path, n: int) -> None:
    cfg = (src / "config.json").read_bytes()
    js = newest_json(src)
    meta = js.read_bytes()
    for i in range(n):
        run = root / f"run-{i:04d}"
        (run / "checkpoints").mkdir(parents=True)
        (run / "config.json").write_bytes(cfg)
        (run / "checkpoints" / js.name).write_bytes(meta)
        (run / "checkpoints" / js.with_suffix(".safetensors").name).write_bytes(b"")  # never read by the listing


def test_two_thousand_runs_list_in_well_under_a_second(runs_dir, tmp_path, served, capsys):  # noqa: F811
    root = tmp_path / "runs"
    _many_runs(root, runs_dir / "tiny", 2000)
    srv = served(root)
    t0 = time.perf_counter()
    status, answer = request(srv, "/api/runs")
    first = time.perf_counter() - t0
    assert status == 200 and len(answer["runs"]) == 2000 and answer["runs"][1999]["step"] == 6
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        status, again = request(srv, "/api/runs")
        times.append(time.perf_counter() - t0)
    assert again == answer
    with capsys.disabled():
        print(f"\n/api/runs over 2,000 runs: first {first:.2f} s, cached {min(times):.3f}-{max(times):.3f} s")
    assert max(times) < 5.0  # generous for a shared machine; measured well under a second


def test_the_page_marks_a_damaged_run_and_opens_a_good_one(hostile, served):
    root, _ = hostile
    _damage(root, "aaa-bad", "checkpoint [1]")
    srv = served(root)
    runs = request(srv, "/api/runs")[1]["runs"]
    assert [r["name"] for r in runs] == ["aaa-bad", "good"] and runs[0]["damaged"]
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    with playwright.sync_playwright() as p:
        browser = launch_browser(p)
        try:
            page = guarded_page(browser, srv)
            page.goto(f"http://127.0.0.1:{srv.port}/")
            page.wait_for_selector("#run option[value=good]", state="attached")
            assert page.inner_text("#run option[value=aaa-bad]") == "aaa-bad (damaged)"
            assert page.input_value("#run") == "good"
            page.select_option("#run", "aaa-bad")
            page.wait_for_selector("#run-info:has-text('damaged: ')")
            assert "not a JSON object" in page.inner_text("#run-info")
            # the good run's answers still on their way must not make the page ask anything of the damaged one
            page.wait_for_load_state("networkidle")
            assert page.foreign == [] and page.errors == []
        finally:
            browser.close()


def test_usage_errors_are_raised_for_unknown_runs(hostile):
    from difflab.serve.catalog import Catalog

    root, _ = hostile
    with pytest.raises(UsageError, match="unknown run"):
        Catalog(root).info("../good")


# --- hostile clients: the server's limits ------------------------------------------------------------------
BAD_BODIES = {
    b'{"run": "good", "guidance": NaN}': "guidance must be a number, got NaN",
    b'{"run": "good", "guidance": Infinity}': "guidance must be a number, got Infinity",
    b'{"run": "good", "seed": -Infinity}': "seed must be a number",
    b'{"run": "good", "guidance": 1e400}': "guidance must be a number, got 1e400",
    b'{"run": "good", "seed": ' + b"9" * 5000 + b"}": "number of 5000 characters",
    b"[" * 100_000 + b"]" * 100_000: "nested too deeply",
    b'{"run": "good", "columns": ' + b"[" * 40 + b"]" * 40 + b"}": "nested too deeply",
    b'{"run": "good"': "not valid JSON",
    b"\xff\xfe{}": "not valid JSON",
    b"[1]": "must be a JSON object",
    b'"run"': "must be a JSON object",
}


@pytest.mark.parametrize("raw", list(BAD_BODIES))
@pytest.mark.parametrize("path", ["/api/sample", "/api/compare", "/api/forward", "/api/edit", "/api/fewstep",
                                  "/api/jobs/1/cancel"])
def test_strict_json_bodies_are_one_line_400s(hostile, served, capfd, raw, path):
    root, _ = hostile
    srv = served(root)
    before = snapshot(root)
    status, answer = request(srv, path, raw=raw)
    assert status == 400 and BAD_BODIES[raw] in one_line(answer)
    assert "Traceback" not in capfd.readouterr().err
    assert snapshot(root) == before


def raw_http(srv, data: bytes, timeout: float = 10.0) -> bytes:
    """What the server answers to ``data`` sent as is on a new connection (until it closes)."""
    import socket

    with socket.create_connection(("127.0.0.1", srv.port), timeout=timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(1 << 16):
            chunks.append(chunk)
    return b"".join(chunks)


def test_content_length_that_lies_is_a_400_not_a_hang(hostile, served):
    root, _ = hostile
    srv = served(root)
    head = f"POST /api/sample HTTP/1.0\r\nHost: 127.0.0.1:{srv.port}\r\nContent-Type: application/json\r\n"
    for length, body, want in (("-5", b"{}", "Content-Length"), ("100", b'{"run": "good"}', "ended after 15 of the 100"),
                               ("x", b"{}", "Content-Length"), ("9" * 40, b"{}", "Content-Length"),
                               ("\u00b2", b"{}", "Content-Length")):
        data = f"{head}Content-Length: {length}\r\n\r\n".encode("latin-1") + body
        answer = in_time(lambda data=data: raw_http(srv, data))
        assert answer.startswith(b"HTTP/1.0 400"), answer[:200]
        assert want in json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]


def test_a_silent_client_is_dropped_after_the_socket_timeout(hostile, served, monkeypatch):
    import socket

    from difflab.serve import server as server_module

    monkeypatch.setattr(server_module.Handler, "timeout", 1.0)
    root, _ = hostile
    srv = served(root)
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as s:
        s.sendall(f"POST /api/sample HTTP/1.0\r\nHost: 127.0.0.1:{srv.port}\r\nContent-Type: application/json\r\n"
                  "Content-Length: 50\r\n\r\n{".encode())  # and then nothing
        answer = s.recv(1 << 16)
    assert answer.startswith(b"HTTP/1.0 408") and time.perf_counter() - t0 < 10
    with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as s:  # not even a request line
        assert s.recv(1 << 16) == b""


def test_connections_at_once_are_bounded(hostile, served):
    import socket

    root, _ = hostile
    srv = served(root)
    srv.connections = threading.BoundedSemaphore(2)
    idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(2)]  # each holds a slot
    try:
        time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:  # answered before it asks
            answer = in_time(lambda: s.recv(1 << 16))
        assert answer.startswith(b"HTTP/1.0 503") and b"too many requests at once" in answer
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 10
    while request(srv, "/api/runs")[0] != 200:  # the slots come back when the idle clients go
        assert time.monotonic() < deadline
        time.sleep(0.1)


def _finished_job(srv) -> tuple[str, bytes]:
    import urllib.request

    status, answer = request(srv, "/api/sample", {"run": "good", "steps": 3, "count": 2})
    assert status == 202
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/api/jobs/{answer['job']}/events", timeout=60) as r:
        full = r.read()
    return answer["job"], full


@pytest.mark.parametrize("last, expect", [("-2000000", "all"), ("-1", "all"), ("2", "after 2"), ("99999999", "none"),
                                          ("abc", 400), ("1e9", 400), ("9" * 40, 400), ("\u00b2", 400), ("", "all")])
def test_last_event_id_is_checked_and_clamped(hostile, served, last, expect):
    import urllib.request

    root, _ = hostile
    srv = served(root)
    job, full = _finished_job(srv)
    req = urllib.request.Request(f"http://127.0.0.1:{srv.port}/api/jobs/{job}/events", headers={"Last-Event-ID": last})
    if expect == 400:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 400 and "Last-Event-ID" in one_line(json.loads(e.value.read()))
        return
    with urllib.request.urlopen(req, timeout=30) as r:
        got = r.read()
    n = full.count(b"\ndata: ")
    want = {"all": full, "none": b""}.get(expect, b"id: 3\n" + full.split(b"id: 3\n", 1)[1] if n else b"")
    assert got == want and len(got) <= len(full)


def test_event_and_monitor_streams_end_by_themselves_and_resume(hostile, served, monkeypatch):
    import urllib.request

    from difflab.serve import server as server_module

    monkeypatch.setattr(server_module, "MAX_STREAM_S", 1.5)
    monkeypatch.setattr(server_module, "MONITOR_S", 0.2)
    monkeypatch.setattr(server_module, "KEEPALIVE_S", 0.2)
    root, _ = hostile
    srv = served(root)
    url = f"http://127.0.0.1:{srv.port}/api/monitor?run=good"
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as r:
        lines = [ln for ln in in_time(r.read).split(b"\n") if ln.startswith((b"id: ", b"data: "))]
    assert time.perf_counter() - t0 < 10
    first = json.loads(lines[1][6:])
    assert lines[0] == b"id: 3" and len(first["rows"]) == 3  # the id counts the loss rows sent
    assert all(json.loads(ln[6:])["rows"] == [] for ln in lines[3::2])
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Last-Event-ID": "2"}), timeout=30) as r:
        again = json.loads(next(ln for ln in r if ln.startswith(b"data: "))[6:])
    assert again["rows"] == first["rows"][2:]
    status, answer = request(srv, "/api/sample", {"run": "good", "sampler": "ddpm", "steps": 1000, "count": 64})
    t0 = time.perf_counter()
    in_time(lambda: urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/api/jobs/{answer['job']}/events",
                                           timeout=30).read())  # a long job's stream ends too
    assert time.perf_counter() - t0 < 10
    request(srv, f"/api/jobs/{answer['job']}/cancel", {})


def test_open_streams_are_bounded(hostile, served):
    import urllib.request

    root, _ = hostile
    srv = served(root)
    srv.streams = threading.BoundedSemaphore(1)
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/api/monitor?run=good", timeout=30) as r:
        next(ln for ln in r if ln.startswith(b"data: "))
        status, answer = request(srv, "/api/monitor?run=good")
        assert status == 429 and "event streams are open" in one_line(answer)


def test_the_job_queue_is_bounded_per_client_and_in_all():
    from difflab.serve.jobs import MAX_PER_CLIENT, MAX_WAITING, JobQueue, QueueFull

    gate = threading.Event()
    q = JobQueue()
    try:
        jobs = [q.submit("block", lambda job: gate.wait(30), "a")]
        jobs += [q.submit("x", lambda job: None, "a") for _ in range(MAX_PER_CLIENT - 1)]
        with pytest.raises(QueueFull, match=f"limit is {MAX_PER_CLIENT} per client"):
            q.submit("x", lambda job: None, "a")
        jobs[-1].cancel()  # a cancelled job no longer counts
        jobs.append(q.submit("x", lambda job: None, "a"))
        clients = iter(f"c{i}" for i in range(1000))
        while sum(j.waiting for j in jobs) < MAX_WAITING:
            jobs.append(q.submit("x", lambda job: None, next(clients)))
        with pytest.raises(QueueFull, match=f"limit is {MAX_WAITING}"):
            q.submit("x", lambda job: None, "someone-else")
    finally:
        gate.set()
    deadline = time.monotonic() + 20
    while not all(j.finished for j in jobs):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert q.submit("x", lambda job: None, "a")  # room again


def test_too_many_jobs_from_one_page_get_a_429(hostile, served):
    root, _ = hostile
    srv = served(root)
    from difflab.serve.jobs import MAX_PER_CLIENT

    body = {"run": "good", "sampler": "ddpm", "steps": 1000, "count": 16, "columns": [{"steps": 1000}] * 6}
    answers = [request(srv, "/api/compare", body) for _ in range(MAX_PER_CLIENT + 3)]
    assert [s for s, _ in answers] == [202] * MAX_PER_CLIENT + [429] * 3
    assert "limit is 8 per client" in one_line(answers[-1][1])
    for _, a in answers[:MAX_PER_CLIENT]:
        assert request(srv, f"/api/jobs/{a['job']}/cancel", {})[0] == 200
    assert request(srv, "/api/sample", {"run": "good", "steps": 1, "count": 1})[0] == 202


def test_a_second_server_on_a_port_in_use_is_one_line_and_exit_2(hostile, capsys):
    import socket

    from difflab.cli import main

    root, _ = hostile
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        rc = main(["serve", "--runs", str(root), "--port", str(s.getsockname()[1])])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "cannot listen on" in err and "Traceback" not in err


@pytest.mark.slow
def test_load_from_many_clients_on_the_loopback(hostile, served, capsys):
    """16 clients for 15 s on the loopback (nothing else is contacted), mixing listings, small samples, their
    event streams from any id, views and bad bodies: every answer is a success or a one-line 4xx/503, and
    afterwards the server answers at once, its threads are back and the runs folder is untouched."""
    import random
    import urllib.request
    from collections import Counter

    root, _ = hostile
    srv = served(root)
    before, threads_before = snapshot(root), threading.active_count()
    statuses: Counter = Counter()
    failures: list[str] = []
    stop = time.monotonic() + 15

    def client(k: int) -> None:
        rng = random.Random(k)
        while time.monotonic() < stop:
            kind = rng.choice(["runs", "sample", "sample", "bad", "forward", "dataset"])
            try:
                if kind == "runs":
                    status, answer = request(srv, "/api/runs")
                elif kind == "sample":
                    status, answer = request(srv, "/api/sample", {"run": "good", "steps": rng.randint(1, 3),
                                                                  "count": rng.randint(1, 4), "seed": k})
                    if status == 202:
                        last = str(rng.choice([-2000000, -1, 0, 3, 10**9]))
                        url = f"http://127.0.0.1:{srv.port}/api/jobs/{answer['job']}/events"
                        with urllib.request.urlopen(urllib.request.Request(url, headers={"Last-Event-ID": last}),
                                                    timeout=60) as r:
                            assert len(r.read()) < 1 << 20
                elif kind == "bad":
                    status, answer = request(srv, "/api/sample", raw=rng.choice(list(BAD_BODIES)))
                elif kind == "forward":
                    status, answer = request(srv, "/api/forward", {"run": "good", "process": "mask",
                                                                   "index": rng.randint(0, 20)})
                else:
                    status, answer = request(srv, f"/api/dataset?run=good&start={rng.randint(-5, 2000)}&n=4")
                statuses[status] += 1
                if status >= 400:
                    one_line(answer)
            except Exception as e:  # noqa: BLE001 - collected, the test fails on any
                failures.append(f"{kind}: {e!r}")

    clients = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(16)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(90)
    assert not any(c.is_alive() for c in clients) and not failures, failures[:5]
    assert set(statuses) <= {200, 202, 400, 429, 503} and statuses[200] and statuses[202] and statuses[400], statuses
    t0 = time.perf_counter()
    assert request(srv, "/api/runs")[0] == 200 and time.perf_counter() - t0 < 5
    deadline = time.monotonic() + 30
    while threading.active_count() > threads_before + 2:  # request threads end; the job worker stays
        assert time.monotonic() < deadline, threading.active_count()
        time.sleep(0.2)
    assert snapshot(root) == before
    with capsys.disabled():
        print(f"\nload test, 16 clients x 15 s: answers by status {dict(sorted(statuses.items()))}")


# --- the edit and few-step panels' requests ----------------------------------------------------------------
def png_url(array: np.ndarray, fmt: str = "PNG") -> str:
    import base64
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def b64_url(raw: bytes) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(raw).decode()


LOWER_HALF = np.zeros((8, 8), np.uint8)
LOWER_HALF[4:] = 255
BAD_EDITS = [
    ({"strength": 0}, "strength must be in (0, 1]"),
    ({"strength": 1.5}, "strength must be between 0 and 1"),
    ({"strength": -0.1}, "strength must be between 0 and 1"),
    ({"strength": "high"}, "strength must be a number"),
    ({"strength": True}, "strength must be a number"),
    ({"mask": png_url(np.full((16, 16), 255, np.uint8))}, "the mask is 16x16 pixels; this run's images are 8x8"),
    ({"mask": png_url(np.full((8, 8), 255, np.uint8), "JPEG")}, "the mask must be a PNG"),
    ({"mask": png_url(np.zeros((8, 8), np.uint8))}, "the mask has no white pixel"),
    ({"mask": b64_url(b"\x89PNG\r\n\x1a\n broken")}, "cannot read the mask"),
    ({"mask": "%%%"}, "the mask is not valid base64"),
    ({"mask": [1, 0, 1]}, "the mask must be a data URL"),
    ({"mask": "A" * 5_700_000}, "the mask is over 4 MiB"),
    ({"image": "A" * 5_700_000, "index": None}, "the image is over 4 MiB"),
    ({"image": b64_url(b"GIF89a broken"), "index": None}, "cannot read the upload as an image"),
    ({"image": b64_url(b"\x00" * 64), "index": None}, "cannot read the upload as an image"),
    ({"image": png_url(LOWER_HALF)}, "either an uploaded image or a dataset index"),
    ({"index": None}, "either an uploaded image or a dataset index"),
    ({"index": -1}, "index must be between 0 and"),
    ({"count": 17}, "count must be between 1 and 16"),
    ({"count": 0}, "count must be between 1 and"),
    ({"resample": 0, "mask": png_url(LOWER_HALF)}, "resample must be between 1 and 20"),
    ({"resample": 21}, "resample must be between 1 and 20"),
    ({"jump_length": 0}, "jump_length must be between 1 and"),
    ({"jump_length": 2.5}, "jump_length must be a whole number"),
    ({"sampler": "nope"}, "sampler must be one of"),
    ({"steps": 0}, "steps must be between 1 and"),
    ({"label": 10}, "label must be between 0 and 9"),
    ({"prompt": "a cat"}, "prompt needs a run trained with --conditioning text"),
]


@pytest.mark.parametrize(("change", "message"), BAD_EDITS, ids=[m for _, m in BAD_EDITS])
def test_bad_edit_requests_are_one_line_400s(server, runs_dir, capfd, change, message):  # noqa: F811
    """A strength outside (0, 1], a mask of the wrong size, kind or content, a huge or corrupt upload, bad
    counts and RePaint settings: a one-line 400 before any work is queued; nothing in the runs folder changes."""
    before = snapshot(runs_dir)
    body = {k: v for k, v in {"run": "tiny", "index": 0, "strength": 0.5, **change}.items() if v is not None}
    status, answer = request(server, "/api/edit", body)
    assert status == 400 and message in one_line(answer), answer
    assert "Traceback" not in capfd.readouterr().err
    assert snapshot(runs_dir) == before


@pytest.mark.parametrize("raw", [b'{"run": "good", "index": 0, "strength": NaN}',
                                 b'{"run": "good", "index": 0, "strength": Infinity}',
                                 b'{"run": "good", "index": 0, "strength": 1e400}'])
def test_a_strength_that_is_not_a_number_is_a_400(hostile, served, raw):
    srv = served(hostile[0])
    status, answer = request(srv, "/api/edit", raw=raw)
    assert status == 400 and "strength must be a number" in one_line(answer)


def test_an_edit_body_over_the_limit_is_a_413_and_a_bad_index_an_error_event(hostile, served):
    from serve_helpers import events

    srv = served(hostile[0])
    status, answer = request(srv, "/api/edit", raw=b"{}", headers={"Content-Length": str(7 << 20)})  # (not sent)
    assert status == 413 and "the limit is 6 MiB" in one_line(answer)
    status, answer = request(srv, "/api/edit", {"run": "good", "index": 10**6})  # known only once the data is read
    assert status == 202
    last = events(srv, answer["job"])[-1]
    assert last["type"] == "error" and "index must be in" in last["message"] and "\n" not in last["message"]


BAD_FEW_STEPS = [
    ({"budgets": []}, "budgets must be a list of 1 to 8"),
    ({"budgets": list(range(1, 10))}, "budgets must be a list of 1 to 8"),
    ({"budgets": "1,2"}, "budgets must be a list of 1 to 8"),
    ({"budgets": [0]}, "budgets must be between 1 and 100"),
    ({"budgets": [101]}, "budgets must be between 1 and 100"),
    ({"budgets": [1.5]}, "budgets must be a whole number"),
    ({"budgets": [[1]]}, "budgets must be a whole number"),
    ({"samplers": ["nope"]}, "sampler must be one of"),
    ({"samplers": []}, "samplers must be a list of 1 to 6"),
    ({"samplers": ["ddim"] * 7}, "samplers must be a list of 1 to 6"),
    ({"samplers": "ddim"}, "samplers must be a list of 1 to 6"),
    ({"count": 17}, "count must be between 1 and 16"),
    ({"seed": -1}, "seed must be between 0 and"),
    ({"label": -1}, "label must be between 0 and 9"),
]


@pytest.mark.parametrize(("change", "message"), BAD_FEW_STEPS, ids=[m for _, m in BAD_FEW_STEPS])
def test_bad_few_step_requests_are_one_line_400s(server, capfd, change, message):  # noqa: F811
    status, answer = request(server, "/api/fewstep", {"run": "tiny", **change})
    assert status == 400 and message in one_line(answer), answer
    assert "Traceback" not in capfd.readouterr().err
