"""The HTTP API: a Flask app over a model bundle and, when running, the pipeline.

Two ways to build it:

- beside a running :class:`soundwatch.app.Runtime` (``soundwatch run --http``):
  every route works, and ``/health``, ``/events``, ``/state`` and ``/metrics``
  describe the live pipeline;
- with a bundle alone (``soundwatch serve``), as the reference service's server was: the
  model answers uploads, and health reports model-only readiness.

Uploads are classified by a small pool of :class:`ClipClassifier`, never by
the pipeline's own model: a LiteRT interpreter is not re-entrant, and the
pipeline must not wait behind an HTTP client. Nothing a request does can stop
the pipeline; a request's failure ends as a JSON error for that request.

Errors are JSON objects ``{"Error": message, "Code": code}`` with a status of
400 (bad input, or a ``Host`` this server does not answer to), 401 (token),
404, 405, 413 (too large), 415 (not audio or not multipart) or 503 (busy).
See ``openapi.yaml`` beside this file.

Access rules, checked before any route runs (:func:`_before`):

- the ``Host`` header must be an IP address or a name in
  :attr:`HttpSettings.allowed_hosts`: a web page whose DNS name is rebound to
  127.0.0.1 would otherwise talk to a loopback server as if it were its own;
- routes that change the module (:data:`WRITE_ENDPOINTS`) need a token
  always: the configured one, or :attr:`HttpSettings.command_token` (generated
  into the state directory when none is configured);
- the other routes need the configured token, if any, except
  :data:`PUBLIC_ENDPOINTS`; ``/health`` without it says only ``ok`` or
  ``degraded`` (the full report names brokers, client ids, topics and paths).
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import ipaddress
import logging
import math
import queue
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast, overload

import soundfile as sf
from flask import Flask, Response, g, jsonify, render_template, request, send_file
from markupsafe import Markup
from werkzeug.datastructures import FileStorage
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from soundwatch import __version__
from soundwatch.audio import AudioError
from soundwatch.classify import ClipClassifier
from soundwatch.control import (
    MAX_COMMAND_BYTES,
    CommandRequest,
    check_nesting,
    parse_json,
    request_from,
)
from soundwatch.events import to_wire
from soundwatch.http.docs import ASSET_TYPES, DOCS_DIR, README, DocsTree
from soundwatch.http.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from soundwatch.http.metrics import ApiMetrics

if TYPE_CHECKING:
    from soundwatch.app import Runtime
    from soundwatch.bundle import Bundle

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
OPENAPI_PATH = HERE / "openapi.yaml"
MIB = 1024 * 1024
DEFAULT_MAX_UPLOAD_BYTES = 32 * MIB
# Room for the multipart envelope (boundaries, part headers, other small
# fields) on top of the file itself, so a file exactly at the limit passes.
MULTIPART_SLACK_BYTES = 64 * 1024
MAX_EVENTS_PAGE = 500
UPLOAD_FIELD = "file"

# Routes that show data or do work need the token (when one is set). The
# rest hold nothing private: the liveness probe (the Docker HEALTHCHECK has
# no token), the page and its assets (they fetch their data through the
# protected routes), the README and the API description.
PUBLIC_ENDPOINTS = frozenset({"health", "index", "static", "docs", "docs_page", "openapi"})
# Routes that change the module: a token always, even on an open loopback server
# (any local process or web page could otherwise reconfigure detection).
WRITE_ENDPOINTS = frozenset({"config", "command"})


@dataclass(frozen=True)
class HttpSettings:
    """What the API enforces; the server's own limits derive from these."""

    token: str | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    # Uploads classified at once; more wait (up to classifier_wait_s) for a
    # free classifier, then get 503. One per core keeps latency predictable.
    classifiers: int = 2
    classifier_wait_s: float = 30.0
    readme_path: Path | None = None
    # The token of the state-changing routes when `token` is None (generated
    # into the state directory); without either they refuse every request.
    command_token: str | None = None
    # Host header names answered besides IP addresses; "*" answers any.
    allowed_hosts: frozenset[str] = frozenset({"localhost"})

    def __post_init__(self) -> None:
        if self.max_upload_bytes < 1024:
            raise ValueError("max_upload_bytes must be at least 1 KiB")
        if self.classifiers < 1:
            raise ValueError("classifiers must be >= 1")
        for token in (self.token, self.command_token):
            if token is not None and not token.strip():
                raise ValueError("the bearer token must not be empty")

    @property
    def write_token(self) -> str | None:
        """What the state-changing routes require."""
        return self.token if self.token is not None else self.command_token

    @property
    def max_request_bytes(self) -> int:
        """The largest request body the server accepts: the upload plus its envelope."""
        return self.max_upload_bytes + MULTIPART_SLACK_BYTES


class ApiError(Exception):
    """An error answered as ``{"Error": message, "Code": code}`` with ``status``."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


class ClassifierPool:
    """A fixed set of clip classifiers shared by the request threads."""

    def __init__(self, bundle: Bundle, size: int, threads: int = 1) -> None:
        self.size = size
        self._free: queue.LifoQueue[ClipClassifier] = queue.LifoQueue()
        for _ in range(size):
            self._free.put(ClipClassifier(bundle, threads=threads))
        probe = self._free.get()
        self.backend: str = probe.model.backend
        self.window_s: float = probe.window_s
        self._free.put(probe)

    @contextlib.contextmanager
    def acquire(self, timeout_s: float) -> Iterator[ClipClassifier]:
        """A classifier for this thread alone; raises :class:`ApiError` (503) when all stay busy."""
        try:
            classifier = self._free.get(timeout=timeout_s)
        except queue.Empty:
            raise ApiError(
                503,
                "busy",
                f"all {self.size} classifiers stayed busy for {timeout_s:g} s; retry later",
                {"Retry-After": "1"},
            ) from None
        try:
            yield classifier
        finally:
            self._free.put(classifier)


@dataclass
class Api:
    """What the routes use: the model, the pool, the runtime if any, the metrics."""

    bundle: Bundle
    pool: ClassifierPool
    runtime: Runtime | None
    settings: HttpSettings
    metrics: ApiMetrics
    started_at: float

    @property
    def mode(self) -> str:
        return "run" if self.runtime is not None else "serve"

    def health(self) -> dict[str, Any]:
        if self.runtime is not None:
            doc = self.runtime.health()
        else:
            # serve: no source and no sinks; ready as soon as the model loaded.
            doc = {
                "healthy": True,
                "source": None,
                "model": {
                    "healthy": True,
                    "version": self.bundle.model_version,
                    "backend": self.pool.backend,
                },
                "sinks": {},
                "windows": 0,
                "events": {},
                "uptime_s": round(time.time() - self.started_at, 1),
            }
        doc["mode"] = self.mode
        return doc


def create_app(
    bundle: Bundle,
    *,
    runtime: Runtime | None = None,
    settings: HttpSettings | None = None,
    pool: ClassifierPool | None = None,
) -> Flask:
    """The WSGI app. ``runtime`` is the live pipeline, or ``None`` for ``serve``."""
    settings = settings or HttpSettings()
    pool = pool or ClassifierPool(bundle, settings.classifiers)
    api = Api(
        bundle=bundle,
        pool=pool,
        runtime=runtime,
        settings=settings,
        metrics=ApiMetrics(bundle, pool.backend, runtime),
        started_at=time.time(),
    )
    app = Flask(__name__, static_folder="static", template_folder="templates")
    # Werkzeug refuses larger bodies with 413 before parsing them; the server
    # (waitress) enforces the same limit before buffering them.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep the reference service's key order
    app.extensions["soundwatch"] = api

    app.before_request(functools.partial(_before, api))
    app.after_request(functools.partial(_after, api))
    app.register_error_handler(ApiError, _api_error)
    app.register_error_handler(HTTPException, functools.partial(_http_error, api))
    app.register_error_handler(Exception, _unexpected_error)

    def route(rules: str, endpoint: str, view: Callable[..., Any], **options: Any) -> None:
        bound = functools.partial(view, api)
        for rule in rules.split():
            app.add_url_rule(rule, endpoint, bound, **options)

    route("/health", "health", _health)
    route("/", "index", _index)
    route("/info", "info", _info)
    # /predict: another name clients of the reference service used for the same thing.
    route("/inference /predict", "inference", _inference, methods=["POST"])
    route("/events", "events", _events)
    route("/state", "state", _state)
    route("/metrics", "metrics", _metrics)
    route("/docs", "docs", _docs)
    route("/docs/<path:page>", "docs_page", _docs_page)
    route("/openapi.yaml", "openapi", _openapi)
    # Commands go to the control plane, as from MQTT or IoT Hub.
    route("/config", "config", _patch_config, methods=["PATCH"])
    route("/commands/<name>", "command", _command, methods=["POST"])
    return app


def api_of(app: Flask) -> Api:
    """The :class:`Api` behind an app made by :func:`create_app`."""
    return cast(Api, app.extensions["soundwatch"])


# --- request hooks ------------------------------------------------------------


def _before(api: Api) -> None:
    g.started = time.perf_counter()
    _check_host(api.settings.allowed_hosts)
    endpoint = request.endpoint
    if endpoint is None:
        return
    if endpoint in WRITE_ENDPOINTS:
        _require_token(
            api.settings.write_token,
            "this route changes the module and needs 'Authorization: Bearer <token>': "
            "the server's token, or the one it wrote to its state directory (see its log)",
        )
    elif api.settings.token is not None and endpoint not in PUBLIC_ENDPOINTS:
        _require_token(
            api.settings.token,
            "this route needs 'Authorization: Bearer <token>' (see SOUNDWATCH_HTTP_TOKEN)",
        )


def _check_host(allowed: frozenset[str]) -> None:
    """Refuse a ``Host`` that is neither an IP address nor an allowed name (DNS rebinding)."""
    if "*" in allowed:
        return
    host = request.headers.get("Host")
    if host is None:  # HTTP/1.0 without Host: no browser sends that
        return
    name = host.strip().lower()
    if name.startswith("["):  # [IPv6]:port
        name = name[1 : name.find("]")] if "]" in name else name
    else:
        name = name.rpartition(":")[0] if ":" in name else name
    name = name.rstrip(".")
    if name in allowed or _is_ip(name):
        return
    raise ApiError(
        400,
        "bad_host",
        f"this server does not answer to the host name {name!r} (a page whose name was "
        "re-pointed at this address must not reach the API); use its IP address, or allow "
        "the name with --http-allowed-hosts or SOUNDWATCH_HTTP_ALLOWED_HOSTS",
    )


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _given_token() -> str | None:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return None
    return given.strip()


def _token_matches(expected: str | None) -> bool:
    given = _given_token()
    return (
        expected is not None
        and given is not None
        and hmac.compare_digest(given.encode(), expected.encode())
    )


def _require_token(expected: str | None, missing_message: str) -> None:
    if _given_token() is None or expected is None:
        raise ApiError(
            401, "unauthorized", missing_message, {"WWW-Authenticate": 'Bearer realm="soundwatch"'}
        )
    if not _token_matches(expected):
        raise ApiError(
            401,
            "unauthorized",
            "the bearer token is wrong",
            {"WWW-Authenticate": 'Bearer realm="soundwatch", error="invalid_token"'},
        )


def _after(api: Api, response: Response) -> Response:
    headers = response.headers
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "no-referrer")
    if response.mimetype == "text/html":
        # Everything the page needs comes from this server: no CDN, no inline code.
        headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data:; object-src 'none'; "
            "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        )
    if response.mimetype == "application/json":
        headers.setdefault("Cache-Control", "no-store")
    rule = request.url_rule.rule if request.url_rule is not None else "(unmatched)"
    started = g.get("started")
    elapsed = time.perf_counter() - started if started is not None else 0.0
    api.metrics.observe_request(rule, request.method, response.status_code, elapsed)
    return response


def _error_response(status: int, code: str, message: str, headers: Mapping[str, str]) -> Response:
    response = jsonify({"Error": message, "Code": code})
    response.status_code = status
    for key, value in headers.items():
        response.headers[key] = value
    return response


def _api_error(e: ApiError) -> Response:
    if e.status >= 500:
        logger.warning("%s %s: %s", request.method, request.path, e.message)
    else:
        logger.info("%s %s: %d %s: %s", request.method, request.path, e.status, e.code, e.message)
    return _error_response(e.status, e.code, e.message, e.headers)


_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
}


def _http_error(api: Api, e: HTTPException) -> Response:
    status = e.code or 500
    if isinstance(e, RequestEntityTooLarge):
        message = _too_large_message(api.settings.max_upload_bytes)
    elif status == 404:
        message = f"no route {request.path}; see /openapi.yaml"
    elif status == 405:
        allowed = ", ".join(e.valid_methods or []) if hasattr(e, "valid_methods") else ""
        message = f"{request.method} is not allowed on {request.path} (allowed: {allowed})"
    else:
        message = e.description or e.name
    headers = {k: v for k, v in e.get_headers() if k.lower() in ("allow", "retry-after")}
    return _error_response(status, _HTTP_CODES.get(status, "http_error"), message, headers)


def _unexpected_error(e: Exception) -> Response:
    # One request failed; the server and the pipeline carry on.
    logger.exception("%s %s failed", request.method, request.path)
    return _error_response(500, "internal", f"internal error: {type(e).__name__}", {})


def _too_large_message(limit: int) -> str:
    return (
        f"upload too large: the limit is {limit} bytes ({limit / MIB:g} MiB); "
        "the model looks at the first 10 s, so send a shorter clip"
    )


# --- routes -------------------------------------------------------------------


def _health(api: Api) -> tuple[Response, int]:
    doc = _json_safe(api.health())
    status = 200 if doc.get("healthy") else 503
    if api.settings.token is not None and not _token_matches(api.settings.token):
        # The probe needs no token; the report's details (brokers, client ids,
        # topics, paths) are for those who have it.
        ok = doc.get("healthy") and not doc.get("degraded")
        return jsonify({"status": "ok" if ok else "degraded"}), status
    return jsonify(doc), status


def _index(api: Api) -> str:
    runtime = api.runtime
    return render_template(
        "index.html",
        version=__version__,
        mode=api.mode,
        model_version=api.bundle.model_version,
        device_id=runtime.config.device_id if runtime is not None else None,
        source_type=runtime.config.source.type if runtime is not None else "",
        source=runtime.describe_source() if runtime is not None else "none (uploads only)",
        auth_required=api.settings.token is not None,
        max_upload_bytes=api.settings.max_upload_bytes,
        max_upload_mib=f"{api.settings.max_upload_bytes / MIB:g}",
        upload_field=UPLOAD_FIELD,
    )


def _info(api: Api) -> Response:
    info = api.bundle.info()
    info["model_version"] = api.bundle.model_version
    info["server"] = {
        "soundwatch_version": __version__,
        "mode": api.mode,
        "backend": api.pool.backend,
        "classifiers": api.pool.size,
        "window_s": round(api.pool.window_s, 3),
        "max_upload_bytes": api.settings.max_upload_bytes,
        "auth": api.settings.token is not None,
    }
    return jsonify(_json_safe(info))


def _inference(api: Api) -> Response:
    upload = _read_upload(api)
    name = upload.filename or UPLOAD_FIELD
    stream = cast(BinaryIO, upload.stream)
    wait_started = time.perf_counter()
    with api.pool.acquire(api.settings.classifier_wait_s) as classifier:
        api.metrics.pool_wait_seconds.observe(time.perf_counter() - wait_started)
        try:
            result = classifier.classify_source(stream)
        except AudioError as e:
            raise ApiError(400, "bad_audio", f"{name}: {e}") from e
    api.metrics.observe_classification(result.label, result.timing_ms)
    logger.info(
        "classified upload %s: %s (p=%.3f) in %.1f ms",
        name,
        result.label,
        max(result.probabilities),
        sum(result.timing_ms.values()),
    )
    body = {**result.to_json(), "File": name}
    return jsonify(body)


def _events(api: Api) -> Response:
    _only_args("limit", "before_seq")
    limit = _int_arg("limit", default=50, low=1, high=MAX_EVENTS_PAGE)
    before = _int_arg("before_seq", default=None, low=1, high=None)
    events = api.runtime.recent_events(limit, before) if api.runtime is not None else []
    last_seq = events[-1].seq if events else None
    more = len(events) == limit and last_seq is not None and last_seq > 1
    return jsonify(
        {
            "mode": api.mode,
            "count": len(events),
            "events": [to_wire(e) for e in events],
            "next_before_seq": last_seq if more else None,
        }
    )


def _state(api: Api) -> Response:
    runtime = api.runtime
    if runtime is None:
        return jsonify({"mode": api.mode, "level": None, "state": None, "hop_s": None})
    level = {
        "peak_dbfs": _finite_or_none(runtime.block_peak_dbfs),
        "rms_dbfs": _finite_or_none(runtime.block_rms_dbfs),
    }
    state = runtime.latest_state
    return jsonify(
        {
            "mode": api.mode,
            "level": level,
            "state": to_wire(state) if state is not None else None,
            "hop_s": round(runtime.hop_s, 4),
        }
    )


# A command's status as an HTTP status (the same mapping as IoT Hub's direct methods).
_COMMAND_STATUS = {"ok": 200, "invalid": 400, "unknown": 404, "busy": 429, "failed": 500}


def _patch_config(api: Api) -> Response:
    """A config patch, applied live all or nothing (as MQTT ``set`` and the twin)."""
    return _run_command(api, "PATCH /config", "setConfig")


def _command(api: Api, name: str) -> Response:
    """Any command of the control plane; the body is its arguments (or empty)."""
    return _run_command(api, f"POST /commands/{name}", None, name)


def _run_command(api: Api, route: str, default: str | None, name: str | None = None) -> Response:
    runtime = api.runtime
    if runtime is None:
        raise ApiError(503, "no_pipeline", "commands need a running pipeline (soundwatch run)")
    if request.content_length is not None and request.content_length > MAX_COMMAND_BYTES:
        raise ApiError(413, "too_large", f"a command is at most {MAX_COMMAND_BYTES} bytes")
    body = request.get_data(cache=False)
    origin = f"http:{route}"

    def parse() -> CommandRequest:
        if name is None:
            doc = parse_json(body)
            return request_from(doc, channel="http", origin=origin, default_command=default)
        args = parse_json(body) if body.strip() else None
        check_nesting(args)
        return CommandRequest(name, args, "http", origin)

    control = runtime.control
    if control is None:  # the runtime is still being built: commands are not taken yet
        raise ApiError(503, "starting", "the module is starting: try again in a moment")
    result = control.call("http", origin, parse)
    response = jsonify(_json_safe(result.to_json()))
    response.status_code = _COMMAND_STATUS.get(result.status, 503)
    if result.retry_after_s is not None:
        response.headers["Retry-After"] = str(math.ceil(result.retry_after_s))
    return response


def _metrics(api: Api) -> Response:
    return Response(api.metrics.render(), mimetype=None, content_type=METRICS_CONTENT_TYPE)


def _docs(api: Api) -> Any:
    return _docs_page(api, README)


def _docs_page(api: Api, page: str) -> Any:
    """A page of the user documentation (README.md, docs/*.md) or one of its pictures."""
    tree = DocsTree.find(api.settings.readme_path)
    if tree is None:
        body = Markup("<h1>soundwatch</h1><p>The documentation is not installed here.</p>")
        return render_template("docs.html", title="soundwatch", body=body, origin="(not found)")
    repo_path = README if page == README else f"{DOCS_DIR}/{page}"
    rendered = tree.render(repo_path)
    if rendered is not None:
        return render_template(
            "docs.html", title=rendered.title, body=rendered.body, origin=rendered.origin
        )
    asset = tree.file_for(repo_path)
    mimetype = ASSET_TYPES.get(asset.suffix.lower()) if asset is not None else None
    if asset is None or mimetype is None:
        raise ApiError(404, "not_found", f"no documentation page {page!r}: see /docs")
    return send_file(asset, mimetype=mimetype, max_age=3600)


def _openapi(api: Api) -> Response:
    return send_file(OPENAPI_PATH, mimetype="application/yaml", max_age=0)


# --- helpers ------------------------------------------------------------------


def _read_upload(api: Api) -> FileStorage:
    """The uploaded file, checked for presence, size and an audio format we read."""
    limit = api.settings.max_upload_bytes
    if request.mimetype != "multipart/form-data":
        got = request.mimetype or "no Content-Type"
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send multipart/form-data with the audio in the form field '{UPLOAD_FIELD}' "
            f"(got {got}); e.g. curl -F {UPLOAD_FIELD}=@clip.wav URL",
        )
    upload = request.files.get(UPLOAD_FIELD)
    if upload is None:
        # Field names as received; a malformed part can have none at all.
        fields = sorted({str(k) for k in (*request.files.keys(), *request.form.keys()) if k})
        got = ", ".join(repr(f) for f in fields) if fields else "no fields"
        raise ApiError(
            400,
            "missing_file",
            f"no file in the form field '{UPLOAD_FIELD}' (got {got})",
        )
    stream = cast(BinaryIO, upload.stream)
    size = stream.seek(0, 2)
    stream.seek(0)
    name = upload.filename or UPLOAD_FIELD
    if size == 0:
        raise ApiError(400, "empty_file", f"{name}: the file is empty (0 bytes)")
    if size > limit:
        raise ApiError(413, "too_large", f"{name}: {_too_large_message(limit)}")
    try:
        sf.info(stream)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        # libsndfile's own words, without the temporary file's repr around them.
        why = str(getattr(e, "error_string", "") or e).strip()
        raise ApiError(
            415,
            "not_audio",
            f"{name}: not an audio format soundwatch reads (WAV, FLAC, OGG/Vorbis, AIFF, "
            f"... anything libsndfile reads): {why}",
        ) from e
    finally:
        stream.seek(0)
    return upload


def _only_args(*names: str) -> None:
    # A misspelt parameter (?limt=5) would otherwise be ignored without a word.
    unknown = sorted(set(request.args) - set(names))
    if unknown:
        raise ApiError(
            400,
            "bad_request",
            f"unknown query parameter(s) {', '.join(map(repr, unknown))}; "
            f"this route takes {', '.join(names)}",
        )


@overload
def _int_arg(name: str, *, default: int, low: int, high: int | None) -> int: ...
@overload
def _int_arg(name: str, *, default: None, low: int, high: int | None) -> int | None: ...
def _int_arg(name: str, *, default: int | None, low: int, high: int | None) -> int | None:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "bad_request", f"{name} must be an integer (got {raw!r})") from None
    if value < low or (high is not None and value > high):
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise ApiError(400, "bad_request", f"{name} must be {bounds} (got {value})")
    return value


def _finite_or_none(value: float) -> float | None:
    return round(value, 2) if math.isfinite(value) else None


def _json_safe(value: Any) -> Any:
    """Non-finite floats become ``null``: JSON has no Infinity, and browsers reject it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
