"""The `genki` entry point: a command line naming a command imports only its module."""

from __future__ import annotations

import argparse
import importlib
import subprocess

import pytest

from engine.cli import COMMAND_MODULES, COMMANDS, build_parser
from tests.conftest import genki_cmd


def test_every_module_registers_exactly_the_commands_the_table_gives_it() -> None:
    for module_name in COMMAND_MODULES:
        subparsers = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module_name).register(subparsers)
        assert sorted(subparsers.choices) == sorted(
            command for command, module in COMMANDS.items() if module == module_name)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_parser_for_one_command_knows_that_command(command: str) -> None:
    parser = build_parser([command])
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert command in subparsers.choices


def test_help_lists_every_command_and_an_unknown_one_is_refused_by_name() -> None:
    listed = subprocess.run(genki_cmd("--help"), capture_output=True, text=True, check=True)
    for command in COMMANDS:
        assert command in listed.stdout
    unknown = subprocess.run(genki_cmd("rnu"), capture_output=True, text=True, check=False)
    assert unknown.returncode == 2
    assert "invalid choice: 'rnu'" in unknown.stderr and "'run'" in unknown.stderr


def test_a_command_starts_without_importing_the_other_commands() -> None:
    probe = ("import sys; from engine.cli import build_parser; build_parser(['status']); "
             "print(sorted(m for m in sys.modules if m in {"
             + ", ".join(repr(m) for m in COMMAND_MODULES) + "}))")
    result = subprocess.run([*genki_cmd()[:1], "-c", probe], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "['engine.pipeline_cli']"
