"""The labeling page in real headless Chromium (Selenium, Debian's ``chromium`` and
``chromium-driver``): ranking with keyboard, drag, buttons and touch, ties, ratings, flags,
skips, guidelines, the confirmation, layout at desktop and phone width, screen-reader
announcements, the shortcut overlay, a restart, and the lead's view.

Skips where Chromium or its driver is missing, unless ``RLHF_JAX_BROWSER_TESTS=required``
(``.ci/run`` sets it, after installing them), where it fails instead. With
``RLHF_JAX_SCREENSHOTS=DIR`` it saves the README's screenshots there.
"""

import json
import os
import pathlib
import shutil

import pytest
from werkzeug.test import Client

from rlhf_jax.labeling import FLAGS, LabelApp, LabelStore, read_items
from rlhf_jax.labeling.assign import display_order
from rlhf_jax.labeling.storage import make_items, write_items
from tests.labeling_helpers import ADMIN_TOKEN, K, make_run_items, serving, submission

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SHOTS = os.environ.get("RLHF_JAX_SCREENSHOTS")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1000")


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    """One headless Chromium for the module, through the system chromedriver (passed
    explicitly, so selenium-manager never runs and nothing is downloaded)."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        why = "no chromium/chromedriver on this machine (Debian: apt-get install chromium chromium-driver)"
        if os.environ.get("RLHF_JAX_BROWSER_TESTS") == "required":
            pytest.fail(why)
        pytest.skip(why)
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    browser.implicitly_wait(0)
    yield browser
    browser.quit()


class Page:
    """The labeling page as a person uses it, with checks on what it shows."""

    def __init__(self, driver, url):
        from selenium.webdriver.support.ui import WebDriverWait

        self.d, self.url = driver, url
        self.wait = WebDriverWait(driver, 10)
        driver.get(url)

    def by(self, css, many=False):
        from selenium.webdriver.common.by import By

        return self.d.find_elements(By.CSS_SELECTOR, css) if many else self.d.find_element(By.CSS_SELECTOR, css)

    def keys(self, *pressed):  # to the focused element, as a person types
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(self.d).send_keys(*pressed).perform()

    def chord(self, modifier, key):  # modifier held down while key is pressed
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(self.d).key_down(modifier).send_keys(key).key_up(modifier).perform()

    def sign_in(self, name, guidelines_expected=True):
        from selenium.webdriver.common.keys import Keys

        box = self.wait.until(lambda d: self.by("#labeler"))
        box.clear()
        box.send_keys(name, Keys.ENTER)
        self.wait.until(lambda d: self.by("#task").is_displayed())
        if guidelines_expected:  # a first visit opens the guidelines
            self.wait.until(lambda d: self.dialog_open("guidelines-dialog"))
            assert "Labeling guidelines" in self.by("#guidelines-body h1").text
            self.by("#guidelines-dialog .close").click()
        assert not self.dialog_open("guidelines-dialog")

    def dialog_open(self, dialog_id):
        return self.d.execute_script(f"return document.getElementById('{dialog_id}').open")

    def item_number(self):
        return int(self.by("#item-id").text.split()[1])

    def wait_item(self, number):
        self.wait.until(lambda d: self.item_number() == number)

    def order(self):  # response indices, best first, as shown
        return [int(li.get_attribute("data-response")) for li in self.by("#responses li", many=True)]

    def card(self, response):
        return self.by(f'#responses li[data-response="{response}"]')

    def badges(self):
        return {int(li.get_attribute("data-response")): li.find_element("css selector", ".rank").text
                for li in self.by("#responses li", many=True)}

    def select(self, response):  # click the card's text, as a person would
        self.card(response).find_element("css selector", ".text").click()

    def rate_all(self, ratings):  # {response: 1..7}, by clicking the buttons
        for response, value in ratings.items():
            self.card(response).find_element("css selector", f'.rate[data-value="{value}"]').click()

    def focus(self, css):
        self.d.execute_script("arguments[0].focus()", self.by(css))

    def severe_console_errors(self):
        return [e for e in self.d.get_log("browser") if e["level"] == "SEVERE"]


def _site(tmp_path, n=5, overlap=2, extra=()):
    """Items of the embedded task (and ``extra`` (prompt, responses) pairs after them) and an
    app on them; returns (workdir, app)."""
    workdir = tmp_path / "run"
    items = make_run_items(workdir, n=n, overlap=overlap)
    if extra:
        pairs = [(i["prompt"], i["responses"]) for i in items] + list(extra)
        write_items(workdir / "labels", make_items(pairs, overlap))
    directory = workdir / "labels"
    return workdir, LabelApp(LabelStore(directory), read_items(directory), None, ADMIN_TOKEN)


def _records(workdir, name):
    path = workdir / "labels" / f"{name}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _item_ids(app, name):
    return [i["id"] for i in Client(app).get(f"/api/queue?labeler={name}").json["items"]]


def test_rank_rate_flag_skip_restart_and_resume(driver, tmp_path):
    """Keyboard, drag and click; a tie, ratings, flags; a skip with its reason; the server
    restarted, the page reloaded: it resumes, without showing the guidelines again."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    workdir, app = _site(tmp_path)
    ids = _item_ids(app, "alice")
    shown = [display_order("alice", i, K) for i in ids]
    with serving(app) as server:
        port = server.server_port
        page = Page(driver, f"http://127.0.0.1:{port}/")
        page.sign_in("alice")
        assert page.by("#progress-text").text == "0 / 5 done"
        assert page.order() == shown[0]  # the random order the server recorded for alice and this item
        a, b, c, d = shown[0]
        # item 1, keyboard only: the second card up to first, the third tied with the second, ratings, flag h
        page.select(a)
        page.keys(Keys.ARROW_DOWN)
        page.chord(Keys.SHIFT, Keys.ARROW_UP)
        assert page.order() == [b, a, c, d]
        page.keys(Keys.ARROW_DOWN, Keys.ARROW_DOWN, "=", "h")
        assert page.badges() == {b: "#1", a: "#2", c: "#2", d: "#3"}
        assert "tied" in page.card(c).get_attribute("class")
        for response, value in ((b, "6"), (a, "4"), (c, "4"), (d, "1")):
            page.select(response)
            page.keys(value)
        page.focus("#responses li")
        page.keys(Keys.ENTER)
        page.wait_item(2)
        assert page.by("#progress-text").text == "1 / 5 done"
        # item 2, mouse: drag the last card to the top, rate with the buttons, flag by the label's text
        a, b, c, d = shown[1]
        ActionChains(driver).drag_and_drop(page.card(d), page.card(a)).perform()
        assert page.order() == [d, a, b, c]
        page.rate_all({d: 7, a: 5, b: 3, c: 2})
        page.card(a).find_element("css selector", ".flags input[data-flag=fails_instruction]").find_element(
            "xpath", "..").click()
        if SHOTS:
            page.select(a)
            driver.execute_script("window.scrollTo(0, 0)")
            driver.save_screenshot(str(pathlib.Path(SHOTS) / "labeling.png"))
        page.by("#submit").click()
        page.wait_item(3)
        # item 3: skipped, with a reason and a note
        page.keys("s")
        page.wait.until(lambda _: page.dialog_open("skip-dialog"))
        page.by("input[name=skip-reason][value=cant_judge]").click()
        page.by("#skip-note").send_keys("needs a chemist")
        page.by("#skip-confirm").click()
        page.wait_item(4)
        assert page.by("#progress-text").text == "3 / 5 done (1 skipped)"
        page.by("#back").click()
        page.wait_item(3)
        assert "skipped (I can't judge this" in page.by("#item-status").text
        server.shutdown()  # stopped (a kill -9 of the CLI server is tested over HTTP)
        server.server_close()
    with serving(app, port):  # a new server on the same address
        driver.refresh()
        box = page.wait.until(lambda _: page.by("#labeler"))
        assert box.get_attribute("value") == "alice"  # remembered by the page
        page.sign_in("alice", guidelines_expected=False)  # already read this version
        page.wait_item(4)  # the first item not done
        assert page.by("#progress-text").text == "3 / 5 done (1 skipped)"
        page.by("#open-guidelines").click()  # the button opens them again
        page.wait.until(lambda _: page.dialog_open("guidelines-dialog"))
        page.keys(Keys.ESCAPE)
        assert not page.dialog_open("guidelines-dialog")
        assert page.severe_console_errors() == []

    records = _records(workdir, "alice")
    a, b, c, d = shown[0]
    assert [r["item_id"] for r in records] == ids[:2]
    assert [records[0]["ranks"][r] for r in (a, b, c, d)] == [1, 0, 1, 2]
    assert [records[0]["ratings"][r] for r in (a, b, c, d)] == [4, 6, 4, 1]
    assert records[0]["flags"]["hallucination"] == [r == c for r in range(K)]  # flagged while c was selected
    a, b, c, d = shown[1]
    assert [records[1]["ranks"][r] for r in (a, b, c, d)] == [1, 2, 3, 0]
    assert records[1]["flags"]["fails_instruction"] == [r == a for r in range(K)]
    assert all(r["display_order"] == s for r, s in zip(records, shown)) and all(r["seconds"] > 0 for r in records)
    skips = [json.loads(x) for x in (workdir / "labels" / "skips" / "alice.jsonl").read_text().splitlines()]
    assert [(s["item_id"], s["reason"], s["note"]) for s in skips] == [(ids[2], "cant_judge", "needs a chemist")]


def test_enter_on_a_focused_button_presses_it_and_an_untouched_order_asks_first(driver, tmp_path):
    from selenium.webdriver.common.keys import Keys

    workdir, app = _site(tmp_path)
    shown = [display_order("bob", i, K) for i in _item_ids(app, "bob")]
    with serving(app) as server:
        page = Page(driver, f"http://127.0.0.1:{server.server_port}/")
        page.sign_in("bob")
        page.focus("#skip")
        page.keys(Keys.ENTER)  # presses Skip: asks why, saves nothing
        page.wait.until(lambda _: page.dialog_open("skip-dialog"))
        page.keys(Keys.ESCAPE)
        page.focus("#back")
        page.keys(Keys.ENTER)  # presses Back: the previous item (the last, going round)
        page.wait_item(5)
        page.by("#back").click()
        page.wait_item(4)
        page.by("#responses li").click()
        page.chord(Keys.CONTROL, "s")  # the browser's shortcut, not ours: no skip
        assert page.item_number() == 4 and not page.dialog_open("skip-dialog")
        page.keys(Keys.ENTER)  # nothing rated yet: refused, with what is missing
        page.wait.until(lambda _: "Rate every response" in page.by("#message").text)
        page.rate_all({r: 4 for r in range(K)})
        page.focus("#responses li")
        page.keys(Keys.ENTER)  # rated but in the shown order: asks first
        page.wait.until(lambda _: page.dialog_open("confirm"))
        page.keys(Keys.ENTER)  # the focused default is "Keep ranking"
        page.wait.until(lambda _: not page.dialog_open("confirm"))
        assert page.item_number() == 4 and _records(workdir, "bob") == []
        page.focus("#responses li")
        page.keys(Keys.ENTER)
        page.wait.until(lambda _: page.dialog_open("confirm"))
        page.by("#confirm-submit").click()
        page.wait_item(5)
        assert page.severe_console_errors() == []
    records = _records(workdir, "bob")
    assert len(records) == 1 and records[0]["display_order"] == shown[3]
    assert [records[0]["ranks"][r] for r in shown[3]] == [0, 1, 2, 3]  # the shown order, confirmed
    assert not (workdir / "labels" / "skips").exists()


def test_a_tie_stays_with_its_responses_when_another_moves_past(driver, tmp_path):
    from selenium.webdriver.common.keys import Keys

    workdir, app = _site(tmp_path)
    first = _item_ids(app, "cy")[0]
    a, b, c, d = display_order("cy", first, K)
    with serving(app) as server:
        page = Page(driver, f"http://127.0.0.1:{server.server_port}/")
        page.sign_in("cy")
        page.select(c)
        page.keys("=")  # c tied with b: #1 #2 #2 #3
        assert page.badges() == {a: "#1", b: "#2", c: "#2", d: "#3"}
        page.select(a)
        page.chord(Keys.SHIFT, Keys.ARROW_DOWN)  # a moves past the tied pair, which stays tied
        assert page.order() == [b, c, a, d]
        assert page.badges() == {b: "#1", c: "#1", a: "#2", d: "#3"}
        page.card(a).find_element("css selector", ".up").click()  # and back up with its button
        assert page.badges() == {a: "#1", b: "#2", c: "#2", d: "#3"}
        page.select(c)
        page.chord(Keys.SHIFT, Keys.ARROW_DOWN)  # c leaves the tie, one rank down
        assert page.badges() == {a: "#1", b: "#2", c: "#3", d: "#4"}
        page.chord(Keys.SHIFT, Keys.ARROW_UP)
        page.chord(Keys.SHIFT, Keys.ARROW_UP)  # past b, then past a
        assert page.order() == [c, a, b, d]
        page.by("#responses li").click()
        page.keys(Keys.ARROW_DOWN, Keys.ARROW_DOWN, "=")  # b tied with a
        page.rate_all({r: 3 for r in range(K)})
        page.by("#submit").click()
        page.wait_item(2)
    ranks = _records(workdir, "cy")[0]["ranks"]
    assert [ranks[r] for r in (c, a, b, d)] == [0, 1, 1, 2]


def test_long_unbroken_text_wraps_and_code_keeps_its_indentation(driver, tmp_path):
    code = "def f(x):\n    if x:\n        return 1\n    return 2"
    conversation = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Write a function"}]
    extra = [(conversation, ["x" * 3000, code, "short", "plain"])]
    workdir, app = _site(tmp_path, n=1, overlap=2, extra=extra)  # both items shown to everyone
    with serving(app) as server:
        page = Page(driver, f"http://127.0.0.1:{server.server_port}/")
        page.sign_in("dee")
        for _ in range(2):
            if "Write a function" in page.by("#prompt").text:
                break
            page.by("#back").click()
        assert page.by("#prompt").text == "system: You write Python.\n\nuser: Write a function"  # a conversation
        width = driver.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], width  # no sideways scrolling
        long_card = page.card(0)
        card_box = long_card.rect
        for inner in (long_card.find_element("css selector", ".text"), long_card.find_element("css selector", ".up")):
            box = inner.rect
            assert card_box["x"] <= box["x"] and box["x"] + box["width"] <= card_box["x"] + card_box["width"], box
        if display_order("dee", "1", K).index(0) > 0:  # a card with one above has a tie box
            tie = long_card.find_element("css selector", ".tie").rect
            assert tie["x"] + tie["width"] <= card_box["x"] + card_box["width"]
        # every line of the code starts at the block's left edge, and its text after its indentation
        char, lines = driver.execute_script("""
            const text = arguments[0].firstChild, range = document.createRange(), out = [];
            const left = (i) => { range.setStart(text, i); range.setEnd(text, i + 1); return range.getBoundingClientRect().left; };
            let start = 0;
            for (const line of text.data.split("\\n")) {
              const indent = line.length - line.trimStart().length;
              out.push([indent, left(start), left(start + indent)]);
              start += line.length + 1;
            }
            return [left(1) - left(0), out];""", page.card(1).find_element("css selector", ".text"))
        assert char > 0 and [indent for indent, _, _ in lines] == [0, 4, 8, 4]
        edge = lines[0][1]
        for indent, first, text in lines:  # within a pixel (sub-pixel text positions)
            assert first == pytest.approx(edge, abs=1.0) and text == pytest.approx(edge + indent * char, abs=1.0), lines


def test_on_a_phone_a_tap_moves_a_response_and_the_page_fits(driver, tmp_path):
    """390 px wide with touch (Chrome's device emulation): the ▲ ▼ buttons work with a tap,
    nothing scrolls sideways, and the controls are big enough to hit."""
    from selenium.webdriver.common.actions import interaction
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput

    workdir, app = _site(tmp_path)
    first = _item_ids(app, "eve")[0]
    a, b, c, d = display_order("eve", first, K)

    def tap(element):
        actions = ActionBuilder(driver, mouse=PointerInput(interaction.POINTER_TOUCH, "finger"))
        actions.pointer_action.move_to(element).pointer_down().pointer_up()
        actions.perform()

    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
    driver.execute_cdp_cmd("Emulation.setTouchEmulationEnabled", {"enabled": True, "maxTouchPoints": 5})
    try:
        with serving(app) as server:
            page = Page(driver, f"http://127.0.0.1:{server.server_port}/")
            page.sign_in("eve")
            assert driver.execute_script("return window.innerWidth") == 390
            assert page.by(".touch-hint").is_displayed() and not page.by(".keyboard-hint").is_displayed()
            tap(page.card(c).find_element("css selector", ".up"))
            assert page.order() == [a, c, b, d]
            tap(page.card(a).find_element("css selector", ".down"))
            assert page.order() == [c, a, b, d]
            for response, value in ((c, 6), (a, 5), (b, 4), (d, 2)):
                tap(page.card(response).find_element("css selector", f'.rate[data-value="{value}"]'))
            width = driver.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
            assert width[0] <= 390 and width[1] == 390, width
            move = page.card(a).find_element("css selector", ".up").size
            rate = page.card(a).find_element("css selector", ".rate").size
            assert min(move["width"], move["height"]) >= 44 and min(rate["width"], rate["height"]) >= 40
            size = driver.execute_script("return parseFloat(getComputedStyle(arguments[0]).fontSize)",
                                         page.card(a).find_element("css selector", ".text"))
            assert size >= 16
            if SHOTS:
                driver.execute_script("window.scrollTo(0, 0)")
                driver.save_screenshot(str(pathlib.Path(SHOTS) / "labeling_phone.png"))
            tap(page.by("#submit"))
            page.wait_item(2)
    finally:
        driver.execute_cdp_cmd("Emulation.setTouchEmulationEnabled", {"enabled": False})
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    ranks = _records(workdir, "eve")[0]["ranks"]
    assert [ranks[r] for r in (c, a, b, d)] == [0, 1, 2, 3]


def test_rank_changes_are_announced_and_question_mark_lists_the_shortcuts(driver, tmp_path):
    from selenium.webdriver.common.keys import Keys

    workdir, app = _site(tmp_path)
    a, b, c, d = display_order("fay", _item_ids(app, "fay")[0], K)
    with serving(app) as server:
        page = Page(driver, f"http://127.0.0.1:{server.server_port}/")
        page.sign_in("fay")
        region = page.by("#announce")
        assert region.get_attribute("aria-live") == "polite"

        def announced(text):
            page.wait.until(lambda _: region.get_attribute("textContent") == text)

        page.select(a)
        page.chord(Keys.SHIFT, Keys.ARROW_DOWN)
        announced("Response A moved down: rank 2 of 4")
        page.keys("=")
        announced("Response A tied with the one above: rank 1 of 3, tied with B")
        page.keys("5")
        announced("Response A rated 5 of 7")
        page.keys("l")
        announced("Response A flagged: inappropriate language")
        assert page.card(a).get_attribute("aria-label") == "Response A: rank 1, tied with the one above, rated 5 of 7"
        page.keys("?")
        page.wait.until(lambda _: page.dialog_open("help"))
        assert "Shift" in page.by("#help").text and "tie it with the one above" in page.by("#help").text
        page.keys(Keys.ESCAPE)
        assert not page.dialog_open("help")
        page.keys("g")
        page.wait.until(lambda _: page.dialog_open("guidelines-dialog"))
        page.keys(Keys.ESCAPE)
        assert page.severe_console_errors() == []


def test_the_leads_view(driver, tmp_path):
    workdir, app = _site(tmp_path, n=6, overlap=2)
    client = Client(app)
    for name, ranks in (("ann", (0, 1, 2, 3)), ("ben", (3, 2, 1, 0))):  # they disagree on both overlap items
        for item_id in ("0", "1"):
            assert client.post("/api/label", json=submission(name, item_id, ranks, seconds=30)).status_code == 200
    client.post("/api/skip", json={"labeler": "ben", "item_id": "4", "reason": "cant_judge", "note": "chess"})
    with serving(app) as server:
        base = f"http://127.0.0.1:{server.server_port}"
        page = Page(driver, f"{base}/admin")
        assert "lead token" in driver.find_element("tag name", "body").text  # refused, and says why
        page.severe_console_errors()  # that refusal's 403, read and dropped
        page = Page(driver, f"{base}/admin?token={ADMIN_TOKEN}")
        page.wait.until(lambda _: len(page.by("#labelers tbody tr", many=True)) == 2)
        rows = [[td.text for td in tr.find_elements("css selector", "td")] for tr in page.by("#labelers tbody tr", many=True)]
        # 6 items: ann labeled the 2 overlap ones (4 left); ben too, and skipped item 4 (3 left)
        assert [r[:5] for r in rows] == [["ann", "2", "0", "4", "2 / 2"], ["ben", "2", "1", "3", "2 / 2"]]
        assert rows[0][5] == "30 s / 30 s" and rows[0][6] == "0.0% of 12"
        assert page.by("#pairs tbody td").text == "ann/ben"
        worst = page.by("#disagreement tbody tr").find_elements("css selector", "td")
        assert worst[0].text in ("0", "1") and worst[1].text == "0.0%" and "ann: 0 1 2 3" in worst[4].text
        skip = [td.text for td in page.by("#skips tbody tr").find_elements("css selector", "td")]
        assert skip[1:] == ["ben", "4", "can't judge", "chess"]
        if SHOTS:
            driver.set_window_size(1280, 1000)
            driver.save_screenshot(str(pathlib.Path(SHOTS) / "labeling_admin.png"))
        assert page.severe_console_errors() == []
    assert set(FLAGS) == set(client.get(f"/api/admin?token={ADMIN_TOKEN}").json["flag_rates"])
