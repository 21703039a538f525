"""The grid's report: ``results.json`` (every run, and the table of means and spreads over seeds),
``results.md``, the figures, and the README block generated from ``results.json``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from lmgym.bench.plots import _plot_curves, _plot_frontier

__all__ = ["BenchError", "write_report", "results_markdown", "readme_markers", "readme_block", "update_readme",
           "DEFAULT_README_SOURCE"]

class BenchError(ValueError):
    """A bad task, agent, hyper-parameter or output folder."""


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` so that ``path`` is either the old file or the complete new one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


README_BEGIN = ("<!-- lmgym bench results: generated from docs/bench/results.json by "
                "`lmgym bench --out docs/bench --readme README.md`; do not edit by hand -->")
README_END = "<!-- end of lmgym bench results -->"
DEFAULT_README_SOURCE = "docs/bench/results.json"


def _jsonable(obj):
    """numpy scalars as numbers; anything else JSON cannot hold (devices, paths) as text."""
    return obj.item() if isinstance(obj, np.generic) else str(obj)


def _summary(values: list[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def write_report(out: Path, results: list[dict], grid: dict) -> dict:
    """``results.json``, ``results.md``, ``curves.png`` and ``frontier.png`` from finished runs."""
    table: dict[str, dict[str, dict]] = {}
    for task in grid["tasks"]:
        for agent in grid["agents"]:
            runs = [r for r in results if r["task"] == task and r["agent"] == agent]
            if not runs:
                continue
            table.setdefault(task, {})[agent] = {
                "seeds": [r["seed"] for r in runs],
                "score": _summary([r["end"]["score"] for r in runs]),
                "start_score": _summary([r["start"]["score"] for r in runs]),
                "kl": _summary([r["end"]["kl"] for r in runs]),
                "return": _summary([r["end"]["return"] for r in runs]),
                "fraction_of_optimum": _summary([r["fraction_of_optimum"] for r in runs]),
                "wall_seconds": _summary([r["wall_seconds"] for r in runs]),
                "tokens_per_s": _summary([r["tokens_per_s"] for r in runs]),
                "peak_memory_mib": _summary([r["peak_memory_mib"] for r in runs]),
                "optimum": runs[0]["optimum"], "memory_kind": runs[0]["memory_kind"],
            }
    report = {"grid": grid, "table": table, "runs": results}
    (out / "results.json").write_text(json.dumps(report, indent=1, default=_jsonable))
    (out / "results.md").write_text(results_markdown(table, grid))
    _plot_curves(out / "curves.png", results, grid)
    _plot_frontier(out / "frontier.png", results, grid)
    return report


def _fmt(pair, digits=3) -> str:
    mean, std = pair
    if mean is None or math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def results_markdown(table: dict, grid: dict) -> str:
    budget = f"{grid['steps']} environment steps" if grid["steps"] else f"{grid['seconds']} s"
    lines = [f"Budget per run: {budget}; seeds {grid['seeds']}; mean ± std over seeds. Return = score - "
             "kl_coef * KL; 'of optimum' = return / the exact KL-regularised optimum (diagnostic tasks).", ""]
    for task, agents in table.items():
        opt = next(iter(agents.values()))["optimum"]
        lines += [f"### {task}" + (f" (exact optimum {opt:.3f})" if opt else ""), "",
                  "| agent | score (start → end) | KL to ref | return | of optimum | wall s | tokens/s | peak MiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for agent, row in agents.items():
            frac = row["fraction_of_optimum"]
            frac_s = "-" if math.isnan(frac[0]) else f"{frac[0]:.1%} ± {frac[1]:.1%}"
            lines.append(f"| {agent} | {row['start_score'][0]:.3f} → {_fmt(row['score'])} | {_fmt(row['kl'], 2)} | "
                         f"{_fmt(row['return'])} | {frac_s} | {row['wall_seconds'][0]:.1f} | "
                         f"{row['tokens_per_s'][0]:.0f} | {row['peak_memory_mib'][0]:.0f} |")
        lines.append("")
    kind = next(iter(next(iter(table.values())).values()))["memory_kind"] if table else ""
    lines.append(f"Peak memory: {kind}.")
    return "\n".join(lines) + "\n"


def readme_markers(source: str = DEFAULT_README_SOURCE, page: str = "README.md") -> tuple[str, str]:
    """The two lines that enclose a page's block generated from ``source`` (its results.json); both paths as
    the command that rewrites the block names them, from the project's root. A page may hold one block per
    results file (the default grid's, a comparison grid's...), each rewritten only from its own file."""
    if (source, page) == (DEFAULT_README_SOURCE, "README.md"):
        return README_BEGIN, README_END
    folder = Path(source).parent.as_posix()
    return (f"<!-- lmgym bench results: generated from {source} by `lmgym bench --out {folder} --readme "
            f"{page}`; do not edit by hand -->", f"<!-- end of lmgym bench results from {source} -->")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def readme_block(report: dict, source: str = DEFAULT_README_SOURCE, page: str = "README.md") -> str:
    """The README's results section rendered from a ``results.json`` report (the file ``source``): where and how
    long it was measured, then the tables of ``results.md``, between the :func:`readme_markers` of ``source``."""
    grid, runs = report["grid"], report["runs"]
    machines = [r.get("machine") for r in runs]
    if runs and all(machines) and all(m == machines[0] for m in machines):
        m = machines[0]
        where = (f"{m['cpu']}, {m['cores']} usable physical core{'s' * (m['cores'] != 1)}, torch "
                 f"{m['torch_threads']} thread{'s' * (m['torch_threads'] != 1)}" + (f", {m['gpu']}" if "gpu" in m
                                                                                    else ""))
        total = sum(r["elapsed_seconds"] for r in runs)
        measured = (f"Measured on this machine ({where}): the {len(runs)} runs took {_duration(total)} in all, "
                    "each run's wall time including building its environment and, the first time a task needs "
                    "it, its zoo model.")
    else:
        measured = "These results do not record the machine they were measured on."
    budget = (f" --steps {grid['steps']}" if grid["steps"] else "") + (f" --seconds {grid['seconds']}"
                                                                      if grid["seconds"] else "")
    command = (f"lmgym bench --tasks {' '.join(grid['tasks'])} --agents {' '.join(grid['agents'])} --seeds "
               f"{' '.join(map(str, grid['seeds']))}{budget}")
    overrides = f", hyper-parameters {json.dumps(grid['overrides'])}" if grid.get("overrides") else ""
    head = f"The grid: `{command}`{overrides}. {measured}"
    begin, end = readme_markers(source, page)
    return "\n".join([begin, "", head, "", results_markdown(report["table"], grid).rstrip(), "", end])


def update_readme(readme: str | os.PathLike, results_json: str | os.PathLike) -> None:
    """Replace the results block of ``readme`` marked as generated from ``results_json`` (:func:`readme_markers`
    of the two paths as given, from the working folder) with :func:`readme_block` of that file."""
    readme, results_json = Path(readme), Path(results_json)
    source, page = Path(os.path.relpath(results_json)).as_posix(), Path(os.path.relpath(readme)).as_posix()
    begin, end = readme_markers(source, page)
    text = readme.read_text()
    if text.count(begin) != 1 or text.count(end) != 1:
        raise ValueError(f"{readme} needs exactly one results block for {source}, between the lines {begin!r} and "
                         f"{end!r}; add those two lines where the table should go")
    try:
        report = json.loads(results_json.read_text())
    except ValueError as err:
        raise BenchError(f"{results_json} is corrupt ({err})") from err
    before, rest = text.split(begin)
    after = rest.split(end, 1)[1]
    _atomic_write(readme, before + readme_block(report, source, page) + after)
