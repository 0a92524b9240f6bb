"""Commands as data: each package declares its subcommands, their options, help and examples.

A `Command` names what it does, its options (`arg(...)`, argparse's own keywords), one or more
examples and the function that runs it; `add_commands` turns a list of them into subparsers, so
every `--help` is laid out the same way and carries its examples. The fleet CLI collects the
commands of each package (fleet/cli.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Handler = Callable[[argparse.Namespace], int]
Subparsers = argparse._SubParsersAction  # argparse exposes no public name for it


@dataclass(frozen=True, slots=True)
class Arg:
    """One option or positional argument: argparse's flags and keywords, and its group."""

    flags: tuple[str, ...]
    options: dict[str, Any]
    group: str | None = None
    """Title of the argument group it is shown under in `--help` (None: the plain list)."""


def arg(*flags: str, group: str | None = None, **options: Any) -> Arg:
    """An argument, declared with argparse's own keywords (`type`, `default`, `help`, ...)."""
    return Arg(flags, options, group)


@dataclass(frozen=True, slots=True)
class Command:
    """A subcommand: what it does, its arguments and examples, and what runs it."""

    name: str
    help: str
    run: Handler | None = None
    """Runs the command; None for a group whose `children` run."""
    args: Sequence[Arg] = ()
    description: str | None = None
    examples: Sequence[str] = ()
    """Command lines shown under `examples:` in `--help` (a comment may follow a `#`)."""
    children: Sequence[Command] = ()
    """Subcommands (`imu-fleet bundle create|sign|...`), under `dest`."""
    dest: str = "action"
    shared: Callable[[argparse.ArgumentParser], None] | None = None
    """Adds shared options (e.g. the broker login) after `args`."""
    add_help: bool = True
    parser_options: dict[str, Any] = field(default_factory=dict)


def add_commands(sub: Subparsers[argparse.ArgumentParser], commands: Sequence[Command]) -> None:
    """Add each command (and its children) as a subparser that knows its handler."""
    for command in commands:
        parser = sub.add_parser(
            command.name,
            help=command.help,
            description=command.description or _sentence(command.help),
            epilog=examples_text(command.examples),
            formatter_class=argparse.RawDescriptionHelpFormatter,
            add_help=command.add_help,
            **command.parser_options,
        )
        groups: dict[str, argparse._ArgumentGroup] = {}
        for item in command.args:
            target: Any = parser
            if item.group is not None:
                target = groups.setdefault(item.group, parser.add_argument_group(item.group))
            target.add_argument(*item.flags, **item.options)
        if command.shared is not None:
            command.shared(parser)
        if command.run is not None:
            parser.set_defaults(handler=command.run)
        if command.children:
            children = parser.add_subparsers(
                dest=command.dest, required=True, metavar=command.dest.upper()
            )
            add_commands(children, command.children)


def examples_text(examples: Sequence[str]) -> str | None:
    """The `examples:` block of a `--help`, one command line each (None without any)."""
    if not examples:
        return None
    title = "example:" if len(examples) == 1 else "examples:"
    return "\n".join([title, *(f"  {line}" for line in examples)])


def some_of(names: Sequence[str], shown: int = 5) -> str:
    """Names for a message: `a, b, c` or, for many, `a, b, c, d, e and 2,495 more`."""
    if len(names) <= shown:
        return ", ".join(names)
    return f"{', '.join(names[:shown])} and {len(names) - shown:,} more"


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def run_main(program: str, main: Callable[[], int]) -> int:
    """Run a CLI's `main`: its exit status, with the user's mistakes as one line and no
    traceback. A closed output pipe (`imu-node config | head`) ends it quietly, and a
    connection or file the user named that cannot be used says so in one line."""
    try:
        return main()
    except BrokenPipeError:
        with contextlib.suppress(OSError):  # no more output: keep Python from complaining
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr)
        return 130
    except (ConnectionError, OSError) as exc:  # after the CLI's own, more precise handlers
        print(f"{program}: {exc}", file=sys.stderr)
        return 1
