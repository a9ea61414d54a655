"""A bundle's bundle.json may only name files inside the bundle directory.

Through the real CLI (``soundwatch info --bundle DIR``): a bundle copied from
elsewhere whose ``model.file`` (or ``features.file``) points outside its
directory is refused before that file is opened.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.httpkit import bundle_dir


def _info(bundle: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOUNDWATCH_")}
    # A read of the FIFO below would block forever: the timeout turns that into a failure.
    return subprocess.run(
        [sys.executable, "-m", "soundwatch", "info", "--bundle", str(bundle)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def _copy_bundle(tmp_path: Path) -> tuple[Path, dict[str, object]]:
    bundle = tmp_path / "bundle"
    shutil.copytree(bundle_dir(), bundle)
    return bundle, json.loads((bundle / "bundle.json").read_text())


@pytest.mark.parametrize("key", ["model", "features"])
def test_a_bundle_file_outside_the_bundle_directory_is_refused_unread(
    tmp_path: Path, key: str
) -> None:
    bundle, doc = _copy_bundle(tmp_path)
    section = doc[key]
    assert isinstance(section, dict)
    # The same bytes outside the directory: the hash matches, so only the path can refuse it.
    outside = tmp_path / f"outside-{section['file']}"
    shutil.copy(bundle / str(section["file"]), outside)
    section["file"] = f"../{outside.name}"
    (bundle / "bundle.json").write_text(json.dumps(doc))
    proc = _info(bundle)
    assert proc.returncode == 1, proc.stdout
    assert f"'../{outside.name}' is outside the bundle directory" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("target", ["absolute", "symlink"])
def test_the_check_comes_before_any_read(tmp_path: Path, target: str) -> None:
    bundle, doc = _copy_bundle(tmp_path)
    fifo = tmp_path / "no-writer.fifo"
    os.mkfifo(fifo)  # opening it for reading would block: proof that nothing was opened
    model = doc["model"]
    assert isinstance(model, dict)
    if target == "absolute":
        model["file"] = str(fifo)
    else:
        (bundle / "linked.tflite").symlink_to(fifo)
        model["file"] = "linked.tflite"
    (bundle / "bundle.json").write_text(json.dumps(doc))
    proc = _info(bundle)
    assert proc.returncode == 1
    assert "is outside the bundle directory; not read" in proc.stderr, proc.stderr


def test_the_shipped_layout_still_loads(tmp_path: Path) -> None:
    bundle, _ = _copy_bundle(tmp_path)
    proc = _info(bundle)
    assert proc.returncode == 0, proc.stderr
    assert "classes: normal, imbalance, clogging, voltage_change" in proc.stdout
