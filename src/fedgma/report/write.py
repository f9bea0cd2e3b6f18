"""The whole report of a runs folder: tables, gains, server-lr selection, plots and ``report.md``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedgma.report.figures import plot_curves, plot_gains, plot_mask, plot_tau
from fedgma.report.groups import make_groups, pair_groups, tau_families
from fedgma.report.runs import find_diverged, find_runs
from fedgma.report.selection import lr_selection
from fedgma.report.tables import gain_rows, gains_markdown, table_markdown, table_rows, write_csv

__all__ = ["write_report"]


def write_report(
    root: str | Path, out: str | Path | None = None, target_fraction: float = 0.95, target: float | None = None
) -> dict[str, Any]:
    """Read every run under ``root`` and write tables (Markdown, CSV), plots and ``report.md`` to ``out``.

    Returns the rows and the paths written. Raises ``ValueError`` when ``root`` holds no finished run.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"runs folder {root} does not exist")
    runs = find_runs(root)
    if not runs:
        raise ValueError(f"no finished runs (folders with summary.json) under {root}")
    if not 0 < target_fraction <= 1:
        raise ValueError(f"--target-fraction must be in (0, 1], got {target_fraction}")
    out = Path(out) if out is not None else root / "report"
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    groups = make_groups(runs)
    rows = table_rows(groups, target_fraction, target)
    gains = gain_rows(groups)
    diverged = find_diverged(root)

    (out / "summary.md").write_text(table_markdown(rows))
    write_csv(out / "summary.csv", rows)
    (out / "gains.md").write_text(gains_markdown(gains))
    write_csv(out / "gains.csv", gains)

    selection = lr_selection(groups)
    (out / "server_lr_selection.json").write_text(json.dumps(selection, indent=2, ensure_ascii=False))

    figures: list[Path] = []
    pairs = pair_groups(groups)
    for setting in sorted({g.setting for g in groups}):
        slug = (setting or "runs").replace("/", "_")
        in_setting = [p for p in pairs if p[1].setting == setting]
        if in_setting:
            figures.append(plot_curves(in_setting, plots / f"curves_{slug}.png", setting or str(root)))
        mask = plot_mask([g for g in groups if g.setting == setting and g.selected],
                         plots / f"mask_{slug}.png", setting or str(root))
        if mask:
            figures.append(mask)
    for family in tau_families(groups):
        slug = (family[0].setting or "runs").replace("/", "_")
        base = next((m for m, g in pairs if g in family), None)
        figures.append(plot_tau(family, base, plots / f"tau_{slug}_{family[0].algorithm}.png",
                                family[0].setting or str(root)))
    gain_plot = plot_gains(gains, plots / "gains.png")
    if gain_plot:
        figures.append(gain_plot)

    lines = [f"# Report: {root}", "", f"{len(runs)} finished runs, {len(diverged)} diverged, "
             f"{len(groups)} configurations.", ""]
    if gains:
        lines += ["## GMA − plain averaging (accuracy points, paired by seed)", "",
                  "mean ± std over seeds [95% t-interval]; *verdict*: whether the interval excludes 0.", "",
                  gains_markdown(gains)]
    lines += ["## All configurations", "",
              f"Accuracy in %, mean ± std over seeds. Target: {target_fraction:g} × plain averaging's final test "
              "accuracy of the same setting and algorithm (first evaluated round reaching it; seeds reaching it)."
              if target is None else f"Accuracy in %, mean ± std over seeds. Target: {100 * target:.2f}%.", "",
              table_markdown(rows)]
    if selection:
        shown = json.dumps(selection, indent=1, ensure_ascii=False)
        lines += ["## Server lr selected on validation accuracy", "", "```json", shown, "```", ""]
    if diverged:
        lines += ["## Diverged runs", ""] + [f"- {d['path'].relative_to(root)}: {d['error']}" for d in diverged] + [""]
    lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in figures]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return {"rows": rows, "gains": gains, "out": out, "figures": figures, "diverged": diverged}
