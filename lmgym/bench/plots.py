"""The grid's figures: learning curves (score and KL against environment steps, a band over seeds, the exact
optimum marked) and the frontier of final score against KL to the reference, one point per run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["curves_figure", "frontier_figure"]


def _banded(ax, curves: list[np.ndarray], col: int, label: str) -> None:
    """Mean line and min-max band over seeds of the return against column ``col`` (steps or seconds).

    Seeds are interpolated onto a common x grid. The mean and band cover the range every
    seed has reached (up to the fastest seed's end); past it, each slower seed continues
    as its own thin line to its end, so the plot runs to the slowest seed without a
    mean over fewer seeds posing as one over all. A dot marks each seed's end.
    """
    curves = [c for c in curves if len(c) > 1]
    if not curves:
        return
    first_end = min(c[-1, col] for c in curves)
    grid = np.linspace(max(c[0, col] for c in curves), first_end, 200)
    ys = np.stack([np.interp(grid, c[:, col], c[:, 2]) for c in curves])
    line = ax.plot(grid, ys.mean(0), label=label)[0]
    color = line.get_color()
    ax.fill_between(grid, ys.min(0), ys.max(0), alpha=0.2, color=color, linewidth=0)
    for c in curves:
        if c[-1, col] > first_end:
            rest = c[c[:, col] >= first_end]
            xs = np.concatenate([[first_end], rest[:, col]])
            ax.plot(xs, np.concatenate([[np.interp(first_end, c[:, col], c[:, 2])], rest[:, 2]]), color=color,
                    linewidth=0.8, alpha=0.7)
    ax.plot([c[-1, col] for c in curves], [c[-1, 2] for c in curves], "o", ms=3, color=color)


def _return_curve(run: dict) -> np.ndarray:
    """``[steps, seconds, return]`` rows of a run's curve, return = score - kl_coef * KL (rows without KL dropped),
    starting at (0, 0) with the evaluated return of the policy before training."""
    c = np.asarray(run["curve"], dtype=float).reshape(-1, 4)
    c = c[np.isfinite(c[:, 2]) & np.isfinite(c[:, 3])]
    rows = np.column_stack([c[:, 0], c[:, 1], c[:, 2] - run["kl_coef"] * c[:, 3]])
    start = run.get("start", {}).get("return")
    if start is not None:
        rows = np.vstack([[0.0, 0.0, start], rows])
    return rows


def _optimum_of(results: list[dict], task: str) -> float | None:
    return next((r["optimum"] for r in results if r["task"] == task and r.get("optimum") is not None), None)


def _plot_curves(path: Path, results: list[dict], grid: dict) -> None:
    import matplotlib.pyplot as plt

    fig = curves_figure(results, grid)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curves_figure(results: list[dict], grid: dict):
    """Return against environment steps and against wall-clock seconds, one row per task; the exact optimum
    as a dashed line where it is known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = grid["tasks"]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.6 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        for agent in grid["agents"]:
            curves = [_return_curve(r) for r in results if r["task"] == task and r["agent"] == agent and r["curve"]]
            _banded(axes[row, 0], curves, 0, agent)
            _banded(axes[row, 1], curves, 1, agent)
        optimum = _optimum_of(results, task)
        for ax in axes[row]:
            if optimum is not None:
                ax.axhline(optimum, color="black", linestyle="--", linewidth=1,
                           label=f"exact optimum {optimum:.3f}")
        axes[row, 0].set(xlabel="environment steps (tokens)", ylabel="return = score - kl_coef * KL", title=task)
        axes[row, 1].set(xlabel="wall-clock seconds (thin lines: seeds still running)",
                         ylabel="return = score - kl_coef * KL", title=task)
        axes[row, 0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def _plot_frontier(path: Path, results: list[dict], grid: dict) -> None:
    import matplotlib.pyplot as plt

    fig = frontier_figure(results, grid)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def frontier_figure(results: list[dict], grid: dict):
    """Each run's final score against its KL. Where the exact optimum R* is known, no policy can lie above the
    line score = R* + kl_coef * KL (its return would exceed R*); the optimal policy is where it touches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = grid["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for col, task in enumerate(tasks):
        ax = axes[0, col]
        for agent in grid["agents"]:
            runs = [r for r in results if r["task"] == task and r["agent"] == agent]
            if runs:
                kl = [r["end"]["kl"] for r in runs]
                score = [r["end"]["score"] for r in runs]
                ax.scatter(kl, score, label=agent, alpha=0.8)
        optimum = _optimum_of(results, task)
        if optimum is not None:
            beta = next(r["kl_coef"] for r in results if r["task"] == task)
            lo, hi = ax.get_xlim()
            xs = np.linspace(min(0.0, lo), hi, 50)
            ax.plot(xs, optimum + beta * xs, color="black", linestyle="--", linewidth=1,
                    label=f"return = exact optimum {optimum:.3f}")
            ax.set_xlim(min(0.0, lo), hi)
        ax.set(xlabel="KL to the reference (per episode)", ylabel="score", title=f"{task}: reward vs KL")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
