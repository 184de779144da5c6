"""The C++ program (CMakeLists.txt, cpp/) matches Python ONNX Runtime on an exported model."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aecore.autoencoder import AutoEncoder
from aecore.export import Model, to_onnx
from aecore.vae import ConditionalVAE
from aecore.vqvae import VQVAE

ROOT = Path(__file__).resolve().parents[1]
HEADERS = Path(os.environ.get("AECORE_ORT_HEADERS", ROOT / "build/onnxruntime-headers"))
REQUIRED = os.environ.get("AECORE_REQUIRE_CPP") == "1"


def _missing() -> str | None:
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        return "cmake and a C++ compiler are needed"
    if not (HEADERS / "include/onnxruntime/onnxruntime_cxx_api.h").is_file():
        return f"ONNX Runtime headers not in {HEADERS}: run cpp/fetch-onnxruntime.sh"
    return None


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    why = _missing()
    if why:
        if REQUIRED:
            pytest.fail(f"AECORE_REQUIRE_CPP=1 but {why}")
        pytest.skip(why)
    build = tmp_path_factory.mktemp("cpp-build")
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    f"-DONNXRUNTIME_INCLUDE_DIR={HEADERS / 'include/onnxruntime'}",
                    f"-DPython3_EXECUTABLE={sys.executable}"],
                   check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j2"], check=True, capture_output=True)
    return build / "aecore_infer"


def _run(binary, *args):
    return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True)


def test_cpp_matches_python_onnxruntime(binary, tmp_path):
    torch.manual_seed(0)
    model = AutoEncoder(64, [32], 8, output_activation="sigmoid")
    model.threshold = 0.08
    scorer = to_onnx(model, tmp_path / "scorer.onnx", part="scorer")
    x = np.random.default_rng(0).random((37, 64), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    proc = subprocess.run([str(binary), str(scorer), str(tmp_path / "x.npy"),
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "family = ae" in proc.stdout and "threshold = 0.08" in proc.stdout
    want = Model(scorer).run_all(x)
    np.testing.assert_array_equal(np.load(tmp_path / "out.score.npy"), want["score"])
    np.testing.assert_array_equal(np.load(tmp_path / "out.is_anomaly.npy"), want["is_anomaly"])


def test_cpp_rejects_bad_input(binary, tmp_path):
    model = AutoEncoder(64, [32], 8)
    path = to_onnx(model, tmp_path / "ae.onnx")
    np.save(tmp_path / "wrong.npy", np.zeros((3, 10), np.float32))
    proc = subprocess.run([str(binary), str(path), str(tmp_path / "wrong.npy"),
                           str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2 and "input dimension 1 must be 64, got 10" in proc.stderr
    np.save(tmp_path / "f64.npy", np.zeros((3, 64)))
    proc = subprocess.run([str(binary), str(path), str(tmp_path / "f64.npy"),
                           str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 1 and "expected float32" in proc.stderr


def test_cpp_writes_its_outputs_as_one_set(binary, tmp_path):
    # A write that fails (here a file-size limit; a full disk alike) used to go unnoticed for
    # a small file still in the stream's buffer: a truncated file renamed into place, exit 0.
    # Now nothing is replaced unless every output was written, and no .tmp file stays.
    import resource
    import signal

    model = AutoEncoder(64, [32], 8)
    model.threshold = 0.1
    scorer = to_onnx(model, tmp_path / "scorer.onnx", part="scorer")
    x = np.random.default_rng(0).random((500, 64), dtype=np.float32)
    np.save(tmp_path / "small.npy", x[:3])
    np.save(tmp_path / "big.npy", x)
    assert _run(binary, scorer, tmp_path / "small.npy", tmp_path / "out").returncode == 0
    before = {p.name: p.read_bytes() for p in tmp_path.glob("out.*")}
    assert sorted(before) == ["out.is_anomaly.npy", "out.score.npy"]

    def limit():  # 1 KiB files at most: score (2 KB) fails, is_anomaly (628 B) would fit
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    proc = subprocess.run([str(binary), str(scorer), str(tmp_path / "big.npy"),
                           str(tmp_path / "out")], capture_output=True, text=True,
                          preexec_fn=limit)
    assert proc.returncode == 1 and "out.score.npy.tmp: write failed" in proc.stderr, proc.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.glob("out.*")} == before

    np.save(tmp_path / "be.npy", x[:3].astype(">f4"))
    proc = _run(binary, scorer, tmp_path / "be.npy", tmp_path / "be")
    assert proc.returncode == 1 and "big-endian data ('>f4'); save it little-endian" in proc.stderr


def test_cpp_conditional_labels(binary, tmp_path):
    torch.manual_seed(0)
    path = to_onnx(ConditionalVAE(10, 64, [32], 8).eval(), tmp_path / "cvae.onnx")
    x = np.random.default_rng(0).random((5, 64), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    want = Model(path).run(x, np.array([0, 1, 2, 3, 9]))
    # Integer files of any width give what the Python runtime gives for the same ids.
    for dtype in (np.int64, np.int32, np.uint8):
        labels = tmp_path / f"y_{np.dtype(dtype).name}.npy"
        np.save(labels, np.array([0, 1, 2, 3, 9], dtype))
        proc = _run(binary, path, tmp_path / "x.npy", tmp_path / "out", labels)
        assert proc.returncode == 0, proc.stderr
        np.testing.assert_array_equal(np.load(tmp_path / "out.reconstruction.npy"), want)

    bad = {
        "frac.npy": (np.array([0.7, 1.9, 2, 3, 4], np.float32), "expected integer data"),
        "whole_f32.npy": (np.array([0, 1, 2, 3, 4], np.float32), "expected integer data"),
        "high.npy": (np.array([0, 1, 2, 3, 99]),
                     "input 'labels' must hold class ids in [0, 10), got values in [0, 99]"),
        "negative.npy": (np.array([0, -1, 2, 3, 4]), "must hold class ids in [0, 10)"),
        "short.npy": (np.array([0, 1, 2, 3]), "input 'labels' has batch 4, but 'x' has 5"),
        "long.npy": (np.arange(6), "input 'labels' has batch 6, but 'x' has 5"),
        "2d.npy": (np.arange(5).reshape(5, 1), "must be one class id per sample"),
    }
    for name, (labels, message) in bad.items():
        np.save(tmp_path / name, labels)
        proc = _run(binary, path, tmp_path / "x.npy", tmp_path / "bad", tmp_path / name)
        assert proc.returncode != 0 and f"error: {tmp_path / name}: " in proc.stderr, name
        assert message in proc.stderr, (name, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not list(tmp_path.glob("bad.*"))


def test_cpp_code_decoder_takes_integer_indices(binary, tmp_path):
    torch.manual_seed(0)
    model = VQVAE(64, [32], num_latents=3, code_dim=4, num_codes=16).eval()
    path = to_onnx(model, tmp_path / "codes.onnx", part="code_decoder")
    indices = np.random.default_rng(0).integers(0, 16, (6, 3))
    want = Model(path).run(indices)
    for dtype in (np.int64, np.uint8):
        np.save(tmp_path / "i.npy", indices.astype(dtype))
        proc = _run(binary, path, tmp_path / "i.npy", tmp_path / "out")
        assert proc.returncode == 0, proc.stderr
        assert "num_codes = 16" in proc.stdout
        np.testing.assert_array_equal(np.load(tmp_path / "out.reconstruction.npy"), want)
    bad = {
        "high.npy": (np.full((2, 3), 16), "input 'indices' must hold code indices in [0, 16), "
                                          "got values in [16, 16]"),
        "negative.npy": (np.array([[0, -1, 2]]), "must hold code indices in [0, 16)"),
        "float.npy": (indices.astype(np.float32), "expected integer data"),
        "wide.npy": (np.zeros((2, 4), np.int64), "input dimension 1 must be 3, got 4"),
        "empty.npy": (np.zeros((0, 3), np.int64), "input 'indices' is an empty batch"),
    }
    for name, (value, message) in bad.items():
        np.save(tmp_path / name, value)
        proc = _run(binary, path, tmp_path / name, tmp_path / "bad")
        assert proc.returncode != 0 and message in proc.stderr, (name, proc.stderr)
    assert not list(tmp_path.glob("bad.*"))


def test_cpp_rejects_empty_and_non_finite_input(binary, tmp_path):
    model = AutoEncoder(64, [32], 8)
    model.threshold = 0.05
    path = to_onnx(model, tmp_path / "scorer.onnx", part="scorer")
    x = np.random.default_rng(0).random((3, 64), dtype=np.float32)
    cases = {"empty.npy": (np.zeros((0, 64), np.float32), "input 'x' is an empty batch")}
    for name, value in (("nan.npy", np.nan), ("inf.npy", np.inf), ("ninf.npy", -np.inf)):
        bad = x.copy()
        bad[1, 7] = value
        cases[name] = (bad, "input 'x' contains NaN or Inf")
    for name, (data, message) in cases.items():
        np.save(tmp_path / name, data)
        proc = _run(binary, path, tmp_path / name, tmp_path / "out")
        assert proc.returncode == 2, (name, proc.stderr)
        assert f"error: {tmp_path / name}: {message}" in proc.stderr, proc.stderr
        # The Python runtime refuses the same inputs.
        with pytest.raises(ValueError, match=message.replace("input 'x' ", "")):
            Model(path).run(data)
    assert not list(tmp_path.glob("out.*"))
