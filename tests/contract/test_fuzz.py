"""schemathesis, the OpenAPI fuzzer, against the live service on each database.

Every operation /openapi.json declares (new endpoints included, with nothing to edit here), every
check (server errors, status codes, content types, headers, response schemas, negative data
refused, positive data accepted, missing headers, unsupported methods and ``Allow``, ignored auth,
use after free, resource availability), every phase (examples, coverage, fuzzing, stateful),
a fixed seed and a fixed number of cases per operation. Zero failures.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from service.app import create_app
from tests.conftest import ADMIN_TOKEN, make_settings
from tests.helpers import live_server

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
SEED = 20261129
MAX_EXAMPLES = int(os.environ.get("TDX_FUZZ_MAX_EXAMPLES", "100"))
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


def test_openapi_contract_holds_under_fuzzing(database_url: str, tmp_path: Path) -> None:
    app = create_app(make_settings(database_url))
    with live_server(app) as base:
        env = {
            **os.environ,
            "TDX_FUZZ_TOKEN": ADMIN_TOKEN,
            "SCHEMATHESIS_HOOKS": "tests.contract.schemathesis_hooks",
            "PYTHONPATH": str(ROOT),
        }
        command = [
            str(SCHEMATHESIS),
            "--config-file", str(HERE / "schemathesis.toml"),
            "run", f"{base}/openapi.json",
            "--seed", str(SEED),
            "--max-examples", str(MAX_EXAMPLES),
            "--generation-database", "none",  # nothing carried over between runs: the seed decides
            "--workers", "1",
            "--no-color",
            "--report", "junit",
            "--report-dir", str(tmp_path),
        ]
        result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    (tmp_path / "schemathesis.txt").write_text(output)
    if result.returncode != 0:
        pytest.fail(f"schemathesis found failures (exit {result.returncode}):\n{output[-20000:]}")
    operations = sum(
        1 for item in app.openapi()["paths"].values() for m in item if m in {"get", "put", "post", "patch", "delete"}
    )
    tested = re.search(r"Tested:\s+(\d+)", output)
    assert tested and int(tested.group(1)) == operations, output[-3000:]
    for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
        assert re.search(rf"✅ {phase}", output), f"phase {phase} did not pass:\n{output[-3000:]}"
