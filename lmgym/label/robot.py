"""A scripted labeller: headless Chromium driven through Selenium, ranking on the page with the keyboard.

It reads the prompt and completions off the page, asks a rater function for scores
and types the ranking as a person would (number keys best first, Shift+number for a
tie, Enter). The tests use it to check the page end to end, and
``examples/human_feedback.py --rater synthetic`` uses it so the figures of the
human-feedback loop are reproducible without a person.

Needs the system's Chromium and chromedriver (Debian: ``apt-get install chromium
chromium-driver``) and ``pip install selenium``; :func:`browser_unavailable` says which is missing.
"""

from __future__ import annotations

import shutil
import time

__all__ = ["browser_unavailable", "start_chromium", "tiers_from_scores", "PageLabeller"]

_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _binaries() -> tuple[str | None, str | None]:
    browser = next((path for name in _BROWSERS if (path := shutil.which(name))), None)
    return browser, shutil.which("chromedriver")


def browser_unavailable() -> str | None:
    """None when a scripted browser can run here, else what to install."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium, or pip install -e '.[test]')"
    browser, driver = _binaries()
    if browser is None or driver is None:
        return ("Chromium and chromedriver are not installed; on Debian/Ubuntu run "
                "`apt-get install -y chromium chromium-driver` (.ci/run does this), then run the tests again")
    return None


def start_chromium(width: int = 1000, height: int = 800):
    """A headless Chromium (the system's, never a downloaded one) under Selenium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    problem = browser_unavailable()
    if problem:
        raise RuntimeError(problem)
    browser, driver = _binaries()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-extensions", "--no-first-run", f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def tiers_from_scores(scores) -> list[list[int]]:
    """Completion indices grouped by equal score, best first: the ranking a rater's scores imply."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    tiers: list[list[int]] = []
    for i in order:
        if tiers and scores[tiers[-1][0]] == scores[i]:
            tiers[-1].append(i)
        else:
            tiers.append([i])
    return tiers


class PageLabeller:
    """Drives one browser tab on the labelling page.

    Args:
        driver: a Selenium WebDriver (see :func:`start_chromium`).
        timeout: seconds to wait for the page to show the next prompt.
    """

    def __init__(self, driver, timeout: float = 10.0):
        self.driver, self.timeout = driver, timeout

    def open(self, url: str, labeller: str) -> None:
        """Load the page and type the labeller's name."""
        from selenium.webdriver.common.by import By

        self.driver.get(url)
        self.wait_until(lambda: self.driver.execute_script(
            "return document.getElementById('progress-text').textContent !== '0 / 0 ranked'"))
        name = self.driver.find_element(By.ID, "labeller")
        name.clear()
        name.send_keys(labeller)
        self.driver.find_element(By.TAG_NAME, "h1").click()  # move focus off the input so keys reach the page

    def wait_until(self, condition) -> None:
        deadline = time.monotonic() + self.timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError("the labelling page did not update in time")
            time.sleep(0.005)

    def shown(self) -> dict | None:
        """``{"id", "prompt", "completions", "progress"}`` as displayed (read from the DOM), or None when done."""
        return self.driver.execute_script("""
            const id = document.body.dataset.itemId;
            if (!id) return null;
            return {id, prompt: document.getElementById('prompt').textContent,
                    completions: Array.from(document.querySelectorAll('.candidate .text'), (e) => e.textContent),
                    progress: document.getElementById('progress-text').textContent};""")

    def keys_for(self, tiers) -> list[tuple[str, bool]]:
        """The key presses (digit, with Shift) that enter ``tiers``; the last completion is left to Enter."""
        presses = [(str(i + 1), pos > 0) for tier in tiers for pos, i in enumerate(tier)]
        return presses[:-1] if len(tiers[-1]) == 1 else presses

    def rank_by_keyboard(self, tiers) -> str:
        """Type ``tiers`` and Enter; waits until the page shows the next prompt. Returns the ranked item's id."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        item_id = self.driver.execute_script("return document.body.dataset.itemId")
        actions = ActionChains(self.driver)
        for digit, shift in self.keys_for(tiers):
            if shift:
                actions.key_down(Keys.SHIFT).send_keys(digit).key_up(Keys.SHIFT)
            else:
                actions.send_keys(digit)
        actions.send_keys(Keys.ENTER).perform()
        self.wait_until(lambda: self.driver.execute_script("return document.body.dataset.itemId") != item_id)
        return item_id

    def rank_by_clicking(self, tiers) -> str:
        """Click the completions in ``tiers`` order (Shift+click for ties), then the Submit button."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        item_id = self.driver.execute_script("return document.body.dataset.itemId")
        for tier in tiers:
            for pos, i in enumerate(tier):
                card = self.driver.find_element(By.CSS_SELECTOR, f'.candidate[data-index="{i}"]')
                if pos:
                    ActionChains(self.driver).key_down(Keys.SHIFT).click(card).key_up(Keys.SHIFT).perform()
                else:
                    card.click()
        self.driver.find_element(By.ID, "submit").click()
        self.wait_until(lambda: self.driver.execute_script("return document.body.dataset.itemId") != item_id)
        return item_id

    def label_all(self, rater, limit: int | None = None) -> list[tuple[str, list[list[int]]]]:
        """Rank every prompt the page offers with ``rater(prompt, completions) -> scores``, by keyboard."""
        done = []
        while (shown := self.shown()) is not None and (limit is None or len(done) < limit):
            tiers = tiers_from_scores(rater(shown["prompt"], shown["completions"]))
            done.append((self.rank_by_keyboard(tiers), tiers))
        return done
