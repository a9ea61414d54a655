"""Config validation: errors name the key and the line; env and patches."""

from __future__ import annotations

from pathlib import Path

import pytest

from soundwatch.config import Config, ConfigError, apply_patch, load_config

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


@pytest.mark.parametrize("name", ["demo.yaml", "mic-bench.yaml", "file-seeds.yaml"])
def test_example_configs_validate(name: str) -> None:
    root = Path(__file__).resolve().parents[1]
    load_config(root / "config" / name, env={"AUDIO_FILE": "x.wav"})
