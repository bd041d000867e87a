"""The ``ffkv`` command: a thin layer over the Python API.

Sub-commands live beside the capability they expose (``ffkv/<capability>/cli.py``) and are imported
only when called, so ``ffkv --help`` starts without importing torch. Every :class:`~ffkv.errors.FfkvError`
becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import click

from ._version import __version__
from .errors import FfkvError

# name -> "module:attribute"; each attribute is a click command or group.
COMMANDS: dict[str, str] = {
    "census": "ffkv.models.cli:census",
    "inspect": "ffkv.models.cli:inspect_cmd",
    "testbed": "ffkv.testbed.cli:testbed",
    "atlas": "ffkv.memory.cli:atlas",
    "trace": "ffkv.locate.cli:trace",
    "neurons": "ffkv.locate.cli:neurons",
    "edit": "ffkv.edit.cli:edit",
    "evaluate": "ffkv.evaluate.cli:evaluate",
    "recall": "ffkv.recall.cli:recall",
    "demo": "ffkv.demo:demo",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(n for n in COMMANDS if self._available(n))

    @staticmethod
    def _available(name: str) -> bool:
        # A file check, not an import: listing commands must not import torch.
        mod = COMMANDS[name].split(":")[0].split(".")[1:]
        return Path(__file__).parent.joinpath(*mod).with_suffix(".py").exists()

    def get_command(self, ctx, name):
        if name not in COMMANDS or not self._available(name):
            return None
        mod, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(mod), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ffkv")
def cli():
    """ffkv: read, locate, edit and evaluate the key-value memories in a language model's FFN layers."""


def _quiet_transformers() -> None:
    """ffkv shows its own progress; transformers' per-load bars and config warnings are noise here."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv=None):
    _quiet_transformers()
    try:
        return cli.main(args=argv, standalone_mode=False) or 0
    except FfkvError as e:
        click.echo(f"ffkv: error: {e.line()}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("ffkv: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
