"""``lmgym bench``: the grid of agents x tasks x seeds (``grid``), its results table, README block and figures
(``report``, ``plots``), and the throughput ratios against hand-written baselines (``throughput``)."""

from lmgym.bench.grid import AGENT_NAMES, RECOMMENDED, bench, machine, parse_overrides, run
from lmgym.bench.plots import curves_figure, frontier_figure
from lmgym.bench.report import (DEFAULT_README_SOURCE, BenchError, readme_block, readme_markers, results_markdown,
                                update_readme, write_report)

__all__ = ["AGENT_NAMES", "RECOMMENDED", "run", "bench", "parse_overrides", "machine", "BenchError", "write_report",
           "results_markdown", "readme_markers", "readme_block", "update_readme", "DEFAULT_README_SOURCE",
           "curves_figure", "frontier_figure"]
