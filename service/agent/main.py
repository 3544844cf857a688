"""``tdx-agent``: ``probe`` prints this host's load facts as JSON; ``run`` reports them and heartbeats.

Exit codes: 0 done, 1 stopped by the server or the host (one line on stderr: a refused token, an
unknown host, a refused load, an unwritable state dir, an unreadable boot id, ``--once`` with the
server down), 2 bad arguments, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from service.agent.attestation import DEFAULT_QGS_SOCKET
from service.agent.loop import DEFAULT_SETTLE_S, Agent, AgentConfig, AgentError
from service.agent.probe import ProbeError, probe
from service.agent.state import StateStore
from service.agent.vmm import AUTO, VmmProbe
from service.client import ApiError, TdxClient

PROG = "tdx-agent"
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
DEFAULT_STATE_DIR = "/var/lib/tdx-agent"


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one line on stderr, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Reports this host's kvm_intel/TDX load to the TDX control plane.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def host_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--root", default="/", help="read the host's files under this directory (default /)")
        p.add_argument(
            "--kernel-log", default=None, metavar="PATH",
            help="kernel log to read (default <root>/dev/kmsg; on / falls back to dmesg when unreadable)",
        )

    def observer_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--qgs-socket", default=os.environ.get("TDX_QGS_SOCKET", DEFAULT_QGS_SOCKET), metavar="PATH",
            help=f"the quote generation service's Unix socket, under --root (default {DEFAULT_QGS_SOCKET}; "
            "'none': do not check attestation)",
        )
        p.add_argument("--qemu", default=AUTO, metavar="PATH",
                       help="the QEMU binary, under --root (default auto: qemu-system-x86_64 or qemu-kvm; 'none')")
        p.add_argument("--virsh", default=AUTO, metavar="PATH",
                       help="virsh, for libvirt's domain capabilities (default auto; 'none')")
        p.add_argument("--domcapabilities", default=None, metavar="FILE",
                       help="read libvirt's domain capabilities from this file (under --root) instead of virsh")

    p_probe = sub.add_parser(
        "probe", help="print what would be reported now as JSON: {load: <load report>, heartbeat: <observations>}"
    )
    host_args(p_probe)
    observer_args(p_probe)

    p_run = sub.add_parser("run", help="report the kvm_intel load, then heartbeat")
    host_args(p_run)
    observer_args(p_run)
    p_run.add_argument("--server", default=os.environ.get("TDX_SERVER"), help="service URL (env TDX_SERVER)")
    p_run.add_argument("--token", default=os.environ.get("TDX_TOKEN"), help="agent token (env TDX_TOKEN)")
    p_run.add_argument("--host", default=os.environ.get("TDX_HOST"), help="this host's name (env TDX_HOST)")
    p_run.add_argument("--interval", type=float, default=10.0, help="seconds between heartbeats (default 10)")
    p_run.add_argument(
        "--state-dir", default=os.environ.get("STATE_DIRECTORY") or DEFAULT_STATE_DIR,
        help=f"where the reported load is kept (default $STATE_DIRECTORY or {DEFAULT_STATE_DIR})",
    )
    p_run.add_argument(
        "--settle", type=float, default=DEFAULT_SETTLE_S, metavar="SECONDS",
        help="wait this long for kvm_intel (autoloaded at boot, or being reloaded) before reporting it "
        f"not loaded (default {DEFAULT_SETTLE_S:g})",
    )
    p_run.add_argument("--once", action="store_true", help="one load report and one heartbeat, then exit")
    return parser


def _root(value: str) -> Path:
    root = Path(value)
    if not root.is_dir():
        raise UsageError(f"--root {value!r} is not a directory")
    return root


def _optional(value: str | None) -> str | None:
    """A path option; 'none' (or empty) turns the check off."""
    return None if value is None or value.strip().lower() in ("", "none") else value


def _vmm(args: argparse.Namespace, root: Path) -> VmmProbe:
    return VmmProbe(root, _optional(args.qemu), _optional(args.virsh), args.domcapabilities)


def _run_config(args: argparse.Namespace) -> tuple[str, str, AgentConfig]:
    if not args.server:
        raise UsageError("--server (or TDX_SERVER) is required")
    if not args.token:
        raise UsageError("--token (or TDX_TOKEN) is required")
    if not args.host:
        raise UsageError("--host (or TDX_HOST) is required")
    if not str(args.server).startswith(("http://", "https://")):
        raise UsageError(f"--server {args.server!r} must be an http:// or https:// URL")
    if not _NAME.match(args.host):
        raise UsageError(f"--host {args.host!r} is not a valid host name (lowercase letters, digits, '-', 1..63)")
    if not args.interval > 0:
        raise UsageError("--interval must be > 0 seconds")
    if not 0 <= args.settle <= 3600:
        raise UsageError("--settle must be between 0 and 3600 seconds")
    config = AgentConfig(
        host=args.host, root=_root(args.root), kernel_log=args.kernel_log, interval_s=args.interval, once=args.once,
        settle_s=args.settle, qgs_socket=_optional(args.qgs_socket), qemu=_optional(args.qemu),
        virsh=_optional(args.virsh), domcapabilities=args.domcapabilities,
    )
    return args.server, args.token, config


@contextlib.contextmanager
def _log_to_stderr() -> Iterator[None]:
    logger = logging.getLogger("tdx.agent")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def _run(args: argparse.Namespace) -> int:
    server, token, config = _run_config(args)
    # The client's own retries would sleep where the agent cannot see it: the agent retries.
    with _log_to_stderr(), TdxClient(server, token, retries=0) as client:
        Agent(client, config, StateStore(Path(args.state_dir))).run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.command == "probe":
            root = _root(args.root)
            report = probe(root, args.kernel_log, _optional(args.qgs_socket), _vmm(args, root))
            print(json.dumps(report, indent=2))
            return 0
        return _run(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except (AgentError, ApiError, ProbeError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
