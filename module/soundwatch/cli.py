"""The ``soundwatch`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from soundwatch import __version__

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


def _cmd_info(args: argparse.Namespace) -> int:
    from soundwatch.bundle import BundleError, load_bundle

    try:
        bundle = load_bundle(args.bundle)
    except BundleError as e:
        print(f"soundwatch: model: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(bundle.info(), indent=2))
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

    p = sub.add_parser("info", help="describe the model bundle")
    add_bundle(p)
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
