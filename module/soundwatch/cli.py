"""The ``soundwatch`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Before numpy loads: one pipeline thread does the numeric work, and
# OpenBLAS's per-core thread pool only costs start-up time (measured 0.38 s ->
# 0.18 s median under load) and contends with capture. A user may override it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from soundwatch import __version__

if TYPE_CHECKING:
    from soundwatch.app import Runtime
    from soundwatch.config import Config
    from soundwatch.micview import MicSnapshot

logger = logging.getLogger("soundwatch")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * verbosity
    logging.basicConfig(
        level=max(level, logging.DEBUG),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _cmd_classify(args: argparse.Namespace) -> int:
    # Imported here so `soundwatch --help` stays instant.
    from soundwatch.audio import AudioError
    from soundwatch.bundle import BundleError, load_bundle
    from soundwatch.classify import ClipClassifier
    from soundwatch.model import ModelError

    try:
        classifier = ClipClassifier(load_bundle(args.bundle), threads=args.threads)
    except (BundleError, ModelError) as e:
        print(f"soundwatch: model: {e}", file=sys.stderr)
        return EXIT_FAILED
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
            verdict = "ANOMALY" if result.anomaly else "ok"
            probs = "  ".join(
                f"{c}={p:.3f}"
                for c, p in zip(result.class_names, result.probabilities, strict=True)
            )
            print(f"{name}: {verdict}: {result.message} [{result.label}]")
            print(f"  {json.dumps(result.seed_response())}")
            print(f"  classes: {', '.join(result.class_names)}")
            print(f"  {probs}")
    return EXIT_FAILED if failures else EXIT_OK


def _cmd_selftest(args: argparse.Namespace) -> int:
    from soundwatch.selftest import main as selftest_main

    return selftest_main(args.args)


def _cmd_info(args: argparse.Namespace) -> int:
    from soundwatch.bundle import BundleError, load_bundle

    try:
        bundle = load_bundle(args.bundle)
    except BundleError as e:
        print(f"soundwatch: model: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(bundle.info(), indent=2))
    return EXIT_OK


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


def _cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Turn the run/mic shortcuts into config overrides."""
    out: dict[str, Any] = {}
    if getattr(args, "source", None):
        out["source"] = dict(args.source)
    pacing = getattr(args, "pacing", None)
    if pacing is not None:
        kind = out.get("source", {}).get("type")
        if kind not in ("file", "simulator", None):
            raise argparse.ArgumentTypeError(
                "--realtime/--fast apply to file and simulator sources"
            )
        out.setdefault("source", {})["realtime"] = pacing == "realtime"
    if getattr(args, "loop", False):
        out.setdefault("source", {})["loop"] = True
    if getattr(args, "hop", None) is not None:
        out["window.hop_s"] = args.hop
    if getattr(args, "sink", None) is not None:
        out["sinks"] = list(args.sink)
    if getattr(args, "state_dir", None):
        out["state_dir"] = str(args.state_dir)
    if getattr(args, "bundle", None):
        out["model.bundle"] = str(args.bundle)
    return out


def _load_config_or_report(
    args: argparse.Namespace, extra: dict[str, Any] | None = None
) -> Config | None:
    from soundwatch.config import ConfigError, load_config

    try:
        overrides = {**_cli_overrides(args), **(extra or {})}
        return load_config(args.config, overrides=overrides)
    except (ConfigError, argparse.ArgumentTypeError) as e:
        print(f"soundwatch: {e}", file=sys.stderr)
        return None


def _install_stop_handlers(stop: threading.Event) -> None:
    def handler(signum: int, _frame: object) -> None:
        if stop.is_set():  # a second Ctrl-C: the user really wants out
            raise KeyboardInterrupt
        logger.warning("received %s: stopping (flushing sinks)", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _build_runtime(config: Config) -> Runtime | None:
    from soundwatch.app import Runtime
    from soundwatch.bundle import BundleError
    from soundwatch.config import ConfigError
    from soundwatch.model import ModelError
    from soundwatch.sinks import SinkError
    from soundwatch.sources import SourceError

    try:
        return Runtime(config)
    except (BundleError, ModelError) as e:
        print(f"soundwatch: model: {e}", file=sys.stderr)
    except SourceError as e:
        print(f"soundwatch: source: {e}", file=sys.stderr)
    except SinkError as e:
        print(f"soundwatch: sink: {e}", file=sys.stderr)
    except ConfigError as e:
        print(f"soundwatch: {e}", file=sys.stderr)
    return None


def _start_http(args: argparse.Namespace, runtime: Runtime | None, config: Config | None) -> Any:
    """Start the HTTP API if asked (``--http HOST:PORT``); returns a handle with ``stop()``."""
    address = getattr(args, "http", None)
    if not address:
        return None
    from soundwatch.http.cli import start_http

    return start_http(address, runtime=runtime, config=config, args=args)


def _cmd_run(args: argparse.Namespace) -> int:
    config = _load_config_or_report(args)
    if config is None:
        return EXIT_USAGE
    logging.getLogger().setLevel(min(logging.getLogger().level, getattr(logging, config.log_level)))
    runtime = _build_runtime(config)
    if runtime is None:
        return EXIT_FAILED
    stop = threading.Event()
    _install_stop_handlers(stop)
    http = _start_http(args, runtime, config)
    logger.info(
        "running: source=%s hop=%.3f s model=%s sinks=%s",
        config.source.type,
        runtime.hop_s,
        runtime.bundle.model_version,
        ",".join(s.name for s in runtime.sinks),
    )
    try:
        return runtime.run(stop)
    finally:
        if http is not None:
            http.stop()


def _mic_snapshot(runtime: Runtime, config: Config) -> MicSnapshot:
    from soundwatch.micview import MicSnapshot

    h = runtime.health()["source"]
    return MicSnapshot(
        device=h["device"],
        device_rate_hz=h["device_rate_hz"],
        source_state=h["state"],
        source_healthy=h["healthy"],
        source_detail=h["detail"],
        overflows=h["overflows"],
        block_peak_dbfs=runtime.block_peak_dbfs,
        block_rms_dbfs=runtime.block_rms_dbfs,
        state=runtime.latest_state,
        events=runtime.recent_events(6),
        hop_s=runtime.hop_s,
        recording_dir=str(config.record_dir) if config.record_dir else None,
    )


def _print_plain(message: dict[str, Any]) -> None:
    """Mic mode without a terminal: one line per window or event, for logs."""
    if message["type"] == "state":
        probs = " ".join(f"{k}={v:.2f}" for k, v in message["Probabilities"].items())
        level = message["level"]
        warn = " CLIPPING" if level["clipping"] else (" SILENT" if level["silent"] else "")
        print(
            f"window {message['window_index']}: {message['class']} [{probs}] "
            f"rms {level['rms_dbfs']:.1f} dBFS peak {level['peak_dbfs']:.1f} dBFS{warn} "
            f"active={message.get('active_class')}",
            flush=True,
        )
    else:
        print(
            f"EVENT #{message['seq']} {message['type']} {message['class']}: {message['Message']}",
            flush=True,
        )


def _cmd_mic(args: argparse.Namespace) -> int:
    """Local mic test mode: live level, probabilities, decision and events."""
    from soundwatch.micview import render

    if args.source is None:
        args.source = {"type": "mic", "device": args.device}
    if not args.sink:
        args.sink = []  # the view shows events; add --sink to also keep them
    overrides_dir = {"record_dir": str(args.record)} if args.record else {}
    config = _load_config_or_report(args, extra=overrides_dir)
    if config is None:
        return EXIT_USAGE
    if config.source.type == "mic":
        _cmd_devices(argparse.Namespace(json=False))
    runtime = _build_runtime(config)
    if runtime is None:
        return EXIT_FAILED
    stop = threading.Event()
    _install_stop_handlers(stop)
    worker = threading.Thread(target=runtime.run, args=(stop,), name="pipeline", daemon=True)
    worker.start()
    tty = sys.stdout.isatty() and not args.plain
    if not tty:
        runtime.add_listener(_print_plain)
    try:
        while worker.is_alive():
            worker.join(timeout=0.2)
            if tty:
                sys.stdout.write("\x1b[H\x1b[2J" + render(_mic_snapshot(runtime, config)) + "\n")
                sys.stdout.flush()
    finally:
        stop.set()
        worker.join(timeout=15)
    if tty:
        for ev in reversed(runtime.recent_events(1000)):
            print(f"event #{ev['seq']} {ev['type']} {ev['class']} ({ev['Message']})")
    return EXIT_OK


def _cmd_validate_config(args: argparse.Namespace) -> int:
    from soundwatch.config import ConfigError, load_config

    try:
        cfg = load_config(args.file)
    except ConfigError as e:
        print(f"soundwatch: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{args.file}: ok")
    if args.show:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
    return EXIT_OK


def _cmd_devices(args: argparse.Namespace) -> int:
    from soundwatch.sources import SourceError, list_input_devices

    try:
        devices = list_input_devices()
    except SourceError as e:
        print(f"soundwatch: {e}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="soundwatch",
        description="Listens to machines and reports when they sound wrong.",
    )
    parser.add_argument("--version", action="version", version=f"soundwatch {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_bundle(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--bundle", type=Path, default=None, help="model bundle directory (default: shipped)"
        )

    p = sub.add_parser("classify", help="classify audio files (WAV, FLAC, OGG; any rate)")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--threads", type=int, default=1, help="inference threads (default 1)")
    add_bundle(p)
    p.set_defaults(func=_cmd_classify)

    p = sub.add_parser("run", help="run the module: capture, classify, publish")
    _add_run_options(p, add_bundle)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("mic", help="local mic test mode: live level, probabilities, events")
    _add_run_options(p, add_bundle)
    p.add_argument("--device", help="input device name substring or index (see `devices`)")
    p.add_argument("--record", type=Path, help="save windows that triggered events as WAV here")
    p.add_argument("--plain", action="store_true", help="line output even on a terminal")
    p.set_defaults(func=_cmd_mic)

    p = sub.add_parser("validate-config", help="check a config file; errors name key and line")
    p.add_argument("file", type=Path)
    p.add_argument("--show", action="store_true", help="print the effective config")
    p.set_defaults(func=_cmd_validate_config)

    p = sub.add_parser("devices", help="list audio input devices")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_devices)

    p = sub.add_parser("selftest", help="check the bundle, sample clips and pipeline here")
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the self-test")
    p.set_defaults(func=_cmd_selftest)

    p = sub.add_parser("info", help="describe the model bundle")
    add_bundle(p)
    p.set_defaults(func=_cmd_info)

    from soundwatch.http.cli import add_serve_parser  # light: Flask loads only in `serve`

    add_serve_parser(sub)
    return parser


def _add_run_options(p: argparse.ArgumentParser, add_bundle: Any) -> None:
    p.add_argument("--config", type=Path, default=None, help="YAML config file")
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
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--realtime", dest="pacing", action="store_const", const="realtime")
    pace.add_argument("--fast", dest="pacing", action="store_const", const="fast")
    p.add_argument("--loop", action="store_true", help="loop a file source")
    p.add_argument("--state-dir", type=Path, help="sequence counter, outbox, recordings")
    p.add_argument("--http", metavar="HOST:PORT", help="serve the HTTP API (e.g. 127.0.0.1:5000)")
    from soundwatch.http.cli import add_http_options  # light: Flask loads only when serving

    add_http_options(p, prefix="http-")
    add_bundle(p)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
