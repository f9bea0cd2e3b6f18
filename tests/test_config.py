"""Config loading: defaults from recipes, overrides, and one-line errors that name the key."""

from __future__ import annotations

import pytest

from fedgma.config import ConfigError, config_to_toml, key_hyperparameters, load_config, parse_value


def write(tmp_path, text: str):
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return path


def test_quickstart_config_loads_with_the_documented_shape():
    config = load_config("configs/quickstart.toml")
    assert config.algorithm == "fedavg"
    assert config.data.dataset.name == "fashion-mnist" and config.data.partition.name == "dirichlet"
    assert config.data.partition.alpha == 0.1 and config.data.num_clients == 100
    assert config.model.name == "mlp"
    assert config.server.aggregator.name == "gma" and config.server.aggregator.threshold == 0.4
    assert config.server.clients_per_round == 10
    assert config.name == "quickstart"


@pytest.mark.parametrize(
    ("algorithm", "server_lr", "momentum", "prox_mu"),
    [("fedavg", 1.0, 0.0, 0.0), ("fedavgm", 1.0, 0.9, 0.0), ("fedprox", 1.0, 0.0, 0.01), ("fedadam", 0.01, 0.0, 0.0)],
)
def test_recipe_defaults_fill_unset_values(tmp_path, algorithm, server_lr, momentum, prox_mu):
    config = load_config(write(tmp_path, f'algorithm = "{algorithm}"\n'))
    optimizer = config.server.optimizer
    assert (optimizer.lr, optimizer.options.get("momentum", 0.0), config.client.prox_mu) \
        == (server_lr, momentum, prox_mu)


def test_explicit_values_win_over_recipe_defaults(tmp_path):
    config = load_config(write(tmp_path, 'algorithm = "fedavgm"\n[server]\nmomentum = 0.5\n'))
    assert config.server.optimizer.momentum == 0.5


def test_overrides_use_dotted_keys_and_toml_values():
    config = load_config("configs/quickstart.toml", ["server.aggregator=gma", "rounds=5", "data.alpha=0.5",
                                                     "server.hard=true", 'name="x"'])
    assert config.server.aggregator.name == "gma" and config.rounds == 5 and config.data.partition.alpha == 0.5
    assert config.server.aggregator.hard is True and config.name == "x"
    assert parse_value("mean") == "mean" and parse_value("0.1") == 0.1 and parse_value("3") == 3


def test_resolved_config_round_trips_through_toml(tmp_path):
    config = load_config("configs/quickstart.toml", ["algorithm=scaffold"])
    again = load_config(write(tmp_path, config_to_toml(config)))
    assert again.model_dump() == {**config.model_dump(), "name": config.name}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algorithm=fedsgd"], "config key 'algorithm': 'fedsgd' is not one of"),
        (["client.lr=-0.1"], "config key 'client.lr'"),
        (["server.aggregator.threshold=1.5"], "config key 'server.aggregator': aggregator 'gma' option 'threshold'"),
        (["server.threshold=1.5"], "config key 'server.aggregator': aggregator 'gma' option 'threshold'"),
        (["server.aggregator=meen"], "did you mean 'mean'"),
        (["server.aggregator=mean", "server.aggregator.treshold=0.9"],
         "aggregator 'mean' has no option 'treshold'; it takes: no options"),
        (["server.aggregator.treshold=0.9"], "has no option 'treshold' (did you mean 'threshold'?)"),
        (["server.aggregator=median", "server.threshold=0.9"],
         "config key 'server.threshold' is now 'server.aggregator.threshold', and aggregator 'median' does not take"),
        (["algorithm=fedadam", "server.optimizer.momentum=0.9"], "server optimizer 'adam' has no option 'momentum'"),
        (["server.optimizer=lamb"], "unknown server optimizer 'lamb'"),
        (["client.algorithm=scafold"], "did you mean 'scaffold'"),
        (["sever.lr=1"], "unknown config key 'sever.lr'"),
        (["rounds"], "must look like key=value"),
        (["server.clients_per_round=500"], "exceeds data.num_clients"),
        (["model.name=transformer"], "config key 'model.name'"),
        (["data.dataset=imagenet"], "config key 'data.dataset'"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config("configs/quickstart.toml", overrides)
    assert message in str(error.value)


def test_unknown_key_in_file_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'client.learning_rate'"):
        load_config(write(tmp_path, "[client]\nlearning_rate = 0.1\n"))


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "rounds = = 3"))


def test_server_optimizer_is_chosen_apart_from_the_recipe():
    config = load_config(None, ["algorithm=fedavg", "server.optimizer=yogi"])
    assert config.server.optimizer.name == "yogi" and config.server.optimizer.lr == 0.01  # yogi's own default
    assert config.client.algorithm.name == "sgd"
    config = load_config(None, ["algorithm=fedadam", "server.optimizer.lr=0.1"])
    assert config.server.optimizer.name == "adam" and config.server.optimizer.lr == 0.1
    assert config.server.optimizer.beta2 == 0.99  # the rest from the recipe and the part's defaults


def test_old_flat_keys_are_upgraded_to_part_tables(tmp_path):
    old = 'algorithm = "fedavgm"\nworkers = 2\nbackend = "multiprocess"\n[server]\naggregator = "gma"\n' \
          'threshold = 0.3\nlr = 0.5\n[data]\nalpha = 0.2\nmin_size = 5\n'
    config = load_config(write(tmp_path, old))
    assert (config.server.aggregator.name, config.server.aggregator.threshold) == ("gma", 0.3)
    assert (config.server.optimizer.name, config.server.optimizer.lr, config.server.optimizer.momentum) == (
        "sgd", 0.5, 0.9)
    assert (config.data.partition.alpha, config.data.partition.min_size) == (0.2, 5)
    assert (config.backend.name, config.backend.workers) == ("multiprocess", 2)


def test_every_config_file_uses_the_part_tables():
    from pathlib import Path

    import tomllib

    from fedgma.config import _MOVED

    for path in sorted(Path("configs").rglob("*.toml")):
        raw = tomllib.loads(path.read_text())
        flat = {f"{section}.{key}" for section, table in raw.items() if isinstance(table, dict) for key in table}
        flat |= set(raw)
        assert not flat & set(_MOVED), f"{path} uses old flat keys {sorted(flat & set(_MOVED))}"
        assert "options" not in raw.get("data", {}), f"{path} uses [data.options]; write [data.dataset]"
        load_config(path)


# -- issue 13: strict types, finite bounds, nesting, aliases, recipe defaults, the summary line -----------------


@pytest.mark.parametrize(("override", "message"), [
    ('rounds="5"', "^config key 'rounds': Input should be a valid integer; write it without quotes \\(got '5'\\)$"),
    ('client.lr="0.1"', "^config key 'client.lr': Input should be a valid number; write it without quotes"),
    ("data.download=1", "^config key 'data.download': Input should be a valid boolean \\(got 1\\)$"),
    ("rounds=5.0", "^config key 'rounds': Input should be a valid integer \\(got 5.0\\)$"),
    ('server.aggregator.threshold="0.3"', "^config key 'server.aggregator': aggregator 'gma' option 'threshold': "
                                          "Input should be a valid number; write it without quotes"),
    ("server.aggregator.hard=1", "option 'hard': Input should be a valid boolean \\(got 1\\)$"),
])
def test_types_are_strict(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_toml_integers_are_accepted_where_floats_are_expected():
    config = load_config(None, ["client.lr=1", "server.optimizer.lr=2", "server.aggregator.threshold=1"])
    assert (config.client.lr, config.server.optimizer.options["lr"], config.server.aggregator.options["threshold"]) \
        == (1.0, 2.0, 1.0)


@pytest.mark.parametrize(("override", "message"), [
    ("client.lr=inf", "'client.lr': Input should be a finite number; expected a finite number in \\(0, 1000\\] "
                      "\\(got inf\\)$"),
    ("client.lr=1e300", "'client.lr': Input should be less than or equal to 1000; expected a finite number in "
                         "\\(0, 1000\\] \\(got 1e\\+300\\)$"),
    ("client.weight_decay=inf", "'client.weight_decay': Input should be a finite number; expected a finite number in "
                                "\\[0, 1000\\] \\(got inf\\)$"),
    ("client.prox_mu=1e300", "'client.prox_mu': .*; expected a finite number in \\[0, 1000\\] \\(got 1e\\+300\\)$"),
    ("server.optimizer.lr=inf", "option 'lr': .*; expected a finite number in \\(0, 1000\\] \\(got inf\\)$"),
    ("server.optimizer.lr=1e300", "option 'lr': .*; expected a finite number in \\(0, 1000\\] \\(got 1e\\+300\\)$"),
    ("threads=1000000000", "'threads': .*; expected an integer in \\[1, 1024\\] \\(got 1000000000\\)$"),
    ("client.local_epochs=100000000", "'client.local_epochs': .*; expected an integer in \\[1, 10000\\]"),
    ("client.local_steps=100000000000", "'client.local_steps': .*; expected an integer in \\[1, 10000000\\]"),
    ("faults.scale_factor=1e300", "'faults.scale_factor': .*; expected a finite number in \\[-1e\\+06, 1e\\+06\\]"),
])
def test_finite_but_absurd_values_are_refused_with_the_allowed_range(override, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(None, [override])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("overrides", "message"), [
    (["algorithm=fedadam", "server.optimizer.eps=1e200"],
     "option 'eps': .*; expected a finite number in \\(0, 1000\\]"),
    (["data.domains.kind=noise", "data.domains.train=[0, 1e300]"],
     "data.domains.train\\[1\\]: noise σ must lie in \\[0, 100\\], got 1e\\+300$"),
    (["data.domains.kind=contrast", "data.domains.train=[1, 1e39]"],
     "data.domains.train\\[1\\]: contrast must lie in \\[0, 1000\\], got 1e\\+39$"),
    (["data.domains.kind=brightness", "data.domains.train=[0]", "data.domains.test=[-1e9]"],
     "data.domains.test\\[0\\]: brightness must lie in \\[-1000, 1000\\], got -1e\\+09$"),
    (["data.domains.kind=noise", "data.domains.sigma=1e300"], "'data.domains.sigma': .*; expected a finite number in"),
])
def test_absurd_part_and_domain_values_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("nested", [
    "a = " + "{b = " * 1000 + "1" + "}" * 1000,  # tomllib recurses: a RecursionError without the check
    "a = " + "[" * 1000 + "]" * 1000,
    "[data.domains]\nkind = 'custom'\ntrain = [" + "[" * 100 + "]" * 100 + "]",
])
def test_deeply_nested_toml_is_one_line(tmp_path, nested):
    path = tmp_path / "deep.toml"
    path.write_text(nested)
    with pytest.raises(ConfigError, match="nest") as error:
        load_config(path)
    assert "\n" not in str(error.value)


def test_a_thousand_deep_table_is_refused_in_one_line(tmp_path):
    path = tmp_path / "deep.toml"
    path.write_text("[data." + ".".join(["a"] * 1000) + "]\nx = 1\n")
    with pytest.raises(ConfigError, match="^config key 'data.a.a.a") as error:
        load_config(path)
    assert "\n" not in str(error.value) and len(str(error.value)) < 300


@pytest.mark.parametrize("written", ['"fmnist"', '{ name = "fmnist" }'])
def test_fmnist_is_an_alias_of_fashion_mnist(tmp_path, written):
    path = tmp_path / "c.toml"
    path.write_text(f"[data]\ndataset = {written}\n")
    assert load_config(path).data.dataset.name == "fashion-mnist"
    assert load_config(None, ["data.dataset=fmnist"]).data.dataset.name == "fashion-mnist"


def test_quickstart_with_another_recipe_gets_that_recipes_server_defaults():
    fedadam = load_config("configs/quickstart.toml", ["algorithm=fedadam"])
    assert fedadam.server.optimizer.name == "adam" and fedadam.server.optimizer.options["lr"] == 0.01
    fedavgm = load_config("configs/quickstart.toml", ["algorithm=fedavgm"])
    assert fedavgm.server.optimizer.options == {"lr": 1.0, "momentum": 0.9}


def test_server_options_set_for_one_recipe_do_not_follow_a_change_of_recipe(tmp_path):
    """``server.lr = 1.0`` written for FedAvg must not run FedAdam at server lr 1 (it ends at chance)."""
    path = tmp_path / "c.toml"
    path.write_text('algorithm = "fedavg"\n[server]\nlr = 1.0\n')
    assert load_config(path, ["algorithm=fedadam"]).server.optimizer.options["lr"] == 0.01
    set_after = load_config(path, ["algorithm=fedadam", "server.optimizer.lr=0.1"])
    assert set_after.server.optimizer.options["lr"] == 0.1
    path.write_text('algorithm = "fedadam"\n[server.optimizer]\nlr = 1.0\n')  # set for FedAdam itself: kept
    assert load_config(path).server.optimizer.options["lr"] == 1.0
    path.write_text('[server.optimizer]\nname = "sgd"\nlr = 0.5\n')  # a named optimizer keeps its options
    named = load_config(path, ["algorithm=fedadam"]).server.optimizer
    assert (named.name, named.options["lr"]) == ("sgd", 0.5)


def test_key_hyperparameters_is_one_line_of_the_resolved_values():
    config = load_config("configs/quickstart.toml", ["algorithm=fedadam"])
    assert key_hyperparameters(config) == (
        "fedadam: client sgd lr 0.01 × 1 local epoch(s), batch 32 | aggregator gma τ=0.4 | server adam lr 0.01 | "
        "10 of 100 clients per round"
    )
    config = load_config(None, ["algorithm=fedprox", "client.local_steps=5", "server.aggregator=trimmed_mean",
                                "server.aggregator.trim_fraction=0.2", "server.clients_per_round=20"])
    assert key_hyperparameters(config) == (
        "fedprox: client sgd lr 0.01 × 5 local steps, batch 32, prox_mu 0.01 | aggregator trimmed_mean "
        "trim_fraction=0.2 | server sgd lr 1 | 20 of 100 clients per round"
    )
