"""VQ-VAE: an autoencoder whose code is a grid of ``num_latents`` entries of a learned codebook.

The encoder maps x to z_e (B, num_latents * code_dim), viewed as B * num_latents vectors of
``code_dim``; each is replaced by its nearest codebook entry e (:func:`aecore.kernels.vq_nearest`)
and the decoder reconstructs from z_q. Gradients pass the quantiser straight through
(z_q = z_e + sg[e - z_e]). The loss is

    recon + ||sg[z_e] - e||^2 + beta * ||z_e - sg[e]||^2       (squared norms as means)

With ``ema=True`` the codebook is not learned by gradients: each training step moves every code
to an exponential moving average of the encoder outputs assigned to it (``decay``; counts
Laplace-smoothed by ``eps`` so that rarely used codes don't divide by ~0), and the codebook term
drops out of the loss (it is still reported). With ``dead_after`` = n > 0, codes unused for n
training steps are re-seeded with random encoder outputs of the current batch (drawn from the
model's own torch.Generator, seeded by ``seed``; ``rng_state``/``set_rng_state`` let
checkpoints carry it). Both updates happen inside ``loss`` in training mode, after the loss
terms are computed.

The encoder is an MLP (``input_dim``, ``hidden_dims``; the decoder mirrors it) or, with
``channels``, a convolutional one for (C, H, W) images (:mod:`aecore.conv`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from aecore.autoencoder import Decoder, Encoder
from aecore.base import AutoEncoderBase
from aecore.checks import number, positive_int, positive_ints
from aecore.kernels.vq import vq_nearest
from aecore.registry import register


def _process_group() -> bool:
    """True inside a torch.distributed run of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def perplexity(indices: torch.Tensor, num_codes: int) -> torch.Tensor:
    """exp(entropy) of the code usage in ``indices`` (any shape, int64 in [0, num_codes)):
    1 when one code is used, num_codes when all are used equally. Returns a float32 scalar."""
    return perplexity_of_counts(torch.bincount(indices.reshape(-1), minlength=num_codes))


def perplexity_of_counts(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of a code histogram ``counts`` (num_codes,): the perplexity of the codes it
    counts, so that histograms summed over batches give the perplexity of the whole set.
    Returns a float32 scalar."""
    counts = counts.float()
    p = counts / counts.sum().clamp_min(1.0)
    # 0 log 0 = 0: unused codes contribute nothing.
    return torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum())


@register
class VQVAE(AutoEncoderBase):
    """Vector-quantised autoencoder with a ``num_codes`` x ``code_dim`` codebook.

    MLP: ``input_dim`` and ``hidden_dims``, inputs (B, input_dim). Conv: ``input_shape``
    (C, H, W) and ``channels``, inputs (B, C, H, W). ``encode`` -> z_e (B, latent_dim) with
    latent_dim = num_latents * code_dim; ``quantize(z_e)`` -> (z_q (B, latent_dim),
    indices int64 (B, num_latents)); ``decode(z_q)`` -> (B, *input_shape); ``forward`` =
    decode(quantize(encode(x))); ``codes(x)`` -> indices; ``decode_codes(indices)``.
    """

    family = "vq-vae"

    def __init__(self, input_dim: int | None = None, hidden_dims: Sequence[int] = (256,),
                 num_latents: int = 4, code_dim: int = 16, num_codes: int = 64,
                 activation: str = "relu", *, input_shape: Sequence[int] | None = None,
                 channels: Sequence[int] | None = None, upsample: str = "bilinear",
                 beta: float = 0.25, ema: bool = False, decay: float = 0.99, eps: float = 1e-5,
                 dead_after: int = 0, seed: int = 0):
        super().__init__()
        self.num_latents = positive_int("num_latents", num_latents)
        self.code_dim = positive_int("code_dim", code_dim)
        self.num_codes = positive_int("num_codes", num_codes)
        self.latent_dim = self.num_latents * self.code_dim
        self.beta = number("beta", beta)
        # decay 0 would replace the averages with one batch's, wiping the codes it missed.
        self.decay = number("decay", decay, 0.0, 1.0, lo_open=True)
        self.eps = number("eps", eps, lo_open=True)
        if not isinstance(ema, bool):
            raise TypeError(f"ema must be a bool, got {type(ema).__name__}")
        if isinstance(dead_after, bool) or not isinstance(dead_after, int) or dead_after < 0:
            raise ValueError(f"dead_after must be a non-negative integer (0 = never re-seed), "
                             f"got {dead_after!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.ema, self.dead_after, self.seed = ema, dead_after, seed
        from aecore.conv import UPSAMPLE

        if upsample not in UPSAMPLE:  # for an MLP VQ-VAE too: config() saves it
            raise ValueError(f"upsample must be one of {UPSAMPLE}, got {upsample!r}")
        self.activation, self.upsample = activation, upsample
        self.hidden_dims = positive_ints("hidden_dims", hidden_dims)
        if channels is not None:
            from aecore.conv import ConvDecoder, ConvEncoder

            if input_dim is not None:
                raise ValueError("input_dim must be None for a convolutional VQ-VAE (give "
                                 "input_shape=(C, H, W) with channels)")
            if input_shape is None:
                raise ValueError("input_shape (C, H, W) is required with channels")
            self.encoder = ConvEncoder(input_shape, channels, self.latent_dim, activation)
            self.channels: list[int] | None = list(self.encoder.channels)
            self.input_shape = tuple(self.encoder.input_shape)
            self.decoder = ConvDecoder(self.input_shape, self.channels[::-1], self.latent_dim,
                                       upsample, activation)
        else:
            if input_shape is not None:
                if len(tuple(input_shape)) != 1:
                    raise ValueError(f"input_shape must be (input_dim,) for an MLP VQ-VAE (give "
                                     f"channels for images), got {tuple(input_shape)!r}")
                dim = positive_int("input_shape[0]", tuple(input_shape)[0])
                if input_dim is not None and dim != input_dim:
                    raise ValueError(f"input_dim {input_dim} and input_shape "
                                     f"{tuple(input_shape)} disagree")
                input_dim = dim
            if input_dim is None:
                raise ValueError("input_dim is required for an MLP VQ-VAE (or input_shape and "
                                 "channels for a convolutional one)")
            input_dim = positive_int("input_dim", input_dim)
            self.channels = None
            self.encoder = Encoder(input_dim, self.hidden_dims, self.latent_dim, activation)
            self.decoder = Decoder(self.latent_dim, self.hidden_dims[::-1], input_dim, activation)
            self.input_shape = (input_dim,)

        self._generator = torch.Generator().manual_seed(seed)
        k = self.num_codes
        init = (torch.rand(k, self.code_dim, generator=self._generator) * 2 - 1) / k
        if ema:
            # Updated by moving averages, never by an optimizer: a buffer, not a parameter.
            self.register_buffer("codebook", init)
            # Every code starts as if assigned once to itself: the average is then defined
            # from the first step, and unused codes keep their value as both terms decay.
            self.register_buffer("ema_count", torch.ones(k))
            self.register_buffer("ema_sum", init.clone())
        else:
            self.codebook = torch.nn.Parameter(init)
        # Training steps since each code was last assigned (for dead-code re-seeding).
        self.register_buffer("unused_steps", torch.zeros(k, dtype=torch.int64))

    # -- protocol ---------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        conv = self.channels is not None
        return {
            "input_dim": None if conv else self.input_shape[0],
            "hidden_dims": self.hidden_dims,
            "num_latents": self.num_latents,
            "code_dim": self.code_dim,
            "num_codes": self.num_codes,
            "activation": self.activation,
            "input_shape": list(self.input_shape) if conv else None,
            "channels": self.channels,
            "upsample": self.upsample,
            "beta": self.beta,
            "ema": self.ema,
            "decay": self.decay,
            "eps": self.eps,
            "dead_after": self.dead_after,
            "seed": self.seed,
        }

    def rng_state(self) -> torch.Tensor:
        """The re-seeding generator's state, uint8 (N,): not in the state_dict (it is no
        weight), so the Trainer keeps it with its checkpoints for exact resumes."""
        return self._generator.get_state()

    def set_rng_state(self, state: torch.Tensor) -> None:
        """Restore a state from :meth:`rng_state`."""
        self._generator.set_state(state.cpu())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, *input_shape) -> continuous z_e (B, latent_dim)."""
        self.check_input(x)
        self.check_dtype(x)
        return self.encoder(x)

    def _assign(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat z_e (B * num_latents, code_dim), indices (B * num_latents,))."""
        if not isinstance(z_e, torch.Tensor) or not z_e.is_floating_point():
            raise TypeError(f"z_e must be a floating point torch.Tensor, got "
                            f"{getattr(z_e, 'dtype', type(z_e).__name__)}")
        if z_e.dim() != 2 or z_e.shape[1] != self.latent_dim:
            raise ValueError(f"z_e must have shape (batch, {self.latent_dim}) (num_latents * "
                             f"code_dim), got {tuple(z_e.shape)}")
        flat = z_e.reshape(-1, self.code_dim)
        idx, _ = vq_nearest(flat, self.codebook.to(flat.dtype))
        return flat, idx

    def quantize(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z_e (B, latent_dim) -> (z_q (B, latent_dim), indices int64 (B, num_latents)).

        With gradients enabled z_q = z_e + sg[e - z_e] (straight-through: d z_q / d z_e = I);
        otherwise z_q is the codes themselves. A row of z_e holding NaN or Inf has no nearest
        code: its z_q row is NaN (its index means nothing).
        """
        flat, idx = self._assign(z_e)
        e = self.codebook[idx].to(z_e.dtype)
        if torch.is_grad_enabled():
            e = flat + (e - flat).detach()  # NaN wherever flat is NaN or Inf
        else:
            # Else a NaN input would decode, without a sign, as code 0.
            e = e.masked_fill(~torch.isfinite(flat).all(1, keepdim=True), float("nan"))
        return e.reshape(z_e.shape), idx.reshape(z_e.shape[0], self.num_latents)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z_q (B, latent_dim) -> reconstruction (B, *input_shape)."""
        self.check_code(z)
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.quantize(self.encode(x))[0])

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """(B, *input_shape) -> code indices int64 (B, num_latents)."""
        z = self.encode(x)
        if not torch.isfinite(z).all():
            # The nearest-code search would name code 0 for a NaN code: an answer, not an error.
            raise ValueError("x must be finite: its codes hold NaN or Inf")
        return self.quantize(z)[1]

    def decode_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, num_latents), integer in [0, num_codes) -> (B, *input_shape)."""
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
        if indices.dtype.is_floating_point or indices.dtype.is_complex \
                or indices.dtype == torch.bool:
            raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
        if indices.dim() != 2 or indices.shape[1] != self.num_latents:
            raise ValueError(f"indices must have shape (batch, {self.num_latents}), got "
                             f"{tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_codes):
            raise ValueError(f"indices must lie in [0, {self.num_codes}), got values in "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        return self.decode(self._lookup(indices.long()))

    def _lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """int64 code indices (B, num_latents) in [0, num_codes), unchecked (callers check or
        mask: ``decode_codes``, the exported ``code_decoder``) -> z_q (B, latent_dim)."""
        # Clamped so that a graph, in which nothing can raise, never reads past the codebook.
        e = self.codebook[indices.clamp(0, self.num_codes - 1)]
        return e.reshape(indices.shape[0], self.latent_dim)

    def loss(self, x: torch.Tensor, y: torch.Tensor | None = None,
             target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """{"loss", "recon" (MSE), "codebook", "commitment" (beta included), "perplexity"
        (of this batch's codes)}.

        In training mode this also performs the EMA codebook update and dead-code re-seeding.
        """
        return self.loss_and_statistics(x, y, target)[0]

    def loss_and_statistics(self, x: torch.Tensor, y: torch.Tensor | None = None,
                            target: torch.Tensor | None = None
                            ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(:meth:`loss`'s terms, the batch's additive statistics ``{"code_counts"}``: its code
        histogram (num_codes,) int64).

        A perplexity is no mean over samples: the statistics summed over the batches of a set
        give, through :meth:`pooled_terms`, the perplexity of the whole set, whatever its
        batching (:func:`aecore.train.evaluate` reports that one).
        """
        # y (labels the Trainer passes to every model) plays no part: the VQ-VAE is
        # unconditional, like the other unconditional families.
        target = self.check_loss_inputs(x, target)
        z_e = self.encode(x)
        flat, idx = self._assign(z_e)
        e = self.codebook[idx].to(flat.dtype)
        z_q = flat + (e - flat).detach()
        recon = F.mse_loss(self.decode(z_q.reshape(z_e.shape)), target)
        codebook = F.mse_loss(e, flat.detach())
        commitment = self.beta * F.mse_loss(flat, e.detach())
        loss = recon + commitment if self.ema else recon + codebook + commitment
        counts = torch.bincount(idx, minlength=self.num_codes)
        terms = {"loss": loss, "recon": recon, "codebook": codebook.detach() if self.ema
                 else codebook, "commitment": commitment,
                 "perplexity": perplexity_of_counts(counts)}
        if self.training:
            self._update_codebook(flat.detach(), idx)
        return terms, {"code_counts": counts}

    def pooled_terms(self, statistics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The terms of a whole set from the sums of its batches' :meth:`loss_and_statistics`
        statistics: ``{"perplexity"}`` of its code histogram."""
        return {"perplexity": perplexity_of_counts(statistics["code_counts"])}

    # -- codebook maintenance ---------------------------------------------------------------------

    @torch.no_grad()
    def _update_codebook(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        """EMA update (ema=True) and dead-code re-seeding for one training batch.

        flat: encoder outputs (M, code_dim); idx: their codes (M,). A batch whose outputs hold
        NaN or Inf changes nothing: its sums would turn the codebook (and every later code) into
        NaN, while its loss, NaN already, tells the caller.
        """
        bad = torch.isfinite(flat).all().logical_not().to(self.codebook.dtype).reshape(1)
        group = _process_group()
        if group:
            dist.all_reduce(bad)  # all processes skip together: the others would wait on it
        if bad.item():
            return
        k = self.num_codes
        counts = torch.bincount(idx, minlength=k).to(self.codebook.dtype)
        if group:
            # Data parallel: every process updates from the whole global batch, so the
            # codebooks (buffers, which gradient averaging never touches) stay identical.
            dist.all_reduce(counts)
        if self.ema:
            sums = torch.zeros_like(self.ema_sum).index_add_(0, idx, flat.to(self.ema_sum.dtype))
            if group:
                dist.all_reduce(sums)
            self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            n = self.ema_count.sum()
            smoothed = (self.ema_count + self.eps) / (n + k * self.eps) * n
            self.codebook.copy_(self.ema_sum / smoothed[:, None])
        used = counts > 0
        self.unused_steps.add_(1).masked_fill_(used, 0)
        if self.dead_after <= 0:
            return
        dead = (self.unused_steps >= self.dead_after).nonzero().flatten()
        if dead.numel() == 0 or flat.shape[0] == 0:
            return
        pick = torch.randint(flat.shape[0], (dead.numel(),), generator=self._generator)
        fresh = flat[pick.to(flat.device)].to(self.codebook.dtype)
        if group:
            # The same dead codes everywhere (global counts); rank 0's batch re-seeds them.
            dist.broadcast(fresh, src=0)
        self.codebook.data[dead] = fresh
        if self.ema:
            self.ema_sum[dead] = fresh
            self.ema_count[dead] = 1.0
        self.unused_steps[dead] = 0
