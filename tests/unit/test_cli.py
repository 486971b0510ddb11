"""The command line as a user meets it: --version, and every option's help saying its default."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

import ecomsearch
from ecomsearch import cli


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_version_is_the_packages(capsys) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exited:
        cli.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"ecomsearch {ecomsearch.__version__}"
    assert version("ecomsearch") == ecomsearch.__version__


@pytest.mark.parametrize("columns", ["40", "200"])
@pytest.mark.parametrize("name", sorted(subcommands()))
def test_every_option_has_help_that_shows_its_default(
    name: str, columns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A narrow terminal is where argparse's default wrapping cut long default paths in two
    # (a CI checkout under a longer directory failed this way).
    monkeypatch.setenv("COLUMNS", columns)
    parser = subcommands()[name]
    assert isinstance(parser.formatter_class, type)
    assert issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{name} {action.option_strings or action.dest}: no help"
        if action.option_strings and action.default not in (None, argparse.SUPPRESS):
            default = (
                " ".join(map(str, action.default))
                if isinstance(action.default, list)
                else str(action.default)
            )
            shown = f"(default: {default})"
            assert shown in text or f"(default: {action.default})" in text, (
                f"{name} {action.option_strings[0]}: help does not show {shown}"
            )


def test_help_renders_from_the_command_line() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "ecomsearch.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    text = " ".join(completed.stdout.split())
    assert "(default: 8001)" in text and "--model-config-name" in text
