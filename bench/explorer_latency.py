"""Time to first image in the explorer, as a user meets it: Debian's headless Chromium clicks "sample"
on the page of ``difflab serve`` (16 samples, DDIM, 10 steps) and reads the page's own clock
(``first image after X s``, measured in the browser from the click to the first image on screen).

    python bench/explorer_latency.py --runs runs --run demo [--repeats 7]

Prints the CPU, each try, and the median; the first try after loading is reported separately (it
includes the one-time warm-up of the network)."""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_description  # noqa: E402

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).exists()), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True, help="folder of runs (as for difflab serve --runs)")
    ap.add_argument("--run", required=True, help="the run's name in that folder")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--count", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sampler", default="ddim")
    args = ap.parse_args()
    if CHROMIUM is None:
        print("no Debian chromium (apt-get install chromium)", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    from difflab.serve import ExplorerServer

    print(cpu_description())
    srv = ExplorerServer(args.runs, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    firsts, alls = [], []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{srv.port}/")
            page.wait_for_selector("#run option", state="attached")
            page.select_option("#run", args.run)
            page.select_option("#sample-form select[name=sampler]", args.sampler)
            page.fill("#sample-form input[name=steps]", str(args.steps))
            page.fill("#sample-form input[name=count]", str(args.count))
            for k in range(args.repeats + 1):
                page.fill("#sample-form input[name=seed]", str(k))
                page.click("#sample-go")
                page.wait_for_selector("#sample-status:has-text('all in')", timeout=120_000)
                status = page.inner_text("#sample-status")
                first, whole = (float(x) for x in re.findall(r"([0-9.]+) s", status)[:2])
                print(f"try {k}{' (first after loading)' if k == 0 else ''}: first image {first:.2f} s, "
                      f"all {args.count} in {whole:.2f} s")
                if k:
                    firsts.append(first)
                    alls.append(whole)
            browser.close()
    finally:
        srv.shutdown()
        srv.server_close()
    print(f"median of {args.repeats}: first image {statistics.median(firsts):.2f} s "
          f"(min {min(firsts):.2f}, max {max(firsts):.2f}), all {args.count} {statistics.median(alls):.2f} s "
          f"({args.sampler}-{args.steps}, run {args.run})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
