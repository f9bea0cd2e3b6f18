"""The ``fedgma`` command line: run, sweep (and the rest as they land).

A user error (bad config, missing data, bad input) prints one line and exits with code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

__all__ = ["main"]


class UserError(click.ClickException):
    exit_code = 2


def _user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our validation errors into one clear line and exit code 2 (``--debug``: traceback)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from fedgma.config import ConfigError
        from fedgma.data.datasets import DatasetError

        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return command(*args, **kwargs)
        except (ConfigError, DatasetError, ValueError, OSError, FloatingPointError) as error:
            if debug:
                raise
            raise UserError(str(error)) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(package_name="fedgma")
def main(debug: bool) -> None:
    """Federated learning with Gradient Masked Averaging (GMA)."""


def _safe_name(name: str) -> str:
    """``name`` as one harmless folder name: path separators, ``..`` and other odd characters become ``-``."""
    import re

    return re.sub(r"(?:[^A-Za-z0-9_.=+-]|\.{2,})+", "-", name).strip(".-") or "run"


def _default_run_dir(config: Any) -> Path:
    """``runs/<name>-<algorithm>-<aggregator>-seed<N>`` (name sanitised: always inside ``runs/``), numbered
    ``-1``, ``-2``, ... past folders already holding something."""
    name = _safe_name(f"{config.name or 'run'}-{config.algorithm}-{config.server.aggregator.name}")
    base = Path("runs") / f"{name}-seed{config.seed}"
    candidate, n = base, 1
    while candidate.exists() and any(candidate.iterdir()):
        candidate = base.with_name(f"{base.name}-{n}")
        n += 1
    return candidate


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False), required=False)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value (repeatable).")
@click.option("--out", type=click.Path(file_okay=False), help="Run folder (default: runs/<name>-<algo>-<agg>-seed<N>).")
@click.option("--device", help="Shortcut for --set device=... (cpu, cuda, cuda:1).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--resume", "resume_dir", metavar="RUN_DIR", type=click.Path(file_okay=False),
              help="Continue an interrupted run from its newest good checkpoint (no CONFIG needed).")
@click.option("--engine", type=click.Choice(["fedgma", "flower"]),
              help="Shortcut for --set engine=...; flower: Flower's simulation engine (pip install 'fedgma[flower]').")
@click.option("--overwrite", is_flag=True, help="Replace a run of another config already in --out.")
@click.option("--verbose", is_flag=True, help="--engine flower: show Flower's log (kept in RUN_DIR/flower.log).")
@_user_errors
def run(config_path: str | None, overrides: tuple[str, ...], out: str | None, device: str | None, quiet: bool,
        resume_dir: str | None, engine: str | None = None, overwrite: bool = False, verbose: bool = False) -> None:
    """Run one experiment from a TOML config, or --resume an interrupted one."""
    from fedgma.config import ConfigError, load_config
    from fedgma.simulation import run as simulate

    if resume_dir is not None:
        if config_path or overrides or out or device or engine or overwrite:
            raise ConfigError("--resume RUN_DIR uses the run's own config.toml: give no CONFIG, --set, --out, "
                              "--device, --engine, --overwrite")
        run_dir = Path(resume_dir)
        saved = _run_config(run_dir)
        if saved.engine == "flower":  # never rerun silently on the other engine
            raise ConfigError(f"{run_dir}: --resume of a flower-engine run is not supported; rerun it from round 1 "
                              f"with: fedgma run {run_dir / 'config.toml'} --out {run_dir}")
        summary = _simulate(simulate, saved, run_dir, quiet, resume=True)
    elif config_path is None:
        raise ConfigError("give a CONFIG file to run, or --resume RUN_DIR to continue a run")
    else:
        overrides = (*overrides, f"device={device}") if device else overrides
        overrides = (*overrides, f"engine={engine}") if engine else overrides
        config = load_config(config_path, list(overrides))
        from fedgma.simulation import check_device

        check_device(config.device)  # before anything is written
        run_dir = Path(out) if out else _default_run_dir(config)
        if config.engine == "flower":
            summary = _run_on_flower(config, run_dir, progress=not quiet, overwrite=overwrite, verbose=verbose)
        else:
            summary = _simulate(simulate, config, run_dir, quiet, overwrite=overwrite)
    final = summary["final"]
    click.echo(f"{run_dir}: final test accuracy {final['test_accuracy']:.4f}{_last_fraction_text(run_dir, summary)}, "
               f"{summary['wall_s']:.1f} s")
    shifted = {k: final[k] for k in ("ood_accuracy", "holdout_mean_accuracy", "holdout_worst10_accuracy") if k in final}
    if shifted:  # held-out domains and clients (docs/HETEROGENEITY.md)
        click.echo("  " + ", ".join(f"{k} {v:.4f}" for k, v in shifted.items()))


def _last_fraction_text(run_dir: Path, summary: dict[str, Any]) -> str:
    """`` (mean over the last 20% of rounds X)``: the protocol's metric (fedgma.report.protocol), or ``""``."""
    from fedgma.checkpoint import read_jsonl
    from fedgma.report.protocol import LAST_FRACTION, last_fraction_mean

    try:
        value = last_fraction_mean(read_jsonl(run_dir / "metrics.jsonl"), horizon=summary.get("rounds"))
    except (OSError, ValueError):
        return ""
    return f" (mean over the last {100 * LAST_FRACTION:g}% of rounds {value:.4f})"


def _key_hyperparameters(config: Any) -> str:
    """One line of what will run (``fedgma.config.key_hyperparameters`` where it exists)."""
    from fedgma import config as config_module

    describe = getattr(config_module, "key_hyperparameters", None)
    if describe is not None:
        return describe(config)
    optimizer = config.server.optimizer
    return (f"{config.algorithm}: client lr {config.client.lr} | aggregator {config.server.aggregator.name} "
            f"{config.server.aggregator.options} | server {optimizer.name} lr {optimizer.options.get('lr')}")


def _simulate(simulate: Callable[..., dict[str, Any]], config: Any, run_dir: Path, quiet: bool,
              **options: Any) -> dict[str, Any]:
    """Print the key hyper-parameters, then run; Ctrl-C (SIGINT) prints how to resume and exits with code 130."""
    from fedgma.checkpoint import list_checkpoints

    click.echo(f"{run_dir}: {_key_hyperparameters(config)}")
    try:
        return simulate(config, run_dir, progress=not quiet, **options)
    except KeyboardInterrupt:
        saved = list_checkpoints(run_dir)
        where = f"its checkpoint of round {saved[-1][0]} is kept" if saved else "no checkpoint was written yet"
        click.echo(f"interrupted: {where}; continue with: fedgma run --resume {run_dir}", err=True)
        sys.exit(130)


def _run_on_flower(config: Any, run_dir: Path, progress: bool, overwrite: bool = False,
                   verbose: bool = False) -> dict[str, Any]:
    """``engine = "flower"``: the same experiment on Flower's simulation engine
    (:func:`fedgma.flower.launch.run_flower`, which runs the app ``fedgma.flower.app``)."""
    from fedgma.config import ConfigError

    try:
        from fedgma.flower.launch import run_flower
    except ImportError as error:
        raise ConfigError(f"config key 'engine': 'flower' needs the Flower extra: {error}") from None
    return run_flower(config, run_dir, progress=progress, overwrite=overwrite, verbose=verbose or None)


def _run_config(run_dir: Path) -> Any:
    """The resolved config a run folder was started with (its ``config.toml``), exactly as saved."""
    import tomllib

    from fedgma.config import ConfigError, parse_config, resolve

    path = run_dir / "config.toml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no config.toml: not a fedgma run folder")
    try:
        return resolve(parse_config(tomllib.loads(path.read_text())))
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from None


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--grid", "grids", multiple=True, metavar="KEY=V1,V2,...", help="Values to sweep (repeatable).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override for every run.")
@click.option("--seeds", default=1, show_default=True, help="Seeds per point (config seed, seed+1, ...); with "
              "--tune-server-lr the evaluation seeds (the protocol: ≥ 5).")
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(min=1), help="Runs in parallel processes.")
@click.option("--out", type=click.Path(file_okay=False), help="Sweep folder (default: runs/<config name>).")
@click.option("--server-lr-from", "tuning_dir", type=click.Path(file_okay=False, exists=True),
              help="Tuning sweep folder: use, per algorithm × aggregator, the server lr with the best validation "
                   "accuracy there, averaged over the last 20% of rounds and over its seeds.")
@click.option("--tune-server-lr", "start_grid", is_flag=False, flag_value="auto", default=None,
              metavar="[LR,LR,...]",
              help="Tune server.optimizer.lr per grid point on --tuning-seeds (validation accuracy, last 20% of "
                   "rounds, mean over seeds), from these lrs (default: the point's lr × 0.5, 1, 2), widened ×2 "
                   "while the pick is on an edge; then run the --seeds at the chosen lr. Put it after CONFIG.")
@click.option("--tuning-seeds", metavar="S1,S2,...", help="With --tune-server-lr: the tuning seeds (≥ 2, none "
              "of them an evaluation seed), e.g. 100,101.")
@_user_errors
def sweep(config_path: str, grids: tuple[str, ...], overrides: tuple[str, ...], seeds: int, jobs: int,
          out: str | None, tuning_dir: str | None, start_grid: str | None = None,
          tuning_seeds: str | None = None) -> None:
    """Run the Cartesian product of --grid values × seeds; finished runs are skipped.

    A run that diverges is recorded (diverged.json) and counts as finished; a run that fails
    otherwise leaves error.txt, the others go on, and the command exits with code 1.

    With --tune-server-lr, each point's runs go to OUT/<point>/tuning and OUT/<point>/evaluation, and the
    chosen lrs (with every lr's score) to OUT/lr_choices.json; report the comparison with
    fedgma report OUT/*/evaluation.
    """
    from fedgma.config import ConfigError
    from fedgma.report import find_runs
    from fedgma.sweep import SweepError, parse_grid, plan_sweep, run_sweep, tuned_server_lrs

    out_dir = Path(out) if out else Path("runs") / Path(config_path).stem
    grid = [parse_grid(g) for g in grids]
    if start_grid is not None:
        if tuning_dir:
            raise ConfigError("--tune-server-lr and --server-lr-from both choose the server lr; give one")
        _tuned_sweep(config_path, grid, overrides, seeds, jobs, out_dir, start_grid, tuning_seeds)
        return
    if tuning_seeds is not None:
        raise ConfigError("--tuning-seeds needs --tune-server-lr")
    server_lr = None
    if tuning_dir:
        choices = tuned_server_lrs(tuning_dir)
        for (algorithm, aggregator), choice in choices.items():
            edge = f" (the {choice.edge}est lr tried: widen the grid)" if choice.edge else ""
            click.echo(f"server lr for {algorithm}+{aggregator}: {choice.lr:g}{edge}")
        server_lr = {pair: choice.lr for pair, choice in choices.items()}
    plan = plan_sweep(config_path, grid, seeds, out_dir, overrides, server_lr)
    skipped = sum(r.finished for r in plan)
    click.echo(f"sweep: {_plural(len(plan), 'run')} in {out_dir} ({skipped} already finished)")
    failed = None
    with _sweep_progress(len(plan)) as (_, done):
        try:
            run_sweep(plan, jobs=jobs, on_done=done)
        except SweepError as error:
            failed = error
    _print_table(find_runs(out_dir), out_dir)
    if failed is not None:
        click.echo(f"sweep: {failed}", err=True)
        sys.exit(1)


@contextlib.contextmanager
def _sweep_progress(total: int) -> Iterator[tuple[Callable[[list[Any]], None], Callable[..., None]]]:
    """A progress bar of sweep runs: ``(add(runs), done(run, summary))``, to grow the total and advance."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("sweep"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[last]}")) as progress:
        task = progress.add_task("runs", total=total, last="")

        def add(runs: list[Any]) -> None:
            progress.update(task, total=(progress.tasks[0].total or 0) + len(runs))

        def done(run: Any, summary: dict[str, Any] | None) -> None:
            last = "" if summary is None else f"{run.run_dir.name}: {summary['final']['test_accuracy']:.4f}"
            progress.update(task, advance=1, last=last)

        yield add, done


def _tuned_sweep(config_path: str, grid: list[Any], overrides: tuple[str, ...], seeds: int, jobs: int,
                 out_dir: Path, start_grid: str, tuning_seeds: str | None) -> None:
    """``fedgma sweep --tune-server-lr``: :func:`fedgma.sweep.tune_and_evaluate`, with its choices printed."""
    from fedgma.config import ConfigError
    from fedgma.report import find_runs
    from fedgma.sweep import EVALUATION, LR_CHOICES, MIN_EVALUATION_SEEDS, SweepError, tune_and_evaluate

    if tuning_seeds is None:
        raise ConfigError("--tune-server-lr needs --tuning-seeds (at least 2, none of them an evaluation seed), "
                          "e.g. --tuning-seeds 100,101")
    try:
        tuning = list(dict.fromkeys(int(s) for s in tuning_seeds.split(",") if s.strip()))
        lrs = None if start_grid == "auto" else [float(v) for v in start_grid.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--tuning-seeds takes integers (e.g. 100,101), --tune-server-lr numbers (e.g. 0.5,1,2); "
                          f"got {tuning_seeds!r}, {start_grid!r}") from None
    if seeds < MIN_EVALUATION_SEEDS:
        click.echo(f"warning: {_plural(seeds, 'evaluation seed')} (--seeds): the comparison is below the "
                   f"protocol's {MIN_EVALUATION_SEEDS} seeds", err=True)

    def tuned(points: list[Any]) -> None:
        for point in points:
            scores = ", ".join(f"{lr:g}: {100 * score:.2f}" for lr, score in sorted(point.scores.items()))
            edge = "" if point.edge is None else (
                f"; the {point.edge}est lr tried, at the cap" if point.capped else
                f"; still the {point.edge}est lr tried after the allowed widenings")
            click.echo(f"{point.name}: server lr {point.lr:g} (validation % {scores}{edge})")
        click.echo(f"lr choices saved to {out_dir / LR_CHOICES}")

    click.echo(f"sweep: tuning the server lr on seeds {', '.join(map(str, tuning))}, then "
               f"{_plural(seeds, 'evaluation seed')} per point, in {out_dir}")
    failed = None
    with _sweep_progress(0) as (add, done):
        try:
            points = tune_and_evaluate(config_path, grid, out_dir, tuning, seeds, overrides, lrs, jobs,
                                       on_plan=add, on_done=done, on_tuned=tuned)
        except SweepError as error:
            failed, points = error, []
    evaluated = sorted(out_dir.glob(f"*/{EVALUATION}")) if not points else [p.folder / EVALUATION for p in points]
    _print_table([run for folder in evaluated for run in find_runs(folder)], out_dir,
                 f"{out_dir}/*/{EVALUATION}")
    if failed is not None:
        click.echo(f"sweep: {failed}", err=True)
        sys.exit(1)

@main.command()
@click.argument("runs_dirs", metavar="RUNS_DIR...", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(file_okay=False),
              help="Report folder (default: RUNS_DIR/report; required with several folders).")
@click.option("--last-fraction", default=0.2, show_default=True,
              help="The metric: test accuracy averaged over this last fraction of the rounds.")
@click.option("--target-fraction", default=0.95, show_default=True,
              help="Rounds-to-target: target = this × plain averaging's test accuracy (last fraction, same setting).")
@click.option("--target", type=float, help="An absolute target accuracy for every row instead (e.g. 0.8).")
@click.option("--title", help="The report's name in its heading and figures (default: from the folders' names).")
@_user_errors
def report(runs_dirs: tuple[str, ...], out: str | None, last_fraction: float, target_fraction: float,
           target: float | None, title: str | None) -> None:
    """Tables (Markdown, CSV) and plots from the run folders under RUNS_DIR (one folder or several,
    e.g. only the evaluation folders of a study, not its tuning runs).

    The metric is test accuracy averaged over the last 20% of the rounds (--last-fraction), with the
    area under the learning curve and the rounds to a target beside it. Writes summary.md/.csv (mean ±
    std over seeds; test accuracy at the best validation accuracy and at the final round as extra
    columns), gains.md/.csv (every method − plain averaging in the same setting, paired by seed: 95%
    t-interval, p, Holm's p across the table), plots/ (the map of GMA − mean over the settings,
    gains, accuracy vs round, GMA mask statistics, τ sweeps), report.md and a self-contained
    report.html. Runs are grouped by their config.toml: every key that differs is a column. Where runs
    differ only in the server lr, the lr with the best validation accuracy over the last 20% of rounds,
    averaged over seeds, is the one compared.
    """
    from fedgma.report import gains_markdown, write_report

    result = write_report(list(runs_dirs), out, target_fraction, target, last_fraction, title)
    incomplete = result["incomplete"]
    click.echo(f"report: {_plural(len(result['runs']), 'finished run')} in "
               f"{_plural(len(result['rows']), 'configuration')}, {_plural(len(result['figures']), 'plot')}, "
               f"{len(result['diverged'])} diverged, {sum(r['status'] == 'failed' for r in incomplete)} failed, "
               f"{sum(r['status'] == 'unfinished' for r in incomplete)} unfinished -> "
               f"{result['out']}/report.html (and report.md)")
    for item in incomplete:
        click.echo(f"  {item['status']}: {item['path']}" + (f": {item['error']}" if item["error"] else ""))
    if result["gains"]:
        click.echo(gains_markdown(result["gains"]))


@main.command()
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config value (repeatable).")
@click.option("--out", type=click.Path(file_okay=False), help="Folder for partition.json and the PNGs "
              "(default: runs/<config name>-partition).")
@click.option("--rows", default=10, show_default=True, help="Clients shown in full; more are summarised.")
@_user_errors
def partition(config_path: str, overrides: tuple[str, ...], out: str | None, rows: int) -> None:
    """Show how CONFIG splits its data among clients, without training.

    Prints per-client sizes and label counts (summary rows for many clients) and writes
    partition.json, partition_heatmap.png (clients × classes) and client_sizes.png to --out; a run
    folder holds the same files. Counts are before data.validation_fraction is held out.
    """
    from rich.console import Console

    from fedgma.config import load_config
    from fedgma.data.federated import build_federated
    from fedgma.plots import partition_summary, partition_table, write_partition_files

    config = load_config(config_path, list(overrides))
    data = build_federated(config.data, config.seed)
    out_dir = Path(out) if out else Path("runs") / f"{config.name or 'config'}-partition"
    written = write_partition_files(out_dir, data.statistics, options=dict(config.data.partition.options))
    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the table into 80 columns
        console = Console(width=200)
    shown = "" if data.num_clients <= rows else f" (first and last {max(1, rows // 2)} shown)"
    console.print(partition_table(data.statistics, max_rows=rows, title=f"{config.name}: " + (
        f"{data.statistics['dataset']}, {data.statistics['partition']}, {data.num_clients} clients{shown}")))
    click.echo(partition_summary(data.statistics))
    click.echo("wrote " + ", ".join(str(p) for p in written))


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun if count == 1 else noun + 's'}"


def _print_table(runs: list[Any], out_dir: Path, report_dirs: str | None = None) -> None:
    """The sweep's table (one row per configuration, a column per swept key; accuracies in %), printed and
    saved to ``out_dir/sweep.md``, then the ``fedgma report`` command (on ``report_dirs``, default ``out_dir``)
    for the full report."""
    from rich.console import Console
    from rich.table import Table

    from fedgma.report import make_groups
    from fedgma.report.tables import table_columns, table_rows

    if not runs:
        click.echo("no finished runs")
        return
    header, body = table_columns(table_rows(make_groups(runs)))
    keep = [i for i, name in enumerate(header) if name not in ("target %", "rounds to target")]
    header, body = [header[i] for i in keep], [[row[i] for i in keep] for row in body]
    title = (f"{out_dir}: {_plural(len(runs), 'finished run')}, {_plural(len(body), 'configuration')}; "
             "accuracy in %, mean ± std over seeds")
    table = Table(title=title)
    for column in header:
        table.add_column(column, justify="right")
    for row in body:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the table into 80 columns
        console = Console(width=200)
    console.print(table)
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
             *["| " + " | ".join(row) + " |" for row in body]]
    (out_dir / "sweep.md").write_text("\n".join(lines) + "\n")
    click.echo(f"table saved to {out_dir / 'sweep.md'}; full report (tables, plots, report.html): "
               f"fedgma report {report_dirs or out_dir}")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("bench_args", nargs=-1, type=click.UNPROCESSED)
def bench(bench_args: tuple[str, ...]) -> None:
    """Speed and memory benchmark (benchmarks/bench.py; its options pass through, see `fedgma bench -- --help`).

    Times fedgma's backends against a plain PyTorch loop, aggregation against the memory-bandwidth
    floor and a Flower-style mean, and a 10,000-client SCAFFOLD run; prints tables of medians and ratios.
    """
    import runpy

    import fedgma

    script = Path(fedgma.__file__).resolve().parents[2] / "benchmarks" / "bench.py"
    if not script.is_file():
        raise UserError(f"fedgma bench needs a source checkout: {script} does not exist")
    sys.argv = [str(script), *bench_args]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    sys.exit(main())
