"""Config validation: errors name the key and the line; env and patches."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from soundwatch.config import (
    LIVE_KEYS,
    RESTART_ONLY,
    Config,
    ConfigError,
    _deep_merge,
    apply_patch,
    is_live_key,
    load_config,
    validate,
)
from soundwatch.config.yamlsrc import load_yaml_value

BAD = """\
device_id: dev1
source:
  type: mic
  watchdog_s: -1
  devic: "USB"
window:
  hop_s: 0
decision:
  confirm_k: 6
sinks:
  - type: jsonl
    max_bytes: 10
  - type: console
    show_stat: true
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_errors_name_key_and_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(_write(tmp_path, BAD), env={})
    got = {(key, line) for key, line, _ in ei.value.problems}
    assert got == {
        ("source.watchdog_s", 4),
        ("source.devic", 5),
        ("window.hop_s", 7),
        ("decision", 8),
        ("sinks.0.path", 11),
        ("sinks.0.max_bytes", 12),
        ("sinks.1.show_stat", 14),
    }
    text = str(ei.value)
    assert "c.yaml:5: source.devic: unknown key" in text
    assert "confirm_k (6) must not exceed confirm_n (5)" in text


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"c.yaml:3"):
        load_config(_write(tmp_path, "a: 1\nb: [1, 2\nc: 3\n"), env={})


def test_unknown_source_type(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(_write(tmp_path, "source:\n  type: radio\n"), env={})
    ((key, line, msg),) = ei.value.problems
    assert key == "source.type" and line == 2 and "radio" in msg


def test_env_substitution_and_overrides(tmp_path: Path) -> None:
    path = _write(tmp_path, "device_id: ${DEV}\nmodule_id: ${MOD:-sw}\nwindow:\n  hop_s: 1\n")
    env = {
        "DEV": "fan-7",
        "SOUNDWATCH__WINDOW__HOP_S": "2.5",
        "SOUNDWATCH__DECISION__CONFIRM_K": "2",
    }
    cfg = load_config(path, env=env)
    assert (cfg.device_id, cfg.module_id, cfg.window.hop_s) == ("fan-7", "sw", 2.5)
    assert cfg.decision.confirm_k == 2


def test_missing_env_var_is_an_error_with_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "module_id: x\ndevice_id: ${NOPE}\n")
    with pytest.raises(ConfigError, match=r"c.yaml:2: device_id: environment variable NOPE"):
        load_config(path, env={})


def test_cli_overrides_win(tmp_path: Path) -> None:
    cfg = load_config(
        None, env={}, overrides={"window.hop_s": 10.0, "source": {"type": "file", "path": "x.wav"}}
    )
    assert cfg.window.hop_s == 10.0 and cfg.source.type == "file"


def test_patch_is_all_or_nothing() -> None:
    cfg = Config()
    new = apply_patch(cfg, {"decision": {"thresholds": {"imbalance": {"on": 0.9, "off": 0.6}}}})
    assert new.decision.thresholds["imbalance"].on == 0.9
    assert cfg.decision.thresholds == {}
    with pytest.raises(ConfigError) as ei:
        apply_patch(
            cfg,
            {
                "window": {"hop_s": 2},
                "decision": {"thresholds": {"imbalance": {"on": 0.5, "off": 0.7}}},
            },
        )
    assert "off (0.7) must not exceed on (0.5)" in str(ei.value)


def test_defaults_are_valid() -> None:
    cfg = load_config(None, env={})
    assert cfg.source.type == "simulator" and cfg.window.hop_s == 1.0


def test_documented_defaults_are_the_real_defaults() -> None:
    """config/default.yaml must not drift from the schema."""
    root = Path(__file__).resolve().parents[1]
    documented = load_config(root / "config" / "default.yaml", env={})
    assert documented.model_dump() == Config().model_dump()


@pytest.mark.parametrize("name", ["demo.yaml", "mic-bench.yaml", "file-reference.yaml"])
def test_example_configs_validate(name: str) -> None:
    root = Path(__file__).resolve().parents[1]
    load_config(root / "config" / name, env={"AUDIO_FILE": "x.wav"})


# --- the documented examples, and the YAML 1.1 booleans --------------------------------------

_KEYLIKE = re.compile(r"^ *(- )?[a-z_][a-z0-9_]*:( |$)")
_COMMENT = re.compile(r"^( *)# ?(.*)$")


def _commented_examples(text: str) -> list[tuple[int, tuple[str, ...], Any]]:
    """Every commented-out YAML example: (line, the key path it belongs under, its value).

    An example is a run of comment lines at one indentation whose text reads
    as YAML keys; it belongs under the nearest active key indented less.
    """
    lines = text.splitlines()
    active: list[tuple[int, str]] = []  # (indent, key) of the active keys above
    out: list[tuple[int, tuple[str, ...], Any]] = []
    i = 0
    while i < len(lines):
        m = _COMMENT.match(lines[i])
        if m is None or not _KEYLIKE.match(m.group(2)):
            stripped = lines[i].lstrip()
            if stripped and not stripped.startswith("#") and _KEYLIKE.match(stripped):
                indent = len(lines[i]) - len(stripped)
                active = [(n, k) for n, k in active if n < indent]
                active.append((indent, stripped.split(":", 1)[0].lstrip("- ")))
            i += 1
            continue
        column, start, block = len(m.group(1)), i, []
        while i < len(lines):
            m = _COMMENT.match(lines[i])
            if m is None or len(m.group(1)) != column:
                break
            if not (_KEYLIKE.match(m.group(2)) or m.group(2).startswith(" ")):
                break
            block.append(m.group(2))
            i += 1
        parent = tuple(k for n, k in active if n < column)
        out.append((start + 1, parent, load_yaml_value("\n".join(block))))
    return out


def test_every_commented_example_in_default_yaml_validates() -> None:
    """Uncomment each example in config/default.yaml where it stands; it must validate.

    The thresholds example is written as the docs say, `{on: 0.7, off: 0.5}`:
    YAML 1.1 reads on/off as booleans, which the config loader does not.
    """
    root = Path(__file__).resolve().parents[1]
    text = (root / "config" / "default.yaml").read_text()
    base = load_yaml_value(text)
    examples = _commented_examples(text)
    seen: set[tuple[str, ...]] = set()
    for _line, parent, value in examples:
        seen |= {(*parent, k) for k in value} if isinstance(value, dict) else {parent}
    # The documented alternatives are all found (or this test checks nothing).
    assert {("device_id",), ("source", "type"), ("decision", "thresholds"), ("sinks",)} <= seen
    for line, parent, value in examples:
        doc = copy.deepcopy(base)
        target = doc
        for key in parent:
            target = target[key]
        if isinstance(value, list):
            target.extend(value)
        else:
            merged = _deep_merge(target, value)
            target.clear()
            target.update(merged)
        try:
            cfg = validate(doc, f"default.yaml:{line}")
        except ConfigError as e:
            raise AssertionError(
                f"the example at config/default.yaml:{line} is invalid: {e}"
            ) from None
        if parent == ("decision",):
            assert cfg.decision.thresholds["imbalance"].on == 0.7
            assert cfg.decision.thresholds["imbalance"].off == 0.5


def test_threshold_on_off_spelling_through_the_cli(tmp_path: Path) -> None:
    """The documented `{on: 0.7, off: 0.5}` is accepted by `soundwatch validate-config`."""
    path = _write(
        tmp_path,
        "decision:\n  thresholds:\n    imbalance: {on: 0.7, off: 0.5}\n"
        "    clogging:\n      on: 0.8\n      off: 0.6\n",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOUNDWATCH_")}
    env["SOUNDWATCH__DECISION__THRESHOLDS__VOLTAGE_CHANGE"] = "{on: 0.9, off: 0.7}"
    proc = subprocess.run(
        [sys.executable, "-m", "soundwatch", "validate-config", str(path), "--show"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout.split("\n", 1)[1])["decision"]["thresholds"]
    assert shown == {
        "imbalance": {"on": 0.7, "off": 0.5},
        "clogging": {"on": 0.8, "off": 0.6},
        "voltage_change": {"on": 0.9, "off": 0.7},
    }
    # Booleans where the schema wants them: YAML 1.2's true/false, and yes/on still work.
    text = "decision:\n  enabled: off\nsource:\n  type: simulator\n  loop: yes\n"
    cfg = load_config(_write(tmp_path, text), env={})
    assert cfg.decision.enabled is False and cfg.source.loop is True


# --- bounds that keep detection possible --------------------------------------------------------


@pytest.mark.parametrize(
    ("patch", "key", "message"),
    [
        # The probe's patch: one window in a hundred million, never confirmed or cleared.
        ({"decision": {"confirm_n": 100_000_000, "confirm_k": 1}}, "decision.confirm_n", "1000"),
        ({"decision": {"confirm_n": 700, "confirm_k": 1}}, "decision", "confirm_n x hop_s"),
        ({"window": {"hop_s": 2}, "decision": {"confirm_n": 301}}, "decision", "602 s"),
        ({"decision": {"warmup_windows": 601}}, "decision", "warmup_windows"),
        ({"decision": {"cooldown_s": 86_400}}, "decision.cooldown_s", "3600"),
        ({"decision": {"thresholds": {"imbalance": {"on": 1.0, "off": 0.5}}}}, "on", "0.99"),
        ({"decision": {"thresholds": {"imbalance": {"on": 0.5, "off": 0.001}}}}, "off", "0.05"),
        ({"window": {"hop_s": 0.01}}, "window.hop_s", "0.1"),
        ({"window": {"silence_rms_dbfs": 0}}, "window.silence_rms_dbfs", "-20"),
    ],
)
def test_settings_that_would_make_detection_impossible_are_refused(
    patch: dict[str, Any], key: str, message: str
) -> None:
    cfg = Config()
    with pytest.raises(ConfigError) as ei:
        apply_patch(cfg, patch)
    assert any(k.startswith(key) or k.endswith(key) for k, _l, _m in ei.value.problems), ei.value
    assert message in str(ei.value)


def test_hop_may_not_exceed_the_window(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"hop_s \(20.0\) must not exceed window_s \(10.0\)"):
        load_config(_write(tmp_path, "window:\n  hop_s: 20\n"), env={})
    # The reference service's non-overlapping windows are fine: hop 10 s rounds to
    # 10.008 s of frames.
    load_config(_write(tmp_path, "window:\n  hop_s: 10\ndecision:\n  confirm_n: 60\n"), env={})


# --- live patches: what may change while running -----------------------------------------------


def _another(path: str, value: Any) -> Any:
    """A different valid value for a setting (patch tests)."""
    special: dict[str, Any] = {
        "log_level": "DEBUG",
        "source.schedule": "normal:5",
        "source.type": "mic",
        "model.bundle": "/tmp/another-bundle",
        "record_dir": "/tmp/recordings",
        "sinks": [],
        "decision.thresholds": {"imbalance": {"on": 0.8, "off": 0.6}},
        "window.window_s": 5.0,
        "window.silence_rms_dbfs": -60.0,
        "baseline.during_learning.on": 0.95,  # half would fall below its `off`
    }
    if path in special:
        return special[path]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 1.0  # a different value, also for 0.0
    assert isinstance(value, str), (path, value)
    return value + "-2"


def _leaves(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _nested(path: str, value: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    cur = doc
    *parents, last = path.split(".")
    for part in parents:
        cur = cur.setdefault(part, {})
    cur[last] = value
    return doc


LEAVES = _leaves(Config(device_id="dev").model_dump(mode="json"))


@pytest.mark.parametrize("path", sorted(LEAVES))
def test_every_key_is_live_or_refused_as_restart_only(path: str) -> None:
    """Each setting: a live patch either applies it, or is refused naming it (issue: window_s)."""
    cfg = Config(device_id="dev")
    value = _another(path, LEAVES[path])
    patch = _nested(path, value)
    if is_live_key(path):
        new = apply_patch(cfg, patch, "test")
        assert _leaves(new.model_dump(mode="json")).get(path, value) == value or path.startswith(
            "decision.thresholds"
        )
    else:
        with pytest.raises(ConfigError) as ei:
            apply_patch(cfg, patch, "test")
        named = "source" if path == "source.type" else path  # another kind of source
        assert [(k, m) for k, _l, m in ei.value.problems] == [(named, RESTART_ONLY)]


def test_live_keys_are_exactly_these() -> None:
    baseline = {
        "learn_s",
        "false_alarm_rate",
        "confirm_k",
        "confirm_n",
        "off_ratio",
        "name_on",
        "name_by_speed",
    }
    assert set(LIVE_KEYS) == {
        "log_level",
        "window.hop_s",
        "window.silence_rms_dbfs",
        "decision",
        "baseline.during_learning",
        *(f"baseline.{k}" for k in baseline),
    }
    assert not is_live_key("window.window_s") and is_live_key("decision.thresholds.x.on")
    # Turning the baseline on or off changes what the pipeline is: restart-only.
    assert not is_live_key("baseline.enabled") and is_live_key("baseline.during_learning.on")
    # Restating start-up settings unchanged is no change (desired properties list them all).
    cfg = Config(device_id="dev")
    assert apply_patch(cfg, cfg.model_dump(mode="json")) == cfg
    with pytest.raises(ConfigError, match=r"window\.window_s: takes effect at start-up only"):
        apply_patch(cfg, {"window": {"window_s": 5}})


# --- hostile files ------------------------------------------------------------------------------


def _alias_bomb(levels: int = 9, fan_out: int = 9) -> str:
    """The "billion laughs": each level lists the previous one ``fan_out`` times."""
    lines = ["a0: &a0 [" + ", ".join(["lol"] * fan_out) + "]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * fan_out) + "]")
    return "\n".join(lines) + "\n"


HOSTILE = {
    # name: (file bytes, the line the error must name, words of the message)
    "latin1": (b"module_id: x\ndevice_id: caf\xe9\n", 2, "not UTF-8"),
    "self_alias": (b"module_id: x\nsinks: &s [*s]\n", 2, "cycle"),
    "python_tag": (b'device_id: !!python/object/apply:os.system ["true"]\n', 1, "!!python"),
    "alias_bomb": (_alias_bomb().encode(), 1, "alias bomb"),
}


# Peak memory of a CLI process that refuses a file (measured ~50 MB); the old
# loader grew an alias bomb past 2 GB.
MAX_RSS_KB = 300 * 1024

# Runs the command given as its arguments and prints its exit status and peak
# RSS (KiB). A child's ru_maxrss carries over the peak of the process that
# forked it (Linux keeps it across exec), so a child of the test process
# would report the test process's own size: this small launcher is the
# parent instead. It kills a command that is still running after 60 s (the
# old loader expanded the bomb for minutes towards gigabytes: this only keeps
# a regression from hanging the suite).
_PEAK_RSS_LAUNCHER = """
import json, os, subprocess, sys, threading
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
guard = threading.Timer(60, proc.kill)
guard.start()
_pid, status, usage = os.wait4(proc.pid, 0)
guard.cancel()
print(json.dumps({"status": status, "maxrss_kib": usage.ru_maxrss}))
"""


@pytest.mark.parametrize("name", sorted(HOSTILE))
@pytest.mark.parametrize("command", ["validate-config", "run"])
def test_hostile_config_files_get_a_clear_error_in_bounded_memory(
    tmp_path: Path, name: str, command: str
) -> None:
    """Each is refused by the real CLI, naming file and line: no traceback, no hang."""
    data, line, words = HOSTILE[name]
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(data)
    argv = [str(path)] if command == "validate-config" else ["--config", str(path)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOUNDWATCH_")}
    err_path = tmp_path / "stderr.txt"
    with err_path.open("wb") as err_file:
        cli = [sys.executable, "-m", "soundwatch", command, *argv]
        launcher = subprocess.run(
            [sys.executable, "-c", _PEAK_RSS_LAUNCHER, *cli],
            stdout=subprocess.PIPE,
            stderr=err_file,
            env=env,
            timeout=120,
            check=True,
        )
    measured = json.loads(launcher.stdout)
    status, peak_kib = measured["status"], measured["maxrss_kib"]
    err = err_path.read_text(errors="replace")
    assert os.WIFEXITED(status), f"{command} {name}: killed after 60 s or by a signal: {err}"
    assert os.WEXITSTATUS(status) == (1 if command == "validate-config" else 2), err
    assert "Traceback" not in err, err
    assert f"{path}:{line}: " in err, err
    assert words in err, err
    assert peak_kib < MAX_RSS_KB, f"peak RSS {peak_kib} KiB"


def test_a_deeply_nested_or_oversized_config_is_refused(tmp_path: Path) -> None:
    deep = _write(tmp_path, "a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested more than 64 levels"):
        load_config(deep, env={})
    big = tmp_path / "big.yaml"
    big.write_bytes(b"# padding\n" * 200_000)
    with pytest.raises(ConfigError, match="larger than 1048576 bytes"):
        load_config(big, env={})
    # An environment override is parsed by the same rules.
    with pytest.raises(ConfigError, match="SOUNDWATCH__DEVICE_ID: tag !!python/name"):
        load_config(None, env={"SOUNDWATCH__DEVICE_ID": "!!python/name:os.system"})
