"""Data sets: Fashion-MNIST, scikit-learn's digits and swiss roll, MovieLens 100k (implicit
feedback), and the user's own arrays.

Every loader returns a :class:`Dataset` whose raw arrays keep their units; ``inputs()`` gives
model inputs through the dataset's :class:`~aecore.normalization.Normalization`, which is saved
with every model trained on it.
"""

from __future__ import annotations

import gzip
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aecore.normalization import Normalization

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
# MovieLens 100k's ratings (user, item, rating, timestamp; tab separated): GroupLens's u.data,
# or the copy with a header line that the recbole wheel carries.
MOVIELENS_FILES = ("u.data", "ml-100k.inter")
NAMES = ("fashion-mnist", "digits", "swiss-roll", "movielens-100k")
INTERACTIONS = ("movielens-100k",)  # the named data sets of (users, items) rows


@dataclass
class Dataset:
    """A train/test split. ``x_*`` are raw arrays (N, *sample_shape); ``y_*`` labels or None.

    ``sample_shape`` is (C, H, W) for images and (F,) for tabular data. ``interactions``:
    rows are users' interactions with F items (0/1), as recommenders take them.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray | None
    normalization: Normalization
    sample_shape: tuple[int, ...]
    num_classes: int | None = None
    interactions: bool = False

    @property
    def is_image(self) -> bool:
        return len(self.sample_shape) == 3

    @property
    def input_dim(self) -> int:
        return int(np.prod(self.sample_shape))

    def inputs(self, split: str = "train", flat: bool = True) -> np.ndarray:
        """Normalised float32 model inputs: (N, input_dim) if ``flat`` else (N, *sample_shape)."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        x = self.normalization.apply(self.x_train if split == "train" else self.x_test)
        return x.reshape(len(x), -1) if flat else x.reshape(len(x), *self.sample_shape)

    def labels(self, split: str = "train") -> np.ndarray | None:
        """Class labels (N,) of ``split``, or None for unlabelled data."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return self.y_train if split == "train" else self.y_test

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> Dataset:
        """The first ``n_train`` / ``n_test`` samples (for quick runs)."""
        for name, n in (("n_train", n_train), ("n_test", n_test)):
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
                raise ValueError(f"{name} must be an int >= 0 or None, got {n!r}")

        def cut(a, n):
            return a if a is None or n is None else a[:n]
        return Dataset(self.name, cut(self.x_train, n_train), cut(self.y_train, n_train),
                       cut(self.x_test, n_test), cut(self.y_test, n_test), self.normalization,
                       self.sample_shape, self.num_classes, self.interactions)


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format): magic, dims, then uint8 data."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # not gzip, or cut short
        raise ValueError(f"{path} is not a readable gzip file ({e})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {body.size} bytes")
    return body.reshape(dims)


def fashion_mnist_named(root: str | os.PathLike | None = None) -> str | os.PathLike | None:
    """The Fashion-MNIST folder the user named: ``root``, else $AECORE_FASHION_MNIST (when set
    and not empty); None when neither names one."""
    return root if root is not None else os.environ.get("AECORE_FASHION_MNIST") or None


def _fashion_mnist_folders(root: str | os.PathLike | None) -> list:
    # A folder the user named is the only place looked in: the system copy never stands in for
    # it quietly.
    named = fashion_mnist_named(root)
    return [named] if named is not None else list(FASHION_MNIST_DIRS)


def find_fashion_mnist(root: str | os.PathLike | None = None) -> Path | None:
    """The folder holding the four Fashion-MNIST files: ``root``, else $AECORE_FASHION_MNIST,
    else the Debian package's location; None when absent from the one looked in."""
    for c in _fashion_mnist_folders(root):
        files = [f for pair in FASHION_MNIST_FILES.values() for f in pair]
        if c and all((Path(c) / f).is_file() for f in files):
            return Path(c)
    return None


def load_fashion_mnist(root: str | os.PathLike | None = None) -> Dataset:
    """Fashion-MNIST: 60000 train / 10000 test 28x28 grey images, 10 classes."""
    folder = find_fashion_mnist(root)
    if folder is None:
        where = " or ".join(repr(str(c)) for c in _fashion_mnist_folders(root))
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {where}. Install it with "
            "`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or download the four "
            "*-ubyte.gz files from the Fashion-MNIST project and pass their folder "
            "(--data-root DIR or AECORE_FASHION_MNIST=DIR)."
        )
    arrays = {}
    for split, (img, lab) in FASHION_MNIST_FILES.items():
        x = _read_idx(folder / img)
        y = _read_idx(folder / lab).astype(np.int64)
        if x.ndim != 3 or x.shape[1:] != (28, 28):
            raise ValueError(f"{folder / img} must hold 28x28 images (N, 28, 28), got shape "
                             f"{x.shape}")
        if y.ndim != 1 or (y.size and int(y.max()) > 9):
            raise ValueError(f"{folder / lab} must hold class ids 0-9 (N,), got shape {y.shape}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{folder}: {img} and {lab} hold different sample counts")
        arrays[split] = (x[:, None, :, :], y)
    return Dataset("fashion-mnist", arrays["train"][0], arrays["train"][1], arrays["test"][0],
                   arrays["test"][1], Normalization(mean=0.0, std=255.0), (1, 28, 28), 10)


def _split(x: np.ndarray, y: np.ndarray | None, test_fraction: float, seed: int):
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = max(1, int(round(len(x) * test_fraction)))
    if n_test >= len(x):
        raise ValueError(f"test_fraction={test_fraction} of {len(x)} samples leaves no training "
                         "samples: use a smaller test_fraction or more data")
    te, tr = order[:n_test], order[n_test:]
    return x[tr], (None if y is None else y[tr]), x[te], (None if y is None else y[te])


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 1797 8x8 handwritten digits (pixel values 0..16), 10 classes."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = d.images.astype(np.float32)[:, None, :, :]
    parts = _split(x, d.target.astype(np.int64), test_fraction, seed)
    return Dataset("digits", *parts, Normalization(mean=0.0, std=16.0), (1, 8, 8), 10)


def load_swiss_roll(n: int = 4000, noise: float = 0.05, test_fraction: float = 0.2,
                    seed: int = 0) -> Dataset:
    """The 3-D swiss roll; ``y`` is the position along the roll (the 1-D manifold coordinate)."""
    from sklearn.datasets import make_swiss_roll

    x, t = make_swiss_roll(n_samples=n, noise=noise, random_state=seed)
    x = x.astype(np.float32)
    parts = _split(x, t.astype(np.float32), test_fraction, seed)
    return Dataset("swiss-roll", *parts, Normalization.fit(parts[0]), (3,), None)


def find_movielens_100k(root: str | os.PathLike | None = None) -> Path | None:
    """The MovieLens 100k ratings file: ``root`` (the file, or a folder holding u.data or
    ml-100k.inter), else $AECORE_MOVIELENS (when set), else the copy inside an installed
    recbole wheel (``pip install --no-deps recbole``); None when absent from the one looked
    in."""
    import importlib.util

    # As for Fashion-MNIST: a place the user named is the only one looked in.
    root = root if root is not None else os.environ.get("AECORE_MOVIELENS") or None
    if root is not None:
        candidates = [Path(root)]
    else:
        candidates = []
        # find_spec locates the package without importing it (its dependencies are not needed).
        spec = importlib.util.find_spec("recbole")
        for loc in (spec.submodule_search_locations or []) if spec else []:
            candidates.append(Path(loc) / "dataset_example" / "ml-100k")
    for c in candidates:
        if c.is_file():
            return c
        for name in MOVIELENS_FILES:
            if (c / name).is_file():
                return c / name
    return None


# The largest item id an interaction file may use (columns are item ids).
MAX_ITEMS = 1_000_000


def load_movielens_100k(root: str | os.PathLike | None = None, min_rating: float = 4.0,
                        min_items: int = 5, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """MovieLens 100k as implicit feedback: one row per user, (N, n_items) float32, 1 where the
    user rated the movie at least ``min_rating`` (column j is movie id j + 1).

    Users with fewer than ``min_items`` such movies are dropped; ``test_fraction`` of the users
    are held out (strong generalisation: test users are never seen in training; their rows
    are split into fold-in and held-out items at evaluation, :mod:`aecore.recommend`)."""
    path = find_movielens_100k(root)
    if path is None:
        named = root if root is not None else os.environ.get("AECORE_MOVIELENS") or None
        where = repr(str(named)) if named is not None else "an installed recbole wheel"
        raise FileNotFoundError(
            f"MovieLens 100k not found in {where}. `pip install --no-deps recbole==1.2.1` "
            "installs a copy (ml-100k.inter; nothing else of recbole is needed), or pass the "
            "folder holding GroupLens's u.data (--data-root DIR or AECORE_MOVIELENS=DIR).")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.split("\t") for line in f.read().splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file of tab-separated user, item, rating "
                         "lines") from None
    if lines and not lines[0][0].strip().isdigit():  # recbole's "user_id:token ..." header
        lines = lines[1:]
    try:
        table = np.array([[float(v) for v in line[:3]] for line in lines], dtype=np.float64)
    except ValueError:
        raise ValueError(f"{path}: expected tab-separated user, item, rating[, timestamp] "
                         "lines") from None
    ids_ok = (np.isfinite(table[:, :2]).all() and (table[:, :2] >= 1).all()
              and (table[:, :2] == np.round(table[:, :2])).all()) if table.ndim == 2 else False
    if table.ndim != 2 or table.shape[1] != 3 or len(table) == 0 or not ids_ok:
        raise ValueError(f"{path}: expected tab-separated user, item, rating lines with "
                         "integer ids >= 1")
    # One column per item id: ids far beyond the number of items would allocate without bound.
    if table[:, 1].max() > MAX_ITEMS:
        raise ValueError(f"{path}: item id {int(table[:, 1].max())} exceeds {MAX_ITEMS}; "
                         "renumber the items 1..n")
    users, items = table[:, 0].astype(np.int64), table[:, 1].astype(np.int64) - 1
    keep = table[:, 2] >= min_rating
    ids, row = np.unique(users, return_inverse=True)
    x = np.zeros((len(ids), int(items.max()) + 1), np.float32)
    x[row[keep], items[keep]] = 1.0
    x = x[x.sum(1) >= min_items]
    if len(x) < 2:
        raise ValueError(f"{path}: fewer than 2 users have {min_items} movies rated "
                         f">= {min_rating}")
    parts = _split(x, None, test_fraction, seed)
    return Dataset("movielens-100k", *parts, Normalization(mean=0.0, std=1.0), (x.shape[1],),
                   None, interactions=True)


def _read_csv(path: Path) -> np.ndarray:
    """A numeric comma-separated table (N, F) as float64; a first row of names alone (no cell
    a number), or of pandas' names for unnamed columns (exactly 0, 1, ..., F - 1 with F > 2;
    a warning says so), is a header and is skipped; any other text is an error."""
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.readline()

    def number(cell: str) -> bool:
        try:
            float(cell)
        except ValueError:
            return False
        return True

    # A row with some numbers is data, even with a stray word in it: never dropped unseen.
    cells = [c.strip() for c in first.split(",")]
    header = int(not any(number(c) for c in cells))
    if cells == [str(i) for i in range(len(cells))] and len(cells) > 2:
        # pandas' to_csv names unnamed columns 0, 1, ..., F - 1: as data, that row would be a
        # made-up sample (and with a label column, made-up classes).
        warnings.warn(f"{str(path)!r}: the first row, 0, 1, ..., {len(cells) - 1}, is read "
                      "as column names (pandas' for unnamed columns), not as data",
                      stacklevel=3)
        header = 1
    try:
        return np.loadtxt(path, delimiter=",", dtype=np.float64, ndmin=2, skiprows=header,
                          encoding="utf-8")
    except ValueError as e:  # numpy names the bad value and the row
        raise ValueError(f"data file {str(path)!r} must be a numeric CSV table (one header "
                         f"row allowed): {e}") from None


def load_array(path: str | os.PathLike, test_fraction: float = 0.2, seed: int = 0,
               label_column: int | None = None, *, label_name: str = "label_column") -> Dataset:
    """The user's own data: a .npy array (N, ...) or a numeric .csv (N, F; a header row is
    skipped), optionally with a label column of class ids. Tabular data gets per-feature
    standardisation fitted on the train split; (N, H, W) / (N, C, H, W) arrays are treated as
    images and scaled to [0, 1] by the whole array's range (by its max alone when it has no
    negative values), so that no test image leaves it. ``label_name``: what errors call
    ``label_column`` (a CLI flag)."""
    from aecore.io import load_npy

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    if path.suffix == ".npy":
        x = load_npy(path, f"data file {str(path)!r}")
    elif path.suffix == ".csv":
        x = _read_csv(path)
    else:
        raise ValueError(f"data file must be .npy or .csv, got {str(path)!r}")
    if x.ndim < 2 or len(x) < 2:
        raise ValueError(f"data in {str(path)!r} must be an array of shape (N, ...) with N >= 2, "
                         f"got {x.shape}")
    if x.dtype == np.bool_:  # 0/1 rows (interactions), as recommend and infer take them
        x = x.astype(np.float32)
    if not np.issubdtype(x.dtype, np.number):
        raise TypeError(f"data in {str(path)!r} must be numeric, got dtype {x.dtype}")
    y = None
    if label_column is not None:
        if x.ndim != 2:
            raise ValueError(f"{label_name} needs a 2-D table, got data of shape {x.shape} in "
                             f"{str(path)!r}")
        cols = x.shape[1]
        if (not isinstance(label_column, (int, np.integer)) or isinstance(label_column, bool)
                or not -cols <= label_column < cols or cols < 2):
            raise ValueError(f"{label_name} must be a column index of the {cols} columns in "
                             f"{str(path)!r} (leaving at least one feature), got {label_column!r}")
        y = x[:, label_column]
        if not (np.all(np.isfinite(y)) and np.all(y >= 0) and np.all(y == np.round(y))
                and np.all(y < 2 ** 31)):
            raise ValueError(f"labels (column {label_column}) in {str(path)!r} must be class ids: "
                             "finite non-negative integers")
        y = y.astype(np.int64)
        x = np.delete(x, label_column, axis=1)
    with np.errstate(over="ignore"):
        x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"data in {str(path)!r} contains NaN or Inf (or values beyond float32's "
                         "range, about 3.4e38)")
    if x.ndim == 3:
        x = x[:, None]
    parts = _split(x, y, test_fraction, seed)
    if x.ndim == 4:
        # Into [0, 1], which the sigmoid output of image models spans: by the whole array's
        # range (the pixel format's, in effect), so that no test image leaves it (a Bernoulli
        # likelihood would refuse one, after training).
        lo, hi = float(x.min()), float(x.max())
        if lo >= 0:
            norm = Normalization(mean=0.0, std=hi or 1.0)
        else:
            norm = Normalization(mean=lo, std=(hi - lo) or 1.0)
    else:
        parts = (parts[0].reshape(len(parts[0]), -1), parts[1],
                 parts[2].reshape(len(parts[2]), -1), parts[3])
        norm = Normalization.fit(parts[0])
    classes = int(y.max()) + 1 if y is not None else None
    return Dataset(path.stem, *parts, norm, tuple(parts[0].shape[1:]), classes)


def load(name: str, root: str | os.PathLike | None = None, seed: int = 0,
         label_column: int | None = None, *, label_name: str = "label_column") -> Dataset:
    """Load a data set by name (``fashion-mnist``, ``digits``, ``swiss-roll``,
    ``movielens-100k``) or file path (``label_column``, ``label_name``: see
    :func:`load_array`)."""
    if label_column is not None and Path(name).suffix not in (".npy", ".csv"):
        raise ValueError(f"{label_name} is for .npy/.csv tables; the data set {name!r} has its "
                         "own labels")
    if name == "fashion-mnist":
        return load_fashion_mnist(root)
    if name == "digits":
        return load_digits(seed=seed)
    if name == "swiss-roll":
        return load_swiss_roll(seed=seed)
    if name == "movielens-100k":
        return load_movielens_100k(root, seed=seed)
    if Path(name).suffix in (".npy", ".csv"):
        return load_array(name, seed=seed, label_column=label_column, label_name=label_name)
    raise ValueError(f"data must be one of {NAMES} or a .npy/.csv path, got {name!r}")
