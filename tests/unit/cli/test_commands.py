"""Every `pvmig` command reaches a handler: each subcommand's parser names a function of
its command group (a parser variable once shadowed the demo's handler)."""

from __future__ import annotations

import argparse
import inspect

from pvmig.cli import main


def _leaves(parser: argparse.ArgumentParser, path=()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, child in subs[0].choices.items():
        yield from _leaves(child, (*path, name))


def test_every_command_has_a_handler_function():
    leaves = list(_leaves(main._parser()))
    assert len(leaves) >= 17  # agent, certs x2, domain x4, migrate ... demo
    for path, parser in leaves:
        func = parser.get_default("func")
        assert inspect.isfunction(func), (path, func)
        assert func.__module__.startswith("pvmig.cli."), (path, func.__module__)
