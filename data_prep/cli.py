"""Shared command-line plumbing of the data_prep scripts."""
from __future__ import annotations

import sys

from pipeline.data.manifest import DataError


def run_cli(function, positional: bool = False) -> None:
    """Run a function as a jsonargparse CLI. A DataError becomes one line on stderr and exit code 2;
    under MPI any error of any rank ends the whole job (`data_prep.mpi.Group.fail`), never a hang."""
    import jsonargparse

    from data_prep.mpi import group

    cli = getattr(jsonargparse, "auto_cli", None) or jsonargparse.CLI
    try:
        cli(function, as_positional=positional)
    except DataError as err:
        try:
            ranks = group()
        except DataError:
            ranks = None
        if ranks is None or ranks.size == 1:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        ranks.fail(err)
    except Exception as err:
        from data_prep.mpi import launched_by_mpi

        if not launched_by_mpi():
            raise
        group().fail(err)
