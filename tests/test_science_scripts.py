"""scripts/science.py (the staged suite of issue 15) and scripts/chance_mask.py: their pure parts."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import tomllib

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_chance_mask_by_hand():
    chance = _load("chance_mask").chance_mask
    # K = 5: A ∈ {1/5 (B = 2, 3: p = 20/32), 3/5 (B = 1, 4: 10/32), 1 (B = 0, 5: 2/32)}; τ = 0.4 passes 3/5 and 1
    five = chance(5, 0.4)
    assert five["chance_pass_rate"] == 12 / 32 and five["chance_density"] == pytest.approx(12 / 32 + 0.2 * 20 / 32)
    assert five["net_agreeing_clients"] == 3
    # K = 10: A = 0 (p = 252/1024), 0.2 (420/1024), passes at A ≥ 0.4: (240 + 90 + 20 + 2) / 1024
    ten = chance(10, 0.4)
    assert ten["chance_pass_rate"] == round(352 / 1024, 4)
    assert ten["chance_density"] == round(352 / 1024 + 0.2 * 420 / 1024, 4)
    assert ten["net_agreeing_clients"] == 4 and chance(100, 0.4)["net_agreeing_clients"] == 40
    assert chance(10, 0.0) == {**chance(10, 0.0), "chance_density": 1.0, "chance_pass_rate": 1.0}


def test_the_suite_parses_and_every_study_point_has_a_distinct_folder():
    science = _load("science")
    suite = tomllib.loads((SCRIPTS / "science_suite.toml").read_text())
    assert set(suite["protocol"]["tuning_seeds"]).isdisjoint(suite["protocol"]["evaluation_seeds"])
    assert len(suite["protocol"]["evaluation_seeds"]) >= 5 and len(suite["protocol"]["tuning_seeds"]) >= 2
    for name, study in suite["studies"].items():
        names = [science._name(point) for point in science.points(study)]
        assert len(set(names)) == len(names), name
    heterogeneity = [science._name(p) for p in science.points(suite["studies"]["heterogeneity"])]
    assert heterogeneity == ["partition=dirichlet-alpha0.1-min_size10", "partition=dirichlet-alpha1.0-min_size10",
                             "partition=iid"]
    assert science.points({}) == [[]] and science._name([]) == "base"


def test_every_study_point_is_a_valid_config():
    from fedgma.config import load_config

    science = _load("science")
    suite = tomllib.loads((SCRIPTS / "science_suite.toml").read_text())
    for study in suite["studies"].values():
        for point in science.points(study):
            for method in study["methods"]:
                load_config(science.BASE, [*study.get("overrides", []), *point,
                                           f'server.aggregator={{name = "{method}"}}'])  # raises if not


def test_a_study_with_its_own_report_is_left_out_of_the_main_table(tmp_path, monkeypatch):
    """``report = "cnn"``: the CNN's points get their own tables in <to>/cnn (their own Holm family); the main
    report over <to> keeps only the other studies' points, so its comparisons and corrections do not move."""
    science = _load("science")
    out, to = tmp_path / "runs", tmp_path / "docs"
    keys = ["heterogeneity/partition=iid/mean", "heterogeneity/partition=iid/gma",
            "cnn/algorithm=fedavg_partition=iid/mean", "cnn/algorithm=fedavg_partition=iid/gma"]
    (out / "full").mkdir(parents=True)
    (out / "full" / "lrs.json").write_text(json.dumps({k: {"lr": 1.0, "scores": {"1": 0.5}} for k in keys}))
    (out / "stages.jsonl").write_text("")
    calls = []
    monkeypatch.setattr(science.subprocess, "run", lambda args, check: calls.append(args))
    assert science.report(out, to) == 0
    reports = {args[args.index("--out") + 1]: args[2 : args.index("--out")] for args in calls}
    assert reports[str(to)] == [str(out / "full" / k / "evaluation") for k in sorted(keys[:2])]
    assert reports[str(to / "cnn")] == [str(out / "full" / k / "evaluation") for k in sorted(keys[2:])]
    assert reports[str(to / "cnn" / "tuning")] == [str(out / "full" / k / "tuning") for k in sorted(keys[2:])]
    assert len(calls) == 4 and (to / "lr_choices.csv").is_file() and (to / "runs.tar.xz").is_file()


def test_status_counts_each_points_finished_runs_against_the_plan(tmp_path, capsys):
    science = _load("science")
    suite = {"protocol": {"tuning_seeds": [100, 101], "evaluation_seeds": [0, 1, 2, 3, 4]},
             "studies": {"s": {"methods": ["mean", "gma"], "grid": {"client.local_epochs": [5]}}}}
    (tmp_path / "coarse").mkdir()
    (tmp_path / "coarse" / "lrs.json").write_text(json.dumps({"s/local_epochs=5/mean": {"lr": 2.0, "scores": {}}}))
    base = tmp_path / "full" / "s" / "local_epochs=5"
    for i, part in enumerate(["tuning/lr=1.0_seed100", "tuning/lr=2.0_seed100", "evaluation/lr=2.0_seed0"]):
        (base / "mean" / part).mkdir(parents=True)
        (base / "mean" / part / "summary.json").write_text(json.dumps({"wall_s": 60.0 * (i + 1)}))
    (base / "gma" / "tuning" / "lr=1.0_seed100").mkdir(parents=True)  # started, not finished: not counted
    rows = science.status(tmp_path, suite, ["s"])
    assert [(r["key"], r["coarse_lr"], r["tuning_runs"], r["tuning_planned"], r["evaluation_runs"],
             r["evaluation_planned"], r["done"]) for r in rows] == [
        ("s/local_epochs=5/mean", 2.0, 2, 6, 1, 5, False), ("s/local_epochs=5/gma", None, 0, 6, 0, 5, False)]
    science.print_status(rows)  # gma has no finished run: its 11 runs at its point's median (mean's 120 s)
    assert "at least 19 runs left (more where a grid widens), ≈ 0.6 h of wall at each method's median" \
        in capsys.readouterr().out
    (base / "gma" / "tuning" / "lr=2.0_seed100").mkdir(parents=True)
    (base / "gma" / "tuning" / "lr=2.0_seed100" / "summary.json").write_text(json.dumps({"wall_s": 600.0}))
    science.print_status(science.status(tmp_path, suite, ["s"]))  # 8 × 120 s + 10 × 600 s = 1.93 h
    assert "at least 18 runs left (more where a grid widens), ≈ 1.9 h of wall" in capsys.readouterr().out
    science.print_status([dict(rows[0], done=True, tuning_runs=6, evaluation_runs=5)])
    assert capsys.readouterr().out.endswith("full stage: 1 of 1 points and methods done; no run left\n")
    science.print_status([dict(rows[0], tuning_runs=6, evaluation_runs=4)])
    assert "at least 1 run left (more" in capsys.readouterr().out
