"""Atomic file writes and model folders: safetensors weights + config.json + history.json.

Nothing here loads pickles: weights are safetensors, everything else JSON. torch is imported
only where weights are read or written, so that the file helpers serve ``aecore infer`` (ONNX
Runtime alone) on machines without torch.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aecore.checks import native_order
from aecore.normalization import Normalization

if TYPE_CHECKING:
    import torch

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
HISTORY = "history.json"


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask can only be
    read by setting it, which races with files other threads create meanwhile)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a partial file.

    The file gets the permissions of the file it replaces, or those a plain ``open`` would
    give it (0666 less the umask): mkstemp alone would leave it private (0600).
    """
    return atomic_writes({path: write})[0]


def atomic_writes(writes: dict[str | os.PathLike, Callable[[str], None]]) -> list[Path]:
    """:func:`atomic_write` for a set of files that belong together: every one is written
    beside its target first, and only once all are written are they renamed into place, so a
    failure while writing (a full disk) leaves every target as it was."""
    staged: list[tuple[str, Path]] = []
    try:
        for path, write in writes.items():
            staged.append((_stage(Path(path), write), Path(path)))
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    return [path for _, path in staged]


def _stage(path: Path, write: Callable[[str], None]) -> str:
    """A complete, synced temp file beside ``path`` with ``path``'s permissions to be."""
    if path.is_dir():
        raise IsADirectoryError(f"{str(path)!r} is a directory, not a file path")
    above = next((p for p in path.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise NotADirectoryError(f"can't write {str(path)!r}: {str(above)!r} is a file, not a "
                                 "directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # the OS's message would name the temp file, not ``path``
        raise type(e)(f"can't write {str(path)!r}: {_cannot_create(path.parent, e)}") from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)  # after the write: a writer may replace the file (safetensors does)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return tmp


def _cannot_create(folder: Path, error: OSError) -> str:
    return (f"no file can be created in the folder {str(folder)!r} "
            f"({error.strerror or error})")


def load_npy(path: str | os.PathLike, name: str) -> np.ndarray:
    """The real-valued array in the .npy file ``path`` (never unpickled), in native byte
    order; errors name ``name``."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{name} must be a .npy file, got the directory {str(p)!r}")
    if not p.is_file():
        raise FileNotFoundError(f"{name}: no file at {str(p)!r}")
    try:
        a = np.load(p, allow_pickle=False)
    except (ValueError, EOFError) as e:  # pickled objects, text, a truncated file
        raise ValueError(f"{name} must be a .npy array file; {str(p)!r} is not one ({e})") from None
    if not isinstance(a, np.ndarray):  # an .npz archive opens as a lazy mapping
        a.close()
        raise ValueError(f"{name} must be a .npy file with one array; {str(p)!r} is an .npz "
                         "archive")
    if a.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold a real numeric array, got dtype {a.dtype}")
    return native_order(a)  # a big-endian file (astype('>f4'), another machine's) too


def model_inputs(model, raw: np.ndarray, name: str) -> np.ndarray:
    """Raw samples for ``model``: (N, *sample) or one sample, flat or shaped, in raw units ->
    finite float32 model inputs (N, *model.input_shape), through the model's normalization.
    Errors name ``name``."""
    return sample_rows(raw, model.input_shape, name, model.normalization)


def sample_rows(raw: np.ndarray, shape, name: str,
                normalization: Normalization | None = None) -> np.ndarray:
    """Samples of shape ``shape``: (N, *sample) or one sample, flat or shaped -> finite
    float32 rows (N, *shape), through ``normalization`` if given. Numpy alone, for callers
    that have a model's shape and normalization but not the model (an exported file).
    Errors name ``name``."""
    shape = tuple(int(d) for d in shape)
    size = math.prod(shape)
    if raw.ndim >= 2 and math.prod(raw.shape[1:]) == size:
        n = raw.shape[0]
    elif raw.size == size:
        n = 1
    else:
        raise ValueError(f"{name} must hold samples of shape {shape} (or {size} values each), "
                         f"got an array of shape {raw.shape}")
    if n == 0:
        raise ValueError(f"{name} holds no samples (shape {raw.shape})")
    # One sample's layout: each row of a batch, or the whole array when it is one sample.
    sample = raw.shape[1:] if n > 1 or raw.ndim == len(shape) + 1 else raw.shape
    if len(shape) > 1 and len(sample) == len(shape) and sample != shape:
        # (N, 28, 28, 1) or one (28, 28, 1) for (1, 28, 28): the same size in another layout,
        # which a reshape would scramble without a word.
        raise ValueError(f"{name} must hold samples of shape {shape} (channels first), got "
                         f"an array of shape {raw.shape}: transpose it (channels last?)")
    if not np.isfinite(raw).all():
        # NaN/Inf would come out as NaN rows looking like a result.
        raise ValueError(f"{name} contains NaN or Inf")
    # Normalisation may be per feature: apply it on rows in the model's own layout.
    if normalization is not None:
        normalization.check_fits(shape, name)
    with np.errstate(over="ignore"):  # overflow is reported below, naming the argument
        x = raw.reshape(n, *shape).astype(np.float32)
        if not np.isfinite(x).all():
            raise ValueError(f"{name} holds values beyond float32's range (|v| > 3.4e38), "
                             "in which the model computes")
        if normalization is not None:
            x = normalization.apply(x)
            if not np.isfinite(x).all():
                raise ValueError(f"{name} holds values that overflow float32 once the "
                                 "model's normalization scales them")
    return np.ascontiguousarray(x)


def check_output(out: str | os.PathLike, suffix: str | None, sources: tuple = (),
                 name: str = "--out") -> Path:
    """``out`` as a Path, after checking that it ends in ``suffix`` (if given) and is none of
    ``sources`` (the files a command reads: writing there would destroy them), and that its
    folder (or the nearest one above it that exists) takes new files."""
    out = Path(out)
    if suffix is not None and out.suffix != suffix:
        raise ValueError(f"{name} must be a {suffix} file path, got {str(out)!r}")
    if out.is_dir():
        raise ValueError(f"{name} must be a file path, {str(out)!r} is a directory")
    for src in sources:
        if src is not None and (out.resolve() == Path(src).resolve()
                                or (out.exists() and Path(src).exists()
                                    and os.path.samefile(out, src))):
            raise ValueError(f"{name} {str(out)!r} is the input {str(src)!r}; writing it "
                             "would destroy the input")
    # Found now, not when the result is written after all the work (the write's own error
    # would also name its temp file rather than ``out``).
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise NotADirectoryError(f"can't write {name} {str(out)!r}: {str(above)!r} is a file, "
                                 "not a directory")
    _probe(above, name, out)
    return out


def _probe(folder: Path | None, name: str, out: Path) -> None:
    """OSError naming ``name`` unless ``folder`` (if any) takes new files."""
    if folder is None:
        return
    try:
        with tempfile.TemporaryFile(dir=folder):  # unnamed where the OS allows, else unlinked
            pass
    except OSError as e:
        raise type(e)(f"can't write {name} {str(out)!r}: {_cannot_create(folder, e)}") from None


def check_output_dir(out: str | os.PathLike, name: str = "--out",
                     files: tuple[str, ...] = ()) -> Path:
    """``out`` as a Path, after checking that it can be a folder: neither it nor any folder
    above it is an existing file, the nearest that exists takes new files, and none of the
    ``files`` to be written in it is an existing folder (each would fail only when a file is
    written, after the work)."""
    out = Path(out)
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                raise ValueError(f"{name} must be a folder path; {str(p)!r} is an existing file")
            _probe(p, name, out)
            break
    for f in files:
        if (out / f).is_dir():
            raise ValueError(f"{name}: {str(out / f)!r} is a folder, where the file {f} goes")
    return out


def check_model_dir(out: str | os.PathLike, name: str = "--out") -> Path:
    """``out`` as a Path, after checking that :func:`save_model` may write a model there: it
    can be a folder, and a config.json in it is an aecore model's (one naming its family and
    kwargs), whose files a new save replaces. Anything else there is someone else's: ValueError
    rather than replacing that config.json and deleting its model.safetensors."""
    out = check_output_dir(out, name, (CONFIG, HISTORY, WEIGHTS))
    path = out / CONFIG
    if not path.is_file():
        return out
    try:
        config = read_config(out)
    except ValueError as e:
        why = str(e)
    else:
        if isinstance(config.get("family"), str) and isinstance(config.get("kwargs"), dict):
            return out
        why = f"{str(path)!r} names no aecore model family and kwargs"
    raise ValueError(f"{name} {str(out)!r} holds a config.json that is not an aecore model's "
                     f"({why}); it would be replaced: choose another folder")


def _strict(obj: Any) -> Any:
    """obj with NaN and +-Inf floats replaced by None (JSON's null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def json_text(obj: Any) -> str:
    """obj as strict JSON text: NaN and +-Inf (which json.dumps would write as bare NaN /
    Infinity, rejected by other parsers) become null. TypeError for what JSON can't hold."""
    return json.dumps(_strict(obj), indent=2, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write obj as strict JSON (:func:`json_text`), atomically."""
    return write_text(path, json_text(obj))


def write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    return atomic_write(path, write)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)


def write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> Path:
    """Write named numeric arrays to an uncompressed .npz, atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez appends ".npz" to names
            np.savez(f, **arrays)

    return atomic_write(path, write)


def save_state(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
               metadata: dict[str, str] | None = None) -> Path:
    """Write tensors to a safetensors file atomically (tied/shared storage is cloned apart)."""
    from safetensors.torch import save_file

    flat = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def save_model(model, directory: str | os.PathLike, history: list[dict] | None = None,
               extra: dict[str, Any] | None = None) -> Path:
    """Save ``model`` as a folder: the weights (safetensors), config.json and (if given)
    history.json.

    config.json names the weights and history files and is replaced last, atomically, so a
    folder always holds a matching (config, weights, history) set, even after a crash while
    saving over an older model: new files go to names the current config does not use
    (model.safetensors / history.json when free, else model-<random hex>.safetensors /
    history-<random hex>.json), and the old files are deleted only once the new config is in
    place.
    """
    import aecore

    if model.normalization is not None:
        model.normalization.check_fits(model.input_shape, "model.normalization")
    broken = non_finite(model.state_dict())
    if broken:  # saving would replace a folder's model with one that computes NaN
        raise ValueError(f"model holds NaN or Inf in {broken[:3]}; not saving it")
    if extra is not None:
        if not isinstance(extra, dict):
            raise TypeError(f"extra must be a dict or None, got {type(extra).__name__}")
        reserved = sorted(set(extra) & _RESERVED)
        if reserved:
            raise ValueError(f"extra must not set config.json's own keys {reserved}")
    norm = model.normalization
    config = {
        "aecore_version": aecore.__version__,
        "family": model.family,
        "kwargs": model.config(),
        "normalization": None if norm is None else norm.to_dict(),
        **(extra or {}),
    }
    # Both texts before any write: what JSON can't hold fails here, leaving the folder as it was.
    try:
        history_text = None if history is None else json_text(history)
    except TypeError as e:
        raise TypeError(f"history must hold JSON values only ({e})") from None
    try:
        json_text(config)
    except TypeError as e:
        raise TypeError(f"extra must hold JSON values only ({e})") from None
    directory = check_model_dir(directory, "directory")
    directory.mkdir(parents=True, exist_ok=True)
    ours = (directory / CONFIG).is_file()  # an aecore model folder: its weights files are ours
    try:
        old = read_config(directory)
        current = [_weights_name(old), _history_name(old)]
    except (FileNotFoundError, ValueError):  # no (readable) model here yet
        current = []

    def free_name(usual: str, stem: str, suffix: str) -> str:
        # A name the current config does not use and no file of someone else's holds.
        free = usual not in current and (ours or not (directory / usual).exists())
        return usual if free else f"{stem}-{secrets.token_hex(4)}{suffix}"

    name = free_name(WEIGHTS, "model", ".safetensors")
    save_state(directory / name, model.state_dict())
    history_name = None
    if history_text is not None:
        history_name = free_name(HISTORY, "history", ".json")
        write_text(directory / history_name, history_text)
    write_json(directory / CONFIG, {**config, "weights": name, "history": history_name})
    # The old model's files and any left by an earlier save that crashed before its config;
    # in a folder that held no model (no config.json), nothing.
    stale = [directory / n for n in current if n is not None]
    if ours:
        stale += [directory / WEIGHTS, directory / HISTORY,
                  *(p for p in directory.glob("model-*") if _SAVE_NAME.fullmatch(p.name)),
                  *(p for p in directory.glob("history-*") if _HISTORY_NAME.fullmatch(p.name))]
    for p in stale:
        if p.name not in (name, history_name) and p.is_file():
            p.unlink()
    return directory


# config.json's keys that save_model writes itself.
_RESERVED = {"aecore_version", "family", "kwargs", "normalization", "weights", "history"}
# The names save_model gives weights and history when model.safetensors / history.json is taken.
_SAVE_NAME = re.compile(r"model-[0-9a-f]{8}\.safetensors")
_HISTORY_NAME = re.compile(r"history-[0-9a-f]{8}\.json")


def training_record(directory: str | os.PathLike) -> dict[str, Any]:
    """What config.json records of a model's training data, checked: {"data" (a data set name
    or file path), "data_root", "label_column", "seed" (0 when absent), "sample_shape" (a
    list of ints >= 1)}, None where absent. ValueError naming a field that has another type
    (search, sample and export rebuild the training split from these)."""
    config = read_config(directory)
    where = str(Path(directory) / CONFIG)
    record = {k: config.get(k) for k in ("data", "data_root", "label_column", "sample_shape")}
    record["seed"] = config.get("seed", 0)
    for key in ("data", "data_root"):
        if record[key] is not None and not isinstance(record[key], str):
            raise ValueError(f"{where!r}: {key!r} must be a string, got {record[key]!r}")
    for key, low in (("seed", 0), ("label_column", None)):
        v = record[key]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)
                              or (low is not None and v < low)):
            raise ValueError(f"{where!r}: {key!r} must be an int"
                             f"{f' >= {low}' if low is not None else ''}, got {v!r}")
    shape = record["sample_shape"]
    if shape is not None and (not isinstance(shape, list) or not shape or any(
            isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape)):
        raise ValueError(f"{where!r}: 'sample_shape' must be a list of ints >= 1, got {shape!r}")
    return record


def _weights_name(config: dict[str, Any]) -> str:
    """The weights file a model folder's config names (model.safetensors for folders saved
    before config.json named it)."""
    name = config.get("weights", WEIGHTS)
    if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
        raise ValueError(f"{CONFIG}: 'weights' must be a .safetensors file name, got {name!r}")
    return name


def _history_name(config: dict[str, Any]) -> str | None:
    """The history file a model folder's config names, None for a model saved without one
    (history.json for folders saved before config.json named it)."""
    name = config.get("history", HISTORY)
    if name is not None and (not isinstance(name, str) or Path(name).name != name
                             or not name.endswith(".json") or name == CONFIG):
        raise ValueError(f"{CONFIG}: 'history' must be a .json file name other than {CONFIG} "
                         f"or null, got {name!r}")
    return name


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG} in {str(directory)!r}: not an aecore model folder")
    try:
        with open(path) as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(config).__name__}")
    return config


def non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating tensors of ``state`` that hold NaN or Inf."""
    return [k for k, v in state.items()
            if v.is_floating_point() and not bool(v.isfinite().all())]


def _check_state(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor], path: Path) -> None:
    """ValueError naming what differs when weights belong to another model than the config's."""
    problems = [f"missing {k!r}" for k in want if k not in got]
    problems += [f"unexpected {k!r}" for k in got if k not in want]
    problems += [f"{k!r} has shape {tuple(got[k].shape)}, the model's is {tuple(v.shape)}"
                 for k, v in want.items() if k in got and got[k].shape != v.shape]
    # load_state_dict would cast integer or bool tensors into float parameters without a word.
    problems += [f"{k!r} is {got[k].dtype}, the model's is {v.dtype}"
                 for k, v in want.items() if k in got
                 and got[k].is_floating_point() != v.is_floating_point()]
    problems += [f"{k!r} holds NaN or Inf" for k in non_finite(got)]
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ValueError(f"{str(path)!r} does not match the model {CONFIG} describes: "
                         + "; ".join(problems[:3]) + more)


def load_model(directory: str | os.PathLike, map_location: str | torch.device = "cpu"):
    """Rebuild a model saved by :func:`save_model` (eval mode, on ``map_location``)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from aecore.registry import model_class

    try:
        device = torch.device(map_location)
    except (RuntimeError, TypeError):
        raise ValueError(f"map_location must be a device such as 'cpu' or 'cuda', got "
                         f"{map_location!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"map_location {map_location!r} needs CUDA, which this machine lacks")
    config = read_config(directory)
    where = str(Path(directory) / CONFIG)
    if not isinstance(config.get("family"), str) or not isinstance(config.get("kwargs"), dict):
        raise ValueError(f"{where!r} must name the model's 'family' (a string) and its "
                         f"'kwargs' (an object): not a config written by save_model")
    cls = model_class(config["family"])
    try:
        model = cls(**config["kwargs"])
    except TypeError as e:
        raise ValueError(f"{where!r}: the kwargs do not build a {config['family']!r} model "
                         f"({e})") from None
    weights = Path(directory) / _weights_name(config)
    if not weights.is_file():
        raise FileNotFoundError(f"no weights file {str(weights)!r} (named by {CONFIG})")
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{str(weights)!r} is not a readable safetensors file ({e})") from None
    _check_state(model.state_dict(), state, weights)
    model.load_state_dict(state)
    model.normalization = Normalization.from_dict(config.get("normalization"))
    if model.normalization is not None:
        model.normalization.check_fits(model.input_shape, f"{where!r}")
    return model.to(map_location).eval()


def load_history(directory: str | os.PathLike) -> list[dict]:
    """The training history save_model wrote beside the model ([] when it wrote none)."""
    config = read_config(directory)
    name = _history_name(config)
    if name is None:  # saved without one
        return []
    path = Path(directory) / name
    if not path.is_file():
        if "history" not in config:  # saved before config.json named it: maybe without one
            return []
        raise FileNotFoundError(f"no history file {str(path)!r} (named by {CONFIG})")
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e})") from None
