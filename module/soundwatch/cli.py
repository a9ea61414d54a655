"""The ``soundwatch`` command line: one parser, one signal handling, one set of exit codes.

Exit codes: 0 done, 1 failed (a model, source, sink, file or port that cannot
be used, a failed check), 2 usage (bad options or configuration; the
subcommand's usage is printed). Every option has one name in every
subcommand that takes it (``--http-token`` in ``run``, ``mic`` and ``serve``
alike), and ``-v`` works before or after the subcommand.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import textwrap
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Before numpy loads: one pipeline thread does the numeric work, and
# OpenBLAS's per-core thread pool only costs start-up time (measured 0.38 s ->
# 0.18 s median under load) and contends with capture. A user may override it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from soundwatch import __version__

if TYPE_CHECKING:
    from soundwatch.app import Runtime
    from soundwatch.bundle import Bundle
    from soundwatch.config import Config
    from soundwatch.events import Message
    from soundwatch.http.server import HttpServer
    from soundwatch.micview import MicSnapshot
    from soundwatch.sources import Source

logger = logging.getLogger("soundwatch")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


# Options that had another name in one subcommand: the error says the one name.
_RENAMED = {
    "--token": "--http-token",
    "--no-auth": "--http-no-auth",
    "--max-upload-mb": "--http-max-upload-mb",
    "--upload-timeout": "--http-upload-timeout",
    "--classifiers": "--http-classifiers",
}


class UsageError(Exception):
    """Bad options or configuration: the subcommand's usage and this message, exit 2."""


def _fail(message: str) -> int:
    print(f"soundwatch: {message}", file=sys.stderr)
    return EXIT_FAILED


# --- logging and signals ----------------------------------------------------------------


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * verbosity
    logging.basicConfig(
        level=max(level, logging.DEBUG),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _stop_on_signals(stop: threading.Event) -> None:
    """SIGINT and SIGTERM set ``stop`` (IoT Edge and ``docker stop`` send SIGTERM).

    A second Ctrl-C raises ``KeyboardInterrupt``: the user really wants out.
    """

    def handler(signum: int, _frame: object) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        logger.warning("received %s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


# --- parsing shortcuts ----------------------------------------------------------------------


def _parse_source(text: str) -> dict[str, Any]:
    kind, _, rest = text.partition(":")
    if kind == "mic":
        device: str | int | None = rest or None
        if rest.isdigit():
            device = int(rest)
        return {"type": "mic", "device": device}
    if kind == "file":
        if not rest:
            raise argparse.ArgumentTypeError("file source needs a path: file:PATH")
        return {"type": "file", "path": rest}
    if kind == "simulator":
        return {"type": "simulator", **({"schedule": rest} if rest else {})}
    raise argparse.ArgumentTypeError(
        f"unknown source {text!r}: use mic[:DEVICE], file:PATH or simulator[:SCHEDULE]"
    )


def _parse_sink(text: str) -> dict[str, Any]:
    """``console``, ``jsonl:PATH``, ``mqtt://[user@]host[:port]`` or ``mqtts://...``.

    MQTT passwords never go on the command line: set ``$MQTT_PASSWORD``.
    """
    kind, _, rest = text.partition(":")
    if kind == "console" and not rest:
        return {"type": "console"}
    if kind == "jsonl" and rest:
        return {"type": "jsonl", "path": rest}
    if kind in ("mqtt", "mqtts") and rest.startswith("//"):
        from urllib.parse import unquote, urlsplit

        url = urlsplit(text)
        try:
            port = url.port
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"sink {text!r}: bad port ({e})") from e
        if url.password is not None:
            raise argparse.ArgumentTypeError(
                f"sink {text!r}: do not put the password in the URL; set $MQTT_PASSWORD"
            )
        if not url.hostname or url.path not in ("", "/") or url.query or url.fragment:
            raise argparse.ArgumentTypeError(
                f"sink {text!r}: use {kind}://[user@]host[:port] (no path or query)"
            )
        sink: dict[str, Any] = {"type": "mqtt", "host": url.hostname}
        if port is not None:
            sink["port"] = port
        if url.username:
            sink["username"] = unquote(url.username)
        if kind == "mqtts":
            sink["tls"] = {"enabled": True}
        return sink
    raise argparse.ArgumentTypeError(
        f"unknown sink {text!r}: use console, jsonl:PATH, mqtt://[user@]host[:port] "
        "or mqtts://[user@]host[:port]"
    )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``run``/``mic`` shortcuts as config overrides (they win over the file)."""
    out: dict[str, Any] = {}
    if args.source:
        out["source"] = dict(args.source)
    if args.pacing is not None:
        kind = out.get("source", {}).get("type")
        if kind not in ("file", "simulator", None):
            raise UsageError("--realtime/--fast apply to file and simulator sources")
        out.setdefault("source", {})["realtime"] = args.pacing == "realtime"
    if args.loop:
        out.setdefault("source", {})["loop"] = True
    if args.hop is not None:
        out["window.hop_s"] = args.hop
    if args.sink is not None:
        out["sinks"] = list(args.sink)
    if args.ha_discovery:
        mqtt = [s for s in out.get("sinks", []) if s["type"] == "mqtt"]
        if not mqtt:
            raise UsageError(
                "--ha-discovery applies to --sink mqtt://... sinks; in a config file, set "
                "ha_discovery: {enabled: true} on the mqtt sink"
            )
        for sink in mqtt:
            sink["ha_discovery"] = {"enabled": True}
    if args.state_dir:
        out["state_dir"] = str(args.state_dir)
    if args.bundle:
        out["model.bundle"] = str(args.bundle)
    if getattr(args, "record", None):
        out["record_dir"] = str(args.record)
    return out


def _load_config(args: argparse.Namespace) -> Config:
    from soundwatch.config import ConfigError, load_config

    try:
        return load_config(args.config, overrides=_overrides(args))
    except ConfigError as e:
        raise UsageError(str(e)) from e


def _http_options(args: argparse.Namespace, *, beside_pipeline: bool) -> Any:
    """The HTTP options; beside a pipeline, a missing token moves the API to loopback."""
    from soundwatch.http.options import HttpConfigError, http_options

    try:
        return http_options(
            args.http,
            token=args.http_token,
            no_auth=args.http_no_auth,
            max_upload_mb=args.http_max_upload_mb,
            upload_timeout_s=args.http_upload_timeout,
            classifiers=args.http_classifiers,
            loopback_without_token=beside_pipeline,
            allowed_hosts=args.http_allowed_hosts,
        )
    except HttpConfigError as e:
        raise UsageError(f"--http: {e}") from e


def _build_runtime(config: Config, source: Source | None = None) -> Runtime | None:
    from soundwatch.app import Runtime, apply_log_level
    from soundwatch.bundle import BundleError
    from soundwatch.config import ConfigError
    from soundwatch.model import ModelError
    from soundwatch.sinks import SinkError
    from soundwatch.sources import SourceError

    apply_log_level(config.log_level)
    try:
        return Runtime(config, source=source)
    except (BundleError, ModelError) as e:
        _fail(f"model: {e}")
    except SourceError as e:
        _fail(f"source: {e}")
    except SinkError as e:
        _fail(f"sink: {e}")
    except ConfigError as e:
        raise UsageError(str(e)) from e
    return None


def _start_http(options: Any, bundle: Bundle, runtime: Runtime | None) -> HttpServer | None:
    """The running server, or ``None`` (said on stderr; beside a pipeline, also in health)."""
    from soundwatch.http.options import build_server
    from soundwatch.http.server import ServerError
    from soundwatch.native_log import litert_banner_to_log

    litert_banner_to_log(bundle.model_path)  # the server's classifiers may be the first
    try:
        server = build_server(options, bundle, runtime).start()
    except ServerError as e:
        _fail(f"http: {e}" + ("; the pipeline runs without it" if runtime is not None else ""))
        if runtime is not None:
            runtime.report_edge("http", {**options.describe(), "listening": None, "error": str(e)})
        return None
    if runtime is not None:
        runtime.report_edge("http", options.describe())
    return server


# --- the commands ------------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    config = _load_config(args)
    # Malformed options are refused before anything starts; a missing token or a
    # port in use never stop the pipeline (the API moves to loopback, or is left out).
    options = _http_options(args, beside_pipeline=True) if args.http else None
    runtime = _build_runtime(config)
    if runtime is None:
        return EXIT_FAILED
    stop = threading.Event()
    _stop_on_signals(stop)
    http = _start_http(options, runtime.bundle, runtime) if options is not None else None
    logger.info(
        "running: source=%s hop=%.3f s model=%s sinks=%s",
        config.source.type,
        runtime.hop_s,
        runtime.bundle.model_version,
        ",".join(s.name for s in runtime.sinks),
    )
    try:
        code = runtime.run(stop)
    finally:
        if http is not None:
            http.stop(timeout_s=0.5)  # a SIGTERM must end the process within 3 s
    # An HTTP server that could not start never stops the pipeline, and does
    # not fail its run either (health says why it is missing).
    return code


def _cmd_mic(args: argparse.Namespace) -> int:
    """Local mic test mode: live level, probabilities, decision and events."""
    import shutil

    from soundwatch.micview import event_line, render

    if args.source is None:
        device = args.device
        args.source = {
            "type": "mic",
            "device": int(device) if device and device.isdigit() else device,
        }
    if not args.sink:
        args.sink = []  # the view shows events; add --sink to also keep them
    config = _load_config(args)
    ring = None
    if config.source.type == "mic":
        if _list_devices(as_json=False) != EXIT_OK:
            return EXIT_FAILED
        problem = _missing_device(config.source.device)
        if problem:  # at the bench, say so now instead of retrying in the background
            return _fail(
                f"{problem}\n  pick one from the list above: soundwatch mic --device NAME|INDEX"
            )
        if config.record_dir is not None:
            from soundwatch.device_audio import DeviceAudioRing

            ring = DeviceAudioRing(seconds=2 * config.window.window_s + 5)
    options = _http_options(args, beside_pipeline=True) if args.http else None
    source = None
    if ring is not None:
        from soundwatch.sources import open_source

        source = open_source(config.source)
        source.raw_tap = ring.add  # type: ignore[attr-defined]  # a MicSource
    runtime = _build_runtime(config, source=source)
    if runtime is None:
        return EXIT_FAILED
    if ring is not None and runtime.recorder is not None:
        runtime.recorder.device_audio = ring
    stop = threading.Event()
    _stop_on_signals(stop)
    http = _start_http(options, runtime.bundle, runtime) if options is not None else None
    worker = threading.Thread(target=runtime.run, args=(stop,), name="pipeline", daemon=True)
    tty = sys.stdout.isatty() and not args.plain
    if not tty:
        runtime.add_listener(_print_plain)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(timeout=0.2)
            if tty:
                width = max(40, shutil.get_terminal_size().columns - 1)
                screen = render(_mic_snapshot(runtime, config), width=width)
                sys.stdout.write("\x1b[H\x1b[2J" + screen + "\n")
                sys.stdout.flush()
    finally:
        stop.set()
        worker.join(timeout=15)
        if http is not None:
            http.stop()
    if tty:
        from soundwatch.events import to_wire

        for ev in reversed(runtime.recent_events(1000)):
            print(event_line(to_wire(ev)))
    return EXIT_OK


def _missing_device(device: str | int | None) -> str | None:
    """Why ``device`` cannot be opened now (no match, several matches), or ``None``."""
    from soundwatch.sources import SourceError, list_input_devices
    from soundwatch.sources.mic import match_input_device

    try:
        devices = list_input_devices()
        if device is None:
            return None if any(d["is_default"] for d in devices) else "no default input device"
        match_input_device(device, devices)
    except SourceError as e:
        return str(e)
    return None


def _mic_snapshot(runtime: Runtime, config: Config) -> MicSnapshot:
    from soundwatch.events import to_wire
    from soundwatch.micview import MicSnapshot

    h = runtime.health()["source"]
    state = runtime.latest_state
    return MicSnapshot(
        device=h["device"],
        device_rate_hz=h["device_rate_hz"],
        source_state=h["state"],
        source_healthy=h["healthy"],
        source_detail=h["detail"],
        overflows=h["overflows"],
        block_peak_dbfs=runtime.block_peak_dbfs,
        block_rms_dbfs=runtime.block_rms_dbfs,
        state=to_wire(state) if state is not None else None,
        events=[to_wire(e) for e in runtime.recent_events(6)],
        hop_s=runtime.hop_s,
        recording_dir=str(config.record_dir) if config.record_dir else None,
        train_rate_hz=runtime.bundle.spec.train_rate_hz or runtime.bundle.spec.sample_rate_hz,
    )


def _print_plain(message: Message) -> None:
    """Mic mode without a terminal: one line per window or event, for logs."""
    from soundwatch.events import State

    if isinstance(message, State):
        probs = " ".join(f"{k}={v:.2f}" for k, v in message.probabilities.items())
        level = message.level
        warn = " CLIPPING" if level.clipping else (" SILENT" if level.silent else "")
        from soundwatch.events import to_wire
        from soundwatch.micview import baseline_line

        baseline = baseline_line(to_wire(message))
        print(
            f"window {message.window_index}: {message.class_name} [{probs}] "
            f"rms {max(level.rms_dbfs, -200.0):.1f} dBFS peak {max(level.peak_dbfs, -200.0):.1f} "
            f"dBFS{warn} active={message.active_class}" + (f"; {baseline}" if baseline else ""),
            flush=True,
        )
    else:
        from soundwatch.events import to_wire
        from soundwatch.micview import event_line

        print(event_line(to_wire(message)), flush=True)


def _cmd_serve(args: argparse.Namespace) -> int:
    from soundwatch.bundle import BundleError, load_bundle
    from soundwatch.model import ModelError

    options = _http_options(args, beside_pipeline=False)
    logging.getLogger("soundwatch").setLevel(
        min(logging.getLogger("soundwatch").getEffectiveLevel(), logging.INFO)
    )
    try:
        bundle = load_bundle(args.bundle)
        server = _start_http(options, bundle, None)
    except (BundleError, ModelError) as e:
        return _fail(f"model: {e}")
    if server is None:
        return EXIT_FAILED
    stop = threading.Event()
    _stop_on_signals(stop)
    logger.info(
        "serving %s with no audio source: %s (auth: %s)",
        bundle.model_version,
        server.url,
        "bearer token" if options.token else "none",
    )
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
    return EXIT_OK


def _cmd_classify(args: argparse.Namespace) -> int:
    # Imported here so `soundwatch --help` stays instant.
    from soundwatch.audio import AudioError
    from soundwatch.bundle import BundleError, load_bundle
    from soundwatch.classify import ClipClassifier
    from soundwatch.model import ModelError
    from soundwatch.native_log import litert_banner_to_log

    try:
        bundle = load_bundle(args.bundle)
        litert_banner_to_log(bundle.model_path)
    except (BundleError, ModelError) as e:
        return _fail(f"model: {e}")
    baseline = None
    if args.baseline is not None:
        from soundwatch.baseline import Baseline, BaselineError

        try:
            baseline = Baseline.load(args.baseline, bundle.model_version)
        except BaselineError as e:
            return _fail(f"baseline: {e}")
    try:
        classifier = ClipClassifier(bundle, threads=args.threads, baseline=baseline)
    except (BundleError, ModelError) as e:
        return _fail(f"model: {e}")
    failures = 0
    for name in args.files:
        try:
            result = classifier.classify_source(Path(name))
        except (AudioError, OSError, ValueError) as e:
            failures += 1
            if args.json:
                print(json.dumps({"File": name, "Error": str(e)}), flush=True)
            print(f"soundwatch: {name}: {e}", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps({"File": name, **result.to_json()}), flush=True)
        else:
            verdict = (
                "ANOMALY" if result.anomaly else "no verdict" if result.label == "unknown" else "ok"
            )
            probs = "  ".join(
                f"{c}={p:.3f}"
                for c, p in zip(result.class_names, result.probabilities, strict=True)
            )
            print(f"{name}: {verdict}: {result.message} [{result.label}]")
            print(f"  {json.dumps(result.reference_response())}")
            print(f"  {probs}")
            if baseline is not None:
                print(f"  {_novelty_line(result.to_json().get('Novelty'))}")
            for warning in result.warnings:
                print(f"  warning: {warning}")
    return EXIT_FAILED if failures else EXIT_OK


def _novelty_line(novelty: dict[str, Any] | None) -> str:
    if novelty is None:
        return "novelty: no verdict (too little usable audio)"
    verdict = (
        "DIFFERS from this unit's normal" if novelty["anomalous"] else "like this unit's normal"
    )
    return f"novelty {novelty['score']:.4g} (threshold {novelty['threshold']:.4g}): {verdict}"


# --- soundwatch baseline ... ----------------------------------------------------------------------


def _cmd_baseline_learn(args: argparse.Namespace) -> int:
    from soundwatch.baseline import BaselineError
    from soundwatch.bundle import BundleError, load_bundle
    from soundwatch.unit_baseline import learn_from_clips

    try:
        bundle = load_bundle(args.bundle)
    except BundleError as e:
        return _fail(f"model: {e}")
    paths = [Path(p) for p in args.clips]
    try:
        baseline, report = learn_from_clips(
            paths, bundle, hop_s=args.hop, false_alarm_rate=args.false_alarm_rate
        )
    except BaselineError as e:
        return _fail(str(e))
    failed = [r for r in report if r.error is not None]
    for r in failed:
        print(f"soundwatch: {r.path}: {r.error}", file=sys.stderr)
    try:
        baseline.save(args.out)
    except OSError as e:
        return _fail(f"cannot write {args.out}: {e}")
    windows = sum(r.windows for r in report)
    skipped = sum(r.skipped for r in report)
    print(
        f"{args.out}: baseline {baseline.baseline_id} for {bundle.model_version} from "
        f"{windows} windows of {len(report) - len(failed)} clips"
        + (f" ({skipped} windows skipped: too little usable audio)" if skipped else "")
        + f"; novelty threshold {baseline.threshold:.4g} "
        f"(false-alarm rate {baseline.false_alarm_rate:g} per window)"
    )
    return EXIT_FAILED if failed else EXIT_OK


def _cmd_baseline_show(args: argparse.Namespace) -> int:
    from soundwatch.baseline import BaselineError, peek
    from soundwatch.stream_types import clock

    try:
        doc = peek(args.file)
    except BaselineError as e:
        return _fail(str(e))
    if args.json:
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    from datetime import datetime

    created = doc.get("created_at")
    when = (
        datetime.fromtimestamp(created).isoformat(timespec="seconds")
        if isinstance(created, int | float)
        else "?"
    )
    print(
        f"baseline {doc.get('baseline_id')}  ({args.file}, {doc.get('bytes', 0) / 1024:.0f} KiB)\n"
        f"model: {doc.get('model_version')} (physics features version "
        f"{doc.get('physics_version')})\n"
        f"learned from {doc.get('windows')} windows, {clock(float(doc.get('learned_s', 0)))} "
        f"of audio ({doc.get('kept')} kept); created {when}\n"
        f"novelty threshold {doc.get('threshold')} at a false-alarm rate of "
        f"{doc.get('false_alarm_rate')} per window\n"
        f"groups: {', '.join(f'{n} ({k})' for n, k in doc.get('layout', []))}"
    )
    return EXIT_OK


def _cmd_baseline_relearn(args: argparse.Namespace) -> int:
    return _send_command(args, "relearnBaseline", None)


def _cmd_baseline_false_alarm(args: argparse.Namespace) -> int:
    return _send_command(args, "markFalseAlarm", {"seq": args.seq})


def _send_command(args: argparse.Namespace, name: str, body: Any) -> int:
    """A command to a running module over its HTTP API (``POST /commands/<name>``)."""
    import urllib.error
    import urllib.request

    base = args.http if "://" in args.http else f"http://{args.http}"
    url = f"{base.rstrip('/')}/commands/{name}"
    data = json.dumps(body).encode() if body is not None else b""
    request = urllib.request.Request(url, data=data, method="POST")
    request.add_header("Content-Type", "application/json")
    token = _command_token(args)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            answer = json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            answer = json.loads(e.read() or b"{}")
        except ValueError:
            answer = {}
        problems = answer.get("errors") or [
            {"key": "(http)", "message": answer.get("Error") or f"HTTP {e.code}"}
        ]
        for p in problems:
            print(
                f"soundwatch: {name} refused: {p.get('key')}: {p.get('message')}", file=sys.stderr
            )
        return EXIT_FAILED
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        return _fail(f"cannot reach the module at {base}: {reason}")
    print(json.dumps(answer.get("data", answer), indent=2))
    return EXIT_OK


def _command_token(args: argparse.Namespace) -> str | None:
    """The token for a module's commands: ``--http-token``, the environment, or else the
    one a module started without a token wrote to its state directory (if readable here)."""
    from soundwatch.http.options import COMMAND_TOKEN_FILE, TOKEN_ENV

    if args.http_token is not None:
        return str(args.http_token)
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    try:
        return (args.state_dir / COMMAND_TOKEN_FILE).read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _cmd_validate_config(args: argparse.Namespace) -> int:
    from soundwatch.config import ConfigError, load_config

    try:
        cfg = load_config(args.file)
    except ConfigError as e:
        return _fail(str(e))
    print(f"{args.file}: ok")
    if args.show:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    return EXIT_OK


def _cmd_devices(args: argparse.Namespace) -> int:
    return _list_devices(as_json=args.json)


def _list_devices(*, as_json: bool) -> int:
    from soundwatch.sources import SourceError, list_input_devices

    try:
        devices = list_input_devices()
    except SourceError as e:
        return _fail(str(e))
    if as_json:
        print(json.dumps(devices, indent=2))
        return EXIT_OK
    if not devices:
        print("no input devices found (is the microphone plugged in? is /dev/snd mapped?)")
        return EXIT_FAILED
    print(f"{'idx':>3}  {'name':<40} {'ch':>3} {'default rate':>12}  host API")
    for d in devices:
        mark = "*" if d["is_default"] else " "
        print(
            f"{d['index']:>3}{mark} {d['name']:<40} {d['max_input_channels']:>3} "
            f"{d['default_samplerate']:>12.0f}  {d['hostapi']}"
        )
    print("(* = default)  use: soundwatch run --source mic:NAME  or  soundwatch mic --device NAME")
    return EXIT_OK


def _cmd_info(args: argparse.Namespace) -> int:
    from soundwatch.bundle import BundleError, load_bundle

    try:
        bundle = load_bundle(args.bundle)
    except BundleError as e:
        return _fail(f"model: {e}")
    info = bundle.info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(info_summary(info, bundle.path))
    return EXIT_OK


def info_summary(info: dict[str, Any], path: Path) -> str:
    """A few lines a person reads: what the model tells apart and how well."""
    spec = info.get("feature_spec", {})
    thresholds = info.get("thresholds", {})
    lines = [
        f"model {info.get('name')}@{info.get('version')}  ({path})",
        f"classes: {', '.join(info.get('classes', []))}",
        f"input: {info.get('input_dtype')} {'x'.join(str(d) for d in info.get('input_shape', []))}"
        f"; {spec.get('n_mfcc')} MFCCs x {spec.get('n_frames')} frames at "
        f"{spec.get('sample_rate_hz')} Hz (trained at {spec.get('train_rate_hz')} Hz)",
        "thresholds (on): "
        + (", ".join(f"{c} {v:g}" for c, v in thresholds.items()) or "none (0.7 each)"),
    ]
    metrics = info.get("metrics", {})
    int8 = metrics.get("int8") if isinstance(metrics, dict) else None
    if isinstance(int8, dict) and "accuracy" in int8:
        per_snr = int8.get("per_snr", {})
        snrs = ", ".join(f"{k} {v:.3f}" for k, v in per_snr.items())
        lines.append(
            f"held-out unit {metrics.get('held_out_unit', '?')}: accuracy {int8['accuracy']:.3f}"
            + (f" ({snrs})" if snrs else "")
        )
    provenance = info.get("provenance", {})
    if isinstance(provenance, dict) and provenance.get("date"):
        lines.append(f"trained {provenance['date']}")
    lines.append("full document: soundwatch info --json")
    return "\n".join(lines)


def _cmd_selftest(args: argparse.Namespace) -> int:
    from soundwatch.selftest import collect, summarise

    results = collect(bundle_dir=args.bundle, samples_dir=args.samples, stream=not args.no_stream)
    code = summarise(results, strict=args.strict)
    if args.json:
        doc = {"ok": code == 0, "strict": args.strict, "steps": [r.to_json() for r in results]}
        print(json.dumps(doc, indent=1))
        return code
    for r in results:
        print(f"selftest {r.name}: {r.status.upper()} ({r.seconds:.1f} s): {r.detail}")
    print(f"selftest: {'ok' if code == 0 else 'FAILED'}")
    return code


# --- the parser ---------------------------------------------------------------------------------


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks and appends each option's default when it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" not in text
            and action.option_strings
            and default not in (None, False, argparse.SUPPRESS)
            and not isinstance(default, list)
        ):
            text += " (default: %(default)s)"
        return text


def _subcommand(
    sub: Any,
    name: str,
    *,
    summary: str,
    description: str,
    examples: Sequence[str],
    func: Callable[[argparse.Namespace], int],
    parents: Sequence[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    epilog = "examples:\n" + "\n".join(f"  {e}" for e in examples)
    p: argparse.ArgumentParser = sub.add_parser(
        name,
        help=summary,
        description=textwrap.fill(description, 79),
        epilog=epilog,
        formatter_class=_Formatter,
        parents=list(parents),
    )
    p.set_defaults(func=func)
    return p


def _add_bundle(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bundle",
        type=Path,
        default=None,
        help="model bundle directory (default: the shipped one)",
    )


def _add_http(p: argparse.ArgumentParser, *, default_address: str | None) -> None:
    from soundwatch.http.options import ALLOWED_HOSTS_ENV, AUTH_ENV, DEFAULT_ADDRESS, TOKEN_ENV

    g = p.add_argument_group("HTTP API")
    g.add_argument(
        "--http",
        metavar="HOST:PORT",
        default=default_address,
        help="serve the HTTP API here (port 0: any free port"
        + (")" if default_address else f"; e.g. {DEFAULT_ADDRESS})"),
    )
    auth = g.add_mutually_exclusive_group()
    auth.add_argument(
        "--http-token",
        metavar="TOKEN",
        help=f"require 'Authorization: Bearer TOKEN' (default: ${TOKEN_ENV})",
    )
    auth.add_argument(
        "--http-no-auth",
        action="store_true",
        help=f"serve without a token even on a non-loopback address (or {AUTH_ENV}=none)",
    )
    g.add_argument(
        "--http-max-upload-mb",
        type=float,
        metavar="MIB",
        help="largest accepted upload in MiB (default: 32)",
    )
    g.add_argument(
        "--http-upload-timeout",
        type=float,
        metavar="S",
        help="close a connection that sends nothing for S seconds (default: 30)",
    )
    g.add_argument(
        "--http-classifiers",
        type=int,
        metavar="N",
        help="uploads classified at once (default: min(2, CPUs))",
    )
    g.add_argument(
        "--http-allowed-hosts",
        metavar="NAMES",
        help="host names the API answers to besides IP addresses, localhost and this "
        f"machine's name, comma-separated; * for any (default: ${ALLOWED_HOSTS_ENV})",
    )


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="YAML config file (default: none)")
    p.add_argument(
        "--source",
        type=_parse_source,
        help="mic[:DEVICE] | file:PATH | simulator[:SCHEDULE] (overrides the config)",
    )
    p.add_argument("--hop", type=float, help="hop in seconds (whole STFT frames; 1 -> 0.998)")
    p.add_argument(
        "--sink",
        type=_parse_sink,
        action="append",
        help="console | jsonl:PATH | mqtt[s]://[user@]host[:port] (repeatable)",
    )
    p.add_argument(
        "--ha-discovery",
        action="store_true",
        help="announce the --sink mqtt://... sinks to Home Assistant (MQTT discovery)",
    )
    pace = p.add_mutually_exclusive_group()
    pace.add_argument(
        "--realtime",
        dest="pacing",
        action="store_const",
        const="realtime",
        help="pace a file or simulator at real time",
    )
    pace.add_argument(
        "--fast",
        dest="pacing",
        action="store_const",
        const="fast",
        help="read a file or simulator as fast as possible",
    )
    p.add_argument("--loop", action="store_true", help="loop a file source")
    p.add_argument("--state-dir", type=Path, help="sequence counter, outbox, recordings")
    _add_bundle(p)
    _add_http(p, default_address=None)


def _add_baseline_commands(
    sub: Any, subs: dict[str, argparse.ArgumentParser], parents: Sequence[argparse.ArgumentParser]
) -> None:
    """``soundwatch baseline learn|show|relearn|false-alarm``."""
    top = subs["baseline"] = sub.add_parser(
        "baseline",
        help="a unit's baseline: learn one from recordings, show one, relearn, false alarms",
        description=textwrap.fill(
            "The per-unit baseline: each machine's own normal sound, which the module learns "
            "first and then alarms on departures from. Learn one offline from recordings, "
            "show a baseline file, or tell a running module to relearn or that an event was "
            "a false alarm.",
            79,
        ),
        epilog="examples:\n  soundwatch baseline learn --out unit7.npz normal/*.wav\n"
        "  soundwatch baseline relearn --http 127.0.0.1:5000",
        formatter_class=_Formatter,
        parents=list(parents),
    )
    nested = top.add_subparsers(dest="baseline_command", required=True, metavar="ACTION")
    p = _subcommand(
        nested,
        "learn",
        summary="learn a baseline from recordings of one unit's normal sound",
        description="Learn a unit's baseline from recordings of its normal sound. Each clip is "
        "analysed as `soundwatch classify` does; a clip longer than a window gives a window "
        "every --hop seconds. Use it with `soundwatch classify --baseline`.",
        examples=[
            "soundwatch baseline learn --out unit7.npz fan/id_07/normal/*.wav",
            "soundwatch baseline learn --out day.npz --hop 2 long-recording.flac",
        ],
        func=_cmd_baseline_learn,
        parents=parents,
    )
    p.add_argument("clips", nargs="+", metavar="CLIP")
    p.add_argument("--out", type=Path, required=True, help="where to write the baseline")
    p.add_argument("--hop", type=float, default=10.0, help="seconds between windows of a long clip")
    p.add_argument(
        "--false-alarm-rate",
        type=float,
        default=0.01,
        help="share of normal windows above the threshold",
    )
    _add_bundle(p)
    p = _subcommand(
        nested,
        "show",
        summary="describe a baseline file",
        description="What a baseline file holds: its id, the model it belongs to, how much "
        "audio it was learned from, its novelty threshold and false-alarm rate.",
        examples=["soundwatch baseline show state/baseline.npz --json"],
        func=_cmd_baseline_show,
        parents=parents,
    )
    p.add_argument("file", type=Path)
    p.add_argument("--json", action="store_true", help="the whole description as JSON")
    for name, summary, description, func in (
        (
            "relearn",
            "tell a running module to learn this unit's baseline again",
            "Drop the running module's baseline and learn the unit's normal sound again "
            "(after maintenance, a move or a changed room); the classifier alone decides, "
            "strictly, until it is learned. Sent over the module's HTTP API.",
            _cmd_baseline_relearn,
        ),
        (
            "false-alarm",
            "tell a running module that an event was a false alarm",
            "Mark an anomaly event of a running module as a false alarm: its windows join the "
            "unit's baseline, whose threshold is recomputed. Sent over the module's HTTP API.",
            _cmd_baseline_false_alarm,
        ),
    ):
        example = "soundwatch baseline " + name + (" --seq 17" if name == "false-alarm" else "")
        p = _subcommand(
            nested,
            name,
            summary=summary,
            description=description,
            examples=[example, example + " --http http://edge-box:5000 --http-token $TOKEN"],
            func=func,
            parents=parents,
        )
        if name == "false-alarm":
            p.add_argument("--seq", type=int, required=True, help="the event's seq")
        _add_module_url(p)


def _add_module_url(p: argparse.ArgumentParser) -> None:
    from soundwatch.http.options import COMMAND_TOKEN_FILE, DEFAULT_ADDRESS, TOKEN_ENV

    p.add_argument(
        "--http",
        metavar="URL",
        default=f"http://{DEFAULT_ADDRESS}",
        help="the running module's HTTP API",
    )
    p.add_argument(
        "--http-token",
        metavar="TOKEN",
        help=f"its bearer token (default: ${TOKEN_ENV}, else the token the module wrote to "
        f"--state-dir when it has none)",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=Path("state"),
        help=f"the module's state directory, for its {COMMAND_TOKEN_FILE} (default: ./state)",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the answer")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser, and each subcommand's own (for errors with its usage)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="more log output (-vv: debug)",
    )
    parser = argparse.ArgumentParser(
        prog="soundwatch",
        description="Listens to machines and reports when they sound wrong.",
        epilog="Each command has --help with examples, e.g. soundwatch run --help.",
    )
    parser.add_argument("--version", action="version", version=f"soundwatch {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parents = [common]
    subs: dict[str, argparse.ArgumentParser] = {}

    p = subs["run"] = _subcommand(
        sub,
        "run",
        summary="run the module: capture, classify, publish",
        description="Run the module: read audio from the configured source, classify every "
        "window, decide on anomalies and publish events to the sinks. SIGTERM/SIGINT stop it "
        "and flush the sinks; at the end of a file it exits 0.",
        examples=[
            "soundwatch run --config config/demo.yaml",
            "soundwatch run --source file:fan.wav --fast --sink jsonl:events.jsonl",
            "soundwatch run --sink mqtt://broker.local --http 0.0.0.0:5000 --http-token $TOKEN",
            "soundwatch run --source mic:USB --sink mqtt://homeassistant.local --ha-discovery",
        ],
        func=_cmd_run,
        parents=parents,
    )
    _add_run_options(p)

    p = subs["mic"] = _subcommand(
        sub,
        "mic",
        summary="local mic test mode: live level, probabilities, events",
        description="Bench test of a microphone: lists the devices, then shows the level, the "
        "class probabilities, the decision and recent events live (one line per window "
        "without a terminal). Events go to the view only unless --sink is given.",
        examples=["soundwatch mic --device USB", "soundwatch mic --device 2 --record ./rec"],
        func=_cmd_mic,
        parents=parents,
    )
    _add_run_options(p)
    p.add_argument("--device", help="input device name substring or index (see `devices`)")
    p.add_argument("--record", type=Path, help="save windows that triggered events as WAV here")
    p.add_argument("--plain", action="store_true", help="line output even on a terminal")

    p = subs["serve"] = _subcommand(
        sub,
        "serve",
        summary="serve the HTTP API with the model only, as the reference service did",
        description="Serve POST /inference, /info, /health, the web page and /metrics with the "
        "model bundle, without capturing audio.",
        examples=[
            "soundwatch serve",
            "SOUNDWATCH_HTTP_TOKEN=... soundwatch serve --http 0.0.0.0:5000",
        ],
        func=_cmd_serve,
        parents=parents,
    )
    from soundwatch.http.options import DEFAULT_ADDRESS  # light: no Flask

    _add_bundle(p)
    _add_http(p, default_address=DEFAULT_ADDRESS)

    p = subs["classify"] = _subcommand(
        sub,
        "classify",
        summary="classify audio files (WAV, FLAC, OGG; any rate)",
        description="The reference service's whole-clip verdict for each file (its first 10 s; "
        "a shorter clip is repeated to fill the window): its JSON, plus the class names "
        "(the model's and 'unknown'), the label and warnings. Bad files get an error that "
        "names the cause and the others are still classified; the exit code is 1 if any failed.",
        examples=["soundwatch classify fan.wav", "soundwatch classify --json clips/*.flac"],
        func=_cmd_classify,
        parents=parents,
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--threads", type=int, default=1, help="inference threads")
    p.add_argument(
        "--baseline",
        type=Path,
        metavar="FILE",
        help="a unit's baseline (soundwatch baseline learn): also say how far each clip "
        "departs from that unit's normal (Novelty)",
    )
    _add_bundle(p)

    _add_baseline_commands(sub, subs, parents)

    p = subs["validate-config"] = _subcommand(
        sub,
        "validate-config",
        summary="check a config file; errors name key and line",
        description="Validate a config file against the schema (config/default.yaml documents "
        "every key). Errors name the key path and the line; the exit code is 1 if any.",
        examples=["soundwatch validate-config config/demo.yaml --show"],
        func=_cmd_validate_config,
        parents=parents,
    )
    p.add_argument("file", type=Path)
    p.add_argument("--show", action="store_true", help="print the effective config")

    p = subs["devices"] = _subcommand(
        sub,
        "devices",
        summary="list audio input devices",
        description="The audio input devices PortAudio sees, with their channels and default "
        "rate; the default device is marked with *.",
        examples=["soundwatch devices", "soundwatch devices --json"],
        func=_cmd_devices,
        parents=parents,
    )
    p.add_argument("--json", action="store_true", help="the full list as JSON")

    p = subs["selftest"] = _subcommand(
        sub,
        "selftest",
        summary="check the bundle, sample clips and pipeline here",
        description="Load the model bundle, classify the shipped sample clips against the "
        "reference results and stream a simulated recording through the pipeline (in a "
        "temporary state directory, with no deployment sinks). Exit 1 if a step failed "
        "(or, with --strict, was skipped).",
        examples=["soundwatch selftest", "soundwatch selftest --no-stream --strict --json"],
        func=_cmd_selftest,
        parents=parents,
    )
    from soundwatch.selftest import SAMPLES_DIR  # light: imports only what it needs later

    _add_bundle(p)
    p.add_argument("--samples", type=Path, default=SAMPLES_DIR, help="sample clips directory")
    p.add_argument("--no-stream", action="store_true", help="skip the pipeline step")
    p.add_argument("--strict", action="store_true", help="a skipped step fails the test")
    p.add_argument("--json", action="store_true", help="the results as one JSON document")

    p = subs["info"] = _subcommand(
        sub,
        "info",
        summary="describe the model bundle",
        description="A short summary of the model bundle: classes, input, thresholds and the "
        "held-out accuracy. --json prints the full document (feature spec, provenance, "
        "every metric).",
        examples=["soundwatch info", "soundwatch info --json --bundle ./my-bundle"],
        func=_cmd_info,
        parents=parents,
    )
    _add_bundle(p)
    p.add_argument("--json", action="store_true", help="the full bundle description as JSON")
    return parser, subs


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (argparse exits 2 itself on bad options)."""
    parser, subs = build_parser()
    args, extra = parser.parse_known_args(argv)
    command = subs[args.command]
    if extra:
        hints = [f"{old} is now {new}" for old, new in _RENAMED.items() if old in extra]
        command.error(
            f"unrecognized arguments: {' '.join(extra)}" + "".join(f"; {h}" for h in hints)
        )
    _setup_logging(args.verbose)
    try:
        code: int = args.func(args)
    except UsageError as e:
        command.print_usage(sys.stderr)
        print(f"soundwatch {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    return code


if __name__ == "__main__":
    sys.exit(main())
