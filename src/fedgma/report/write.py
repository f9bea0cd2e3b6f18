"""The whole report of one or more runs folders: tables, comparisons, server-lr selection, plots,
``report.md`` and a self-contained ``report.html``."""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedgma.report.configs import readable_name
from fedgma.report.figures import plot_curves, plot_gain_map, plot_gains, plot_mask, plot_tau
from fedgma.report.groups import make_groups, pair_groups, swept_keys, tau_families
from fedgma.report.html import figure_html, page, table_html
from fedgma.report.protocol import LAST_FRACTION
from fedgma.report.runs import find_diverged, find_incomplete, find_runs
from fedgma.report.selection import lr_selection, lr_selection_columns
from fedgma.report.tables import (
    GAIN_COLUMNS,
    gain_columns,
    gain_rows,
    gains_markdown,
    metric_name,
    table_columns,
    table_rows,
    window,
    write_csv,
)

__all__ = ["plural", "write_report"]


# CommonMark lets any ASCII punctuation be backslash-escaped; these are the ones that format inline text
# (emphasis, code, links, HTML, entity references, tables, strikethrough, a closing # of a heading).
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>#|~!&])")


def markdown_text(text: str) -> str:
    """``text`` escaped for Markdown: shown as written, never as emphasis, code, a link or HTML."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """``"1 run"``, ``"2 runs"``, ``"0 runs"``: ``count`` and ``noun`` in the right number."""
    return f"{count} {noun if count == 1 else (plural_form or noun + 's')}"


def _shared_name(roots: Sequence[Path]) -> str:
    """``<name> (N runs folders)`` with the name of the deepest folder holding them all, or ``N runs folders``."""
    shared = Path(os.path.commonpath([root.resolve() for root in roots]))
    return f"{shared.name} ({len(roots)} runs folders)" if shared.name else f"{len(roots)} runs folders"


def _slug(text: str) -> str:
    keep = "".join(c if (c.isascii() and c.isalnum()) or c in "._-" else "_" for c in text)
    return "_".join(part for part in keep.split("_") if part) or "runs"


#: The names of the figures :func:`write_report` writes in ``<out>/plots``: only these are ever removed there.
_OWN_PLOTS = ("gain_map.png", "gains.png", "curves.png", "mask_*.png", "tau_*.png")


def _remove_stale_plots(plots: Path, written: Sequence[Path]) -> None:
    """Remove the figures an earlier report wrote to ``plots`` that this one did not write again.

    A report rewritten into the same folder after its settings changed (a second partition, a τ sweep
    dropped) would otherwise ship figures of runs it no longer describes. Files of other names are kept.
    """
    keep = {path.resolve() for path in written}
    for pattern in _OWN_PLOTS:
        for path in plots.glob(pattern):
            if path.resolve() not in keep:
                path.unlink()


def write_report(
    roots: str | Path | Sequence[str | Path], out: str | Path | None = None, target_fraction: float = 0.95,
    target: float | None = None, fraction: float = LAST_FRACTION, title: str | None = None,
) -> dict[str, Any]:
    """Read every run under ``roots`` (one folder or several, e.g. the evaluation folders of a study, whose
    tuning runs are left out) and write tables (Markdown, CSV), plots, ``report.md`` and ``report.html`` to
    ``out`` (default ``root/report`` for one folder; required for several).

    Runs are grouped by their resolved configs (:func:`~fedgma.report.groups.make_groups`): every config
    key that differs between runs is a column; seeds of one configuration are pooled, whichever folder
    they come from. The reported metric is the mean of test accuracy over the last ``fraction`` of the
    rounds (issue 15's protocol), with the area under the curve and the rounds to a target beside it;
    where configurations differ only in the server lr it is chosen on validation
    (:func:`~fedgma.report.protocol.select_lr`). Every method is compared with plain averaging in the same
    setting (gains.md/.csv: paired differences, 95% t-interval, p, Holm's p across each table). Runs
    without a summary are counted: ``diverged`` (``diverged.json``), ``failed`` (``error.txt``) and
    ``unfinished``. ``title`` names the report in its heading and figures, on one line (each run of
    whitespace becomes a space); without one, or with a blank one, the heading has the folder as given and
    the figures its name; for several folders, the name of the deepest folder holding them all, with their
    count. Figures an earlier report left in ``out/plots`` and this one does not write again are removed
    (only the report's own figure names: ``gain_map``, ``gains``, ``curves``, ``mask_*``, ``tau_*``).

    Returns ``{"rows", "gains", "out", "figures", "diverged", "incomplete", "runs", "swept", "lr_choices"}``.

    Raises:
        FileNotFoundError: a folder of ``roots`` does not exist.
        ValueError: no finished run, several folders without ``out``, ``target_fraction`` or ``fraction``
            not in (0, 1], or the same run configuration and seed found twice.
    """
    roots = [Path(roots)] if isinstance(roots, str | Path) else [Path(r) for r in roots]
    if not roots:
        raise ValueError("no runs folder given")
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"runs folder {root} does not exist")
    if out is None and len(roots) > 1:
        raise ValueError(f"{len(roots)} runs folders: name the report folder (--out)")
    out = Path(out) if out is not None else roots[0] / "report"
    if not 0 < target_fraction <= 1:
        raise ValueError(f"--target-fraction must be in (0, 1], got {target_fraction}")
    if not 0 < fraction <= 1:
        raise ValueError(f"--last-fraction must be in (0, 1], got {fraction}")
    roots = list(dict.fromkeys(roots))
    runs = [r for root in roots for r in find_runs(root) if out not in r.path.parents]
    seen: dict[Path, Path] = {}
    for root in roots:
        for run in (r for r in runs if root in r.path.parents):
            where = run.path.resolve()
            if where in seen and seen[where] != root:
                raise ValueError(f"run folder {run.path} is under two of the folders given ({seen[where]}, {root})")
            seen[where] = root
    incomplete = [r for root in roots for r in find_incomplete(root) if out not in r["path"].parents]
    diverged = [d for root in roots for d in find_diverged(root) if out not in d["path"].parents]
    if not runs:
        named = "".join(f"; {r['status']}: {r['path']}" for r in incomplete[:5])
        raise ValueError(f"no finished runs (folders with summary.json) under {', '.join(map(str, roots))}{named}")
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    groups = make_groups(runs, fraction=fraction, diverged=diverged)
    swept = swept_keys(groups)
    rows = table_rows(groups, target_fraction, target)
    gains = gain_rows(groups)
    choices = lr_selection(groups)
    last = window(fraction)

    summary_md = _markdown(*table_columns(rows))
    (out / "summary.md").write_text(summary_md)
    write_csv(out / "summary.csv", rows)
    gain_tables = [(key, [g for g in gains if g["metric"] == key]) for key in dict.fromkeys(g["metric"] for g in gains)]
    gains_md = gains_markdown(gains)
    (out / "gains.md").write_text(gains_md or "No method to compare with plain averaging (mean) in the same setting.\n")
    write_csv(out / "gains.csv", gains, GAIN_COLUMNS)
    (out / "server_lr_selection.json").write_text(json.dumps(choices, indent=2, ensure_ascii=False))

    title = " ".join(title.split()) if title else None  # one line: a newline would end report.md's heading
    heading = title or (str(roots[0]) if len(roots) == 1 else _shared_name(roots))
    title = title or (roots[0].resolve().name if len(roots) == 1 else heading)
    figures: list[tuple[Path, str]] = []
    gain_map = plot_gain_map(gains, plots / "gain_map.png")
    if gain_map:
        figures.append((gain_map, f"The map: GMA − plain averaging in test accuracy ({last} of rounds, points) "
                                  "per setting, mean and 95% t-interval over paired seeds; filled: significant "
                                  "after Holm."))
    gain_plot = plot_gains(gains, plots / "gains.png")
    if gain_plot:
        figures.append((gain_plot, "Every method − plain averaging per setting, paired by seed, 95% t-interval."))
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

    _remove_stale_plots(plots, [path for path, _ in figures])

    counts = (f"{plural(len(runs), 'finished run')} in {plural(len(groups), 'configuration')}, "
              f"{len(diverged)} diverged, {sum(r['status'] == 'failed' for r in incomplete)} failed, "
              f"{sum(r['status'] == 'unfinished' for r in incomplete)} unfinished.")
    compared = ("Configurations differ in: " + ", ".join(f"{readable_name(k, swept)} (`{k}`)" for k in swept) + "."
                if swept else "All runs share one configuration (only the seed differs).")
    protocol = (f"Metric: test accuracy averaged over the {last} of rounds, per run, then mean ± std over seeds; "
                "beside it the area under the test-accuracy curve divided by its span (AUC, an average accuracy "
                "over the run) and the rounds to a target. \"At best validation\" is the test accuracy at the "
                "evaluation with the best validation accuracy (never chosen on test); \"final-round\" is the last "
                "evaluation's.")
    target_text = (f"Target: {target_fraction:g} × plain averaging's test accuracy ({last}) in the same setting "
                   "(first evaluated round reaching it; seeds reaching it)." if target is None else
                   f"Target: {100 * target:.2f}%.")
    gains_text = (f"Each method − plain averaging (`mean`) in the same setting (same config but aggregator, its "
                  f"options and server lr), paired by seed, on the {last} test-accuracy metric: mean difference in "
                  "accuracy points, 95% Student-t interval, paired t-test p, and Holm's adjusted p across all "
                  "comparisons of the table (significant: Holm's p ≤ 0.05). gains.csv holds the same in accuracy "
                  "fractions. τ as net agreeing clients: the smallest |#positive − #negative signs| among the round's "
                  "clients at which GMA's mask reaches 1 (e.g. τ = 0.4: 4 of 10, 3 of 5).")
    lr_text = ""
    if choices:
        edges = sum(c["edge"] is not None for c in choices)
        lr_text = (f"Where configurations differ only in the server lr, the lr with the best validation accuracy "
                   f"averaged over the {last} of rounds and over seeds is compared (a diverged run scores 0); the "
                   "others are marked \"not selected\". These lrs were chosen on the same seeds that are scored "
                   "here: for an unbiased comparison, tune on other seeds and report only the evaluation runs. "
                   f"On an edge of the grid (widen it): {edges} of {plural(len(choices), 'choice')}.")
    not_done = [*[{"path": d["path"], "status": "diverged", "error": d.get("error", "")} for d in diverged],
                *incomplete]

    def shown(path: Path) -> str:
        for root in roots:
            if root in path.parents:
                return str(path.relative_to(root)) if len(roots) == 1 else str(path)
        return str(path)

    folders = "" if len(roots) == 1 else "Folders: " + ", ".join(f"`{r}`" for r in roots) + "."
    lines = [f"# Report: {markdown_text(heading)}", "", counts, "", *([folders, ""] if folders else []),
             compared, "", protocol, ""]
    if gains:
        lines += ["## Comparisons with plain averaging", "", gains_text, "",
                  gains_md]
    if gain_map:
        lines += ["## The map: GMA − plain averaging by setting", "", f"![gain_map](plots/{gain_map.name})", ""]
    lines += ["## All configurations", "", target_text, "", summary_md]
    if choices:
        lines += ["## Server lr chosen on validation", "", lr_text, "",
                  _markdown(*lr_selection_columns(choices, fraction))]
    if not_done:
        lines += ["## Runs without results", ""] + [
            f"- {r['status']}: {shown(r['path'])}" + (f": {r['error']}" if r["error"] else "") for r in not_done] + [""]
    lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p, _ in figures if p != gain_map]
    (out / "report.md").write_text("\n".join(lines) + "\n")

    sections = [("Configurations compared", "<p>" + html.escape(compared.replace("`", "")) + "</p>"
                 + (f"<p>{html.escape(folders.replace('`', ''))}</p>" if folders else "")
                 + f"<p>{html.escape(protocol)}</p>")]
    if gains:
        body = f"<p>{html.escape(gains_text.replace('`', ''))}</p>"
        for key, family in gain_tables:
            body += (f"<h3>{html.escape(metric_name(key))} ({last} of rounds), method − mean</h3>"
                     + table_html(*gain_columns(family), table_class="gains" if key == "test_accuracy" else
                                  f"gains-{_slug(key)}"))
        sections.append(("Comparisons with plain averaging", body))
    if gain_map:
        sections.append(("The map: GMA − plain averaging by setting", figure_html(gain_map, figures[0][1])))
    sections.append(("All configurations", f"<p>{html.escape(target_text)}</p>"
                     + table_html(*table_columns(rows), table_class="summary")))
    if choices:
        sections.append(("Server lr chosen on validation", f"<p>{html.escape(lr_text)}</p>"
                         + table_html(*lr_selection_columns(choices, fraction), table_class="lr")))
    if not_done:
        sections.append(("Runs without results", table_html(
            ["run", "status", "error"], [[shown(r["path"]), r["status"], r["error"]] for r in not_done],
            table_class="incomplete")))
    sections.append(("Plots", "\n".join(figure_html(p, caption) for p, caption in figures if p != gain_map)))
    (out / "report.html").write_text(page(f"Report: {heading}", sections, counts))
    return {"rows": rows, "gains": gains, "out": out, "figures": [p for p, _ in figures], "diverged": diverged,
            "incomplete": incomplete, "runs": runs, "swept": swept, "lr_choices": choices}


def _markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"
