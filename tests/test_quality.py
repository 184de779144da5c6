"""bench/quality.py: the quality table of every family, on a tiny subset of digits."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scripts import load_script
from tolerances import assert_close

from aecore import data as datasets
from aecore import families

quality = load_script("quality")

TINY = dict(data="digits", latent=4, epochs=1, batch_size=32, lr=2e-3, train_size=160,
            test_size=64, seed=0, threads=None)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality")
    results = quality.run(quality.Settings(**TINY), out, log=lambda *a: None)
    return results, out


def _digits():
    return datasets.load("digits", seed=0).subset(TINY["train_size"], TINY["test_size"])


def test_every_builder_gets_one_row_and_files_match_results(tiny_run):
    results, out = tiny_run
    assert [r["family"] for r in results["families"]] == list(families.BUILDERS)
    assert (results["data"]["train"], results["data"]["test"]) == (160, 64)
    on_disk = json.loads((out / "quality.json").read_text())
    assert on_disk["families"] == json.loads(json.dumps(results["families"]))
    assert on_disk["pca"] == results["pca"]
    md = (out / "quality.md").read_text()
    assert md == quality.to_markdown(results)
    main_table = md.split("\nDenoising,")[0].split("\nVector quantisation,")[0]
    for name in families.BUILDERS:
        assert sum(line.startswith(f"| {name} |") for line in main_table.splitlines()) == 1, name
    assert "| PCA (4 components) |" in md
    assert "for 1 epochs (batch 32, Adam lr 0.002, seed 0" in md


def test_rows_are_finite_and_ratios_are_to_pca(tiny_run):
    results, _ = tiny_run
    pca = results["pca"]["test_mse"]
    for r in results["families"]:
        assert math.isfinite(r["test_mse"]) and r["test_mse"] > 0, r["family"]
        assert r["ratio_to_pca"] == pytest.approx(r["test_mse"] / pca, rel=1e-12)
        assert r["train_s"] > 0 and r["params"] > 0
        assert math.isfinite(r["test_terms"]["loss"])
        assert r["conditional"] == (r["family"] in families.USES_LABELS)
    md = quality.to_markdown(results)
    for name in families.USES_LABELS:
        assert next(line for line in md.splitlines() if line.startswith(f"| {name} |")) \
            .endswith("| also given the class label |")
    dae = next(r for r in results["families"] if r["family"] == "dae")
    assert dae["corruption"] == families.DEFAULT_CORRUPTION["dae"]


def test_pca_mse_matches_float64_svd_oracle(tiny_run):
    results, _ = tiny_run
    data = _digits()
    train = data.inputs("train").astype(np.float64)
    test = data.inputs("test").astype(np.float64)
    mean = train.mean(axis=0)
    basis = np.linalg.svd(train - mean, full_matrices=False)[2][:TINY["latent"]]
    recon = (test - mean) @ basis.T @ basis + mean
    expected = float(np.mean((recon - test) ** 2))
    # The baseline uses scikit-learn's randomized SVD solver (fast on 60000 x 784): it finds
    # the leading subspace to about 1e-6 here, not to float64 roundoff.
    assert results["pca"]["test_mse"] == pytest.approx(expected, rel=1e-4)
    assert results["pca"]["params"] == TINY["latent"] * 64 + 64


def test_ae_row_is_the_mse_of_its_deterministic_reconstruction():
    data = _digits()
    model, row = quality.train_family("ae", data, quality.Settings(**TINY))
    x = data.inputs("test")
    with torch.no_grad():
        recon = model(torch.from_numpy(x)).double().numpy()
    assert row["test_mse"] == pytest.approx(float(np.mean((recon - x) ** 2)), rel=1e-12)
    # 64-32-4-32-64 MLP (digits' default hidden size is 32): weights and biases.
    assert row["params"] == (64 * 32 + 32) + (32 * 4 + 4) + (4 * 32 + 32) + (32 * 64 + 64)
    assert row["corruption"] is None and row["codebook"] is None
    # Same seed, same family -> the same model, whatever ran before.
    _, again = quality.train_family("ae", data, quality.Settings(**TINY))
    assert again["test_mse"] == row["test_mse"]


def test_denoising_rows_share_noise_and_report_the_psnr_gain(tiny_run):
    results, _ = tiny_run
    rows = {r["family"]: r for r in results["denoising"]}
    assert set(rows) == {"dae", "ae"}
    assert rows["dae"]["trained_on"] == "gaussian:0.3" and rows["ae"]["trained_on"] == "clean"
    assert rows["dae"]["psnr_noisy"] == rows["ae"]["psnr_noisy"]
    # sigma = 0.3 unclipped noise on [0, 1] data: PSNR = 10 log10(1 / 0.09) = 10.46 dB on average.
    assert rows["ae"]["psnr_noisy"] == pytest.approx(10 * math.log10(1 / 0.09), abs=0.5)
    for r in rows.values():
        assert r["psnr_gain"] == pytest.approx(r["psnr_denoised"] - r["psnr_noisy"], abs=1e-12)
    md = quality.to_markdown(results)
    assert f"| dae | gaussian:0.3 | {rows['dae']['psnr_noisy']:.2f} |" in md


def test_reconstruct_batches_and_passes_labels_to_conditional_models():
    from aecore.vae import ConditionalVAE

    torch.manual_seed(0)
    model = ConditionalVAE(num_classes=3, input_dim=11, hidden_dims=[7], latent_dim=2)
    x = torch.rand(17, 11)
    y = torch.arange(17) % 3
    got = quality.reconstruct(model, x, y, batch_size=5)
    with torch.no_grad():
        expected = model.decode(model.encode(x, y)[0], y)
    # Batches of 5 against one batch of 17: equal up to the GEMMs' fp32 rounding.
    assert_close(got, expected.double(), dtype=torch.float32, k=11)
    assert model.training  # the caller's mode is restored


@pytest.mark.parametrize("kwargs, message", [
    ({"latent": 0}, "latent must be a positive integer, got 0"),
    ({"epochs": 2.5}, "epochs must be a positive integer, got 2.5"),
    ({"batch_size": True}, "batch_size must be a positive integer, got True"),
    ({"train_size": -5}, "train_size must be a positive integer, got -5"),
    ({"threads": 0}, "threads must be a positive integer, got 0"),
    ({"lr": 0.0}, "lr must be a positive number, got 0.0"),
    ({"sigma": float("nan")}, "sigma must be a positive number, got nan"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"families": ("ae", "nope")}, "families must be names from"),
    ({"families": ()}, "families must be names from"),
])
def test_settings_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        quality.Settings(**kwargs)


def test_latent_must_be_smaller_than_the_input():
    with pytest.raises(ValueError, match="latent must be smaller than the input size 64, got 64"):
        quality.run(quality.Settings(**{**TINY, "latent": 64, "families": ("ae",)}))


def test_main_runs_a_subset_and_reports_bad_arguments(tmp_path, capsys):
    out = tmp_path / "q"
    code = quality.main(["--data", "digits", "--families", "ae,tied-ae", "--latent", "3",
                         "--epochs", "1", "--train-size", "100", "--test-size", "40",
                         "--threads", "0", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| ae |" in printed and "| tied-ae |" in printed and "| dae |" not in printed
    assert (out / "quality.md").read_text() in printed
    assert json.loads((out / "quality.json").read_text())["settings"]["families"] == [
        "ae", "tied-ae"]

    assert quality.main(["--data", "digits", "--families", "ae,bogus", "--out", str(out)]) == 2
    assert "families must be names from" in capsys.readouterr().err


def test_codebook_stats_pool_code_use_over_the_test_set(tiny_run):
    results, _ = tiny_run
    data = _digits()
    model, row = quality.train_family("vq-vae", data, quality.Settings(**TINY))
    x = torch.from_numpy(data.inputs("test"))
    stats = quality.codebook_stats(model, x, batch_size=10)  # pooled across 7 batches
    idx = model.codes(x).numpy()
    p = np.bincount(idx.ravel(), minlength=model.num_codes) / idx.size
    entropy = -np.sum(p[p > 0] * np.log(p[p > 0]))
    assert stats["perplexity"] == pytest.approx(float(np.exp(entropy)), rel=1e-12)
    assert stats["codes_used"] == int(np.count_nonzero(p))
    assert stats["positions"] == model.num_latents and stats["codebook_size"] == model.num_codes
    assert stats["bits"] == model.num_latents * math.log2(model.num_codes)
    assert row["codebook"] == quality.codebook_stats(model, x)
    assert quality.codebook_stats(quality.train_family("ae", data, quality.Settings(**TINY))[0],
                                  x) is None
    md = quality.to_markdown(results)
    c = next(r for r in results["families"] if r["family"] == "vq-vae")["codebook"]
    assert (f"| vq-vae | {c['positions']} x {c['codebook_size']} | {c['bits']:g} | "
            f"{c['perplexity']:.1f} | {c['codes_used']} |") in md
