"""A labeling team's walk-through of ``rlhf-jax label``, in real headless Chromium:

two labelers, alice at a desktop (keyboard) and bob on a 390 px phone (taps), each label 20
items of the embedded task through the page, at the same time; midway the server gets
``kill -9`` (bob's next submission fails and is sent again after the restart), both resume;
then the README's ``--stats``, ``--merge`` and ``rm`` commands run as written. Each labeler
ranks like a person who agrees with another on about 73% of pairs (the task's noisy
labeler), rates by the gold score and flags what the gold scorer finds.

    python docs/labeling_walkthrough.py OUT_DIR    # writes OUT_DIR/walkthrough.json and screenshots

Needs Debian's chromium and chromium-driver. The README's screenshots (docs/labeling*.png)
come from here.
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import signal
import socket
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rlhf_jax.tasks import DEFAULT_TEMPERATURE, assess, gold_scores, plackett_luce_ranks  # noqa: E402
from tests.labeling_helpers import write_prompts_with_responses  # noqa: E402
from tests.test_labeling_stats import readme_labeling_commands  # noqa: E402

N_ITEMS, PER_LABELER, KILL_AFTER = 32, 20, 10  # 10 overlap items + 10 of their own each, 2 left over


def browser(profile: pathlib.Path, phone: bool):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,1000", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    if phone:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
        driver.execute_cdp_cmd("Emulation.setTouchEmulationEnabled", {"enabled": True, "maxTouchPoints": 5})
    return driver


class Labeler:
    """One person at the page: decides like the task's noisy labeler, acts through the page."""

    def __init__(self, name: str, driver, phone: bool, seed: int):
        self.name, self.d, self.phone = name, driver, phone
        self.rng = np.random.default_rng(seed)
        self.intended: dict[str, list[int]] = {}

    def css(self, selector, many=False):
        return self.d.find_elements("css selector", selector) if many else self.d.find_element("css selector", selector)

    def wait(self, condition, timeout=15):
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.d, timeout).until(lambda _: condition())

    def press(self, *keys):
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(self.d).send_keys(*keys).perform()

    def tap(self, element):
        if not self.phone:
            element.click()
            return
        from selenium.webdriver.common.actions import interaction
        from selenium.webdriver.common.actions.action_builder import ActionBuilder
        from selenium.webdriver.common.actions.pointer_input import PointerInput

        actions = ActionBuilder(self.d, mouse=PointerInput(interaction.POINTER_TOUCH, "finger"))
        actions.pointer_action.move_to(element).pointer_down().pointer_up()
        actions.perform()

    def open(self, url: str, first: bool):
        from selenium.webdriver.common.keys import Keys

        self.d.get(url)
        box = self.wait(lambda: self.css("#labeler"))
        box.clear()
        box.send_keys(self.name, Keys.ENTER)
        self.wait(lambda: self.css("#task").is_displayed() or self.css("#finished").is_displayed())
        if first:  # the guidelines open on a first visit
            self.wait(lambda: self.d.execute_script("return document.getElementById('guidelines-dialog').open"))
            self.tap(self.css("#guidelines-dialog .close"))

    def order(self):
        return [int(li.get_attribute("data-response")) for li in self.css("#responses li", many=True)]

    def item(self):
        return self.css("#item-id").text, self.css("#prompt").text

    def label_one(self, items_by_prompt: dict, shot: pathlib.Path | None = None) -> str:
        """Ranks, rates and flags the shown item through the page, then submits; returns its id."""
        from selenium.webdriver.common.keys import Keys

        _, prompt = self.item()
        item = items_by_prompt[prompt]
        scores = gold_scores([prompt] * len(item["responses"]), item["responses"])
        ranks = [int(r) for r in plackett_luce_ranks(scores, DEFAULT_TEMPERATURE, self.rng)]  # ties where equal
        self.intended[item["id"]] = list(ranks)
        target = sorted(range(len(ranks)), key=lambda r: ranks[r])  # best first
        for position, response in enumerate(target):  # one card at a time to its place
            while (at := self.order().index(response)) > position:
                card = self.css(f'#responses li[data-response="{response}"]')
                if self.phone:
                    self.tap(card.find_element("css selector", ".up"))
                else:
                    card.find_element("css selector", ".rank").click()
                    from selenium.webdriver.common.action_chains import ActionChains

                    ActionChains(self.d).key_down(Keys.SHIFT).send_keys(Keys.ARROW_UP).key_up(Keys.SHIFT).perform()
                assert self.order().index(response) == at - 1
        for above, response in zip(target, target[1:]):  # equal gold scores: a tie
            if ranks[response] == ranks[above]:
                card = self.css(f'#responses li[data-response="{response}"]')
                if self.phone:
                    self.tap(card.find_element("css selector", ".tie input"))
                else:
                    card.find_element("css selector", ".rank").click()
                    self.press("=")
        for response, text in enumerate(item["responses"]):
            rating = int(np.clip(round(1 + 6 * scores[response]), 1, 7))
            a = assess(prompt, text)
            card = self.css(f'#responses li[data-response="{response}"]')
            if self.phone:
                self.tap(card.find_element("css selector", f'.rate[data-value="{rating}"]'))
            else:
                card.find_element("css selector", ".rank").click()
                self.press(str(rating))
            for flag, on in (("fails_instruction", not a.attempts_instruction),
                             ("fails_constraint", a.constraint_met is False),
                             ("hallucination", a.hallucinated), ("inappropriate_language", a.offensive)):
                if on:
                    card = self.css(f'#responses li[data-response="{response}"]')
                    self.tap(card.find_element("css selector", f".flags input[data-flag={flag}]"))
        if shot:
            self.d.execute_script("window.scrollTo(0, 0)")
            self.d.save_screenshot(str(shot))
        before = self.item()
        shown = json.loads(self.d.execute_script("return JSON.stringify(queue.items[index].display_order)"))
        if target == shown and len(set(ranks)) == len(ranks):  # untouched: the page asks first
            self.tap(self.css("#submit"))  # the shown order was already right: confirm it
            self.wait(lambda: self.d.execute_script("return document.getElementById('confirm').open"))
            self.tap(self.css("#confirm-submit"))
        else:
            self.tap(self.css("#submit"))
        self.wait(lambda: self.item() != before or self.css("#finished").is_displayed() or
                  self.css("#message").text.startswith("Not saved"))
        return item["id"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(workdir: pathlib.Path, port: int, *extra: str):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    process = subprocess.Popen([sys.executable, "-m", "rlhf_jax.cli", "label", "--workdir", str(workdir),
                                "--port", str(port), *extra], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, env=env, cwd=workdir.parents[1])
    addresses = {}
    for line in process.stdout:
        if "label: open " in line:
            addresses["labelers"] = line.split("open ", 1)[1].split()[0]
        if "lead's view: " in line:
            addresses["lead"] = line.split("view: ", 1)[1].split()[0]
            return process, addresses
    raise RuntimeError("label exited before printing its addresses")


def run(command: str, cwd: pathlib.Path) -> tuple[float, str]:
    start = time.perf_counter()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-m", "rlhf_jax.cli", *shlex.split(command)[1:]], cwd=cwd, env=env,
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{command} failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - start, out.stdout


def main(out: pathlib.Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    base = out / "walk"
    workdir = base / "runs" / "x"  # the README's run directory, fresh
    base.mkdir()
    prompts = write_prompts_with_responses(base / "to_rank.jsonl", N_ITEMS, seed=29)
    port = free_port()
    server, addresses = start_server(workdir, port, "--prompts", str(prompts))
    items_by_prompt = {json.loads(line)["prompt"]: json.loads(line) for line in
                       (workdir / "labels" / "items.jsonl").read_text().splitlines()}
    alice = Labeler("alice", browser(out / "profile-alice", phone=False), phone=False, seed=1)
    bob = Labeler("bob", browser(out / "profile-bob", phone=True), phone=True, seed=2)
    report: dict = {"items": N_ITEMS, "addresses": {"labelers": addresses["labelers"], "lead": "…/admin?token=…"}}
    start = time.perf_counter()
    try:
        alice.open(addresses["labelers"], first=True)
        bob.open(addresses["labelers"], first=True)
        done = {"alice": [], "bob": []}
        for n in range(KILL_AFTER):  # taking turns, as two people working at once
            done["alice"].append(alice.label_one(items_by_prompt, out / "labeling.png" if n == 3 else None))
            done["bob"].append(bob.label_one(items_by_prompt, out / "labeling_phone.png" if n == 3 else None))
        saved = {name: len((workdir / "labels" / f"{name}.jsonl").read_text().splitlines()) for name in done}
        server.send_signal(signal.SIGKILL)  # kill -9, while bob is about to submit
        server.wait()
        failed_id = bob.label_one(items_by_prompt)
        report["submit_while_down"] = bob.css("#message").text
        server, again = start_server(workdir, port)
        report["same_addresses_after_restart"] = again == addresses
        bob.tap(bob.css("#submit"))  # sent again, no reload: saved now
        bob.wait(lambda: not bob.css("#message").text)
        done["bob"].append(failed_id)
        for person in (alice, bob):  # both come back: reload, same name, resume
            person.open(addresses["labelers"], first=False)
        report["resumed_at"] = {p.name: p.css("#progress-text").text for p in (alice, bob)}
        while len(done["alice"]) < PER_LABELER or len(done["bob"]) < PER_LABELER:
            for person in (alice, bob):
                if len(done[person.name]) < PER_LABELER:
                    done[person.name].append(person.label_one(items_by_prompt))
        report["labeling_seconds"] = round(time.perf_counter() - start, 1)
        report["saved_before_kill"] = saved
        lead = browser(out / "profile-lead", phone=False)
        lead.get(addresses["lead"])
        time.sleep(2)
        lead.save_screenshot(str(out / "labeling_admin.png"))
        lead.quit()
    finally:
        alice.d.quit()
        bob.d.quit()
        server.send_signal(signal.SIGKILL)
        server.wait()

    (out / "intended.json").write_text(json.dumps({p.name: p.intended for p in (alice, bob)}))
    for name, person in (("alice", alice), ("bob", bob)):  # the page saved what each one meant
        records = {json.loads(x)["item_id"]: json.loads(x) for x in
                   (workdir / "labels" / f"{name}.jsonl").read_text().splitlines()}
        assert len(records) == PER_LABELER, (name, len(records))
        wrong = {i: (records[i]["ranks"], person.intended[i]) for i in records if records[i]["ranks"] != person.intended[i]}
        assert not wrong, (name, wrong)
    commands = readme_labeling_commands()
    for key, command in (("stats", next(c for c in commands if "--stats" in c)),
                         ("merge", next(c for c in commands if "--merge" in c)),
                         ("rm", next(c for c in commands if c.startswith("rlhf-jax rm")))):
        seconds, stdout = run(command, base)
        report[key] = {"command": command, "seconds": round(seconds, 1), "output": stdout.strip().splitlines()[-40:]}
    from rlhf_jax.labeling import LabelStore, label_stats, read_items

    report["stats_json"] = label_stats(LabelStore(workdir / "labels"), read_items(workdir / "labels"))
    (out / "walkthrough.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "stats_json"}, indent=1))


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "walkthrough"))
