"""Sampling profiles of the server processes, with py-spy (``python -m bench --profile DIR``).

Each server a run starts is recorded from its start to its stop into ``DIR/<server>.txt``
(collapsed stacks, the input of flamegraph tools and speedscope). ``python -m bench.profile
FILE`` prints where the time goes: the share of samples under each frame of the service, of the
web stack and of the database drivers.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import subprocess
import sys
from pathlib import Path

INTERESTING = ("service/", "sqlalchemy/", "fastapi/", "starlette/", "uvicorn/", "pydantic", "sqlite3", "psycopg")


def executable() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"  # the venv's, when the venv is not activated
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    exe = executable()
    if exe is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--rate", "200", "--format", "raw", "--output", str(out),
         "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def summarize(path: Path, top: int = 40, only: str = "service/") -> list[tuple[float, str]]:
    """Inclusive share of samples per frame whose file path contains ``only``."""
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        seen = set()
        for frame in stack.split(";"):
            if only not in frame:
                continue
            name, _, where = frame.partition(" (")
            key = f"{name} ({where.rsplit('/', 1)[-1]}"
            if key not in seen:
                seen.add(key)
                inclusive[key] += n
    return [(v / total * 100, k) for k, v in inclusive.most_common(top)] if total else []


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--only", default="service/", help="frames whose path contains this")
    args = parser.parse_args()
    for share, frame in summarize(args.file, args.top, args.only):
        print(f"{share:5.1f}%  {frame}")


if __name__ == "__main__":
    main()
