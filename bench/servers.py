"""The processes a benchmark run starts: the real service, the HTTP-ceiling app, and the databases
they use (a SQLite file in a temporary directory, or a PostgreSQL schema of the run's own)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.wire import Connection

ADMIN_TOKEN = "tdx_bench-admin-" + uuid.uuid4().hex
ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Backend:
    """A fresh, empty database for one scenario."""

    kind: str  # "sqlite" | "postgres"
    url: str
    cleanup_info: str

    @property
    def label(self) -> str:
        return "SQLite" if self.kind == "sqlite" else "PostgreSQL"


@contextlib.contextmanager
def sqlite_backend() -> Iterator[Backend]:
    tmp = tempfile.mkdtemp(prefix="tdx-bench-")
    try:
        yield Backend("sqlite", f"sqlite:///{tmp}/tdx.db", tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def postgres_backend(base_url: str) -> Iterator[Backend]:
    from sqlalchemy import create_engine, text

    schema = f"bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in base_url else "?"
    try:
        yield Backend("postgres", f"{base_url}{sep}options=-csearch_path%3D{schema}", schema)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def postgres_reachable(base_url: str) -> bool:
    from sqlalchemy import create_engine, text

    engine = create_engine(base_url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False
    finally:
        engine.dispose()


@dataclass
class Server:
    """One server process listening on 127.0.0.1:port."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    extra: dict[str, str] = field(default_factory=dict)
    profiler: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        from bench import profile

        profile.stop(self.profiler)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


async def _wait_http(port: int, path: str, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        conn = Connection("127.0.0.1", port)
        try:
            status, _ = await conn.request("GET", path)
            if status == 200:
                return
        except OSError:
            pass
        except Exception:
            pass
        finally:
            conn.close()
        await asyncio.sleep(0.1)
    raise RuntimeError(f"server on port {port} did not answer {path} within {timeout_s} s")


def service_env(backend: Backend, **overrides: str) -> dict[str, str]:
    """Production settings: durable SQLite commits (FULL), request logging on, background tasks on.
    Only the heartbeat timeout is raised, for fleets that do not heartbeat during a scenario, and the
    TD build burst limit, for scenarios whose TDs never report running (no agents)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TDX_")}
    env.update(
        TDX_DATABASE_URL=backend.url,
        TDX_ADMIN_TOKEN=ADMIN_TOKEN,
        TDX_HEARTBEAT_TIMEOUT_S="86400",
        TDX_MAX_TD_BUILDS_PER_HOST="10000",
        PYTHONUNBUFFERED="1",
    )
    env.update(overrides)
    return env


PROFILE_DIR: Path | None = None  # set by --profile: every service process is recorded with py-spy


async def start_service(
    backend: Backend, log_dir: Path, name: str = "service", workers: int = 1, **env: str
) -> Server:
    port = free_port()
    log_path = log_dir / f"{name}-{port}.log"
    cmd = [str(VENV_BIN / "tdx-service"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=service_env(backend, **env), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    server = Server(name, port, proc, log_path)
    try:
        await _wait_http(port, "/readyz", proc)
    except Exception:
        server.stop()
        raise RuntimeError(f"{name} did not start:\n{server.log_tail()}") from None
    if PROFILE_DIR is not None:
        from bench import profile

        server.profiler = profile.start(server.pid, PROFILE_DIR / f"{name}.txt")
    return server


async def start_ceiling(log_dir: Path) -> Server:
    port = free_port()
    log_path = log_dir / f"ceiling-{port}.log"
    cmd = [sys.executable, "-m", "bench.ceiling_app", "--port", str(port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    server = Server("ceiling", port, proc, log_path)
    try:
        await _wait_http(port, "/healthz", proc)
    except Exception:
        server.stop()
        raise RuntimeError(f"the ceiling app did not start:\n{server.log_tail()}") from None
    return server
