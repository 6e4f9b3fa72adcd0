"""MkDocs hook: the CLI reference, generated from detrkit's argparse parsers at build time.

A page that contains the marker ``<!-- cli-reference -->`` gets, in its place, one section per
command and subcommand (nested ones such as ``data check`` included): a heading and the text of
``format_help()`` in a code block. ``COLUMNS`` is fixed to 100 so that the wrapping, and thus the
page, does not depend on the terminal that runs the build.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator

from mkdocs.exceptions import PluginError

MARKER = "<!-- cli-reference -->"
COLUMNS = "100"


def _walk(
    parser: argparse.ArgumentParser, path: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Yield ``(command path, parser)`` for ``parser`` and every subcommand below it, in order."""
    yield path, parser
    seen: set[int] = set()
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for name, sub in action.choices.items():
            if id(sub) in seen:  # an alias of a subcommand already listed
                continue
            seen.add(id(sub))
            yield from _walk(sub, (*path, name))


def _format_help(parser: argparse.ArgumentParser) -> str:
    saved = {key: os.environ.get(key) for key in ("COLUMNS", "PYTHON_COLORS", "NO_COLOR")}
    os.environ["COLUMNS"] = COLUMNS
    os.environ["PYTHON_COLORS"] = "0"  # argparse colours its help on Python >= 3.14
    os.environ["NO_COLOR"] = "1"
    try:
        return parser.format_help().rstrip()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def cli_reference() -> str:
    """The Markdown of the whole CLI reference."""
    try:
        from detrkit.cli.app import build_parser
    except ImportError as e:
        raise PluginError(f"cli_reference hook: cannot import detrkit.cli.app.build_parser ({e})") from e
    parser = build_parser()
    prog = parser.prog
    sections = []
    for path, sub in _walk(parser, ()):
        level = "#" * min(2 + max(len(path) - 1, 0), 6)
        title = " ".join((prog, *path))
        sections.append(f"{level} `{title}`\n\n```text\n{_format_help(sub)}\n```\n")
    return "\n".join(sections)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, cli_reference())
