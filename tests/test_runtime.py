"""aecore.export.runtime.Model: numpy-only inference on exported models."""

import subprocess
import sys
import threading

import numpy as np
import onnx
import pytest
import torch

from aecore import families
from aecore.data import load_digits
from aecore.export import to_onnx
from aecore.export.runtime import Model, default_providers


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """An autoencoder, a scorer (threshold 0.05) and a conditional autoencoder, exported."""
    root = tmp_path_factory.mktemp("runtime")
    digits = load_digits()
    sizes = families.Sizes(hidden=[24], latent=6)
    torch.manual_seed(0)
    ae = families.build("ae", digits, sizes).eval()
    cvae = families.build("cvae", digits, sizes).eval()
    return {
        "ae": to_onnx(ae, root / "ae.onnx"),
        "scorer": to_onnx(ae, root / "scorer.onnx", part="scorer", threshold=0.05),
        "cvae": to_onnx(cvae, root / "cvae.onnx"),
        "models": (ae, cvae),
    }


def _x(batch, seed=0):
    return np.random.default_rng(seed).random((batch, 64), dtype=np.float32)


def test_outputs_match_torch_and_metadata_parses(paths):
    ae, cvae = paths["models"]
    x = _x(7)
    labels = np.arange(7) % 10
    with torch.no_grad():
        want = ae(torch.from_numpy(x)).numpy()
        want_c = cvae(torch.from_numpy(x), torch.from_numpy(labels)).numpy()
        err = ae.reconstruction_error(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(Model(paths["ae"]).run(x), want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(Model(paths["cvae"]).run(x, labels), want_c, rtol=1e-4,
                               atol=1e-6)
    scorer = Model(paths["scorer"])
    out = scorer.run_all(x)
    assert list(out) == ["score", "is_anomaly"] and out["is_anomaly"].dtype == np.bool_
    np.testing.assert_allclose(out["score"], err, rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(out["is_anomaly"], out["score"] > 0.05)
    meta = scorer.metadata
    assert meta["threshold"] == 0.05 and meta["input_shape"] == [64]
    assert meta["family"] == "ae"  # plain strings stay strings
    assert Model(paths["cvae"]).metadata["num_classes"] == 10


def test_non_json_metadata_stays_a_string(paths, tmp_path):
    proto = onnx.load(str(paths["ae"]))
    proto.metadata_props.add(key="note", value="{not json")
    onnx.save(proto, str(tmp_path / "m.onnx"))
    assert Model(tmp_path / "m.onnx").metadata["note"] == "{not json"


def test_input_errors(paths):
    runtime = Model(paths["ae"])
    x = _x(4)
    with pytest.raises(ValueError, match=r"input 'x' must have rank 2"):
        runtime.run(x[0])
    with pytest.raises(ValueError, match=r"input 'x' must have shape \(batch, 64\)"):
        runtime.run(x[:, :10])
    with pytest.raises(TypeError, match="input 'x' must be a float32 array"):
        runtime.run(x.astype(np.int32))
    bad = x.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="input 'x' contains NaN or Inf"):
        runtime.run(bad)
    bad[1, 3] = np.inf
    with pytest.raises(ValueError, match="input 'x' contains NaN or Inf"):
        runtime.run(bad)
    with pytest.raises(ValueError, match=r"takes 1 input\(s\) \(x\), got 2"):
        runtime.run(x, x)
    with pytest.raises(ValueError, match="input 'x' is an empty batch"):
        runtime.run(x[:0])
    # Other float dtypes and non-contiguous arrays are converted, not refused.
    np.testing.assert_array_equal(runtime.run(x.astype(np.float64)), runtime.run(x))
    wide = np.repeat(x, 2, axis=1)[:, ::2]
    assert not wide.flags.c_contiguous
    np.testing.assert_array_equal(runtime.run(wide), runtime.run(x))
    np.testing.assert_array_equal(runtime.run(x.tolist()), runtime.run(x))


def test_label_input_errors(paths):
    runtime = Model(paths["cvae"])
    x = _x(3)
    with pytest.raises(ValueError, match=r"takes 2 input\(s\) \(x, labels\), got 1"):
        runtime.run(x)
    with pytest.raises(TypeError, match="input 'labels' must be a int64 array, got dtype float32"):
        runtime.run(x, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="input 'labels' has batch 2, but 'x' has 3"):
        runtime.run(x, np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"input 'labels' must hold class ids in \[0, 10\), "
                                         r"got values in \[0, 10\]"):
        runtime.run(x, np.array([0, 10, 3]))
    with pytest.raises(ValueError, match=r"got values in \[-1, 2\]"):
        runtime.run(x, np.array([-1, 2, 0]))
    np.testing.assert_array_equal(runtime.run(x, np.array([1, 2, 3], np.int32)),
                                  runtime.run(x, np.array([1, 2, 3])))


def test_constructor_errors(paths, tmp_path):
    with pytest.raises(FileNotFoundError, match="no ONNX model at"):
        Model(tmp_path / "absent.onnx")
    with pytest.raises(ValueError, match="threads must be a positive int or None, got 0"):
        Model(paths["ae"], threads=0)
    with pytest.raises(ValueError, match="max_batch must be a positive int, got -5"):
        Model(paths["ae"], max_batch=-5)


def test_providers():
    providers = default_providers()
    assert providers[-1] == "CPUExecutionProvider"
    import onnxruntime as ort

    assert ("CUDAExecutionProvider" in providers) == (
        "CUDAExecutionProvider" in ort.get_available_providers())


def test_large_batches_run_in_chunks(paths):
    x = _x(257, seed=1)
    np.testing.assert_array_equal(Model(paths["ae"], max_batch=50).run(x),
                                  Model(paths["ae"]).run(x))
    labels = np.arange(257) % 10
    small, whole = Model(paths["cvae"], max_batch=64), Model(paths["cvae"])
    np.testing.assert_array_equal(small.run(x, labels), whole.run(x, labels))
    chunked = Model(paths["scorer"], max_batch=7).run_all(x)
    serial = Model(paths["scorer"]).run_all(x)
    for k in serial:
        np.testing.assert_array_equal(chunked[k], serial[k])


def test_thread_safe(paths):
    runtime = Model(paths["scorer"], threads=1, max_batch=16)  # chunking also runs threaded
    rng = np.random.default_rng(2)
    batches = [rng.random((int(rng.integers(1, 40)), 64), dtype=np.float32) for _ in range(50)]
    serial = [runtime.run_all(b) for b in batches]
    results: dict[tuple[int, int], dict] = {}

    def work(t):
        for i, b in enumerate(batches):
            results[t, i] = runtime.run_all(b)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(results) == 8 * 50
    for (_, i), out in results.items():
        for k in serial[i]:
            np.testing.assert_array_equal(out[k], serial[i][k])


def test_imports_and_runs_without_torch(paths):
    code = f"""
import sys
sys.modules["torch"] = None  # any import of torch now raises ImportError
import numpy as np
import aecore.export
from aecore.export.runtime import Model
assert aecore.export.Model is Model
m = Model({str(paths["ae"])!r})
out = m.run(np.zeros((3, 64), np.float32))
assert out.shape == (3, 64), out.shape
assert sys.modules["torch"] is None
try:
    import torch
except ImportError:
    print("torch blocked; runtime ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "runtime ok" in proc.stdout


def test_cli_infer_runs_without_torch(paths, tmp_path):
    # aecore infer is the deployment box's command: ONNX Runtime and numpy, no torch.
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((5, 64), dtype=np.float32))
    code = f"""
import sys
sys.modules["torch"] = None  # any import of torch now raises ImportError
from aecore.cli import main
assert main(["infer", {str(paths["ae"])!r}, {str(tmp_path / "x.npy")!r}, "--out",
             {str(tmp_path / "y.npy")!r}]) == 0
assert sys.modules["torch"] is None
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert np.load(tmp_path / "y.npy").shape == (5, 64)
