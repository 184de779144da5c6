"""VAE quality on Fashion-MNIST: test ELBO and importance-weighted log-likelihood, plus a
conditional VAE's samples per class.

    python bench/vae_quality.py --out cvae_samples.png [--epochs 10] [--cvae-epochs 10]

Trains a 784-512-256-32 MLP VAE with a Bernoulli likelihood (pixels in [0, 1] as
probabilities) on the 60000 training images, then reports on the test set: the ELBO (one z per
image, all 10000 images) and the IWAE estimate of log p(x) with ``--k`` importance samples on
the first ``--ll-subset`` test images (the ELBO on that subset is printed beside it). Numbers
are nats per image; higher is better. A conditional VAE of the same shape is trained next and
``--out`` gets a PNG grid: one row of samples per class. How well its samples follow their
labels is measured by a classifier (an MLP trained on the real training images, its test
accuracy printed beside): the fraction of 100 samples per class that it assigns to the class
they were drawn for.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from aecore import data
from aecore.plots import save_image_grid
from aecore.vae import VAE, ConditionalVAE


def train(model: VAE, x: torch.Tensor, y: torch.Tensor | None, epochs: int, batch: int,
          lr: float, seed: int) -> list[float]:
    """Adam over shuffled mini-batches; returns the mean training loss of each epoch."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        order = torch.randperm(len(x), generator=g)
        total = 0.0
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            loss = model.loss(x[idx], None if y is None else y[idx])["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(x))
        print(f"  {model.family} epoch {epoch + 1}/{epochs}: train -ELBO {losses[-1]:.2f} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
    model.eval()
    return losses


def classifier(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> torch.nn.Module:
    """A 784-256-10 MLP trained on (x, y) with cross-entropy: the judge of conditional samples."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.ReLU(),
                              torch.nn.Linear(256, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 128):
            idx = order[i:i + 128]
            loss = torch.nn.functional.cross_entropy(net(x[idx]), y[idx].long())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def batched(fn, x: torch.Tensor, batch: int) -> torch.Tensor:
    return torch.cat([fn(x[i:i + batch]) for i in range(0, len(x), batch)])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="PNG path for the conditional samples")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--cvae-epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--k", type=int, default=200, help="importance samples for log p(x)")
    p.add_argument("--ll-subset", type=int, default=1000,
                   help="test images for the importance-weighted estimate")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    ds = data.load("fashion-mnist")
    x_train = torch.from_numpy(ds.inputs("train"))
    x_test = torch.from_numpy(ds.inputs("test"))
    y_train = torch.from_numpy(ds.labels("train"))
    print(f"Fashion-MNIST: {len(x_train)} train, {len(x_test)} test images, 784 pixels in "
          f"[0, 1]; torch threads {torch.get_num_threads()}", flush=True)

    torch.manual_seed(args.seed)
    vae = VAE(784, [512, 256], 32, likelihood="bernoulli")
    t0 = time.perf_counter()
    losses = train(vae, x_train, None, args.epochs, args.batch, args.lr, args.seed)
    train_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.perf_counter()
    elbo = batched(lambda xb: vae.elbo(xb, generator=g), x_test, 1000)
    sub = x_test[:args.ll_subset]
    elbo_sub = batched(lambda xb: vae.elbo(xb, generator=g), sub, 1000)
    ll = batched(lambda xb: vae.log_likelihood(xb, k=args.k, generator=g), sub, 100)
    eval_s = time.perf_counter() - t0
    result = {
        "vae": "784-512-256-32 MLP, Bernoulli likelihood",
        "epochs": args.epochs, "train_s": round(train_s, 1),
        "final_train_neg_elbo": round(losses[-1], 2) if losses else None,
        "test_elbo": round(float(elbo.mean()), 2), "test_images": len(x_test),
        "iwae_k": args.k, "iwae_subset": len(sub),
        "test_log_likelihood_iwae": round(float(ll.mean()), 2),
        "test_elbo_on_subset": round(float(elbo_sub.mean()), 2),
        "eval_s": round(eval_s, 1),
    }
    print(json.dumps(result, indent=1), flush=True)

    torch.manual_seed(args.seed)
    cvae = ConditionalVAE(10, 784, [512, 256], 32, likelihood="bernoulli")
    t0 = time.perf_counter()
    train(cvae, x_train, y_train, args.cvae_epochs, args.batch, args.lr, args.seed)
    cvae_train_s = time.perf_counter() - t0  # training alone: sampling and scoring follow
    per_class = 8
    labels = torch.arange(10).repeat_interleave(per_class)
    imgs = cvae.sample(len(labels), labels=labels,
                       generator=torch.Generator().manual_seed(args.seed))
    save_image_grid(imgs.numpy().reshape(-1, 28, 28), args.out, nrow=per_class,
                    row_labels=list(data.FASHION_MNIST_CLASSES))
    y_test = torch.from_numpy(ds.labels("test"))
    ce = torch.cat([cvae.elbo(x_test[i:i + 1000], y_test[i:i + 1000], generator=g)
                    for i in range(0, len(x_test), 1000)])
    judge = classifier(x_train, y_train, 3, args.seed)
    with torch.no_grad():
        judge_acc = (judge(x_test).argmax(1) == y_test).float().mean().item()
        drawn = torch.arange(10).repeat_interleave(100)
        samples = cvae.sample(len(drawn), labels=drawn,
                              generator=torch.Generator().manual_seed(args.seed + 2))
        follow = (judge(samples.reshape(len(drawn), -1)).argmax(1) == drawn).float().mean().item()
    result["cvae_epochs"] = args.cvae_epochs
    result["cvae_train_s"] = round(cvae_train_s, 1)
    result["cvae_test_elbo"] = round(float(ce.mean()), 2)
    result["cvae_classifier_test_accuracy"] = round(judge_acc, 3)
    result["cvae_samples_classified_as_their_label"] = round(follow, 3)
    result["cvae_grid"] = f"{args.out} (rows: classes 0-9, {per_class} samples each)"
    print(json.dumps({k: result[k] for k in result if k.startswith("cvae")}, indent=1))
    return result


if __name__ == "__main__":
    main()
