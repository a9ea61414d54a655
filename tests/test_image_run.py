"""The image's own command line, run with the deployments' environments, through the real CLI.

There is no Docker engine here, so the container is reproduced around the
process instead: the ENTRYPOINT and CMD taken from the Dockerfile, the config
file the Dockerfile writes, the environment the deployment gives (the IoT Edge
manifest with ``.env.template``'s values, as ``iotedgedev genconfig`` passes
them: an empty ``SOUNDWATCH_HTTP_TOKEN`` included), and ALSA's default device
played by the file-plugin microphone (tests/fakemic.py).

Three things differ from the container, each because the test machine is
shared: the port (a free one instead of 5000), the state directory (a
temporary one), and the sinks (a JSON Lines file the test reads, instead of
IoT Hub, which tests/test_iothub.py drives against a fake edgeHub).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.fakemic import make_fake_mic
from tests.httpkit import fan_clip
from tests.mosquitto import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile.amd64"
TEMPLATE = ROOT / "deployment.template.json"
ENV_TEMPLATE = ROOT / ".env.template"
IMAGE_CONFIG = "/etc/soundwatch/config.yaml"
TOKEN = "lan-token-0123456789"


def _instructions(text: str) -> dict[str, str]:
    joined = re.sub(r"\\\n", " ", text)
    out = {}
    for line in joined.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word in ("ENTRYPOINT", "CMD"):
            out[word] = rest.strip()
    return out


def image_command() -> list[str]:
    """ENTRYPOINT + CMD of the runtime stage, as Docker runs them."""
    final = re.split(r"^FROM\s", DOCKERFILE.read_text(encoding="utf-8"), flags=re.M)[-1]
    found = _instructions(final)
    return [*json.loads(found["ENTRYPOINT"]), *json.loads(found["CMD"])]


def image_config_text() -> str:
    """The config file the Dockerfile writes with ``printf '%s\\n' ... > IMAGE_CONFIG``."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    match = re.search(r"printf '%s\\n' (.*?) > " + re.escape(IMAGE_CONFIG), text)
    assert match, "the Dockerfile writes the image's config with printf"
    return "".join(line + "\n" for line in shlex.split(match.group(1)))


def env_template() -> dict[str, str]:
    out = {}
    for line in ENV_TEMPLATE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def manifest_environment() -> dict[str, str]:
    """The module's env in the IoT Edge manifest, expanded with .env.template's values."""
    doc = json.loads(TEMPLATE.read_text(encoding="utf-8"))
    module = doc["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]["soundwatch"]
    settings = env_template()
    out = {}
    for key, item in module["env"].items():
        value = str(item["value"])
        for name, default in settings.items():
            value = value.replace("${" + name + "}", default)
        assert "${" not in value, f"{key}: {value} has a placeholder .env.template lacks"
        out[key] = value
    return out


def test_the_manifest_passes_an_empty_token_as_iotedgedev_does() -> None:
    """The case this file is about: the documented set-up leaves the token empty."""
    assert env_template()["SOUNDWATCH_HTTP_TOKEN"] == ""
    assert manifest_environment()["SOUNDWATCH_HTTP_TOKEN"] == ""
    assert image_command()[:2] == ["soundwatch", "run"]
    assert "0.0.0.0:5000" in image_command()


@dataclass
class Container:
    proc: subprocess.Popen[str]
    port: int
    jsonl: Path

    def states(self) -> list[dict[str, Any]]:
        if not self.jsonl.exists():
            return []
        lines = self.jsonl.read_text(encoding="utf-8").splitlines()
        messages = [json.loads(x) for x in lines if x.strip()]
        return [m for m in messages if m["type"] == "state"]

    def wait_for_states(self, n: int, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the module exited: {self.stop()[1][-3000:]}"
            states = self.states()
            if len(states) >= n:
                return states
            time.sleep(0.2)
        raise AssertionError(f"fewer than {n} windows in {timeout_s} s")

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _out, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _out, err = self.proc.communicate()
        return self.proc.returncode, err


def start_container(
    tmp_path: Path, environment: dict[str, str], port: int | None = None
) -> Container:
    """The image's command line in a process, with the deployment's environment."""
    mic = make_fake_mic(tmp_path / "alsa", fan_clip(30.0, 48000, "normal"), 48000, as_default=True)
    config = tmp_path / "etc" / "config.yaml"
    config.parent.mkdir()
    config.write_text(image_config_text(), encoding="utf-8")
    port = port or free_port()
    argv = [
        a.replace(IMAGE_CONFIG, str(config)).replace("0.0.0.0:5000", f"0.0.0.0:{port}")
        for a in image_command()
    ]
    jsonl = tmp_path / "messages.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOUNDWATCH")}
    env.update(environment)
    env.update(mic.env)
    env["SOUNDWATCH__STATE_DIR"] = str(tmp_path / "state")
    env["SOUNDWATCH__SINKS"] = f"[{{type: jsonl, path: '{jsonl}', include_state: true}}]"
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "soundwatch", *argv[1:]],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    return Container(proc, port, jsonl)


@pytest.fixture
def container_factory(tmp_path: Path) -> Iterator[Any]:
    made: list[Container] = []

    def make(environment: dict[str, str], port: int | None = None) -> Container:
        c = start_container(tmp_path, environment, port)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()


@pytest.mark.slow
def test_image_command_with_the_manifest_environment_runs_the_pipeline(
    container_factory: Any,
) -> None:
    """Without a token the pipeline runs and the API answers on loopback only, saying why."""
    c = container_factory(manifest_environment())
    c.wait_for_states(2)
    r = requests.get(f"http://127.0.0.1:{c.port}/health", timeout=5)  # the HEALTHCHECK's call
    assert r.status_code == 200, r.text
    http = r.json()["http"]
    assert http["listening"] == f"127.0.0.1:{c.port}"
    assert http["requested"] == f"0.0.0.0:{c.port}"
    assert http["auth"] == "none"
    assert "SOUNDWATCH_HTTP_TOKEN" in http["restricted"]
    assert r.json()["source"]["device"] == "default"
    code, err = c.stop()
    assert code == 0, err[-3000:]
    assert "SOUNDWATCH_HTTP_TOKEN" in err  # the log says what to set, once, as a warning
    assert " WARNING " in err


@pytest.mark.slow
def test_image_command_with_a_token_serves_the_lan(container_factory: Any) -> None:
    """With the token set (the documented way to reach the page), every address, token needed."""
    c = container_factory({**manifest_environment(), "SOUNDWATCH_HTTP_TOKEN": TOKEN})
    c.wait_for_states(1)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    # Without the token, /health says only how the module is (the HEALTHCHECK's call).
    summary = requests.get(f"http://127.0.0.1:{c.port}/health", timeout=5).json()
    assert list(summary) == ["status"] and summary["status"] in ("ok", "degraded"), summary
    health = requests.get(f"http://127.0.0.1:{c.port}/health", headers=auth, timeout=5).json()
    assert health["http"]["listening"] == f"0.0.0.0:{c.port}"
    assert health["http"]["auth"] == "token" and health["http"]["restricted"] is None
    assert requests.get(f"http://127.0.0.1:{c.port}/info", timeout=5).status_code == 401
    info = requests.get(f"http://127.0.0.1:{c.port}/info", headers=auth, timeout=5)
    assert info.status_code == 200
    code, err = c.stop()
    assert code == 0, err[-3000:]


@pytest.mark.slow
def test_a_port_in_use_does_not_stop_the_pipeline(container_factory: Any) -> None:
    with socket.create_server(("0.0.0.0", 0)) as taken:
        port = taken.getsockname()[1]
        c = container_factory({**manifest_environment(), "SOUNDWATCH_HTTP_TOKEN": TOKEN}, port)
        c.wait_for_states(2)
        code, err = c.stop()
    assert code == 0, err[-3000:]
    assert f"cannot listen on 0.0.0.0:{port}" in err and "the pipeline runs without it" in err


# --- compose.yaml: soundwatch with mosquitto, for plain Docker ------------------------------

COMPOSE = ROOT / "compose.yaml"


def _interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` with nothing set: the defaults."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)


def compose_environment() -> dict[str, str]:
    import yaml

    doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    env = doc["services"]["soundwatch"]["environment"]
    return {k: _interpolate(str(v)) for k, v in env.items()}


def _docker_compose() -> list[str] | None:
    """``docker compose`` when this machine has the plugin (it needs no engine for config)."""
    import shutil

    docker = shutil.which("docker")
    if docker is None:
        return None
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
    return [docker, "compose"] if probe.returncode == 0 else None


def _check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    """Docker's own ``docker compose config`` where it exists; else the Compose
    Specification's JSON Schema (check-jsonschema's vendored copy)."""
    compose = _docker_compose()
    if compose is not None:
        argv = [*compose, "-f", str(path), "config", "--quiet"]
    else:
        exe = Path(sys.executable).parent / "check-jsonschema"
        if not exe.exists():
            pytest.fail("neither `docker compose` nor check-jsonschema (the dev extra) is here")
        argv = [str(exe), "--builtin-schema", "vendor.compose-spec", str(path)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SOUNDWATCH")}
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=path.parent)


def test_compose_file_is_valid() -> None:
    proc = _check_compose(COMPOSE)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_validation_is_not_a_formality(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text(
        COMPOSE.read_text(encoding="utf-8").replace('- "5000:5000"', "- {published: [5000]}"),
        encoding="utf-8",
    )
    assert _check_compose(broken).returncode != 0


def test_compose_runs_the_image_with_mosquitto_and_home_assistant_discovery(
    tmp_path: Path,
) -> None:
    import yaml

    from soundwatch.config import load_config

    doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    services = doc["services"]
    assert set(services) == {"soundwatch", "mosquitto"}
    soundwatch = services["soundwatch"]
    dockerfile = _interpolate(soundwatch["build"]["dockerfile"])
    assert (ROOT / dockerfile).is_file() and dockerfile == DOCKERFILE.name
    assert "/dev/snd:/dev/snd" in soundwatch["devices"] and "audio" in soundwatch["group_add"]
    assert "5000:5000" in soundwatch["ports"]
    assert any(v.endswith(":/var/lib/soundwatch") for v in soundwatch["volumes"])
    env = compose_environment()
    assert env["SOUNDWATCH_HTTP_TOKEN"] == ""  # unset: the case that must not crash-loop
    image_config = tmp_path / "config.yaml"  # the image's own, which the env overrides
    image_config.write_text(image_config_text(), encoding="utf-8")
    config = load_config(
        image_config, env={k: v for k, v in env.items() if k != "SOUNDWATCH_HTTP_TOKEN"}
    )
    mqtt = [s for s in config.sinks if s.type == "mqtt"]
    assert [(s.host, s.ha_discovery.enabled) for s in mqtt] == [("mosquitto", True)]  # type: ignore[union-attr]
    assert config.source.device == "default"  # type: ignore[union-attr]
    assert "1883:1883" in services["mosquitto"]["ports"]


@pytest.mark.slow
def test_image_command_with_the_compose_environment_runs_the_pipeline(
    container_factory: Any,
) -> None:
    c = container_factory(compose_environment())
    c.wait_for_states(2)
    health = requests.get(f"http://127.0.0.1:{c.port}/health", timeout=5).json()
    assert health["http"]["restricted"] and health["source"]["device"] == "default"
    code, err = c.stop()
    assert code == 0, err[-3000:]


def test_the_manifest_publishes_the_api_port() -> None:
    """How the page is reached from the LAN: the port binding, plus the token."""
    doc = json.loads(TEMPLATE.read_text(encoding="utf-8"))
    module = doc["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]["soundwatch"]
    options = module["settings"]["createOptions"]
    assert options["HostConfig"]["PortBindings"]["5000/tcp"] == [{"HostPort": "5000"}]
    assert "5000/tcp" in options["ExposedPorts"]
    assert module["env"]["SOUNDWATCH_HTTP_TOKEN"]["value"] == "${SOUNDWATCH_HTTP_TOKEN}"
    assert "SOUNDWATCH_HTTP_TOKEN" in (ROOT / "module" / "module.json").read_text(encoding="utf-8")
