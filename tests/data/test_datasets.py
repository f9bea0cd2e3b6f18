"""Loaders on small generated files: shapes, normalisation, natural client ids, and clear errors."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fedgma.data import DatasetError, load_dataset
from fedgma.data.cifar import read_cifar_batch
from fedgma.data.datasets import available_datasets
from fedgma.data.idx import read_idx
from fedgma.data.partition import natural

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def test_registry_lists_every_loader():
    assert {"mnist", "fashion-mnist", "digits", "cifar10", "cifar100", "synthetic", "femnist", "npz", "csv"} <= set(
        available_datasets()
    )
    with pytest.raises(DatasetError, match="unknown dataset 'nope'"):
        load_dataset("nope")
    with pytest.raises(DatasetError, match=r"dataset 'synthetic' has no option 'alpah' \(did you mean 'alpha'\?\)"):
        load_dataset("synthetic", alpah=0.5)


# ---------------------------------------------------------------- IDX (MNIST)


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_from_generated_idx(tmp_path, files, compress):
    directory = files.idx_set(tmp_path / "m", compress=compress)
    splits = load_dataset("mnist", data_dir=str(directory))
    assert splits.train.x.shape == (30, 1, 28, 28) and splits.test.x.shape == (10, 1, 28, 28)
    assert splits.train.x.dtype == torch.float32 and splits.num_classes == 10
    assert splits.train.y.tolist() == [i % 10 for i in range(30)]
    raw = read_idx(next(directory.glob("train-images*")))
    assert torch.allclose(splits.train.x[:, 0], (torch.from_numpy(raw.copy()).float() / 255 - 0.1307) / 0.3081)


def test_mnist_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetError, match=r"mnist not found \(looked in .*\); pass data.data_dir"):
        load_dataset("mnist", data_dir=str(tmp_path))


def test_idx_truncated_file_names_the_file(idx_dir):
    path = idx_dir / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.gz is truncated or corrupt"):
        load_dataset("mnist", data_dir=str(idx_dir))
    path.write_bytes(path.read_bytes()[:40])  # a cut gzip stream
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz"):
        load_dataset("mnist", data_dir=str(idx_dir))
    path.write_bytes(b"not an idx file")
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz"):
        load_dataset("mnist", data_dir=str(idx_dir))


def test_idx_bad_labels(tmp_path, files):
    directory = files.idx_set(tmp_path / "m")
    files.idx(directory / "train-labels-idx1-ubyte", np.full(30, 11))
    with pytest.raises(DatasetError, match=r"labels must lie in \[0, 9\], found a 11"):
        load_dataset("mnist", data_dir=str(directory))
    files.idx(directory / "train-labels-idx1-ubyte", np.zeros(29))
    with pytest.raises(DatasetError, match="expected \\[N, H, W\\] images and N labels"):
        load_dataset("mnist", data_dir=str(directory))


@pytest.mark.skipif(not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST not installed")
def test_fashion_mnist_real_files():
    splits = load_dataset("fashion-mnist")
    assert splits.train.x.shape == (60000, 1, 28, 28) and splits.test.x.shape == (10000, 1, 28, 28)
    assert abs(float(splits.train.x.mean())) < 0.01 and abs(float(splits.train.x.std()) - 1) < 0.01
    assert np.bincount(splits.train.y.numpy()).tolist() == [6000] * 10


def test_colored_mnist_loader(idx_dir):
    splits = load_dataset("colored-mnist", data_dir=str(idx_dir), clients_per_environment=2, seed=1)
    assert splits.num_classes == 2 and splits.train.x.shape == (30, 2, 28, 28)
    assert sorted(set(splits.train_client_ids.tolist())) == [0, 1, 2, 3]
    assert splits.metadata["test_probability"] == 0.1


# ---------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("as_tar", [False, True])
def test_cifar10_from_folder_or_tarball(tmp_path, files, as_tar):
    directory = files.cifar(tmp_path / "c", "cifar10", per_file=4, as_tar=as_tar)
    splits = load_dataset("cifar10", data_dir=str(directory))
    assert splits.train.x.shape == (20, 3, 32, 32) and splits.test.x.shape == (4, 3, 32, 32)
    assert splits.num_classes == 10
    data = pickle.loads(files.cifar_batch(4, 10, "labels", 0, bytes_keys=True))[b"data"]
    first = torch.from_numpy(data.reshape(-1, 3, 32, 32)).float() / 255
    mean, std = torch.tensor(splits.metadata["mean"]), torch.tensor(splits.metadata["std"])
    expected = (first - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    assert torch.allclose(splits.train.x[:4], expected, atol=1e-6)


def test_cifar_data_dir_may_be_the_batches_folder(tmp_path, files):
    directory = files.cifar(tmp_path / "c", "cifar10")
    splits = load_dataset("cifar10", data_dir=str(directory / "cifar-10-batches-py"))
    assert len(splits.train) == 20


def test_cifar100_fine_labels(tmp_path, files):
    splits = load_dataset("cifar100", data_dir=str(files.cifar(tmp_path / "c", "cifar100", per_file=120)))
    assert splits.num_classes == 100 and splits.train.y.max() == 99 and splits.train.x.shape == (120, 3, 32, 32)


def test_cifar_missing(tmp_path):
    with pytest.raises(DatasetError, match=r"cifar10 not found .*cifar-10-python.tar.gz.*data.download = true"):
        load_dataset("cifar10", data_dir=str(tmp_path))


def test_cifar_truncated_batch_names_the_file(tmp_path, files):
    directory = files.cifar(tmp_path / "c", "cifar10")
    batch = directory / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:1000])
    with pytest.raises(DatasetError, match=r"data_batch_3 is truncated or corrupt"):
        load_dataset("cifar10", data_dir=str(directory))


def test_cifar_corrupt_tarball(tmp_path, files):
    directory = files.cifar(tmp_path / "c", "cifar10", as_tar=True)
    tarball = directory / "cifar-10-python.tar.gz"
    tarball.write_bytes(tarball.read_bytes()[:300])
    with pytest.raises(DatasetError, match=r"cifar-10-python.tar.gz"):
        load_dataset("cifar10", data_dir=str(directory))


def test_cifar_batch_refuses_code_and_bad_content():
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(DatasetError, match="refusing to load"):
        read_cifar_batch(pickle.dumps({"data": Exploit()}), "evil", "labels", 10)
    bad_labels = pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 12]})
    with pytest.raises(DatasetError, match=r"labels must lie in \[0, 9\]"):
        read_cifar_batch(bad_labels, "batch", "labels", 10)
    bad_shape = pickle.dumps({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]})
    with pytest.raises(DatasetError, match=r"uint8 \[N, 3072\]"):
        read_cifar_batch(bad_shape, "batch", "labels", 10)
    with pytest.raises(DatasetError, match="needs keys"):
        read_cifar_batch(pickle.dumps({"data": np.zeros((2, 3072), np.uint8)}), "batch", "labels", 10)


# ---------------------------------------------------------------- Synthetic(α, β)


def test_synthetic_is_seeded_and_naturally_partitioned():
    a = load_dataset("synthetic", alpha=0.5, beta=0.5, num_clients=10, seed=3)
    b = load_dataset("synthetic", alpha=0.5, beta=0.5, num_clients=10, seed=3)
    c = load_dataset("synthetic", alpha=0.5, beta=0.5, num_clients=10, seed=4)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.train.y, b.train.y)
    assert not torch.equal(a.train.y[:50], c.train.y[:50]) or a.train.x.shape != c.train.x.shape
    assert a.train.x.shape[1] == 60 and a.num_classes == 10
    parts, ids = natural(a.train_client_ids)
    assert ids.tolist() == list(range(10))
    sizes = np.asarray(a.metadata["sizes"])
    assert (sizes >= 50).all()
    assert [len(p) for p in parts] == [int(0.9 * s) for s in sizes]
    assert np.bincount(a.test_client_ids, minlength=10).tolist() == [s - int(0.9 * s) for s in sizes]


def test_synthetic_heterogeneity_follows_alpha_beta():
    def spread(**options):
        splits = load_dataset("synthetic", num_clients=20, seed=0, **options)
        ids = splits.train_client_ids
        means = np.stack([splits.train.x[ids == k].mean(0).numpy() for k in range(20)])
        return means.std(0).mean()

    assert spread(alpha=0.0, beta=0.0, iid=True) < 0.2 < spread(alpha=1.0, beta=1.0)


def test_synthetic_bad_options():
    with pytest.raises(DatasetError, match="alpha"):
        load_dataset("synthetic", alpha=-1)
    with pytest.raises(DatasetError, match="num_clients"):
        load_dataset("synthetic", num_clients=0)


# ---------------------------------------------------------------- user files: npz


def test_npz_with_client_ids_and_held_out_split(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    np.savez(path, x=rng.random((100, 4)), y=rng.integers(0, 3, 100), client_id=np.repeat(np.arange(5), 20))
    splits = load_dataset("npz", path=str(path), test_fraction=0.2, seed=1)
    assert len(splits.train) == 80 and len(splits.test) == 20 and splits.num_classes == 3
    assert np.bincount(splits.test_client_ids).tolist() == [4] * 5  # held out per client
    again = load_dataset("file", path=str(path), test_fraction=0.2, seed=1)
    assert torch.equal(again.test.x, splits.test.x)


def test_npz_separate_test_arrays_and_relative_path(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((6, 2, 2)), y=[0, 1, 2, 0, 1, 2], x_test=np.ones((2, 2, 2)), y_test=[1, 1])
    splits = load_dataset("npz", data_dir=str(tmp_path), path="d.npz", num_classes=5)
    assert splits.train.x.shape == (6, 2, 2) and splits.test.y.tolist() == [1, 1] and splits.num_classes == 5
    assert splits.train_client_ids is None


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((3, 2))}, "lacks array.*y"),
        ({"x": np.zeros((3, 2)), "y": [0.5, 1, 2]}, r"y record 0 is 0.5, not an integer class label"),
        ({"x": np.zeros((3, 2)), "y": [0, -1, 2]}, r"y record 1 is -1; labels must be class indices in \[0, 100000\)"),
        ({"x": np.zeros((3, 2)), "y": [0, 1]}, "must be 3 labels"),
        ({"x": np.array([[0, np.nan], [1, 1], [2, 2]]), "y": [0, 1, 2]}, "non-finite"),
        ({"x": np.zeros(3), "y": [0, 1, 2]}, r"\[N, features...\]"),
        ({"x": np.zeros((3, 2)), "y": [0, 1, 2], "x_test": np.zeros((1, 2))}, "both x_test and y_test"),
        ({"x": np.zeros((3, 2)), "y": [0, 1, 7]}, r"labels must lie in \[0, 2\]"),
    ],
)
def test_npz_bad_contents(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DatasetError, match=message):
        load_dataset("npz", path=str(path), num_classes=3 if "7" in message or "2\\]" in message else None)


def test_npz_missing_and_corrupt(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_dataset("npz", path=str(tmp_path / "absent.npz"))
    with pytest.raises(DatasetError, match="dataset 'npz' option 'path': the file to load must be given"):
        load_dataset("npz")
    path = tmp_path / "cut.npz"
    np.savez(path, x=np.zeros((50, 50)), y=np.zeros(50, int))
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DatasetError, match="cut.npz is not a readable .npz"):
        load_dataset("npz", path=str(path))


# ---------------------------------------------------------------- user files: csv, parquet


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.write_text("\n".join(",".join(str(v) for v in row) for row in [header, *rows]) + "\n")
    return path


def test_csv_with_client_column_and_text_labels(tmp_path):
    rows = [[i * 0.1, i % 3, ["cat", "dog"][i % 2], f"site{i % 4}"] for i in range(40)]
    path = write_csv(tmp_path / "t.csv", ["f1", "f2", "animal", "hospital"], rows)
    splits = load_dataset("csv", path=str(path), label_column="animal", client_column="hospital", test_fraction=0.2)
    assert splits.metadata["classes"] == ["cat", "dog"] and splits.num_classes == 2
    assert splits.train.x.shape == (32, 2) and splits.metadata["features"] == ["f1", "f2"]
    parts, ids = natural(splits.train_client_ids)
    assert ids.tolist() == ["site0", "site1", "site2", "site3"]
    x_all = splits.train.x.numpy()
    assert np.allclose(sorted(np.concatenate([x_all[:, 0], splits.test.x[:, 0].numpy()])), [i * 0.1 for i in range(40)])


def test_csv_default_columns_and_test_path(tmp_path):
    write_csv(tmp_path / "train.csv", ["a", "b", "label", "client_id"], [[1, 2, 0, 7], [3, 4, 1, 8], [5, 6, 2, 7]])
    write_csv(tmp_path / "test.csv", ["a", "b", "label", "client_id"], [[0, 0, 1, 8]])
    splits = load_dataset("csv", data_dir=str(tmp_path), path="train.csv", test_path="test.csv")
    assert splits.train.x.tolist() == [[1, 2], [3, 4], [5, 6]] and splits.train.y.tolist() == [0, 1, 2]
    assert splits.train_client_ids.tolist() == ["7", "8", "7"] and splits.test_client_ids.tolist() == ["8"]


@pytest.mark.parametrize(
    ("text", "options", "message"),
    [
        ("a,label\n1,0\n2,x\n3,1\n", {"num_classes": 2}, r"labels must lie in \[0, 1\]"),
        ("a,label\n1,0\nq,1\n", {}, r"column 'a' line 3 is not a number: 'q'"),
        ("a,label\n1,0\n2\n", {}, r"line 3: 1 fields, the header has 2 \(a missing delimiter, or a truncated file\?\)"),
        ("a,b\n1,0\n", {}, r"no column 'label'; columns are a, b"),
        ("a,label\n1,0.5\n", {}, r"column 'label' line 2 is '0.5'; labels must be class indices in \[0, 100,000\)"),
        ("", {}, "is empty"),
    ],
)
def test_csv_errors(tmp_path, text, options, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DatasetError, match=message):
        load_dataset("csv", path=str(path), test_fraction=0.5, **options)


def test_parquet(tmp_path):
    path = tmp_path / "t.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path.write_bytes(b"PAR1")
        with pytest.raises(DatasetError, match="needs pyarrow.*fedgma\\[parquet\\]"):
            load_dataset("parquet", path=str(path))
        return
    pq.write_table(pa.table({"a": [1.0, 2.0, 3.0, 4.0], "label": [0, 1, 0, 1]}), path)
    splits = load_dataset("file", path=str(path), test_fraction=0.25)
    assert len(splits.train) == 3 and splits.num_classes == 2


def test_file_loader_rejects_unknown_types_and_options(tmp_path):
    (tmp_path / "x.txt").write_text("1")
    with pytest.raises(DatasetError, match="unknown file type '.txt'"):
        load_dataset("file", path=str(tmp_path / "x.txt"))
    write_csv(tmp_path / "t.csv", ["a", "label"], [[1, 0]])
    with pytest.raises(DatasetError, match="dataset 'file' has no option 'bogus'"):
        load_dataset("file", path=str(tmp_path / "t.csv"), bogus=1)
    np.savez(tmp_path / "t.npz", x=np.zeros((4, 2)), y=np.arange(4) % 2)
    with pytest.raises(DatasetError, match=r"\.npz files do not take option\(s\) delimiter, label_column"):
        load_dataset("file", path=str(tmp_path / "t.npz"), delimiter=";", label_column="y")


# ---------------------------------------------------------------- LEAF FEMNIST


def test_femnist_writers_are_clients(femnist_dir):
    splits = load_dataset("femnist", data_dir=str(femnist_dir))
    assert splits.num_classes == 62
    assert splits.train.x.shape == (15, 1, 28, 28) and splits.test.x.shape == (6, 1, 28, 28)
    parts, writers = natural(splits.train_client_ids)
    assert writers.tolist() == ["f0000_0", "f0001_1", "f0002_2"] and [len(p) for p in parts] == [5, 5, 5]
    assert sorted(set(splits.test_client_ids)) == writers.tolist()
    assert abs(float(splits.train.x.mean())) < 1e-4
    assert load_dataset("femnist", data_dir=str(femnist_dir.parent / "femnist")).train.x.shape[0] == 15


def test_femnist_leaf_layout_with_data_subfolder(tmp_path, files):
    files.femnist(tmp_path / "leaf" / "data", writers=2)
    assert len(load_dataset("femnist", data_dir=str(tmp_path / "leaf")).train) == 10


def test_femnist_errors(tmp_path, femnist_dir):
    with pytest.raises(DatasetError, match="no train/ and test/ folders.*preprocess.sh"):
        load_dataset("femnist", data_dir=str(tmp_path / "nothing"))
    with pytest.raises(DatasetError, match="cannot be downloaded"):
        load_dataset("femnist", data_dir=str(femnist_dir), download=True)
    train_file = next((femnist_dir / "train").glob("*.json"))
    content = json.loads(train_file.read_text())
    content["num_samples"][1] = 9
    train_file.write_text(json.dumps(content))
    with pytest.raises(DatasetError, match="user 'f0001_1' has num_samples 9 but 5 records"):
        load_dataset("femnist", data_dir=str(femnist_dir))
    train_file.write_text(json.dumps(content)[:500])
    with pytest.raises(DatasetError, match=f"{train_file.name} is not readable LEAF JSON"):
        load_dataset("femnist", data_dir=str(femnist_dir))
    content["num_samples"][1] = 5
    content["user_data"]["f0001_1"]["y"][0] = 70
    train_file.write_text(json.dumps(content))
    with pytest.raises(DatasetError, match=r"labels must lie in \[0, 61\], found 70"):
        load_dataset("femnist", data_dir=str(femnist_dir))


# ---------------------------------------------------------------- issue 13: user files through well-kept readers


def test_csv_spreadsheet_exports_read_like_plain_files(tmp_path):
    """A UTF-8 BOM, CRLF, quoted fields (a delimiter and a line break inside) and trailing blank lines all work."""
    path = tmp_path / "export.csv"
    path.write_bytes(
        b'\xef\xbb\xbff1,"f, 2",label,client_id\r\n1,"2",0,a\r\n3,4,"1",a\r\n5,6,0,"b"\r\n,,,\r\n7,8,1,b\r\n\r\n\r\n'
    )
    splits = load_dataset("csv", path=str(path), test_path=str(path))
    assert splits.metadata["features"] == ["f1", "f, 2"] and splits.metadata["client_column"] == "client_id"
    assert splits.train.x.tolist() == [[1, 2], [3, 4], [5, 6], [7, 8]] and splits.train.y.tolist() == [0, 1, 0, 1]
    assert splits.train_client_ids.tolist() == ["a", "a", "b", "b"] and len(splits.test) == 4
    quoted = tmp_path / "quoted.csv"
    quoted.write_text('note,a,label\n"two\nlines",1,0\nplain,2,1\n', newline="")
    splits = load_dataset("csv", path=str(quoted), feature_columns=["a"], test_path=str(quoted))
    assert splits.train.x.tolist() == [[1], [2]]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a,label\n1,0\n1e39,1\n", r"column 'a' line 3 is '1e39'; values must be finite numbers within ±1e\+15"),
        ("a,label\n1,0\nNaN,1\n", r"column 'a' line 3 is 'NaN'"),
        ("a,label\n1,0\n-Infinity,1\n", r"column 'a' line 3 is '-Infinity'"),
        ("a,label\n1,0\n2,1000000000\n", r"column 'label' line 3 is '1000000000'; labels must be class indices in "
         r"\[0, 100,000\)"),
        ("a,label\n1,0\n2,nan\n", r"column 'label' line 3 is 'nan'"),
        ("a,label\n1,0\n2,99\n", r"labels go up to 99 but there are only 4 records.*set num_classes = 100"),
        ("a,label,client_id\n1,0,x\n2,1,\n", r"client_id of record 1 is missing \(\); every record needs a client id"),
        ("label\n0\n1\n", r"no feature columns besides 'label'"),
        ("a,label\n", r"no training records \(a header-only or empty file\?\)"),
    ],
)
def test_csv_refuses_absurd_and_degenerate_values_naming_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DatasetError, match=f"^{re.escape(str(path))}: {message}"):
        load_dataset("csv", path=str(path), test_path=str(path))


def test_a_header_only_test_file_or_test_fraction_zero_is_refused(tmp_path):
    write_csv(tmp_path / "train.csv", ["a", "label"], [[1, 0], [2, 1], [3, 0], [4, 1]])
    write_csv(tmp_path / "test.csv", ["a", "label"], [])
    with pytest.raises(DatasetError) as error:
        load_dataset("csv", data_dir=str(tmp_path), path="train.csv", test_path="test.csv")
    assert str(error.value) == (
        f"{tmp_path / 'train.csv'}: the test set has no records; give test records (x_test / y_test, or a "
        "test_path file)"
    )
    with pytest.raises(DatasetError) as error:
        load_dataset("csv", data_dir=str(tmp_path), path="train.csv", test_fraction=0)
    assert str(error.value) == (
        f"{tmp_path / 'train.csv'}: test_fraction = 0 holds out no test records; set data.dataset.test_fraction > 0 "
        "(e.g. 0.2) or give a separate test set"
    )
    np.savez(tmp_path / "few.npz", x=np.zeros((8, 2)), y=np.arange(8) % 2, client_id=np.repeat(np.arange(4), 2))
    with pytest.raises(DatasetError, match=r"per client, round\(test_fraction × its records\) is 0"):
        load_dataset("npz", path=str(tmp_path / "few.npz"), test_fraction=0.2)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.array([[0, 1e39], [1, 1], [2, 2]]), "y": [0, 1, 2]},
         r"x record 0 has the value 1e\+39, beyond ±1e\+15"),
        ({"x": np.array([[0, 1], [1, np.inf], [2, 2]]), "y": [0, 1, 2]}, r"x record 1 has a non-finite value \(inf\)"),
        ({"x": np.zeros((3, 0)), "y": [0, 1, 2]}, r"x has shape \(3, 0\): records with no features"),
        ({"x": np.zeros((3, 2)) + 1j, "y": [0, 1, 2]}, r"x holds complex numbers \(dtype complex128\)"),
        ({"x": np.zeros((3, 2)), "y": [0, 1, 10**9]}, r"y record 2 is 1000000000; labels must be class indices"),
        ({"x": np.zeros((3, 2)), "y": [0, 1, 2], "client_id": [1.0, np.nan, 2.0]}, r"client_id of record 1 is missing"),
        ({"x": np.zeros((3, 2)), "y": [0, 1, 2], "x_test": np.zeros((1, 2)), "y_test": [np.nan]},
         r"y_test record 0 is nan, not an integer class label"),
    ],
)
def test_npz_refuses_absurd_and_degenerate_arrays(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DatasetError, match=f"^{re.escape(str(path))}: {message}"):
        load_dataset("npz", path=str(path), test_fraction=0.4)


def _npy(array: np.ndarray, shape: tuple[int, ...] | None = None) -> bytes:
    """``array`` as .npy bytes, with its header's shape replaced by ``shape`` (a forged header)."""
    header = np.lib.format.header_data_from_array_1_0(array)
    if shape is not None:
        header["shape"] = shape
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, header)
    return out.getvalue() + array.tobytes()


def test_npz_header_claiming_1e11_rows_is_refused_before_allocating(tmp_path):
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", _npy(np.zeros((4, 3), np.float32), (10**11, 3)))
        archive.writestr("y.npy", _npy(np.zeros(4, np.int64)))
    with pytest.raises(DatasetError) as error:
        load_dataset("npz", path=str(path))
    assert str(error.value) == (
        f"{path}: array 'x': its header claims shape (100000000000, 3) of float32 (1,200,000,000,000 bytes) but the "
        "archive holds 48; the file is corrupt or forged"
    )
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:  # honest, but 4 TB of zeros
        archive.writestr("x.npy", _npy(np.zeros((4, 3), np.float32)))
        archive.writestr("y.npy", _npy(np.zeros(4, np.int64)))
    raw = bytearray(path.read_bytes())  # forge the central directory's uncompressed size of x.npy
    at = raw.find(b"PK\x01\x02")  # the first central-directory entry: x.npy
    raw[at + 24 : at + 28] = (2**32 - 1).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match=r"array 'x' claims 4,294,967,295 bytes from \d+ stored; .*forged"):
        load_dataset("npz", path=str(path))


def test_npz_arrays_larger_than_memory_are_refused(tmp_path, monkeypatch):
    from fedgma.data import records

    path = tmp_path / "big.npz"
    np.savez(path, x=np.zeros((100, 10), np.float32), y=np.arange(100) % 2)
    monkeypatch.setattr(records, "memory_limit", lambda: 4000)
    with pytest.raises(DatasetError) as error:
        load_dataset("npz", path=str(path))
    assert str(error.value).startswith(f"{path}: its arrays would need 0.0 GiB, more than this machine's 0.0 GiB")


def test_idx_header_is_checked_before_reading(tmp_path, monkeypatch):
    from fedgma.data import records

    path = tmp_path / "bomb-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + (10**5).to_bytes(4, "big") + bytes([0, 0, 0, 28]) * 2))
    with pytest.raises(DatasetError, match=r"header says 78400016 bytes, file has 16$"):
        read_idx(path)
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + (10**9).to_bytes(4, "big") + bytes([0, 0, 0, 28]) * 2))
    monkeypatch.setattr(records, "memory_limit", lambda: 10**6)
    with pytest.raises(DatasetError, match=r"its header's shape \(1000000000, 28, 28\) would need 730.2 GiB"):
        read_idx(path)
    raw = bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes(10)  # more bytes than the header says
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(DatasetError, match=r"header says 11 bytes, file has 12 or more"):
        read_idx(path)


def test_femnist_refuses_non_finite_pixels_and_duplicate_users(femnist_dir):
    train_file = next((femnist_dir / "train").glob("*.json"))
    original = json.loads(train_file.read_text())
    marked = json.loads(json.dumps(original))
    marked["user_data"]["f0001_1"]["x"][2][5] = 0.123456789  # a unique value, replaced by the bad one in the text
    for bad, message in (
        ("NaN", r"x record 2 has a non-finite value \(nan\); inputs must be finite"),
        ("Infinity", r"x record 2 has a non-finite value \(inf\); inputs must be finite"),
        ("1e39", r"x record 2 has the value 1e\+39, beyond ±1e\+15"),
    ):
        train_file.write_text(json.dumps(marked).replace("0.123456789", bad))
        with pytest.raises(DatasetError, match=f"^{re.escape(str(train_file))} user 'f0001_1': {message}"):
            load_dataset("femnist", data_dir=str(femnist_dir))
    twice = {**original, "users": original["users"] + ["f0000_0"], "num_samples": original["num_samples"] + [5]}
    train_file.write_text(json.dumps(twice))
    with pytest.raises(DatasetError, match=r"user 'f0000_0' appears twice \(also in .*\.json\); LEAF users are unique"):
        load_dataset("femnist", data_dir=str(femnist_dir))
    train_file.write_text(json.dumps(original))
    (femnist_dir / "train" / "copy.json").write_text(json.dumps(original))
    with pytest.raises(DatasetError, match=rf"copy.json: user 'f0000_0' appears twice \(also in {train_file.name}\)"):
        load_dataset("femnist", data_dir=str(femnist_dir))
