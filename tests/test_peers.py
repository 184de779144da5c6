"""bench/peers.py's shared pieces (the peers themselves need the `peers` extra)."""

import math

import pytest
import torch
from scripts import load_script

peers = load_script("peers")
elbo, markdown = peers.elbo, peers.markdown


def test_shared_elbo_is_the_bernoulli_elbo():
    x = (torch.rand(37, 784, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    mu = torch.full((37, 32), 0.3)
    logvar = torch.full((37, 32), -0.7)
    kl = -0.5 * 32 * (1 - 0.7 - 0.09 - math.exp(-0.7))
    # A decoder that says 0.5 for every pixel: log p(x|z) = -784 log 2 whatever z is.
    got = elbo(lambda xb: (mu[:len(xb)], logvar[:len(xb)]),
               lambda z: torch.full((len(z), 784), 0.5), x, seed=1)
    assert got == pytest.approx(-784 * math.log(2) - kl, rel=1e-5)


def test_markdown_tables():
    row = {"test_elbo": -240.0, "train_images_per_s": 100, "generated_images_per_s": 1000}
    det = {"mean_roc_auc": 0.9, "fit_s_all_classes": 3.0}
    text = markdown({"epochs": 2, "ad_epochs": 1, "threads": 2,
                     "versions": {"aecore": "0", "pythae": "0.1.2"},
                     "vae": {"aecore": row, "pythae": row},
                     "outliers": {"aecore": det, "pyod": det}})
    assert "| pythae | -240.00 | 100 | 1000 |" in text and "| pyod | 0.9000 | 3.0 |" in text
