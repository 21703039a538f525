"""The labelling page in a real browser: headless Chromium from the system's packages, driven by Selenium.

Skips (with what to install) when Chromium, chromedriver, selenium or the ``label`` extra is missing;
``.ci/run`` installs them so CI runs these tests.
"""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from lmgym.zoo import corpora
from lmgym.label import LabelItem, item_id
from lmgym.label.robot import browser_unavailable
from lmgym.rewards.reward_model import read_preferences
from test_label import HOSTILE, lines, running_server

pytestmark = pytest.mark.browser

_missing = browser_unavailable()
if _missing is None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        _missing = "the label extra is not installed: pip install -e '.[label]'"
if _missing:
    pytest.skip(f"browser tests skipped: {_missing}", allow_module_level=True)

from lmgym.label.robot import PageLabeller, start_chromium, tiers_from_scores  # noqa: E402


@pytest.fixture(scope="module")
def driver():
    browser = start_chromium()
    browser.set_page_load_timeout(20)
    yield browser
    browser.quit()


def write_candidates(path, items):
    path.write_text("".join(json.dumps({"prompt": i.prompt, "completions": list(i.completions)}) + "\n"
                            for i in items))


def assistant_items(n: int, k: int = 4, seed: int = 0) -> list[LabelItem]:
    """``n`` assistant prompts, each with ``k`` replies from lmgym's synthetic assistant corpus."""
    rng = np.random.default_rng(seed)
    replies = [line.split("assistant :", 1)[1].strip() for line in corpora.assistant_corpus(n * k * 2, rng)]
    replies = list(dict.fromkeys(r for r in replies if r.strip(". ")))
    prompts = corpora.assistant_prompts()
    items = []
    for i in range(n):
        completions = tuple(replies[i * k:(i + 1) * k])
        items.append(LabelItem(item_id(prompts[i], completions), prompts[i], completions))
    return items


def rater(prompt, completions):
    return corpora.polite_concise_labeller([prompt] * len(completions), completions)


class ServerProcess:
    """``lmgym label`` as a child process that the test can SIGKILL and restart on the same port."""

    def __init__(self, candidates, out, port=0):
        cmd = [sys.executable, "-m", "lmgym.cli", "label", "--candidates", str(candidates), "--out", str(out),
               "--port", str(port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})
        output = queue.Queue()  # lines read by a thread, so waiting for them is bounded in time
        threading.Thread(target=lambda: [output.put(line) for line in self.proc.stdout], daemon=True).start()
        deadline, seen = time.monotonic() + 60, ""
        while "open http" not in seen:
            try:
                seen += output.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise AssertionError(f"lmgym label did not start within 60 s: {seen}") from None
        self.url = seen.split("open ", 1)[1].split()[0]
        self.port = int(self.url.rsplit(":", 1)[1].strip("/"))

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


def status_text(driver):
    return driver.execute_script("return document.getElementById('status').textContent")


def test_label_by_click_and_keyboard_through_a_reload_and_a_killed_server(driver, tmp_path):
    items = assistant_items(8)
    items[0] = LabelItem(item_id("<b>bold?</b> prompt", (HOSTILE, "plain reply", "another", "a fourth")),
                         "<b>bold?</b> prompt", (HOSTILE, "plain reply", "another", "a fourth"))
    candidates, out = tmp_path / "c.jsonl", tmp_path / "r.jsonl"
    write_candidates(candidates, items)
    intended = {}
    server = ServerProcess(candidates, out)
    try:
        page = PageLabeller(driver)
        page.open(server.url, "ada")
        shown = page.shown()
        # Hostile text is displayed verbatim and nothing in it ran.
        assert shown["prompt"] == "<b>bold?</b> prompt" and shown["completions"][0] == HOSTILE
        assert driver.execute_script("return window.__pwned === undefined && !document.querySelector("
                                     "'#candidates img, #candidates script, #prompt b')")
        # Two by clicking (one with a tie), two by keyboard (one with a tie).
        for tiers in ([[1], [0, 2], [3]], [[3], [1], [0], [2]]):
            intended[page.rank_by_clicking(tiers)] = tiers
        for tiers in ([[2], [0], [3], [1]], [[0, 1], [2, 3]]):
            intended[page.rank_by_keyboard(tiers)] = tiers
        # Reload mid-way through a ranking: the same prompt comes back, with the picks cleared.
        before = page.shown()
        from selenium.webdriver.common.action_chains import ActionChains
        ActionChains(driver).send_keys("21").perform()
        page.wait_until(lambda: len(driver.find_elements("css selector", ".candidate.placed")) == 2)
        driver.refresh()
        page.wait_until(lambda: page.shown() is not None)
        assert page.shown()["id"] == before["id"] and not driver.find_elements("css selector", ".candidate.placed")
        driver.find_element("tag name", "h1").click()
        intended[page.rank_by_keyboard([[1], [2], [0], [3]])] = [[1], [2], [0], [3]]
        # Kill the server: the ranking typed meanwhile is refused in the page, and saved after the restart.
        server.kill()
        waiting = page.shown()
        ActionChains(driver).send_keys("432").send_keys("\ue007").perform()  # \ue007 is Enter
        page.wait_until(lambda: "cannot be reached" in status_text(driver))
        assert page.shown()["id"] == waiting["id"]
        server = ServerProcess(candidates, out, port=server.port)
        ActionChains(driver).send_keys("\ue007").perform()
        page.wait_until(lambda: page.shown() is None or page.shown()["id"] != waiting["id"])
        intended[waiting["id"]] = [[3], [2], [1], [0]]
        # The rest by keyboard, as the synthetic rater would rank them.
        for ranked_id, tiers in page.label_all(rater):
            intended[ranked_id] = tiers
        assert page.shown() is None
        assert driver.execute_script("return document.getElementById('progress-text').textContent") == "8 / 8 ranked"
    finally:
        server.kill()
    records = lines(out)
    assert len(records) == 8 and sorted(r["id"] for r in records) == sorted(i.id for i in items)
    by_id = {i.id: i for i in items}
    for r in records:
        item = by_id[r["id"]]
        assert r["prompt"] == item.prompt and r["completions"] == list(item.completions) and r["labeller"] == "ada"
        tiers = intended[r["id"]]
        if all(len(t) == 1 for t in tiers):
            assert r["ranking"] == [t[0] for t in tiers]
        else:
            assert r["tiers"] == tiers
    assert len(read_preferences(out)) == 8


def test_two_tabs_share_the_work_without_duplicates(driver, tmp_path):
    from lmgym.label import LabelQueue, RankingStore

    items = assistant_items(6)
    out = tmp_path / "r.jsonl"
    with running_server(LabelQueue(items, RankingStore(out))) as url:
        page = PageLabeller(driver)
        page.open(url + "/", "ada")
        first_tab = driver.current_window_handle
        driver.switch_to.new_window("tab")
        page.open(url + "/", "bo")
        second_tab = driver.current_window_handle
        ids = {}
        for tab in (first_tab, second_tab):
            driver.switch_to.window(tab)
            ids[tab] = page.shown()["id"]
        assert ids[first_tab] != ids[second_tab]  # each tab got its own prompt
        driver.switch_to.window(first_tab)
        from selenium.webdriver.common.action_chains import ActionChains
        ActionChains(driver).send_keys("s").perform()  # skip: the first tab moves on, the prompt stays free
        page.wait_until(lambda: page.shown()["id"] not in ids.values())
        names = {first_tab: "ada", second_tab: "bo"}
        labelled = {first_tab: [], second_tab: []}
        while True:
            progressed = False
            for tab in (first_tab, second_tab):
                driver.switch_to.window(tab)
                shown = page.shown()
                if shown is not None:
                    labelled[tab].append(page.rank_by_keyboard([[0], [1], [2], [3]]))
                    progressed = True
            if not progressed:
                break
        driver.close()
        driver.switch_to.window(first_tab)
    records = lines(out)
    assert sorted(r["id"] for r in records) == sorted(i.id for i in items)
    for tab, done in labelled.items():
        assert {r["labeller"] for r in records if r["id"] in done} == {names[tab]}
    assert ids[first_tab] in labelled[second_tab] and labelled[first_tab] and labelled[second_tab]


def test_twenty_prompts_by_keyboard_with_the_synthetic_rater(driver, tmp_path):
    """The timing of labelling 20 prompts x 4 completions by keyboard, and rankings equal to the rater's."""
    from lmgym.label import LabelQueue, RankingStore

    items = assistant_items(20)
    out = tmp_path / "r.jsonl"
    with running_server(LabelQueue(items, RankingStore(out))) as url:
        page = PageLabeller(driver)
        page.open(url + "/", "synthetic")
        start = time.perf_counter()
        done = page.label_all(rater)
        seconds = time.perf_counter() - start
    records = lines(out)
    assert len(done) == len(records) == 20 and len({r["id"] for r in records}) == 20
    for r in records:  # independent check: the rater's scores on the file's own completions give its ranking
        expected = tiers_from_scores(rater(r["prompt"], r["completions"]))
        assert (r["ranking"] == [t[0] for t in expected]) if "ranking" in r else (r["tiers"] == expected)
    print(f"\nlabelled 20 prompts x 4 completions by keyboard in {seconds:.2f} s "
          f"({1000 * seconds / 20:.0f} ms per prompt, page + server + browser automation)")
    assert seconds < 60
