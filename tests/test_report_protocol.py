"""`fedgma report` with issue 15's protocol, on hand-made run folders whose answers are known exactly: the
last-20% metric (with AUC, rounds to target and "best" only on validation), the server lr chosen on
validation over seeds, every method against plain averaging with Holm's correction across the table
(gains.csv), several runs folders in one report, and the map figure of GMA − mean."""

from __future__ import annotations

import csv
import html
import json
import math
from pathlib import Path
from unittest import mock

import pytest
import tomli_w
from click.testing import CliRunner
from markdown_it import MarkdownIt

from fedgma.cli import main
from fedgma.report import find_runs, gain_rows, make_groups, write_report
from fedgma.report.figures import plot_gain_map

DIRICHLET = {"name": "dirichlet", "alpha": 0.1, "min_size": 10}


def write_run(folder: Path, *, seed: int, test: list[float], aggregator: str = "mean", lr: float = 1.0,
              validation: list[float] | None = None, every: int = 10, partition: dict | None = None,
              clients: int = 10, epochs: int = 1, algorithm: str = "fedavg", initial: float | None = None,
              diverged: bool = False, momentum: float = 0.0, optimizer: str = "sgd") -> Path:
    """A run folder in today's config shape: ``test`` (and ``validation``) accuracy at rounds every, 2·every, ...
    (or, with ``diverged``, a run that stopped on a non-finite model)."""
    folder.mkdir(parents=True)
    config = {"name": "t", "seed": seed, "algorithm": algorithm,
              "server": {"clients_per_round": clients, "aggregator": {"name": aggregator},
                         "optimizer": {"name": optimizer, "lr": lr, "momentum": momentum}},
              "client": {"local_epochs": epochs}, "data": {"partition": partition or DIRICHLET}}
    (folder / "config.toml").write_text(tomli_w.dumps(config))
    if diverged:
        (folder / "diverged.json").write_text(json.dumps({"round": 3, "error": "non-finite model"}))
        return folder
    metrics = [{"round": every * (i + 1), "test_accuracy": value} for i, value in enumerate(test)]
    for record, value in zip(metrics, validation or [], strict=False):
        record["validation_accuracy"] = value
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    summary = {"algorithm": algorithm, "aggregator": aggregator, "seed": seed, "final": metrics[-1],
               "best": {"round": 0, "test_accuracy": 1.0},  # a test-set "best" the report must never show
               "wall_s": 1.0, **({"initial": {"test_accuracy": initial}} if initial is not None else {})}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def p_two_dof(t: float) -> float:
    """The two-sided p-value of Student's t with 2 degrees of freedom, in closed form."""
    return 1 - abs(t) / math.sqrt(t * t + 2)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_metric_is_the_last_20_percent_mean_with_area_and_best_on_validation(tmp_path: Path) -> None:
    test = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.6, 1.0]  # rounds 10..100
    validation = [0.1, 0.2, 0.3, 0.4, 0.9, 0.5, 0.5, 0.5, 0.5, 0.5]  # best at round 50
    write_run(tmp_path / "runs" / "a_seed0", seed=0, test=test, validation=validation, initial=0.0)
    write_report(tmp_path / "runs", tmp_path / "out")
    (row,) = read_csv(tmp_path / "out" / "summary.csv")
    assert float(row["last_test_accuracy_mean"]) == pytest.approx((0.6 + 1.0) / 2)  # rounds 90, 100
    # trapezoids from round 0 at 0.0: 10 · (sum of inner points + ends / 2) over 100 rounds
    area = 10 * (sum(test[:-1]) + (0.0 + test[-1]) / 2) / 100
    assert float(row["area_test_accuracy_mean"]) == pytest.approx(area)
    assert float(row["test_accuracy_at_best_validation_mean"]) == 0.5  # not the test set's best (1.0)
    assert float(row["final_round_test_accuracy_mean"]) == 1.0
    assert not [k for k in row if k.startswith("best")]
    # --last-fraction 0.3: rounds 80, 90, 100
    CliRunner().invoke(main, ["report", str(tmp_path / "runs"), "--out", str(tmp_path / "out3"),
                              "--last-fraction", "0.3"], catch_exceptions=False)
    (row,) = read_csv(tmp_path / "out3" / "summary.csv")
    assert float(row["last_test_accuracy_mean"]) == pytest.approx((0.8 + 0.6 + 1.0) / 3)
    assert "test acc % (last 30%)" in (tmp_path / "out3" / "summary.md").read_text()


def test_server_lr_is_chosen_on_last_20_percent_of_validation_over_seeds(tmp_path: Path) -> None:
    # lr 1: the best final-round validation (0.9) and the best test accuracy, but over the last 20% of rounds
    # (rounds 90, 100) its validation is (0.5 + 0.9) / 2 = 0.7 against lr 2's 0.8: lr 2 is chosen
    runs = tmp_path / "runs"
    for seed in (0, 1):
        write_run(runs / f"lr=1_seed{seed}", seed=seed, lr=1.0, test=[0.9] * 10, validation=[0.5] * 9 + [0.9])
        write_run(runs / f"lr=2_seed{seed}", seed=seed, lr=2.0, test=[0.6] * 10,
                  validation=[0.5] * 8 + [0.8 + 0.05 * seed, 0.8 - 0.05 * seed])
    result = write_report(runs, tmp_path / "out")
    (choice,) = result["lr_choices"]
    assert choice["chosen"] == 2.0 and choice["edge"] == "high" and choice["seeds"] == 2
    assert choice["scores"] == pytest.approx({"1": 0.7, "2": 0.8})
    assert [(r["server_lr"], r["selected"], r["lr_edge"]) for r in result["rows"]] == [
        (1.0, False, None), (2.0, True, "high")]
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| 1 (not selected) |" in summary and "| 2 (chosen, highest of grid) |" in summary
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Server lr chosen on validation" in report and "highest lr: widen the grid up" in report
    assert json.loads((tmp_path / "out" / "server_lr_selection.json").read_text())[0]["chosen"] == 2.0
    # lr 4 tried and diverged on both seeds: it scores 0, and lr 2 is no longer on an edge of the grid
    for seed in (0, 1):
        write_run(runs / f"lr=4_seed{seed}", seed=seed, lr=4.0, test=[], diverged=True)
    (choice,) = write_report(runs, tmp_path / "out4")["lr_choices"]
    assert choice["chosen"] == 2.0 and choice["edge"] is None and choice["scores"]["4"] == 0.0


def _comparison_runs(root: Path) -> None:
    """Dirichlet α ∈ {0.1, 0.5, 1} × {mean, gma} × seeds 0-2, and gma_random_mask at α = 0.1, with last-20%
    differences (d − 0.01, d, d + 0.01) per seed: gma d = 0.03, 0.02, 0.01, the random mask d = 0; at α = 5,
    GMA with one seed only."""
    for alpha, gain in ((0.1, 0.03), (0.5, 0.02), (1.0, 0.01)):
        partition = {**DIRICHLET, "alpha": alpha}
        for seed in range(3):
            base = 0.6 + 0.02 * seed
            write_run(root / f"a{alpha}" / f"mean_seed{seed}", seed=seed, test=[0.5, base], partition=partition)
            write_run(root / f"a{alpha}" / f"gma_seed{seed}", seed=seed, aggregator="gma", partition=partition,
                      test=[0.5, base + gain + 0.01 * (seed - 1)])
            if alpha == 0.1:
                write_run(root / f"a{alpha}" / f"rm_seed{seed}", seed=seed, aggregator="gma_random_mask",
                          partition=partition, test=[0.5, base + 0.01 * (seed - 1)])
    partition = {**DIRICHLET, "alpha": 5.0}
    write_run(root / "a5" / "mean_seed0", seed=0, test=[0.5, 0.6], partition=partition)
    write_run(root / "a5" / "mean_seed1", seed=1, test=[0.5, 0.6], partition=partition)
    write_run(root / "a5" / "gma_seed0", seed=0, aggregator="gma", test=[0.5, 0.65], partition=partition)


def test_gains_csv_every_method_against_mean_with_holm_across_the_table(tmp_path: Path) -> None:
    _comparison_runs(tmp_path / "runs")
    # sub-folders a0.1, ... would be settings of their own: report the runs as one flat folder of settings
    folders = sorted((tmp_path / "runs").iterdir())
    write_report(folders, tmp_path / "out")
    rows = read_csv(tmp_path / "out" / "gains.csv")
    assert list(rows[0]) == ["Dirichlet α", "method", "baseline", "seeds", "difference", "ci_low", "ci_high", "p",
                             "p_holm", "significant", "metric", "tau", "agreement_count", "lr_method", "lr_baseline",
                             "note"]
    got = {(r["Dirichlet α"], r["method"]): r for r in rows}
    assert sorted(got) == [("0.1", "gma"), ("0.1", "gma_random_mask"), ("0.5", "gma"), ("1", "gma"), ("5", "gma")]
    # sd of (d − 0.01, d, d + 0.01) is 0.01: t = d / (0.01 / √3), 2 degrees of freedom
    p = {key: p_two_dof(d / (0.01 / math.sqrt(3))) for key, d in
         ((("0.1", "gma"), 0.03), (("0.5", "gma"), 0.02), (("1", "gma"), 0.01), (("0.1", "gma_random_mask"), 0.0))}
    # Holm over the four comparisons with an interval: sorted p × 4, 3, 2, 1, running maximum
    order = sorted(p, key=p.get)
    holm, running = {}, 0.0
    for rank, key in enumerate(order):
        running = max(running, min(1.0, (4 - rank) * p[key]))
        holm[key] = running
    half = 4.302652729749462 * 0.01 / math.sqrt(3)
    for key, d in ((("0.1", "gma"), 0.03), (("0.5", "gma"), 0.02), (("1", "gma"), 0.01),
                   (("0.1", "gma_random_mask"), 0.0)):
        row = got[key]
        assert (row["baseline"], row["seeds"], row["metric"]) == ("mean", "3", "test_accuracy")
        assert float(row["difference"]) == pytest.approx(d, abs=1e-12)
        assert (float(row["ci_low"]), float(row["ci_high"])) == pytest.approx((d - half, d + half), abs=1e-9)
        assert float(row["p"]) == pytest.approx(p[key], rel=1e-6)
        assert float(row["p_holm"]) == pytest.approx(holm[key], rel=1e-6)
        assert row["significant"] == str(holm[key] <= 0.05)
        assert (row["tau"], row["agreement_count"]) == ("0.4", "4")  # τ × 10 clients per round
    assert p[("0.1", "gma")] < 0.05 < holm[("0.1", "gma")]  # significant alone, not after Holm
    one = got[("5", "gma")]
    assert one["seeds"] == "1" and one["ci_low"] == one["p"] == one["p_holm"] == one["significant"] == ""
    assert float(one["difference"]) == pytest.approx(0.05) and "1 paired seed: no interval" in one["note"]
    gains = (tmp_path / "out" / "gains.md").read_text()
    assert "| 0.1 | gma | mean | 0.4 | 4 | 1 / 1 | 3 | +3.00 | [+0.52, +5.48] |" in gains
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Comparisons with plain averaging" in report and "![gain_map](plots/gain_map.png)" in report
    html = (tmp_path / "out" / "report.html").read_text()
    assert "The map: GMA − plain averaging by setting" in html and 'class="gains"' in html


def test_several_runs_folders_make_one_report(tmp_path: Path) -> None:
    # the study's layout: each method's tuning and evaluation runs apart; only the evaluation folders are reported
    study = tmp_path / "study"
    for seed in range(3):
        write_run(study / "mean" / "evaluation" / f"lr=1_seed{seed}", seed=seed, test=[0.5, 0.6 + 0.01 * seed])
        write_run(study / "gma" / "evaluation" / f"lr=2_seed{seed}", seed=seed, aggregator="gma", lr=2.0,
                  test=[0.5, 0.62 + 0.01 * seed + 0.001 * seed])
    for seed in (100, 101):  # tuning seeds: must not be scored
        write_run(study / "gma" / "tuning" / f"lr=2_seed{seed}", seed=seed, aggregator="gma", lr=2.0, test=[0.1, 0.1])
    folders = [str(study / "mean" / "evaluation"), str(study / "gma" / "evaluation")]
    import fedgma.report.write as write

    with mock.patch.object(write, "plot_curves", wraps=write.plot_curves) as curves:
        result = CliRunner().invoke(main, ["report", *folders, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert curves.call_args.args[2] == "study (2 runs folders)"  # the figures' title
    assert "report: 6 finished runs in 2 configurations" in result.output
    (row,) = read_csv(tmp_path / "out" / "gains.csv")
    assert (row["method"], row["seeds"], row["lr_method"], row["lr_baseline"]) == ("gma", "3", "2.0", "1.0")
    assert float(row["difference"]) == pytest.approx(0.021)  # 0.02 + 0.001 · mean(0, 1, 2)
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"`{folders[0]}`" in report and f"`{folders[1]}`" in report
    assert report.startswith("# Report: study (2 runs folders)\n")  # named by the folder holding them all
    named = CliRunner().invoke(main, ["report", *folders, "--out", str(tmp_path / "named"), "--title", "τ study"])
    assert named.exit_code == 0, named.output
    assert (tmp_path / "named" / "report.md").read_text().startswith("# Report: τ study\n")
    dollars = CliRunner().invoke(main, ["report", *folders, "--out", str(tmp_path / "dollars"), "--title", "$\\frac{$"])
    assert dollars.exit_code == 0, dollars.output  # a pair of $ is text in the figures, not a formula to parse
    assert "<title>Report: τ study</title>" in (tmp_path / "named" / "report.html").read_text()
    lines = CliRunner().invoke(main, ["report", *folders, "--out", str(tmp_path / "lines"), "--title", "τ\n study "])
    assert lines.exit_code == 0, lines.output  # one line: a newline would end the Markdown heading
    assert (tmp_path / "lines" / "report.md").read_text().startswith("# Report: τ study\n\n")
    odd = "a *b* [c](d) `e` <i>f</i> x_y_ \\ | ~g~ R&amp;D &lt;img&gt; #"
    marked = CliRunner().invoke(main, ["report", *folders, "--out", str(tmp_path / "marked"), "--title", odd])
    assert marked.exit_code == 0, marked.output  # Markdown in a title is shown as written, not rendered
    first_line = (tmp_path / "marked" / "report.md").read_text().splitlines()[0]
    heading = MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(first_line)
    assert heading == f"<h1>Report: {html.escape(odd, quote=False)}</h1>\n"
    blank = CliRunner().invoke(main, ["report", *folders, "--out", str(tmp_path / "blank"), "--title", " "])
    assert blank.exit_code == 0, blank.output  # a blank title: the default
    assert (tmp_path / "blank" / "report.md").read_text().startswith("# Report: study (2 runs folders)\n")
    # the one-folder form still works; several folders need --out; a run read twice is refused
    assert CliRunner().invoke(main, ["report", folders[0]]).exit_code == 0
    refused = CliRunner().invoke(main, ["report", *folders])
    assert refused.exit_code == 2 and "name the report folder (--out)" in refused.output
    twice = CliRunner().invoke(main, ["report", folders[0], str(study / "mean"), "--out", str(tmp_path / "o2")])
    assert twice.exit_code == 2 and "is under two of the folders given" in twice.output


def _map_runs(root: Path) -> list[Path]:
    """GMA − mean = 0.01 · (x + 10 · line + 100 · panel) at three heterogeneities (x) × clients per round 5, 10
    (lines) × local epochs 1, 5 (panels; epochs 5 at 10 clients only), 2 seeds, plus a FedProx point that the
    map leaves out (a fourth varying key, off its most common value)."""
    partitions = [{"name": "iid"}, {**DIRICHLET, "alpha": 1.0}, DIRICHLET]
    folders = []
    points = [(x, line, panel) for x in range(3) for line in range(2) for panel in range(2) if not panel or line]
    for x, line, panel in points:
        folder = root / f"p{x}_K{line}_E{panel}"
        gain = 0.0001 * (x + 10 * line + 100 * panel)
        for seed in (0, 1):
            for aggregator, value in (("mean", 0.5 + 0.1 * seed), ("gma", 0.5 + 0.1 * seed + gain + 0.0001 * seed)):
                write_run(folder / f"{aggregator}_seed{seed}", seed=seed, aggregator=aggregator, test=[0.4, value],
                          partition=partitions[x], clients=(5, 10)[line], epochs=(1, 5)[panel])
        folders.append(folder)
    for seed in (0, 1):
        for aggregator in ("mean", "gma"):
            write_run(root / "fedprox" / f"{aggregator}_seed{seed}", seed=seed, aggregator=aggregator, test=[0.4, 0.5],
                      algorithm="fedprox")
    return [*folders, root / "fedprox"]


def test_gain_map_lays_out_settings_by_partition_clients_and_epochs(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = gain_rows(make_groups([run for folder in _map_runs(tmp_path / "runs") for run in find_runs(folder)]))
    plt.close("all")
    with mock.patch.object(plt, "close"):
        path = plot_gain_map(rows, tmp_path / "map.png")
        figure = plt.gcf()
    plt.close("all")
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    panels = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["local epochs = 1", "local epochs = 5"]
    for ax in panels:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["IID", "Dirichlet α=1", "Dirichlet α=0.1"]
        assert ax.get_xlabel() == "data partition (heterogeneity)"
        assert any(list(line.get_ydata()) == [0, 0] for line in ax.lines)  # the zero line
    assert "only algorithm = fedavg" in figure.get_suptitle()  # the FedProx point is left off, and said so
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend[:2] == ["clients per round = 5", "clients per round = 10"]
    # the points: 100 × (gain + 0.00005) in points, x = partition index (offset per line), none from FedProx
    plotted = sorted(round(y, 6) for ax in panels for line in ax.lines
                     if line.get_linestyle() == "-" and line.get_marker() not in (None, "", "None")
                     for y in line.get_ydata())
    expected = sorted(round(100 * (0.0001 * (x + 10 * line + 100 * panel) + 0.00005), 6)
                      for x in range(3) for line in range(2) for panel in range(2) if not panel or line)
    assert plotted == pytest.approx(expected, abs=1e-9)


def _figure_of(rows: list[dict], path: Path):
    import matplotlib.pyplot as plt

    plt.close("all")
    with mock.patch.object(plt, "close"):
        written = plot_gain_map(rows, path)
        figure = plt.gcf() if written else None
    plt.close("all")
    return written, figure


def test_gain_map_with_one_or_no_varying_key(tmp_path: Path) -> None:
    for alpha in (0.1, 1.0):
        for seed in (0, 1):
            for aggregator, value in (("mean", 0.6), ("gma", 0.61 + 0.01 * seed)):
                write_run(tmp_path / "one" / f"a{alpha}_{aggregator}_seed{seed}", seed=seed, aggregator=aggregator,
                          test=[0.5, value], partition={**DIRICHLET, "alpha": alpha})
    result = write_report(tmp_path / "one", tmp_path / "out1")
    assert tmp_path / "out1" / "plots" / "gain_map.png" in result["figures"]
    written, figure = _figure_of(result["gains"], tmp_path / "one.png")
    (ax,) = figure.axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Dirichlet α=1", "Dirichlet α=0.1"]
    assert [t.get_text() for t in figure.legends[0].get_texts()][0] == "gma"
    # a single setting: one point, at "all settings"
    row = next(r for r in result["gains"] if r["values"]["data.partition.alpha"] == 0.1)
    written, figure = _figure_of([{**row, "keys": [], "values": {}}], tmp_path / "single.png")
    assert written.is_file() and [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["all settings"]
    assert _figure_of([], tmp_path / "none.png") == (None, None)


def test_gain_map_skips_a_key_told_by_another(tmp_path: Path) -> None:
    # FedAvgM's server momentum comes with the algorithm: one line per algorithm, not a panel per momentum
    for alpha in (0.1, 1.0):
        for algorithm, momentum in (("fedavg", 0.0), ("fedavgm", 0.9)):
            for seed in (0, 1):
                for aggregator, value in (("mean", 0.6), ("gma", 0.61 + 0.01 * seed)):
                    write_run(tmp_path / f"a{alpha}_{algorithm}_{aggregator}_seed{seed}", seed=seed,
                              aggregator=aggregator, algorithm=algorithm, momentum=momentum, test=[0.5, value],
                              partition={**DIRICHLET, "alpha": alpha})
    rows = gain_rows(make_groups(find_runs(tmp_path)))
    assert {"server momentum", "algorithm"} <= set(rows[0]["config"])  # both differ between settings
    _, figure = _figure_of(rows, tmp_path / "map.png")
    assert len(figure.axes) == 1 and "only" not in figure.get_suptitle()
    assert [t.get_text() for t in figure.legends[0].get_texts()][:2] == ["algorithm = fedavg", "algorithm = fedavgm"]


def test_gains_plot_names_settings_by_how_they_differ_from_the_base(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    from fedgma.report.figures import plot_gains

    def row(alpha: str, clients: str) -> dict:
        return {"setting": f"α={alpha}, K={clients}", "config": {"Dirichlet α": alpha, "clients per round": clients},
                "metric": "test_accuracy", "method": "gma", "tau": 0.4, "difference": 0.01, "ci_low": 0.0,
                "ci_high": 0.02, "significant": True, "fraction": 0.2, "seeds": 5}

    rows = [row("0.1", "10"), row("1", "10"), row("0.1", "20"), row("0.1", "5")]
    plt.close("all")
    with mock.patch.object(plt, "close"):
        plot_gains(rows, tmp_path / "gains.png")
        figure = plt.gcf()
    plt.close("all")
    assert [t.get_text() for t in figure.axes[0].get_yticklabels()] == [
        "base setting", "Dirichlet α=1", "clients per round=20", "clients per round=5"]
    assert "base setting (Dirichlet α=0.1, clients per round=10)" in figure.get_suptitle()


def test_the_table_averages_gmas_mask_statistics_over_rounds_then_seeds(tmp_path):
    # gma seeds 0, 1: per-round densities (0.2, 0.4) and (0.6, 0.8) -> run means 0.3 and 0.7 -> 0.5 ± std
    for seed, densities in ((0, (0.2, 0.4)), (1, (0.6, 0.8))):
        run = write_run(tmp_path / f"gma_seed{seed}", seed=seed, aggregator="gma", test=[0.5, 0.6])
        (run / "rounds.jsonl").write_text("".join(
            json.dumps({"round": r + 1, "mask_density": d, "mask_pass_fraction": d / 2}) + "\n"
            for r, d in enumerate(densities)))
        write_run(tmp_path / f"mean_seed{seed}", seed=seed, test=[0.5, 0.6])
    write_report(tmp_path, tmp_path / "report")
    rows = {row["aggregator"]: row for row in read_csv(tmp_path / "report" / "summary.csv")}
    assert float(rows["gma"]["mask_density_mean"]) == pytest.approx(0.5)
    assert float(rows["gma"]["mask_density_std"]) == pytest.approx(math.sqrt(0.08))  # sample std of 0.3, 0.7
    assert float(rows["gma"]["mask_pass_fraction_mean"]) == pytest.approx(0.25)
    assert rows["mean"]["mask_density_mean"] == ""
    assert "| mask density | mask pass % |" in (tmp_path / "report" / "summary.md").read_text()


def test_tau_as_a_net_count_of_agreeing_clients_has_the_rounds_parity():
    from fedgma.report.tables import agreement_count

    # K clients: the net count |#pos − #neg| is K, K − 2, ..., so τ·K is rounded up to K's parity
    assert [agreement_count(0.4, k) for k in (5, 10, 20, 50, 100)] == [3, 4, 8, 20, 40]
    assert agreement_count(0.0, 10) == 0 and agreement_count(1.0, 7) == 7 and agreement_count(0.3, 10) == 4


def test_a_swept_partition_shows_its_alpha_even_where_alpha_does_not_vary(tmp_path) -> None:
    """Dirichlet(0.1) against IID: the settings read "partition=dirichlet, Dirichlet α=0.1" and "partition=iid",
    not a bare "dirichlet" that hides how skewed it is."""
    for name, partition in [("dir", {**DIRICHLET, "alpha": 0.1}), ("iid", {"name": "iid"})]:
        for seed in (0, 1):
            write_run(tmp_path / f"{name}_mean_seed{seed}", seed=seed, test=[0.5, 0.6], partition=partition)
            write_run(tmp_path / f"{name}_gma_seed{seed}", seed=seed, aggregator="gma", test=[0.5, 0.61],
                      partition=partition)
    groups = make_groups(find_runs(tmp_path))
    assert sorted({g.setting for g in groups}) == ["partition=dirichlet, Dirichlet α=0.1", "partition=iid"]
    assert {tuple(g.values) for g in groups} == {("data.partition.name", "server.aggregator.name")}  # not swept
    rows = {r["setting"]: r["values"] for r in gain_rows(groups)}  # and the map's points carry it
    assert rows == {"partition=dirichlet, Dirichlet α=0.1": {"data.partition.name": "dirichlet",
                                                            "data.partition.alpha": 0.1},
                    "partition=iid": {"data.partition.name": "iid", "data.partition.alpha": None}}
    import matplotlib.pyplot as plt

    plt.close("all")
    with mock.patch.object(plt, "close"):
        plot_gain_map(gain_rows(groups), tmp_path / "map.png")
        figure = plt.gcf()
    plt.close("all")
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["IID", "Dirichlet α=0.1"]


def test_figure_titles_wrap_at_spaces_not_at_hyphens() -> None:
    from fedgma.report.figures import _fill

    assert _fill("a study of dirichlet-alpha0.1-min", 25) == "a study of\ndirichlet-alpha0.1-min"  # not "…dirichlet-\n"


def test_methods_tuned_to_different_server_lrs_share_their_settings_label(tmp_path) -> None:
    """The server optimizer varies between settings (sgd, adam), and each method has its own tuned lr: the lr is
    the method's, not the setting's, so both methods' rows carry one label and are drawn in one row of the
    gains figure (a headline-option change once split them)."""
    for optimizer in ("sgd", "adam"):
        for seed in (0, 1):
            for aggregator, lr in (("mean", 1.0), ("gma", 2.0), ("gma_random_mask", 4.0)):
                write_run(tmp_path / f"{optimizer}_{aggregator}_seed{seed}", seed=seed, aggregator=aggregator,
                          lr=lr, optimizer=optimizer, test=[0.5, 0.6 + 0.01 * (aggregator != "mean")])
    rows = gain_rows(make_groups(find_runs(tmp_path)))
    labels = {}
    for row in rows:
        labels.setdefault(row["values"]["server.optimizer.name"], set()).add(row["setting"])
    assert {k: len(v) for k, v in labels.items()} == {"sgd": 1, "adam": 1}, labels
