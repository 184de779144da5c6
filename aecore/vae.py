"""Variational autoencoders: VAE, beta-VAE (``VAE(beta=...)``) and the conditional VAE.

q(z | x) = N(mu(x), diag(exp(logvar(x)))), p(z) = N(0, I), and p(x | z) one of

- ``"bernoulli"``: the decoder outputs logits; log p = -BCE-with-logits summed over features.
- ``"gaussian"``: mean from the decoder, fixed standard deviation ``sigma`` (in [1e-4, 1e4]).
- ``"gaussian-learned"``: mean from the decoder, a learned log-variance per feature
  (``variance="feature"``) or one for all features (``"scalar"``), clamped into
  [LOG_SIGMA2_MIN, LOG_SIGMA2_MAX] so that the likelihood cannot run away on constant pixels.
- ``"multinomial"``: counts over the features (items a user interacted with), the decoder
  outputs logits of one categorical distribution, log p = sum_i x_i log softmax(logits)_i (the
  multinomial coefficient, constant in the model, left out); the encoder sees x / ||x||_2, so
  users with many and few interactions share one scale. With ``beta`` ~ 0.2 and masked inputs
  in training this is the Mult-VAE of Liang et al., "Variational Autoencoders for
  Collaborative Filtering", WWW 2018 (:mod:`aecore.recommend`).

Sampling and the KL term run through the fused op
:func:`aecore.kernels.reparameterize.reparameterize`.
The encoder outputs (mu, logvar) from one (B, 2 * latent_dim) layer: an MLP of ``hidden_dims``
or, with ``channels``, a convolutional encoder (:mod:`aecore.conv`). The conditional VAE feeds
the one-hot label to both sides: concatenated to the flat input (as constant planes for images)
and to the code.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aecore.autoencoder import Decoder, Encoder
from aecore.base import AutoEncoderBase
from aecore.checks import check_generator, number, positive_int, positive_ints
from aecore.kernels._backend import exporting
from aecore.kernels.reparameterize import LOGVAR_MAX, LOGVAR_MIN, reparameterize
from aecore.registry import register

LIKELIHOODS = ("bernoulli", "gaussian", "gaussian-learned", "multinomial")
VARIANCES = ("feature", "scalar")
LOG_SIGMA2_MIN, LOG_SIGMA2_MAX = -9.0, 9.0
SIGMA_MIN, SIGMA_MAX = 1e-4, 1e4  # a fixed sigma's range
_LOG_2PI = math.log(2.0 * math.pi)


@register
class VAE(AutoEncoderBase):
    """Variational autoencoder; ``beta`` != 1 weights the KL term (beta-VAE).

    MLP: ``input_dim`` and ``hidden_dims`` (the decoder mirrors them), inputs (B, input_dim).
    Conv: ``input_shape`` (C, H, W) and ``channels`` (H, W divisible by 2**len(channels)),
    inputs (B, C, H, W). ``encode`` -> (mu, logvar), each (B, latent_dim); ``decode`` -> the
    likelihood's mean (probabilities for Bernoulli; for multinomial the item probabilities, each
    row summing to 1), (B, *input_shape); ``forward`` = decode(mu).
    """

    family = "vae"
    num_classes: int = 0

    def __init__(self, input_dim: int | None = None, hidden_dims: Sequence[int] = (256,),
                 latent_dim: int = 16, activation: str = "relu", *,
                 input_shape: Sequence[int] | None = None, channels: Sequence[int] | None = None,
                 upsample: str = "bilinear", likelihood: str = "bernoulli", sigma: float = 1.0,
                 variance: str = "feature", beta: float = 1.0):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if variance not in VARIANCES:
            raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
        self.likelihood, self.variance = likelihood, variance
        # Bounded so that 1 / sigma^2 times a squared error stays finite in float32.
        self.sigma = number("sigma", sigma, SIGMA_MIN, SIGMA_MAX, hi_open=False)
        self.beta = number("beta", beta)
        self.latent_dim = positive_int("latent_dim", latent_dim)
        from aecore.conv import UPSAMPLE

        if upsample not in UPSAMPLE:  # for an MLP VAE too: config() saves it
            raise ValueError(f"upsample must be one of {UPSAMPLE}, got {upsample!r}")
        self.activation, self.upsample = activation, upsample
        self.hidden_dims = positive_ints("hidden_dims", hidden_dims)
        c = self.num_classes
        if channels is not None:
            from aecore.conv import ConvDecoder, ConvEncoder

            if input_dim is not None:
                raise ValueError("input_dim must be None for a convolutional VAE (give "
                                 "input_shape=(C, H, W) with channels)")
            if input_shape is None:
                raise ValueError("input_shape (C, H, W) is required with channels")
            probe = ConvEncoder(input_shape, channels, 1, activation)  # validates the shape
            shape = probe.input_shape
            self.channels: list[int] | None = list(probe.channels)
            self.encoder = ConvEncoder((shape[0] + c, *shape[1:]), self.channels,
                                       2 * self.latent_dim, activation)
            self.decoder = ConvDecoder(shape, self.channels[::-1], self.latent_dim + c,
                                       upsample, activation)
            self.input_shape = tuple(shape)
        else:
            if input_shape is not None:
                if len(tuple(input_shape)) != 1:
                    raise ValueError(f"input_shape must be (input_dim,) for an MLP VAE (give "
                                     f"channels for images), got {tuple(input_shape)!r}")
                if input_dim is not None and int(tuple(input_shape)[0]) != input_dim:
                    raise ValueError(f"input_dim {input_dim} and input_shape "
                                     f"{tuple(input_shape)} disagree")
                input_dim = tuple(input_shape)[0]
            if input_dim is None:
                raise ValueError("input_dim is required for an MLP VAE (or input_shape and "
                                 "channels for a convolutional one)")
            input_dim = positive_int("input_dim", input_dim)
            self.channels = None
            self.encoder = Encoder(input_dim + c, self.hidden_dims, 2 * self.latent_dim,
                                   activation)
            self.decoder = Decoder(self.latent_dim + c, self.hidden_dims[::-1], input_dim,
                                   activation)
            self.input_shape = (input_dim,)
        if likelihood == "gaussian-learned":
            shape = self.input_shape if variance == "feature" else ()
            self.log_sigma2 = nn.Parameter(torch.zeros(shape))

    # -- protocol ---------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        conv = self.channels is not None
        return {
            "input_dim": None if conv else self.input_shape[0],
            "hidden_dims": self.hidden_dims,
            "latent_dim": self.latent_dim,
            "activation": self.activation,
            "input_shape": list(self.input_shape) if conv else None,
            "channels": self.channels,
            "upsample": self.upsample,
            "likelihood": self.likelihood,
            "sigma": self.sigma,
            "variance": self.variance,
            "beta": self.beta,
        }

    def _onehot(self, y: torch.Tensor | None, n: int, device: torch.device,
                dtype: torch.dtype, arg: str = "y") -> torch.Tensor | None:
        """(n, num_classes) one-hot labels; None for the unconditional model. Errors name
        ``arg``, the caller's name for the labels."""
        if not self.num_classes:
            if y is not None:
                raise ValueError(f"{arg} must be None: this VAE is unconditional (use "
                                 "ConditionalVAE for labels)")
            return None
        if y is None:
            raise ValueError(f"{arg} is required: integer labels ({n},) in "
                             f"[0, {self.num_classes})")
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"{arg} must be a torch.Tensor of integer labels, "
                            f"got {type(y).__name__}")
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise TypeError(f"{arg} must hold integer labels, got {y.dtype}")
        if y.shape != (n,):
            raise ValueError(f"{arg} must have shape ({n},) (one label per sample), "
                             f"got {tuple(y.shape)}")
        # The range check reads values: impossible (and pointless) while export traces shapes.
        if n and not exporting() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"{arg} must be in [0, {self.num_classes}), got values in "
                             f"[{int(y.min())}, {int(y.max())}]")
        return F.one_hot(y.to(device).long(), self.num_classes).to(dtype)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, *input_shape) -> (mu, logvar), each (B, latent_dim)."""
        self.check_input(x)
        self.check_dtype(x)
        h = self._onehot(y, x.shape[0], x.device, x.dtype)
        if self.likelihood == "multinomial":
            x = F.normalize(x.flatten(1), dim=1).view_as(x)  # a zero row stays zero
        if h is not None:
            if self.channels is not None:
                h = h[:, :, None, None].expand(-1, -1, *x.shape[2:])
            x = torch.cat([x, h], dim=1)
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        return mu, logvar

    def _decode_raw(self, z: torch.Tensor, y: torch.Tensor | None = None,
                    arg: str = "y") -> torch.Tensor:
        """Logits (Bernoulli, multinomial) or means (Gaussian), (B, *input_shape); label errors
        name ``arg``."""
        if not isinstance(z, torch.Tensor) or not z.is_floating_point():
            raise TypeError(f"z must be a floating point torch.Tensor, got "
                            f"{getattr(z, 'dtype', type(z).__name__)}")
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must have shape (batch, {self.latent_dim}), "
                             f"got {tuple(z.shape)}")
        h = self._onehot(y, z.shape[0], z.device, z.dtype, arg)
        return self.decoder(z if h is None else torch.cat([z, h], dim=1))

    def _mean(self, raw: torch.Tensor) -> torch.Tensor:
        if self.likelihood == "multinomial":  # item probabilities, one distribution per row
            return torch.softmax(raw.flatten(1), dim=1).view_as(raw)
        return torch.sigmoid(raw) if self.likelihood == "bernoulli" else raw

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """(B, latent_dim) -> the likelihood's mean, (B, *input_shape)."""
        self.check_code(z)
        return self._mean(self._decode_raw(z, y))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Deterministic reconstruction decode(mu(x)), (B, *input_shape)."""
        return self.decode(self.encode(x, y)[0], y)

    # -- likelihood and bounds -----------------------------------------------------------------

    def check_support(self, target: torch.Tensor, arg: str = "target") -> None:
        """ValueError naming ``arg`` unless target lies in the likelihood's support: outside
        it a likelihood still gives finite numbers, meaningless ones. Once per call of loss,
        elbo and log_likelihood, not per draw."""
        if self.likelihood == "bernoulli" and bool(((target < 0) | (target > 1)).any()):
            raise ValueError(f"{arg} must be in [0, 1] for a Bernoulli likelihood (scale the "
                             "data into [0, 1], or use likelihood='gaussian')")
        if self.likelihood == "multinomial" and bool((target < 0).any()):
            raise ValueError(f"{arg} must be non-negative counts for a multinomial likelihood")

    def log_px(self, raw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """log p(target | z) per sample, (B,), from the decoder's raw output (B, *input_shape);
        float32 (float64 for a float64 decoder)."""
        # Half/bf16 outputs are summed in float32; float64 keeps its precision.
        cd = torch.float64 if raw.dtype == torch.float64 else torch.float32
        raw, target = raw.to(cd), target.to(cd)
        if self.likelihood == "bernoulli":
            lp = -F.binary_cross_entropy_with_logits(raw, target, reduction="none")
        elif self.likelihood == "multinomial":
            lp = target.flatten(1) * torch.log_softmax(raw.flatten(1), dim=1)
        elif self.likelihood == "gaussian":
            lp = -0.5 * ((target - raw).pow(2) / self.sigma ** 2
                         + 2 * math.log(self.sigma) + _LOG_2PI)
        else:
            ls2 = self.log_sigma2.clamp(LOG_SIGMA2_MIN, LOG_SIGMA2_MAX)
            lp = -0.5 * ((target - raw).pow(2) * torch.exp(-ls2) + ls2 + _LOG_2PI)
        return lp.flatten(1).sum(dim=1)

    def loss(self, x: torch.Tensor, y: torch.Tensor | None = None,
             target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{"loss": mean of recon + beta * kl (the negative beta-ELBO per sample), "recon": mean
        -log p(target | z), "kl": mean KL(q(z|x) || p(z))}; one z per sample. An
        unconditional VAE ignores ``y`` (the trainer passes labels to every model)."""
        y = y if self.num_classes else None
        target = self.check_loss_inputs(x, target)
        self.check_support(target)
        mu, logvar = self.encode(x, y)
        z, kl = reparameterize(mu, logvar)
        recon = -self.log_px(self._decode_raw(z, y), target)
        kl = kl.to(recon.dtype)
        return {"loss": (recon + self.beta * kl).mean(), "recon": recon.mean(),
                "kl": kl.mean()}

    def _repeat(self, t: torch.Tensor | None, k: int) -> torch.Tensor | None:
        """(B, ...) -> (B * k, ...), each row repeated k times in a row."""
        return None if t is None else t.repeat_interleave(k, dim=0)

    @torch.no_grad()
    def elbo(self, x: torch.Tensor, y: torch.Tensor | None = None, k: int = 1,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample ELBO (beta = 1), (B,): log p(x|z) averaged over ``k`` draws of z, minus KL."""
        k = positive_int("k", k)
        mu, logvar = self.encode(x, y)
        self.check_support(x, "x")
        z, kl = reparameterize(mu.repeat_interleave(k, 0), logvar.repeat_interleave(k, 0),
                               generator=generator)
        lp = self.log_px(self._decode_raw(z, self._repeat(y, k)), self._repeat(x, k))
        return lp.view(-1, k).mean(1) - kl.to(lp.dtype).view(-1, k)[:, 0]

    @torch.no_grad()
    def log_likelihood(self, x: torch.Tensor, y: torch.Tensor | None = None, k: int = 100,
                       chunk: int = 4096, generator: torch.Generator | None = None
                       ) -> torch.Tensor:
        """Importance-weighted estimate of log p(x) per sample, (B,), with ``k`` draws from q:
        logsumexp_i [log p(x|z_i) + log p(z_i) - log q(z_i|x)] - log k (the IWAE bound; it
        rises towards log p(x) with k). Float32 (float64 for a float64 model).

        Each decoder call takes at most ``chunk`` rows: whole inputs (k rows each) while
        k <= chunk, else one input's draws split across calls. The noise is one
        ``torch.randn((k, latent_dim))`` from ``generator`` per input, in order (float64 for a
        float64 model, else float32), so ``chunk`` changes nothing but the speed."""
        k = positive_int("k", k)
        chunk = positive_int("chunk", chunk)
        check_generator(generator)
        mu, logvar = self.encode(x, y)
        self.check_support(x, "x")
        B, L = mu.shape
        cd = torch.float64 if mu.dtype == torch.float64 else torch.float32
        m = mu.to(cd)
        lv = logvar.to(cd).clamp(LOGVAR_MIN, LOGVAR_MAX)  # the sampler's clamp
        std = torch.exp(0.5 * lv)
        # log q(z|x) from the eps that built z, -1/2 sum(eps^2 + lv + log 2pi): recovering eps
        # as (z - mu) / std loses it where std is below the float spacing at mu.
        log_q0 = -0.5 * (lv.sum(1) + L * _LOG_2PI)
        g_device = generator.device if generator is not None else mu.device
        per, step = max(1, chunk // k), min(k, chunk)  # inputs, and draws of each, per call
        out = []
        for i in range(0, B, per):
            sl = slice(i, i + per)
            n = m[sl].shape[0]
            eps = torch.stack([torch.randn(k, L, generator=generator, device=g_device, dtype=cd)
                               for _ in range(n)]).to(mu.device)  # (n, k, L)
            w = []  # log-weights (n, s) of draws [j, j + s), combined over all k below
            for j in range(0, k, step):
                e = eps[:, j:j + step]
                s = e.shape[1]
                z = m[sl, None] + std[sl, None] * e
                log_q = log_q0[sl, None] - 0.5 * e.pow(2).sum(2)
                log_pz = -0.5 * (z.pow(2).sum(2) + L * _LOG_2PI)
                yy = None if y is None else self._repeat(y[sl], s)
                raw = self._decode_raw(z.reshape(n * s, L).to(mu.dtype), yy)
                log_px = self.log_px(raw, self._repeat(x[sl], s)).view(n, s)
                w.append(log_px + log_pz - log_q)
            out.append(torch.logsumexp(torch.cat(w, 1), dim=1) - math.log(k))
        return torch.cat(out) if out else torch.zeros(0, dtype=cd, device=mu.device)

    # -- generation -------------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws of the likelihood's mean under z ~ p(z): (n, *input_shape).

        ``labels`` (conditional model): an int for all n, or (n,) integer labels."""
        n = positive_int("n", n)
        check_generator(generator)
        param = next(self.parameters())
        device = param.device
        if isinstance(labels, (int, np.integer)) and not isinstance(labels, bool):
            labels = torch.full((n,), int(labels), dtype=torch.long, device=device)
        g_device = generator.device if generator is not None else device
        # z in the model's dtype: the decoder takes no other.
        z = torch.randn(n, self.latent_dim, generator=generator, device=g_device,
                        dtype=param.dtype).to(device)
        return self._mean(self._decode_raw(z, labels, "labels"))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None, *,
                    sample: bool = False,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, *input_shape) -> decode(mu), or decode(z) with z ~ q(z|x) when ``sample``."""
        mu, logvar = self.encode(x, y)
        z = reparameterize(mu, logvar, generator=generator, return_kl=False) if sample else mu
        return self.decode(z, y)

    @torch.no_grad()
    def interpolate(self, x1: torch.Tensor, x2: torch.Tensor, steps: int = 8,
                    y: torch.Tensor | None = None) -> torch.Tensor:
        """Decode the straight line between the posterior means of x1 and x2.

        x1, x2: one sample (*input_shape) -> (steps, *input_shape), or a batch
        (B, *input_shape) -> (B, steps, *input_shape); endpoints included. ``y``: labels of the
        conditional model ((B,), or an int), held fixed along the path."""
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 2:
            raise ValueError(f"steps must be an integer >= 2 (the path includes both "
                             f"endpoints), got {steps!r}")
        steps = int(steps)
        single = isinstance(x1, torch.Tensor) and x1.dim() == len(self.input_shape)
        if single:
            x1 = x1.unsqueeze(0)
            x2 = x2.unsqueeze(0) if isinstance(x2, torch.Tensor) else x2
        self.check_input(x1, "x1")
        self.check_input(x2, "x2")
        if x1.shape != x2.shape:
            raise ValueError(f"x2 must have the shape of x1 {tuple(x1.shape)}, "
                             f"got {tuple(x2.shape)}")
        B = x1.shape[0]
        if isinstance(y, (int, np.integer)) and not isinstance(y, bool):
            y = torch.full((B,), int(y), dtype=torch.long, device=x1.device)
        m1, m2 = self.encode(x1, y)[0], self.encode(x2, y)[0]
        t = torch.linspace(0.0, 1.0, steps, device=x1.device, dtype=m1.dtype)
        z = m1[:, None, :] + t[None, :, None] * (m2 - m1)[:, None, :]  # (B, steps, L)
        out = self.decode(z.reshape(B * steps, -1), self._repeat(y, steps))
        out = out.view(B, steps, *self.input_shape)
        return out[0] if single else out


@register
class ConditionalVAE(VAE):
    """VAE conditioned on a class label: ``encode(x, y)``, ``decode(z, y)``, ``forward(x, y)``
    and ``sample(n, labels)`` take integer labels y (B,) in [0, num_classes)."""

    family = "cvae"

    def __init__(self, num_classes: int, input_dim: int | None = None,
                 hidden_dims: Sequence[int] = (256,), latent_dim: int = 16,
                 activation: str = "relu", **kwargs: Any):
        self.num_classes = positive_int("num_classes", num_classes)
        super().__init__(input_dim, hidden_dims, latent_dim, activation, **kwargs)

    def config(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, **super().config()}


def grid_shape(model: VAE, image_shape: Sequence[int] | None = None,
               name: str = "image_shape") -> tuple[int, ...]:
    """The shape :func:`sample_grid` draws ``model``'s samples in: (C, H, W) for an image
    model, ``image_shape`` or a square for a flat one. Errors name ``name``."""
    if len(model.input_shape) == 3:
        if image_shape is not None and tuple(image_shape) != tuple(model.input_shape):
            # Ignored, it would leave the caller thinking the images came out as asked.
            raise ValueError(f"{name} is for flat models; this one draws images of its own "
                             f"shape {tuple(model.input_shape)}, got {tuple(image_shape)}")
        return tuple(model.input_shape)
    size = model.input_shape[0]
    if image_shape is not None:
        # Integers >= 1 only: int() would truncate 8.7 to 8, and (-8, -8) has the right product.
        shape = tuple(positive_ints(name, image_shape))
        if len(shape) not in (2, 3) or math.prod(shape) != size:
            raise ValueError(f"{name} must be (H, W) or (C, H, W) of {size} values (the "
                             f"model's input), got {tuple(image_shape)}")
        return shape
    side = math.isqrt(size)
    if side * side != size:
        raise ValueError(f"model must produce images: input_shape {model.input_shape} is "
                         f"neither (C, H, W) nor a square number of pixels; pass {name}")
    return (side, side)


MAX_GRID = 4096  # samples in one PNG grid (8 wide): 512 rows of images


def sample_grid(model: VAE, n: int, path: str | os.PathLike, label: int | None = None,
                seed: int = 0, image_shape: Sequence[int] | None = None) -> np.ndarray:
    """Draw ``n`` samples from the prior and write them as a PNG grid at ``path``.

    For a conditional model, ``label`` fixes the class of every sample; without it each row of
    the grid (8 wide) is one class, row r class r % num_classes. A flat model's samples are
    drawn as ``image_shape`` ((H, W) or (C, H, W)), by default square. Returns the images,
    (n, H, W) or (n, C, H, W), in [0, 1], as drawn.

    Samples are mapped back to the training data's raw units through ``model.normalization``
    (if any), and then to [0, 1] for display:

    * raw values within [0, 1] are drawn as they are;
    * otherwise, with one scale for all values (an image data set's normalization maps its
      range, e.g. bytes 0..255, onto [0, 1]), by that scale: the model's own [0, 1] values;
    * otherwise (per-feature standardisation of a flat table, e.g. pixels 0..16), by the
      grid's own minimum and maximum, so that the darkest value is black and the brightest
      white.
    """
    from aecore.plots import save_image_grid

    if not isinstance(model, VAE):
        raise TypeError(f"model must be a VAE or ConditionalVAE, got {type(model).__name__}")
    n = positive_int("n", n)
    if n > MAX_GRID:
        raise ValueError(f"n must be at most {MAX_GRID} (the samples of one PNG grid), got {n}")
    shape = grid_shape(model, image_shape)
    nrow = 8  # the grid's width
    labels = None
    if model.num_classes:
        if label is None:
            labels = (torch.arange(n) // nrow) % model.num_classes
        else:
            if isinstance(label, bool) or not isinstance(label, (int, np.integer)) \
                    or not 0 <= label < model.num_classes:
                raise ValueError(f"label must be an int in [0, {model.num_classes}), "
                                 f"got {label!r}")
            labels = torch.full((n,), int(label), dtype=torch.long)
    elif label is not None:
        raise ValueError("label must be None for an unconditional model")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(int(seed))
    was_training = model.training
    model.eval()
    try:
        imgs = model.sample(n, None if labels is None else labels.to(device), generator=gen)
    finally:
        model.train(was_training)
    imgs = _displayable(model, imgs.float().cpu().numpy()).reshape(n, *shape)
    save_image_grid(imgs, path, nrow=nrow)
    return imgs


def _displayable(model: VAE, x: np.ndarray) -> np.ndarray:
    """Model-space samples (n, *input_shape) -> [0, 1] values to draw (see sample_grid)."""
    norm = model.normalization
    raw = x if norm is None else norm.invert(x)
    if raw.min() >= 0.0 and raw.max() <= 1.0:
        return raw
    if norm is None or (np.size(norm.mean) == 1 and np.size(norm.std) == 1):
        # One scale for every value: model space is the data's range mapped onto [0, 1].
        return np.clip(x, 0.0, 1.0)
    lo, hi = float(raw.min()), float(raw.max())
    if not hi > lo:  # constant (or non-finite) samples: nothing to stretch
        return np.clip(raw, 0.0, 1.0)
    return ((raw - lo) / (hi - lo)).astype(np.float32)
