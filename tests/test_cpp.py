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
