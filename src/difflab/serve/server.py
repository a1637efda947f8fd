"""The explorer's HTTP server: the standard library's ThreadingHTTPServer, JSON in and out, results
streamed as server-sent events. Model work goes to one :class:`~difflab.serve.jobs.JobQueue`; a
request thread only validates, queues and streams.

Safe by default: it binds 127.0.0.1 and then answers only requests whose Host names the loopback
(no DNS rebinding); any other address needs a token that every request carries (header
``X-Difflab-Token`` or ``?token=``). POSTs must be strict JSON (a cross-site form cannot send it),
bodies are limited in size, and the Content-Security-Policy lets the page load nothing from elsewhere.

Bounded: connections at once (:data:`MAX_CONNECTIONS`, then 503), event streams at once
(:data:`MAX_STREAMS`, then 429) and in length (:data:`MAX_STREAM_S`; the page's EventSource
reconnects with ``Last-Event-ID`` and goes on where it was), every socket read and write
(:data:`SOCKET_TIMEOUT_S`), and the job queue (:mod:`~difflab.serve.jobs`).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlsplit

from difflab.errors import UsageError
from difflab.serve.catalog import Catalog
from difflab.serve.jobs import JobQueue, QueueFull
from difflab.serve.panels import Panels
from difflab.serve.requests import (
    BadRequest,
    CompareRequest,
    EditRequest,
    FewStepRequest,
    ForwardRequest,
    InterpolateRequest,
    InvertRequest,
    parse_body,
    run_name,
    sample_request,
)

MAX_BODY = 6 << 20  # a JSON body: a 4 MiB image in base64 and a little more
MAX_UPLOAD = 4 << 20
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/static/app.css": ("app.css", "text/css; charset=utf-8")}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
KEEPALIVE_S = 10.0
MONITOR_S = 1.0
SOCKET_TIMEOUT_S = 30.0  # a client that sends or reads nothing for this long is dropped
MAX_CONNECTIONS = 64  # requests being answered at once
MAX_STREAMS = 16  # event and monitor streams open at once (each holds a connection)
MAX_STREAM_S = 300.0  # one stream's length; the page reconnects and goes on
EVENT_ID = re.compile(r"-?[0-9]{1,12}")  # ASCII digits only (int() refuses "²")
BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
        b'{"error": "the explorer is answering too many requests at once; try again in a moment"}')


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ExplorerServer(ThreadingHTTPServer):
    """``difflab serve``'s server over the runs under ``runs``."""

    daemon_threads = True

    def __init__(self, runs, host: str = "127.0.0.1", port: int = 7860, token: str | None = None,
                 device: str = "cpu") -> None:
        if not is_loopback(host) and not token:
            raise UsageError(f"binding {host} opens the explorer to other machines: pass --token SECRET "
                             "(every request must then carry it)")
        self.catalog = Catalog(runs, device)
        self.panels = Panels(self.catalog)
        self.token = token or None
        self.jobs = JobQueue()  # before binding: a port in use calls server_close, which stops it
        self.connections = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.streams = threading.BoundedSemaphore(MAX_STREAMS)
        super().__init__((host, port), Handler)
        self.port = self.server_address[1]
        self.loopback = is_loopback(host)
        self.host_names = {f"{h}:{self.port}" for h in ("127.0.0.1", "localhost", "[::1]")}

    @property
    def url(self) -> str:
        host = self.server_address[0]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    def server_close(self) -> None:
        self.jobs.stop()
        super().server_close()

    def process_request(self, request, client_address) -> None:
        if not self.connections.acquire(blocking=False):  # answered here: no thread for it
            try:
                request.settimeout(1.0)
                request.sendall(BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connections.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()


class Handler(BaseHTTPRequestHandler):
    server: ExplorerServer
    server_version = "difflab-serve"
    sys_version = ""
    timeout = SOCKET_TIMEOUT_S  # every read and write of the socket

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass  # quiet: the console shows the URL and any traceback, not every request

    # --- plumbing ---------------------------------------------------------------------------------
    def _query(self) -> dict[str, str]:
        return {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}

    def _allowed(self) -> bool:
        if self.server.loopback and self.headers.get("Host", "") not in self.server.host_names:
            self._send_json({"error": "this server answers only on its loopback address"}, HTTPStatus.FORBIDDEN)
            return False
        token = self.server.token
        if token:
            given = self.headers.get("X-Difflab-Token") or self._query().get("token", "")
            if not hmac.compare_digest(given.encode(), token.encode()):
                self._send_json({"error": "missing or wrong token: open the URL that difflab serve printed"},
                                HTTPStatus.UNAUTHORIZED)
                return False
        return True

    def _headers(self, status: int, ctype: str, length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if length is not None:
            self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", CSP)
        self.end_headers()

    def _send_json(self, obj, status: int = HTTPStatus.OK) -> None:
        body = json.dumps(obj).encode()
        self._headers(status, "application/json", len(body))
        self.wfile.write(body)

    def _body(self) -> dict:
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            raise BadRequest("send JSON (Content-Type: application/json)")
        text = self.headers.get("Content-Length", "").strip()
        if not (text.isascii() and text.isdigit()) or len(text) > 12:
            raise BadRequest("the request needs a Content-Length (a whole number of bytes)")
        length = int(text)
        if length > MAX_BODY:
            raise _TooLarge(f"the request is {length / 2**20:.1f} MiB; the limit is {MAX_BODY >> 20} MiB")
        raw = self.rfile.read(length)
        if len(raw) < length:
            raise BadRequest(f"the body ended after {len(raw)} of the {length} bytes its Content-Length announced")
        return parse_body(raw)

    def _fail(self, status: int, message: str) -> None:
        try:
            self._send_json({"error": message}, status)
        except OSError:
            pass  # the client has gone

    def _guarded(self, fn) -> None:
        try:
            if self._allowed():
                fn()
        except _TooLarge as e:
            self._fail(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, str(e))
        except QueueFull as e:
            self._fail(HTTPStatus.TOO_MANY_REQUESTS, str(e))
        except UsageError as e:
            self._fail(HTTPStatus.BAD_REQUEST, str(e))
        except TimeoutError:
            self._fail(HTTPStatus.REQUEST_TIMEOUT, f"nothing came for {SOCKET_TIMEOUT_S:g} s; send the whole request")
        except OSError:
            pass  # the client has gone (a broken pipe, a reset)
        except Exception as e:  # noqa: BLE001 - one line for the page, the traceback for the console
            traceback.print_exc(file=sys.stderr)
            self._fail(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error ({type(e).__name__}); see the server's console")

    # --- routes -----------------------------------------------------------------------------------
    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        self._guarded(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._guarded(self._post)

    def _get(self) -> None:
        path, q = urlsplit(self.path).path, self._query()
        if path in STATIC:
            name, ctype = STATIC[path]
            data = resources.files("difflab.serve").joinpath("static", name).read_bytes()
            self._headers(HTTPStatus.OK, ctype, len(data))
            self.wfile.write(data)
        elif path == "/api/runs":
            from difflab.forward import FORWARD_PROCESSES

            self._send_json({"runs": self.server.catalog.infos(),
                             "processes": [{"name": k, "about": v[1]} for k, v in FORWARD_PROCESSES.items()]})
        elif path == "/api/dataset":
            self._send_json(self.server.panels.thumbnails(run_name(q), _qint(q, "start", 0), _qint(q, "n", 16)))
        elif path.startswith("/api/jobs/") and path.endswith("/events"):
            self._streaming(self._stream_job, path[len("/api/jobs/"):-len("/events")])
        elif path == "/api/monitor":
            self._streaming(self._stream_monitor, run_name(q))
        else:
            self._send_json({"error": f"no such page {path}"}, HTTPStatus.NOT_FOUND)

    def _post(self) -> None:
        path = urlsplit(self.path).path
        body = self._body()
        if path.startswith("/api/jobs/") and path.endswith("/cancel"):
            job = self.server.jobs.get(path[len("/api/jobs/"):-len("/cancel")])
            if job is None:
                raise BadRequest("no such job (finished long ago?)")
            job.cancel()
            self._send_json({"job": job.id, "state": job.state})
            return
        panels, catalog = self.server.panels, self.server.catalog
        info = catalog.info(run_name(body))
        if path == "/api/forward":
            self._send_json(panels.forward(ForwardRequest.from_json(body, info)))
            return
        if path == "/api/sample":
            kind, work = "sample", panels.sample(sample_request(body, info))
        elif path == "/api/compare":
            kind, work = "compare", panels.compare(CompareRequest.from_json(body, info))
        elif path == "/api/interpolate":
            kind, work = "interpolate", panels.interpolate(InterpolateRequest.from_json(body, info))
        elif path == "/api/invert":
            kind, work = "invert", panels.invert(InvertRequest.from_json(body, info, MAX_UPLOAD))
        elif path == "/api/load":
            precision = sample_request({"precision": body.get("precision", "fp32")}, info).precision
            kind, work = "load", panels.warm(info.name, precision)
        elif path == "/api/edit":
            kind, work = "edit", panels.edit(EditRequest.from_json(body, info, MAX_UPLOAD))
        elif path == "/api/fewstep":
            kind, work = "fewstep", panels.fewstep(FewStepRequest.from_json(body, info))
        else:
            self._send_json({"error": f"no such endpoint {path}"}, HTTPStatus.NOT_FOUND)
            return
        job = self.server.jobs.submit(kind, work, self.client_address[0])
        self._send_json({"job": job.id, "events": f"/api/jobs/{job.id}/events"}, HTTPStatus.ACCEPTED)

    # --- server-sent events -----------------------------------------------------------------------
    def _start_stream(self) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()

    def _event(self, n: int, obj: dict) -> None:
        self.wfile.write(f"id: {n}\ndata: {json.dumps(obj)}\n\n".encode())

    def _last_event_id(self) -> int | None:
        """The id of the last event a reconnecting client saw, None on a first connection."""
        raw = self.headers.get("Last-Event-ID")
        if raw is None or not raw.strip():
            return None
        if not EVENT_ID.fullmatch(raw.strip()):
            raise BadRequest("Last-Event-ID must be the whole-number id of an event this server sent")
        return int(raw)

    def _streaming(self, stream, arg: str) -> None:
        if not self.server.streams.acquire(blocking=False):
            raise QueueFull(f"{MAX_STREAMS} event streams are open already; close a tab or wait")
        try:
            stream(arg)
        finally:
            self.server.streams.release()

    def _stream_job(self, jid: str) -> None:
        job = self.server.jobs.get(jid)
        if job is None:
            self._send_json({"error": "no such job"}, HTTPStatus.NOT_FOUND)
            return
        last = self._last_event_id()
        after = 0 if last is None else min(max(0, last + 1), len(job.events))  # never before the first event
        self._start_stream()
        deadline = time.monotonic() + MAX_STREAM_S
        while time.monotonic() < deadline:
            finished = job.finished
            events = job.wait(after, KEEPALIVE_S)
            for event in events:
                self._event(after, event)
                after += 1
            if not events:
                if finished:
                    return
                self.wfile.write(b": keep-alive\n\n")
            self.wfile.flush()

    def _stream_monitor(self, name: str) -> None:
        """The monitor's events; an event's id is the count of loss rows sent so far, so a reconnect goes on."""
        rows, grid = max(0, self._last_event_id() or 0), ""
        state = self.server.panels.monitor_state(name, rows, grid)  # a bad name fails before the stream
        self._start_stream()
        deadline = time.monotonic() + MAX_STREAM_S
        while True:
            rows += len(state["rows"])
            grid = state.get("grid", {}).get("key", grid)
            self._event(rows, state)
            self.wfile.flush()
            if time.monotonic() + MONITOR_S > deadline:
                return
            time.sleep(MONITOR_S)
            try:
                state = self.server.panels.monitor_state(name, rows, grid)
            except UsageError:
                return  # the run went away or was damaged: the reconnect gets the one-line answer


class _TooLarge(UsageError):
    pass


def _qint(q: dict, key: str, default: int) -> int:
    try:
        return int(q.get(key, default))
    except ValueError:
        raise BadRequest(f"{key} must be a whole number") from None
