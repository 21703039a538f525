"""Generated blocks in markdown pages: a benchmark renders its results file between two marker lines of a page,
and a test reads the block back to check that the page still says what the results file holds."""

from __future__ import annotations

from pathlib import Path

__all__ = ["markers", "read_block", "write_block", "add_page_arguments", "render_only"]


def markers(name: str, source: str, command: str) -> tuple[str, str]:
    """The two lines that enclose the block ``name``, generated from ``source`` by ``command``."""
    return (f"<!-- {name}: generated from {source} by `{command}`; do not edit by hand -->",
            f"<!-- end of {name} -->")


def read_block(page: str | Path, begin: str, end: str) -> str:
    """The text between the marker lines (stripped); ``ValueError`` unless each appears exactly once."""
    text = Path(page).read_text()
    if text.count(begin) != 1 or text.count(end) != 1:
        raise ValueError(f"{page} needs exactly one block between the lines {begin!r} and {end!r}")
    return text.split(begin, 1)[1].split(end, 1)[0].strip()


def write_block(page: str | Path, begin: str, end: str, body: str) -> None:
    """Replace the block between the marker lines with ``body``."""
    read_block(page, begin, end)  # checks the markers
    text = Path(page).read_text()
    before, rest = text.split(begin, 1)
    Path(page).write_text(before + begin + "\n\n" + body.strip() + "\n\n" + end + rest.split(end, 1)[1])


def add_page_arguments(parser, results: Path) -> None:
    """The two options every such benchmark has: where its results file is, and a page to render it into."""
    parser.add_argument("--json", default=str(results), help="the results file (default: %(default)s)")
    parser.add_argument("--page", help="render the table from --json into this page, measuring nothing")


def render_only(args, begin: str, end: str, render) -> bool:
    """With ``--page``: write ``render(results)`` into the page's block and return True (nothing to measure)."""
    import json

    if not args.page:
        return False
    write_block(args.page, begin, end, render(json.loads(Path(args.json).read_text())))
    return True
