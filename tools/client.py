#!/usr/bin/env python3
"""Post audio files to a running soundwatch module and print the verdicts as a table.

    python tools/client.py clip.wav                       # http://127.0.0.1:5000
    python tools/client.py --url http://edge-box:5000 --token "$TOKEN" clips/*.wav
    python tools/client.py --json clips/                  # one JSON object per line
    python tools/client.py -j 4 clips/                    # 4 uploads at a time

A directory stands for the audio files in it (recursively). The token comes
from --token or SOUNDWATCH_HTTP_TOKEN. Exit status: 0 when every file was
classified, 1 when any failed (unreadable, rejected by the server, server
unreachable), 2 for bad usage. Needs only the Python standard library.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import mimetypes
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_URL = "http://127.0.0.1:5000"
TOKEN_ENV = "SOUNDWATCH_HTTP_TOKEN"
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".au", ".caf", ".w64", ".mp3"}


@dataclass
class Outcome:
    """One file's answer: the server's JSON on success, an error message otherwise."""

    path: str
    status: int | None = None
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    elapsed_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def expand(paths: list[str]) -> list[Path]:
    out: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            out.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES))
        else:
            out.append(path)
    return out


def multipart(field_name: str, filename: str, data: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with one file part, and its Content-Type."""
    boundary = f"soundwatch-{uuid.uuid4().hex}"
    kind = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    safe_name = filename.replace('"', "_").replace("\r", "_").replace("\n", "_")
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="{field_name}"; filename="{safe_name}"\r\n'
        f"Content-Type: {kind}\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head + data + tail, f"multipart/form-data; boundary={boundary}"


def classify(url: str, path: Path, token: str | None, timeout_s: float) -> Outcome:
    outcome = Outcome(str(path))
    try:
        data = path.read_bytes()
    except OSError as e:
        outcome.error = f"cannot read: {e.strerror or e}"
        return outcome
    body, content_type = multipart("file", path.name, data)
    request = urllib.request.Request(url.rstrip("/") + "/inference", data=body, method="POST")
    request.add_header("Content-Type", content_type)
    request.add_header("Accept", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            outcome.status = response.status
            outcome.result = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as e:
        outcome.status = e.code
        raw = e.read().decode("utf-8", errors="replace")
        try:
            message = json.loads(raw).get("Error", raw)
        except (ValueError, AttributeError):
            message = raw.strip().splitlines()[0] if raw.strip() else e.reason
        outcome.error = f"HTTP {e.code}: {message}"
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        outcome.error = f"cannot reach {url}: {reason}"
    except ValueError as e:
        outcome.error = f"the server's answer is not JSON: {e}"
    outcome.elapsed_ms = (time.perf_counter() - started) * 1e3
    return outcome


def table(outcomes: list[Outcome]) -> str:
    """An aligned text table: one row per file."""
    header = ["file", "verdict", "label", "p", "probabilities", "ms"]
    rows: list[list[str]] = []
    for o in outcomes:
        if o.ok:
            r = o.result
            probs = r.get("Details", {}).get("Probabilities", [])
            names = r.get("Classes") or [str(i) for i in range(len(probs))]
            best = max(probs) if probs else float("nan")
            rows.append(
                [
                    o.path,
                    "ANOMALY" if r.get("Anomaly") else "ok",
                    str(r.get("Label", "?")),
                    f"{best:.3f}",
                    " ".join(f"{n}={p:.2f}" for n, p in zip(names, probs, strict=False)),
                    f"{o.elapsed_ms:.0f}",
                ]
            )
        else:
            rows.append([o.path, "ERROR", "", "", o.error or "", f"{o.elapsed_ms:.0f}"])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/client.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", metavar="FILE_OR_DIR")
    parser.add_argument("--url", default=os.environ.get("SOUNDWATCH_URL", DEFAULT_URL))
    parser.add_argument("--token", default=None, help=f"bearer token (default: ${TOKEN_ENV})")
    parser.add_argument("--json", action="store_true", help="one JSON object per file")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="uploads at a time")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV)
    files = expand(args.files)
    if not files:
        parser.error("no audio files found")

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        outcomes = list(pool.map(lambda p: classify(args.url, p, token, args.timeout), files))

    if args.json:
        for o in outcomes:
            doc = {**o.result, "File": o.path, "Status": o.status}
            if not o.ok:
                doc["Error"] = o.error
            print(json.dumps(doc))
    else:
        print(table(outcomes))
    failed = [o for o in outcomes if not o.ok]
    if failed:
        print(f"{len(failed)} of {len(outcomes)} files failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
