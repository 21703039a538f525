"""lmgym bench keeps honest state: locks, grid and run files checked, redone cells logged once, the README
table generated from results.json, per-run progress, and plots that cover every seed and mark the optimum."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lmgym.bench as benchmod
from lmgym.cli import main

ROOT = Path(__file__).parents[1]
TINY = ["--steps", "300", "--device", "cpu"]


def grid_args(out, agents=("reinforce",), seeds=("0",)):
    return ["bench", "--tasks", "lmgym/TargetToken-v0", "--agents", *agents, "--seeds", *seeds, "--out", str(out)] + TINY


def last_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.replace("\r", "\n").splitlines() if line.startswith("lmgym: ")][-1]


# ----------------------------------------------------------------------------- output folder and its files
def test_out_pointing_at_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "results").write_text("x")
    assert main(grid_args(tmp_path / "results")) == 2
    assert "is a file, not a folder" in last_error(capsys)


def test_corrupt_grid_and_run_files_and_reuse_only_under_the_same_cell_config(tmp_path, capsys):
    out = tmp_path / "b"
    assert main(grid_args(out)) == 2 - 2  # a finished grid of one cell
    run_file = out / "runs" / "TargetToken-v0__reinforce__seed0.json"
    assert json.loads(run_file.read_text())["cell"]["steps"] == 300

    (out / "grid.json").write_text("{not json")
    assert main(grid_args(out)) == 2
    assert "grid.json is unreadable" in last_error(capsys)

    # grid.json gone: the old run is not reused under another budget
    (out / "grid.json").unlink()
    args = grid_args(out)
    args[args.index("300")] = "200"
    assert main(args) == 2
    assert "steps=300 here but 200 now" in last_error(capsys)

    run_file.write_text('{"task": ')
    assert main(grid_args(out)) == 2
    assert f"{run_file} is corrupt" in last_error(capsys)


def test_a_redone_cell_starts_a_fresh_tensorboard_run(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "b"
    assert main(grid_args(out)) == 0
    # An attempt that was interrupted leaves its logs but no run file: the cell is redone.
    (out / "runs" / "TargetToken-v0__reinforce__seed0.json").unlink()
    assert main(grid_args(out)) == 0
    logdir = out / "tensorboard" / "TargetToken-v0" / "reinforce" / "seed0"
    events = EventAccumulator(str(logdir))
    events.Reload()
    result = json.loads((out / "runs" / "TargetToken-v0__reinforce__seed0.json").read_text())
    assert len(events.Scalars("objective/scores")) == len(result["curve"])
    assert len(list(logdir.glob("events.out.tfevents*"))) == 1


def test_each_run_has_its_own_progress_bar(tmp_path, capsys):
    assert main(grid_args(tmp_path / "b")) == 0
    err = capsys.readouterr().err
    assert "bench grid" in err and "reinforce:" in err and "tok/s" in err


# ----------------------------------------------------------------------------- locks between processes
HOLDER = """
import sys, time
from lmgym.utils.lock import FolderLock
lock = FolderLock(sys.argv[1], "another lmgym bench").acquire()
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder():
    procs = []

    def hold(folder):
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait(timeout=30)


def test_a_second_bench_into_the_same_folder_is_refused(tmp_path, capsys, holder):
    proc = holder(tmp_path / "b")
    assert main(grid_args(tmp_path / "b")) == 2
    line = last_error(capsys)
    assert f"in use by process {proc.pid}" in line and "another lmgym bench" in line
    assert not (tmp_path / "b" / "runs").exists()  # it computed nothing


def test_a_run_folder_in_use_is_refused(tmp_path, capsys, holder):
    run_dir = tmp_path / "TargetToken-v0" / "reinforce" / "seed0"
    assert main(["train", "--task", "lmgym/TargetToken-v0", "--agent", "reinforce", "--logdir", str(tmp_path)]
                + TINY) == 0
    proc = holder(run_dir)
    assert main(["train", "--task", "lmgym/TargetToken-v0", "--agent", "reinforce", "--resume", str(run_dir),
                 "--steps", "5000", "--device", "cpu"]) == 2
    assert f"in use by process {proc.pid}" in last_error(capsys)


def test_a_dead_benchs_lock_is_taken_over(tmp_path, holder):
    proc = holder(tmp_path / "b")
    proc.kill()
    proc.wait(timeout=30)
    assert (tmp_path / "b" / ".lmgym.lock").exists()
    assert main(grid_args(tmp_path / "b")) == 0


# ----------------------------------------------------------------------------- the README's results block
def readme_block_of(text: str, source: str = benchmod.DEFAULT_README_SOURCE, page: str = "README.md") -> str:
    begin_line, end_line = benchmod.readme_markers(source, page)
    begin, end = text.index(begin_line), text.index(end_line)
    return text[begin:end + len(end_line)]


def test_readme_results_equal_what_results_json_renders_to():
    """Every generated block of the README and docs/ equals what its results file renders to."""
    seen = []
    for page in ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]:
        text = (ROOT / page).read_text()
        for source in re.findall(r"<!-- lmgym bench results: generated from (\S+) by", text):
            report = json.loads((ROOT / source).read_text())
            assert readme_block_of(text, source, page) == benchmod.readme_block(report, source, page), (page, source)
            seen.append(source)
    assert {benchmod.DEFAULT_README_SOURCE, "docs/bench-trl/results.json",
            "docs/bench-trl-multi-turn/results.json"} <= set(seen)
    assert len(set(seen)) == len(seen)  # one block per results file


def test_update_readme_rewrites_only_the_block(tmp_path, monkeypatch):
    report = {"grid": {"tasks": ["lmgym/TargetToken-v0"], "agents": ["ppo"], "seeds": [0], "steps": 100,
                       "seconds": None, "overrides": {}},
              "table": {"lmgym/TargetToken-v0": {"ppo": {
                  "seeds": [0], "score": (0.9, 0.0), "start_score": (0.16, 0.0), "kl": (6.4, 0.0),
                  "return": (0.583, 0.0), "fraction_of_optimum": (0.995, 0.0), "wall_seconds": (5.2, 0.0),
                  "tokens_per_s": (3907.0, 0.0), "peak_memory_mib": (367.0, 0.0), "optimum": 0.586,
                  "memory_kind": "process peak RSS"}}},
              "runs": [{"machine": {"cpu": "Some CPU", "cores": 2, "torch_threads": 1}, "elapsed_seconds": 125.4}]}
    (tmp_path / "results.json").write_text(json.dumps(report))
    monkeypatch.chdir(tmp_path)  # the markers name the paths as the command does, from the working folder
    readme = tmp_path / "README.md"
    begin, end = benchmod.readme_markers("results.json")
    readme.write_text(f"# top\n\n{begin}\nold table\n{end}\n\n## after\n")
    benchmod.update_readme("README.md", "results.json")
    text = readme.read_text()
    assert text.startswith("# top\n\n") and text.endswith("\n\n## after\n") and "old table" not in text
    block = readme_block_of(text, "results.json")
    assert block.startswith("<!-- lmgym bench results: generated from results.json by `lmgym bench --out . "
                            "--readme README.md`")
    assert "| ppo | 0.160 → 0.900 ± 0.000 | 6.40 ± 0.00 | 0.583 ± 0.000 | 99.5% ± 0.0% | 5.2 | 3907 | 367 |" in block
    assert "Measured on this machine (Some CPU, 2 usable physical cores, torch 1 thread)" in block
    assert "took 2 min 5 s in all" in block
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="needs exactly one results block for results.json"):
        benchmod.update_readme(readme, tmp_path / "results.json")
    # a block generated from another file is not this file's to rewrite
    other_begin, other_end = benchmod.readme_markers("docs/bench/results.json")
    readme.write_text(f"{other_begin}\nkept\n{other_end}\n")
    with pytest.raises(ValueError, match="needs exactly one results block for results.json"):
        benchmod.update_readme(readme, tmp_path / "results.json")
    assert "kept" in readme.read_text()


# ----------------------------------------------------------------------------- plots
def fake_run(agent, seed, seconds_per_iter, optimum=0.5):
    curve = [[64 * i, seconds_per_iter * i, 0.1 * i, 0.5 * i] for i in range(1, 11)]
    return {"task": "lmgym/TargetToken-v0", "agent": agent, "seed": seed, "curve": curve, "optimum": optimum,
            "kl_coef": 0.05, "start": {"return": 0.0}, "end": {"kl": 5.0, "score": 0.8}}


GRID = {"tasks": ["lmgym/TargetToken-v0"], "agents": ["grpo"], "seeds": [0, 1]}


def test_wall_clock_plot_covers_the_slowest_seed():
    import matplotlib.pyplot as plt

    fig = benchmod.curves_figure([fake_run("grpo", 0, 1.0), fake_run("grpo", 1, 2.0)], GRID)
    try:
        ax = fig.axes[1]
        mean = next(line for line in ax.lines if line.get_label() == "grpo")
        color = mean.get_color()
        # mean and band over both seeds up to the fast seed's end (t=10) ...
        assert mean.get_xdata().min() == 0 and mean.get_xdata().max() == pytest.approx(10.0)
        band = ax.collections[0].get_paths()[0].vertices
        assert band[:, 0].max() == pytest.approx(10.0)
        # ... then the slow seed alone, as its own line, to its end at t=20 (return 1.0 - 0.05 * 5 = 0.75)
        tails = [line for line in ax.lines if line.get_color() == color and line is not mean
                 and line.get_linestyle() == "-"]
        assert len(tails) == 1
        assert tails[0].get_xdata()[-1] == pytest.approx(20.0) and tails[0].get_ydata()[-1] == pytest.approx(0.75)
        slow = np.asarray(fake_run("grpo", 1, 2.0)["curve"])
        assert tails[0].get_ydata()[0] == pytest.approx(np.interp(10.0, slow[:, 1], slow[:, 2] - 0.05 * slow[:, 3]))
    finally:
        plt.close(fig)


def test_exact_optimum_is_marked_on_curves_and_frontier():
    import matplotlib.pyplot as plt

    runs = [fake_run("grpo", 0, 1.0), fake_run("grpo", 1, 2.0)]
    fig = benchmod.curves_figure(runs, GRID)
    try:
        for ax in fig.axes:
            marks = [line for line in ax.lines if line.get_label().startswith("exact optimum")]
            assert marks and np.allclose(marks[0].get_ydata(), 0.5)
    finally:
        plt.close(fig)
    fig = benchmod.frontier_figure(runs, GRID)
    try:
        line = next(line for line in fig.axes[0].lines if "exact optimum" in line.get_label())
        kl, score = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
        assert np.allclose(score - 0.05 * kl, 0.5)  # every point on it has return = the optimum
    finally:
        plt.close(fig)


def test_readme_speed_table_equals_throughput_json():
    """The README's Speed ratios are those `lmgym bench --throughput --out docs/bench` wrote, to two decimals."""
    import re

    root = Path(__file__).resolve().parents[1]
    measured = json.loads((root / "docs/bench/throughput.json").read_text())
    expected = [measured["environment"]["ratio_b_over_a"], measured["environment"]["ratio_c_over_a"],
                measured["grpo"]["ratio"], measured["ppo"]["ratio"], measured["sb3"]["ratio_bridge_over_dummy"]]
    section = (root / "docs/speed.md").read_text().split("###", 1)[0]
    shown = [float(x) for x in re.findall(r"^\|[^|]+\| ([0-9.]+) \|$", section, flags=re.M)]
    assert shown == [round(r, 2) for r in expected]


def test_readme_trl_comparison_equals_grpo_vs_trl_json():
    """The README's lmgym-against-TRL table is what benchmarks/grpo_vs_trl.py renders from the results it wrote."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("grpo_vs_trl", root / "benchmarks/grpo_vs_trl.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)  # stdlib imports only: TRL lives in the benchmark's own environment
    readme = (root / "docs/speed.md").read_text()
    block = readme.split(script.README_BEGIN, 1)[1].split(script.README_END, 1)[0]
    assert block.strip() == script.render(json.loads(script.RESULTS.read_text()))


def test_multi_turn_kv_table_equals_its_results_file():
    """docs/multi_turn.md's KV-reuse table is what benchmarks/multi_turn_kv.py renders from the results it wrote."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("multi_turn_kv", root / "benchmarks/multi_turn_kv.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    page = (root / "docs/multi_turn.md").read_text()
    block = page.split(script.README_BEGIN, 1)[1].split(script.README_END, 1)[0]
    results = json.loads(script.RESULTS.read_text())
    assert block.strip() == script.render(results)
    ratios = [r["ratio"] for r in results["rows"]]
    assert [r["turns"] for r in results["rows"]] == [1, 2, 4, 8] and ratios == sorted(ratios, reverse=True)


def test_the_recorded_guess_runs_reach_90_percent_of_the_optimum_within_60_cpu_seconds():
    """The README's Guess-v0 rows: every agent at 90% or more of the exact optimum in every run, each run within 60 s
    of CPU time."""
    root = Path(__file__).resolve().parents[1]
    runs = [r for r in json.loads((root / "docs/bench/results.json").read_text())["runs"]
            if r["task"] == "lmgym/Guess-v0"]
    assert {r["agent"] for r in runs} == {"ppo", "grpo", "reinforce", "rloo", "a2c", "nlpo", "rft", "online-dpo"}
    for r in runs:
        assert r["cpu_seconds"] <= 60, (r["agent"], r["seed"], r["cpu_seconds"])
        assert r["fraction_of_optimum"] >= 0.9, (r["agent"], r["seed"], r["fraction_of_optimum"])


def test_trl_multi_turn_table_equals_its_results_file():
    """docs/trl.md's table of where TRL's multi-turn episode differs is what benchmarks/trl_multi_turn.py renders from
    the results it wrote (the script imports TRL only to measure)."""
    import importlib.util

    from lmgym.bench.page import read_block

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("trl_multi_turn", root / "benchmarks" / "trl_multi_turn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = json.loads(module.RESULTS.read_text())
    assert read_block(root / "docs" / "trl.md", module.BEGIN, module.END) == module.render(results).strip()
    assert all(r["differ"] == 0 for r in results["rows"])  # what the page says of the ids TRL trained on


@pytest.mark.parametrize("script", ["iteration0_kl", "bf16_rollout", "async_collect", "off_policy_verdict"])
def test_off_policy_tables_equal_their_results_files(script):
    """docs/off_policy.md's tables are what each benchmark renders from the results file it wrote."""
    import importlib.util

    from lmgym.bench.page import read_block

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(script, root / "benchmarks" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = json.loads(module.RESULTS.read_text())
    assert read_block(root / "docs" / "off_policy.md", module.BEGIN, module.END) == module.render(results).strip()


def test_turn_credit_tables_equal_their_results_file():
    """docs/turn_credit.md's tables are what benchmarks/turn_credit_verdict.py renders from the results it wrote."""
    import importlib.util

    from lmgym.bench.page import read_block

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("turn_credit_verdict", root / "benchmarks/turn_credit_verdict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = json.loads(module.RESULTS.read_text())
    assert read_block(root / "docs" / "turn_credit.md", module.BEGIN, module.END) == module.render(results).strip()
    # every agent x scheme that applies has three seeds of learning runs
    cells = {(r["task"], r["agent"], r["scheme"]) for r in results["learning"]}
    assert len(cells) == len(results["learning"]) == len(results["tasks"]) * (1 + 3 * 3)
    assert all(len(r["fractions"]) == len(results["seeds"]) == 3 for r in results["learning"])


def test_chat_calculator_block_equals_its_results_file():
    """The README's ChatCalculator figures and sample conversations are what the benchmark renders from its results."""
    import importlib.util

    from lmgym.bench.page import read_block

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("chat_calculator_grpo", root / "benchmarks" / "chat_calculator_grpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = json.loads(module.RESULTS.read_text())
    assert results["command_args"]["minutes"] == 30 and results["train_seconds"] >= 30 * 60
    assert read_block(root / "README.md", module.BEGIN, module.END) == module.render(results).strip()
