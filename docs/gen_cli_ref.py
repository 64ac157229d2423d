"""Generate the command-line reference page ``cli.md`` from the argparse parser (run by mkdocs-gen-files).

The page is built from :func:`birdnet_stm32.cli.build_parser` at build time, so every subcommand, flag, default and
help text shown in the docs is the one the program has; nothing is retyped. ``birdnet_stm32.cli`` imports no
TensorFlow, so this costs well under a second.
"""

import argparse
import re

import mkdocs_gen_files

from birdnet_stm32.cli import build_parser

USAGE_WIDTH = 76  # fits the content column of the site without horizontal scrolling


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """``(name, one-line help, parser)`` of every subcommand, in the order ``--help`` lists them."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return [(choice.dest, choice.help or "", action.choices[choice.dest]) for choice in action._choices_actions]
    return []


def usage(parser: argparse.ArgumentParser) -> str:
    """The parser's usage line, wrapped at :data:`USAGE_WIDTH` columns whatever the terminal is."""
    parser.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=USAGE_WIDTH)
    return parser.format_usage().strip()


def prose(text: str) -> str:
    """Make help text safe as Markdown: outside code spans, ``<`` and ``>`` are escaped so ``DIR/<class>`` shows."""
    pieces = re.split(r"(`+[^`]*`+)", text)
    return "".join(p if p.startswith("`") else p.replace("<", "&lt;").replace(">", "&gt;") for p in pieces)


def cell(text: str) -> str:
    """Make ``text`` safe for a Markdown table cell: escape ``|`` and, outside code spans, ``<`` and ``>``."""
    return prose(text.replace("|", "\\|"))


def help_text(action: argparse.Action, prog: str) -> str:
    """The help of ``action`` with argparse's ``%(...)s`` placeholders expanded, as ``--help`` prints it."""
    params = {**vars(action), "prog": prog}
    params = {k: getattr(v, "__name__", v) for k, v in params.items()}
    text = (action.help or "") % params
    if action.required:
        text = f"**Required.** {text}"
    return text


def value_name(action: argparse.Action) -> str:
    """What follows the flag on the command line (empty for switches)."""
    if action.nargs == 0:
        return ""
    if action.metavar is not None:
        return str(action.metavar)
    return action.dest.upper() if action.option_strings else action.dest


def options_table(parser: argparse.ArgumentParser) -> list[str]:
    """Markdown tables of ``parser``'s arguments, one per argument group, ``--help`` omitted."""
    lines: list[str] = []
    for group in parser._action_groups:
        actions = [
            a
            for a in group._group_actions
            if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction) and a.help != argparse.SUPPRESS
        ]
        if not actions:
            continue
        lines += [f"**{group.title.capitalize()}**", ""]
        if group.title.startswith("settings"):
            lines += [
                "These flags override the same setting from `--config FILE.yaml`; their defaults are the "
                "[config dataclasses][birdnet_stm32.config].",
                "",
            ]
        lines += ["| Option | Value | Description |", "|---|---|---|"]
        for action in actions:
            flags = ", ".join(f"`{flag}`" for flag in action.option_strings) or f"`{action.dest}`"
            value = value_name(action)
            lines.append(f"| {flags} | {f'`{value}`' if value else ''} | {cell(help_text(action, parser.prog))} |")
        lines.append("")
    return lines


def render(parser: argparse.ArgumentParser) -> str:
    """The whole CLI reference page as Markdown."""
    lines = [
        "# Command line",
        "",
        "Generated from the program's own argument parser; `birdnet-stm32 COMMAND --help` prints the same.",
        "`python -m birdnet_stm32` and `python scripts/<command>.py` (with `_` for `-`, e.g. `scripts/find_lr.py`) "
        "are the same program.",
        "",
        "Exit codes: 0 success, 1 a check failed (for example a bad LR sweep or a failed export audit), "
        "2 a user error (one line on stderr naming the flag, file or setting), 130 interrupted.",
        "",
        prose(parser.description or ""),
        "",
        "```text",
        usage(parser),
        "```",
        "",
        *options_table(parser),
        "| Command | Does |",
        "|---|---|",
        *(f"| [`{name}`](#{name}) | {cell(text)} |" for name, text, _ in subcommands(parser)),
        "",
    ]
    for name, _, sub in subcommands(parser):
        lines += [f"## {name}", "", prose(sub.description or ""), "", "```text", usage(sub), "```", ""]
        lines += options_table(sub)
    return "\n".join(lines)


with mkdocs_gen_files.open("cli.md", "w") as page:
    page.write(render(build_parser()))
