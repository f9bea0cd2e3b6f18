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
    assert config.data.dataset == "fashion-mnist" and config.data.partition == "dirichlet"
    assert config.data.alpha == 0.1 and config.data.num_clients == 100
    assert config.model.name == "mlp"
    assert config.server.aggregator == "gma" and config.server.threshold == 0.4
    assert config.server.clients_per_round == 10
    assert config.name == "quickstart"


@pytest.mark.parametrize(
    ("algorithm", "server_lr", "momentum", "prox_mu"),
    [("fedavg", 1.0, 0.0, 0.0), ("fedavgm", 1.0, 0.9, 0.0), ("fedprox", 1.0, 0.0, 0.01), ("fedadam", 0.01, 0.0, 0.0)],
)
def test_recipe_defaults_fill_unset_values(tmp_path, algorithm, server_lr, momentum, prox_mu):
    config = load_config(write(tmp_path, f'algorithm = "{algorithm}"\n'))
    assert (config.server.lr, config.server.momentum, config.client.prox_mu) == (server_lr, momentum, prox_mu)


def test_explicit_values_win_over_recipe_defaults(tmp_path):
    config = load_config(write(tmp_path, 'algorithm = "fedavgm"\n[server]\nmomentum = 0.5\n'))
    assert config.server.momentum == 0.5


def test_overrides_use_dotted_keys_and_toml_values():
    config = load_config("configs/quickstart.toml", ["server.aggregator=mean", "rounds=5", "data.alpha=0.5",
                                                     "server.hard=true", 'name="x"'])
    assert config.server.aggregator == "mean" and config.rounds == 5 and config.data.alpha == 0.5
    assert config.server.hard is True and config.name == "x"
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
        (["server.threshold=1.5"], "config key 'server.threshold'"),
        (["server.aggregator=meen"], "did you mean 'mean'"),
        (["sever.lr=1"], "unknown config key 'sever.lr' (did you mean 'server.lr'?)"),
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
