import json
from pathlib import Path

import pytest

from aecore import data
from aecore.quickstart import run


@pytest.fixture
def no_fashion_mnist(monkeypatch):
    # Where Fashion-MNIST is not installed, the quickstart falls back to scikit-learn's digits.
    monkeypatch.setattr(data, "find_fashion_mnist", lambda root=None: None)
    monkeypatch.delenv("AECORE_FASHION_MNIST", raising=False)


def test_quickstart_on_digits_writes_model_and_figures(tmp_path, capsys, no_fashion_mnist):
    result = run(out=tmp_path / "qs", epochs=3, progress=False)
    printed = capsys.readouterr().out
    assert "Fashion-MNIST not found" in printed
    assert result["data"] == "digits"
    assert "PCA (" in printed and "autoencoder:" in printed
    assert 0 < result["ae_mse"] < 1 and 0 < result["pca_mse"] < 1
    assert "image search, precision@10" in printed
    # Ten classes: chance is 0.1; near neighbours of digits share their class far more often.
    assert result["pca_precision_at_10"] > 0.8 and result["ae_precision_at_10"] > 0.3
    config = json.loads((tmp_path / "qs" / "model" / "config.json").read_text())
    assert (config["data"], config["data_root"], config["seed"]) == ("digits", None, 0)
    for name in ("model/model.safetensors", "model/config.json", "model/history.json",
                 "reconstructions.png", "search.png", "loss.png"):
        assert (tmp_path / "qs" / name).is_file(), name


def test_quickstart_checks_epochs_and_out_before_training(tmp_path, no_fashion_mnist):
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(ValueError, match="--out must be a folder path.*is an existing file"):
        run(out=tmp_path / "file", epochs=1, progress=False)
    assert (tmp_path / "file").read_text() == "keep me"
    with pytest.raises(ValueError, match="--epochs must be a positive integer, got 0"):
        run(out=tmp_path / "qs", epochs=0, progress=False)
    assert not (tmp_path / "qs").exists()
    for taken in ("qs2/search.png", "qs3/model/config.json"):
        (tmp_path / taken).mkdir(parents=True)
        with pytest.raises(ValueError, match=f"is a folder, where the file {Path(taken).name}"):
            run(out=tmp_path / taken.split("/")[0], epochs=1, progress=False)


def test_quickstart_never_falls_back_from_a_data_root_it_was_given(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST not found in"):
        run(out=tmp_path / "qs", epochs=1, data_root=str(tmp_path / "empty"), progress=False)
    assert not (tmp_path / "qs" / "model").exists()
    # Nor from one named by $AECORE_FASHION_MNIST.
    monkeypatch.setenv("AECORE_FASHION_MNIST", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=f"Fashion-MNIST not found in '{tmp_path}"):
        run(out=tmp_path / "qs", epochs=1, progress=False)
    assert not (tmp_path / "qs" / "model").exists()


def test_quickstart_leaves_another_tools_model_folder_alone(tmp_path, no_fashion_mnist):
    (tmp_path / "qs" / "model").mkdir(parents=True)
    (tmp_path / "qs" / "model" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="holds a config.json that is not an aecore model's"):
        run(out=tmp_path / "qs", epochs=1, progress=False)
    assert [p.name for p in (tmp_path / "qs" / "model").iterdir()] == ["config.json"]


def test_quickstart_records_its_data_root_absolute(tmp_path, monkeypatch):
    # Later commands (search, export) rebuild the split from config.json, from any folder.
    # The loader stands in for Fashion-MNIST (digits, fast): what is tested is the record.
    loaded = []
    monkeypatch.setattr(data, "load_fashion_mnist",
                        lambda root=None: loaded.append(root) or data.load_digits())
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fm").mkdir()
    run(out="qs", epochs=1, data_root="fm", progress=False)
    assert loaded == ["fm"]
    config = json.loads((tmp_path / "qs" / "model" / "config.json").read_text())
    assert config["data_root"] == str(tmp_path.resolve() / "fm")
