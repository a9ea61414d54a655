#!/usr/bin/env python3
"""Generate and check ``requirements/runtime.lock``, the container's runtime set.

The lock pins every package the image installs, for CPython 3.11 on glibc
Linux (Debian bookworm, glibc 2.36) on both x86_64 (amd64) and aarch64
(arm64v8). Both Dockerfiles install from it, and ``tools/arm64-check``
installs from it too.

    python tools/lock.py            # resolve and rewrite the lock
    python tools/lock.py --check    # the lock is current and every pin resolves
                                    # to a wheel for both platforms (downloads)

Only pip is used. Resolution runs ``pip install --dry-run --report`` once per
platform with ``--only-binary=:all:``, so a version without a wheel for either
platform can never be chosen. The lock carries, per package, the sha256 of the
file each platform installs (one hash when both use the same file).

One exception to "wheels only" is allowed, by name, in :data:`SDIST_ALLOWED`:
a pure-Python package whose needed version was never published as a wheel.
The lock says so with ``--no-binary NAME``; the builder stage of the image
turns it into a ``py3-none-any`` wheel, which needs no compiler, and the
check here builds it to prove that.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

ROOT = Path(__file__).resolve().parent.parent
LOCK_PATH = ROOT / "requirements" / "runtime.lock"
PYPROJECT = ROOT / "pyproject.toml"

PYTHON_VERSION = "3.11"
# Debian bookworm (the python:3.11-slim-bookworm base) has glibc 2.36.
GLIBC_MINOR_MAX = 36
ARCHES = ("x86_64", "aarch64")
DOCKER_PLATFORM = {"x86_64": "amd64", "aarch64": "arm64v8"}

# The pyproject extras that the container image includes.
IMAGE_EXTRAS = ("iotedge",)

# Runtime packages that later issues add to pyproject; locked now so that the
# image's runtime set is complete. They are merged with pyproject's own
# requirements (both specifiers apply), so moving one into pyproject changes
# nothing here.
EXTRA_RUNTIME: tuple[str, ...] = (
    "paho-mqtt>=1.6.1,<2",  # azure-iot-device 2.14 requires paho-mqtt<2
    "azure-iot-device>=2.14",
    "flask>=3.0",
    "waitress>=3.0",
    "prometheus-client>=0.20",
)

# Deliberate pins, each with its reason. These win over the newest release.
PINS: dict[str, tuple[str, str]] = {
    "ai-edge-litert": (
        "==1.4.0",
        "loads and classifies under qemu-aarch64 7.2 in every configuration tried; so does "
        "2.0.3, but it installs 290 MB; 2.2+ crash there unless /proc/cpuinfo is an Arm "
        "one, 2.1+ go wrong on qemu's SME (requirements/README.md)",
    ),
}

# Pure-Python packages allowed as sdists, with the reason.
SDIST_ALLOWED: dict[str, str] = {
    "paho-mqtt": "1.6.1, the last 1.x release, was published as an sdist only",
}

# How an allowed sdist is built: in an isolated build environment (PEP 517),
# whatever the venv has. Debian's python3-venv brings pip 23.0.1 and no
# `wheel`, with which pip would run `setup.py bdist_wheel` in the venv itself
# and fail ("invalid command 'bdist_wheel'").
SDIST_BUILD_ARGS = ("--quiet", "--no-deps", "--use-pep517")

_FILE_RE = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-(?P<tags>.+)\.whl$")


@dataclass(frozen=True)
class Pin:
    """One locked package: name, version and the accepted sha256 hashes."""

    name: str
    version: str
    hashes: tuple[str, ...]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def platform_tags(arch: str) -> list[str]:
    """The manylinux tags a CPython 3.11 on bookworm accepts for ``arch``."""
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(GLIBC_MINOR_MAX, 16, -1)]
    return [*tags, f"manylinux2014_{arch}"]


def pip_platform_args(arch: str) -> list[str]:
    args = []
    for tag in platform_tags(arch):
        args += ["--platform", tag]
    return [
        *args,
        "--python-version",
        PYTHON_VERSION,
        "--implementation",
        "cp",
        "--abi",
        "cp" + PYTHON_VERSION.replace(".", ""),
    ]


def wheel_fits(filename: str, arch: str) -> bool:
    """Whether a wheel file installs on CPython 3.11 / bookworm / ``arch``."""
    m = _FILE_RE.match(filename)
    if not m:
        return False
    pythons, abis, plats = (part.split(".") for part in m["tags"].split("-")[-3:])
    py_ok = any(p in ("py3", "py311", "cp311") for p in pythons)
    abi_ok = any(a in ("none", "abi3", "cp311") for a in abis)
    plat_ok = any(p == "any" or p in platform_tags(arch) for p in plats)
    return py_ok and abi_ok and plat_ok


# --- inputs ---------------------------------------------------------------------


def runtime_requirements(pyproject: Path = PYPROJECT) -> list[str]:
    """The top-level runtime requirements: pyproject's, the image extras, EXTRA_RUNTIME, PINS."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    reqs = list(project.get("dependencies", []))
    for extra in IMAGE_EXTRAS:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    reqs += EXTRA_RUNTIME
    reqs += [f"{name}{spec}" for name, (spec, _why) in PINS.items()]
    return reqs


def inputs_digest(requirements: Iterable[str]) -> str:
    """A short digest of the inputs, recorded in the lock to detect a stale lock."""
    text = "\n".join(sorted({r.replace(" ", "") for r in requirements}))
    text += f"\npython={PYTHON_VERSION} glibc<=2.{GLIBC_MINOR_MAX} arches={','.join(ARCHES)}"
    text += "\nsdist:" + ",".join(sorted(SDIST_ALLOWED))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- reading the lock ---------------------------------------------------------------


def read_lock(path: Path = LOCK_PATH) -> tuple[dict[str, Pin], list[str], str | None]:
    """Parse the lock: pins by canonical name, option lines, recorded inputs digest."""
    pins: dict[str, Pin] = {}
    options: list[str] = []
    digest = None
    logical: list[str] = []
    buf = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if stripped.startswith("# inputs-digest:"):
            digest = stripped.split(":", 1)[1].strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        logical.append(buf + stripped)
        buf = ""
    for line in logical:
        if line.startswith("--"):
            options.append(line)
            continue
        parts = line.split()
        name, _, version = parts[0].partition("==")
        hashes = tuple(p.split("sha256:", 1)[1] for p in parts[1:] if p.startswith("--hash="))
        pins[canonical(name)] = Pin(name, version, hashes)
    return pins, options, digest


# --- resolving ----------------------------------------------------------------------


def _pip(args: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    return subprocess.run(cmd, check=True, text=True, **kw)  # type: ignore[call-overload,no-any-return]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_allowed_sdists(requirements: list[str], out: Path) -> dict[str, tuple[str, str]]:
    """Download each allowed sdist, build it into ``out``; returns name -> (version, sdist sha)."""
    built: dict[str, tuple[str, str]] = {}
    sdists = out / "sdists"
    for name in SDIST_ALLOWED:
        specs = [r for r in requirements if canonical(re.split(r"[<>=!~;\[ ]", r)[0]) == name]
        if not specs:
            continue
        sdists.mkdir(parents=True, exist_ok=True)
        _pip(
            ["download", "--quiet", "--no-deps", "--no-binary", ":all:", "-d", str(sdists), *specs]
        )
        (sdist,) = [p for p in sdists.iterdir() if canonical(p.name).startswith(name + "-")]
        version = sdist.name[len(name) + 1 :].removesuffix(".tar.gz").removesuffix(".zip")
        _pip(["wheel", *SDIST_BUILD_ARGS, "-w", str(out), str(sdist)])
        wheel = next(p for p in out.glob("*.whl") if canonical(p.name).startswith(name + "-"))
        if not wheel.name.endswith("-none-any.whl"):
            raise SystemExit(f"lock: {name} built into {wheel.name}, which is not pure Python")
        built[name] = (version, _sha256(sdist))
    return built


# One "install" item of pip's --report JSON (name, version, download URL, hashes...).
ReportItem = dict[str, Any]


def resolve(
    arch: str, requirements: list[str], find_links: Path, work: Path
) -> dict[str, ReportItem]:
    """Resolve for ``arch`` with wheels only; returns canonical name -> report item."""
    report = work / f"report-{arch}.json"
    req_file = work / "requirements.in"
    req_file.write_text("\n".join(requirements) + "\n", encoding="utf-8")
    _pip(
        [
            "install",
            "--quiet",
            "--dry-run",
            "--ignore-installed",
            "--only-binary=:all:",
            "--find-links",
            str(find_links),
            *pip_platform_args(arch),
            "--report",
            str(report),
            "-r",
            str(req_file),
        ]
    )
    items = json.loads(report.read_text(encoding="utf-8"))["install"]
    return {canonical(i["metadata"]["name"]): i for i in items}


def generate(path: Path = LOCK_PATH) -> None:
    from packaging.version import Version

    requirements = runtime_requirements()
    with tempfile.TemporaryDirectory(prefix="soundwatch-lock-") as tmp:
        work = Path(tmp)
        local = work / "wheels"
        local.mkdir()
        sdists = build_allowed_sdists(requirements, local)
        resolved: dict[str, dict[str, ReportItem]] = {}
        reqs = list(requirements)
        for _attempt in range(3):
            resolved = {arch: resolve(arch, reqs, local, work) for arch in ARCHES}
            versions = {
                arch: {n: i["metadata"]["version"] for n, i in items.items()}
                for arch, items in resolved.items()
            }
            a, b = (versions[arch] for arch in ARCHES)
            if a == b:
                break
            # A newer version lacks a wheel for one platform: hold both back.
            diff = {n for n in set(a) | set(b) if a.get(n) != b.get(n)}
            print(f"lock: platforms disagree on {sorted(diff)}; pinning the lower version")
            for n in diff:
                if n in a and n in b:
                    reqs.append(f"{n}=={min(a[n], b[n], key=Version)}")
        else:
            raise SystemExit("lock: the platforms resolve to different sets; see above")
        text = render(resolved, sdists, requirements)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"lock: wrote {path.relative_to(ROOT)} ({text.count('==')} packages)")


def _parents(resolved: dict[str, ReportItem], env: dict[str, str]) -> dict[str, list[str]]:
    from packaging.requirements import Requirement

    parents: dict[str, list[str]] = {}
    for name, item in resolved.items():
        for spec in item["metadata"].get("requires_dist") or []:
            req = Requirement(spec)
            if req.marker and not req.marker.evaluate({**env, "extra": ""}):
                continue
            parents.setdefault(canonical(req.name), []).append(name)
    return parents


def render(
    resolved: dict[str, dict[str, ReportItem]],
    sdists: dict[str, tuple[str, str]],
    requirements: list[str],
) -> str:
    first = resolved[ARCHES[0]]
    parents = _parents(first, {"python_version": PYTHON_VERSION, "sys_platform": "linux"})
    top = {canonical(re.split(r"[<>=!~;\[ ]", r)[0]) for r in requirements}
    lines = [
        "# The container's runtime set: every package, pinned, with the sha256 of the file",
        "# each platform installs (CPython 3.11, glibc 2.36: x86_64 = amd64, aarch64 = arm64v8).",
        "# Generated by `python tools/lock.py`; do not edit. Inputs: pyproject [project]",
        "# dependencies + the `iotedge` extra + EXTRA_RUNTIME and PINS in tools/lock.py.",
        f"# inputs-digest: {inputs_digest(requirements)}",
        "#",
        "# Wheels only, except the pure-Python sdists named by --no-binary (see",
        "# requirements/README.md); the image's builder stage turns those into wheels.",
        "--only-binary :all:",
        *[f"--no-binary {name}" for name in sorted(sdists)],
        "",
    ]
    for name in sorted(first):
        item = first[name]
        meta = item["metadata"]
        files: dict[str, str] = {}
        hashes: list[str] = []
        for arch in ARCHES:
            other = resolved[arch][name]
            url = other["download_info"]["url"]
            if name in sdists:
                files[arch] = f"sdist ({SDIST_ALLOWED[name]})"
                digest = sdists[name][1]
            else:
                files[arch] = url.rsplit("/", 1)[-1]
                digest = other["download_info"]["archive_info"]["hashes"]["sha256"]
            if digest not in hashes:
                hashes.append(digest)
        entry = f"{meta['name']}=={meta['version']}"
        lines.append(" \\\n    ".join([entry, *[f"--hash=sha256:{h}" for h in hashes]]))
        if len(set(files.values())) == 1:
            lines.append(f"    # all: {files[ARCHES[0]]}")
        else:
            lines += [f"    # {arch}: {files[arch]}" for arch in ARCHES]
        via = sorted(set(parents.get(name, [])) | ({"soundwatch"} if name in top else set()))
        lines.append(f"    # via: {', '.join(via)}")
        if name in PINS:
            lines.append(f"    # pinned: {PINS[name][1]}")
    return "\n".join(lines) + "\n"


# --- checking -----------------------------------------------------------------------


def check_fresh(path: Path = LOCK_PATH) -> list[str]:
    """Offline checks: the lock matches its inputs. Returns problems (empty = ok)."""
    from packaging.requirements import Requirement

    problems = []
    pins, options, digest = read_lock(path)
    requirements = runtime_requirements()
    if digest != inputs_digest(requirements):
        problems.append(
            "the lock's inputs changed (pyproject dependencies or tools/lock.py): "
            "run `python tools/lock.py`"
        )
    for spec in requirements:
        req = Requirement(spec)
        pin = pins.get(canonical(req.name))
        if pin is None:
            problems.append(f"{req.name} is required but not in the lock")
        elif not req.specifier.contains(pin.version, prereleases=True):
            problems.append(f"{req.name}=={pin.version} does not satisfy {spec!r}")
    for name, pin in pins.items():
        if not pin.hashes:
            problems.append(f"{name} has no hash")
        if len(pin.hashes) > len(ARCHES):
            problems.append(f"{name} has {len(pin.hashes)} hashes; expected one per platform")
    expected = ["--only-binary :all:", *[f"--no-binary {n}" for n in sorted(SDIST_ALLOWED)]]
    if sorted(options) != sorted(expected):
        problems.append(f"lock options {options} != {expected}")
    return problems


def check_wheels(path: Path = LOCK_PATH, arches: Sequence[str] = ARCHES) -> list[str]:
    """Download the lock for each platform (hash-checked) and check what arrived.

    Every file must be a wheel that installs on that platform, except the
    allowed sdists, which must build into pure-Python wheels.
    """
    problems = []
    pins, _options, _digest = read_lock(path)
    with tempfile.TemporaryDirectory(prefix="soundwatch-wheels-") as tmp:
        for arch in arches:
            dest = Path(tmp) / arch
            _pip(
                [
                    "download",
                    "--quiet",
                    "--no-deps",
                    "--require-hashes",
                    *pip_platform_args(arch),
                    "-d",
                    str(dest),
                    "-r",
                    str(path),
                ]
            )
            files = sorted(p.name for p in dest.iterdir())
            seen = set()
            for filename in files:
                name = canonical(re.split(r"-\d", filename, maxsplit=1)[0])
                seen.add(name)
                if filename.endswith(".whl"):
                    if not wheel_fits(filename, arch):
                        problems.append(f"{arch}: {filename} does not fit cp311/{arch}")
                elif name in SDIST_ALLOWED:
                    built = Path(tmp) / f"built-{arch}"
                    _pip(["wheel", *SDIST_BUILD_ARGS, "-w", str(built), str(dest / filename)])
                    wheels = [p.name for p in built.glob("*.whl")]
                    if not all(w.endswith("-none-any.whl") for w in wheels):
                        problems.append(f"{arch}: {filename} did not build a pure wheel: {wheels}")
                else:
                    problems.append(f"{arch}: {filename} is not a wheel")
            missing = set(pins) - seen
            if missing:
                problems.append(f"{arch}: nothing downloaded for {sorted(missing)}")
            print(f"lock: {arch}: downloaded {len(files)} files (hashes checked)")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the lock instead of writing it (downloads every pinned file per platform)",
    )
    parser.add_argument(
        "--offline", action="store_true", help="with --check: only check it against its inputs"
    )
    args = parser.parse_args(argv)
    if not args.check:
        generate()
        return 0
    problems = check_fresh()
    if not args.offline and not problems:
        problems += check_wheels()
    for p in problems:
        print(f"lock: {p}", file=sys.stderr)
    if not problems:
        print("lock: ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
