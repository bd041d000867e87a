"""``ffkv serve MODEL [--atlas DIR] [--port N]``: the memory debugger in the browser.

The first line on stdout is the server's URL, printed once it accepts connections (``--port 0`` picks a free
port, and the line says which). Everything else (loading, warnings, request logs) goes to stderr.
"""

from __future__ import annotations

import ipaddress
import logging
import sys
from pathlib import Path

import click

from .. import validate
from ..clikit import load_model_from_options, model_options
from ..errors import FfkvError
from .app import LOOPBACK_HOSTS, create_app
from .backend import Backend, Limits

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_host(host: str, allow_remote: bool) -> None:
    """Only this machine may connect unless the user says otherwise: the server runs code on the model
    for anyone who can reach it and has no authentication."""
    if is_loopback(host):
        return
    if not allow_remote:
        raise FfkvError(f"refusing to listen on {host}: the debugger has no authentication and anyone who "
                        f"reaches it can edit the served model",
                        "listen on 127.0.0.1 (the default), or pass --allow-remote if you mean it")
    click.echo(f"ffkv serve: WARNING: listening on {host}: anyone who can reach this address can read and "
               f"edit the model; there is no authentication", err=True)


def url_of(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def make_server(app, host: str = "127.0.0.1", port: int = 8765, on_start=None, log_level: str = "warning"):
    """A uvicorn server for ``app``; ``on_start(url)`` runs once its socket accepts connections (the URL has
    the real port when ``port`` is 0). ``server.run()`` serves until ``server.should_exit`` is set."""
    import uvicorn

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if self.should_exit:  # the bind failed; uvicorn has said why
                return
            bound = self.servers[0].sockets[0].getsockname() if self.servers else (host, port)
            self.url = url_of(host, bound[1])
            if on_start is not None:
                on_start(self.url)

    # No uvicorn log config: its access log writes to stdout, whose first line is the URL.
    config = uvicorn.Config(app, host=host, port=port, log_config=None, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=2)
    return Server(config)


def run_server(app, host: str = "127.0.0.1", port: int = 8765, on_start=None, log_level: str = "warning"):
    """Serve ``app`` until interrupted (see :func:`make_server`)."""
    server = make_server(app, host, port, on_start, log_level)
    server.run()
    if not server.started:
        raise FfkvError(f"the server could not listen on {host}:{port}", "pick another --port (0: any free port)")
    return server


STATE_ENTRIES = ("journal", "stats")  # what a --state folder holds (ffkv.serve.backend.Backend)


def check_inputs(atlas: str | None, state_dir: str | None, cases: str | None) -> None:
    """Refuse, before the model loads, an --atlas that is no atlas, a --state folder that holds something
    else (the server writes its journal there), and --cases that are not a list of CounterFact records."""
    if atlas is not None and not (Path(atlas) / "atlas.json").is_file():
        raise FfkvError(f"--atlas {atlas} is not an atlas (no atlas.json)",
                        "pass a folder written by `ffkv atlas mine`")
    if state_dir is not None:
        d = Path(state_dir)
        if d.is_dir() and any(d.iterdir()) and not any((d / e).exists() for e in STATE_ENTRIES):
            raise FfkvError(f"--state {d} is not an ffkv serve state folder (it holds other files)",
                            "pass a new or empty folder, or one a previous `ffkv serve` wrote")
    if cases is not None:
        validate.records(cases, ("requested_rewrite.prompt", "requested_rewrite.subject",
                                 "requested_rewrite.target_new.str"), what="CounterFact record")


@click.command("serve")
@click.argument("model")
@click.option("--atlas", "atlas", type=click.Path(exists=True, file_okay=False), default=None,
              help="An atlas folder mined on MODEL (`ffkv atlas mine`): trigger examples, patterns, text search.")
@click.option("--port", type=validate.IntRange(0, 65535), default=8765, show_default=True, help="Port (0: any free port).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback needs --allow-remote.")
@click.option("--allow-remote", is_flag=True, help="Allow a non-loopback --host (no authentication: take care).")
@click.option("--state", "state_dir", type=click.Path(file_okay=False), default="ffkv-serve", show_default=True,
              help="Folder of the edit journal (replayed at start, so a restart loses no edit) and edit statistics.")
@click.option("--cases", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A CounterFact JSON file whose records fill the edit form (prompt, paraphrases, neighbours).")
@click.option("--stats-tokens", type=validate.IntRange(1, validate.LIMITS["--stats-tokens"][1]), default=None,
              help="Tokens of the edit statistics E[k k^T] (default: the method's).")
@model_options
def serve(model, atlas, port, host, allow_remote, state_dir, cases, stats_tokens, **load):
    """Serve the memory debugger for MODEL on http://127.0.0.1:PORT/ (prompt view, memory pages, search,
    trace and locate, edit with an undoable journal)."""
    check_host(host, allow_remote)
    check_inputs(atlas, state_dir, cases)
    hp = {"stats_tokens": stats_tokens} if stats_tokens else None
    # No line before the model loads: a refusal is then the only line on stderr.
    backend = Backend(load_model_from_options(model, **load), atlas, state_dir, hp, Limits(), cases)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="ffkv serve: %(message)s")
    if len(backend.journal):
        click.echo(f"ffkv serve: replayed {len(backend.journal)} journal entries from {backend.journal_path}",
                   err=True)

    def started(url):
        click.echo(url)
        sys.stdout.flush()
        click.echo(f"ffkv serve: {backend.model!r} at {url} (Ctrl-C stops)", err=True)

    allowed = list(LOOPBACK_HOSTS) if is_loopback(host) else None
    run_server(create_app(backend, allowed_hosts=allowed), host, port, on_start=started)


# `python -m ffkv.serve` runs this command without the root group: its numbers are validated here too.
validate.harden(serve)
