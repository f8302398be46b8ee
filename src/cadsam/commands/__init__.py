"""The ``cadsam`` command line: one module per command, each with its ``HELP``, its
``add_arguments(parser)`` and its ``run(args)``; the flags they share are defined once, in
:mod:`cadsam.commands.flags`.

User mistakes raise :class:`~cadsam.errors.CadsamError`, and the parser's own are said the same
way: one line, exit status 1.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from .. import __version__
from ..errors import CadsamError
from . import bench, cache, demo, evaluate, export, params, plan, predict, reproduce, train

# the order --help lists them in
COMMANDS = {
    "params": params,
    "plan": plan,
    "train": train,
    "eval": evaluate,
    "predict": predict,
    "export": export,
    "cache": cache,
    "demo": demo,
    "reproduce": reproduce,
    "bench": bench,
}


# flags a command does not take, but a user may carry over from another: why it needs none
NOT_TAKEN = {
    "cache": {
        flag: f"cache reads images only (no masks needed): drop {flag}"
        for flag in ("--masks", "--mask-suffix", "--mask-threshold", "--resize-masks")
    },
}


class CommandParser(argparse.ArgumentParser):
    """argparse, with its mistakes said as every other user mistake is: one line naming the
    command and the fix, exit status 1 (argparse's own: a usage block and status 2)."""

    commands: dict[str, CommandParser]
    _given: tuple[str, ...] = ()  # what the last parse read: to tell a flag misspelt

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._given = tuple(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        message = message.removeprefix("argument ")
        unknown = self._unknown_flags(self._given)
        if message.startswith("the following arguments are required") and unknown:
            message = self._unknown_message(unknown)  # a misspelt flag, said as such
        self.exit(1, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def reject(self, extras: list[str]) -> NoReturn:
        """Arguments this command does not take: each named, with the flag meant if close."""
        self.error(self._unknown_message(extras))

    def _unknown_flags(self, given: Sequence[str]) -> list[str]:
        """The --flags in ``given`` that none of this parser's flags is (or starts with)."""
        flags = [flag for action in self._actions for flag in action.option_strings]
        names = [text.split("=", 1)[0] for text in given if text.startswith("--") and text != "--"]
        return [name for name in names if not any(flag.startswith(name) for flag in flags)]

    def _unknown_message(self, extras: list[str]) -> str:
        flags = [  # the flags --help shows: an old spelling is never the one suggested
            flag
            for action in self._actions
            if action.help != argparse.SUPPRESS
            for flag in action.option_strings
        ]
        command = self.prog.split()[-1]
        said = []
        for i, text in enumerate(extras):
            if not text.startswith("-"):
                if i == 0 or not extras[i - 1].startswith("-"):  # not the value of the one before
                    said.append(f"unexpected argument {text!r} (settings are given as --flags)")
                continue
            flag = text.split("=", 1)[0]
            hint = NOT_TAKEN.get(command, {}).get(flag)
            close = difflib.get_close_matches(flag, flags, n=1)
            if hint:
                said.append(f"{flag}: {hint}")
            elif close:
                said.append(f"{flag}: no such flag; did you mean {close[0]}?")
            else:
                said.append(f"{flag}: no such flag")
        return "; ".join(said)

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        """A value not among the choices: the close one named, then all of them."""
        choices = action.choices
        if choices is None or value in choices:
            return
        names = [str(choice) for choice in choices]
        flag = action.option_strings[-1] if action.option_strings else ""
        named = action.metavar if isinstance(action.metavar, str) else flag.lstrip("-")
        noun = named.replace("-", " ").lower()
        if action.nargs in ("+", "*") and noun.endswith("s"):
            noun = noun[:-1]  # --backbones X: no such backbone
        what = f"{flag} {value}: no such {noun}" if flag else f"no such {noun} {value}"
        close = difflib.get_close_matches(str(value), names, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise argparse.ArgumentError(None, f"{what}{hint} (choices: {', '.join(names)})")


def build_parser() -> CommandParser:
    parser = CommandParser(
        prog="cadsam",
        description="Adapt Segment Anything to a new segmentation domain with CAD, the "
        "parallel convolutional adapter, or one of its baselines.",
    )
    parser.add_argument("--version", action="version", version=f"cadsam {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = {}
    for name, module in COMMANDS.items():
        sub = commands.add_parser(
            name,
            help=module.HELP,
            description=module.HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(func=module.run)
        module.add_arguments(sub)
        parser.commands[name] = sub
    return parser


def parse_command_line(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The arguments, or (exit 1) one line from the parser of the command that was chosen:
    an argument it does not take is its mistake, not the top level's."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        parser.commands[args.command].reject(extras)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_command_line(argv)
    try:
        args.func(args)
    except CadsamError as exc:
        print(f"cadsam: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        said = system_error_line(exc)
        if said is None:
            raise
        print(f"cadsam: error: {said}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cadsam: interrupted", file=sys.stderr)
        return 130
    return 0


# what the operating system refuses for a reason a user can fix: (verb, the fix)
SYSTEM_ERRORS = {
    errno.ENOSPC: ("write", "free some space there, or write elsewhere"),
    errno.EDQUOT: ("write", "free some of your quota, or write elsewhere"),
    errno.EFBIG: ("write", "write elsewhere"),
    errno.EROFS: ("write", "write elsewhere"),
    errno.EACCES: ("use", "check the permissions of it and its folder, or write elsewhere"),
    errno.EPERM: ("use", "check the permissions of it and its folder, or write elsewhere"),
    errno.ENOTDIR: ("use", "a part of that path is a file, not a folder"),
    errno.EISDIR: ("use", "that is a folder: name a file"),
}


def system_error_line(exc: Exception) -> str | None:
    """One line for an operating-system error a user can fix (a full disk, permissions, a path
    under a file), said by whatever raised it: None for any other exception."""
    if not isinstance(exc, OSError):
        if "No space left on device" not in str(exc):  # safetensors' SafetensorError
            return None
        exc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if exc.errno not in SYSTEM_ERRORS:
        return None
    verb, fix = SYSTEM_ERRORS[exc.errno]
    where = f" {exc.filename}" if exc.filename is not None else ""
    return f"cannot {verb}{where}: {exc.strerror or os.strerror(exc.errno)}; {fix}"
