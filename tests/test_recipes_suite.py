"""The shared test suite of recipes, parametrised over ``fedgma.algorithms.RECIPES``.

A recipe is named defaults for the client algorithm, the server optimizer and local training; the
aggregation rule is chosen apart. Every recipe must name registered parts with valid options, be
what a config resolves to when it names only the recipe, and learn scikit-learn's digits with
both ``mean`` and ``gma``. A recipe added to ``RECIPES`` is tested without editing this file.
"""

from __future__ import annotations

import pytest

from fedgma.algorithms import RECIPES, available_algorithms
from fedgma.config import ClientConfig, load_config
from fedgma.data.federated import build_federated
from fedgma.registry import CLIENT_ALGORITHMS, SERVER_OPTIMIZERS
from fedgma.simulation import run

NAMES = sorted(RECIPES)
DIGITS = [
    "data.dataset=digits", "data.partition=dirichlet", "data.alpha=0.5", "data.num_clients=10", "data.min_size=5",
    "model.name=mlp", "server.clients_per_round=5", "client.batch_size=16", "client.lr=0.05", "eval_every=5",
]
ROUNDS = 10
MARGIN = 0.25  # accuracy points over the untrained model (near chance, 0.1) after ROUNDS rounds


@pytest.fixture(scope="module")
def digits_data():
    config = load_config(None, DIGITS)
    return build_federated(config.data, config.seed)


def test_the_classic_recipes_are_there():
    assert {"fedavg", "fedavgm", "fedprox", "scaffold", "fedadam", "fedyogi", "fedadagrad"} <= set(NAMES)
    assert available_algorithms() == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_a_recipe_names_registered_parts_with_valid_options(name):
    recipe = RECIPES[name]
    assert recipe.client_algorithm in CLIENT_ALGORITHMS, f"{name}: unknown client algorithm {recipe.client_algorithm}"
    assert recipe.server_optimizer in SERVER_OPTIMIZERS, f"{name}: unknown server optimizer {recipe.server_optimizer}"
    SERVER_OPTIMIZERS.validate(recipe.server_optimizer, recipe.server_options)  # raises naming a bad option
    assert set(recipe.client_defaults) <= set(ClientConfig.model_fields) - {"algorithm"}
    assert recipe.reference, f"{name}: cite the paper the recipe follows"


@pytest.mark.parametrize("name", NAMES)
def test_a_config_naming_only_the_recipe_resolves_to_its_parts(name):
    recipe = RECIPES[name]
    config = load_config(None, [f"algorithm={name}"])
    assert config.client.algorithm.name == recipe.client_algorithm
    assert config.server.optimizer.name == recipe.server_optimizer
    expected = SERVER_OPTIMIZERS.validate(recipe.server_optimizer, recipe.server_options).model_dump()
    assert config.server.optimizer.options == expected
    for key, value in recipe.client_defaults.items():
        assert getattr(config.client, key) == value


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("aggregator", ["mean", "gma"])
def test_every_recipe_learns_digits(tmp_path, digits_data, name, aggregator):
    config = load_config(None, [*DIGITS, f"algorithm={name}", f"server.aggregator={aggregator}", f"rounds={ROUNDS}"])
    summary = run(config, tmp_path, progress=False, data=digits_data)
    initial, final = summary["initial"]["test_accuracy"], summary["final"]["test_accuracy"]
    assert initial < 0.3  # an untrained 10-class model is near chance
    assert final > initial + MARGIN, (name, aggregator, initial, final)
