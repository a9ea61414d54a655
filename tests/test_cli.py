"""The command line, run as a user runs it: one name per option, usage on errors, help, exit codes.

Each check goes through the real ``soundwatch`` entry point (a subprocess, or
``cli.main`` where many cases share one process) against the shipped bundle.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from soundwatch import cli
from tests.httpkit import bundle_dir, write_wav

SUBCOMMANDS = ("run", "mic", "serve", "classify", "validate-config", "devices", "selftest", "info")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOUNDWATCH_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def soundwatch(*argv: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "soundwatch", *argv],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=_env(),
    )


def _in_process(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_help_has_a_description_defaults_and_an_example(command: str) -> None:
    code, out, _err = _in_process(command, "--help")
    assert code == 0
    usage, _, rest = out.partition("\n\n")
    assert usage.startswith(f"usage: soundwatch {command}")
    description = rest.split("\n\n", 1)[0]
    assert len(description) > 40, description  # a sentence, not just the usage
    assert "examples:\n  soundwatch " + command in out
    if command not in ("devices", "validate-config", "classify"):
        assert "(default: " in out, out  # the options that have defaults say them


@pytest.mark.parametrize("action", ["learn", "show", "relearn", "false-alarm"])
def test_every_baseline_action_has_help_with_a_description_and_examples(action: str) -> None:
    code, out, _err = _in_process("baseline", action, "--help")
    assert code == 0
    assert out.startswith(f"usage: soundwatch baseline {action}")
    description = out.split("\n\n")[1]
    assert len(description) > 40, description
    assert f"examples:\n  soundwatch baseline {action}" in out
    if action != "show":
        assert "(default: " in out, out


def test_baseline_commands_say_what_is_wrong(tmp_path: Path) -> None:
    # No module listens there: the client says so and fails.
    code, _out, err = _in_process("baseline", "relearn", "--http", "127.0.0.1:9", "--timeout", "5")
    assert code == 1 and "cannot reach the module at http://127.0.0.1:9" in err
    # Not a baseline file.
    bogus = tmp_path / "b.npz"
    bogus.write_bytes(b"not a baseline")
    code, _out, err = _in_process("baseline", "show", str(bogus))
    assert code == 1 and "unreadable baseline" in err
    # Too little audio to learn from: how many windows, and what to do.
    wav = write_wav(tmp_path / "fan.wav", 12.0)
    proc = soundwatch(
        "baseline",
        "learn",
        "--out",
        str(tmp_path / "x.npz"),
        str(wav),
        "--bundle",
        str(bundle_dir()),
    )
    assert proc.returncode == 1
    assert "the clips gave 1 usable windows; a baseline needs at least 10" in proc.stderr
    assert not (tmp_path / "x.npz").exists()


def test_one_name_per_option_and_errors_show_the_subcommands_usage(tmp_path: Path) -> None:
    # The HTTP token option is --http-token in run and serve alike; the old spellings
    # are refused with the subcommand's usage and the one name.
    for command in ("run", "serve"):
        proc = soundwatch(command, "--token", "0123456789abcdef")
        assert proc.returncode == 2
        assert f"usage: soundwatch {command}" in proc.stderr
        assert "--token is now --http-token" in proc.stderr
    # A bad value is a usage error of that subcommand too.
    proc = soundwatch("run", "--source", "radio:1")
    assert proc.returncode == 2 and "usage: soundwatch run" in proc.stderr
    assert "unknown source 'radio:1'" in proc.stderr
    # So is a bad configuration, before anything starts.
    bad = tmp_path / "bad.yaml"
    bad.write_text("decision:\n  confirm_k: 9\n")
    proc = soundwatch("run", "--config", str(bad))
    assert proc.returncode == 2 and "usage: soundwatch run" in proc.stderr
    assert "confirm_k (9) must not exceed confirm_n (5)" in proc.stderr
    # An unsafe bind is a usage error of `serve`, whose only job is the API. (`run`
    # moves the API to loopback instead: tests/test_image_run.py.)
    proc = soundwatch("serve", "--http", "0.0.0.0:0")
    assert proc.returncode == 2 and "usage: soundwatch serve" in proc.stderr
    assert "--http-token" in proc.stderr and "--http-no-auth" in proc.stderr


def test_verbose_works_after_the_subcommand(tmp_path: Path) -> None:
    wav = write_wav(tmp_path / "fan.wav", 12.0)
    argv = ["run", "--source", f"file:{wav}", "--fast", "--sink", f"jsonl:{tmp_path / 'e.jsonl'}"]
    argv += ["--state-dir", str(tmp_path / "state"), "--bundle", str(bundle_dir())]
    quiet = soundwatch(*argv)
    loud = soundwatch(*argv, "-vv")
    assert quiet.returncode == 0 and loud.returncode == 0, loud.stderr[-2000:]
    assert " DEBUG " not in quiet.stderr
    assert " DEBUG " in loud.stderr  # -vv after the subcommand: debug logging
    both = soundwatch("-v", *argv, "-v")
    assert both.returncode == 0 and " INFO " in both.stderr


def test_selftest_strict_and_json() -> None:
    proc = soundwatch("selftest", "--no-stream", "--strict", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    assert doc["ok"] is True and doc["strict"] is True
    assert [s["name"] for s in doc["steps"]] == ["bundle", "samples"]
    assert all(s["status"] == "pass" for s in doc["steps"])
    # --strict turns a skipped step into a failure.
    code, out, _err = _in_process(
        "selftest", "--no-stream", "--strict", "--samples", "/nonexistent"
    )
    assert code == 1 and "samples: SKIP" in out and "selftest: FAILED" in out
    code, out, _err = _in_process("selftest", "--no-stream", "--samples", "/nonexistent")
    assert code == 0 and "selftest: ok" in out


def test_info_is_a_summary_and_json_is_the_full_document() -> None:
    proc = soundwatch("info")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert 3 <= len(lines) <= 12
    assert lines[0].startswith("model fan@") and "classes: normal, imbalance" in proc.stdout
    assert "held-out" in proc.stdout and "{" not in proc.stdout
    full = soundwatch("info", "--json")
    doc = json.loads(full.stdout)
    assert {"classes", "feature_spec", "thresholds", "provenance", "metrics"} <= set(doc)


def test_selftest_runs_without_the_cli_and_leaves_the_environment_alone(tmp_path: Path) -> None:
    """`import soundwatch.selftest` and a run import no CLI and change no variable."""
    script = (
        "import os, sys\n"
        "before = dict(os.environ)\n"
        "from soundwatch import selftest\n"
        "from pathlib import Path\n"
        f"results = selftest.collect(work_dir=Path({str(tmp_path)!r}))\n"
        "assert 'soundwatch.cli' not in sys.modules, 'the self-test imported the CLI'\n"
        "assert dict(os.environ) == before, 'the self-test changed the environment'\n"
        "print([(r.name, r.status) for r in results])\n"
    )
    env = {**_env(), "SOUNDWATCH__SINKS": "[{type: mqtt, host: broker.invalid}]"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=180, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "('stream', 'pass')" in proc.stdout, proc.stdout


def test_the_runtime_banner_goes_through_logging(tmp_path: Path) -> None:
    """LiteRT prints 'INFO: Created TensorFlow Lite XNNPACK delegate' to fd 2 itself; every
    command that builds an interpreter turns it into a DEBUG log line instead."""
    banner = "INFO: Created TensorFlow Lite XNNPACK delegate"
    wav = write_wav(tmp_path / "fan.wav", 12.0)
    bundle = ["--bundle", str(bundle_dir())]
    run = ["run", "--source", f"file:{wav}", "--fast", "--state-dir", str(tmp_path / "s"), *bundle]
    for argv in (["classify", str(wav), *bundle], run, ["selftest", "--no-stream", *bundle]):
        proc = soundwatch(*argv)
        assert proc.returncode == 0, proc.stderr[-2000:]
        bare = [line for line in proc.stderr.splitlines() if line.startswith(banner)]
        assert not bare, f"{argv[0]}: {bare}"
    loud = soundwatch("classify", str(wav), *bundle, "-vv")
    assert any(
        " DEBUG soundwatch.litert: " + banner in line for line in loud.stderr.splitlines()
    ), loud.stderr[-2000:]
