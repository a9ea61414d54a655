"""Serving the API with waitress, in a background thread that stops cleanly.

waitress is a production WSGI server in pure Python (no compiler, same on
amd64 and arm64). Its I/O loop reads whole requests before a worker thread
sees them, so a slow or stalled upload holds a socket, never a worker; the
limits here bound how many sockets, how big a body and how long a silence.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from waitress.server import create_server

logger = logging.getLogger(__name__)


# A connection that sends nothing for this long (mid-upload or idle keep-alive) is closed.
DEFAULT_UPLOAD_TIMEOUT_S = 30.0


class ServerError(RuntimeError):
    """The server could not start (address in use, bad host, ...)."""


@dataclass(frozen=True)
class ServerLimits:
    """How much the server accepts, and for how long it waits."""

    max_request_bytes: int
    # A connection that sends nothing for this long (mid-upload or idle
    # keep-alive) is closed; a stalled upload so frees its socket.
    upload_timeout_s: float = DEFAULT_UPLOAD_TIMEOUT_S
    # Worker threads running the app: uploads wait for a classifier anyway
    # (see HttpSettings.classifiers); extra threads keep /health answering
    # while uploads are being classified.
    threads: int = 4
    connection_limit: int = 64

    def __post_init__(self) -> None:
        if self.upload_timeout_s <= 0:
            raise ValueError("upload_timeout_s must be positive")
        if self.threads < 1 or self.connection_limit < 1:
            raise ValueError("threads and connection_limit must be >= 1")


class HttpServer:
    """A waitress server on ``host:port`` (port 0: any free port), run in a thread."""

    def __init__(self, app: Any, host: str, port: int, limits: ServerLimits) -> None:
        self.app = app
        self.host = host
        self.limits = limits
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        try:
            self._server = create_server(
                app,
                host=host,
                port=port,
                threads=limits.threads,
                connection_limit=limits.connection_limit,
                channel_timeout=max(1, round(limits.upload_timeout_s)),
                # How often idle channels are looked for: often enough that
                # the timeout above is kept to within a few seconds.
                cleanup_interval=max(1, min(30, round(limits.upload_timeout_s / 4))),
                max_request_body_size=limits.max_request_bytes,
                # No version in the Server header, no tracebacks to clients.
                ident="soundwatch",
                expose_tracebacks=False,
            )
        except OSError as e:
            raise ServerError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
        except ValueError as e:  # waitress: unresolvable host, bad adjustment
            raise ServerError(f"cannot listen on {host}:{port}: {e}") from e
        self.port = int(self._server.effective_port)

    @property
    def url(self) -> str:
        host = self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1" if host == "0.0.0.0" else "[::1]"
        return f"http://{host}:{self.port}"

    def start(self) -> HttpServer:
        """Serve in a daemon thread named ``http``; returns at once."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._thread = threading.Thread(target=self._serve, name="http", daemon=True)
        self._thread.start()
        logger.info("HTTP API on %s (listening on %s:%d)", self.url, self.host, self.port)
        return self

    def _serve(self) -> None:
        try:
            self._server.run()
        except Exception:  # the API failing must not take the pipeline with it
            logger.exception("HTTP server stopped with an error")
        finally:
            self._stopped.set()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Let running requests finish (up to ``timeout_s``), then close every socket.

        Idempotent; safe to call from any thread, including a signal handler's.
        """
        server = self._server
        if self._thread is None:  # bound but never served: just release the port
            if not self._stopped.is_set():
                _close_all(server)
                self._stopped.set()
            return
        if self._stopped.is_set():
            return
        # Workers finish the request in hand; queued ones are cancelled.
        server.task_dispatcher.shutdown(cancel_pending=True, timeout=timeout_s)
        # Sockets belong to the I/O loop's thread: close them there. The loop
        # ends once its map is empty.
        try:
            server.trigger.pull_trigger(lambda: _close_all(server))
        except OSError:
            # The trigger is already closed: the loop has ended (or is ending)
            # between the check above and here; waiting below is all that is left.
            logger.debug("HTTP I/O loop already closed its trigger")
        if not self._stopped.wait(timeout_s):
            logger.warning("HTTP server did not stop within %.1f s", timeout_s)
            return
        self._thread.join(timeout_s)
        logger.info("HTTP API stopped")


def _close_all(server: Any) -> None:
    from waitress import wasyncore

    wasyncore.close_all(server._map, ignore_all=True)
