"""A client generated from /openapi.json by openapi-python-client works unmodified.

Orchestration systems generate their clients from the schema. This generates one (offline: the
schema comes from the live server, the generator and its ruff post-processing run locally), imports
it and, against the live service, registers a host, reports a load, places a VM and reads the
``code`` of problem responses, parsed as the declared Problem / ValidationProblem models.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from service.app import create_app
from tests.conftest import ADMIN_TOKEN, make_settings
from tests.helpers import live_server

BIN = Path(sys.executable).parent
PACKAGE = "tdx_generated_client"


@pytest.fixture
def server(database_url: str) -> Iterator[str]:
    with live_server(create_app(make_settings(database_url))) as base:
        yield base


def _generate(base: str, into: Path) -> None:
    spec = httpx.get(f"{base}/openapi.json").json()
    (into / "openapi.json").write_text(json.dumps(spec))
    result = subprocess.run(
        [str(BIN / "openapi-python-client"), "generate", "--path", "openapi.json", "--meta", "none",
         "--output-path", PACKAGE, "--fail-on-warning"],
        cwd=into, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},  # its ruff post-hooks
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def generated(server: str, tmp_path: Path) -> Iterator[ModuleType]:
    _generate(server, tmp_path)
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]


def _mod(name: str) -> Any:
    return importlib.import_module(f"{PACKAGE}.{name}")


def test_generated_client_registers_reports_places_and_reads_problems(server: str, generated: ModuleType) -> None:
    models = _mod("models")
    create_host, report_load = _mod("api.hosts.create_host"), _mod("api.hosts.report_load")
    create_vm = _mod("api.vms.create_vm")
    client = generated.AuthenticatedClient(base_url=server, token=ADMIN_TOKEN)

    host = create_host.sync(client=client, body=models.HostCreate(name="gen-1", vcpus=16, memory_mib=32768))
    assert isinstance(host, models.HostOut) and host.tdx.state == models.TdxState.UNKNOWN

    load = models.LoadReport(
        load_id=uuid.uuid4(), boot_id=str(uuid.uuid4()), kernel="6.16.0-tdx", kvm_intel_loaded=True,
        tdx_platform=True, tdx_requested=True, tdx_effective=True, keyids_total=15,
    )
    reported = report_load.sync_detailed(name="gen-1", client=client, body=load)
    assert reported.status_code == 201 and reported.parsed.tdx.state == models.TdxState.READY
    replay = report_load.sync_detailed(name="gen-1", client=client, body=load)
    assert replay.status_code == 200 and isinstance(replay.parsed, models.HostOut)

    vm = create_vm.sync(client=client, body=models.VmCreate(name="web-1", vcpus=2, memory_mib=4096, tdx=True))
    assert isinstance(vm, models.VmOut)
    assert (vm.status, vm.host) == (models.VmStatus.SCHEDULED, "gen-1")

    taken = create_host.sync_detailed(client=client, body=models.HostCreate(name="gen-1", vcpus=1, memory_mib=1))
    assert taken.status_code == 409
    assert isinstance(taken.parsed, models.Problem) and taken.parsed.code == "host_name_taken"

    invalid = create_host.sync_detailed(client=client, body=models.HostCreate(name="gen-2", vcpus=0, memory_mib=1))
    assert invalid.status_code == 422
    assert isinstance(invalid.parsed, models.ValidationProblem) and invalid.parsed.code == "validation_error"
    assert invalid.parsed.errors[0].loc == ["body", "vcpus"]

    anonymous = generated.Client(base_url=server)
    refused = create_host.sync_detailed(client=anonymous, body=models.HostCreate(name="gen-3", vcpus=1, memory_mib=1))
    assert refused.status_code == 401 and refused.parsed.code == "unauthorized"
