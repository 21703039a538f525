"""``lmgym bench``: the grid of agents x tasks x seeds with its results table and plots (``grid``), and the
throughput ratios against hand-written baselines (``throughput``)."""

from lmgym.bench.grid import AGENT_NAMES, RECOMMENDED, bench, machine, parse_overrides, readme_block, run, \
    update_readme, write_report

__all__ = ["AGENT_NAMES", "RECOMMENDED", "run", "bench", "parse_overrides", "write_report", "readme_block",
           "update_readme", "machine"]
