"""GMA under Flower's SecAgg+: fedgma.flower.secure against plaintext GMA.

Fast tests run Flower's own quantization/dequantization arithmetic (the masks of SecAgg+ cancel
modulo 2^32, so the unmasked sum is exactly the sum of the quantized vectors); the runtime test runs
the whole protocol (setup, share keys, masked vectors, unmask) on Flower's simulation runtime with 5
SuperNodes, one of which drops out mid-protocol in round 2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_combine, factor_extract, parameters_addition
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from fedgma.aggregation import gma
from fedgma.flower.secure import (
    SecureGMA,
    decode_aggregate,
    encode_update,
    quantization_range_for,
    update_error_bound,
    weight_scale_for,
)

SHAPES = [(20, 10), (10,)]


def client_update(pid: int, rnd: int) -> list[np.ndarray]:
    """A deterministic update per (client, round): a shared direction plus client noise, exact zeros included."""
    shared = np.random.default_rng(1000 + rnd)
    own = np.random.default_rng(10 * pid + rnd)
    out = []
    for shape in SHAPES:
        d = 0.02 * shared.standard_normal(shape) + 0.03 * own.standard_normal(shape)
        d[own.random(shape) < 0.05] = 0.0
        out.append(d.astype(np.float32))
    return out


def num_examples(pid: int) -> int:
    return 100 + 37 * pid


def initial() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def flower_secure_mean(vectors: list[list[np.ndarray]], q: int) -> list[np.ndarray]:
    """SecAggPlusWorkflow's result for weight-1 replies: Flower's client quantization, sum, unmask arithmetic."""
    total = None
    for x in vectors:
        quantized = factor_combine(q, quantize(x, 1.0, q))  # secaggplus_mod with max_weight = 1, num_examples = 1
        quantized = [a.astype(np.int64) for a in quantized]  # as after secaggplus_mod adds its int64 masks
        total = quantized if total is None else parameters_addition(total, quantized)
    q_total, recon = factor_extract(total)
    mean = dequantize(recon, 1.0, q)
    for vec in mean:  # unmask_stage's offset and ratio
        vec += -(len(vectors) - 1) * 1.0
        vec *= q / q_total
    return mean


def plaintext(theta, deltas, weights, threshold, weighted):
    """Plaintext GMA (fedgma.aggregation.gma, float32) on the clients' Δ = float32 θ_k − θ."""
    flat = [torch.cat([torch.from_numpy((t + d).astype(np.float64) - t.astype(np.float64)).float().ravel()
                       for t, d in zip(theta, delta, strict=True)]) for delta in deltas]
    return gma(flat, weights, threshold=threshold, weighted_agreement=weighted)


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("threshold", [0.0, 0.4, 0.6, 1.0])
def test_secure_mask_is_plaintext_mask_exactly_and_aggregate_within_bound(weighted, threshold):
    theta = initial()
    pids = range(5)
    deltas = [client_update(p, 1) for p in pids]
    weights = [num_examples(p) for p in pids]
    q = quantization_range_for(5)
    strategy = SecureGMA(threshold=threshold, weighted_agreement=weighted, update_bound=0.5, max_examples=1000,
                         max_clients=5, initial_parameters=ndarrays_to_parameters(theta))
    assert strategy.quantization_range == q == 1 << 29 and strategy.weight_scale == 1024
    xs = [encode_update(theta, [t + d for t, d in zip(theta, delta, strict=True)], n, 0.5, 1024, weighted)
          for delta, n in zip(deltas, weights, strict=True)]
    mean = flower_secure_mean(xs, q)
    strategy._global = theta
    results = [(None, type("R", (), {"parameters": ndarrays_to_parameters(mean), "num_examples": 1,
                                     "metrics": {}})())] * 5
    params, metrics = strategy.aggregate_fit(1, results, [])
    expected, mask = plaintext(theta, deltas, weights, threshold, weighted)
    assert torch.equal(strategy.last_round["mask"], mask)  # bit for bit: sign sums are exact integers
    assert metrics["secure-total-examples"] == sum(weights) and metrics["secure-clipped-fraction"] == 0.0
    bound = update_error_bound(0.5, 1024, 5, sum(weights), q)
    error = (strategy.last_round["aggregate"] - expected).abs().max().item()
    assert error <= bound + 2e-7 * expected.abs().max().item(), (error, bound)
    # sgd with lr 1: θ + aggregate
    new = torch.cat([torch.from_numpy(a).ravel() for a in parameters_to_ndarrays(params)])
    flat_theta = torch.cat([torch.from_numpy(a).ravel() for a in theta])
    assert (new - (flat_theta + expected)).abs().max().item() <= bound + 1e-6


def test_clipped_updates_are_counted_and_the_decoded_sums_are_the_plaintext_sums():
    theta = initial()
    deltas = [client_update(p, 2) for p in range(3)]
    deltas[0][0][0, 0] = 0.9  # beyond B = 0.25
    xs = [encode_update(theta, [t + d for t, d in zip(theta, delta, strict=True)], 500, 0.25, 512, True)
          for delta in deltas]
    sums = decode_aggregate(flower_secure_mean(xs, 1 << 30), 3, 0.25, 512, True)
    assert sums["total_examples"] == 1500
    signs = sum(500 * np.sign(d[1].astype(np.float64)) for d in deltas)
    np.testing.assert_array_equal(sums["sign_sum"][1], signs)
    assert sums["clipped_fraction"] == pytest.approx(1 / 3 / 210, abs=1e-8)
    assert sums["update"][0][0, 0] == pytest.approx((0.25 + deltas[1][0][0, 0] + deltas[2][0][0, 0]) / 3, abs=1e-6)


def test_bad_inputs_are_named():
    theta = initial()
    with pytest.raises(ValueError, match="num_examples must be an integer in") as error:
        encode_update(theta, theta, 2000, 1.0, 1024, True)
    assert "2000" not in str(error.value)  # Flower sends a ClientApp's exception text to the server in clear
    with pytest.raises(ValueError, match="shape"):
        encode_update(theta, [theta[0], np.zeros(3, np.float32)], 10, 1.0, 1024, True)
    with pytest.raises(TypeError, match="float arrays only"):
        encode_update(theta, [theta[0], np.zeros(10, np.int64)], 10, 1.0, 1024, True)
    with pytest.raises(ValueError, match="at least 2"):
        quantization_range_for(1)
    with pytest.raises(ValueError, match="Q/2"):
        weight_scale_for(1 << 30, 1 << 29)
    with pytest.raises(ValueError, match="threshold"):
        SecureGMA(threshold=1.5)
    with pytest.raises(ValueError, match="not a positive integer"):
        decode_aggregate([np.zeros(3), np.zeros(3), np.array([0.30001, 0.0])], 5, 1.0, 1024, True)


# --------------------------------------------------------------------------------------------
# The whole protocol on Flower's simulation runtime, with a dropout
# --------------------------------------------------------------------------------------------

DROPPER, DROP_ROUND = 3, 2
RECORDED: list[dict] = []


def _client_app(drops: dict[int, set[int]]):
    """5 clients; ``drops``: round -> the clients that drop out after sharing their keys (shipped to the
    client runtime in the app's closure, not read from a module global there)."""
    from flwr.client import ClientApp, NumPyClient

    from fedgma.flower.secure import fedgma_secaggplus_mod

    class Client(NumPyClient):
        def __init__(self, pid: int) -> None:
            self.pid = pid

        def fit(self, parameters, config):
            rnd = int(config["round"])
            if self.pid in drops.get(rnd, ()):
                raise RuntimeError("client drops out after sharing its keys")
            delta = client_update(self.pid, rnd)
            return [p + d for p, d in zip(parameters, delta, strict=True)], num_examples(self.pid), {}

    return ClientApp(client_fn=lambda context: Client(int(context.node_config["partition-id"])).to_client(),
                     mods=[fedgma_secaggplus_mod])


def _server_app(num_rounds: int = 2):
    from flwr.server import ServerApp

    from fedgma.flower.secure import run_secure

    class Recording(SecureGMA):
        def configure_fit(self, server_round, parameters, client_manager):
            pairs = super().configure_fit(server_round, parameters, client_manager)
            RECORDED.append({"theta": [a.copy() for a in self._global], "nodes": len(pairs)})
            return pairs

        def aggregate_fit(self, server_round, results, failures):
            out = super().aggregate_fit(server_round, results, failures)
            RECORDED[-1].update(self.last_round, metrics=out[1], new=parameters_to_ndarrays(out[0]))
            return out

    app = ServerApp()

    @app.main()
    def main(grid, context):
        strategy = Recording(threshold=0.4, weighted_agreement=True, optimizer="adam",
                             optimizer_options={"lr": 0.01}, update_bound=0.5, max_examples=1000, max_clients=5,
                             initial_parameters=ndarrays_to_parameters(initial()), min_fit_clients=5,
                             min_available_clients=5, fraction_evaluate=0.0, on_fit_config_fn=lambda r: {"round": r})
        run_secure(grid, context, strategy, num_rounds=num_rounds, num_shares=5, reconstruction_threshold=3)

    return app


def test_secure_gma_on_flowers_runtime_equals_plaintext_gma_and_survives_one_dropout_among_5():
    from flower_sim import simulate  # beside this file (rootdir conftest puts it on sys.path)

    from fedgma.server_opt import make_server_optimizer

    RECORDED.clear()
    simulate(_server_app(), _client_app({DROP_ROUND: {DROPPER}}), num_supernodes=5)
    assert [r["nodes"] for r in RECORDED] == [5, 5]
    assert [(r["num_clients"], r["num_dropped"]) for r in RECORDED] == [(5, 0), (4, 1)]
    assert RECORDED[1]["metrics"]["secure-num-dropped"] == 1
    optimizer = make_server_optimizer("adam", lr=0.01)
    theta = initial()
    for rnd, record in enumerate(RECORDED, start=1):
        pids = [p for p in range(5) if not (p == DROPPER and rnd == DROP_ROUND)]
        np.testing.assert_array_equal(np.concatenate([a.ravel() for a in record["theta"]]),
                                      np.concatenate([a.ravel() for a in theta]))
        weights = [num_examples(p) for p in pids]
        expected, mask = plaintext(theta, [client_update(p, rnd) for p in pids], weights, 0.4, True)
        assert torch.equal(record["mask"], mask)
        bound = update_error_bound(0.5, 1024, len(pids), sum(weights), quantization_range_for(5))
        assert (record["aggregate"] - expected).abs().max().item() <= bound + 2e-7 * expected.abs().max().item()
        assert record["metrics"]["secure-total-examples"] == sum(weights)
        flat = torch.cat([torch.from_numpy(a).ravel() for a in theta])
        plain_new = optimizer.step(flat, -expected)
        secure_new = torch.cat([torch.from_numpy(a).ravel() for a in record["new"]])
        assert (secure_new - plain_new).abs().max().item() <= 1e-5  # adam divides by sqrt(v): ~lr·error/τ
        theta = record["new"]


def test_a_round_with_fewer_survivors_than_the_reconstruction_threshold_is_skipped_and_the_next_one_runs():
    """3 of 5 clients drop out in round 2; 2 survivors < reconstruction_threshold = 3: SecAgg+ cannot unmask,
    so round 2 leaves the model as it was (no aggregate is computed from a partial sum) and round 3 runs
    with all 5 clients from that same model."""
    from flower_sim import simulate  # beside this file (rootdir conftest puts it on sys.path)

    RECORDED.clear()
    simulate(_server_app(num_rounds=3), _client_app({2: {1, 3, 4}}), num_supernodes=5)
    assert [r["nodes"] for r in RECORDED] == [5, 5, 5]
    assert "aggregate" in RECORDED[0] and "aggregate" not in RECORDED[1]  # round 2: aggregate_fit never ran
    assert [(r.get("num_clients"), r.get("num_dropped")) for r in RECORDED] == [(5, 0), (None, None), (5, 0)]
    after_round_1 = np.concatenate([a.ravel() for a in RECORDED[0]["new"]])
    for later in RECORDED[1:]:  # rounds 2 and 3 start from round 1's model: round 2 changed nothing
        np.testing.assert_array_equal(np.concatenate([a.ravel() for a in later["theta"]]), after_round_1)
    expected, _ = plaintext(RECORDED[2]["theta"], [client_update(p, 3) for p in range(5)],
                            [num_examples(p) for p in range(5)], 0.4, True)
    bound = update_error_bound(0.5, 1024, 5, sum(num_examples(p) for p in range(5)), quantization_range_for(5))
    assert (RECORDED[2]["aggregate"] - expected).abs().max().item() <= bound + 2e-7 * expected.abs().max().item()


# --------------------------------------------------------------------------------------------
# One setting: fedgma's Flower app with secure-aggregation = true
# --------------------------------------------------------------------------------------------


def _plain_message(message_type):
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.arange(3, dtype=np.float32))}),
                          "config": ConfigRecord({"server-round": 1})})
    return Message(content, dst_node_id=7, message_type=message_type)


@pytest.mark.parametrize("message_type", ["train", "evaluate", "query"])
def test_the_mod_passes_every_plaintext_message_through_untouched(message_type):
    """The fedgma ClientApp always carries the mod: a message without SecAgg+'s ConfigRecord reaches the
    handler as it came, and the handler's reply is returned as it is (Flower's own mod raises on it)."""
    from flwr.app import Context, Message, RecordDict
    from flwr.client.mod import secaggplus_mod

    from fedgma.flower.secure import fedgma_secaggplus_mod

    message = _plain_message(message_type)
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    seen = []

    def handler(msg, ctxt):
        seen.append((msg, ctxt))
        return Message(RecordDict(), reply_to=msg)

    reply = fedgma_secaggplus_mod(message, context, handler)
    assert seen == [(message, context)] and reply.metadata.reply_to_message_id == message.metadata.message_id
    assert len(context.state) == 0  # no SecAgg+ state was made
    if message_type == "train":
        with pytest.raises(KeyError):
            secaggplus_mod(message, context, handler)  # why the pass-through is needed


def _app_config(seed=1, algorithm="fedadam", **server):
    from fedgma.config import parse_config, resolve

    raw = {"seed": seed, "rounds": 3, "eval_every": 1, "algorithm": algorithm, "threads": 1,
           "data": {"dataset": "digits", "num_clients": 5,
                    "partition": {"name": "dirichlet", "alpha": 1.0, "min_size": 20}},
           "model": {"name": "mlp"}, "client": {"local_epochs": 1, "batch_size": 16, "lr": 0.05},
           "server": {"clients_per_round": 4, "aggregator": {"name": "gma", "threshold": 0.4}, **server}}
    return resolve(parse_config(raw))


def test_secure_aggregation_is_one_run_config_key_and_what_it_cannot_run_is_refused_in_one_line(tmp_path):
    import tomllib

    from fedgma.config import ConfigError
    from fedgma.flower.launch import flower_app_files
    from fedgma.flower.run_config import (
        SecureSettings,
        check_secure_supported,
        config_from_run_config,
        secure_settings,
    )

    base = {"data.dataset": "digits", "data.num_clients": 5, "server.clients_per_round": 4}
    _, own = config_from_run_config(base)
    assert secure_settings(own) is None  # off by default
    _, own = config_from_run_config({**base, "secure-aggregation": True, "secure-reconstruction-threshold": 3})
    assert secure_settings(own) == SecureSettings(1.0, 1.0, 3)
    # fedgma run --engine flower's one-run app carries the setting when run_flower(secure=...) asks for it
    app = tomllib.loads(flower_app_files(_app_config(), tmp_path, secure=SecureSettings(0.5))["pyproject.toml"])
    _, own = config_from_run_config(app["tool"]["flwr"]["app"]["config"])
    assert secure_settings(own) == SecureSettings(0.5)
    _, own = config_from_run_config(flatten := tomllib.loads(
        flower_app_files(_app_config(), tmp_path)["pyproject.toml"])["tool"]["flwr"]["app"]["config"])
    assert secure_settings(own) is None and "secure-aggregation" not in flatten

    refused = {
        "'secure-aggregation': expected true or false, got 'yes'": {"secure-aggregation": "yes"},
        "'secure-update-bound': expected a finite number > 0, got 0.0": {"secure-update-bound": 0.0},
        "'secure-num-shares': expected an integer ≥ 3": {"secure-num-shares": 1},
        "'secure-num-shares': expected an integer ≥ 3 .*got 2": {"secure-num-shares": 2},  # Flower's: > 2
        "'secure-reconstruction-threshold': expected fewer than secure-num-shares = 3 shares, got 3":
            {"secure-num-shares": 3, "secure-reconstruction-threshold": 3},
        "'secure-reconstruction-threshold': expected an integer ≥ 2": {"secure-reconstruction-threshold": 1.5},
    }
    for message, keys in refused.items():
        _, own = config_from_run_config({**base, "secure-aggregation": True, **keys})
        with pytest.raises(ConfigError, match=message):
            secure_settings(own)
    check_secure_supported(_app_config())
    check_secure_supported(_app_config(aggregator={"name": "mean"}))
    cases = {
        "config key 'server.aggregator': 'median' cannot run with secure-aggregation = true .*expected one of "
        r"\('gma', 'mean'\)": _app_config(aggregator={"name": "median"}),
        "config key 'client.algorithm': 'scaffold' cannot run with secure-aggregation = true .*expected 'sgd'":
            _app_config(algorithm="scaffold"),
        "config key 'server.clip_norm': .*expected it unset": _app_config(clip_norm=1.0),
        "config key 'server.max_update_norm': .*expected it unset": _app_config(max_update_norm=5.0),
        "config key 'server.clients_per_round': secure-aggregation = true needs at least 2 clients per round "
        r"\(SecAgg\+\), got 1": _app_config(clients_per_round=1, min_clients=1),
    }
    for message, config in cases.items():
        with pytest.raises(ConfigError, match=message) as error:
            check_secure_supported(config)
        assert "\n" not in str(error.value)


def test_fedgma_app_with_secure_aggregation_gives_the_simulators_accuracy_on_flowers_runtime(tmp_path):
    """fedgma's ServerApp and ClientApp with secure-aggregation on, 5 SuperNodes, 4 per round, 3 rounds:
    GMA + adam and mean + sgd (FedAvg). Same clients, same accuracy as the simulator (plaintext), the
    mask density within float32 noise of Δ = (θ+Δ) − θ, and the rounds say the secure sum was used."""
    import json

    from flower_sim import simulate
    from flwr.serverapp import ServerApp

    from fedgma.flower.client_app import client_app
    from fedgma.flower.run_config import SecureSettings
    from fedgma.flower.server_app import serve
    from fedgma.simulation import run as run_simulator

    configs = {"gma-adam": _app_config(), "mean-sgd": _app_config(seed=2, algorithm="fedavg", aggregator="mean")}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context):
        for name, config in configs.items():
            serve(grid, config, tmp_path / "secure" / name, secure=SecureSettings(update_bound=1.0))

    simulate(server_app, client_app, num_supernodes=5)

    def read(folder, name):
        return [json.loads(line) for line in (folder / name).read_text().splitlines()]

    for name, config in configs.items():
        run_simulator(config, tmp_path / "plain" / name, progress=False)
        secure, plain = tmp_path / "secure" / name, tmp_path / "plain" / name
        rounds, plain_rounds = read(secure, "rounds.jsonl"), read(plain, "rounds.jsonl")
        assert [r["clients"] for r in rounds] == [r["clients"] for r in plain_rounds]  # fedgma's sampling
        for r in rounds:
            assert r["secure_aggregation"] is True and "skipped" not in r
            assert r["secure_num_clients"] == 4 and r["secure_num_dropped"] == 0 and r["aggregated"] == r["clients"]
            assert r["secure_clipped_fraction"] == 0.0 and "train_loss" not in r
        metrics, plain_metrics = read(secure, "metrics.jsonl"), read(plain, "metrics.jsonl")
        for a, b in zip(metrics, plain_metrics, strict=True):
            assert a["round"] == b["round"]
            # measured equal in every round (quantization error ~1e-9); allowed: 1 of the 449 test digits
            assert abs(a["test_accuracy"] - b["test_accuracy"]) <= 1 / 449 + 1e-12, (name, a, b)
            # mean = GMA with τ = 0: a mask of ones (the simulator's mean logs no mask)
            assert a["mask_density"] == pytest.approx(b.get("mask_density", 1.0), abs=1e-3)
        summary = json.loads((secure / "summary.json").read_text())
        assert summary["secure_aggregation"] == {"update_bound": 1.0, "num_shares": 1.0,
                                                 "reconstruction_threshold": 0.6}
        assert summary["final"]["test_accuracy"] > summary["initial"]["test_accuracy"] + 0.2


def test_the_config_key_turns_secure_mode_on_and_needs_the_flower_engine(tmp_path):
    from fedgma.config import ConfigError, load_config
    from fedgma.flower.launch import run_flower

    with pytest.raises(ConfigError, match=r"^config: server\.secure_aggregation = true .* needs engine = \"flower\""):
        load_config(None, ["server.secure_aggregation=true"])
    # with engine = "flower", run_flower takes the key as secure=True: its secure-mode checks refuse krum
    # before anything starts (a plaintext run would accept krum)
    config = load_config(None, ["engine=flower", "server.secure_aggregation=true", "server.aggregator=krum",
                                "data.dataset=digits"])
    with pytest.raises(ConfigError, match=r"^config key 'server.aggregator': 'krum' cannot run with secure"):
        run_flower(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_integer_share_settings_no_round_can_meet_are_refused_before_flower_starts(tmp_path):
    """secure-num-shares / secure-reconstruction-threshold as integers above what a round of
    server.clients_per_round clients can give: SecAgg+ would halt every round (all clients logged as
    dropped, the model never trained). Refused in one line, naming the key, before Flower starts."""
    from fedgma.config import ConfigError
    from fedgma.flower.launch import run_flower
    from fedgma.flower.run_config import SecureSettings

    SecureSettings(num_shares=4, reconstruction_threshold=3).check_clients_per_round(4)
    SecureSettings(reconstruction_threshold=3).check_clients_per_round(4)  # 1.0 of 4 clients: 4 shares
    SecureSettings(num_shares=0.5, reconstruction_threshold=3).check_clients_per_round(10)  # 5 shares
    cases = {
        "'secure-num-shares': 5 shares but server.clients_per_round = 4": SecureSettings(num_shares=5),
        "'secure-reconstruction-threshold': 10 shares needed but a round of 4 clients shares each secret 4 "
        "times": SecureSettings(reconstruction_threshold=10),
        "'secure-reconstruction-threshold': 5 shares needed but a round of 10 clients shares each secret 3 "
        "times": SecureSettings(num_shares=0.25, reconstruction_threshold=5),  # round(2.5) = 2, odd: 3
    }
    for message, settings in cases.items():
        with pytest.raises(ConfigError, match=message) as error:
            settings.check_clients_per_round(10 if settings.num_shares == 0.25 else 4)
        assert "\n" not in str(error.value)
    config = _app_config()  # 4 clients per round
    with pytest.raises(ConfigError, match="'secure-reconstruction-threshold': 10 shares needed"):
        run_flower(config, tmp_path / "run", progress=False, secure=SecureSettings(reconstruction_threshold=10))
    assert not (tmp_path / "run" / "flower.log").exists()  # refused before Flower started


def test_an_update_bound_far_above_the_updates_is_warned_about(caplog):
    """B = 1e300: every (n_k/W)·Δ/B is below float64's resolution next to 1, the secure sum of the updates
    is exactly zero and the model would silently never move; SecureGMA warns, naming update_bound, and
    reports the round's quantization error bound. A sensible B does not warn."""
    import logging

    theta = initial()
    deltas = [client_update(p, 3) for p in range(3)]
    q = quantization_range_for(3)
    for bound, warned in ((1e300, True), (0.5, False)):
        strategy = SecureGMA(update_bound=bound, max_examples=512, max_clients=3,
                             initial_parameters=ndarrays_to_parameters(theta))
        xs = [encode_update(theta, [t + d for t, d in zip(theta, delta, strict=True)], 300, bound, 512, False)
              for delta in deltas]
        strategy._global = theta
        results = [(None, type("R", (), {"parameters": ndarrays_to_parameters(flower_secure_mean(xs, q)),
                                         "num_examples": 1, "metrics": {}})())] * 3
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="flwr"):
            _, metrics = strategy.aggregate_fit(1, results, [])
        assert metrics["secure-update-error-bound"] == update_error_bound(bound, 512, 3, 900, q)
        assert ("update_bound = 1e+300 is too large" in caplog.text) is warned, caplog.text
        if warned:
            assert strategy.last_round["aggregate"].abs().max().item() == 0.0


def test_a_malformed_secure_sum_skips_the_round_instead_of_stopping_the_server():
    from flwr.common import Code, FitRes, Status

    strategy = SecureGMA(threshold=0.4, initial_parameters=ndarrays_to_parameters(initial()))
    strategy._global = initial()  # what configure_fit keeps: the round's global model
    strategy._sampled = 5
    # a weight entry that is not a multiple of 1/W: decoded Σ n_k is not an integer (one client's malformed vector)
    bad = [np.zeros_like(a) for a in initial()] * 2 + [np.array([0.30001, 0.0])]
    result = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(bad), 1, {})
    assert strategy.aggregate_fit(1, [(None, result)] * 5, []) == (None, {})
    assert "not a positive integer" in strategy.last_round["invalid_sum"]


def test_fedgma_app_logs_a_halted_secure_round_as_skipped_without_blaming_the_survivors(tmp_path):
    """fedgma's app with secure aggregation, 5 SuperNodes, 4 per round, reconstruction threshold 3: in round 2
    the sampled clients among partitions 0-2 drop out in SecAgg+'s masked-vector stage, leaving at most 2,
    too few to unmask. The round is logged as skipped, with no aggregate, and every sent client as lost with
    the halt as the reason (the survivors did not drop out); the model is unchanged and round 3 runs."""
    import json

    from flower_sim import simulate
    from flwr.clientapp import ClientApp
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
    from flwr.serverapp import ServerApp

    from fedgma.flower.client_app import client_app
    from fedgma.flower.run_config import SecureSettings
    from fedgma.flower.server_app import serve

    dropping = ClientApp()

    @dropping.train()
    def _train(msg, context):
        stage = msg.content.config_records.get(RECORD_KEY_CONFIGS, {}).get(Key.STAGE)
        if (stage == Stage.COLLECT_MASKED_VECTORS and msg.metadata.group_id == "2"
                and int(context.node_config["partition-id"]) in (0, 1, 2)):
            raise RuntimeError("drops out before sending its masked vector")
        return client_app(msg, context)

    dropping.query()(client_app)
    dropping.evaluate()(client_app)
    out = tmp_path / "halted"
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context):
        settings = SecureSettings(update_bound=1.0, num_shares=4, reconstruction_threshold=3)
        serve(grid, _app_config(), out, secure=settings)

    simulate(server_app, dropping, num_supernodes=5)
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r.get("skipped", False) for r in rounds] == [False, True, False]
    halted = rounds[1]
    assert halted["aggregated"] == [] and halted["update_norm"] == 0.0 and "mask_density" not in halted
    assert sorted(map(int, halted["lost"])) == sorted(halted["clients"])
    assert set(halted["lost"].values()) == {"not in a secure sum: SecAgg+ halted the round (too few clients left "
                                            "to unmask it)"}
    assert sum(c in (0, 1, 2) for c in halted["clients"]) >= 2  # the drop-outs did leave fewer than 3
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[1]["test_accuracy"] == metrics[0]["test_accuracy"]  # round 2 left the model as it was
    assert (out / "summary.json").is_file()
