"""``difflab serve``: a local web page to watch, sample, compare and edit trained runs.

The server (:mod:`difflab.serve.server`) is the standard library's ThreadingHTTPServer; model work
runs in one job queue (:mod:`~difflab.serve.jobs`) and streams back as server-sent events; every
request is validated in :mod:`~difflab.serve.requests`; the page is one HTML, one JS and one CSS
file in ``static/`` (no framework, nothing loaded from elsewhere).
"""

from difflab.serve.server import ExplorerServer

__all__ = ["ExplorerServer"]
