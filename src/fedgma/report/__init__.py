"""Reports from run folders: read every run, group seeds, tabulate mean ± std, pair GMA with plain
averaging, choose server lrs on validation, and plot, with the evaluation protocol of issue 15
(:mod:`~fedgma.report.protocol`: the mean over the last 20% of rounds, paired t-intervals, Holm's
correction).

One module per concern: :mod:`~fedgma.report.runs` (reading run folders of either config shape; failed
and unfinished ones), :mod:`~fedgma.report.configs` (which config keys differ between runs, readable names),
:mod:`~fedgma.report.stats` (mean ± std, t intervals), :mod:`~fedgma.report.groups` (seeds pooled,
pairing, τ sweeps), :mod:`~fedgma.report.selection` (server lr on validation),
:mod:`~fedgma.report.tables` (rows, Markdown, CSV), :mod:`~fedgma.report.figures` (plots) and
:mod:`~fedgma.report.write` (the whole report: Markdown, CSV, PNG and a self-contained
:mod:`~fedgma.report.html` page). The names below are the public interface.
"""

from fedgma.report.configs import readable_name, varying_keys
from fedgma.report.groups import Group, comparisons, make_groups, pair_groups, swept_keys, tau_families
from fedgma.report.runs import RunRecord, find_diverged, find_incomplete, find_runs, group_runs, load_run, read_config
from fedgma.report.selection import select_server_lr
from fedgma.report.stats import mean_std, rounds_to_target, t_quantile
from fedgma.report.tables import gain_rows, gains_markdown, summary_rows, table_markdown, table_rows
from fedgma.report.write import plural, write_report

__all__ = [
    "Group", "RunRecord", "comparisons", "find_diverged", "find_incomplete", "find_runs", "gain_rows", "gains_markdown",
    "group_runs", "load_run", "make_groups", "mean_std", "pair_groups", "plural", "read_config", "readable_name",
    "rounds_to_target", "select_server_lr", "summary_rows", "swept_keys", "t_quantile", "table_markdown", "table_rows",
    "tau_families", "varying_keys", "write_report",
]
