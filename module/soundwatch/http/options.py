"""The HTTP server's options: address, token, limits; and building the server from them.

The command line (:mod:`soundwatch.cli`) reads them with the same names for
``run``, ``mic`` and ``serve``. Authentication rule:

- a token comes from ``--http-token`` or ``SOUNDWATCH_HTTP_TOKEN``;
- ``--http-no-auth`` or ``SOUNDWATCH_HTTP_AUTH=none`` turns it off explicitly;
- with neither, the server binds loopback addresses only, so an open API
  never reaches a plant network by accident;
- the routes that change the module need a token in every case: without a
  configured one, ``soundwatch run`` writes a random one to
  ``<state_dir>/http-command-token`` (mode 0600) and logs where
  (:func:`command_token`).

What "refused" means depends on the command. ``serve`` exists only to serve
the API, so it refuses an unsafe bind (a usage error). ``run`` and ``mic``
carry the audio pipeline, which an HTTP setting must never stop (a container
under ``restartPolicy: always`` would restart forever): without a usable
token they serve on loopback instead of the address asked for
(:attr:`HttpOptions.restricted` says why; health reports it under ``http``),
which still answers the container's HEALTHCHECK and ``docker exec``.

The ``Host`` header must be an IP address, ``localhost``, the bound host
name, this machine's host name (on a non-loopback bind) or a name given with
``--http-allowed-hosts`` / ``SOUNDWATCH_HTTP_ALLOWED_HOSTS`` (``*``: any).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from soundwatch.app import Runtime
    from soundwatch.bundle import Bundle
    from soundwatch.http.server import HttpServer

logger = logging.getLogger(__name__)

TOKEN_ENV = "SOUNDWATCH_HTTP_TOKEN"
AUTH_ENV = "SOUNDWATCH_HTTP_AUTH"
ALLOWED_HOSTS_ENV = "SOUNDWATCH_HTTP_ALLOWED_HOSTS"
DEFAULT_ADDRESS = "127.0.0.1:5000"
COMMAND_TOKEN_FILE = "http-command-token"
_HOST_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*\.?$")


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
    # Host header names answered besides IP addresses, localhost and the bound name.
    allowed_hosts: tuple[str, ...] = ()
    # The address asked for, and why the server listens elsewhere (loopback), if it does.
    requested: str = ""
    restricted: str | None = None

    def describe(self) -> dict[str, object]:
        """For health: where the API listens, whether it needs a token, and any restriction."""
        return {
            "listening": format_address(self.host, self.port),
            "requested": self.requested or format_address(self.host, self.port),
            "auth": "token" if self.token else "none",
            "restricted": self.restricted,
        }


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


def format_address(host: str, port: int) -> str:
    """``HOST:PORT``, with IPv6 hosts in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def loopback_for(host: str) -> str:
    """The loopback address of the same family as ``host`` (``::1`` for IPv6 binds)."""
    return "::1" if ":" in host else "127.0.0.1"


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
        raise HttpConfigError(
            f"both a token and --http-no-auth/{AUTH_ENV}=none are given: choose one"
        )
    if token is not None:
        token = token.strip()
        if len(token) < 8:
            raise HttpConfigError("the HTTP token is too short: use at least 8 characters")
        return token
    if disabled:
        if not is_loopback(host):
            logger.warning(
                "HTTP API on %s without authentication (--http-no-auth): anyone who can reach "
                "this address can use it",
                host,
            )
        return None
    if not is_loopback(host):
        raise HttpConfigError(
            f"the HTTP API would listen on {host}, which is not loopback, without a token. "
            f"Set {TOKEN_ENV} (or --http-token), or pass --http-no-auth (or {AUTH_ENV}=none) "
            "if the network is trusted, or bind 127.0.0.1"
        )
    return None


def http_options(
    address: str,
    *,
    token: str | None = None,
    no_auth: bool = False,
    max_upload_mb: float | None = None,
    upload_timeout_s: float | None = None,
    classifiers: int | None = None,
    allowed_hosts: str | None = None,
    env: Mapping[str, str] | None = None,
    loopback_without_token: bool = False,
) -> HttpOptions:
    """Validate the address and the HTTP options; raises :class:`HttpConfigError`.

    With ``loopback_without_token`` (``run``, ``mic``), token and
    authentication problems (none given off loopback, too short, contradictory
    settings) do not raise: the server is moved to loopback, and
    :attr:`HttpOptions.restricted` says why. Malformed options typed on the
    command line (address, limits) still raise.

    An option left ``None`` takes the server's own default (``HttpSettings``,
    ``ServerLimits``): each default is written once, there.
    """
    from soundwatch.http.app import DEFAULT_MAX_UPLOAD_BYTES, MIB
    from soundwatch.http.server import DEFAULT_UPLOAD_TIMEOUT_S

    env = os.environ if env is None else env
    host, port = parse_address(address)
    requested = format_address(host, port)
    restricted: str | None = None
    try:
        token = resolve_token(host, token, no_auth, env)
    except HttpConfigError as e:
        if not loopback_without_token:
            raise
        host, token = loopback_for(host), None
        restricted = (
            f"{e}. Until then the HTTP API listens on {format_address(host, port)} only "
            "(this machine or container; the health check still works)"
        )
        logger.warning("HTTP API: %s", restricted)
    if max_upload_mb is not None and not 0.01 <= max_upload_mb <= 1024:
        raise HttpConfigError("--http-max-upload-mb must be between 0.01 and 1024")
    if upload_timeout_s is not None and not 1 <= upload_timeout_s <= 3600:
        raise HttpConfigError("--http-upload-timeout must be between 1 and 3600 seconds")
    if classifiers is not None and not 1 <= classifiers <= 16:
        raise HttpConfigError("--http-classifiers must be between 1 and 16")
    return HttpOptions(
        host=host,
        port=port,
        token=token,
        max_upload_bytes=(
            round(max_upload_mb * MIB) if max_upload_mb is not None else DEFAULT_MAX_UPLOAD_BYTES
        ),
        upload_timeout_s=(
            upload_timeout_s if upload_timeout_s is not None else DEFAULT_UPLOAD_TIMEOUT_S
        ),
        classifiers=int(classifiers if classifiers is not None else min(2, os.cpu_count() or 1)),
        requested=requested,
        restricted=restricted,
        allowed_hosts=parse_allowed_hosts(
            allowed_hosts if allowed_hosts is not None else env.get(ALLOWED_HOSTS_ENV, "")
        ),
    )


def parse_allowed_hosts(text: str) -> tuple[str, ...]:
    """``name,name,...`` (or ``*``) into lower-case host names; raises :class:`HttpConfigError`."""
    names = tuple(n.strip().lower().rstrip(".") for n in text.split(",") if n.strip())
    for name in names:
        if name != "*" and not _HOST_NAME.match(name):
            raise HttpConfigError(
                f"--http-allowed-hosts: {name!r} is not a host name (give names only, "
                "without scheme or port, separated by commas; * allows any)"
            )
    return names


def answered_hosts(options: HttpOptions) -> frozenset[str]:
    """The Host names the server answers to besides IP addresses (see the module docstring)."""
    names = {"localhost", *options.allowed_hosts}
    host = options.host.lower()
    try:
        ipaddress.ip_address(host)
    except ValueError:
        names.add(host)  # bound by name
    if not is_loopback(host):
        names.add(socket.gethostname().lower())
    return frozenset(names)


def command_token(state_dir: Path) -> Path:
    """The token file for the state-changing routes in ``state_dir``, made if missing.

    A random token (256 bits) in a file only its owner can read; an existing
    one is kept, so scripts that read it keep working across restarts. Raises
    ``OSError`` when the directory is not writable.
    """
    path = state_dir / COMMAND_TOKEN_FILE
    try:
        if path.stat().st_mode & 0o077 == 0 and len(path.read_text().strip()) >= 32:
            return path
        logger.warning("%s is unusable (readable by others, or too short): replacing it", path)
    except FileNotFoundError:
        pass
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask, and if tmp existed
        os.write(fd, (secrets.token_urlsafe(32) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def build_server(
    options: HttpOptions, bundle: Bundle, runtime: Runtime | None = None
) -> HttpServer:
    """The app and its waitress server, bound but not yet serving.

    Raises :class:`~soundwatch.http.server.ServerError` when the address
    cannot be bound.
    """
    from soundwatch.http.app import HttpSettings, create_app
    from soundwatch.http.server import HttpServer, ServerLimits

    generated: str | None = None
    if options.token is None and runtime is not None:
        try:
            path = command_token(runtime.config.state_dir)
        except OSError as e:
            # Commands then stay refused (401): never open them instead.
            logger.error("HTTP: cannot write a command token to the state directory: %s", e)
        else:
            generated = path.read_text().strip()
            logger.info(
                "HTTP: PATCH /config and POST /commands/* need 'Authorization: Bearer <token>'; "
                "no token was set, so it is the one in %s",
                path,
            )
    settings = HttpSettings(
        token=options.token,
        max_upload_bytes=options.max_upload_bytes,
        classifiers=options.classifiers,
        command_token=generated,
        allowed_hosts=answered_hosts(options),
    )
    app = create_app(bundle, runtime=runtime, settings=settings)
    limits = ServerLimits(
        max_request_bytes=settings.max_request_bytes,
        upload_timeout_s=options.upload_timeout_s,
        threads=max(4, options.classifiers + 2),
    )
    return HttpServer(app, options.host, options.port, limits)
