"""Attestation readiness: does the host's quote generation service (QGS) answer?

A TD proves what it runs with a quote, which the VMM asks the host's QGS to sign (QEMU's
``tdx-guest`` ``quote-generation-socket``; Intel's QGS listens on ``/var/run/tdx-qgs/qgs.socket``
by default). Without it, a TD runs but cannot attest. The check is a real connect to the Unix
socket with a short timeout, at every heartbeat: ``True`` when it connects, ``False`` when there is
no socket or nothing accepts (refused, timed out), ``None`` when the agent was told not to check.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

DEFAULT_QGS_SOCKET = "/var/run/tdx-qgs/qgs.socket"
CONNECT_TIMEOUT_S = 1.0
# sun_path holds 108 bytes with its NUL; a longer path is reached through its directory's fd.
_SUN_PATH_MAX = 107


def socket_path(root: Path, configured: str) -> Path:
    """The socket's path on this host: under ``root`` (``/`` on a host, a fixture tree in tests)."""
    return root / configured.lstrip("/")


def qgs_answers(root: Path, configured: str | None, timeout_s: float = CONNECT_TIMEOUT_S) -> bool | None:
    if not configured:
        return None
    path = socket_path(root, configured)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    dir_fd: int | None = None
    try:
        target = str(path)
        if len(os.fsencode(target)) > _SUN_PATH_MAX:
            dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
            target = f"/proc/self/fd/{dir_fd}/{path.name}"
        sock.connect(target)
        return True
    except OSError:  # no such socket, refused, timed out, not a socket, no permission
        return False
    finally:
        sock.close()
        if dir_fd is not None:
            with contextlib.suppress(OSError):
                os.close(dir_fd)
