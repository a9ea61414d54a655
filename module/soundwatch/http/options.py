"""Command-line glue: ``--http HOST:PORT`` for ``run``, and ``soundwatch serve``.

Authentication rule (the same for ``run`` and ``serve``):

- a token comes from ``--token``/``--http-token`` or ``SOUNDWATCH_HTTP_TOKEN``;
- ``--no-auth``/``--http-no-auth`` or ``SOUNDWATCH_HTTP_AUTH=none`` turns it off
  explicitly;
- with neither, the server binds loopback addresses only: any other address
  is refused with exit status 2, so an open API never reaches a plant network
  by accident.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from soundwatch.app import Runtime
    from soundwatch.config import Config
    from soundwatch.http.server import HttpServer

logger = logging.getLogger(__name__)

TOKEN_ENV = "SOUNDWATCH_HTTP_TOKEN"
AUTH_ENV = "SOUNDWATCH_HTTP_AUTH"
DEFAULT_ADDRESS = "127.0.0.1:5000"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class HttpConfigError(ValueError):
    """The HTTP options are inconsistent or unsafe; the message says how to fix them."""


@dataclass(frozen=True)
class HttpOptions:
    """Everything the server needs from the command line and the environment."""

    host: str
    port: int
    token: str | None
    max_upload_bytes: int
    upload_timeout_s: float
    classifiers: int


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``:PORT`` (loopback) into a host and port."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise HttpConfigError(f"bad address {text!r}: use [IPv6]:PORT, e.g. [::1]:5000")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise HttpConfigError(f"bad address {text!r}: use HOST:PORT, e.g. 127.0.0.1:5000")
        if ":" in host:
            raise HttpConfigError(f"bad address {text!r}: put IPv6 hosts in brackets: [::1]:5000")
    try:
        port = int(port_text)
    except ValueError:
        raise HttpConfigError(f"bad port in {text!r}: {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise HttpConfigError(f"bad port in {text!r}: must be 0..65535 (0 = any free port)")
    return host or "127.0.0.1", port


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def resolve_token(
    host: str,
    token_arg: str | None,
    no_auth: bool,
    env: Mapping[str, str],
) -> str | None:
    """The bearer token to require, or ``None``; refuses an open non-loopback bind."""
    auth_env = env.get(AUTH_ENV, "").strip().lower()
    if auth_env not in ("", "none", "token"):
        raise HttpConfigError(f"{AUTH_ENV} must be 'none' or 'token' (got {auth_env!r})")
    token = token_arg if token_arg is not None else env.get(TOKEN_ENV) or None
    disabled = no_auth or auth_env == "none"
    if token is not None and disabled:
        raise HttpConfigError(f"both a token and --no-auth/{AUTH_ENV}=none are given: choose one")
    if token is not None:
        token = token.strip()
        if len(token) < 8:
            raise HttpConfigError("the HTTP token is too short: use at least 8 characters")
        return token
    if disabled:
        if not is_loopback(host):
            logger.warning(
                "HTTP API on %s without authentication (--no-auth): anyone who can reach "
                "this address can use it",
                host,
            )
        return None
    if not is_loopback(host):
        raise HttpConfigError(
            f"the HTTP API would listen on {host}, which is not loopback, without a token. "
            f"Set {TOKEN_ENV} (or --token), or pass --no-auth (or {AUTH_ENV}=none) if the "
            "network is trusted, or bind 127.0.0.1"
        )
    return None


def http_options(
    address: str, args: argparse.Namespace, env: Mapping[str, str] | None = None
) -> HttpOptions:
    """Validate the address and the HTTP flags; raises :class:`HttpConfigError`."""
    from soundwatch.http.app import MIB

    env = os.environ if env is None else env
    host, port = parse_address(address)
    token = resolve_token(
        host, getattr(args, "token", None), bool(getattr(args, "no_auth", False)), env
    )
    max_mb = getattr(args, "max_upload_mb", None)
    timeout_s = getattr(args, "upload_timeout", None)
    classifiers = getattr(args, "classifiers", None)
    if max_mb is not None and not 0.01 <= max_mb <= 1024:
        raise HttpConfigError("--max-upload-mb must be between 0.01 and 1024")
    if timeout_s is not None and not 1 <= timeout_s <= 3600:
        raise HttpConfigError("--upload-timeout must be between 1 and 3600 seconds")
    if classifiers is not None and not 1 <= classifiers <= 16:
        raise HttpConfigError("--classifiers must be between 1 and 16")
    return HttpOptions(
        host=host,
        port=port,
        token=token,
        max_upload_bytes=round((max_mb if max_mb is not None else 32) * MIB),
        upload_timeout_s=float(timeout_s if timeout_s is not None else 30.0),
        classifiers=int(classifiers if classifiers is not None else min(2, os.cpu_count() or 1)),
    )


def build_server(options: HttpOptions, bundle: Any, runtime: Runtime | None = None) -> HttpServer:
    """The app and its waitress server, bound but not yet serving."""
    from soundwatch.http.app import HttpSettings, create_app
    from soundwatch.http.server import HttpServer, ServerLimits

    settings = HttpSettings(
        token=options.token,
        max_upload_bytes=options.max_upload_bytes,
        classifiers=options.classifiers,
    )
    app = create_app(bundle, runtime=runtime, settings=settings)
    limits = ServerLimits(
        max_request_bytes=settings.max_request_bytes,
        upload_timeout_s=options.upload_timeout_s,
        threads=max(4, options.classifiers + 2),
    )
    return HttpServer(app, options.host, options.port, limits)


def start_http(
    address: str,
    *,
    runtime: Runtime | None,
    config: Config | None,
    args: argparse.Namespace,
) -> HttpServer:
    """Serve the API beside a running pipeline; returns the server (call ``stop()``).

    Called by ``soundwatch run --http``. A bad or unsafe address ends the
    process with status 2, a port that cannot be bound with status 1, both
    with a message on stderr, before the pipeline starts.
    """
    from soundwatch.http.server import ServerError

    try:
        options = http_options(address, args)
    except HttpConfigError as e:
        _fail(f"--http: {e}", EXIT_USAGE)
    bundle = runtime.bundle if runtime is not None else _load_bundle(config)
    try:
        server = build_server(options, bundle, runtime)
    except ServerError as e:
        _fail(str(e), EXIT_FAILED)
    return server.start()


def _fail(message: str, code: int) -> Any:
    # This runs in the CLI's main thread before anything has started: an
    # exit with a message is what the user of `soundwatch run` needs.
    sys.stderr.write(f"soundwatch: http: {message}\n")
    raise SystemExit(code)


def _load_bundle(config: Config | None) -> Any:
    from soundwatch.bundle import load_bundle

    return load_bundle(config.model.bundle if config is not None else None)


# --- `soundwatch serve` ----------------------------------------------------------


def add_http_options(parser: argparse.ArgumentParser, *, prefix: str = "") -> None:
    """The token and limit flags; ``prefix="http-"`` names them for ``run``."""
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument(
        f"--{prefix}token",
        dest="token",
        metavar="TOKEN",
        help=f"require 'Authorization: Bearer TOKEN' (default: ${TOKEN_ENV})",
    )
    auth.add_argument(
        f"--{prefix}no-auth",
        dest="no_auth",
        action="store_true",
        help="serve without a token even on a non-loopback address",
    )
    parser.add_argument(
        f"--{'http-' if prefix else ''}max-upload-mb",
        dest="max_upload_mb",
        type=float,
        metavar="MIB",
        help="largest accepted upload in MiB (default 32)",
    )
    parser.add_argument(
        f"--{'http-' if prefix else ''}upload-timeout",
        dest="upload_timeout",
        type=float,
        metavar="S",
        help="close a connection that sends nothing for S seconds (default 30)",
    )


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``soundwatch serve``: the API with the model, no audio source."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="serve the HTTP API with the model only (no audio source), as the seeds did",
        description="Serve POST /inference, /info, /health, the web page and /metrics with "
        "the model bundle, without capturing audio.",
    )
    p.add_argument(
        "--http",
        metavar="HOST:PORT",
        default=DEFAULT_ADDRESS,
        help=f"address to listen on (default {DEFAULT_ADDRESS}; port 0 = any free port)",
    )
    p.add_argument(
        "--bundle", type=Path, default=None, help="model bundle directory (default: shipped)"
    )
    p.add_argument(
        "--classifiers",
        type=int,
        default=None,
        help="uploads classified at once (default: min(2, CPUs))",
    )
    add_http_options(p)
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args: argparse.Namespace) -> int:
    from soundwatch.bundle import BundleError, load_bundle
    from soundwatch.http.server import ServerError
    from soundwatch.model import ModelError

    logging.getLogger("soundwatch").setLevel(
        min(logging.getLogger("soundwatch").getEffectiveLevel(), logging.INFO)
    )
    try:
        options = http_options(args.http, args)
    except HttpConfigError as e:
        sys.stderr.write(f"soundwatch: serve: {e}\n")
        return EXIT_USAGE
    try:
        bundle = load_bundle(args.bundle)
        server = build_server(options, bundle)
    except (BundleError, ModelError) as e:
        sys.stderr.write(f"soundwatch: model: {e}\n")
        return EXIT_FAILED
    except ServerError as e:
        sys.stderr.write(f"soundwatch: serve: {e}\n")
        return EXIT_FAILED
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    server.start()
    logger.info(
        "serving %s with %s: %s (auth: %s)",
        bundle.model_version,
        "no audio source",
        server.url,
        "bearer token" if options.token else "none",
    )
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
    return EXIT_OK
