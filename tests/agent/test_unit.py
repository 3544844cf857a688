"""deploy/tdx-agent.service: the agent starts after kvm_intel's autoload, and waits for it to settle."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

from service.agent.main import _parser

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "tdx-agent.service"


def _unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def test_the_unit_starts_after_kvm_intel_is_autoloaded() -> None:
    after = " ".join(UNIT.read_text().split("[Service]")[0].split("After=")[1:])
    assert "systemd-modules-load.service" in after and "systemd-udev-trigger.service" in after


def test_the_units_command_line_is_valid_and_settles() -> None:
    argv = shlex.split(_unit()["Service"]["ExecStart"])
    assert argv[0].endswith("/tdx-agent")
    args = _parser().parse_args([*argv[1:], "--server", "http://127.0.0.1:1", "--token", "t", "--host", "h"])
    assert args.command == "run" and args.settle > 0 and args.interval > 0
