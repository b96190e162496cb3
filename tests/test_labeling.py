"""``rlhf-jax label``: the labeling app over real HTTP requests (no browser), its files, its
validation and security, and the CLI server. Statistics, merging and the RM on the labels:
test_labeling_stats.py; the page in a real browser: test_labeling_browser.py."""

import http.client
import json
import logging
import urllib.error
import urllib.request

import pytest

from rlhf_jax import cli
from rlhf_jax.data import read_records
from rlhf_jax.labeling import FLAGS, LabelApp, LabelStore, read_items
from rlhf_jax.labeling.access import MAX_BODY_BYTES, is_loopback
from rlhf_jax.labeling.assign import display_order
from rlhf_jax.labeling.command import prepare_items
from rlhf_jax.labeling.guidelines import load_guidelines
from rlhf_jax.labeling.server import dense_ranks
from tests.labeling_helpers import (ADMIN_TOKEN, K, app_client, make_run_items, serving, snapshot, start_cli_server,
                                    submission, write_prompts_with_responses)


def test_rank_three_restart_rank_one(tmp_path):
    workdir = tmp_path / "run"
    make_run_items(workdir)
    client = app_client(workdir)
    page = client.get("/")
    assert page.status_code == 200 and b"Rank the responses" in page.data
    assert client.get("/static/app.js").status_code == 200 and client.get("/static/ranking.js").status_code == 200
    queue = client.get("/api/queue?labeler=alice").json
    assert len(queue["items"]) == 6 and queue["labels"] == {} and list(queue["flags"]) == list(FLAGS)
    assert queue["rating_scale"] == 7 and "cant_judge" in queue["skip_reasons"]
    ids = [i["id"] for i in queue["items"]]
    for n, item_id in enumerate(ids[:3]):
        body = submission("alice", item_id, (2, 0, 1, 1), "hallucination", ratings=(2, 6, 4, 4), seconds=12.34)
        reply = client.post("/api/label", json=body)
        assert reply.status_code == 200, reply.json
        assert reply.json == {"done": n + 1, "total": 6}

    client = app_client(workdir)  # a new server on the same directory: the old one was killed
    queue = client.get("/api/queue?labeler=alice").json
    assert [i["id"] for i in queue["items"]] == ids  # the same order after a restart
    assert sorted(queue["labels"]) == sorted(ids[:3])  # resumes where alice stopped
    assert queue["labels"][ids[1]] == {"ranks": [2, 0, 1, 1], "ratings": [2, 6, 4, 4],
                                       "flags": {f: [f == "hallucination", False, False, False] for f in FLAGS}}
    assert client.post("/api/label", json=submission("alice", ids[3], (0, 3, 1, 2))).status_code == 200

    path = workdir / "labels" / "alice.jsonl"
    records = [r for _, r in read_records(path, "comparisons")]  # the RM's own validator
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 4 and [r["item_id"] for r in raw] == ids[:4]
    items = {i["id"]: i for i in read_items(workdir / "labels")}
    guidelines = load_guidelines(None).version
    for record, line in zip(records, raw):
        assert record["responses"] == items[line["item_id"]]["responses"]
        assert line["labeler"] == "alice" and set(line["flags"]) == set(FLAGS) and line["time"].endswith("+00:00")
        assert line["display_order"] == display_order("alice", line["item_id"], K)  # what the page was told
        assert line["guidelines"] == guidelines
    assert records[3]["ranks"] == [0, 3, 1, 2] and records[0]["ranks"] == [2, 0, 1, 1]
    assert raw[0]["flags"]["hallucination"] == [True, False, False, False]
    assert raw[0]["ratings"] == [2, 6, 4, 4] and raw[0]["seconds"] == 12.3 and raw[3]["seconds"] is None


def test_back_then_resubmit_replaces_the_record(tmp_path):
    workdir = tmp_path / "run"
    make_run_items(workdir)
    client = app_client(workdir)
    client.post("/api/label", json=submission("bob", "0", (0, 1, 2, 3)))
    client.post("/api/label", json=submission("bob", "1", (0, 1, 2, 3)))
    assert client.post("/api/label", json=submission("bob", "0", (3, 2, 1, 0))).json["done"] == 2
    lines = [json.loads(x) for x in (workdir / "labels" / "bob.jsonl").read_text().splitlines()]
    assert [(r["item_id"], r["ranks"]) for r in lines] == [("0", [3, 2, 1, 0]), ("1", [0, 1, 2, 3])]


BAD_REQUESTS = [
    ("unknown item id", submission("alice", "99"), 404, "unknown item_id"),
    ("too few ranks", dict(submission("alice", "0"), ranks=[0, 1, 2]), 422, "4 integers"),
    ("too many ranks", dict(submission("alice", "0"), ranks=[0, 1, 2, 3, 4]), 422, "4 integers"),
    ("rank out of range", dict(submission("alice", "0"), ranks=[0, 1, 2, 9]), 422, "from 0 (best) to 3"),
    ("boolean rank", dict(submission("alice", "0"), ranks=[True, 0, 1, 2]), 422, "integer"),
    ("no ratings", {k: v for k, v in submission("alice", "0").items() if k != "ratings"}, 422, "ratings"),
    ("rating of 0", submission("alice", "0", ratings=[0, 4, 4, 4]), 422, "1 (worst) to 7"),
    ("rating of 8", submission("alice", "0", ratings=[8, 4, 4, 4]), 422, "1 (worst) to 7"),
    ("three ratings", submission("alice", "0", ratings=[4, 4, 4]), 422, "list of 4 integers"),
    ("negative seconds", submission("alice", "0", seconds=-1), 422, "seconds"),
    ("labeler name with a path", submission("../../etc", "0"), 422, "labeler name"),
    ("labeler name with a trailing newline", submission("alice\n", "0"), 422, "labeler name"),
    ("labeler name of the items file", submission("items", "0"), 422, "items file"),
    ("unknown flag", dict(submission("alice", "0"), flags={"rude": [True] * K}), 422, "flags"),
    ("flag list of the wrong length", dict(submission("alice", "0"), flags={"hallucination": [True]}), 422,
     "4 booleans"),
    ("unknown field", dict(submission("alice", "0"), score=3), 422, "unknown fields"),
]


@pytest.mark.parametrize("what,body,status,message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_and_change_no_file(tmp_path, what, body, status, message):
    workdir = tmp_path / "run"
    make_run_items(workdir)
    client = app_client(workdir)
    client.post("/api/label", json=submission("alice", "1"))
    before = snapshot(workdir / "labels")
    reply = client.post("/api/label", json=body)
    assert reply.status_code == status and message in reply.json["error"], (what, reply.json)
    assert snapshot(workdir / "labels") == before


BAD_SKIPS = [
    ("unknown reason", {"reason": "bored"}, "reason"),
    ("other without a note", {"reason": "other", "note": "  "}, "note"),
    ("a note too long", {"reason": "cant_judge", "note": "x" * 501}, "500 characters"),
    ("a ranking in a skip", {"reason": "cant_judge", "ranks": [0, 1, 2, 3]}, "unknown fields"),
]


@pytest.mark.parametrize("what,fields,message", BAD_SKIPS, ids=[b[0] for b in BAD_SKIPS])
def test_bad_skips_get_a_422_and_change_no_file(tmp_path, what, fields, message):
    workdir = tmp_path / "run"
    make_run_items(workdir)
    client = app_client(workdir)
    before = snapshot(workdir / "labels")
    reply = client.post("/api/skip", json={"labeler": "alice", "item_id": "0", **fields})
    assert reply.status_code == 422 and message in reply.json["error"], (what, reply.json)
    assert snapshot(workdir / "labels") == before


def test_skips_are_recorded_with_their_reason_and_free_the_item_for_others(tmp_path):
    workdir = tmp_path / "run"
    make_run_items(workdir, n=4, overlap=1)  # item 0 in the overlap set; 1-3 go to one labeler each
    client = app_client(workdir)
    reply = client.post("/api/skip", json={"labeler": "ann", "item_id": "2", "reason": "cant_judge",
                                           "note": "about\nchess", "seconds": 40})
    assert reply.status_code == 200 and reply.json == {"done": 1, "total": 4}
    assert client.post("/api/skip", json={"labeler": "ann", "item_id": "3", "reason": "later"}).json["done"] == 1
    queue = client.get("/api/queue?labeler=ann").json
    assert queue["skips"] == {"2": "cant_judge", "3": "later"} and queue["labels"] == {}
    assert "2" in [i["id"] for i in client.get("/api/queue?labeler=ben").json["items"]]  # ann's skip frees it
    # labeling a skipped item counts once, and the skip no longer shows as one
    assert client.post("/api/label", json=submission("ann", "2")).json == {"done": 1, "total": 4}
    assert client.get("/api/queue?labeler=ann").json["skips"] == {"3": "later"}
    records = [json.loads(x) for x in (workdir / "labels" / "skips" / "ann.jsonl").read_text().splitlines()]
    assert [(r["item_id"], r["reason"], r["note"], r["seconds"]) for r in records] == [
        ("2", "cant_judge", "about chess", 40.0), ("3", "later", "", None)]
    assert LabelStore(workdir / "labels").labelers() == ["ann"]  # skips/ is not a labeler


def test_malformed_and_oversized_bodies_and_wrong_methods(tmp_path):
    workdir = tmp_path / "run"
    make_run_items(workdir)
    client = app_client(workdir)
    before = snapshot(workdir / "labels")
    big = json.dumps(dict(submission("alice", "0"), pad="x" * MAX_BODY_BYTES))
    assert client.post("/api/label", data=big, content_type="application/json").status_code == 413
    assert client.post("/api/label", data="{not json", content_type="application/json").status_code == 422
    assert client.post("/api/label", data="[1, 2]", content_type="application/json").status_code == 422
    assert client.post("/api/label", data="labeler=alice", content_type="text/plain").status_code == 422
    assert client.get("/api/label").status_code == 405
    assert client.get("/static/../storage.py").status_code == 404
    assert client.get("/api/queue?labeler=").status_code == 422
    assert client.get("/api/queue?labeler=alice%0A").status_code == 422
    assert snapshot(workdir / "labels") == before


def test_a_chunked_body_over_the_limit_is_refused_whole(tmp_path):
    """No Content-Length: valid JSON, then 20,000 spaces and garbage. Cut at the limit, the
    JSON would parse and be saved; the whole body is refused instead."""
    workdir = tmp_path / "run"
    make_run_items(workdir)
    app = LabelApp(LabelStore(workdir / "labels"), read_items(workdir / "labels"))
    before = snapshot(workdir / "labels")

    def post_chunked(parts):
        connection = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=30)
        connection.request("POST", "/api/label", body=iter(parts), encode_chunked=True,
                           headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
        reply = connection.getresponse()
        status, body = reply.status, reply.read()
        connection.close()
        return status, body

    valid = json.dumps(submission("alice", "0")).encode()
    with serving(app) as server:
        status, body = post_chunked([valid, b" " * 20_000, b"garbage"])
        assert status == 413, body
        assert snapshot(workdir / "labels") == before
        assert post_chunked([valid[:10], valid[10:]])[0] == 200  # a chunked body within the limit is read whole
    assert [r["item_id"] for r in LabelStore(workdir / "labels").records("alice")] == ["0"]


def test_with_a_token_every_request_needs_it_and_the_lead_has_its_own(tmp_path):
    workdir = tmp_path / "run"
    make_run_items(workdir)
    client = app_client(workdir, token="s3cret-token")
    before = snapshot(workdir / "labels")
    for headers in ({}, {"X-Label-Token": "wrong"}, {"X-Label-Token": ADMIN_TOKEN}):
        assert client.get("/", headers=headers).status_code == 403
        assert client.get("/api/queue?labeler=alice", headers=headers).status_code == 403
        reply = client.post("/api/label", json=submission("alice", "0"), headers=headers)
        assert reply.status_code == 403 and "token" in reply.json["error"]
    for headers in ({}, {"X-Label-Token": "wrong"}):
        assert client.get("/static/app.js", headers=headers).status_code == 403
    assert snapshot(workdir / "labels") == before
    page = client.get("/?token=s3cret-token")
    assert page.status_code == 200 and b"/static/app.js?token=s3cret-token" in page.data
    assert client.get("/static/app.js?token=s3cret-token").status_code == 200
    reply = client.post("/api/label", json=submission("alice", "0"), headers={"X-Label-Token": "s3cret-token"})
    assert reply.status_code == 200
    # the lead's view: its own token, which the labelers' does not replace
    for headers in ({}, {"X-Label-Token": "s3cret-token"}):
        assert client.get("/admin", headers=headers).status_code == 403
        assert client.get("/api/admin", headers=headers).status_code == 403
    admin = client.get(f"/admin?token={ADMIN_TOKEN}")
    assert admin.status_code == 200 and f"/static/admin.js?token={ADMIN_TOKEN}".encode() in admin.data
    assert client.get(f"/static/admin.js?token={ADMIN_TOKEN}").status_code == 200
    stats = client.get("/api/admin", headers={"X-Label-Token": ADMIN_TOKEN}).json
    assert stats["labelers"] == {"alice": 1} and stats["progress"]["alice"]["labeled"] == 1


def test_without_a_token_only_this_machine_s_names_and_pages_are_answered(tmp_path):
    """DNS rebinding: a page at attacker.example whose name now resolves to 127.0.0.1 sends
    its own Host (and Origin); another site's page sends its Origin."""
    workdir = tmp_path / "run"
    make_run_items(workdir)
    client = app_client(workdir)
    before = snapshot(workdir / "labels")
    rebound = {"Host": "attacker.example:8765", "Origin": "http://attacker.example:8765"}
    reply = client.post("/api/label", json=submission("rebound", "0"), headers=rebound)
    assert reply.status_code == 403 and "attacker.example" in reply.json["error"]
    assert client.get("/api/queue?labeler=ann", headers=rebound).status_code == 403
    assert client.get("/", headers={"Host": "attacker.example"}).status_code == 403
    cross_site = {"Host": "127.0.0.1:8765", "Origin": "http://evil.example"}
    assert client.post("/api/label", json=submission("ann", "0"), headers=cross_site).status_code == 403
    assert snapshot(workdir / "labels") == before
    for host in ("127.0.0.1:8765", "127.0.0.2:8765", "localhost:8765", "[::1]:8765", "LOCALHOST"):
        same_origin = {"Host": host, "Origin": f"http://{host}"}
        assert client.post("/api/label", json=submission("ann", "0"), headers=same_origin).status_code == 200, host
    assert client.get("/api/queue?labeler=ann", headers={"Host": "127.0.0.1:8765"}).status_code == 200
    reply = client.get(f"/api/admin?token={ADMIN_TOKEN}", headers={"Host": "attacker.example"})
    assert reply.status_code == 403  # the lead's token does not lift the host check


def test_the_access_log_hides_tokens(tmp_path, caplog):
    workdir = tmp_path / "run"
    make_run_items(workdir)
    app = LabelApp(LabelStore(workdir / "labels"), read_items(workdir / "labels"), "right-token-123", ADMIN_TOKEN)
    caplog.set_level(logging.INFO, logger="werkzeug")
    with serving(app) as server:
        base = f"http://127.0.0.1:{server.server_port}"
        for path in ("/?token=right-token-123", "/api/queue?labeler=ann&token=wrong-guess-456",
                     f"/admin?token={ADMIN_TOKEN}"):
            try:
                urllib.request.urlopen(base + path, timeout=30).read()
            except urllib.error.HTTPError:
                pass
    log = caplog.text
    assert "GET /?token=<hidden>" in log and "labeler=ann&token=<hidden>" in log and "/admin?token=<hidden>" in log
    for secret in ("right-token-123", "wrong-guess-456", ADMIN_TOKEN):
        assert secret not in log


def test_queue_and_display_orders_are_random_per_labeler_stable_and_hide_the_overlap_set(tmp_path):
    workdir = tmp_path / "run"
    make_run_items(workdir, n=30, overlap=5)
    client = app_client(workdir)
    queues = {name: client.get(f"/api/queue?labeler={name}").json["items"] for name in ("ann", "ben")}
    for name, items in queues.items():
        assert all("overlap" not in item for item in items)  # a labeler cannot tell the agreement checks
        orders = [item["display_order"] for item in items]
        assert all(sorted(order) == list(range(K)) for order in orders)
        assert [order[0] for order in orders].count(0) < len(orders)  # response 0 is not always shown first
        ids = [item["id"] for item in items]
        assert set(ids[:10]) >= {"0", "1", "2", "3", "4"}  # the overlap set early, among as many others
        assert ids[:5] != ["0", "1", "2", "3", "4"]  # but not as the first five, in file order
    assert [i["display_order"] for i in queues["ann"]] != [i["display_order"] for i in queues["ben"]]
    assert [i["id"] for i in queues["ann"]] != [i["id"] for i in queues["ben"]]
    assert client.get("/api/queue?labeler=ann").json["items"] == queues["ann"]  # the same on every request
    assert b"shown to every labeler" not in client.get("/static/app.js").data


def test_non_overlap_items_go_to_one_labeler(tmp_path):
    workdir = tmp_path / "run"
    make_run_items(workdir, n=5, overlap=2)
    client = app_client(workdir)
    client.post("/api/label", json=submission("ann", "3"))
    ben = sorted(i["id"] for i in client.get("/api/queue?labeler=ben").json["items"])
    ann = sorted(i["id"] for i in client.get("/api/queue?labeler=ann").json["items"])
    assert ben == ["0", "1", "2", "4"] and ann == ["0", "1", "2", "3", "4"]


def test_an_item_on_one_labelers_screen_leaves_the_others_queues_for_a_while(tmp_path):
    from rlhf_jax.labeling.server import OPEN_SECONDS

    workdir = tmp_path / "run"
    make_run_items(workdir, n=4, overlap=1)  # item 0 in the overlap set
    client = app_client(workdir)
    now = [1000.0]
    client.application.clock = lambda: now[0]

    def queue(name):
        return sorted(i["id"] for i in client.get(f"/api/queue?labeler={name}").json["items"])

    for item_id in ("0", "2"):
        assert client.post("/api/open", json={"labeler": "ann", "item_id": item_id}).status_code == 200
    assert queue("ben") == ["0", "1", "3"] and queue("ann") == ["0", "1", "2", "3"]  # 0: everyone's
    now[0] += OPEN_SECONDS + 1  # ann left it open and went away: it comes back
    assert queue("ben") == ["0", "1", "2", "3"]
    assert client.post("/api/open", json={"labeler": "ann", "item_id": "99"}).status_code == 404
    assert not (workdir / "labels" / "ann.jsonl").exists()  # opening writes nothing


def test_a_bad_line_in_one_labelers_file_stops_nobody(tmp_path):
    """A hand-edited line in ben's file: everyone still gets their queue and saves, a save
    says saved, the lead sees the line named, and ben's rewrite keeps it as it was."""
    workdir = tmp_path / "run"
    make_run_items(workdir, n=4, overlap=4)
    client = app_client(workdir)
    assert client.post("/api/label", json=submission("ben", "0")).status_code == 200
    ben = workdir / "labels" / "ben.jsonl"
    with open(ben, "a") as f:
        f.write("this is not json\n" + json.dumps({"item_id": "1", "ranks": [0, 1]}) + "\n")
    for name in ("alice", "ben"):
        assert client.get(f"/api/queue?labeler={name}").status_code == 200
    assert list(client.get("/api/queue?labeler=ben").json["labels"]) == ["0"]
    reply = client.post("/api/label", json=submission("alice", "1"))
    assert reply.status_code == 200 and reply.json["done"] == 1
    assert client.post("/api/label", json=submission("ben", "0", (3, 2, 1, 0))).status_code == 200  # a rewrite
    lines = ben.read_text().splitlines()
    assert lines[1:] == ["this is not json", '{"item_id": "1", "ranks": [0, 1]}'] and '"ranks": [3, 2, 1, 0]' in lines[0]
    problems = client.get("/api/admin", headers={"X-Label-Token": ADMIN_TOKEN}).json["problems"]
    assert problems == [f"{ben}:2: not JSON (Expecting value)",
                        f"{ben}:3: \"ranks\" and \"responses\" must be lists of one length"]


def test_a_line_torn_by_a_crash_is_moved_aside_on_restart(tmp_path):
    workdir = tmp_path / "run"
    make_run_items(workdir)
    client = app_client(workdir)
    client.post("/api/label", json=submission("ann", "0"))
    path = workdir / "labels" / "ann.jsonl"
    good = path.read_bytes()
    path.write_bytes(good + b'{"prompt": "cut sho')
    with pytest.warns(UserWarning, match="cut short"):
        client = app_client(workdir)
    assert path.read_bytes() == good and (workdir / "labels" / "ann.jsonl.torn").exists()
    assert sorted(client.get("/api/queue?labeler=ann").json["labels"]) == ["0"]


def test_items_are_made_once_and_bad_inputs_are_named(tmp_path):
    workdir = tmp_path / "run"
    first = make_run_items(workdir)
    other = write_prompts_with_responses(tmp_path / "other.jsonl", 3, seed=5)
    assert prepare_items(None, workdir, str(other), None, K, 100, 2) == first  # restarts see the same items
    bare = tmp_path / "bare.jsonl"
    bare.write_text('{"prompt": "copy : a b =>"}\n')
    with pytest.raises(Exception, match="--policy"):
        prepare_items(None, tmp_path / "fresh", str(bare), None, K, 100, 2)
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"prompt": "a", "responses": ["x", "y"]}\n{"prompt": "b"}\n')
    with pytest.raises(Exception, match="other records have them"):
        prepare_items(None, tmp_path / "fresh2", str(mixed), None, K, 100, 2)


def test_dense_ranks_keep_order_and_ties():
    assert dense_ranks([0, 2, 2, 5]) == [0, 1, 1, 2] and dense_ranks([3, 3]) == [0, 0]


def test_guidelines_are_rendered_without_the_file_s_html_and_versioned(tmp_path):
    workdir = tmp_path / "run"
    make_run_items(workdir)
    rules = tmp_path / "rules.md"
    rules.write_text("# Our rules\n\nPrefer **short** answers.\n\n<script>alert(1)</script>\n\n"
                     "[x](javascript:alert(1))\n")
    guidelines = load_guidelines(rules)
    client = app_client(workdir)
    client.application.guidelines = guidelines
    reply = client.get("/api/guidelines").json
    assert reply["version"] == guidelines.version and len(reply["version"]) == 12
    assert "<h1>Our rules</h1>" in reply["html"] and "<strong>short</strong>" in reply["html"]
    assert "<script>" not in reply["html"] and "&lt;script&gt;" in reply["html"]
    assert "href=\"javascript" not in reply["html"]
    assert client.get("/api/queue?labeler=ann").json["guidelines"] == guidelines.version
    client.post("/api/label", json=submission("ann", "0"))
    assert LabelStore(workdir / "labels").records("ann")[0]["guidelines"] == guidelines.version
    assert load_guidelines(None).version != guidelines.version
    csp = client.get("/").headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and client.get("/").headers["Referrer-Policy"] == "no-referrer"
    (tmp_path / "latin1.md").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.md: not UTF-8"):
        load_guidelines(tmp_path / "latin1.md")
    with pytest.raises(ValueError, match="no such file"):
        load_guidelines(tmp_path / "missing.md")


def test_which_hosts_need_a_token():
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "192.168.1.5", "::", "labeling.example"):
        assert not is_loopback(host), host


def _post(url, body, headers=None):
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status
    except urllib.error.HTTPError as err:
        return err.code


def test_the_cli_server_survives_kill_9_and_keeps_its_addresses(tmp_path):
    """--host 0.0.0.0 needs the printed token; kill -9; --host localhost (loopback, like the
    default) needs none; the lead's address is the same after the restart."""
    import signal
    import urllib.parse

    workdir = tmp_path / "run"
    prompts = write_prompts_with_responses(tmp_path / "prompts.jsonl", 3)
    process, address, lead = start_cli_server(workdir, "--prompts", str(prompts), "--host", "0.0.0.0")
    try:
        parsed = urllib.parse.urlparse(address)
        token = urllib.parse.parse_qs(parsed.query)["token"][0]
        api = f"http://127.0.0.1:{parsed.port}/api/label"
        assert _post(api, submission("ann", "0")) == 403
        assert _post(api, submission("ann", "0"), {"X-Label-Token": token}) == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{parsed.port}/?token={token}", timeout=30) as page:
            assert b"Rank the responses" in page.read()
        lead_query = urllib.parse.urlparse(lead).query
        with urllib.request.urlopen(f"http://127.0.0.1:{parsed.port}/api/admin?{lead_query}", timeout=30) as reply:
            assert json.loads(reply.read())["labelers"] == {"ann": 1}
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    process, address, again = start_cli_server(workdir, "--host", "localhost")  # loopback: no token; same items
    try:
        assert "token" not in address and address.startswith("http://localhost:")
        assert urllib.parse.urlparse(again).query == urllib.parse.urlparse(lead).query  # kept in labels/
        with urllib.request.urlopen(address + "api/queue?labeler=ann", timeout=30) as reply:
            queue = json.loads(reply.read())
        assert list(queue["labels"]) == ["0"] and len(queue["items"]) == 3
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


@pytest.mark.slow  # samples from a trained SFT export (~40 s)
def test_items_sampled_from_a_policy_export(tmp_path):
    import dataclasses

    from rlhf_jax.stages.sft import run_sft
    from tests.helpers import tiny_config, write_demonstrations

    workdir = tmp_path / "run"
    demos = write_demonstrations(tmp_path / "demos.jsonl", 16)
    cfg = tiny_config(demos, steps=1)
    cfg = dataclasses.replace(cfg, comparisons=dataclasses.replace(
        cfg.comparisons, prompts=dataclasses.replace(cfg.comparisons.prompts, batch_size=8)))
    run_sft(cfg, workdir, show_progress=False)
    items = prepare_items(cfg, workdir, None, "run:sft/export", 3, 5, 2)
    assert len(items) == 5 and all(len(i["responses"]) == 3 for i in items)
    assert [i["overlap"] for i in items] == [True, True, False, False, False]
    assert read_items(workdir / "labels") == items  # stored: a restart shows the same responses


def test_a_taken_port_is_a_clear_error(tmp_path, capsys):
    import socket

    workdir = tmp_path / "run"
    prompts = write_prompts_with_responses(tmp_path / "prompts.jsonl", 2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["label", "--workdir", str(workdir), "--prompts", str(prompts), "--port", str(port)]
        assert cli.main(args) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert cli.main([*args, "--guidelines", str(tmp_path / "missing.md")]) == 2
    assert "--guidelines" in capsys.readouterr().err
