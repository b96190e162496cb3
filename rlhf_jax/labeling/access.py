"""Who may talk to the labeling server, and the server itself.

- Labelers: with a token (a server others can reach), every labeler request carries it
  (``?token=`` or the ``X-Label-Token`` header). Without one (bound to a loopback address),
  only requests addressed to a loopback name are answered: ``Host`` must be ``localhost`` or
  a loopback address (``127.0.0.1``, ``[::1]``; a DNS-rebinding page's requests carry its own
  host name) and an ``Origin``, when sent, must be the page's own (another site's page).
- The lead (``/admin``): always a token of its own, which the labelers' token does not open.
- The access log shows ``token=<hidden>`` instead of any token, right or wrong.
- Bodies: at most :data:`MAX_BODY_BYTES`, with or without a ``Content-Length`` (a chunked
  body over the limit is refused whole, not cut and parsed).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import pathlib
import re
import secrets
from typing import Any

from werkzeug.exceptions import Forbidden, RequestEntityTooLarge, UnprocessableEntity
from werkzeug.serving import WSGIRequestHandler
from werkzeug.wrappers import Request

MAX_BODY_BYTES = 16 * 1024  # a submission is ~100 bytes per response; nothing needs more
TOKENS_NAME = ".access.json"  # in the labels directory, readable by its owner only


class BadRequest(UnprocessableEntity):
    """A well-formed request whose content is wrong (422)."""


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` keeps the server to this machine (``localhost``,
    ``127.0.0.0/8``, ``::1``); every other address needs a token."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def load_tokens(directory: pathlib.Path) -> dict[str, str]:
    """``{"token", "admin_token"}``, made once per labels directory and kept (mode 0600), so a
    restarted server has the same addresses. Delete the file to issue new ones."""
    path = directory / TOKENS_NAME
    if path.is_file():
        try:
            tokens = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not JSON ({err.msg}); delete it to issue new access tokens") from None
        if isinstance(tokens, dict) and all(isinstance(tokens.get(k), str) and len(tokens[k]) >= 16
                                            for k in ("token", "admin_token")):
            return tokens
        raise ValueError(f"{path}: needs \"token\" and \"admin_token\" strings of 16+ characters; "
                         "delete it to issue new access tokens")
    tokens = {"token": secrets.token_urlsafe(24), "admin_token": secrets.token_urlsafe(24)}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(tokens, f)
    return tokens


def given_token(request: Request) -> str:
    return request.headers.get("X-Label-Token") or request.args.get("token") or ""


def token_matches(request: Request, token: str) -> bool:
    return hmac.compare_digest(given_token(request).encode(), token.encode())


def check_token(request: Request, token: str, lead: bool = False) -> None:
    """Raises 403 unless the request carries ``token`` (the labelers' or, ``lead``, the lead's)."""
    if not token_matches(request, token):
        where = "the lead's address the server printed (it ends in /admin?token=...)" if lead else \
            "the address the server printed (it ends in ?token=...)"
        raise Forbidden(f"missing or wrong {'lead' if lead else 'access'} token: open {where}")


def check_local(request: Request) -> None:
    """Raises 403 unless the request is addressed to a loopback name and, when it says where
    it comes from (``Origin``), comes from this server's own page."""
    host = _host_name(request.host)
    if not is_loopback(host):
        raise Forbidden(f"this server answers only requests to 127.0.0.1 or localhost, not {host!r} "
                        "(start it with --host to serve other machines)")
    origin = request.headers.get("Origin")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        raise Forbidden(f"a request from another site ({origin}) is refused")


def _host_name(host: str) -> str:
    """``Host`` header without its port: ``127.0.0.1:8765 -> 127.0.0.1``, ``[::1]:80 -> ::1``."""
    host = host.lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def read_json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object; 413 past :data:`MAX_BODY_BYTES` (declared or streamed), 422
    if it is not JSON or not an object."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise RequestEntityTooLarge(f"body of {request.content_length} bytes; at most {MAX_BODY_BYTES}")
    if request.mimetype != "application/json":
        raise BadRequest(f"Content-Type must be application/json, got {request.mimetype or 'none'!r}")
    # one byte past the limit: a chunked body (no length) that goes on is refused, not cut off
    stream = request.environ["wsgi.input"] if request.content_length is None else request.stream
    if request.content_length is None and not request.environ.get("wsgi.input_terminated"):
        data = b""  # no length and a server that does not end the stream: nothing safe to read
    else:
        data = _read_at_most(stream, MAX_BODY_BYTES + 1)
    if len(data) > MAX_BODY_BYTES:
        raise RequestEntityTooLarge(f"body of more than {MAX_BODY_BYTES} bytes")
    try:
        body = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequest(f"body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"body must be a JSON object, got {type(body).__name__}")
    return body


def _read_at_most(stream, n: int) -> bytes:
    """Up to ``n`` bytes, reading on until the end: a raw stream (a chunked body) answers one
    chunk per ``read``."""
    parts, size = [], 0
    while size < n:
        part = stream.read(n - size)
        if not part:
            break
        parts.append(part)
        size += len(part)
    return b"".join(parts)


_TOKEN_IN_URL = re.compile(r"(token=)[^&\s\"#]*", re.IGNORECASE)


class RequestHandler(WSGIRequestHandler):
    """werkzeug's handler, with every ``token=...`` in its log lines hidden."""

    def log(self, type: str, message: str, *args: Any) -> None:
        args = tuple(_TOKEN_IN_URL.sub(r"\1<hidden>", a) if isinstance(a, str) else a for a in args)
        super().log(type, _TOKEN_IN_URL.sub(r"\1<hidden>", message), *args)


def make_server(app, host: str, port: int):
    """A threaded werkzeug server (``serve_forever()``; ``server_port`` is the bound port,
    useful with ``port=0``) that hides tokens in its access log."""
    from werkzeug.serving import make_server as werkzeug_server

    return werkzeug_server(host, port, app, threaded=True, request_handler=RequestHandler)
