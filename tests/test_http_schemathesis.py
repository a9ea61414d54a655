"""The OpenAPI description against the real server: schemathesis fuzzes every operation.

The server runs on a real port, in ``run`` mode (a pipeline that has built
events, so ``/events`` and ``/state`` have content) and with a token, so
schemathesis also checks that the protected operations refuse requests
without it. Every answer must match the description: status code, content
type, body schema, and never a 5xx.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from soundwatch.http.server import HttpServer
from tests.httpkit import TOKEN, bundle_dir, make_runtime, run_until_events, running_server

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

OPENAPI = Path(__file__).resolve().parents[1] / "module" / "soundwatch" / "http" / "openapi.yaml"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    runtime = make_runtime(tmp_path_factory.mktemp("st"), bundle_dir())
    # A small upload limit keeps the fuzzer's large bodies cheap; 413 is described.
    with running_server(runtime.bundle, runtime, token=TOKEN, max_upload_bytes=256 * 1024) as srv:
        run_until_events(runtime, 4)
        yield srv


# Loaded at import, not through a fixture: schemathesis' lazy fixture loader
# (schemathesis.pytest.from_fixture) breaks on pytest 9 (it sets Node._nodeid).
# The server's ephemeral URL is given to each call instead.
schema = schemathesis.openapi.from_path(str(OPENAPI))
# The token is sent with every call (below); schemathesis' own `ignored_auth`
# check then repeats requests without it and expects 401.
schema.config.generation.update(with_security_parameters=False)
UPLOADS = ("/inference", "/predict")
COMMANDS = ("/config", "/commands/{name}")


@schema.parametrize()
@settings(
    # More for a deeper run: SOUNDWATCH_FUZZ_EXAMPLES=500 pytest tests/test_http_schemathesis.py
    max_examples=int(os.environ.get("SOUNDWATCH_FUZZ_EXAMPLES", "25")),
    deadline=None,
    database=None,  # leave no .hypothesis/ in the work tree
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.function_scoped_fixture,
    ],
)
def test_api_matches_its_openapi_description(case: Any, live_server: HttpServer) -> None:
    excluded = []
    if case.operation.path in UPLOADS:
        # A schema-valid upload is any bytes, and random bytes are not audio:
        # 415 is the right answer. Real audio is covered by tests/test_http.py.
        excluded.append(positive_data_acceptance)
    if case.operation.path in COMMANDS:
        # Any JSON object fits the schema, but few are valid settings or
        # arguments: 400 (with the reasons) is the right answer, and a burst of
        # calls meets the rate limit (429). Commands are covered by test_control.
        excluded.append(positive_data_acceptance)
    case.call_and_validate(
        base_url=live_server.url, headers=AUTH, excluded_checks=excluded, timeout=30
    )
