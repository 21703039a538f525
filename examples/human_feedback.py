"""Human feedback end to end: sample -> rank in the browser -> `lmgym reward-model train` -> RL -> before/after.

1. sample K=4 replies per prompt from the SFT policy (lmgym's zoo model "assistant", built offline once);
2. rank them on the page `lmgym label` serves: you, in your browser, or (``--rater synthetic``)
   headless Chromium typing the rankings of lmgym's synthetic rater, so the figures are reproducible;
3. train a reward model on the rankings with the unchanged ``lmgym reward-model train`` command,
   holding out every ranking of 8 of the 40 prompts for its pairwise accuracy;
4. train RLOO against the learned reward and compare the policy before and after.

    python examples/human_feedback.py                     # rank in your browser, then Ctrl-C or finish
    python examples/human_feedback.py --rater synthetic   # needs Chromium + chromedriver + selenium

Re-running resumes: rankings already in ``<workdir>/rankings.jsonl`` are kept and skipped.
"""

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import gymnasium as gym
import numpy as np

from lmgym import zoo
from lmgym.zoo import corpora
from lmgym.agents import RLOO
from lmgym.label import RankingStore, sample_candidates
from lmgym.rewards import LearnedReward, RewardModel


def lmgym_cli(*args) -> list[str]:
    return [sys.executable, "-m", "lmgym.cli", *map(str, args)]


def start_label_server(candidates: Path, rankings: Path, port: int) -> tuple[subprocess.Popen, str]:
    """``lmgym label`` as a child process; returns it and the URL it printed."""
    proc = subprocess.Popen(lmgym_cli("label", "--candidates", candidates, "--out", rankings, "--port", port),
                            stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        print(line, end="")
        if "open http" in line:
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep draining its output
            return proc, line.split("open ", 1)[1].split()[0]
    raise RuntimeError("lmgym label did not start (see its message above)")


def rank_with_the_synthetic_rater(url: str, screenshot: Path | None) -> float:
    """Headless Chromium ranks every prompt on the page, by keyboard, as the synthetic rater would."""
    from lmgym.label.robot import PageLabeller, start_chromium, tiers_from_scores

    def rater(prompt, completions):
        return corpora.polite_concise_labeller([prompt] * len(completions), completions)

    driver = start_chromium(width=900, height=660)
    try:
        page = PageLabeller(driver)
        page.open(url, "synthetic-rater")
        start = time.perf_counter()
        done = []
        if screenshot is not None:  # a quarter of the way in, two picks into a ranking
            from selenium.webdriver.common.action_chains import ActionChains

            done += page.label_all(rater, limit=30)
            shown = page.shown()
            tiers = tiers_from_scores(rater(shown["prompt"], shown["completions"]))
            ActionChains(driver).send_keys("".join(digit for digit, _ in page.keys_for(tiers)[:2])).perform()
            page.wait_until(lambda: len(driver.find_elements("css selector", ".candidate.placed")) == 2)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(screenshot))
            driver.find_element("id", "clear").click()
            driver.find_element("tag name", "h1").click()
        done += page.label_all(rater)
        seconds = time.perf_counter() - start
        print(f"the synthetic rater ranked {len(done)} prompts through the page in {seconds:.1f} s")
        return seconds
    finally:
        driver.quit()


def wait_for_a_person(rankings: Path, ids: set[str]) -> None:
    print("Rank in your browser; this script goes on when every prompt is ranked, or when you press Ctrl-C.")
    left = len(ids)
    try:
        while True:
            with RankingStore(rankings) as store:
                left = len(ids - store.ranked_ids())
            if not left:
                return
            time.sleep(2)
    except KeyboardInterrupt:
        print(f"\ngoing on with the rankings so far ({len(ids) - left} of {len(ids)})")


def split_by_prompt(rankings: Path, held_out_prompts: set[str], workdir: Path) -> tuple[Path, Path]:
    """Training and held-out files: every ranking of a held-out prompt goes to the held-out file."""
    train, held = workdir / "train.jsonl", workdir / "heldout.jsonl"
    with open(rankings) as source, open(train, "w") as t, open(held, "w") as h:
        for line in source:
            (h if json.loads(line)["prompt"] in held_out_prompts else t).write(line)
    return train, held


def main(rater: str = "human", workdir: str = "human-feedback", rounds: int = 3, k: int = 4, port: int = 8765,
         rm_epochs: int = 10, agent_steps: int = 20_000, screenshot: str | None = None, zoo_steps: int | None = None):
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    # 1. Candidates: k replies per prompt from the SFT policy, seeded (the same file on every run).
    policy, tokenizer = zoo.load("assistant", steps=zoo_steps)
    prompts = corpora.assistant_prompts()
    items = []
    for round_ in range(rounds):
        items += sample_candidates(policy, tokenizer, prompts, k, max_new_tokens=20, seed=round_)
    candidates = workdir / "candidates.jsonl"
    candidates.write_text("".join(json.dumps({"id": i.id, "prompt": i.prompt, "completions": list(i.completions)})
                                  + "\n" for i in items))
    print(f"{len(items)} prompts x {k} replies to rank ({rounds} samples of each of {len(prompts)} prompts)")

    # 2. Rankings, through the page.
    rankings = workdir / "rankings.jsonl"
    server, url = start_label_server(candidates, rankings, port)
    try:
        if rater == "synthetic":
            rank_with_the_synthetic_rater(url, Path(screenshot) if screenshot else None)
        else:
            wait_for_a_person(rankings, {i.id for i in items})
    finally:
        server.terminate()
        server.wait(timeout=30)

    # 3. The reward model, with the CLI exactly as a user runs it.
    train, held = split_by_prompt(rankings, set(prompts[::5]), workdir)
    rm_dir = workdir / "reward-model"
    subprocess.run(lmgym_cli("reward-model", "train", "--data", train, "--eval-data", held,
                             "--backbone", zoo.load_path("assistant", steps=zoo_steps), "--out", rm_dir,
                             "--epochs", rm_epochs, "--learning-rate", "1e-3", "--batch-pairs", 128, "--overwrite"),
                   check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads((rm_dir / "training_metrics.json").read_text())
    print(f"reward model: held-out pairwise accuracy {metrics['eval_accuracy']:.1%} "
          f"(train {metrics['train_accuracy']:.1%}, {metrics['steps']} steps)")

    # 4. RLOO against the learned reward; the synthetic rater's own score says whether the policy really improved.
    venv = gym.make_vec("lmgym/TextGen-v0", num_envs=64, group_size=4, model=policy, tokenizer=tokenizer,
                        reward_fn=LearnedReward(RewardModel.load(rm_dir)), prompts=prompts, max_new_tokens=20,
                        kl_coef=0.05, device="cpu")
    agent = RLOO(venv, learning_rate=1e-3)

    def rater_score():
        batch = agent.collect()
        return float(np.mean(corpora.polite_concise_labeller(batch.prompts, batch.completions)))

    before, rater_before = agent.evaluate(), rater_score()
    agent.learn(agent_steps)
    after, rater_after = agent.evaluate(), rater_score()
    print(f"RLOO against the learned reward: reward-model score {before['score']:.2f} -> {after['score']:.2f} "
          f"(KL {after['kl']:.2f}); the synthetic rater's score {rater_before:.2f} -> {rater_after:.2f}")
    return {"reward_model": metrics, "before": before, "after": after, "rater": (rater_before, rater_after)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rater", choices=["human", "synthetic"], default="human")
    parser.add_argument("--workdir", default="human-feedback")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--agent-steps", type=int, default=20_000)
    parser.add_argument("--screenshot", help="with --rater synthetic: save a PNG of the page mid-ranking here")
    args = parser.parse_args()
    main(args.rater, args.workdir, port=args.port, agent_steps=args.agent_steps, screenshot=args.screenshot)
