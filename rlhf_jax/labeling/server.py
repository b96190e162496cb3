"""The labeling web app (a WSGI app on werkzeug) and the server that runs it.

Routes (every one needs the access token when the app has one: ``?token=`` or the
``X-Label-Token`` header):

- ``GET /``, ``GET /static/<file>``: the page (plain HTML/JS/CSS from the package).
- ``GET /api/queue?labeler=NAME``: ``{"labeler", "flags": [name], "items": [item],
  "labels": {item_id: {"ranks", "flags"}}}``: the items this labeler is shown, in order
  (overlap items first, then those nobody else has labeled) and what they already gave.
- ``POST /api/label`` with JSON ``{"labeler": str, "item_id": str, "ranks": [int] * K,
  "flags": {flag: [bool] * K}}`` (0 = best; equal ranks tie; ranks are stored dense):
  writes the record, answers ``{"done": int, "total": int}``.

Every request is validated before anything is written; a bad one gets a 4xx and
``{"error": "..."}`` naming what is wrong.
"""

from __future__ import annotations

import hmac
import html
import importlib.resources
import json
import urllib.parse
from typing import Any

from werkzeug.exceptions import Forbidden, HTTPException, NotFound, RequestEntityTooLarge, UnprocessableEntity
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from rlhf_jax.labeling.storage import FLAGS, LabelStore, check_labeler, make_record

MAX_BODY_BYTES = 16 * 1024  # a submission is ~100 bytes per response; nothing needs more
_STATIC = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}


class BadRequest(UnprocessableEntity):
    """A well-formed request whose content is wrong (422)."""


def dense_ranks(ranks: list[int]) -> list[int]:
    """``[0, 2, 2, 5] -> [0, 1, 1, 2]``: the same order and ties, ranks 0..groups-1."""
    levels = sorted(set(ranks))
    return [levels.index(r) for r in ranks]


class LabelApp:
    """WSGI app over one labels directory: ``items`` (see :mod:`.storage`) and the store.

    ``token``: when set, every request must carry it (for a server reachable by others).
    """

    def __init__(self, store: LabelStore, items: list[dict[str, Any]], token: str | None = None):
        self.store = store
        self.items = {item["id"]: item for item in items}
        self.order = [item["id"] for item in items]
        self.token = token
        self.url_map = Map([
            Rule("/", endpoint="page", methods=["GET"]),
            Rule("/static/<name>", endpoint="static", methods=["GET"]),
            Rule("/api/queue", endpoint="queue", methods=["GET"]),
            Rule("/api/label", endpoint="label", methods=["POST"]),
        ])

    def __call__(self, environ, start_response):
        request = Request(environ)
        request.max_content_length = MAX_BODY_BYTES
        try:
            self._check_token(request)
            endpoint, values = self.url_map.bind_to_environ(environ).match()
            response = getattr(self, f"_{endpoint}")(request, **values)
        except HTTPException as err:
            response = Response(json.dumps({"error": err.description}), status=err.code,
                                mimetype="application/json")
        return response(environ, start_response)

    def _check_token(self, request: Request) -> None:
        if self.token is None:
            return
        given = request.headers.get("X-Label-Token") or request.args.get("token") or ""
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            raise Forbidden("missing or wrong access token: open the address the server printed "
                            "(it ends in ?token=...)")

    def _page(self, request: Request) -> Response:
        return self._static(request, "index.html")

    def _static(self, request: Request, name: str) -> Response:
        if name not in _STATIC:
            raise NotFound(f"no static file {name!r}")
        body = importlib.resources.files("rlhf_jax.labeling").joinpath("static", name).read_bytes()
        if name == "index.html":  # the page's own script and style requests need the token too
            query = f"?token={urllib.parse.quote(self.token)}" if self.token else ""
            body = body.replace(b"__TOKEN_QUERY__", html.escape(query).encode())
        return Response(body, mimetype=_STATIC[name], headers={"Cache-Control": "no-store"})

    def queue_for(self, labeler: str) -> list[str]:
        """Item ids shown to ``labeler``: every overlap item, then each other item unless
        another labeler has labeled it. Two labelers who open the same such item at once may
        both label it: a second label of one comparison, not a loss."""
        taken = set()
        for other in self.store.labelers():
            if other != labeler:
                taken |= set(self.store.labels(other))
        return [i for i in self.order if self.items[i]["overlap"] or i not in taken]

    def _queue(self, request: Request) -> Response:
        labeler = self._labeler(request.args.get("labeler"))
        mine = self.store.labels(labeler)
        ids = self.queue_for(labeler)
        ids += [i for i in mine if i not in ids and i in self.items]  # labeled, then also taken by another
        return _json({"labeler": labeler, "flags": list(FLAGS), "items": [self.items[i] for i in ids],
                      "labels": {i: {"ranks": r["ranks"], "flags": r.get("flags", {})} for i, r in mine.items()}})

    def _label(self, request: Request) -> Response:
        body = _json_body(request)
        unknown = set(body) - {"labeler", "item_id", "ranks", "flags"}
        if unknown:
            raise BadRequest(f"unknown fields {sorted(unknown)}; expected labeler, item_id, ranks, flags")
        labeler = self._labeler(body.get("labeler"))
        item_id = body.get("item_id")
        if not isinstance(item_id, str) or item_id not in self.items:
            raise NotFound(f"unknown item_id {item_id!r}: not one of the {len(self.items)} items in items.jsonl")
        item = self.items[item_id]
        k = len(item["responses"])
        ranks = body.get("ranks")
        if not isinstance(ranks, list) or len(ranks) != k:
            raise BadRequest(f"item {item_id} has {k} responses: \"ranks\" must be a list of {k} integers, "
                             f"got {ranks!r}")
        if not all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r < k for r in ranks):
            raise BadRequest(f"\"ranks\" {ranks!r}: each must be an integer from 0 (best) to {k - 1}")
        flags = self._flags(body.get("flags", {}), k)
        self.store.save(make_record(item, labeler, dense_ranks(ranks), flags))
        done = len(self.store.labels(labeler))
        return _json({"done": done, "total": len(set(self.queue_for(labeler)) | set(self.store.labels(labeler)))})

    @staticmethod
    def _labeler(name: Any) -> str:
        try:
            return check_labeler(name)
        except ValueError as err:
            raise BadRequest(str(err)) from None

    @staticmethod
    def _flags(flags: Any, k: int) -> dict[str, list[bool]]:
        if not isinstance(flags, dict) or set(flags) - set(FLAGS):
            raise BadRequest(f"\"flags\" must be an object with keys from {list(FLAGS)}, got {flags!r}")
        out = {}
        for name in FLAGS:
            values = flags.get(name, [False] * k)
            if not isinstance(values, list) or len(values) != k or not all(isinstance(v, bool) for v in values):
                raise BadRequest(f"\"flags\".{name} must be a list of {k} booleans, got {values!r}")
            out[name] = values
        return out


def _json(obj: Any) -> Response:
    return Response(json.dumps(obj), mimetype="application/json", headers={"Cache-Control": "no-store"})


def _json_body(request: Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise RequestEntityTooLarge(f"body of {request.content_length} bytes; at most {MAX_BODY_BYTES}")
    if request.mimetype != "application/json":
        raise BadRequest(f"Content-Type must be application/json, got {request.mimetype or 'none'!r}")
    data = request.get_data(cache=False)  # raises 413 past max_content_length without a length header too
    try:
        body = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequest(f"body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"body must be a JSON object, got {type(body).__name__}")
    return body


def make_server(app: LabelApp, host: str, port: int):
    """A threaded werkzeug server (``serve_forever()``; ``server_port`` is the bound port,
    useful with ``port=0``)."""
    from werkzeug.serving import make_server as werkzeug_server

    return werkzeug_server(host, port, app, threaded=True)
