"""The labelling web server: one static page and a small JSON API, on Starlette served by uvicorn.

Routes (every ``/api/`` route except ``health`` requires the token when one is set, sent
as the ``X-Lmgym-Token`` header):

- ``GET /``: the page (``page.html``), with a per-response nonce in its Content-Security-Policy.
- ``GET /api/next?session=S``: the item session ``S`` should rank, with progress.
- ``POST /api/rankings`` ``{"session", "id", "tiers", "labeller"}``: append a ranking (201),
  or 409 if the item was ranked already; nothing is written on any error.
- ``POST /api/skip`` ``{"session", "id"}`` and ``POST /api/unskip`` ``{"session"}``.

Safety: completions reach the page as JSON and are inserted with ``textContent``, never
as HTML, and the CSP allows no script but the page's own. Requests must name this server
in their ``Host`` header when no token is set (so a web page cannot reach it by DNS
rebinding), and POST bodies must be ``application/json`` (so a cross-site form cannot post
without a CORS preflight, which this server never grants), small, and exactly the fields above.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
import secrets
import socket
from importlib import resources

from lmgym.label.queue import AlreadyRanked, LabelQueue, UnknownItem

__all__ = ["create_app", "bind_socket", "serve", "is_loopback", "require_web_stack", "MissingDependency"]

MAX_BODY_BYTES = 16 * 1024
"""Largest request body accepted: a ranking is a few hundred bytes."""

_SESSION = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


class MissingDependency(ImportError):
    """The ``label`` extra (Starlette, uvicorn) is not installed."""


def require_web_stack() -> None:
    """Raise MissingDependency (with the pip command) unless Starlette and uvicorn import."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise MissingDependency(f"lmgym label needs Starlette and uvicorn ({err.name} is missing): "
                                "pip install 'lmgym[label]'") from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback interface only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _page_template() -> str:
    return resources.files("lmgym.label").joinpath("page.html").read_text(encoding="utf-8")


def create_app(queue: LabelQueue, *, token: str | None = None):
    """The Starlette application serving ``queue``; ``token`` (if given) guards every API route."""
    require_web_stack()
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    template = _page_template()

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    def guard(request, *, needs_token: bool = True) -> None:
        """Refuse requests for another host name (no token) or without the right token."""
        if token is None:
            if request.url.hostname not in _LOOPBACK_NAMES:
                raise _BadRequest(421, f"this server only answers requests addressed to 127.0.0.1 or localhost, "
                                       f"not {request.url.hostname!r}")
        elif needs_token:
            given = request.headers.get("x-lmgym-token", "")
            if not hmac.compare_digest(given.encode("utf-8", "replace"), token.encode("utf-8")):
                raise _BadRequest(401, "missing or wrong token: open the URL printed by `lmgym label`, "
                                       "which carries ?token=...")

    def check_session(value) -> str:
        if not isinstance(value, str) or not _SESSION.match(value):
            raise _BadRequest(400, "'session' must be 8 to 64 letters, digits, '-' or '_'")
        return value

    async def read_json(request, fields: dict[str, bool]) -> dict:
        """The JSON object body, checked for type, size and exactly the given fields (name -> required)."""
        guard(request)
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            raise _BadRequest(415, "the body must be JSON sent with Content-Type: application/json")
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdecimal() or int(declared) > MAX_BODY_BYTES):
            raise _BadRequest(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise _BadRequest(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            raise _BadRequest(400, "the body is not valid JSON (UTF-8)") from None
        if not isinstance(data, dict):
            raise _BadRequest(400, f"the body must be a JSON object, not {type(data).__name__}")
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise _BadRequest(400, f"unknown field(s) {unknown}; expected {sorted(fields)}")
        missing = sorted(name for name, required in fields.items() if required and name not in data)
        if missing:
            raise _BadRequest(400, f"missing field(s) {missing}")
        check_session(data["session"])
        if "id" in data and not isinstance(data["id"], str):
            raise _BadRequest(400, "'id' must be a string")
        return data

    def handled(handler):
        async def endpoint(request):
            try:
                return await handler(request)
            except _BadRequest as err:
                return error(err.status, str(err))
            except UnknownItem as err:
                return error(404, err.args[0])
            except AlreadyRanked as err:
                return error(409, str(err))
        return endpoint

    def item_json(item):
        return None if item is None else {"id": item.id, "prompt": item.prompt, "completions": list(item.completions)}

    @handled
    async def page(request):
        guard(request, needs_token=False)
        nonce = secrets.token_urlsafe(16)
        headers = {
            "Content-Security-Policy": f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
                                       "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
                                       "frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",  # the URL may carry the token
            "Cache-Control": "no-store",
        }
        return HTMLResponse(template.replace("{{nonce}}", nonce), headers=headers)

    @handled
    async def health(request):
        guard(request, needs_token=False)
        return JSONResponse({"ok": True})

    @handled
    async def next_item(request):
        guard(request)
        session = check_session(request.query_params.get("session"))
        item, progress, skipped = await run_in_threadpool(queue.next_for, session)
        return JSONResponse({"item": item_json(item), "progress": progress, "skipped": skipped},
                            headers={"Cache-Control": "no-store"})

    @handled
    async def rankings(request):
        data = await read_json(request, {"session": True, "id": True, "tiers": True, "labeller": True})
        labeller = data["labeller"]
        if not isinstance(labeller, str) or not labeller.strip() or len(labeller) > 100 \
                or any(ch < " " for ch in labeller):
            raise _BadRequest(422, "'labeller' must be a name of 1 to 100 printable characters")
        try:
            await run_in_threadpool(queue.submit, data["session"], data["id"], data["tiers"], labeller.strip())
        except ValueError as err:
            raise _BadRequest(422, str(err)) from None
        return JSONResponse({"saved": True, "progress": await run_in_threadpool(queue.progress)}, status_code=201)

    @handled
    async def skip(request):
        data = await read_json(request, {"session": True, "id": True})
        await run_in_threadpool(queue.skip, data["session"], data["id"])
        return JSONResponse({"skipped": True})

    @handled
    async def unskip(request):
        data = await read_json(request, {"session": True})
        await run_in_threadpool(queue.unskip, data["session"])
        return JSONResponse({"unskipped": True})

    async def favicon(request):
        return Response(status_code=204)  # no icon; answering keeps browsers' consoles free of 404s

    routes = [Route("/", page), Route("/favicon.ico", favicon), Route("/api/health", health),
              Route("/api/next", next_item),
              Route("/api/rankings", rankings, methods=["POST"]), Route("/api/skip", skip, methods=["POST"]),
              Route("/api/unskip", unskip, methods=["POST"])]
    return Starlette(routes=routes)


def check_port(port) -> int:
    """``port`` if it is a TCP port number (0 picks a free one); ValueError naming --port otherwise."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"--port must be a TCP port number from 0 to 65535 (0 picks a free one), got {port!r}")
    return port


def bind_socket(host: str = "127.0.0.1", port: int = 8765) -> socket.socket:
    """A listening TCP socket (port 0 picks a free one); bound here so the printed URL has the real port."""
    check_port(port)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({err.strerror}); choose another --port or --host") from None
    sock.listen(64)
    return sock


def serve(app, sock: socket.socket) -> None:
    """Run uvicorn on ``sock`` until Ctrl-C or SIGTERM (every confirmed ranking is already on disk)."""
    require_web_stack()
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])
