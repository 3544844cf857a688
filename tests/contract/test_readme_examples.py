"""The README's Python client examples run as written against a live service."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.app import create_app
from tests.conftest import ADMIN_TOKEN, make_settings
from tests.helpers import live_server

ROOT = Path(__file__).resolve().parents[2]


def _section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


EXAMPLES = re.findall(r"```python\n(.*?)```", _section("Python client"), re.S)


@pytest.fixture
def server(database_url: str) -> Iterator[str]:
    with live_server(create_app(make_settings(database_url, queue_tick_s=0.2))) as base:
        yield base


def test_the_readme_has_client_examples() -> None:
    assert len(EXAMPLES) >= 2
    assert any("AsyncTdxClient" in e for e in EXAMPLES) and any("TdxClient(" in e for e in EXAMPLES)
    assert any("watch_events" in e for e in EXAMPLES) and any("idempotency_key" in e for e in EXAMPLES)


def test_readme_client_examples_run(server: str, tmp_path: Path) -> None:
    env = {**os.environ, "TDX_SERVER": server, "TDX_TOKEN": ADMIN_TOKEN}
    outputs = []
    for number, code in enumerate(EXAMPLES):
        script = tmp_path / f"example_{number}.py"
        script.write_text(code)
        result = subprocess.run(
            [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, f"example {number} failed:\n{code}\n{result.stdout}{result.stderr}"
        outputs.append(result.stdout)
    # What the comments in the examples promise.
    assert outputs[0].split("\n")[:3] == ["ready", "scheduled py-node-1", "409 host_name_taken"]
    assert "vm.created" in outputs[1]
