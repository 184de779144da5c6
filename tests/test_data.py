import gzip
import json

import numpy as np
import pytest

from aecore import data
from aecore.normalization import Normalization


def _write_idx(path, arr):
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_on_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 7), ("t10k", 3)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    d = data.load_fashion_mnist(tmp_path)
    assert d.x_train.shape == (7, 1, 28, 28) and d.x_test.shape == (3, 1, 28, 28)
    assert d.y_train.dtype == np.int64 and d.num_classes == 10
    x = d.inputs("train")
    assert x.shape == (7, 784) and x.dtype == np.float32
    np.testing.assert_allclose(x, d.x_train.reshape(7, -1) / 255.0, rtol=1e-6)


def test_fashion_mnist_truncated_file_is_an_error(tmp_path):
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((2, 28, 28)))
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "rb") as f:
        raw = f.read()
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[:-10])
    with pytest.raises(ValueError, match="header says"):
        data._read_idx(tmp_path / "train-images-idx3-ubyte.gz")


@pytest.mark.parametrize("damage,match", [
    ("cut gzip", "is not a readable gzip file"),
    ("labels as images", r"must hold 28x28 images \(N, 28, 28\), got shape \(7,\)"),
    ("14x14 images", r"must hold 28x28 images \(N, 28, 28\), got shape \(7, 14, 14\)"),
    ("class 12", "must hold class ids 0-9"),
])
def test_fashion_mnist_files_of_the_wrong_kind(tmp_path, damage, match):
    rng = np.random.default_rng(0)
    for split, n in (("train", 7), ("t10k", 3)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    images = tmp_path / "train-images-idx3-ubyte.gz"
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    if damage == "cut gzip":
        images.write_bytes(images.read_bytes()[:-20])
    elif damage == "labels as images":
        images.write_bytes(labels.read_bytes())
    elif damage == "14x14 images":
        _write_idx(images, rng.integers(0, 256, (7, 14, 14)))
    else:
        _write_idx(labels, np.full(7, 12))
    with pytest.raises(ValueError, match=match):
        data.load_fashion_mnist(tmp_path)


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist(tmp_path)


def test_a_folder_named_by_the_environment_is_the_only_one_looked_in(tmp_path, monkeypatch):
    # Even where the system copy is installed, a wrong $AECORE_FASHION_MNIST is an error that
    # names it, not a quiet fallback; a root passed in wins over it; an empty one means unset.
    monkeypatch.setenv("AECORE_FASHION_MNIST", str(tmp_path / "nowhere"))
    assert data.find_fashion_mnist() is None
    with pytest.raises(FileNotFoundError, match=f"not found in '{tmp_path / 'nowhere'}'"):
        data.load_fashion_mnist()
    with pytest.raises(FileNotFoundError, match=f"not found in '{tmp_path / 'other'}'"):
        data.load_fashion_mnist(tmp_path / "other")
    monkeypatch.setenv("AECORE_FASHION_MNIST", "")
    assert data.find_fashion_mnist() == data.find_fashion_mnist(data.FASHION_MNIST_DIRS[0])


@pytest.mark.skipif(data.find_fashion_mnist() is None, reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    d = data.load("fashion-mnist")
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert np.bincount(d.y_train).tolist() == [6000] * 10
    assert 0.0 <= d.inputs("test").min() and d.inputs("test").max() <= 1.0


def test_digits_and_swiss_roll():
    d = data.load("digits")
    assert d.x_train.shape[1:] == (1, 8, 8) and len(d.x_train) + len(d.x_test) == 1797
    assert d.inputs().max() <= 1.0 and d.is_image
    s = data.load("swiss-roll")
    assert s.x_train.shape[1:] == (3,) and not s.is_image
    np.testing.assert_allclose(s.inputs().mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(s.inputs().std(0), 1, atol=1e-4)


def test_user_arrays(tmp_path):
    rng = np.random.default_rng(1)
    table = rng.normal(3.0, 2.0, (50, 4)).astype(np.float32)
    np.save(tmp_path / "t.npy", table)
    d = data.load(str(tmp_path / "t.npy"))
    assert d.sample_shape == (4,) and len(d.x_train) == 40
    np.savetxt(tmp_path / "t.csv", np.c_[table, rng.integers(0, 3, 50)], delimiter=",")
    c = data.load_array(tmp_path / "t.csv", label_column=4)
    assert c.sample_shape == (4,) and c.num_classes is not None
    # A header row (as spreadsheets and pandas write) is skipped; the table is the same.
    np.savetxt(tmp_path / "h.csv", np.c_[table, rng.integers(0, 3, 50)], delimiter=",",
               header="a,b,c,d,label", comments="")
    h = data.load_array(tmp_path / "h.csv", label_column=4)
    np.testing.assert_array_equal(h.x_train, c.x_train)
    # pandas names unnamed columns 0..F-1: that row is no sample (with a label column it made
    # up classes 2..4). It is skipped, and a warning says so.
    np.savetxt(tmp_path / "p.csv", np.c_[table, rng.integers(0, 3, 50)], delimiter=",",
               header="0,1,2,3,4", comments="")
    with pytest.warns(UserWarning, match=r"p.csv': the first row, 0, 1, \.\.\., 4, is read as "
                                         r"column names"):
        p = data.load_array(tmp_path / "p.csv", label_column=4)
    np.testing.assert_array_equal(p.x_train, c.x_train)
    assert p.num_classes == c.num_classes
    # Text anywhere else is an error that names the file and the value.
    (tmp_path / "bad.csv").write_text("1,2\n3,x\n5,6\n")
    with pytest.raises(ValueError, match=r"bad.csv' must be a numeric CSV table .*'x'"):
        data.load_array(tmp_path / "bad.csv")
    # So is a word in a first row of numbers: that row is data, not a header to drop.
    (tmp_path / "first.csv").write_text("1,2,x\n4,5,6\n7,8,9\n")
    with pytest.raises(ValueError, match=r"first.csv' must be a numeric CSV table .*'x'"):
        data.load_array(tmp_path / "first.csv")
    # 0/1 rows saved as bool (interactions) train as they recommend: as 0.0 and 1.0.
    np.save(tmp_path / "seen.npy", table > 3.0)
    np.testing.assert_array_equal(data.load(str(tmp_path / "seen.npy"), seed=0).x_train,
                                  data.load(str(tmp_path / "t.npy"), seed=0).x_train > 3.0)
    imgs = rng.integers(0, 200, (20, 6, 6)).astype(np.float32)
    np.save(tmp_path / "imgs.npy", imgs)
    i = data.load(str(tmp_path / "imgs.npy"))
    assert i.sample_shape == (1, 6, 6) and i.inputs().max() <= 1.0
    # Both splits lie in [0, 1] (a Bernoulli likelihood needs it of the test split too), even
    # when the brightest pixel is a test image's.
    imgs[:, 0, 0] = 100.0
    test_rows = data._split(np.arange(20.0)[:, None], None, 0.2, 0)[2][:, 0].astype(int)
    imgs[test_rows[0], 0, 0] = 255.0
    np.save(tmp_path / "imgs.npy", imgs)
    for split in ("train", "test"):
        x = data.load(str(tmp_path / "imgs.npy")).inputs(split)
        assert x.min() >= 0.0 and x.max() <= 1.0, split
    assert max(float(data.load(str(tmp_path / "imgs.npy")).inputs(s).max())
               for s in ("train", "test")) == 1.0


def test_user_array_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load(str(tmp_path / "nope.npy"))
    np.save(tmp_path / "nan.npy", np.array([[1.0, np.nan], [2.0, 3.0]]))
    with pytest.raises(ValueError, match="NaN"):
        data.load(str(tmp_path / "nan.npy"))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, {"b": 2}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):  # object arrays would need pickle: refused
        data.load(str(tmp_path / "obj.npy"))
    with pytest.raises(ValueError, match="data must be one of"):
        data.load("imagenet")


def test_normalization_round_trip():
    n = Normalization(mean=[1.0, 2.0], std=[2.0, 4.0])
    x = np.array([[3.0, 6.0]], np.float32)
    np.testing.assert_allclose(n.apply(x), [[1.0, 1.0]])
    np.testing.assert_allclose(n.invert(n.apply(x)), x)
    assert Normalization.from_dict(n.to_dict()) == n
    with pytest.raises(ValueError, match="std"):
        Normalization(mean=0.0, std=0.0)


def test_constant_features_come_back_as_their_mean():
    # A feature that never varied keeps std 1 in apply (any value may come later) and maps
    # back to its training value: a model trained on it learnt nothing there.
    x = np.array([[1.0, 5.0, 0.0], [3.0, 5.0, 0.0], [2.0, 5.0, 0.0]])
    n = Normalization.fit(x)
    assert n.constant == [1, 2] and n.std[1:] == [1.0, 1.0]
    np.testing.assert_allclose(n.apply([[2.0, 7.0, -1.0]]), [[0.0, 2.0, -1.0]], atol=1e-6)
    np.testing.assert_allclose(n.invert([[1.0, 0.7, -3.0]]), [[2.0 + np.std(x[:, 0]), 5.0, 0.0]],
                               rtol=1e-6)
    assert Normalization.from_dict(n.to_dict()) == n
    assert "constant" not in Normalization(mean=0.0, std=2.0).to_dict()  # older files' form
    np.testing.assert_allclose(Normalization(mean=[1.0, 2.0], std=3.0, constant=[0]).invert(
        [[1.0, 1.0]]), [[1.0, 5.0]])
    for bad in ([3], [-1], [True], "1", 1, [0.5]):
        with pytest.raises(ValueError, match=r"Normalization.constant must list feature indices "
                                             r"in \[0, 3\)"):
            Normalization(mean=[0.0] * 3, std=1.0, constant=bad)
    with pytest.raises(ValueError, match="Normalization.constant"):
        Normalization(mean=0.0, std=1.0, constant=[0])  # scalar statistics have no features


def test_user_npy_must_be_one_real_array(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 4))
    np.savez(tmp_path / "a.npz", a=x)
    (tmp_path / "a.npz").rename(tmp_path / "arch.npy")  # an archive under a .npy name
    with pytest.raises(ValueError, match="npz"):
        data.load_array(tmp_path / "arch.npy")
    np.save(tmp_path / "cplx.npy", (x + 1j * x).astype(np.complex64))  # would lose x.imag
    with pytest.raises(TypeError, match="complex64"):
        data.load_array(tmp_path / "cplx.npy")
    np.save(tmp_path / "big.npy", np.full((50, 4), 1e39))  # finite, but inf as float32
    with pytest.raises(ValueError, match="big.npy.*NaN or Inf"):
        data.load_array(tmp_path / "big.npy")


@pytest.mark.parametrize("bad", [np.nan, 2.7, -1.0, 1e30])
def test_user_labels_must_be_class_ids(tmp_path, bad):
    table = np.c_[np.random.default_rng(0).normal(size=(50, 3)), np.arange(50) % 3]
    table[7, 3] = bad
    np.savetxt(tmp_path / "lab.csv", table, delimiter=",")
    with pytest.raises(ValueError, match=r"labels \(column 3\) in .*lab.csv"):
        data.load_array(tmp_path / "lab.csv", label_column=3)


def test_user_label_column_and_split_sizes(tmp_path):
    table = np.c_[np.random.default_rng(0).normal(size=(50, 3)), np.arange(50) % 3]
    np.savetxt(tmp_path / "lab.csv", table, delimiter=",")
    for col in (9, -5):
        with pytest.raises(ValueError, match="label_column must be a column index of the 4"):
            data.load_array(tmp_path / "lab.csv", label_column=col)
    d = data.load_array(tmp_path / "lab.csv", label_column=-1)
    assert d.sample_shape == (3,) and d.num_classes == 3
    with pytest.raises(ValueError, match="leaves no training samples"):
        data.load_array(tmp_path / "lab.csv", test_fraction=0.99)


def test_user_images_with_negatives_scale_to_unit_range(tmp_path):
    rng = np.random.default_rng(2)
    np.save(tmp_path / "img.npy", rng.uniform(-3.0, 5.0, (40, 2, 5, 5)).astype(np.float32))
    d = data.load_array(tmp_path / "img.npy")
    x = d.inputs("train")  # the range of the sigmoid output of image models
    assert x.min() == 0.0 and x.max() == pytest.approx(1.0)
    np.testing.assert_allclose(d.normalization.invert(x), d.x_train.reshape(len(x), -1),
                               atol=1e-5)
    np.save(tmp_path / "pos.npy", rng.uniform(0.5, 8.0, (40, 5, 5)).astype(np.float32))
    n = data.load_array(tmp_path / "pos.npy").normalization  # non-negative: scaled by the max
    assert n.mean == 0.0 and 7.0 < n.std <= 8.0
    np.save(tmp_path / "flat.npy", np.full((40, 5, 5), -2.0, np.float32))
    assert data.load_array(tmp_path / "flat.npy").normalization == Normalization(-2.0, 1.0)


def test_normalization_checks_mean():
    for mean in (float("nan"), [0.0, float("inf")], 1e39):
        with pytest.raises(ValueError, match="mean must be finite"):
            Normalization(mean=mean, std=1.0)
    with pytest.raises(ValueError, match=r"shapes \(3,\) and \(2,\)"):
        Normalization(mean=[0.0, 1.0, 2.0], std=[1.0, 2.0])
    with pytest.raises(ValueError, match="number or a list of numbers"):
        Normalization(mean="a", std=1.0)
    with pytest.raises(ValueError, match="'mean' and 'std'"):
        Normalization.from_dict({"std": 1.0})
    with pytest.raises(ValueError, match=r"fit takes a \(N, F\) array .* got shape \(5,\)"):
        Normalization.fit(np.arange(5.0))
    assert Normalization(mean=[0.0, 1.0], std=2.0).apply(np.ones((1, 2))).tolist() == [[0.5, 0]]


def test_inputs_that_leave_float32_are_refused():
    from aecore import AutoEncoder
    from aecore.io import model_inputs

    m = AutoEncoder(2, [2], 1)
    with pytest.raises(ValueError, match=r"input holds values beyond float32's range"):
        model_inputs(m, np.array([[1e39, 0.0]]), "input")
    # Finite raw values that a tiny std scales past float32's largest.
    m.normalization = Normalization(mean=0.0, std=1e-30)
    with pytest.raises(ValueError, match="input holds values that overflow float32 once the "
                                         "model's normalization scales them"):
        model_inputs(m, np.array([[1e10, 0.0]]), "input")
    assert model_inputs(m, np.array([[1e-25, 0.0]]), "input").tolist() == [[pytest.approx(1e5), 0]]


def test_image_samples_in_another_layout_are_refused():
    from aecore import ConvAutoEncoder
    from aecore.io import model_inputs

    m = ConvAutoEncoder((1, 8, 8), [4], 3)
    for ok in ((2, 1, 8, 8), (2, 8, 8), (2, 64), (1, 8, 8), (64,)):
        assert model_inputs(m, np.zeros(ok), "input").shape[1:] == (1, 8, 8), ok
    with pytest.raises(ValueError, match=r"input must hold samples of shape \(1, 8, 8\) "
                                         r"\(channels first\), got an array of shape "
                                         r"\(2, 8, 8, 1\): transpose it"):
        model_inputs(m, np.zeros((2, 8, 8, 1)), "input")
    assert model_inputs(m, np.zeros((8, 8)), "input").shape == (1, 1, 8, 8)  # one (H, W) image
    rgb = ConvAutoEncoder((3, 8, 8), [4], 3)
    for ok in ((3, 8, 8), (2, 3, 8, 8), (192,), (2, 192)):
        assert model_inputs(rgb, np.zeros(ok), "input").shape[1:] == (3, 8, 8), ok
    # One channels-last image as well as a batch of them: a reshape would scramble either.
    for bad in ((8, 8, 3), (2, 8, 8, 3)):
        with pytest.raises(ValueError, match=r"\(channels first\), got an array of shape"):
            model_inputs(rgb, np.zeros(bad), "input")


def test_a_normalization_must_fit_the_model_it_travels_with(tmp_path):
    import torch

    from aecore import AutoEncoder, ConvAutoEncoder, recommend
    from aecore.export import to_onnx
    from aecore.io import load_model, model_inputs, save_model

    norm = Normalization(mean=[0.0] * 7, std=[2.0] * 7)
    Normalization(mean=0.0, std=[2.0] * 10).check_fits((10,), "n")
    Normalization(mean=0.0, std=255.0).check_fits((1, 8, 8), "n")
    m = AutoEncoder(10, [8], 4)
    m.normalization = norm
    message = r"the normalization holds 7 per-feature values, but the model's samples have " \
              r"shape \(10,\)"
    for call in (lambda: recommend.item_scores(m, torch.ones(2, 10)),
                 lambda: model_inputs(m, np.ones((2, 10), np.float32), "input"),
                 lambda: save_model(m, tmp_path / "m"),
                 lambda: to_onnx(m, tmp_path / "m.onnx")):
        with pytest.raises(ValueError, match=message):
            call()
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.onnx").exists()
    # Per-feature values on image samples would broadcast along their last axis.
    conv = ConvAutoEncoder((1, 8, 8), [4], 3)
    conv.normalization = Normalization(mean=[0.0] * 8, std=1.0)
    with pytest.raises(ValueError, match=r"8 per-feature values, but the model's samples have "
                                         r"shape \(1, 8, 8\)"):
        model_inputs(conv, np.ones((2, 1, 8, 8), np.float32), "input")
    # A saved folder edited by hand is caught on loading.
    m.normalization = None
    save_model(m, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["normalization"] = norm.to_dict()
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_model(tmp_path / "m")


def test_splits_are_train_or_test():
    d = data.load_digits()
    for get in (d.inputs, d.labels):
        with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'val'"):
            get("val")


def test_subset_takes_counts_only():
    d = data.load_digits()
    assert len(d.subset(5, 0).x_train) == 5 and len(d.subset(5, 0).x_test) == 0
    for bad in (-5, 2.5, True):
        with pytest.raises(ValueError, match="n_train must be an int >= 0 or None"):
            d.subset(bad)
