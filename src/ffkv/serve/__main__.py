"""``python -m ffkv.serve MODEL ...``: the same as ``ffkv serve MODEL ...``."""

import sys

import click

from ..errors import FfkvError
from .cli import serve

if __name__ == "__main__":
    try:
        serve.main(prog_name="ffkv serve", standalone_mode=False)
    except FfkvError as e:
        click.echo(f"ffkv: error: {e.line()}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
