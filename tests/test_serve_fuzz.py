"""Property-based fuzz of the explorer's HTTP API (hypothesis): bodies, raw bytes, paths, queries and headers
drawn at random, against a runs folder that holds a good run beside hostile entries (a run folder linked from
elsewhere, a damaged run, a FIFO config, a grid linked to a private file). Every answer is a success or a
4xx (503 when busy) with one line, never a traceback or a hang; no answer holds a byte of the private file;
every file that was in the runs folder is byte-identical afterwards.

A second property test writes random values into a run's config.json and checkpoint JSON: the listing always
answers, the good run unchanged beside it. The module prints how many cases it tried and how each ended
(``pytest -s``)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import threading
import urllib.error
import urllib.request
from collections import Counter

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from serve_helpers import SECRET, runs_dir, snapshot  # noqa: F401 - fixture

TALLY: Counter = Counter()
POSTS = ["/api/sample", "/api/compare", "/api/interpolate", "/api/invert", "/api/forward", "/api/load",
         "/api/edit", "/api/fewstep", "/api/jobs/1/cancel", "/api/nothing"]
RUN_NAMES = ["good", "bad", "fifo", "linked", "../good", "/etc", "good/../bad", "", "good\x00", "g" * 300]
KEYS = ["run", "sampler", "steps", "count", "seed", "first", "guidance", "label", "prompt", "precision", "columns",
        "seed_a", "seed_b", "n", "index", "image", "process", "strength", "mask", "jump_length", "resample",
        "budgets", "samplers"]
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])

# no subnormals: the trainer flushes them to zero in this process (runtime.tune_cpu)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.integers(-3, 70),
                    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=False), st.text(max_size=40),
                    st.sampled_from(RUN_NAMES + ["ddim", "heun", "ddpm", "bf16", "fp32", "mask", "cosine",
                                                 "data:image/png;base64,AAAA", "%%%"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.sampled_from(KEYS + ["x"]), inner, max_size=4), max_leaves=12)
bodies = st.one_of(st.dictionaries(st.sampled_from(KEYS), values, max_size=8),
                   st.fixed_dictionaries({"run": st.sampled_from(RUN_NAMES)},
                                         optional={k: values for k in KEYS if k != "run"}),
                   values)


@pytest.fixture(scope="module")
def fuzzed(runs_dir, tmp_path_factory):  # noqa: F811
    """A server over a runs folder with a good run and hostile entries; short streams so a fuzzed monitor
    request ends by itself; the folder's files as they were before any request."""
    from difflab.serve import ExplorerServer
    from difflab.serve import server as server_module

    base = tmp_path_factory.mktemp("fuzz")
    root, outside = base / "runs", base / "outside"
    outside.mkdir()
    (outside / "shadow").write_bytes(SECRET)
    shutil.copytree(runs_dir / "tiny", root / "good")
    shutil.copytree(runs_dir / "tiny", outside / "elsewhere")
    (root / "linked").symlink_to(outside / "elsewhere", target_is_directory=True)
    (root / "good" / "samples" / "zzz.png").symlink_to(outside / "shadow")
    shutil.copytree(runs_dir / "tiny", root / "bad")
    next((root / "bad" / "checkpoints").glob("step-*.json")).write_text("[1]")
    (root / "fifo" / "checkpoints").mkdir(parents=True)
    os.mkfifo(root / "fifo" / "config.json")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(server_module, "MAX_STREAM_S", 0.5)
        mp.setattr(server_module, "MONITOR_S", 0.1)
        mp.setattr(server_module, "KEEPALIVE_S", 0.1)
        srv = ExplorerServer(root, "127.0.0.1", 0)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        before = snapshot(root)
        yield srv
        srv.shutdown()
        srv.server_close()
    assert snapshot(root) == before, "a file in the runs folder changed"
    print(f"\nexplorer fuzz: {sum(TALLY.values())} cases; {dict(sorted(TALLY.items()))}")


def send(srv, method: str, path: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    """(status, body) of one request; the request must end in 30 s."""
    h = {"Content-Type": "application/json"} if data is not None else {}
    h.update(headers or {})
    req = urllib.request.Request(f"http://127.0.0.1:{srv.port}{path}", data=data, headers=h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def disclosed(raw: bytes) -> bool:
    """Whether ``raw`` holds the private file, as it is or as base64 (a data URL)."""
    return SECRET in raw or b"not-for-the-page" in raw or base64.b64encode(SECRET)[:40] in raw


def judge(srv, status: int, raw: bytes, ok: tuple[int, ...] = (200, 202)) -> None:
    """A success, or a 4xx/503 with one JSON line; never the private file. Accepted jobs are cancelled."""
    assert not disclosed(raw), "the private file was disclosed"
    if status in ok:
        TALLY["success"] += 1
        if status == 202:
            job = json.loads(raw)["job"]
            send(srv, "POST", f"/api/jobs/{job}/cancel", b"{}")
        return
    assert 400 <= status < 500 or status == 503, (status, raw[:300])
    error = json.loads(raw)["error"]
    assert isinstance(error, str) and error and "\n" not in error and "Traceback" not in error, error
    TALLY[f"clear error {status}"] += 1


@given(path=st.sampled_from(POSTS), body=bodies)
@FUZZ
def test_fuzz_post_bodies(fuzzed, capfd, path, body):
    status, raw = send(fuzzed, "POST", path, json.dumps(body, allow_nan=True).encode())
    judge(fuzzed, status, raw)
    assert "Traceback" not in capfd.readouterr().err


@given(path=st.sampled_from(POSTS), raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
@FUZZ
def test_fuzz_raw_bytes(fuzzed, capfd, path, raw):
    status, answer = send(fuzzed, "POST", path, raw)
    judge(fuzzed, status, answer)
    assert "Traceback" not in capfd.readouterr().err


query_value = st.one_of(st.sampled_from(RUN_NAMES), st.integers(-(10**20), 10**20).map(str), st.text(max_size=20))


@given(path=st.sampled_from(["/api/dataset", "/api/monitor", "/api/runs", "/", "/static/app.js",
                             "/static/../catalog.py", "/api/jobs/1/events", "/api/jobs/x/events", "/etc/passwd",
                             "/api/jobs/../../events"]),
       query=st.dictionaries(st.sampled_from(["run", "start", "n", "token", "x"]), query_value, max_size=3),
       last=st.none() | st.sampled_from(["-2000000", "-1", "0", "5", "99999999999", "abc", "1e3", " 7 ", "9" * 30, "\u00b2"]))
@FUZZ
def test_fuzz_get_paths_queries_and_event_ids(fuzzed, capfd, path, query, last):
    from urllib.parse import urlencode

    headers = {} if last is None else {"Last-Event-ID": last}
    status, raw = send(fuzzed, "GET", f"{path}?{urlencode(query)}" if query else path, headers=headers)
    if status == 200 and raw.startswith((b"id: ", b": ")) or (status == 200 and not raw):  # an event stream
        assert len(raw) < 1 << 20 and not disclosed(raw)  # never a replay of megabytes, never the private file
        TALLY["success"] += 1
    elif status == 200 and not raw.lstrip().startswith((b"{", b"[")):
        TALLY["success"] += 1  # the page and its static files
        assert not disclosed(raw)
    else:
        judge(fuzzed, status, raw, ok=(200,))
    assert "Traceback" not in capfd.readouterr().err


@given(host=st.sampled_from(["attacker.example", "127.0.0.1", "localhost:1", "", "[::1]"]),
       ctype=st.sampled_from(["application/json", "text/plain", "application/json; charset=latin-1", "", "multipart/form-data"]),
       token=st.none() | st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=20))
@FUZZ
def test_fuzz_headers(fuzzed, capfd, host, ctype, token):
    headers = {"Host": f"{host}:{fuzzed.port}" if host and ":" not in host.strip("[]") else host,
               "Content-Type": ctype}
    if token is not None:
        headers["X-Difflab-Token"] = token
    status, raw = send(fuzzed, "POST", "/api/sample", b'{"run": "good", "steps": 1, "count": 1}', headers)
    judge(fuzzed, status, raw)
    if host != "127.0.0.1" or ctype.split(";")[0] != "application/json":
        assert status in (400, 403), (host, ctype, status)
    assert "Traceback" not in capfd.readouterr().err


def test_the_runs_folder_is_listed_as_expected(fuzzed):
    status, raw = send(fuzzed, "GET", "/api/runs")
    runs = {r["name"]: r for r in json.loads(raw)["runs"]}
    assert status == 200 and sorted(runs) == ["bad", "fifo", "good"]  # 'linked' is not listed
    assert runs["bad"]["damaged"] and runs["fifo"]["damaged"] and runs["good"]["step"] == 6
    TALLY["success"] += 1


field_values = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=12),
                         st.floats(allow_nan=False, allow_subnormal=False), st.lists(st.integers(-5, 70), max_size=4),
                         st.lists(st.text(max_size=3), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                         st.sampled_from(["gaussian", "cold", "naive1", "text", "class", "none", "cosine", "ve"]))


@pytest.fixture(scope="module")
def two_runs(runs_dir, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("damaged") / "runs"
    shutil.copytree(runs_dir / "tiny", root / "good")
    shutil.copytree(runs_dir / "tiny", root / "odd")
    return root


@given(config=st.dictionaries(st.sampled_from(["method", "conditioning", "T", "process", "data", "sample_steps",
                                                "image_size", "image_channels", "model", "x"]), field_values, max_size=3),
       meta=st.dictionaries(st.sampled_from(["step", "tensors", "sha256", "image_shape", "class_names",
                                              "data_fingerprint", "config", "network", "x"]), field_values, max_size=3))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(config={"method": "\n"}, meta={})  # (once a traceback: the config's message held the raw newline)
@example(config={"data": "a\nb"}, meta={})
def test_fuzz_run_json_fields_never_break_the_listing(two_runs, config, meta):
    """Any values in a run's config.json and newest checkpoint JSON: the listing answers, the good run is in it
    unchanged, and the odd run is either a run or damaged with one line."""
    from difflab.runs.checkpoint import list_checkpoints
    from difflab.serve.catalog import Catalog

    odd, good = two_runs / "odd", two_runs / "good"
    original = json.loads((good / "config.json").read_text())
    js = list_checkpoints(odd / "checkpoints")[-1]
    original_meta = json.loads(list_checkpoints(good / "checkpoints")[-1].read_text())
    (odd / "config.json").write_text(json.dumps({**original, **config}))
    js.write_text(json.dumps({**original_meta, **meta}))
    runs = {r["name"]: r for r in Catalog(two_runs).infos()}
    assert runs["good"]["step"] == 6 and runs["good"]["shape"] == [1, 8, 8]
    if runs["odd"].get("damaged"):
        assert "\n" not in runs["odd"]["error"] and runs["odd"]["error"]
        TALLY["clear error (damaged run listed)"] += 1
    else:
        assert len(runs["odd"]["shape"]) == 3 and isinstance(runs["odd"]["step"], int)
        TALLY["success"] += 1
