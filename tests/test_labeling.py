"""``rlhf-jax label``: the labeling app over real HTTP requests (no browser), its files,
its validation and security, agreement statistics, and the RM training on its output."""

import json
import pathlib
import shutil
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from werkzeug.test import Client

from rlhf_jax import cli
from rlhf_jax.config import MeshConfig
from rlhf_jax.data import read_records
from rlhf_jax.labeling import FLAGS, LabelApp, LabelStore, label_stats, make_server, read_items
from rlhf_jax.labeling.command import prepare_items
from rlhf_jax.labeling.server import MAX_BODY_BYTES, dense_ranks
from tests.helpers import rm_config, tiny_config, write_demonstrations, write_experiment

K = 4


def _write_prompts_with_responses(path: pathlib.Path, n: int, seed: int = 0) -> pathlib.Path:
    """``n`` task prompts with K responses each, of the quality a partly trained policy writes."""
    from rlhf_jax.tasks import generate_prompt, sample_responses

    rng = np.random.default_rng(seed)
    records = []
    for _ in range(n):
        prompt = generate_prompt(rng)
        records.append({"prompt": prompt, "responses": sample_responses(prompt, K, rng)})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _items(workdir: pathlib.Path, n: int = 6, overlap: int = 2):
    prompts = _write_prompts_with_responses(workdir.parent / f"{workdir.name}_prompts.jsonl", n)
    return prepare_items(None, workdir, str(prompts), None, K, 100, overlap)


def _app(workdir: pathlib.Path, token=None) -> Client:
    directory = workdir / "labels"
    return Client(LabelApp(LabelStore(directory), read_items(directory), token))


def _submission(labeler, item_id, ranks=(0, 1, 2, 2), flagged=None):
    flags = {f: [False] * K for f in FLAGS}
    if flagged:
        flags[flagged] = [True] + [False] * (K - 1)
    return {"labeler": labeler, "item_id": item_id, "ranks": list(ranks), "flags": flags}


def _snapshot(directory: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_rank_three_restart_rank_one_then_the_rm_trains_on_the_file(tmp_path):
    workdir = tmp_path / "run"
    _items(workdir)
    client = _app(workdir)
    page = client.get("/")
    assert page.status_code == 200 and b"Rank the responses" in page.data
    assert client.get("/static/app.js").status_code == 200
    queue = client.get("/api/queue?labeler=alice").json
    assert len(queue["items"]) == 6 and queue["labels"] == {} and queue["flags"] == list(FLAGS)
    assert [i["overlap"] for i in queue["items"]] == [True, True, False, False, False, False]
    for n, item in enumerate(queue["items"][:3]):
        reply = client.post("/api/label", json=_submission("alice", item["id"], (2, 0, 1, 1), "hallucination"))
        assert reply.status_code == 200, reply.json
        assert reply.json == {"done": n + 1, "total": 6}

    client = _app(workdir)  # a new server on the same directory: the old one was killed
    queue = client.get("/api/queue?labeler=alice").json
    assert sorted(queue["labels"]) == ["0", "1", "2"]  # resumes where alice stopped
    assert queue["labels"]["1"]["ranks"] == [2, 0, 1, 1]
    assert client.post("/api/label", json=_submission("alice", "3", (0, 3, 1, 2))).status_code == 200

    path = workdir / "labels" / "alice.jsonl"
    records = [r for _, r in read_records(path, "comparisons")]  # the RM's own validator
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 4 and [r["item_id"] for r in raw] == ["0", "1", "2", "3"]
    items = {i["id"]: i for i in read_items(workdir / "labels")}
    for record, line in zip(records, raw):
        assert record["responses"] == items[line["item_id"]]["responses"]
        assert line["labeler"] == "alice" and set(line["flags"]) == set(FLAGS) and line["time"].endswith("+00:00")
    assert records[3]["ranks"] == [0, 3, 1, 2] and records[0]["ranks"] == [2, 0, 1, 1]
    assert raw[0]["flags"]["hallucination"] == [True, False, False, False]

    demos = write_demonstrations(tmp_path / "demos.jsonl", 8)
    # 4 records fill one batch of 4: the batch axis spans data x fsdp = 4 of the 8 CPU devices
    cfg = rm_config(tiny_config(demos, mesh=MeshConfig(data=2, fsdp=2, tensor=2)), path, steps=2, batch_size=4, k_max=K)
    experiment = write_experiment(cfg, tmp_path / "exp.py")
    assert cli.main(["rm", "--config", str(experiment), "--workdir", str(workdir)]) == 0
    assert (workdir / "rm" / "export" / "export.json").exists()


def test_back_then_resubmit_replaces_the_record(tmp_path):
    workdir = tmp_path / "run"
    _items(workdir)
    client = _app(workdir)
    client.post("/api/label", json=_submission("bob", "0", (0, 1, 2, 3)))
    client.post("/api/label", json=_submission("bob", "1", (0, 1, 2, 3)))
    assert client.post("/api/label", json=_submission("bob", "0", (3, 2, 1, 0))).json["done"] == 2
    lines = [json.loads(x) for x in (workdir / "labels" / "bob.jsonl").read_text().splitlines()]
    assert [(r["item_id"], r["ranks"]) for r in lines] == [("0", [3, 2, 1, 0]), ("1", [0, 1, 2, 3])]


BAD_REQUESTS = [
    ("unknown item id", _submission("alice", "99"), 404, "unknown item_id"),
    ("too few ranks", dict(_submission("alice", "0"), ranks=[0, 1, 2]), 422, "4 integers"),
    ("too many ranks", dict(_submission("alice", "0"), ranks=[0, 1, 2, 3, 4]), 422, "4 integers"),
    ("rank out of range", dict(_submission("alice", "0"), ranks=[0, 1, 2, 9]), 422, "from 0 (best) to 3"),
    ("boolean rank", dict(_submission("alice", "0"), ranks=[True, 0, 1, 2]), 422, "integer"),
    ("labeler name with a path", _submission("../../etc", "0"), 422, "labeler name"),
    ("labeler name of the items file", _submission("items", "0"), 422, "items file"),
    ("unknown flag", dict(_submission("alice", "0"), flags={"rude": [True] * K}), 422, "flags"),
    ("flag list of the wrong length", dict(_submission("alice", "0"), flags={"hallucination": [True]}), 422,
     "4 booleans"),
    ("unknown field", dict(_submission("alice", "0"), score=3), 422, "unknown fields"),
]


@pytest.mark.parametrize("what,body,status,message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_and_change_no_file(tmp_path, what, body, status, message):
    workdir = tmp_path / "run"
    _items(workdir)
    client = _app(workdir)
    client.post("/api/label", json=_submission("alice", "1"))
    before = _snapshot(workdir / "labels")
    reply = client.post("/api/label", json=body)
    assert reply.status_code == status and message in reply.json["error"], (what, reply.json)
    assert _snapshot(workdir / "labels") == before


def test_malformed_and_oversized_bodies_and_wrong_methods(tmp_path):
    workdir = tmp_path / "run"
    _items(workdir)
    client = _app(workdir)
    before = _snapshot(workdir / "labels")
    big = json.dumps(dict(_submission("alice", "0"), pad="x" * MAX_BODY_BYTES))
    assert client.post("/api/label", data=big, content_type="application/json").status_code == 413
    assert client.post("/api/label", data="{not json", content_type="application/json").status_code == 422
    assert client.post("/api/label", data="[1, 2]", content_type="application/json").status_code == 422
    assert client.post("/api/label", data="labeler=alice", content_type="text/plain").status_code == 422
    assert client.get("/api/label").status_code == 405
    assert client.get("/static/../storage.py").status_code == 404
    assert client.get("/api/queue?labeler=").status_code == 422
    assert _snapshot(workdir / "labels") == before


def test_with_a_token_every_request_needs_it(tmp_path):
    workdir = tmp_path / "run"
    _items(workdir)
    client = _app(workdir, token="s3cret-token")
    before = _snapshot(workdir / "labels")
    for headers in ({}, {"X-Label-Token": "wrong"}):
        assert client.get("/", headers=headers).status_code == 403
        assert client.get("/static/app.js", headers=headers).status_code == 403
        assert client.get("/api/queue?labeler=alice", headers=headers).status_code == 403
        reply = client.post("/api/label", json=_submission("alice", "0"), headers=headers)
        assert reply.status_code == 403 and "access token" in reply.json["error"]
    assert _snapshot(workdir / "labels") == before
    page = client.get("/?token=s3cret-token")
    assert page.status_code == 200 and b"/static/app.js?token=s3cret-token" in page.data
    assert client.get("/static/app.js?token=s3cret-token").status_code == 200
    reply = client.post("/api/label", json=_submission("alice", "0"), headers={"X-Label-Token": "s3cret-token"})
    assert reply.status_code == 200


def test_two_labelers_submitting_at_once_over_a_real_server_lose_nothing(tmp_path):
    workdir = tmp_path / "run"
    _items(workdir, n=40, overlap=40)  # every item shown to both
    app = LabelApp(LabelStore(workdir / "labels"), read_items(workdir / "labels"))
    server = make_server(app, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/api/label"
    errors = []

    def label_all(labeler):
        for i in range(40):
            data = json.dumps(_submission(labeler, str(i), (i % K, 0, 1, 2))).encode()
            request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
            try:
                urllib.request.urlopen(request, timeout=30).read()
            except urllib.error.URLError as err:
                errors.append(err)

    # two threads per labeler file: appends to one file race too, not only to two
    threads = [threading.Thread(target=label_all, args=(name,)) for name in ("ann", "ben", "ann", "ben")]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        server.shutdown()
        server.server_close()
    assert errors == []
    for name in ("ann", "ben"):
        records = [json.loads(x) for x in (workdir / "labels" / f"{name}.jsonl").read_text().splitlines()]
        assert sorted(int(r["item_id"]) for r in records) == list(range(40))  # each once, none lost
        read_records(workdir / "labels" / f"{name}.jsonl", "comparisons")


def test_non_overlap_items_go_to_one_labeler(tmp_path):
    workdir = tmp_path / "run"
    _items(workdir, n=5, overlap=2)
    client = _app(workdir)
    client.post("/api/label", json=_submission("ann", "3"))
    ben = [i["id"] for i in client.get("/api/queue?labeler=ben").json["items"]]
    ann = [i["id"] for i in client.get("/api/queue?labeler=ann").json["items"]]
    assert ben == ["0", "1", "2", "4"] and ann == ["0", "1", "2", "3", "4"]


def test_a_line_torn_by_a_crash_is_moved_aside_on_restart(tmp_path):
    workdir = tmp_path / "run"
    _items(workdir)
    client = _app(workdir)
    client.post("/api/label", json=_submission("ann", "0"))
    path = workdir / "labels" / "ann.jsonl"
    good = path.read_bytes()
    path.write_bytes(good + b'{"prompt": "cut sho')
    with pytest.warns(UserWarning, match="cut short"):
        client = _app(workdir)
    assert path.read_bytes() == good and (workdir / "labels" / "ann.jsonl.torn").exists()
    assert sorted(client.get("/api/queue?labeler=ann").json["labels"]) == ["0"]


def test_items_are_made_once_and_bad_inputs_are_named(tmp_path):
    workdir = tmp_path / "run"
    first = _items(workdir)
    other = _write_prompts_with_responses(tmp_path / "other.jsonl", 3, seed=5)
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


def test_stats_on_a_constructed_example(tmp_path, capsys):
    from rlhf_jax.tasks import gold_scores, plackett_luce_ranks

    workdir = tmp_path / "run"
    items = _items(workdir, n=3, overlap=3)
    store = LabelStore(workdir / "labels")
    gold = [plackett_luce_ranks(gold_scores([i["prompt"]] * K, i["responses"]), 0.0, np.random.default_rng(0))
            for i in items]
    # ann agrees with gold on item 0; ben reverses it: 0 of the strictly ordered gold pairs.
    # On item 1 both give [0, 1, 2, 3]: their 6 pairs all agree. Item 2: only ann.
    ann = {"0": gold[0], "1": [0, 1, 2, 3], "2": [0, 0, 1, 1]}
    ben = {"0": [max(gold[0]) - r for r in gold[0]], "1": [0, 1, 2, 3]}
    client = Client(LabelApp(store, items))
    for name, labels in (("ann", ann), ("ben", ben)):
        for item_id, ranks in labels.items():
            flagged = "fails_constraint" if name == "ann" else None
            assert client.post("/api/label", json=_submission(name, item_id, ranks, flagged)).status_code == 200
    stats = label_stats(store)

    def strict_pairs(a, b):  # pairs both rankings order strictly, and how many of them agree
        pairs = [(i, j) for i in range(K) for j in range(i + 1, K) if a[i] != a[j] and b[i] != b[j]]
        return sum(np.sign(a[i] - a[j]) == np.sign(b[i] - b[j]) for i, j in pairs), len(pairs)

    n0 = strict_pairs(gold[0], gold[0])[1]  # item 0: ann and ben disagree on every compared pair
    assert stats["inter_labeler_pairs"] == n0 + 6
    assert stats["inter_labeler_agreement"] == pytest.approx(6 / (n0 + 6))
    assert stats["labelers"] == {"ann": 3, "ben": 2}
    want = {name: np.sum([strict_pairs(labels[i], gold[int(i)]) for i in labels], axis=0) for name, labels in
            (("ann", ann), ("ben", ben))}
    assert stats["gold_agreement_by_labeler"]["ann"] == pytest.approx(want["ann"][0] / want["ann"][1])
    assert stats["gold_agreement_by_labeler"]["ben"] == pytest.approx(want["ben"][0] / want["ben"][1])
    assert want["ann"][0] >= n0 and want["ben"][0] < want["ben"][1]  # the example says something
    # ann flagged one response of each of 3 items, 20 responses labeled in all
    assert stats["flag_rates"]["fails_constraint"] == pytest.approx(3 / 20)
    assert stats["flag_rates"]["hallucination"] == 0.0

    assert cli.main(["label", "--stats", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert "inter-labeler agreement" in out and "agreement with the gold scorer" in out


def test_stats_without_the_embedded_task_has_no_gold(tmp_path):
    workdir = tmp_path / "run"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Say hi", "responses": ["hi", "hello", "hey"]}\n')
    items = prepare_items(None, workdir, str(prompts), None, 3, 100, 1)
    client = Client(LabelApp(LabelStore(workdir / "labels"), items))
    for name, ranks in (("ann", [0, 1, 2]), ("ben", [0, 2, 1])):
        client.post("/api/label", json={"labeler": name, "item_id": "0", "ranks": ranks})
    stats = label_stats(LabelStore(workdir / "labels"))
    assert stats["inter_labeler_agreement"] == pytest.approx(2 / 3) and "gold_agreement" not in stats


CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")


def _browser():
    """Headless Chromium from the system packages, driven through the system chromedriver
    (passed explicitly, so selenium-manager never runs and nothing is downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,940"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.implicitly_wait(0)
    return driver


@pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                    reason="no chromium/chromedriver on this machine (a real-browser test needs the Debian "
                           "chromium and chromium-driver packages; the HTTP tests above cover the same flow)")
def test_in_a_real_browser(tmp_path):
    """The page's own controls in headless Chromium: name, keyboard and drag ranking, a tie,
    flags, three items; ``kill -9`` the server, restart, reload, one more; the RM trains."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
    import os
    import signal
    import socket

    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    workdir = tmp_path / "run"
    prompts = _write_prompts_with_responses(tmp_path / "prompts.jsonl", 5)
    with socket.socket() as probe:  # one fixed port, so the restarted server has the same address
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    process, address = _start_cli_server(workdir, "--prompts", str(prompts), "--port", port)
    items = {i["id"]: i for i in read_items(workdir / "labels")}
    driver = _browser()
    wait = WebDriverWait(driver, 10)

    def keys(*pressed):  # to the focused page, as a person types
        ActionChains(driver).send_keys(*pressed).perform()

    def shift(key):  # Shift held down while the key is pressed
        ActionChains(driver).key_down(Keys.SHIFT).send_keys(key).key_up(Keys.SHIFT).perform()

    def cards():  # the page's order, best first: response indices of the shown item
        item = items[driver.find_element(By.ID, "item-id").text.split()[1]]
        order = []
        for li in driver.find_elements(By.CSS_SELECTOR, "#responses li"):
            order.append(int(li.get_attribute("data-response")))
            assert li.find_element(By.CLASS_NAME, "text").text == item["responses"][order[-1]].strip()
        return order

    def shown(item_id):
        wait.until(lambda d: d.find_element(By.ID, "item-id").text.startswith(f"item {item_id}"))

    def card(position):
        return driver.find_elements(By.CSS_SELECTOR, "#responses li")[position]

    def flag(position, name):  # click the flag's label text, as a person would
        label = card(position).find_element(By.CSS_SELECTOR, f".flags input[data-flag={name}]").find_element(
            By.XPATH, "..")
        label.click()

    def sign_in():
        name = wait.until(lambda d: d.find_element(By.ID, "labeler"))
        name.clear()
        name.send_keys("alice", Keys.ENTER)

    try:
        driver.get(address)
        sign_in()
        shown("0")
        assert driver.find_element(By.ID, "progress-text").text == "0 / 5 done"
        assert cards() == [0, 1, 2, 3]
        # item 0, keyboard only: response 1 up to first, response 2 tied with response 0, flag 3
        keys(Keys.ARROW_DOWN)
        shift(Keys.ARROW_UP)
        assert cards() == [1, 0, 2, 3]
        keys(Keys.ARROW_DOWN, Keys.ARROW_DOWN, "=", "3")
        assert "tied" in card(2).get_attribute("class") and card(2).find_element(By.CLASS_NAME, "rank").text == "#2"
        keys(Keys.ENTER)
        shown("1")
        assert driver.find_element(By.ID, "progress-text").text == "1 / 5 done"
        # item 1, mouse: drag the last response to the top, flag (label click) the one now second
        ActionChains(driver).drag_and_drop(card(3), card(0)).perform()
        assert cards() == [3, 0, 1, 2]
        flag(1, "fails_instruction")
        if os.environ.get("RLHF_JAX_SCREENSHOT"):  # docs/labeling.png is made this way
            driver.save_screenshot(os.environ["RLHF_JAX_SCREENSHOT"])
        driver.find_element(By.ID, "submit").click()
        shown("2")
        # item 2: skip it, come back to it with the Back button, tie via the checkbox, flag 2 twice = off
        driver.find_element(By.ID, "skip").click()
        shown("3")
        driver.find_element(By.ID, "back").click()
        shown("2")
        card(1).find_element(By.CSS_SELECTOR, ".tie input").click()
        flag(3, "fails_constraint")
        card(0).click()
        keys("2", "2")
        driver.find_element(By.ID, "submit").click()
        shown("3")
        assert driver.find_element(By.ID, "progress-text").text == "3 / 5 done"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    try:
        process, again = _start_cli_server(workdir, "--port", port)
        assert again == address
        driver.refresh()
        name = wait.until(lambda d: d.find_element(By.ID, "labeler"))
        assert name.get_attribute("value") == "alice"  # remembered by the page
        name.send_keys(Keys.ENTER)
        shown("3")  # resumes at the first unlabeled item
        assert driver.find_element(By.ID, "progress-text").text == "3 / 5 done"
        shift(Keys.ARROW_DOWN)
        keys("4", Keys.ENTER)  # response 0 to second, flagged
        shown("4")
        assert driver.find_element(By.ID, "progress-text").text == "4 / 5 done"
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == [], errors
    finally:
        driver.quit()
        process.send_signal(signal.SIGKILL)
        process.wait()

    path = workdir / "labels" / "alice.jsonl"
    records = [r for _, r in read_records(path, "comparisons")]
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["item_id"] for r in raw] == ["0", "1", "2", "3"] and len(records) == 4
    assert [r["ranks"] for r in records] == [[1, 0, 1, 2], [1, 2, 3, 0], [0, 0, 1, 2], [1, 0, 2, 3]]
    none = [False] * K
    want_flags = [{"hallucination": [False, False, True, False]}, {"fails_instruction": [True, False, False, False]},
                  {"fails_constraint": [False, False, False, True]}, {"inappropriate_language": [True, False, False, False]}]
    for record, line, flags in zip(records, raw, want_flags):
        assert record["responses"] == items[line["item_id"]]["responses"] and line["labeler"] == "alice"
        assert line["flags"] == {f: flags.get(f, none) for f in FLAGS}

    demos = write_demonstrations(tmp_path / "demos.jsonl", 8)
    cfg = rm_config(tiny_config(demos, mesh=MeshConfig(data=2, fsdp=2, tensor=2)), path, steps=2, batch_size=4, k_max=K)
    experiment = write_experiment(cfg, tmp_path / "exp.py")
    assert cli.main(["rm", "--config", str(experiment), "--workdir", str(workdir)]) == 0
    assert (workdir / "rm" / "export" / "export.json").exists()


def _start_cli_server(workdir, *args):
    """``rlhf-jax label`` in a subprocess; returns (process, the address it printed)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    process = subprocess.Popen([sys.executable, "-m", "rlhf_jax.cli", "label", "--workdir", str(workdir),
                                "--port", "0", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env)
    for line in process.stdout:
        if "open http" in line:
            return process, line.split("open ", 1)[1].split()[0]
    process.wait()
    raise AssertionError(f"label exited with {process.returncode} before printing its address")


def _post(url, body, headers=None):
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status
    except urllib.error.HTTPError as err:
        return err.code


def test_the_cli_server_with_a_token_survives_kill_9(tmp_path):
    import signal
    import urllib.parse

    workdir = tmp_path / "run"
    prompts = _write_prompts_with_responses(tmp_path / "prompts.jsonl", 3)
    process, address = _start_cli_server(workdir, "--prompts", str(prompts), "--host", "127.0.0.2")
    try:
        parsed = urllib.parse.urlparse(address)
        token = urllib.parse.parse_qs(parsed.query)["token"][0]
        api = f"{parsed.scheme}://{parsed.netloc}/api/label"
        assert _post(api, _submission("ann", "0")) == 403
        assert _post(api, _submission("ann", "0"), {"X-Label-Token": token}) == 200
        with urllib.request.urlopen(address, timeout=30) as page:  # the printed address opens the page
            assert b"Rank the responses" in page.read()
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    process, address = _start_cli_server(workdir)  # default: 127.0.0.1, no token; same items
    try:
        assert "token" not in address and address.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(address + "api/queue?labeler=ann", timeout=30) as reply:
            queue = json.loads(reply.read())
        assert list(queue["labels"]) == ["0"] and len(queue["items"]) == 3
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def test_items_sampled_from_a_policy_export(tmp_path):
    import dataclasses

    from rlhf_jax.stages.sft import run_sft

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
    prompts = _write_prompts_with_responses(tmp_path / "prompts.jsonl", 2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["label", "--workdir", str(workdir), "--prompts", str(prompts), "--port", str(port)]
        assert cli.main(args) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_merge_writes_every_labelers_comparisons_for_the_rm(tmp_path, capsys):
    from rlhf_jax.data import read_records

    workdir = tmp_path / "run"
    items = _items(workdir, n=3, overlap=3)
    store = LabelStore(workdir / "labels")
    client = Client(LabelApp(store, items))
    for name, labels in (("ann", {"0": [0, 1, 2, 3], "1": [3, 2, 1, 0], "2": [0, 0, 1, 1]}),
                         ("ben", {"0": [1, 0, 2, 3], "1": [0, 1, 2, 3]})):
        for item_id, ranks in labels.items():
            assert client.post("/api/label", json=_submission(name, item_id, ranks, None)).status_code == 200
    assert cli.main(["label", "--merge", "--workdir", str(workdir)]) == 0
    assert "5 comparisons from 2 labelers" in capsys.readouterr().out
    merged = workdir / "labels" / "merged" / "comparisons.jsonl"
    assert len(read_records(merged, "comparisons")) == 5  # the RM's own reader accepts it
    records = [json.loads(line) for line in merged.read_text().splitlines()]  # whole, flags and all
    assert [(r["labeler"], r["item_id"], r["ranks"]) for r in records] == [
        ("ann", "0", [0, 1, 2, 3]), ("ann", "1", [3, 2, 1, 0]), ("ann", "2", [0, 0, 1, 1]),
        ("ben", "0", [1, 0, 2, 3]), ("ben", "1", [0, 1, 2, 3])]
    assert store.labelers() == ["ann", "ben"]  # the merged file is nobody's labels
    # a damaged line in one labeler's file is named there, and the merged file is left as it was
    ben = workdir / "labels" / "ben.jsonl"
    lines = ben.read_text().splitlines()
    ben.write_text(lines[0] + "\n" + '{"prompt": "x", "responses": ["a"], "ranks": [0, 1]}\n' + lines[1] + "\n")
    before = merged.read_bytes()
    assert cli.main(["label", "--merge", "--workdir", str(workdir)]) == 2
    assert f"{ben}:2" in capsys.readouterr().err
    assert merged.read_bytes() == before
