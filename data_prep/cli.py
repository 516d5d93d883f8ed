"""Shared command-line plumbing of the data_prep scripts."""
from __future__ import annotations

import sys

from pipeline.data.manifest import DataError


def run_cli(function) -> None:
    """Run a function as a jsonargparse CLI; DataError becomes one line on stderr and exit code 2."""
    import jsonargparse

    cli = getattr(jsonargparse, "auto_cli", None) or jsonargparse.CLI
    try:
        cli(function, as_positional=False)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
