"""Config loading: defaults from recipes, overrides, and one-line errors that name the key."""

from __future__ import annotations

import pytest

from fedgma.config import ConfigError, config_to_toml, load_config, parse_value


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
    assert (optimizer.lr, optimizer.options.get("momentum", 0.0), config.client.prox_mu) == (server_lr, momentum, prox_mu)


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
