"""``docs/cli.md``, written from the parsers themselves so that it cannot drift from them:
``python -m cadsam.commands.reference > docs/cli.md`` (a test checks it is current)."""

from __future__ import annotations

import argparse

HEADER = """# The command line

Every command and flag, generated from the parsers (`python -m cadsam.commands.reference >
docs/cli.md`). A flag means the same in every command that takes it; a user mistake is one line,
`cadsam COMMAND: error: ...`, with exit status 1. Back to the [README](../README.md).
"""


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the cadsam parser has no subcommands")


def _value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    name = action.metavar or (
        "{" + ",".join(map(str, action.choices)) + "}" if action.choices else action.dest.upper()
    )
    return f"{name} ..." if action.nargs in ("+", "*") else str(name)


def _row(action: argparse.Action) -> str:
    flags = ", ".join(f"`{flag}`" for flag in action.option_strings)
    value = _value(action)
    help_text = (action.help or "").replace("|", "\\|").replace("\n", " ")
    help_text = help_text.replace("<", "&lt;").replace(">", "&gt;")  # not read as HTML tags
    if action.required:
        help_text += " (required)"
    return f"| {flags} | {f'`{value}`' if value else ''} | {help_text} |"


def command_reference(name: str, parser: argparse.ArgumentParser) -> str:
    lines = [f"## `cadsam {name}`", "", parser.description or "", ""]
    lines += ["| flag | value | what it does |", "| --- | --- | --- |"]
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or "--help" in action.option_strings:
            continue
        lines.append(_row(action))
    if parser.epilog:
        lines += ["", "```text", parser.epilog.strip(), "```"]
    return "\n".join(lines) + "\n"


def cli_reference() -> str:
    from . import build_parser

    parser = build_parser()
    parts = [HEADER]
    parts += [command_reference(name, sub) for name, sub in subcommands(parser).items()]
    return "\n".join(parts)


if __name__ == "__main__":
    print(cli_reference(), end="")
