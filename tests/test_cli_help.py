"""Every `slurmctl` command explains itself: `--help` with examples that are real command lines of that command."""

from __future__ import annotations

import shlex

import pytest
from support.jobs import run_cli

from slurmctl.cli.root import build_parser

# The operator's CLI as issue 14 lists it.
COMMANDS = ["submit", "status", "pause", "resume", "retry", "rate", "analyze-errors", "aggregate", "cancel",
            "capacity", "alerts", "iam-policy", "server",
            "list", "gc"]  # issue 25


def examples(command: str) -> list[list[str]]:
    """The example command lines at the end of ``command``'s help, as argv (pipes and comments left out)."""
    epilog = build_parser()._subparsers._group_actions[0].choices[command].epilog or ""
    assert epilog.startswith("examples:"), f"`slurmctl {command} --help` has no examples"
    found = []
    for line in epilog.splitlines()[1:]:
        line = line.split("$(", 1)[-1].split(")", 1)[0]  # the command inside a shell substitution
        for end in (" | ", " > ", "  #"):
            line = line.split(end, 1)[0]
        found.append(shlex.split(line))
    return [argv for argv in found if argv]


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help_with_examples_that_parse(command: str):
    found = examples(command)
    assert found, f"`slurmctl {command} --help` shows no example command"
    for argv in found:
        assert argv[:2] == ["slurmctl", command], argv
        argv = argv[1:]
        build_parser().parse_args(argv)  # argparse exits (SystemExit) on an example that is not a valid command


def test_the_top_level_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    listed = result.stdout.split("{", 1)[1].split("}", 1)[0].split(",")
    assert sorted(listed) == sorted(COMMANDS)
