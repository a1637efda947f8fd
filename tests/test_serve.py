"""difflab serve at the HTTP level on a tiny run, the library helpers behind it, and one browser smoke
test (page loads, one sample appears, no request leaves the machine)."""

from __future__ import annotations

import io
import json
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from serve_helpers import (  # noqa: F401 - fixtures
    events,
    guarded_page,
    launch_browser,
    png_array,
    request,
    runs_dir,
    server,
)

from difflab.errors import DataError, UsageError


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _data_url(raw: bytes) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(raw).decode()


def _job(server, path, body) -> list[dict]:  # noqa: F811 - the fixture, passed on
    status, answer = request(server, path, body)
    assert status == 202, answer
    return events(server, answer["job"])


@pytest.fixture(scope="module")
def tiny(runs_dir):  # noqa: F811
    from difflab.runs.draw import load_run

    return load_run(runs_dir / "tiny")


# --- the library helpers ---------------------------------------------------------------------------
def test_stream_samples_match_one_call_and_show_every_step(tiny):
    from difflab.streaming import chunks, stream_samples

    assert chunks(7, 3) == [(0, 1), (1, 3), (4, 3)]
    steps = []
    parts = list(stream_samples(tiny, 7, chunk=3, on_step=steps.append, seed=5, steps=4, sampler="ddim"))
    assert [lo for lo, _ in parts] == [0, 1, 4]
    assert torch.equal(torch.cat([im for _, im in parts]), tiny.sample(7, seed=5, steps=4, sampler="ddim"))
    assert [s["i"] for s in steps] == [0, 1, 2, 3]
    assert steps[-1]["x0"].shape == (1, 8, 8) and steps[0]["xt"].dtype == torch.uint8
    assert steps[0]["sigma"] > steps[-1]["sigma"] > 0


def test_stream_samples_stop_raises_cancelled(tiny):
    from difflab.streaming import Cancelled, stream_samples

    calls = []
    with pytest.raises(Cancelled):
        list(stream_samples(tiny, 4, stop=lambda: len(calls) > 0, on_step=calls.append, steps=6, sampler="ddim"))
    assert len(calls) == 1  # stopped at the second network call


def test_the_final_grid_is_what_difflab_sample_draws(runs_dir, tmp_path):  # noqa: F811
    """RUN/samples/final.png (the trainer's grid) is `difflab sample --run RUN --n 64 --seed 0`, pixel for
    pixel: the run's sampler, steps, grid bottom and guidance (a class-conditional run), the same layout."""
    from PIL import Image

    from difflab.cli import main

    assert main(["sample", "--run", str(runs_dir / "tiny"), "--n", "64", "--seed", "0", "--out", str(tmp_path / "g.png")]) == 0
    final = np.asarray(Image.open(runs_dir / "tiny" / "samples" / "final.png"))
    assert final.shape == (2 * (8 * 10 + 2),) * 2 and np.array_equal(final, np.asarray(Image.open(tmp_path / "g.png")))


def test_the_sample_panel_draws_with_the_runs_own_settings(runs_dir, tiny):  # noqa: F811
    """A request that leaves sampler, steps and guidance to the run draws what run.sample draws (the one path),
    and says so in its start event."""
    from difflab.runs.request import SampleRequest
    from difflab.serve.catalog import Catalog
    from difflab.serve.jobs import Job
    from difflab.serve.panels import Panels

    panels = Panels(Catalog(runs_dir))
    job = Job("1", "sample", panels.sample(SampleRequest(run="tiny", n=3, seed=2)))
    job.work(job)
    start, *rest = job.events
    assert (start["steps"], start["first"]) == (tiny.cfg.sample_steps, 0)
    images = np.stack([png_array(e["png"]) for e in rest if e["type"] == "image"])
    assert np.array_equal(images, tiny.sample(3, seed=2).numpy())
    assert tiny.sampling_defaults()["guidance"] != 1.0  # (the run's guidance is on, and was applied)
    assert not np.array_equal(images, tiny.sample(3, seed=2, guidance=1.0).numpy())


def test_decode_leaves_out_the_runs_guidance(runs_dir):  # noqa: F811
    """On a class-conditional run the decode uses the inversion's settings (the images' classes, no guidance),
    where sample(init_noise=...) adds the run's guidance scale."""
    import difflab

    run = difflab.load(runs_dir / "tiny")
    images, labels = run.sample(4, seed=1, steps=4), torch.tensor([0, 1, 2, 3])
    latents = run.invert(images, steps=20, refine=3, labels=labels)
    back = run.decode(latents, steps=20, labels=labels)
    assert float((back.int() - images.int()).abs().float().mean()) < 1.0
    guided = run.sample(4, init_noise=latents, sampler="ddim", steps=20, labels=labels, clip="none")
    assert run.run.sampling_defaults()["guidance"] != 1.0 and not torch.equal(guided, back)
    assert torch.equal(run.sample(4, init_noise=latents, sampler="ddim", steps=20, labels=labels, clip="none",
                                  guidance=1.0), back)


def test_forward_binomial_untouched_fraction_is_measured_and_expected():
    from difflab.forward import forward_view

    x = torch.rand(1, 1, 32, 32) * 2 - 1
    view = forward_view("binomial", x, seed=3)
    assert view.frames.shape == (61, 1, 32, 32) and view.t[0] == 0 and view.t[-1] == 1
    assert view.curve[-1] == pytest.approx((1 - 32 / 1024) ** 60)  # 14.9%: the series' "seems enough"
    assert view.untouched[0] == 1.0 and abs(view.untouched[-1] - view.curve[-1]) < 0.05
    assert all(a >= b for a, b in zip(view.untouched, view.untouched[1:]))
    exact = forward_view("binomial-no-replace", x, seed=3)  # 32 steps of 32 pixels use all 1024
    assert len(exact.frames) == 33 and exact.untouched[16] == pytest.approx(0.5) == exact.curve[16]
    assert exact.untouched[-1] == 0.0


def test_forward_gaussian_views_are_unit_variance_with_falling_snr():
    from difflab.forward import FORWARD_PROCESSES, forward_view, gaussian_process

    x = torch.zeros(1, 1, 16, 16)
    for name, (family, _) in FORWARD_PROCESSES.items():
        view = forward_view(name, x, levels=5)
        assert view.frames.shape[0] == ({"binomial": 61, "binomial-no-replace": 9}.get(name, 5)), name
        if family == "gaussian":
            curve = [c for c in view.curve if c is not None]  # (flow's t = 1: SNR 0, left out)
            assert all(a > b for a, b in zip(curve, curve[1:])) and len(curve) >= len(view.curve) - 1, name  # log SNR falls
    ve = gaussian_process("ve")
    assert float(ve.snr(torch.tensor(1.0))) == pytest.approx(1 / 50**2)
    with pytest.raises(UsageError, match="unknown process"):
        forward_view("nope", x)


def test_decode_image_bytes_checks_size_before_decoding():
    from difflab.data.upload import decode_image_bytes

    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :15] = 255
    out = decode_image_bytes(_png_bytes(rgb), (1, 8, 8))
    assert out.shape == (1, 8, 8) and out.dtype == torch.uint8
    with pytest.raises(DataError, match="limit is"):
        decode_image_bytes(_png_bytes(rgb), (1, 8, 8), max_bytes=10)
    with pytest.raises(DataError, match="pixels"):
        decode_image_bytes(_png_bytes(np.zeros((300, 300), np.uint8)), (1, 8, 8), max_pixels=300 * 299)
    with pytest.raises(DataError, match="cannot read"):
        decode_image_bytes(b"\x89PNG\r\n\x1a\nnot really", (1, 8, 8))


# --- HTTP ------------------------------------------------------------------------------------------
def test_runs_are_listed_by_name(server):  # noqa: F811
    status, answer = request(server, "/api/runs")
    assert status == 200
    (run,) = answer["runs"]  # 'notes' is not a run
    assert run["name"] == "tiny" and run["conditioning"] == "class" and run["shape"] == [1, 8, 8]
    assert run["step"] == 6 and "ddim" in run["samplers"] and len(run["class_names"]) == 10
    assert {p["name"] for p in answer["processes"]} >= {"binomial", "mask", "cosine", "ve"}
    assert run["forward_process"] == "cosine"  # the forward panel opens on the run's own process


def test_the_forward_panel_names_each_runs_own_process():
    from difflab.config import TrainConfig
    from difflab.serve.catalog import _forward_process

    cases = {"flow": TrainConfig(process="flow"), "vp-cosine": TrainConfig(process="vp-cosine"),
             "fade-colour": TrainConfig(method="cold", degradation="fade-colour"),
             None: TrainConfig(process="constant")}  # constant-gamma runs: which of the panel's two is unknown
    for expected, cfg in cases.items():
        assert _forward_process(cfg) == expected, cfg.process
    assert _forward_process(TrainConfig(method="naive1")) is None


def test_page_and_static_files_load_nothing_from_elsewhere(server):  # noqa: F811
    import urllib.request

    for path in ("/", "/static/app.js", "/static/app.css"):
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}") as r:
            text = r.read().decode()
            assert "default-src 'none'" in r.headers["Content-Security-Policy"]
        assert "http://" not in text and "https://" not in text and "@import" not in text and "//cdn" not in text


def test_sample_streams_path_and_images_equal_to_run_sample(server, tiny):  # noqa: F811
    evs = _job(server, "/api/sample", {"run": "tiny", "sampler": "ddim", "steps": 4, "count": 5, "seed": 2,
                                        "label": 3})
    kinds = [e["type"] for e in evs]
    assert kinds[-1] == "done" and kinds.count("step") == 4 and kinds.count("image") == 5
    assert kinds.index("image") > max(i for i, k in enumerate(kinds) if k == "step")  # path shown while computed
    images = np.stack([png_array(e["png"]) for e in evs if e["type"] == "image"])
    want = tiny.sample(5, seed=2, steps=4, sampler="ddim", labels=torch.full((5,), 3))
    assert np.array_equal(images, want.numpy())
    last = [e for e in evs if e["type"] == "step"][-1]
    assert np.array_equal(png_array(last["x0"]).shape, (1, 8, 8)) and last["xt"].startswith("data:image/png")


def test_a_first_request_draws_with_the_runs_sampler_steps_and_guidance(server, tiny):  # noqa: F811
    evs = _job(server, "/api/sample", {"run": "tiny", "count": 3, "seed": 4})
    images = np.stack([png_array(e["png"]) for e in evs if e["type"] == "image"])
    assert np.array_equal(images, tiny.sample(3, seed=4).numpy())


def test_the_page_draws_a_diffusers_folder_as_python_does(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    import difflab
    from difflab.runs.request import SampleRequest
    from difflab.serve.catalog import Catalog
    from difflab.serve.jobs import Job
    from difflab.serve.panels import Panels

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    unet.save_pretrained(tmp_path / "hub")
    diffusers.DDIMScheduler(clip_sample=True).save_pretrained(tmp_path / "hub")
    job = Job("1", "sample", Panels(Catalog(tmp_path)).sample(SampleRequest(run="hub", n=3, seed=2, steps=3)))
    job.work(job)
    images = np.stack([png_array(e["png"]) for e in job.events if e["type"] == "image"])
    assert np.array_equal(images, difflab.load(tmp_path / "hub").sample(3, seed=2, steps=3).numpy())


def test_replaying_one_sample_gives_the_same_image(server):  # noqa: F811
    body = {"run": "tiny", "sampler": "ddpm", "steps": 5, "count": 4, "seed": 9}
    full = [e for e in _job(server, "/api/sample", body) if e["type"] == "image"]
    one = [e for e in _job(server, "/api/sample", {**body, "count": 1, "first": 2}) if e["type"] == "image"]
    assert one[0]["index"] == 2 and one[0]["png"] == full[2]["png"]


@pytest.mark.parametrize("body, message", [
    ({"run": "tiny", "steps": 0}, "steps must be between 1 and 1000"),
    ({"run": "tiny", "sampler": "nope"}, "sampler must be one of"),
    ({"run": "tiny", "label": 10}, "label must be between 0 and 9"),
    ({"run": "tiny", "count": 65}, "count must be between 1 and 64"),
    ({"run": "tiny", "seed": "x"}, "seed must be a whole number"),
    ({"run": "tiny", "guidance": float("nan")}, "guidance must be a number"),
    ({"run": "tiny", "prompt": "a cat"}, "prompt needs a run trained with --conditioning text"),
    ({"run": "tiny", "precision": "fp8"}, "precision must be one of"),
    ({"run": "../tiny"}, "unknown run"),
    ({"run": "/etc"}, "unknown run"),
    ({"run": "notes"}, "unknown run"),
    ({}, "choose a run"),
])
def test_bad_sample_parameters_get_a_400_and_one_line(server, body, message):  # noqa: F811
    status, answer = request(server, "/api/sample", body)
    assert status == 400 and message in answer["error"] and "\n" not in answer["error"]


def test_bad_requests_of_other_kinds(server):  # noqa: F811
    status, answer = request(server, "/api/sample", raw=b"{not json")
    assert status == 400 and "not valid JSON" in answer["error"]
    status, answer = request(server, "/api/sample", raw=b'{"run": "tiny"}', headers={"Content-Type": "text/plain"})
    assert status == 400 and "JSON" in answer["error"]  # a cross-site form cannot post JSON
    status, answer = request(server, "/api/sample", raw=b"{}", headers={"Content-Length": str(7 << 20)})
    assert status == 413
    status, answer = request(server, "/api/forward", {"run": "tiny", "process": "fade-to-grey"})
    assert status == 400 and "process must be one of" in answer["error"]
    status, answer = request(server, "/api/forward", {"run": "tiny", "process": "mask", "index": 10**6})
    assert status == 400 and "index must be in" in answer["error"]
    status, answer = request(server, "/api/compare", {"run": "tiny", "columns": [{"sampler": "ddim"}]})
    assert status == 400 and "2 to 6 columns" in answer["error"]
    status, answer = request(server, "/api/invert", {"run": "tiny", "image": _data_url(b"GIF89a broken")})
    assert status == 400 and "cannot read" in answer["error"]
    status, answer = request(server, "/api/invert", {"run": "tiny", "image": "%%%"})
    assert status == 400 and "base64" in answer["error"]
    status, answer = request(server, "/api/nothing")
    assert status == 404


def test_host_header_must_name_the_loopback(server):  # noqa: F811
    status, answer = request(server, "/api/runs", headers={"Host": f"attacker.example:{server.port}"})
    assert status == 403 and "loopback" in answer["error"]


def test_token_is_required_off_the_loopback_and_checked_on_every_request(runs_dir):  # noqa: F811
    from difflab.serve import ExplorerServer

    with pytest.raises(UsageError, match="--token"):
        ExplorerServer(runs_dir, "0.0.0.0", 0)
    srv = ExplorerServer(runs_dir, "127.0.0.1", 0, token="s3cret")
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    try:
        assert request(srv, "/api/runs")[0] == 401
        assert request(srv, "/api/runs", headers={"X-Difflab-Token": "wrong"})[0] == 401
        assert request(srv, "/api/runs", headers={"X-Difflab-Token": "s3cret"})[0] == 200
        assert request(srv, "/?token=s3cret".replace("/?", "/api/runs?"))[0] == 200
        assert srv.url.endswith("?token=s3cret")
    finally:
        srv.shutdown()
        srv.server_close()


def test_cancel_stops_a_long_job(server):  # noqa: F811
    status, answer = request(server, "/api/sample", {"run": "tiny", "sampler": "ddpm", "steps": 1000, "count": 64})
    job = answer["job"]

    def cancel_on_first_step(ev):
        if ev["type"] == "step" and ev["i"] == 0:
            assert request(server, f"/api/jobs/{job}/cancel", {})[0] == 200

    evs = events(server, job, on_event=cancel_on_first_step)
    assert evs[-1]["type"] == "cancelled"
    assert sum(e["type"] == "step" for e in evs) < 1000 and not any(e["type"] == "image" for e in evs)


def test_two_clients_at_once(server):  # noqa: F811
    bodies = [{"run": "tiny", "steps": 3, "count": 2, "seed": s} for s in (0, 1)]
    jobs = [request(server, "/api/sample", b)[1]["job"] for b in bodies]
    results: dict = {}
    readers = [threading.Thread(target=lambda j=j, k=k: results.__setitem__(k, events(server, j)))
               for k, j in enumerate(jobs + jobs[:1])]  # the first job read by two tabs
    for r in readers:
        r.start()
    for r in readers:
        r.join(120)
    assert all(results[k][-1]["type"] == "done" for k in range(3))
    assert results[0] == results[2]  # two listeners see the same events
    assert results[0][-2]["png"] != results[1][-2]["png"]


def test_compare_reports_each_samplers_evaluations(server):  # noqa: F811
    evs = _job(server, "/api/compare", {"run": "tiny", "count": 2, "seed": 0,
                                         "columns": [{"sampler": "ddim", "steps": 3}, {"sampler": "heun", "steps": 3}]})
    cols = [e for e in evs if e["type"] == "column"]
    assert [(c["sampler"], c["evaluations"]) for c in cols] == [("ddim", 3), ("heun", 5)]
    assert sum(e["type"] == "image" for e in evs) == 4


def test_interpolation_ends_are_the_two_seeds_samples(server, tiny):  # noqa: F811
    evs = _job(server, "/api/interpolate", {"run": "tiny", "seed_a": 4, "seed_b": 7, "n": 5, "steps": 4, "label": 1})
    imgs = {e["index"]: png_array(e["png"]) for e in evs if e["type"] == "image"}
    assert sorted(imgs) == [0, 1, 2, 3, 4]
    for i, seed in ((0, 4), (4, 7)):
        # the interpolation decodes with plain DDIM (no guidance, no clipping), as `difflab interpolate` does
        want = tiny.sample(1, seed=seed, steps=4, sampler="ddim", labels=torch.tensor([1]), guidance=1.0, clip="none")
        assert np.abs(imgs[i].astype(int) - want[0].numpy().astype(int)).max() <= 1


def test_invert_dataset_image_and_upload(server, tiny):  # noqa: F811
    evs = _job(server, "/api/invert", {"run": "tiny", "index": 3, "steps": 20})
    rec = next(e for e in evs if e["type"] == "reconstruction")
    assert rec["psnr"] > 10 and rec["steps"] == 20
    assert png_array(next(e for e in evs if e["type"] == "latent")["png"]).shape == (1, 8, 8)
    upload = np.full((40, 40), 30, np.uint8)
    upload[10:30, 15:25] = 220
    evs = _job(server, "/api/invert", {"run": "tiny", "image": _data_url(_png_bytes(upload)), "steps": 10})
    assert png_array(next(e for e in evs if e["type"] == "start")["original"]).shape == (1, 8, 8)
    assert evs[-1]["type"] == "done"


def test_forward_and_dataset_thumbnails(server):  # noqa: F811
    status, view = request(server, "/api/forward", {"run": "tiny", "process": "binomial", "index": 2})
    assert status == 200 and len(view["frames"]) == 61 and view["untouched"][0] == 1.0
    assert view["curve"][-1] == pytest.approx((1 - 32 / 64) ** 60)
    status, data = request(server, "/api/dataset?run=tiny&start=0&n=4")
    assert status == 200 and [d["index"] for d in data["images"]] == [0, 1, 2, 3] and data["total"] > 1000


def test_monitor_streams_the_loss_and_newest_grid(server, runs_dir):  # noqa: F811
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/api/monitor?run=tiny", timeout=30) as r:
        line = next(ln for ln in r if ln.startswith(b"data: "))
    state = json.loads(line[6:])
    assert [row[0] for row in state["rows"]] == [2, 4, 6] and state["step"] == 6
    assert state["grid"]["name"] == "final.png" and state["grid"]["png"].startswith("data:image/png")


def test_a_run_still_training_is_sampled_from_its_newest_checkpoint(server, runs_dir, tiny):  # noqa: F811
    from difflab.runs.checkpoint import latest_checkpoint, save_checkpoint

    tensors, meta = latest_checkpoint(runs_dir / "tiny" / "checkpoints")
    g = torch.Generator().manual_seed(0)
    bumped = {k: (v + torch.randn(v.shape, generator=g) if k.startswith("ema.") and v.is_floating_point() else v)
              for k, v in tensors.items()}
    body = {"run": "tiny", "steps": 3, "count": 1, "seed": 0}
    before = [e for e in _job(server, "/api/sample", body) if e["type"] in ("start", "image")]
    save_checkpoint(runs_dir / "tiny" / "checkpoints", 7, bumped, {k: v for k, v in meta.items() if k != "step"})
    try:
        after = [e for e in _job(server, "/api/sample", body) if e["type"] in ("start", "image")]
        assert before[0]["checkpoint"] == 6 and after[0]["checkpoint"] == 7
        assert after[1]["png"] != before[1]["png"]
    finally:
        for p in (runs_dir / "tiny" / "checkpoints").glob("step-0000007.*"):
            p.unlink()


def test_cli_refuses_other_addresses_without_token(runs_dir, capsys):  # noqa: F811
    from difflab.cli import main

    assert main(["serve", "--runs", str(runs_dir), "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "--token" in capsys.readouterr().err
    assert main(["serve", "--runs", str(runs_dir / "missing")]) == 2


# --- the browser smoke test ------------------------------------------------------------------------
def test_browser_page_loads_and_one_sample_appears(server):  # noqa: F811
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
    with playwright.sync_playwright() as p:
        browser = launch_browser(p)
        try:
            page = guarded_page(browser, server)
            page.goto(f"http://127.0.0.1:{server.port}/")
            page.wait_for_selector("#run option[value=tiny]", state="attached")
            page.fill("#sample-form input[name=count]", "2")
            page.fill("#sample-form input[name=steps]", "3")
            t0 = time.perf_counter()
            page.click("#sample-go")
            page.wait_for_selector("#sample-grid img", timeout=30_000)
            assert time.perf_counter() - t0 < 30
            page.wait_for_selector("#sample-grid img:nth-child(2)", timeout=30_000)
            assert page.get_attribute("#path-x0", "src").startswith("data:image/png")
            assert page.foreign == [] and page.errors == []
        finally:
            browser.close()


def test_classifier_runs_are_not_listed(tmp_path):
    """A noisy classifier's run folder draws no images: the catalog leaves it out."""
    from difflab.serve.catalog import Catalog

    for name, method in (("clf", "noisy-classifier"), ("diff", "gaussian")):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        (tmp_path / name / "config.json").write_text(json.dumps({"method": method}))
    assert Catalog(tmp_path).names() == ["diff"]
