"""The shared test suite of aggregation rules, parametrised over every registered rule.

Modelled on declearn's ``test/aggregator/test_aggregator.py``: every rule in
``fedgma.registry.AGGREGATORS`` is checked for the same properties, so a rule registered tomorrow
is tested without editing any list here. Where a property does not hold for a rule by design, the
rule is named in a table of exceptions below together with the reason; a test fails when a
registered rule needs an entry and has none, and when a table names a rule that is not registered.

Exactness: updates drawn as small multiples of 1/8 with integer weights make every sum a rule
computes exact (in float32 and float64), so order and scale invariance are checked bit for bit on
them; on Gaussian float32 updates the weighted sums of ``mean`` and ``gma`` are re-associated by a
permutation, and the check there has the tolerance stated in ``FLOAT32_RTOL``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedgma.ablations import gma_random_mask, mean_density_scaled
from fedgma.aggregation import gma, make_aggregator, mean
from fedgma.krum import krum
from fedgma.registry import AGGREGATORS

PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NAMES = AGGREGATORS.names()

# Option sets each rule is tested with, beyond its defaults ({}); a rule not listed is tested with its defaults.
VARIANTS: dict[str, list[dict]] = {
    "gma": [{}, {"hard": True}, {"weighted_agreement": True}, {"threshold": 1.0}],
    "trimmed_mean": [{}, {"trim_fraction": 0.3}],
    "krum": [{}, {"num_byzantine": 2, "num_selected": 3}, {"num_byzantine": 0, "num_selected": 7}],
    "gma_random_mask": [{}, {"hard": True}],
    "mean_density_scaled": [{}, {"hard": True}],
}
CASES = [pytest.param(name, options, id=f"{name}{options or ''}") for name in NAMES for options in
         VARIANTS.get(name, [{}])]

# The one-shot form of a rule, where it has one: f(updates [K, d] or list, weights or None, **options) -> [d].
ONE_SHOT = {
    "mean": lambda updates, weights: mean(updates, weights),
    "gma": lambda updates, weights, **options: gma(updates, weights, **options)[0],
    "krum": lambda updates, weights, **options: krum(updates, weights, **options),
    "gma_random_mask": lambda updates, weights, **options: gma_random_mask(updates, weights, **options)[0],
    "mean_density_scaled": lambda updates, weights, **options: mean_density_scaled(updates, weights, **options)[0],
}
# Rules without a one-shot form, and why.
NO_ONE_SHOT = {
    "median": "an order statistic over the buffered [K, d] stack; only the streaming form exists",
    "trimmed_mean": "an order statistic over the buffered [K, d] stack; only the streaming form exists",
    "gma_mask_after_optimizer": "its aggregate is `mean`'s; its mask acts on the server step in fedgma.round.run_round",
}
# Rules that do not return a single client's update unchanged, and why.
NOT_IDENTITY_ON_ONE_CLIENT = {
    "krum": "needs K > 2·num_byzantine + 2 updates (Blanchard et al. 2017) and refuses a round of one",
}
# Rules that return a single client's update unchanged only when it has no zero coordinate, and why.
IDENTITY_ONLY_WITHOUT_ZEROS = {
    "gma_random_mask": "a zero coordinate has agreement 0, and the random placement moves its mask value 0 elsewhere",
    "mean_density_scaled": "a zero coordinate has agreement 0, so GMA's density (the step's scale) drops below 1",
}
# Clients every generic test gives a rule (enough for each variant above, e.g. Krum with f = 2 needs 7).
K = 8


def _variants_of(name: str) -> list[dict]:
    return VARIANTS.get(name, [{}])


def _dyadic(draw, k: int, d: int, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[float]]:
    """k updates with entries in {-64/8, ..., 64/8} and integer weights in [1, 50]: every sum is exact.

    Half the time the entries come from {-2/8, ..., 2/8} only, so equal updates and ties (equal
    order statistics, equal Krum scores) are common.
    """
    spread = draw(st.sampled_from([2, 64]), label="spread")
    values = draw(st.lists(st.lists(st.integers(-spread, spread), min_size=d, max_size=d), min_size=k, max_size=k))
    weights = draw(st.lists(st.integers(1, 50), min_size=k, max_size=k))
    return [torch.tensor(v, dtype=dtype) / 8 for v in values], [float(w) for w in weights]


def _gaussian(seed: int, k: int, d: int, dtype: torch.dtype = torch.float32) -> tuple[list[torch.Tensor], list[float]]:
    generator = torch.Generator().manual_seed(seed)
    updates = list(torch.randn(k, d, generator=generator, dtype=dtype).unbind(0))
    weights = torch.randint(1, 200, (k,), generator=generator).double().tolist()
    return updates, weights


def _streamed(name: str, options: dict, updates, weights) -> tuple[torch.Tensor, dict]:
    aggregator = make_aggregator(name, **options)
    for k, update in enumerate(updates):
        aggregator.add(update, 1.0 if weights is None else weights[k])
    return aggregator.result()


# --------------------------------------------------------------------------------------------
# The tables themselves
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_rule_declares_its_one_shot_form_or_why_it_has_none(name):
    assert (name in ONE_SHOT) != (name in NO_ONE_SHOT), (
        f"aggregator {name!r}: add its one-shot function to ONE_SHOT, or the reason it has none to NO_ONE_SHOT"
    )


def test_the_exception_tables_name_only_registered_rules():
    for table in (VARIANTS, ONE_SHOT, NO_ONE_SHOT, NOT_IDENTITY_ON_ONE_CLIENT, IDENTITY_ONLY_WITHOUT_ZEROS):
        assert set(table) <= set(NAMES), set(table) - set(NAMES)
    for name, variants in VARIANTS.items():
        for options in variants:
            AGGREGATORS.validate(name, options)  # every variant is a valid option set


def test_the_built_in_rules_are_registered():
    assert {"mean", "gma", "median", "trimmed_mean", "krum"} <= set(NAMES)


# --------------------------------------------------------------------------------------------
# Properties every rule has
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_defaults_work_and_the_result_is_bounded_by_the_inputs(name, dtype):
    updates, weights = _gaussian(0, K, 33, dtype)
    inputs = [u.clone() for u in updates]
    result, stats = _streamed(name, {}, updates, weights)
    assert result.shape == (33,) and result.dtype == dtype
    assert bool(torch.isfinite(result).all())
    assert stats.get("num_clients", K) == K
    # Each rule averages, masks or selects: per coordinate the result lies in [min(lo, 0), max(hi, 0)].
    stacked = torch.stack(updates)
    low, high = stacked.min(0).values.clamp(max=0), stacked.max(0).values.clamp(min=0)
    slack = 1e-6 * float(stacked.abs().max())
    assert bool((result >= low - slack).all()) and bool((result <= high + slack).all())
    for before, after in zip(inputs, updates, strict=True):
        assert torch.equal(before, after)  # the clients' tensors are not modified


@pytest.mark.parametrize(("name", "options"), [c for c in CASES if c.values[0] in ONE_SHOT])
@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("weighted", [False, True])
def test_streaming_equals_one_shot_bit_for_bit(name, options, seed, weighted):
    updates, weights = _gaussian(seed, K, 40_000)  # more than one chunk (32768) of the fold
    weights = weights if weighted else None
    streamed, _ = _streamed(name, options, updates, weights)
    assert torch.equal(streamed, ONE_SHOT[name](updates, weights, **options))
    assert torch.equal(streamed, ONE_SHOT[name](torch.stack(updates), weights, **options))


@pytest.mark.parametrize(("name", "options"), CASES)
@PROPERTY
@given(data=st.data())
def test_permutation_of_the_clients_changes_nothing_on_exact_sums(name, options, data):
    k = data.draw(st.integers(K - 1, K + 2), label="clients")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    updates, weights = _dyadic(data.draw, k, data.draw(st.integers(1, 6), label="d"), dtype)
    order = data.draw(st.permutations(range(k)), label="order")
    expected, _ = _streamed(name, options, updates, weights)
    permuted, _ = _streamed(name, options, [updates[i] for i in order], [weights[i] for i in order])
    assert torch.equal(expected, permuted)


FLOAT32_RTOL = 1e-5  # re-associating a sum of K = 8 float32 terms of similar size moves it by a few ulp


@pytest.mark.parametrize(("name", "options"), CASES)
@pytest.mark.parametrize("seed", range(3))
def test_permutation_of_the_clients_within_float32_rounding(name, options, seed):
    updates, weights = _gaussian(seed, K, 500)
    order = torch.randperm(K, generator=torch.Generator().manual_seed(seed)).tolist()
    expected, _ = _streamed(name, options, updates, weights)
    permuted, _ = _streamed(name, options, [updates[i] for i in order], [weights[i] for i in order])
    torch.testing.assert_close(permuted, expected, rtol=FLOAT32_RTOL, atol=FLOAT32_RTOL)


@pytest.mark.parametrize(("name", "options"), CASES)
@PROPERTY
@given(data=st.data(), scale=st.sampled_from([0.5, 2.0, 3.0, 1000.0]))
def test_scaling_every_weight_by_c_changes_nothing(name, options, data, scale):
    """Σ c·w_k Δ_k / Σ c·w_k = Σ w_k Δ_k / Σ w_k; with exact sums the correctly rounded quotients agree."""
    k = data.draw(st.integers(K - 1, K + 2), label="clients")
    updates, weights = _dyadic(data.draw, k, data.draw(st.integers(1, 6), label="d"), torch.float32)
    expected, _ = _streamed(name, options, updates, weights)
    scaled, _ = _streamed(name, options, updates, [scale * w for w in weights])
    assert torch.equal(expected, scaled)


@pytest.mark.parametrize(("name", "options"), [c for c in CASES if c.values[0] not in NOT_IDENTITY_ON_ONE_CLIENT])
@pytest.mark.parametrize("seed", range(3))
def test_a_single_client_update_is_returned_unchanged(name, options, seed):
    zeros = name not in IDENTITY_ONLY_WITHOUT_ZEROS
    update, _ = _gaussian(seed, 1, 200)
    update[0][::7] = 0.0 if zeros else 0.5  # zero coordinates too (no sign vote for GMA)
    assert torch.equal(_streamed(name, options, update, [1.0])[0], update[0])
    dyadic = torch.randint(-64, 65, (200,), generator=torch.Generator().manual_seed(seed)).float() / 8
    dyadic[dyadic == 0] = 0.0 if zeros else 0.125
    assert torch.equal(_streamed(name, options, [dyadic], [37.0])[0], dyadic)  # a sample count as weight


@pytest.mark.parametrize("name", sorted(NOT_IDENTITY_ON_ONE_CLIENT))
def test_rules_that_refuse_a_single_client_say_so(name):
    with pytest.raises(ValueError, match="cannot aggregate"):
        _streamed(name, {}, [torch.ones(3)], [1.0])


@pytest.mark.parametrize(("name", "options"), CASES)
def test_bad_input_is_refused_naming_the_client_and_leaves_the_rule_usable(name, options):
    updates, weights = _gaussian(1, K, 5)
    aggregator = make_aggregator(name, **options)
    aggregator.add(updates[0], weights[0])
    bad = [
        (torch.tensor([0.0, float("nan"), 0.0, 0.0, 0.0]), 1.0, "client 1: update contains NaN"),
        (torch.tensor([0.0, float("inf"), 0.0, 0.0, 0.0]), 1.0, "client 1: update contains NaN or infinite"),
        (torch.zeros(6), 1.0, r"client 1: update has shape \(6,\), expected \(5,\)"),
        (torch.zeros(5, 1), 1.0, "client 1: update must be a 1-D tensor"),
        (torch.zeros(5, dtype=torch.float64), 1.0, "client 1: update has dtype torch.float64"),
        (torch.zeros(5, dtype=torch.int64), 1.0, "client 1: update must be a floating-point tensor"),
        ([0.0] * 5, 1.0, "client 1: update must be a torch.Tensor"),
        (torch.zeros(5), -1.0, "client 1: weight must be a finite non-negative number"),
        (torch.zeros(5), float("nan"), "client 1: weight must be a finite non-negative number"),
        (torch.zeros(5), "many", "client 1: weight 'many' is not a number"),
    ]
    for update, weight, message in bad:
        with pytest.raises(ValueError, match=message):
            aggregator.add(update, weight)
    for update, weight in zip(updates[1:], weights[1:], strict=True):
        aggregator.add(update, weight)
    assert torch.equal(aggregator.result()[0], _streamed(name, options, updates, weights)[0])


@pytest.mark.parametrize("name", NAMES)
def test_no_clients_or_zero_total_weight_is_refused(name):
    with pytest.raises(ValueError, match=r"cannot aggregate: no client update was added"):
        make_aggregator(name).result()
    aggregator = make_aggregator(name)
    for update in _gaussian(2, K, 4)[0]:
        aggregator.add(update, 0.0)
    with pytest.raises(ValueError, match="cannot aggregate: the client weights sum to zero"):
        aggregator.result()


@pytest.mark.parametrize("name", NAMES)
def test_unknown_options_and_misspelt_ones_are_refused_in_one_line(name):
    with pytest.raises(ValueError, match=rf"aggregator '{name}' has no option 'no_such_option'; it takes: ") as error:
        make_aggregator(name, no_such_option=1)
    assert "\n" not in str(error.value)
    for option in AGGREGATORS.option_names(name):
        typo = option + option[-1]  # a doubled last letter
        with pytest.raises(ValueError, match=rf"has no option '{typo}' \(did you mean '{option}'\?\)"):
            make_aggregator(name, **{typo: 1})


@pytest.mark.parametrize("name", NAMES)
def test_numeric_options_out_of_range_are_refused_naming_the_option(name):
    for option, field in AGGREGATORS.options(name).model_fields.items():
        for constraint in field.metadata:
            for bound_name, outside in (("ge", -1), ("gt", 0), ("le", 1), ("lt", 0)):
                bound = getattr(constraint, bound_name, None)
                if bound is None:
                    continue
                value = bound + outside if bound_name != "lt" else bound
                if field.annotation is float and bound_name in ("ge", "le"):
                    value = bound + (-1e-3 if bound_name == "ge" else 1e-3)
                with pytest.raises(ValueError, match=rf"aggregator '{name}' option '{option}': "):
                    make_aggregator(name, **{option: value})


# --------------------------------------------------------------------------------------------
# GMA against mean
# --------------------------------------------------------------------------------------------


@PROPERTY
@given(
    seed=st.integers(0, 2**31 - 1), k=st.integers(1, 9), d=st.integers(1, 300),
    hard=st.booleans(), weighted_agreement=st.booleans(), use_weights=st.booleans(),
)
def test_gma_with_threshold_zero_is_mean_bit_for_bit(seed, k, d, hard, weighted_agreement, use_weights):
    updates, weights = _gaussian(seed, k, d)
    weights = weights if use_weights else None
    options = {"threshold": 0.0, "hard": hard, "weighted_agreement": weighted_agreement}
    expected = mean(updates, weights)
    assert torch.equal(gma(updates, weights, **options)[0], expected)
    assert torch.equal(_streamed("gma", options, updates, weights)[0], _streamed("mean", {}, updates, weights)[0])
    assert torch.equal(_streamed("mean", {}, updates, weights)[0], expected)


def test_mean_is_the_weighted_average_in_float64():
    updates, weights = _gaussian(5, K, 50, torch.float64)
    reference = sum(w * u for w, u in zip(weights, updates, strict=True)) / math.fsum(weights)
    torch.testing.assert_close(_streamed("mean", {}, updates, weights)[0], reference, rtol=1e-13, atol=1e-13)
