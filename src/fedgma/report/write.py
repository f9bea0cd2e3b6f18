"""The whole report of a runs folder: tables, gains, server-lr selection, plots, ``report.md`` and a
self-contained ``report.html``."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from fedgma.report.configs import readable_name
from fedgma.report.figures import plot_curves, plot_gains, plot_mask, plot_tau
from fedgma.report.groups import make_groups, pair_groups, swept_keys, tau_families
from fedgma.report.html import figure_html, page, table_html
from fedgma.report.runs import find_diverged, find_incomplete, find_runs
from fedgma.report.selection import lr_selection
from fedgma.report.tables import gain_columns, gain_rows, gains_markdown, table_columns, table_rows, write_csv

__all__ = ["plural", "write_report"]


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """``"1 run"``, ``"2 runs"``, ``"0 runs"``: ``count`` and ``noun`` in the right number."""
    return f"{count} {noun if count == 1 else (plural_form or noun + 's')}"


def _slug(text: str) -> str:
    keep = "".join(c if (c.isascii() and c.isalnum()) or c in "._-" else "_" for c in text)
    return "_".join(part for part in keep.split("_") if part) or "runs"


def write_report(
    root: str | Path, out: str | Path | None = None, target_fraction: float = 0.95, target: float | None = None
) -> dict[str, Any]:
    """Read every run under ``root`` and write tables (Markdown, CSV), plots, ``report.md`` and
    ``report.html`` to ``out`` (default ``root/report``).

    Runs are grouped by their resolved configs (:func:`~fedgma.report.groups.make_groups`): every config
    key that differs between runs is a column; seeds of one configuration are pooled. Runs without a
    summary are counted: ``diverged`` (``diverged.json``), ``failed`` (``error.txt``) and ``unfinished``.

    Returns ``{"rows", "gains", "out", "figures", "diverged", "incomplete", "runs", "swept"}``.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: ``root`` holds no finished run, or ``target_fraction`` is not in (0, 1].
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"runs folder {root} does not exist")
    out = Path(out) if out is not None else root / "report"
    runs = [r for r in find_runs(root) if out not in r.path.parents]
    incomplete = [r for r in find_incomplete(root) if out not in r["path"].parents]
    if not runs:
        named = "".join(f"; {r['status']}: {r['path']}" for r in incomplete[:5])
        raise ValueError(f"no finished runs (folders with summary.json) under {root}{named}")
    if not 0 < target_fraction <= 1:
        raise ValueError(f"--target-fraction must be in (0, 1], got {target_fraction}")
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    groups = make_groups(runs)
    swept = swept_keys(groups)
    rows = table_rows(groups, target_fraction, target)
    gains = gain_rows(groups)
    diverged = find_diverged(root)

    (out / "summary.md").write_text(_markdown(*table_columns(rows)))
    write_csv(out / "summary.csv", rows)
    (out / "gains.md").write_text(gains_markdown(gains))
    write_csv(out / "gains.csv", gains)
    selection = lr_selection(groups)
    (out / "server_lr_selection.json").write_text(json.dumps(selection, indent=2, ensure_ascii=False))

    title = root.resolve().name
    figures: list[tuple[Path, str]] = []
    curves = plot_curves(groups, plots / "curves.png", title)
    if curves:
        figures.append((curves, "Test accuracy versus round, one line per method, one panel per setting."))
    for setting in dict.fromkeys(g.setting for g in groups):
        mask = plot_mask([g for g in groups if g.setting == setting and g.selected],
                         plots / f"mask_{_slug(setting)}.png", setting or title)
        if mask:
            figures.append((mask, f"GMA's mask statistics ({setting or 'all runs'})."))
    pairs = pair_groups(groups)
    for family in tau_families(groups):
        base = next((m for m, g in pairs if g in family), None)
        path = plots / f"tau_{_slug(family[0].setting)}_{family[0].algorithm}.png"
        figures.append((plot_tau(family, base, path, family[0].setting or title),
                        f"Accuracy versus GMA's threshold τ ({family[0].setting or 'all runs'})."))
    gain_plot = plot_gains(gains, plots / "gains.png")
    if gain_plot:
        figures.append((gain_plot, "GMA − plain averaging per setting, paired by seed, 95% t-interval."))

    counts = (f"{plural(len(runs), 'finished run')} in {plural(len(groups), 'configuration')}, "
              f"{len(diverged)} diverged, {sum(r['status'] == 'failed' for r in incomplete)} failed, "
              f"{sum(r['status'] == 'unfinished' for r in incomplete)} unfinished.")
    compared = ("Configurations differ in: " + ", ".join(f"{readable_name(k, swept)} (`{k}`)" for k in swept) + "."
                if swept else "All runs share one configuration (only the seed differs).")
    target_text = (f"Accuracy in %, mean ± std over seeds. Target: {target_fraction:g} × plain averaging's final "
                   "test accuracy of the same setting and algorithm (first evaluated round reaching it; seeds "
                   "reaching it)." if target is None else
                   f"Accuracy in %, mean ± std over seeds. Target: {100 * target:.2f}%.")
    not_done = [*[{"path": d["path"], "status": "diverged", "error": d.get("error", "")} for d in diverged],
                *incomplete]

    lines = [f"# Report: {root}", "", counts, "", compared, ""]
    if gains:
        lines += ["## GMA − plain averaging (accuracy points, paired by seed)", "",
                  "mean ± std over seeds [95% t-interval]; *verdict*: whether the interval excludes 0.", "",
                  gains_markdown(gains)]
    lines += ["## All configurations", "", target_text, "", _markdown(*table_columns(rows))]
    if selection:
        shown = json.dumps(selection, indent=1, ensure_ascii=False)
        lines += ["## Server lr selected on validation accuracy", "", "```json", shown, "```", ""]
    if not_done:
        lines += ["## Runs without results", ""] + [
            f"- {r['status']}: {r['path'].relative_to(root)}" + (f": {r['error']}" if r["error"] else "")
            for r in not_done] + [""]
    lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p, _ in figures]
    (out / "report.md").write_text("\n".join(lines) + "\n")

    sections = [("Configurations compared", "<p>" + html.escape(compared.replace("`", "")) + "</p>")]
    if gains:
        sections.append(("GMA − plain averaging (accuracy points, paired by seed)",
                         "<p>mean ± std over seeds [95% t-interval]; verdict: whether the interval excludes 0.</p>"
                         + table_html(*gain_columns(gains), table_class="gains")))
    sections.append(("All configurations", f"<p>{html.escape(target_text)}</p>"
                     + table_html(*table_columns(rows), table_class="summary")))
    if not_done:
        sections.append(("Runs without results", table_html(
            ["run", "status", "error"],
            [[str(r["path"].relative_to(root)), r["status"], r["error"]] for r in not_done], table_class="incomplete")))
    sections.append(("Plots", "\n".join(figure_html(p, caption) for p, caption in figures)))
    (out / "report.html").write_text(page(f"Report: {root}", sections, counts))
    return {"rows": rows, "gains": gains, "out": out, "figures": [p for p, _ in figures], "diverged": diverged,
            "incomplete": incomplete, "runs": runs, "swept": swept}


def _markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"
