"""The labeling web app (a WSGI app on werkzeug).

Labelers' routes (with the labelers' token when the app has one; see :mod:`.access`):

- ``GET /``, ``GET /static/<file>``: the page (plain HTML/JS/CSS from the package).
- ``GET /api/guidelines``: ``{"version", "html"}``, the instructions rendered from Markdown.
- ``GET /api/queue?labeler=NAME``: ``{"labeler", "flags": {name: meaning}, "rating_scale": 7,
  "skip_reasons": {reason: text}, "guidelines": version, "items": [{"id", "prompt",
  "responses", "display_order"}], "labels": {item_id: {"ranks", "ratings", "flags"}},
  "skips": {item_id: reason}}``: the items this labeler is shown, in their order (see
  :mod:`.assign`), each with the order to show its responses in, and what they already gave.
  Which items are the overlap set is not said.
- ``POST /api/label`` with JSON ``{"labeler": str, "item_id": str, "ranks": [int] * K,
  "ratings": [1..7] * K, "flags": {flag: [bool] * K}, "seconds": float}`` (0 = best; equal
  ranks tie; ranks are stored dense; ``flags`` and ``seconds`` optional): writes the record
  (with the display order and the guidelines' version), answers ``{"done", "total"}``.
- ``POST /api/skip`` with ``{"labeler", "item_id", "reason", "note", "seconds"}``: records a
  skip (``reason`` one of :data:`~.storage.SKIP_REASONS`; "other" needs a note).
- ``POST /api/open`` with ``{"labeler", "item_id"}``: the page shows that item now. For
  :data:`OPEN_SECONDS` it leaves the other labelers' queues (an overlap item stays), so two
  people rarely label one item that needs one label. Kept in memory only.

The lead's routes (the lead's token, always): ``GET /admin`` (the page) and ``GET /api/admin``
(:func:`~.stats.label_stats` as JSON).

Every request is validated before anything is written; a bad one gets a 4xx and
``{"error": "..."}`` naming what is wrong.
"""

from __future__ import annotations

import html
import importlib.resources
import json
import math
import threading
import time
import urllib.parse
from typing import Any

from werkzeug.exceptions import HTTPException, NotFound
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from rlhf_jax.labeling import access
from rlhf_jax.labeling.access import BadRequest, read_json_body
from rlhf_jax.labeling.assign import display_order, visible_items
from rlhf_jax.labeling.guidelines import Guidelines, load_guidelines
from rlhf_jax.labeling.stats import label_stats
from rlhf_jax.labeling.storage import (FLAGS, RATING_SCALE, SKIP_REASONS, LabelStore, check_labeler, make_record,
                                       now)

_STATIC = {"index.html": "text/html", "admin.html": "text/html", "app.js": "text/javascript",
           "ranking.js": "text/javascript", "admin.js": "text/javascript", "style.css": "text/css"}
_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",  # a link in the guidelines must not carry the token away
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'none'",
}
MAX_NOTE_CHARS = 500
MAX_SECONDS = 24 * 3600.0
OPEN_SECONDS = 600.0  # an item on someone's screen is kept from the others this long (most take 1-2 min)
LABELER, LEAD, EITHER = "labeler", "lead", "either"  # who may call a route


def dense_ranks(ranks: list[int]) -> list[int]:
    """``[0, 2, 2, 5] -> [0, 1, 1, 2]``: the same order and ties, ranks 0..groups-1."""
    levels = sorted(set(ranks))
    return [levels.index(r) for r in ranks]


class LabelApp:
    """WSGI app over one labels directory: ``items`` (see :mod:`.storage`) and the store.

    ``token``: when set, every labeler request must carry it (a server others can reach);
    when None, only requests to a loopback name are answered. ``admin_token`` opens the
    lead's view. ``guidelines``: the instructions shown on the page (default: packaged).
    """

    def __init__(self, store: LabelStore, items: list[dict[str, Any]], token: str | None = None,
                 admin_token: str | None = None, guidelines: Guidelines | None = None):
        self.store = store
        self.items_list = items
        self.items = {item["id"]: item for item in items}
        self.token = token
        self.admin_token = admin_token
        self.guidelines = guidelines or load_guidelines(None)
        self.clock = time.monotonic  # seconds; replaceable in tests
        self._open: dict[str, tuple[str, float]] = {}  # item_id -> (labeler, when they opened it)
        self._open_lock = threading.Lock()
        rules = [("/", "page", "GET", LABELER), ("/static/<name>", "static", "GET", EITHER),
                 ("/api/guidelines", "guidelines", "GET", LABELER), ("/api/queue", "queue", "GET", LABELER),
                 ("/api/label", "label", "POST", LABELER), ("/api/skip", "skip", "POST", LABELER),
                 ("/api/open", "open_item", "POST", LABELER),
                 ("/admin", "admin_page", "GET", LEAD), ("/api/admin", "admin", "GET", LEAD)]
        self.who = {endpoint: who for _, endpoint, _, who in rules}
        self.url_map = Map([Rule(path, endpoint=endpoint, methods=[method]) for path, endpoint, method, _ in rules])

    def __call__(self, environ, start_response):
        request = Request(environ)
        request.max_content_length = access.MAX_BODY_BYTES
        try:
            endpoint, values = self.url_map.bind_to_environ(environ).match()
            self._check_access(request, self.who[endpoint])
            response = getattr(self, f"_{endpoint}")(request, **values)
        except HTTPException as err:
            response = Response(json.dumps({"error": err.description}), status=err.code,
                                mimetype="application/json")
        response.headers.update(_HEADERS)
        return response(environ, start_response)

    def _check_access(self, request: Request, who: str) -> None:
        if self.token is None:  # loopback only: a rebinding page or another site is refused
            access.check_local(request)
        lead = who == LEAD or (who == EITHER and self.admin_token is not None
                               and access.token_matches(request, self.admin_token))
        if lead:
            if self.admin_token is None:
                raise NotFound("the lead's view is off (the app has no lead's token)")
            access.check_token(request, self.admin_token, lead=True)
        elif self.token is not None:
            access.check_token(request, self.token)

    def _page(self, request: Request) -> Response:
        return self._static(request, "index.html")

    def _admin_page(self, request: Request) -> Response:
        return self._static(request, "admin.html")

    def _static(self, request: Request, name: str) -> Response:
        if name not in _STATIC:
            raise NotFound(f"no static file {name!r}")
        body = importlib.resources.files("rlhf_jax.labeling").joinpath("static", name).read_bytes()
        if name.endswith(".html"):  # the page's own script and style requests carry its token
            token = access.given_token(request)
            query = f"?token={urllib.parse.quote(token)}" if token else ""
            body = body.replace(b"__TOKEN_QUERY__", html.escape(query).encode())
        return Response(body, mimetype=_STATIC[name])

    def _guidelines(self, request: Request) -> Response:
        return _json({"version": self.guidelines.version, "html": self.guidelines.html})

    def _taken_by_others(self, labeler: str) -> set[str]:
        """Items another labeler has labeled, or has on screen (opened less than
        :data:`OPEN_SECONDS` ago)."""
        taken = set()
        for other in self.store.labelers():
            if other != labeler:
                taken |= self.store.labels(other).keys()
        now = self.clock()
        with self._open_lock:
            taken |= {i for i, (who, since) in self._open.items() if who != labeler and now - since < OPEN_SECONDS}
        return taken

    def queue_for(self, labeler: str) -> list[str]:
        """Item ids shown to ``labeler``, in order (:func:`~.assign.visible_items`), then
        those they labeled that another labeler has labeled since."""
        ids = visible_items(labeler, self.items_list, self._taken_by_others(labeler))
        shown = set(ids)
        return ids + [i for i in self.store.labels(labeler) if i not in shown and i in self.items]

    def _progress(self, labeler: str) -> dict[str, int]:
        labels = self.store.labels(labeler)
        skipped = {i for i, s in self.store.skips(labeler).items() if s["reason"] != "later" and i not in labels}
        return {"done": len(labels.keys() | skipped), "total": len(self.queue_for(labeler))}

    def _queue(self, request: Request) -> Response:
        labeler = self._labeler(request.args.get("labeler"))
        mine = self.store.labels(labeler)
        items = [{"id": i, "prompt": self.items[i]["prompt"], "responses": self.items[i]["responses"],
                  "display_order": display_order(labeler, i, len(self.items[i]["responses"]))}
                 for i in self.queue_for(labeler)]
        return _json({"labeler": labeler, "flags": FLAGS, "rating_scale": RATING_SCALE,
                      "skip_reasons": SKIP_REASONS, "guidelines": self.guidelines.version, "items": items,
                      "labels": {i: {"ranks": r["ranks"], "ratings": r.get("ratings"), "flags": r.get("flags", {})}
                                 for i, r in mine.items()},
                      "skips": {i: s["reason"] for i, s in self.store.skips(labeler).items() if i not in mine}})

    def _item(self, body: dict[str, Any], fields: set[str]) -> tuple[str, dict[str, Any]]:
        unknown = set(body) - fields
        if unknown:
            raise BadRequest(f"unknown fields {sorted(unknown)}; expected {', '.join(sorted(fields))}")
        labeler = self._labeler(body.get("labeler"))
        item_id = body.get("item_id")
        if not isinstance(item_id, str) or item_id not in self.items:
            raise NotFound(f"unknown item_id {item_id!r}: not one of the {len(self.items)} items in items.jsonl")
        return labeler, self.items[item_id]

    def _label(self, request: Request) -> Response:
        body = read_json_body(request)
        labeler, item = self._item(body, {"labeler", "item_id", "ranks", "ratings", "flags", "seconds"})
        k = len(item["responses"])
        ranks = body.get("ranks")
        if not isinstance(ranks, list) or len(ranks) != k:
            raise BadRequest(f"item {item['id']} has {k} responses: \"ranks\" must be a list of {k} integers, "
                             f"got {ranks!r}")
        if not all(_is_int(r) and 0 <= r < k for r in ranks):
            raise BadRequest(f"\"ranks\" {ranks!r}: each must be an integer from 0 (best) to {k - 1}")
        ratings = body.get("ratings")
        if not (isinstance(ratings, list) and len(ratings) == k
                and all(_is_int(r) and 1 <= r <= RATING_SCALE for r in ratings)):
            raise BadRequest(f"\"ratings\" must be a list of {k} integers from 1 (worst) to {RATING_SCALE} "
                             f"(best), one per response, got {ratings!r}")
        flags = self._flags(body.get("flags", {}), k)
        self.store.save(make_record(item, labeler, dense_ranks(ranks), ratings=ratings, flags=flags,
                                    display_order=display_order(labeler, item["id"], k),
                                    seconds=_seconds(body), guidelines=self.guidelines.version))
        return _json(self._progress(labeler))

    def _skip(self, request: Request) -> Response:
        body = read_json_body(request)
        labeler, item = self._item(body, {"labeler", "item_id", "reason", "note", "seconds"})
        reason, note = body.get("reason"), body.get("note", "")
        if reason not in SKIP_REASONS:
            raise BadRequest(f"\"reason\" must be one of {list(SKIP_REASONS)}, got {reason!r}")
        if not isinstance(note, str) or len(note) > MAX_NOTE_CHARS:
            raise BadRequest(f"\"note\" must be text of at most {MAX_NOTE_CHARS} characters")
        note = " ".join(note.split())  # one line in the lead's view: no newlines or control spacing
        if reason == "other" and not note:
            raise BadRequest("a skip for another reason needs a \"note\" saying why")
        self.store.save_skip({"item_id": item["id"], "labeler": labeler, "reason": reason, "note": note,
                              "seconds": _seconds(body), "time": now()})
        return _json(self._progress(labeler))

    def _open_item(self, request: Request) -> Response:
        labeler, item = self._item(read_json_body(request), {"labeler", "item_id"})
        with self._open_lock:
            self._open[item["id"]] = (labeler, self.clock())
        return _json({})

    def _admin(self, request: Request) -> Response:
        stats = label_stats(self.store, self.items_list)
        stats["guidelines"] = {"source": self.guidelines.source, "version": self.guidelines.version}
        return _json(stats)

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


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # bool is an int subclass


def _seconds(body: dict[str, Any]) -> float | None:
    seconds = body.get("seconds")
    if seconds is None:
        return None
    if not (isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and math.isfinite(seconds)
            and 0 <= seconds <= MAX_SECONDS):
        raise BadRequest(f"\"seconds\" must be a number from 0 to {MAX_SECONDS:.0f}, got {seconds!r}")
    return round(float(seconds), 1)


def _json(obj: Any) -> Response:
    return Response(json.dumps(obj), mimetype="application/json")
