"""Packaging: the wheel carries the top-level migrations/ as service.migrations and can migrate
from a plain (non-editable) install; the light install (agent, tdxctl, client) needs none of the
service's packages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from sqlalchemy import create_engine, inspect

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
FIXTURE_HOST = ROOT / "tests" / "fixtures" / "hosts" / "ready-cmdline"
# What only the service needs: the agent, tdxctl and the client must work without any of them.
SERVER_ONLY = ("fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic", "psycopg", "pydantic",
               "pydantic_settings", "prometheus_client")


def _package_dirs() -> set[str]:
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "service").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    migrations = (ROOT / "migrations").rglob("__init__.py")
    found |= {"service." + ".".join(p.parent.relative_to(ROOT).parts) for p in migrations}
    return found


def test_every_package_directory_is_listed_in_pyproject() -> None:
    assert set(PYPROJECT["tool"]["setuptools"]["packages"]) == _package_dirs()
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"service.migrations": "migrations"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy of what the wheel is made of: setuptools writes build/ beside pyproject.toml.
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("service", "migrations"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)],
        check=True, capture_output=True, timeout=240,
    )
    (path,) = out.glob("tdx_control_plane-*.whl")
    return path


def test_wheel_carries_the_migrations_inside_the_package(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "service/migrations/env.py" in names
    assert "service/migrations/script.py.mako" in names
    assert any(n.startswith("service/migrations/versions/0001_") for n in names)
    assert "service/static/index.html" in names
    assert not any(n.startswith("migrations/") for n in names), "migrations/ must not be a top-level package"


def test_light_install_requires_no_server_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        requires = [Requirement(line.split(":", 1)[1]) for line in zf.read(meta).decode().splitlines()
                    if line.startswith("Requires-Dist:")]
    base = {r.name for r in requires if r.marker is None}
    assert base == {"httpx", "typer", "rich", "typing-extensions"}
    server = {r.name for r in requires if r.marker is not None and r.marker.evaluate({"extra": "server"})}
    assert {"fastapi", "sqlalchemy", "alembic", "uvicorn", "psycopg"} <= server


def test_a_plain_install_of_the_wheel_migrates(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    db = tmp_path / "fresh.db"
    env = {**os.environ, "PYTHONPATH": str(site), "TDX_DATABASE_URL": f"sqlite:///{db}",
           "TDX_ADMIN_TOKEN": "x" * 40}
    where = subprocess.run(
        [sys.executable, "-c", "import service.migrate as m; print(m.scripts_dir())"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True, timeout=60,
    )
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout
    subprocess.run([sys.executable, "-m", "service.main", "migrate"], cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=120)
    engine = create_engine(f"sqlite:///{db}")
    try:
        assert {"hosts", "vms", "loads", "alembic_version"} <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


# Runs a module's main() with the server's packages made unimportable, as on a light install.
_WITHOUT_SERVER = """
import importlib.abc, runpy, sys
blocked = set(sys.argv[1].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"blocked on a light install: {name}", name=name)
        return None
sys.meta_path.insert(0, Block())
module = sys.argv[2]
sys.argv = [module] + sys.argv[3:]
runpy.run_module(module, run_name="__main__")
"""


def _light(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_SERVER, ",".join(SERVER_ONLY), module, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )


def test_the_agent_runs_without_the_service_packages() -> None:
    r = _light("service.agent.main", "probe", "--root", str(FIXTURE_HOST))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["load"]["kvm_intel_loaded"] is True


def test_tdxctl_and_the_client_run_without_the_service_packages() -> None:
    r = _light("service.cli", "--help")
    assert r.returncode == 0, r.stderr
    assert "hosts" in r.stdout
    r = _light("service.client")
    assert r.returncode == 0, r.stderr


def test_tdx_service_on_a_light_install_says_what_to_install() -> None:
    r = _light("service.main", "migrate")
    assert r.returncode != 0
    assert "tdx-control-plane[server]" in r.stderr
