"""build_federated: every partitioner and domain kind from a config, held-out domains and clients, loader options."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedgma.config import ConfigError, load_config
from fedgma.data import DatasetError, load_dataset
from fedgma.data import partition as P
from fedgma.data.federated import build_federated, hold_out_validation
from fedgma.seeding import seed_sequence

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not installed")


def data_config(*overrides: str):
    base = ["data.dataset=digits", "data.num_clients=6", "server.clients_per_round=2"]
    return load_config(None, [*base, *overrides]).data


def rows(x: torch.Tensor) -> list[bytes]:
    """Every record as bytes, sorted: equal lists mean the same multiset of records."""
    return sorted(r.numpy().tobytes() for r in x.reshape(len(x), -1))


DIGITS = load_dataset("digits")

PARTITIONS = [
    ("iid", []),
    ("dirichlet", ["data.partition.alpha=0.3"]),
    ("shards", ["data.partition.classes_per_client=2"]),
    ("quantity", ["data.partition.beta=0.5"]),
    ("quantity", ["data.partition.sigma=1.0"]),
    ("quantity-label", ["data.partition.alpha=0.5", "data.partition.beta=0.5"]),
]


@pytest.mark.parametrize(("name", "extra"), PARTITIONS, ids=[f"{n}-{'-'.join(e)}" for n, e in PARTITIONS])
def test_every_partition_covers_the_training_set_exactly(name, extra):
    data = build_federated(data_config(f"data.partition={name}", *extra), seed=3)
    assert data.num_clients == 6
    x = torch.cat([c.x for c in data.clients])
    y = torch.cat([c.y for c in data.clients])
    assert len(x) == len(DIGITS.train)
    assert rows(x) == rows(DIGITS.train.x)  # every record once, none invented
    assert torch.equal(torch.bincount(y, minlength=10), torch.bincount(DIGITS.train.y, minlength=10))
    stats = data.statistics
    assert stats["partition"] == name and stats["num_clients"] == 6
    assert stats["sizes"] == [len(c) for c in data.clients]
    assert np.array_equal(np.asarray(stats["label_counts"]).sum(axis=1), stats["sizes"])
    assert {"mean_entropy", "size_cv", "num_classes", "test_size"} <= set(stats)
    assert torch.equal(data.test.x, DIGITS.test.x)  # no domains: the plain test set
    assert data.extra_tests == {} and data.holdout_clients == []


def test_partition_follows_the_seed():
    a = build_federated(data_config("data.partition=dirichlet"), seed=0)
    b = build_federated(data_config("data.partition=dirichlet"), seed=0)
    c = build_federated(data_config("data.partition=dirichlet"), seed=1)
    assert a.statistics["label_counts"] == b.statistics["label_counts"]
    assert all(torch.equal(u.x, v.x) for u, v in zip(a.clients, b.clients, strict=True))
    assert a.statistics["label_counts"] != c.statistics["label_counts"]


def test_shards_give_each_client_exactly_k_classes():
    data = build_federated(data_config("data.partition=shards", "data.partition.classes_per_client=3"), seed=0)
    assert all(int((np.asarray(row) > 0).sum()) == 3 for row in data.statistics["label_counts"])


def test_quantity_needs_beta_or_sigma():
    with pytest.raises(ConfigError, match=r"partitioner 'quantity' option 'sigma': give exactly one of beta"):
        data_config("data.partition=quantity")
    with pytest.raises(ConfigError, match="exactly one"):
        data_config("data.partition=quantity-label", "data.partition.beta=0.5", "data.partition.sigma=1")


# ---------------------------------------------------------------- feature skew


def test_rotation_domains_transform_clients_and_the_in_distribution_test_set():
    cfg = data_config(
        "data.partition=iid", "data.num_clients=4", "data.domains.kind=rotation",
        "data.domains.train=[0, 90]", "data.domains.test=[180, 45]",
    )
    data = build_federated(cfg, seed=0)
    assert data.statistics["domain_of_client"] == ["rot0", "rot0", "rot90", "rot90"]  # contiguous groups
    parts = P.iid(len(DIGITS.train), 4, seed_sequence(0, "partition"))  # the documented partition stream
    for client, part in zip(data.clients, parts, strict=True):
        assert len(client) == len(part)
    assert torch.equal(data.clients[0].x, DIGITS.train.x[torch.as_tensor(parts[0])])
    assert torch.equal(data.clients[3].x, torch.rot90(DIGITS.train.x[torch.as_tensor(parts[3])], 1, dims=(2, 3)))
    # test_accuracy is in-distribution: every test record is the original or its 90° rotation, in proportion
    plain = (data.test.x == DIGITS.test.x).flatten(1).all(1)
    turned = (data.test.x == torch.rot90(DIGITS.test.x, 1, dims=(2, 3))).flatten(1).all(1)
    assert bool((plain | turned).all())
    share_rot90 = (len(parts[2]) + len(parts[3])) / len(DIGITS.train)
    assert abs(float((turned & ~plain).sum()) - share_rot90 * len(DIGITS.test)) <= 1 + float((plain & turned).sum())
    assert torch.equal(data.test.y, DIGITS.test.y)
    # held-out domains: the whole test set, in the order given
    assert list(data.extra_tests) == ["ood/rot180", "ood/rot45"]
    assert torch.equal(data.extra_tests["ood/rot180"].x, torch.rot90(DIGITS.test.x, 2, dims=(2, 3)))
    assert data.statistics["test_domains"] == ["rot180", "rot45"]
    assert data.statistics["extra_test_sizes"] == {"ood/rot180": len(DIGITS.test), "ood/rot45": len(DIGITS.test)}


def test_noise_feature_skew_follows_niid_bench_levels():
    cfg = data_config("data.partition=iid", "data.num_clients=5", "data.domains.kind=noise",
                      "data.domains.sigma=2.0", "data.domains.test=[3.0]")
    data = build_federated(cfg, seed=0)
    parts = P.iid(len(DIGITS.train), 5, seed_sequence(0, "partition"))
    for i, (client, part) in enumerate(zip(data.clients, parts, strict=True)):
        noise = client.x - DIGITS.train.x[torch.as_tensor(part)]
        assert float(noise.std()) == pytest.approx(2.0 * i / 5, abs=0.03)  # client i of N: σ·i/N
    assert data.statistics["domain_of_client"] == ["noise0", "noise0.4", "noise0.8", "noise1.2", "noise1.6"]
    ood = data.extra_tests["ood/noise3"]
    assert float((ood.x - DIGITS.test.x).std()) == pytest.approx(3.0, rel=0.02)


def test_tint_domains_make_every_set_three_channel():
    cfg = data_config("data.partition=iid", "data.num_clients=4", "data.domains.kind=tint",
                      "data.domains.train=[[1, 0, 0], [0, 1, 0]]", "data.domains.test=[[0, 0, 1]]",
                      "data.domains.assignment=round_robin")
    data = build_federated(cfg, seed=0)
    assert data.statistics["domain_of_client"] == ["tint1-0-0", "tint0-1-0", "tint1-0-0", "tint0-1-0"]
    assert data.input_shape == (3, 8, 8)
    assert all(c.x.shape[1] == 3 for c in data.clients)
    blue = data.extra_tests["ood/tint0-0-1"].x
    assert blue.shape[1] == 3 and torch.allclose(blue[:, 0], blue[:, 1])  # red = green = background


def test_contrast_brightness_and_custom_domains():
    for kind, values, names in [
        ("contrast", "[1.0, 0.5]", ["contrast1", "contrast0.5"]),
        ("brightness", "[0.0, 0.5]", ["bright0", "bright0.5"]),
        ("custom", "[{name = 'plain'}, {rotation = 90, noise = 0.1}]", ["plain", "rotation90_noise0.1"]),
    ]:
        cfg = data_config("data.partition=iid", "data.num_clients=2", f"data.domains.kind={kind}",
                          f"data.domains.train={values}")
        data = build_federated(cfg, seed=0)
        assert data.statistics["domains"] == names
        assert not torch.equal(data.clients[1].x, DIGITS.train.x[: len(data.clients[1])])
    bright = build_federated(data_config("data.partition=iid", "data.num_clients=2", "data.domains.kind=brightness",
                                         "data.domains.train=[0.0, 0.5]"), seed=0)
    parts = P.iid(len(DIGITS.train), 2, seed_sequence(0, "partition"))
    assert torch.allclose(bright.clients[1].x, DIGITS.train.x[torch.as_tensor(parts[1])] + 0.5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.domains.kind=rotation"], "needs a list of training domains"),
        (["data.domains.train=[0, 90]"], "set kind"),
        (["data.domains.kind=rotation", "data.domains.train=['x']"], r"data.domains.train\[0\]: a rotation domain"),
        (["data.domains.kind=tint", "data.domains.train=[[1, 0]]"], r"three numbers \[r, g, b\]"),
        (["data.domains.kind=rotation", "data.domains.train=[0]", "data.domains.test=[90, 90]"], "distinct names"),
        (["data.domains.kind=custom", "data.domains.train=[{spin = 3}]"], "unknown domain field.*spin"),
        (["data.domains.kind=rotation", "data.domains.sigma=1"], "sigma"),
        (["data.domains.kind=wobble"], "data.domains.kind"),
    ],
)
def test_bad_domain_configs_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        data_config(*overrides)


def test_domains_need_images_and_enough_clients():
    with pytest.raises(ValueError, match=r"\[data.domains\].*images"):
        build_federated(data_config("data.dataset=synthetic", "data.partition=natural", "data.num_clients=5",
                                    "data.domains.kind=rotation", "data.domains.train=[0]"), seed=0)
    with pytest.raises(ValueError, match="3 domains for 2 clients"):
        build_federated(data_config("data.num_clients=2", "data.domains.kind=rotation",
                                    "data.domains.train=[0, 15, 30]"), seed=0)


# ---------------------------------------------------------------- held-out clients


def test_holdout_clients_never_train_and_cover_the_rest():
    data = build_federated(data_config("data.partition=dirichlet", "data.holdout_clients=3"), seed=0)
    assert data.num_clients == 6 and len(data.holdout_clients) == 3
    x = torch.cat([c.x for c in data.clients + data.holdout_clients])
    assert rows(x) == rows(DIGITS.train.x)
    holdout = data.statistics["holdout"]
    assert len(holdout["clients"]) == 3 and all(0 <= c < 9 for c in holdout["clients"])
    assert holdout["sizes"] == [len(c) for c in data.holdout_clients]
    assert sum(data.statistics["sizes"]) + sum(holdout["sizes"]) == len(DIGITS.train)
    kept = hold_out_validation(data, 0.1, seed=0)  # validation keeps held-out clients and extra tests
    assert kept.holdout_clients == data.holdout_clients and "validation" in kept.extra_tests


# ---------------------------------------------------------------- natural partitions and loader options


def test_natural_partition_of_synthetic_uses_its_clients():
    cfg = data_config("data.dataset=synthetic", "data.partition=natural", "data.num_clients=8",
                      "data.holdout_clients=2", "data.dataset.alpha=0.5", "data.dataset.beta=0.5")
    data = build_federated(cfg, seed=0)
    splits = load_dataset("synthetic", alpha=0.5, beta=0.5, num_clients=10)  # num_clients comes from the config
    assert data.num_clients == 8 and len(data.holdout_clients) == 2
    held = data.statistics["holdout"]["clients"]
    training = [i for i in range(10) if i not in held]
    assert data.statistics["client_ids"] == training
    for client, k in zip(data.clients, training, strict=True):
        assert torch.equal(client.x, splits.train.x[torch.as_tensor(splits.train_client_ids == k)])
    for client, k in zip(data.holdout_clients, held, strict=True):  # a held-out client's train and test records
        own = int((splits.train_client_ids == k).sum() + (splits.test_client_ids == k).sum())
        assert len(client) == own
    assert torch.equal(data.test.x, splits.test.x)


def test_natural_partition_errors():
    with pytest.raises(ValueError, match="has 10 natural clients.*set data.num_clients = 8"):
        build_federated(data_config("data.dataset=synthetic", "data.partition=natural", "data.num_clients=6",
                                    "data.holdout_clients=2", "data.dataset.num_clients=10"), seed=0)
    with pytest.raises(ValueError, match="'natural' needs a dataset with client ids.*'digits' has none"):
        build_federated(data_config("data.partition=natural"), seed=0)


def test_natural_partition_of_a_user_csv(tmp_path):
    rng = np.random.default_rng(0)
    lines = ["f1,f2,label,hospital"]
    for i in range(60):
        lines.append(f"{rng.normal():.4f},{rng.normal():.4f},{i % 3},{['a', 'b', 'c', 'd'][i % 4]}")
    (tmp_path / "records.csv").write_text("\n".join(lines) + "\n")
    cfg = data_config("data.dataset=csv", "data.partition=natural", "data.num_clients=4",
                      f"data.dataset.path='{tmp_path / 'records.csv'}'", "data.dataset.client_column=hospital",
                      "data.dataset.test_fraction=0.2")
    data = build_federated(cfg, seed=0)
    assert data.statistics["client_ids"] == ["a", "b", "c", "d"]
    assert data.statistics["sizes"] == [12, 12, 12, 12]  # 15 records each, 20% held out per client
    assert data.input_shape == (2,) and data.num_classes == 3


def test_loader_option_errors_name_the_option():
    with pytest.raises(ConfigError, match=r"dataset 'synthetic' has no option 'alph' \(did you mean 'alpha'\?\)"):
        data_config("data.dataset=synthetic", "data.dataset.alph=0.5")
    with pytest.raises(ConfigError, match=r"dataset 'digits' has no option 'path'; it takes: test_fraction, seed"):
        data_config("data.dataset.path='x.csv'")
    with pytest.raises(ConfigError, match=r"dataset 'fashion-mnist' has no option 'downsample'; it takes: no options"):
        load_config(None, ["data.dataset=fashion-mnist", "data.dataset.downsample=2"])
    with pytest.raises(ConfigError, match=r"dataset 'synthetic' option 'alpha': .*greater than or equal to 0"):
        data_config("data.dataset=synthetic", "data.dataset.alpha=-1")
    with pytest.raises(DatasetError, match="csv: file .*missing.csv not found"):
        build_federated(data_config("data.dataset=csv", "data.dataset.path='missing.csv'"), seed=0)


def test_options_override_from_the_command_line(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[data]\ndataset = 'synthetic'\npartition = 'natural'\nnum_clients = 5\n"
                    "[data.options]\nalpha = 1.0\n[server]\nclients_per_round = 2\n")  # the earlier shape, upgraded
    config = load_config(path, ["data.dataset.beta=0.25"])
    assert config.data.dataset.name == "synthetic"
    assert (config.data.dataset.options["alpha"], config.data.dataset.options["beta"]) == (1.0, 0.25)


def test_subsets_are_fixed_and_follow_client_ids():
    a = build_federated(data_config("data.partition=iid", "data.train_subset=300", "data.test_subset=100"), seed=0)
    b = build_federated(data_config("data.partition=iid", "data.train_subset=300", "data.test_subset=100"), seed=5)
    assert sum(len(c) for c in a.clients) == 300 and len(a.test) == 100
    assert rows(torch.cat([c.x for c in a.clients])) == rows(torch.cat([c.x for c in b.clients]))  # same records
    syn = build_federated(data_config("data.dataset=synthetic", "data.partition=natural", "data.num_clients=5",
                                      "data.train_subset=200"), seed=0)
    assert sum(len(c) for c in syn.clients) == 200


# ---------------------------------------------------------------- Colored Fashion-MNIST


def colour_agreement(data) -> float:
    colour = (data.x[:, 1].sum(dim=(1, 2)) > data.x[:, 0].sum(dim=(1, 2))).long()
    return float((colour == data.y).float().mean())


@needs_fashion
def test_colored_environments_test_in_and_out_of_distribution():
    cfg = data_config("data.dataset=colored-fashion-mnist", "data.partition=natural", "data.num_clients=4",
                      "data.dataset.train_probabilities=[0.9, 0.7]", "data.dataset.clients_per_environment=2",
                      "data.dataset.downsample=2", "data.train_subset=8000", "data.test_subset=4000")
    data = build_federated(cfg, seed=0)
    assert data.num_clients == 4 and data.input_shape == (2, 14, 14) and data.num_classes == 2
    assert [round(colour_agreement(c), 1) for c in data.clients] == [0.9, 0.9, 0.7, 0.7]
    reversed_env = data.extra_tests["ood/env0.1"]
    assert colour_agreement(reversed_env) == pytest.approx(0.1, abs=0.02)
    p_id = data.statistics["colour_agreement"]["train_mixture"]
    assert p_id == pytest.approx(0.8, abs=0.01)
    assert colour_agreement(data.test) == pytest.approx(p_id, abs=0.02)  # in-distribution: the training mixture
    # the same images and labels, only the colours differ
    assert torch.equal(data.test.y, reversed_env.y)
    assert torch.equal(data.test.x.sum(dim=1), reversed_env.x.sum(dim=1))


# ---------------------------------------------------------------- issue 13: no evaluation over zero records


def test_a_csv_with_test_fraction_zero_is_refused_at_build_time(tmp_path):
    (tmp_path / "r.csv").write_text("a,label\n" + "".join(f"{i},{i % 2}\n" for i in range(20)))
    cfg = data_config("data.dataset=csv", f"data.dataset.path='{tmp_path / 'r.csv'}'", "data.dataset.test_fraction=0",
                      "data.num_clients=2")
    with pytest.raises(DatasetError) as error:
        build_federated(cfg, seed=0)
    assert str(error.value) == (
        f"{tmp_path / 'r.csv'}: test_fraction = 0 holds out no test records; set data.dataset.test_fraction > 0 "
        "(e.g. 0.2) or give a separate test set"
    )


def test_every_evaluation_set_must_hold_records(monkeypatch):
    import dataclasses

    from fedgma.data import federated

    empty_test = dataclasses.replace(DIGITS, test=DIGITS.test.subset(np.array([], dtype=np.int64)))
    monkeypatch.setattr(federated, "load_cached", lambda *args: empty_test)
    with pytest.raises(ValueError) as error:
        build_federated(data_config(), seed=0)
    assert str(error.value) == (
        "config key 'data.dataset': data set 'digits' has no test records, so test accuracy and loss would be "
        "computed over nothing; give it test records (a user file: data.dataset.test_fraction > 0, or a test file "
        "or x_test with records)"
    )


def test_a_validation_fraction_that_takes_nothing_is_refused():
    data = build_federated(data_config("data.partition=iid", "data.train_subset=24"), seed=0)  # 6 clients of 4
    assert [len(c) for c in data.clients] == [4] * 6
    with pytest.raises(ValueError) as error:
        hold_out_validation(data, 0.1, seed=0)
    assert str(error.value) == (
        "data.validation_fraction = 0.1 takes no record from any client (round(fraction × size) is 0 for every "
        "client; the largest holds 4), so validation would be computed over nothing; raise it to 0.126 or more, "
        "or set it to 0"
    )
    assert len(hold_out_validation(data, 0.126, seed=0).extra_tests["validation"]) == 6


def test_the_empty_client_hint_names_only_the_partitioners_options():
    with pytest.raises(ValueError) as error:
        build_federated(data_config("data.partition=iid", "data.train_subset=5"), seed=0)  # 6 clients, 5 records
    assert str(error.value) == (
        "partition 'iid' left 1 client(s) with no data (e.g. client 5); lower data.num_clients (now 6, for 5 "
        "training records)"
    )
    with pytest.raises(ValueError, match=r"^shards: class \d has \d record\(s\) but \d+ of the 30 clients") as error:
        build_federated(data_config("data.partition=shards", "data.num_clients=30", "data.train_subset=40",
                                    "data.partition.classes_per_client=1"), seed=0)
    assert "min_size" not in str(error.value)
