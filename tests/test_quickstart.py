from aecore.quickstart import run


def test_quickstart_on_digits_writes_model_and_figures(tmp_path, capsys):
    # An empty data root makes the quickstart fall back to scikit-learn's digits.
    result = run(out=tmp_path / "qs", epochs=3, data_root=str(tmp_path / "empty"),
                 progress=False)
    printed = capsys.readouterr().out
    assert result["data"] == "digits"
    assert "PCA (" in printed and "autoencoder:" in printed
    assert 0 < result["ae_mse"] < 1 and 0 < result["pca_mse"] < 1
    for name in ("model/model.safetensors", "model/config.json", "model/history.json",
                 "reconstructions.png", "loss.png"):
        assert (tmp_path / "qs" / name).is_file(), name
