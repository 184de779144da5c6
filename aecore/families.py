"""What ``aecore train --model NAME`` builds: one builder per CLI model name.

A builder takes the data set and the CLI's size options and returns a model; defaults per data
set live here so that every family trains sensibly with no options at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aecore.data import Dataset
from aecore.kernels._activations import ACTIVATIONS


@dataclass
class Sizes:
    """Model-size options shared by every family (None = the data set's default)."""

    hidden: list[int] | None = None
    latent: int | None = None
    activation: str | None = None
    channels: list[int] | None = None
    weight: float | None = None  # the family's penalty weight (lam, beta, sparsity weight)


# Families without a penalty or prior weight for --weight to set.
UNWEIGHTED = {"ae", "tied-ae", "dae", "conv-ae"}
# Values per vq-vae code vector: latent size L is L / VQ_CODE_DIM vectors.
VQ_CODE_DIM = 8


def default_hidden(data: Dataset) -> list[int]:
    if data.interactions:  # Liang et al.'s I-600-200 recommender
        return [600]
    d = data.input_dim
    if d <= 3:  # low-dimensional manifolds (the swiss roll): a smooth chart needs some depth
        return [128, 128]
    return [512, 128] if d >= 512 else [max(4 * d, 32)] if d < 16 else [max(d // 2, 16)]


def default_activation(data: Dataset) -> str:
    if data.interactions:
        return "tanh"
    # silu for low-dimensional data: relu charts of a curved 2-D sheet come out piecewise flat.
    return "silu" if data.input_dim <= 3 else "relu"


def default_epochs(n_train: int, batch_size: int, min_steps: int = 1500) -> int:
    """10 epochs, or more on small data sets so that training runs at least ``min_steps``
    optimizer steps (the swiss roll's 2880 training points make 23 batches of 128 an epoch,
    so 66 epochs)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be a positive integer, got {batch_size}")
    steps = max(1, -(-n_train // batch_size))
    return max(10, -(-min_steps // steps))


def default_latent(data: Dataset) -> int:
    if data.interactions:
        return 200
    d = data.input_dim
    return 32 if d >= 512 else 2 if d <= 3 else max(d // 4, 2)


def check_sizes(s: Sizes) -> None:
    """Reject sizes that are given but unusable: the builders' ``s.x or default`` would quietly
    replace 0 or an empty list by the default."""
    def positive(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    if s.latent is not None and not positive(s.latent):
        raise ValueError(f"--latent must be a positive integer, got {s.latent!r}")
    if s.activation is not None and s.activation not in ACTIVATIONS:
        raise ValueError(f"--activation must be one of {', '.join(ACTIVATIONS)}, "
                         f"got {s.activation!r}")
    for flag, sizes in (("--hidden", s.hidden), ("--channels", s.channels)):
        if sizes is not None and (not isinstance(sizes, (list, tuple)) or not sizes
                                  or not all(positive(v) for v in sizes)):
            raise ValueError(f"{flag} must be a comma-separated list of positive integers, "
                             f"got {sizes!r}")


def check_flags(name: str, s: Sizes) -> None:
    """Reject the CLI's size options that family ``name`` has no use for: the shared
    :class:`Sizes` of an API call may carry them, but a flag the user typed would be ignored
    without a word (or, for vq-vae's latent size, rounded)."""
    if s.weight is not None and name in UNWEIGHTED:
        raise ValueError(f"--weight is for families with a penalty or prior weight; {name!r} "
                         "has none")
    if s.hidden is not None and name in IMAGE_INPUT:
        raise ValueError(f"--hidden is for MLP families; {name!r} is sized by --channels")
    if s.channels is not None and name not in IMAGE_INPUT:
        raise ValueError(f"--channels is for convolutional families; {name!r} is sized by "
                         "--hidden")
    if name == "vq-vae" and s.latent is not None and s.latent % VQ_CODE_DIM:
        raise ValueError(f"--latent must be a multiple of {VQ_CODE_DIM} for vq-vae (its code is "
                         f"latent / {VQ_CODE_DIM} vectors of {VQ_CODE_DIM} values), got {s.latent}")


def _mlp_kwargs(data: Dataset, s: Sizes) -> dict:
    return {"input_dim": data.input_dim, "hidden_dims": s.hidden or default_hidden(data),
            "latent_dim": s.latent or default_latent(data),
            "activation": s.activation or default_activation(data)}


def _ae(data: Dataset, s: Sizes, **kw):
    from aecore.autoencoder import AutoEncoder

    out = "sigmoid" if data.is_image else "identity"
    return AutoEncoder(**_mlp_kwargs(data, s), output_activation=out, **kw)


def _conv_ae(data: Dataset, s: Sizes):
    from aecore.conv import ConvAutoEncoder

    return ConvAutoEncoder(data.sample_shape, channels=s.channels or [32, 64],
                           latent_dim=s.latent or default_latent(data),
                           activation=s.activation or default_activation(data))


def _sparse_ae(data: Dataset, s: Sizes, sparsity: str):
    from aecore.sparse import SparseAutoEncoder

    out = "sigmoid" if data.is_image else "identity"
    return SparseAutoEncoder(**_mlp_kwargs(data, s), output_activation=out, sparsity=sparsity,
                             weight=s.weight)


def _weighted(cls: type, data: Dataset, s: Sizes):
    """An MLP family whose penalty weight is its ``lam`` argument."""
    out = "sigmoid" if data.is_image else "identity"
    lam = {} if s.weight is None else {"lam": s.weight}
    return cls(**_mlp_kwargs(data, s), output_activation=out, **lam)


def _cae(data: Dataset, s: Sizes):
    from aecore.contractive import ContractiveAutoEncoder

    return _weighted(ContractiveAutoEncoder, data, s)


def _vq_vae(data: Dataset, s: Sizes):
    from aecore.vqvae import VQVAE

    # The code is num_latents vectors of CODE_DIM values, each replaced by one of 128 codebook
    # entries (7 bits each): latent size L gives L / CODE_DIM vectors (the default rounded up).
    latent = s.latent or default_latent(data)
    return VQVAE(data.input_dim, s.hidden or default_hidden(data),
                 num_latents=-(-latent // VQ_CODE_DIM),
                 code_dim=VQ_CODE_DIM, num_codes=128,
                 activation=s.activation or default_activation(data),
                 ema=True, dead_after=100,
                 **({} if s.weight is None else {"beta": s.weight}))


def _grae(data: Dataset, s: Sizes):
    from aecore.geometry import GeometryAutoEncoder

    return _weighted(GeometryAutoEncoder, data, s)


def _vae(data: Dataset, s: Sizes, beta: float | None = None, conditional: bool = False):
    from aecore.vae import VAE, ConditionalVAE

    # Bernoulli likelihood for images in [0, 1]; Gaussian for standardised tabular data;
    # multinomial for interaction rows, with Liang et al.'s beta of 0.2 (their annealing's end).
    likelihood = ("multinomial" if data.interactions else "bernoulli" if data.is_image
                  else "gaussian")
    if beta is None:
        beta = 0.2 if data.interactions else 1.0
    kw = {"likelihood": likelihood, "beta": s.weight if s.weight is not None else beta}
    mlp = _mlp_kwargs(data, s)
    if conditional:
        return ConditionalVAE(data.num_classes, **mlp, **kw)
    return VAE(**mlp, **kw)


BUILDERS: dict[str, Callable] = {
    "ae": _ae,
    "tied-ae": lambda data, s: _ae(data, s, tied=True),
    "dae": _ae,
    "conv-ae": _conv_ae,
    "cae": _cae,
    "grae": _grae,
    "vq-vae": _vq_vae,
    "vae": _vae,
    "beta-vae": lambda data, s: _vae(data, s, beta=4.0),
    "cvae": lambda data, s: _vae(data, s, conditional=True),
    "sparse-ae": lambda data, s: _sparse_ae(data, s, "kl"),
    "sparse-l1-ae": lambda data, s: _sparse_ae(data, s, "l1"),
}

# Families whose models take images as (B, C, H, W); the rest take flat (B, input_dim) rows.
IMAGE_INPUT: set[str] = {"conv-ae"}
# Families whose training uses the labels (conditional models).
USES_LABELS: set[str] = {"cvae"}
# Families trained towards a manifold embedding of their training inputs (the targets y).
USES_EMBEDDING: set[str] = {"grae"}
# Families trained on corrupted inputs by default (the corruption spec; --corruption overrides).
DEFAULT_CORRUPTION: dict[str, str] = {"dae": "gaussian:0.3"}
# On interaction rows every family trains on masked rows (half of each user's items dropped,
# as Liang et al.'s input dropout), against the whole row.
INTERACTIONS_CORRUPTION = "mask:0.5"


def default_corruption(name: str, data: Dataset) -> str | None:
    """The corruption spec family ``name`` trains with on ``data`` by default, or None."""
    return INTERACTIONS_CORRUPTION if data.interactions else DEFAULT_CORRUPTION.get(name)


def train_targets(name: str, data: Dataset, x, latent_dim: int, seed: int = 0):
    """What family ``name`` trains towards besides its inputs ``x`` (the first len(x) inputs
    of the training split): class labels (conditional models), a manifold embedding of x
    (geometry models, :func:`aecore.geometry.manifold_embedding`), or None."""
    if name in USES_LABELS:
        return data.labels("train")[:len(x)]
    if name in USES_EMBEDDING:
        from aecore.geometry import manifold_embedding

        return manifold_embedding(x, latent_dim, seed=seed)
    return None


def build(name: str, data: Dataset, sizes: Sizes | None = None):
    """Build the model the CLI calls ``name`` for ``data``."""
    if name not in BUILDERS:
        raise ValueError(f"model must be one of {sorted(BUILDERS)}, got {name!r}")
    if name in IMAGE_INPUT and not data.is_image:
        raise ValueError(f"model {name!r} needs image data; {data.name!r} has samples of shape "
                         f"{data.sample_shape}")
    if name in USES_LABELS and data.num_classes is None:
        raise ValueError(f"model {name!r} needs labelled data; {data.name!r} has no labels")
    sizes = sizes or Sizes()
    check_sizes(sizes)
    model = BUILDERS[name](data, sizes)
    model.normalization = data.normalization
    return model
