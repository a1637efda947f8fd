"""difflab serve: the explorer, a local web page over the runs in a folder."""

from __future__ import annotations

import argparse
import secrets


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", default="runs", help="folder whose sub-folders are runs (difflab train) or diffusers "
                   "UNet folders (default ./runs)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs --token)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860; 0: any free port)")
    p.add_argument("--token", default=None, help="secret every request must carry (required off the loopback; "
                   "'auto' makes one up)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")


def run(args: argparse.Namespace) -> int:
    from difflab.errors import UsageError
    from difflab.runs.data import pick_device
    from difflab.serve import ExplorerServer

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    token = secrets.token_urlsafe(16) if args.token == "auto" else args.token
    try:
        server = ExplorerServer(args.runs, args.host, args.port, token, pick_device(args.device))
    except OSError as e:
        raise UsageError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e})") from e
    names = server.catalog.names()
    shown = ", ".join(names[:10]) + (f", ... ({len(names) - 10} more)" if len(names) > 10 else "")
    print(f"difflab serve: {len(names)} run(s) in {args.runs}: {shown or '(none yet)'}")
    print(f"open {server.url}   (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        print("difflab serve: stopped")
    finally:
        server.server_close()
    return 0
