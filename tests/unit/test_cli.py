"""Command-line surfaces: the global flags work before or after the command name, and the
kill switch has its release on both CLIs."""

from __future__ import annotations

import pytest

from loaderd.cli import loaderctl as ctl
from loaderd.cli import loaderd as cli


@pytest.mark.parametrize("make", [cli.parser, ctl.parser])
@pytest.mark.parametrize("argv", [["--debug", "status"], ["status", "--debug"]])
def test_debug_before_or_after_the_command(make: object, argv: list[str]) -> None:
    args = make().parse_args(argv)  # type: ignore[operator]
    assert args.debug is True and args.command == "status"


@pytest.mark.parametrize("make", [cli.parser, ctl.parser])
def test_debug_defaults_off_and_config_is_accepted_after_the_command(make: object) -> None:
    args = make().parse_args(["status", "--config", "/x.yaml"])  # type: ignore[operator]
    assert args.debug is False and args.config == "/x.yaml"


@pytest.mark.parametrize("make", [cli.parser, ctl.parser])
def test_disable_has_its_enable(make: object) -> None:
    for command in ("disable", "enable", "rollback"):
        assert make().parse_args([command]).command == command  # type: ignore[operator]


def test_check_takes_jobs() -> None:
    assert cli.parser().parse_args(["check", "--jobs", "3"]).jobs == 3
