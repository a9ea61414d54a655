# One target for each thing a person does. Each target sets up what it needs
# on a fresh Debian 12 machine (apt packages, the venv, pip packages).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Runtime: PortAudio for capture. Tests: mosquitto (+TLS via openssl), sox and
# ALSA utilities for the virtual microphone.
APT_RUN := libportaudio2 python3-venv
APT_TEST := $(APT_RUN) mosquitto mosquitto-clients openssl sox alsa-utils chromium chromium-driver
export PYTHONDONTWRITEBYTECODE := 1
# The venv's own installers, at known versions whatever the machine ships
# (Debian 12's python3-venv brings pip 23.0.1 and no wheel). Every pip run of
# the set-up, tools/paho1-venv.sh and tools/arm64-check goes through them.
PIP_BOOTSTRAP := pip==25.2 setuptools==80.9.0 wheel==0.45.1
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check

.PHONY: run test pytest bench day baseline-auc faults lint train arm64-check clean setup-run setup-test setup-train

run: setup-run
	$(BIN)/soundwatch run --config config/demo.yaml

test: setup-test lint pytest

pytest: setup-test
	$(BIN)/python -m pytest -q
	# paho-mqtt 1.6 (which azure-iot-device pins) and the IoT Hub sink, in their own venv.
	tools/paho1-venv.sh
	SOUNDWATCH_EXPECT_PAHO=1 build/venv-paho1/bin/python -m pytest -q -p no:cacheprovider \
		tests/test_outbox.py tests/test_mqtt.py tests/test_mqtt_outage.py tests/test_iothub.py

lint: setup-test
	$(BIN)/ruff check module tools tests
	$(BIN)/ruff format --check module tools tests
	$(BIN)/mypy

# The image's runtime set on aarch64 under qemu: bundle, sample clips and a stream
# must give what they give on x86_64 (docs/verification.md).
arm64-check: setup-test
	$(BIN)/python tools/arm64-check --quick

bench: setup-train
	$(BIN)/python -m tools.bench

# A unit's day, shortened: 10 min of normal running (the baseline learns it),
# then each fault for a minute with normal stretches between, background
# events throughout; scored against its truth (tools/score_recording.py).
DAY_UNIT ?= 7
DAY_SNR ?= 6
DAY_SEED ?= 1
DAY_SCHEDULE := normal:600,imbalance:60,normal:120,bearing:60,normal:120,clogging:60,normal:120,rubbing:60,normal:120,voltage_change:60,normal:120,loose_guard:60,normal:120
DAY_WAV := build/day/unit$(DAY_UNIT)-snr$(DAY_SNR)-seed$(DAY_SEED).wav

day: setup-run
	@mkdir -p build/day
	@test -f $(DAY_WAV) || $(BIN)/python -m soundwatch.sim recording --out $(DAY_WAV) \
		--unit $(DAY_UNIT) --snr $(DAY_SNR) --seed $(DAY_SEED) --events-per-min 1.5 \
		--schedule "$(DAY_SCHEDULE)"
	$(BIN)/python tools/score_recording.py --learn-s 600 $(DAY_WAV)

# A baseline learned from 20 normal clips of a unit, scored on its other clips:
# AUC per unit, fault and SNR (tools/baseline_auc.py). About 4 minutes.
baseline-auc: setup-run
	$(BIN)/python tools/baseline_auc.py

# Broker outage, kill -9, flapping, frozen broker, full state disk, command flood
# against a real `soundwatch run` and mosquitto; one table (docs/faults.md). About
# 4 minutes, so not part of `make test`. Mounting the small disk needs root.
faults: setup-test
	$(BIN)/python -m tools.faults

train: setup-train
	# Renders the simulated world into build/sim (once), then every stage (docs/model.md).
	$(BIN)/python -m tools.train all --out module/soundwatch/models/fan --seed 0
	$(BIN)/python -m tools.make_samples

setup-run: $(VENV)/.run-ok
setup-test: $(VENV)/.test-ok
setup-train: $(VENV)/.train-ok

$(VENV)/.system-run-ok:
	tools/setup-system.sh $(APT_RUN)
	$(PYTHON) -m venv $(VENV)
	touch $@

# Remade when PIP_BOOTSTRAP changes (the stamp holds it).
$(VENV)/.pip-ok: $(VENV)/.system-run-ok Makefile
	@if [ "$$(cat $@ 2>/dev/null)" != "$(PIP_BOOTSTRAP)" ]; then \
		echo "$(PIP) $(PIP_BOOTSTRAP)"; $(PIP) $(PIP_BOOTSTRAP) && echo "$(PIP_BOOTSTRAP)" > $@; \
	else touch $@; fi

$(VENV)/.run-ok: pyproject.toml $(VENV)/.pip-ok
	$(PIP) -e .
	touch $@

$(VENV)/.test-ok: pyproject.toml $(VENV)/.pip-ok
	tools/setup-system.sh $(APT_TEST)
	$(PIP) -e '.[dev]'
	touch $@

$(VENV)/.train-ok: pyproject.toml $(VENV)/.pip-ok
	tools/setup-system.sh $(APT_TEST)
	$(PIP) -e '.[train,dev]'
	touch $@

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
