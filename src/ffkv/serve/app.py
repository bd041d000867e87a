"""The memory debugger's web app: server-side rendered pages over :class:`~ffkv.serve.backend.Backend`.

Routes (every page is a plain GET that renders its result, so a link or a reload shows the same view):

    GET  /                    the prompt form; ``?prompt=TEXT`` the prompt view (``&off=L3.17&on=L2.5=3&positions=all``)
    GET  /memory/L3.17        one memory's page (``?prompt=TEXT``: its rank for that prompt)
    GET  /memory/L3.E2.17     an expert memory's page on a mixture-of-experts model (the same views)
    GET  /search              ``?token=Paris`` | ``?near=L3.17`` | ``?q=text``
    GET  /trace               ``?prompt=&subject=&answer=&paraphrases=``: three causal traces and knowledge neurons
    GET  /edit                the edit form and the journal; POST /edit applies, POST /undo undoes
    GET  /api/info            the served model, atlas and journal as JSON
    /static/...               the CSS, shipped in the package

Endpoints are plain functions, so Starlette runs them in its thread pool while the event loop keeps serving;
the backend's lock serialises the model. A :class:`~ffkv.errors.FfkvError` is shown as its one-line reason with
status 400; any other exception is shown as an internal error with status 500 (never an empty answer).
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path
from urllib.parse import parse_qs, urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from ..errors import FfkvError
from .backend import EDIT_METHODS, Backend

HERE = Path(__file__).parent
log = logging.getLogger("ffkv.serve")
MAX_FORM_BYTES = 64_000


def _lines(text) -> list[str]:
    return [s.strip() for s in str(text or "").splitlines() if s.strip()]


def _heat(value: float, top: float, rgb: str) -> str:
    """A cell's background: the value's share of the heatmap's largest value as the colour's opacity."""
    a = 0.0 if top <= 0 else max(0.0, min(1.0, value / top))
    return f"background: rgba({rgb}, {a:.3f}); color: {'#fff' if a > 0.6 else '#111'}"


def _url(path: str, **params) -> str:
    flat = []
    for k, v in params.items():
        for item in (v if isinstance(v, (list, tuple)) else [v]):
            if item is not None and item != "":
                flat.append((k, item))
    return path + ("?" + urlencode(flat) if flat else "")


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8765
        return host[: host.index("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class GuardMiddleware:
    """Two checks a server on 127.0.0.1 needs, because a web page in the user's browser can reach it too:

    - the Host header must be one of ``allowed_hosts`` (a DNS-rebinding page names its own host);
    - a POST (an edit, an undo) whose Origin header names another host than the request's is refused
      (a cross-site form post).
    """

    def __init__(self, app, allowed_hosts=None):
        self.app = app
        self.allowed = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            host = headers.get("host", "")
            problem = None
            if self.allowed is not None and _host_name(host) not in self.allowed:
                problem = f"host {host!r} is not this server's"
            origin = headers.get("origin")
            if problem is None and scope["method"] == "POST" and origin and origin != "null":
                if origin.split("://", 1)[-1].rstrip("/").lower() != host.lower():
                    problem = f"a page from {origin} may not post to this server"
            if problem is not None:
                response = PlainTextResponse(f"ffkv: error: {problem}.", status_code=403)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(backend: Backend, allowed_hosts: list[str] | None = None) -> Starlette:
    """The ASGI app serving ``backend``. allowed_hosts: the Host header names accepted (None: any; the
    command passes the loopback names when it listens on loopback)."""
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    env = templates.env
    env.filters["pct"] = lambda p: f"{100 * p:.1f}%" if p is not None else "-"
    env.filters["num"] = lambda x, d=3: f"{x:.{d}g}" if x is not None else "-"
    env.filters["tok"] = lambda s: repr(s)[1:-1] if s is not None else ""
    env.globals.update(heat=_heat, url=_url, info=backend.info)

    def page(request: Request, name: str, status: int = 200, **ctx):
        return templates.TemplateResponse(request, name, {"error": None, **ctx}, status_code=status)

    def prompt(request: Request):
        q = request.query_params
        if "prompt" not in q:
            return page(request, "prompt.html", view=None, form={})
        form = {"prompt": q.get("prompt"), "top_n": q.get("top_n", ""),
                "off": [m.strip() for item in q.getlist("off") for m in item.split(",") if m.strip()],
                "on": [m.strip() for item in q.getlist("on") for m in item.split() if m.strip()], "positions": q.get("positions", "all"),
                "max_new_tokens": q.get("max_new_tokens", "")}
        try:
            view = backend.prompt_view(form["prompt"], top_n=form["top_n"], off=form["off"], on=form["on"],
                                       positions=form["positions"], max_new_tokens=form["max_new_tokens"])
        except FfkvError as e:
            return page(request, "prompt.html", 400, view=None, form=form, error=e.line())
        return page(request, "prompt.html", view=view, form=form)

    def memory(request: Request):
        q = request.query_params
        view = backend.memory_page(request.path_params["name"], prompt=q.get("prompt") or None, n=q.get("n"))
        return page(request, "memory.html", view=view)

    def search(request: Request):
        q = request.query_params
        form = {k: q.get(k, "") for k in ("token", "near", "q", "n")}
        result, kind = None, None
        try:
            if form["token"]:
                kind, result = "promotes", backend.search_promotes(form["token"], n=form["n"])
            elif form["near"]:
                kind, result = "nearest", backend.search_nearest(form["near"], n=form["n"])
            elif form["q"]:
                kind, result = "text", backend.search_text(form["q"], n=form["n"])
        except FfkvError as e:
            return page(request, "search.html", 400, form=form, kind=None, result=None, error=e.line())
        return page(request, "search.html", form=form, kind=kind, result=result)

    def trace(request: Request):
        q = request.query_params
        form = {k: q.get(k, "") for k in ("prompt", "subject", "answer", "paraphrases", "samples")}
        form["neurons"] = q.get("neurons", "1") != "0"
        if not form["prompt"]:
            return page(request, "trace.html", form=form, view=None)
        try:
            view = backend.trace(form["prompt"], form["subject"], form["answer"] or None,
                                 _lines(form["paraphrases"]), samples=form["samples"], neurons=form["neurons"])
        except FfkvError as e:
            return page(request, "trace.html", 400, form=form, view=None, error=e.line())
        return page(request, "trace.html", form=form, view=view)

    def edit_page(request: Request, result=None, form=None, error=None, status=200, message=None):
        return page(request, "edit.html", status, form=form or {"method": "rome"}, result=result,
                    journal=backend.journal_rows(), methods=EDIT_METHODS, error=error, message=message)

    def edit_get(request: Request):
        q = request.query_params
        form = {k: q.get(k, "") for k in ("prompt", "subject", "target", "target_true", "paraphrases",
                                           "neighbours")}
        form["method"] = q.get("method", "rome")
        if q.get("case"):
            try:
                form.update(backend.case(q.get("case")))
            except FfkvError as e:
                return edit_page(request, form=form, error=e.line(), status=400)
        return edit_page(request, form=form, message=q.get("message"))

    async def edit_post(request: Request):
        f = await _form(request)
        form = {k: str(f.get(k, "")) for k in ("prompt", "subject", "target", "target_true", "paraphrases",
                                                "neighbours", "method")}
        return await _run_sync(edit_apply, request, form)

    def edit_apply(request: Request, form: dict):
        try:
            result = backend.edit(form["prompt"], form["subject"], form["target"], form["target_true"] or None,
                                  form["method"] or "rome", _lines(form["paraphrases"]), _lines(form["neighbours"]))
        except FfkvError as e:
            return edit_page(request, form=form, error=e.line(), status=400)
        return edit_page(request, result=result, form=form)

    async def undo(request: Request):
        f = await _form(request)
        n = str(f.get("n", "1"))
        return await _run_sync(undo_apply, request, n)

    def undo_apply(request: Request, n: str):
        try:
            done = backend.undo(n)
        except FfkvError as e:
            return edit_page(request, error=e.line(), status=400)
        # See-other: a reload of the journal page does not undo again.
        return RedirectResponse(_url("/edit", message=f"undid {done} journal entr{'y' if done == 1 else 'ies'}"),
                                status_code=303)

    def api_info(request: Request):
        return JSONResponse({**backend.info(), "journal_entries": backend.journal_rows()})

    async def ffkv_error(request: Request, exc: FfkvError):
        return templates.TemplateResponse(request, "error.html", {"error": exc.line(), "status": 400},
                                          status_code=400)

    async def not_found(request: Request, exc):
        status = getattr(exc, "status_code", 404)
        detail = getattr(exc, "detail", "not found")
        return templates.TemplateResponse(request, "error.html", {"error": f"{request.url.path}: {detail}",
                                                                 "status": status}, status_code=status)

    async def internal(request: Request, exc: Exception):
        log.error("internal error on %s\n%s", request.url, "".join(traceback.format_exception(exc)))
        return templates.TemplateResponse(request, "error.html", {
            "error": f"internal error: {type(exc).__name__}: {exc}. Please report it with the URL.",
            "status": 500}, status_code=500)

    routes = [
        Route("/", prompt),
        Route("/memory/{name}", memory),
        Route("/search", search),
        Route("/trace", trace),
        Route("/edit", edit_get, methods=["GET"]),
        Route("/edit", edit_post, methods=["POST"]),
        Route("/undo", undo, methods=["POST"]),
        Route("/api/info", api_info),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={FfkvError: ffkv_error, 404: not_found, 405: not_found,
                                                       Exception: internal},
                    middleware=[Middleware(GuardMiddleware, allowed_hosts=allowed_hosts)])
    app.state.backend = backend
    return app


async def _form(request: Request) -> dict:
    """An url-encoded form body (what the pages post); the first value of each field."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise FfkvError(f"the form has {len(body)} bytes", f"send at most {MAX_FORM_BYTES}")
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}


async def _run_sync(fn, *args):
    # Model work leaves the event loop; the backend's lock orders it.
    return await run_in_threadpool(fn, *args)
