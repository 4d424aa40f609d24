"""The `vargpt` command line: thin entry points over the library.

Each command parses its arguments, calls one library function and prints or writes the result.
Errors a user can cause are `VargptError`s: printed as one line on stderr with a non-zero exit and no
traceback (``--debug`` anywhere on the command line shows the traceback instead).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from vargpt import __version__
from vargpt.errors import VargptError

app = typer.Typer(
    name="vargpt",
    help="VARGPT-v1.1: understand images, generate and edit them. With no --model, the embedded default.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Build datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

EXIT_USER_ERROR = 2


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"vargpt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """VARGPT-v1.1 command line."""


# ----------------------------------------------------------------------------------------------- data


@data_app.command("shapesworld")
def data_shapesworld(
    out: Annotated[Path, typer.Option("--out", help="Output directory (records.jsonl + images).")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of scenes.")] = 1000,
    split: Annotated[str, typer.Option("--split", help="train, val or test.")] = "train",
    size: Annotated[int, typer.Option("--size", help="Image size in pixels: 64, 128, 256 or 512.")] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Dataset seed (same seed -> same bytes).")] = 0,
) -> None:
    """Write a ShapesWorld dataset: DIR/records.jsonl and the images beside it."""
    from vargpt.data.shapesworld import write_dataset

    summary = write_dataset(out, n=n, split=split, size=size, seed=seed)
    typer.echo(json.dumps(summary))


# ----------------------------------------------------------------------------------------------- entry


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        app(args=args, prog_name="vargpt", standalone_mode=False)
    except VargptError as e:
        if debug:
            raise
        typer.echo(f"error: {e}", err=True)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # click usage errors and anything unexpected: still one line without --debug
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        if debug:
            raise
        typer.echo(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)", err=True)
        sys.exit(1)
