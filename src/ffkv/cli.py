"""The ``ffkv`` command: a thin layer over the Python API.

Sub-commands live beside the capability they expose (``ffkv/<capability>/cli.py``) and are imported
only when called, so ``ffkv --help`` starts without importing torch. Every :class:`~ffkv.errors.FfkvError`
becomes one line on stderr and exit code 2, and so does every usage error click finds (a missing argument,
an unknown command or option, a value of the wrong type, a missing path, a bad choice):

    ffkv: error: <problem>. Run 'ffkv trace --help' for usage.

The options the commands share (model loading, ``--layers``, ``--json``, ``--quiet``, hyperparameters) come
from :mod:`ffkv.clikit`; docs/cli.md lists them.
"""

from __future__ import annotations

import errno
import importlib
import os
import re
import sys
from pathlib import Path

import click

from . import validate
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
    "serve": "ffkv.serve.cli:serve",
    "explain": "ffkv.memory.explain_cli:explain_cmd",
    "index": "ffkv.recall.ask_cli:index",
    "ask": "ffkv.recall.ask_cli:ask_cmd",
    "dossier": "ffkv.dossier.cli:dossier",
}

# click >= 8.2 shows a group's help for a bare group name through this UsageError; it stays as click prints it.
_HELP_ERRORS = tuple(c for c in (getattr(click.exceptions, "NoArgsIsHelpError", None),) if c is not None)


class OneLineUsageError(click.UsageError):
    """A click usage error rendered as ffkv renders every error: one line, exit code 2."""

    def __init__(self, line: str, ctx=None):
        super().__init__(line, ctx)
        self.exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"ffkv: error: {self.message}", err=True, file=file)


def usage_line(e: click.UsageError) -> str:
    """``<problem>. Run 'ffkv CMD --help' for usage.`` for one of click's usage errors (one line)."""
    problem = " ".join(line.strip() for line in e.format_message().splitlines() if line.strip())
    if problem[:1].isupper() and not problem[1:2].isupper():  # "Missing argument 'MODEL'" -> "missing ..."
        problem = problem[0].lower() + problem[1:]
    # "No such option '--sampels'. Did you mean '--samples'?" -> "... '--sampels' (did you mean '--samples'?)"
    problem = re.sub(r"\.?\s*Did you mean (.*)\?$", r" (did you mean \1?)", problem)
    path = getattr(e, "ffkv_path", None) or (e.ctx.command_path if e.ctx is not None else "")
    words = path.split()
    path = " ".join(["ffkv", *words[1:]])  # the root's name is "ffkv" however it was invoked
    if path == "ffkv" and "command" in problem:
        return FfkvError(problem, "run 'ffkv --help' for the commands").line()
    return FfkvError(problem, f"run '{path} --help' for usage").line()


def _one_line(e: click.UsageError) -> click.UsageError:
    if isinstance(e, (OneLineUsageError, *_HELP_ERRORS)):
        return e
    return OneLineUsageError(usage_line(e), e.ctx)


class Group(click.Group):
    """A group that names the sub-command a context-less usage error came from (click's parser errors,
    e.g. "option '--kind' requires an argument", carry no context), so its one line names the right --help."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            if e.ctx is None and ctx.invoked_subcommand and not hasattr(e, "ffkv_path"):
                e.ffkv_path = f"{ctx.command_path} {ctx.invoked_subcommand}"
            raise


class LazyGroup(Group):
    """The root group: imports a sub-command's module on first use and renders usage errors in one line.

    Sub-commands and nested groups are parsed inside the root's ``invoke``, so catching click's
    :class:`~click.UsageError` here covers every command.
    """

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
        # The one function-level import the house rules allow: sub-commands load when called.
        # Every numeric option goes through ffkv.validate, with its range (validate.LIMITS) in --help.
        return validate.harden(getattr(importlib.import_module(mod), attr), name)

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            raise _one_line(e) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            raise _one_line(e) from None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ffkv")
def cli():
    """ffkv: read, locate, edit and evaluate the key-value memories in a language model's FFN layers."""


def _quiet_transformers() -> None:
    """ffkv shows its own progress; transformers' per-load bars and config warnings are noise here (and a
    refusal must be the only line on stderr)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # The variables are read at import: when this process imported transformers already (ffkv called from
    # Python, the demo, tests), switch its bars off as the variables say.
    tf = sys.modules.get("transformers")
    if tf is not None and os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1":
        tf.utils.logging.disable_progress_bar()


def main(argv=None):
    _quiet_transformers()
    try:
        return cli.main(args=argv, prog_name="ffkv", standalone_mode=False) or 0
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
    except OSError as e:
        line = os_error_line(e)
        if line is None:
            raise
        click.echo(f"ffkv: error: {line}", err=True)
        sys.exit(2)


# What the machine refused (errno -> problem, fix): a full disk, a read-only or forbidden folder. Any other
# OSError is a bug and keeps its traceback.
_OS_ERRORS = {
    errno.ENOSPC: ("no space left on the device", "free some space, or write to another --out"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space, or write to another --out"),
    errno.EROFS: ("the file system is read-only", "write to another --out"),
    errno.EACCES: ("permission denied", "write to a folder you may write to, or change its permissions"),
    errno.EPERM: ("operation not permitted", "write to a folder you may write to, or change its permissions"),
}


def os_error_line(e: OSError) -> str | None:
    """The one line for an OSError the machine raised while ffkv wrote (a full disk, a read-only folder), or
    None when it is no such error."""
    if e.errno not in _OS_ERRORS:
        return None
    problem, fix = _OS_ERRORS[e.errno]
    where = f" writing {e.filename}" if e.filename else ""
    return FfkvError(f"{problem}{where}", fix).line()


if __name__ == "__main__":
    main()
