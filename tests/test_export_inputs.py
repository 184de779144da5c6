"""What export, quantize, the runtime and the export CLIs do with bad arguments and paths:
clear errors naming the argument, nothing overwritten, the caller's model left as it was."""

import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from aecore import families
from aecore.cli import main
from aecore.data import load_digits
from aecore.export import Model, quantize, to_onnx
from aecore.io import save_model, write_bytes


def _small(name="ae"):
    torch.manual_seed(0)
    return families.build(name, load_digits(), families.Sizes(hidden=[24], latent=6))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Model folders of an ae, a vae and a cvae, and the ae's exported autoencoder."""
    root = tmp_path_factory.mktemp("export-inputs")
    for name in ("ae", "vae", "cvae"):
        save_model(_small(name).eval(), root / name, extra={"data": "digits"})
    to_onnx(_small("ae").eval(), root / "ae.onnx")
    return root


def test_to_onnx_leaves_the_model_as_it_was(tmp_path):
    model = _small().train()
    to_onnx(model, tmp_path / "m.onnx")
    assert model.training
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("opset", [7, 17, 99, "20", True])
def test_to_onnx_rejects_bad_opsets(tmp_path, opset):
    with pytest.raises(ValueError, match=r"opset must be an int in \[18, \d+\], got"):
        to_onnx(_small(), tmp_path / "m.onnx", opset=opset)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("batches", [(), (0, 5), (-1, 5), "ab", (2.5,), 3])
def test_to_onnx_rejects_check_batches_that_verify_nothing(tmp_path, batches):
    with pytest.raises(ValueError, match="check_batches must be a non-empty tuple of batch "
                                         "sizes >= 1"):
        to_onnx(_small(), tmp_path / "m.onnx", check_batches=batches)
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), "abc", True, -1.0])
def test_scorer_threshold_must_be_finite(tmp_path, threshold):
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0, got"):
        to_onnx(_small(), tmp_path / "s.onnx", part="scorer", threshold=threshold)
    model = _small()
    model.threshold = float("nan")
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0, got nan"):
        to_onnx(model, tmp_path / "s.onnx", part="scorer")


def test_written_files_follow_the_umask_and_keep_a_replaced_files_mode(tmp_path):
    old = os.umask(0o022)
    try:
        fresh = write_bytes(tmp_path / "a.bin", b"1")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644
        os.chmod(fresh, 0o640)
        write_bytes(fresh, b"2")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o640 and fresh.read_bytes() == b"2"
    finally:
        os.umask(old)


def test_a_failed_write_in_a_set_of_files_replaces_none_of_them(tmp_path):
    from aecore.io import atomic_writes

    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    a.write_bytes(b"old a")
    b.write_bytes(b"old b")

    def full_disk(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_writes({a: lambda t: Path(t).write_bytes(b"new a"), b: full_disk})
    # The first file, written in full, was not renamed in: the set stays the old one.
    assert (a.read_bytes(), b.read_bytes()) == (b"old a", b"old b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "b.npy"]  # no temp left
    atomic_writes({a: lambda t: Path(t).write_bytes(b"new a"),
                   b: lambda t: Path(t).write_bytes(b"new b")})
    assert (a.read_bytes(), b.read_bytes()) == (b"new a", b"new b")


def test_model_weights_and_checkpoints_follow_the_umask(tmp_path):
    from aecore.autoencoder import AutoEncoder
    from aecore.io import save_model

    old = os.umask(0o022)
    try:
        folder = save_model(AutoEncoder(6, [4], 2), tmp_path / "m")
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
        assert modes and set(modes.values()) == {0o644}, modes  # safetensors too, not 0600
    finally:
        os.umask(old)


def test_quantize_never_overwrites_its_source(saved):
    src = saved / "ae.onnx"
    before = src.read_bytes()
    with pytest.raises(ValueError, match="dst .* is the input .*would destroy the input"):
        quantize(src, src)
    with pytest.raises(ValueError, match="is the input"):
        quantize(src, saved / "." / "ae.onnx", mode="fp16")
    assert src.read_bytes() == before


def test_quantize_checks_its_arrays(saved, tmp_path):
    src = saved / "ae.onnx"
    dst = tmp_path / "q.onnx"
    bad = [({"mode": "static", "calibration": np.full((8, 64), np.nan, np.float32)},
            ValueError, "calibration contains NaN or Inf"),
           ({"mode": "static", "calibration": np.zeros((0, 64), np.float32)},
            ValueError, r"calibration must have shape \(N, 64\) with N >= 1, got \(0, 64\)"),
           ({"inputs": np.zeros((4, 3), np.float32)},
            ValueError, r"inputs must have shape \(N, 64\) with N >= 1, got \(4, 3\)"),
           ({"inputs": np.zeros((0, 64), np.float32)}, ValueError, "inputs must have shape"),
           ({"calibration": np.zeros((4, 3), np.float32)}, ValueError,
            r"calibration must have shape \(N, 64\)"),
           ({"inputs": np.zeros((2, 64), np.complex64)}, TypeError,
            "inputs must be a real numeric array, got dtype complex64")]
    for kwargs, error, message in bad:
        with pytest.raises(error, match=message):
            quantize(src, dst, **kwargs)
    assert not dst.exists()


def test_files_that_are_not_onnx_models(saved, tmp_path):
    junk = tmp_path / "x.npy"
    np.save(junk, np.zeros((2, 64), np.float32))
    with pytest.raises(ValueError, match="src .*x.npy' is not an ONNX model"):
        quantize(junk, tmp_path / "q.onnx")
    with pytest.raises(ValueError, match="x.npy' is not a model ONNX Runtime can load"):
        Model(junk)


def test_runtime_argument_errors(saved):
    path = saved / "ae.onnx"
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got NoneType"):
        Model(None)
    with pytest.raises(ValueError, match="threads must be a positive int or None, got True"):
        Model(path, threads=True)
    with pytest.raises(ValueError, match="max_batch must be a positive int, got True"):
        Model(path, max_batch=True)
    with pytest.raises(TypeError, match="providers must be a list of provider names"):
        Model(path, providers="CPUExecutionProvider")
    with pytest.raises(ValueError, match=r"providers must name available providers .*"
                                         r"got \['NoSuchExecutionProvider'\]"):
        Model(path, providers=["NoSuchExecutionProvider"])
    # (name, options) pairs are ONNX Runtime's other form.
    cpu = Model(path, providers=[("CPUExecutionProvider", {})])
    assert cpu.run(np.zeros((1, 64), np.float32)).shape == (1, 64)


def test_cli_export_refuses_paths_that_would_destroy_data(saved, tmp_path, capsys):
    config = (saved / "ae" / "config.json").read_bytes()
    assert main(["export", str(saved / "ae"), "--out", str(saved / "ae" / "config.json")]) == 2
    assert "--out must be a .onnx file path" in capsys.readouterr().err
    assert (saved / "ae" / "config.json").read_bytes() == config
    (tmp_path / "dir.onnx").mkdir()
    assert main(["export", str(saved / "ae"), "--out", str(tmp_path / "dir.onnx")]) == 2
    assert "is a directory" in capsys.readouterr().err
    (tmp_path / "file").write_bytes(b"keep")
    for argv in (["export", str(saved / "ae")], ["sample", str(saved / "vae")]):
        out = tmp_path / "file" / "sub" / ("m.onnx" if argv[0] == "export" else "g.png")
        assert main([*argv, "--out", str(out)]) == 2
        assert "'" + str(tmp_path / "file") + "' is a file, not a directory" in \
            capsys.readouterr().err
    assert (tmp_path / "file").read_bytes() == b"keep"


def test_cli_export_rejects_options_it_would_ignore(saved, tmp_path, capsys):
    np.save(tmp_path / "c.npy", np.zeros((4, 64), np.float32))
    for extra, message in ((["--calibration", str(tmp_path / "c.npy")],
                            "--calibration is for --quantize static"),
                           (["--quantize", "dynamic", "--calibration", str(tmp_path / "c.npy")],
                            "--calibration is for --quantize static"),
                           (["--threshold", "0.1"], "--threshold is for --part scorer")):
        assert main(["export", str(saved / "ae"), "--out", str(tmp_path / "m.onnx"),
                     *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


def test_cli_infer_refuses_to_overwrite_its_inputs(saved, tmp_path, capsys):
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((2, 64), np.float32))
    model = saved / "ae.onnx"
    assert main(["infer", str(model), str(x), "--out", str(x)]) == 2
    assert "is the input" in capsys.readouterr().err
    assert np.load(x).shape == (2, 64)
    assert main(["infer", str(model), str(x), "--out", str(model)]) == 2
    assert "--out must be a .npy file path" in capsys.readouterr().err
    # A scorer's second output goes beside the first: that name is checked too.
    scorer = to_onnx(_small().eval(), tmp_path / "s.onnx", part="scorer", threshold=0.1)
    flags = tmp_path / "out.is_anomaly.npy"
    np.save(flags, np.zeros((2, 64), np.float32))
    assert main(["infer", str(scorer), str(flags), "--out", str(tmp_path / "out.npy")]) == 2
    assert "is the input" in capsys.readouterr().err
    assert np.load(flags).shape == (2, 64)


@pytest.mark.parametrize("kind, message", [
    ("npz", "input must be a .npy file with one array; .* is an .npz archive"),
    ("csv", "input must be a .npy array file; .* is not one"),
    ("dir", "input must be a .npy file, got the directory"),
    ("complex", "input must hold a real numeric array, got dtype complex64"),
    ("absent", "input: no file at"),
])
def test_cli_infer_input_errors(saved, tmp_path, capsys, kind, message):
    path = tmp_path / f"in.{kind}"
    if kind == "npz":
        np.savez(path, x=np.zeros((2, 64)))
    elif kind == "csv":
        np.savetxt(path, np.zeros((2, 64)), delimiter=",")
    elif kind == "dir":
        path.mkdir()
    elif kind == "complex":
        np.save(tmp_path / "in.npy", np.zeros((2, 64), np.complex64))
        path = tmp_path / "in.npy"
    assert main(["infer", str(saved / "ae.onnx"), str(path),
                 "--out", str(tmp_path / "out.npy")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out.npy").exists()


def test_cli_infer_runs_conditional_models_with_labels(saved, tmp_path, capsys):
    onnx_path = tmp_path / "cvae.onnx"
    assert main(["export", str(saved / "cvae"), "--out", str(onnx_path)]) == 0
    raw = load_digits().x_test[:4].reshape(4, 64)
    labels = np.array([0, 3, 5, 9])
    np.save(tmp_path / "x.npy", raw)
    np.save(tmp_path / "y.npy", labels)
    out = tmp_path / "out.npy"
    assert main(["infer", str(onnx_path), str(tmp_path / "x.npy"), "--out", str(out)]) == 2
    assert "the model is conditional: pass --labels" in capsys.readouterr().err
    assert main(["infer", str(onnx_path), str(tmp_path / "x.npy"), "--out", str(out),
                 "--labels", str(tmp_path / "y.npy")]) == 0
    from aecore.io import load_model

    model = load_model(saved / "cvae")
    norm = model.normalization
    with torch.no_grad():
        want = model(torch.from_numpy(norm.apply(raw).astype(np.float32)),
                     torch.from_numpy(labels)).numpy()
    np.testing.assert_allclose(np.load(out), norm.invert(want), rtol=1e-4, atol=1e-4)
    np.save(tmp_path / "yf.npy", labels.astype(np.float32))
    assert main(["infer", str(onnx_path), str(tmp_path / "x.npy"), "--out", str(out),
                 "--labels", str(tmp_path / "yf.npy")]) == 2
    assert "--labels must hold integer class ids, got dtype float32" in capsys.readouterr().err
    assert main(["infer", str(saved / "ae.onnx"), str(tmp_path / "x.npy"), "--out", str(out),
                 "--labels", str(tmp_path / "y.npy")]) == 2
    assert "--labels is for conditional models" in capsys.readouterr().err


@pytest.mark.parametrize("name, part", [("ae", "decoder"), ("vae", "generator")])
def test_cli_static_quantization_of_code_inputs(saved, tmp_path, name, part):
    # Calibration for parts fed codes: encoded training data (decoder), prior noise (generator).
    out = tmp_path / f"{part}.onnx"
    assert main(["export", str(saved / name), "--part", part, "--out", str(out),
                 "--quantize", "static"]) == 0
    z = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)
    assert Model(out).run(z).shape == (8, 64)
    # Given codes are used as they are: no normalisation, no reshape to the input's shape.
    codes = tmp_path / "codes.npy"
    np.save(codes, z)
    out2 = tmp_path / f"{part}2.onnx"
    assert main(["export", str(saved / name), "--part", part, "--out", str(out2),
                 "--quantize", "static", "--calibration", str(codes)]) == 0
    assert Model(out2).metadata["quantization"] == "static"


def test_fp16_scorer_flags_agree_with_its_scores_and_threshold(tmp_path):
    """The threshold sits just below an fp16 score: rounded to fp16 it would equal that score
    and the flag would say no while score > threshold says yes."""
    model = _small().eval()
    x = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    first = to_onnx(model, tmp_path / "s.onnx", part="scorer", threshold=0.1)
    quantize(first, tmp_path / "h.onnx", mode="fp16")
    score16 = Model(tmp_path / "h.onnx").run(x)
    threshold = float(np.nextafter(score16[0], np.float32(-np.inf)))
    src = to_onnx(model, tmp_path / "s2.onnx", part="scorer", threshold=threshold)
    quantize(src, tmp_path / "h2.onnx", mode="fp16")
    half = Model(tmp_path / "h2.onnx")
    out = half.run_all(x)
    np.testing.assert_array_equal(out["is_anomaly"], out["score"] > half.metadata["threshold"])
    assert out["is_anomaly"][0]


def _infer(model, x, tmp_path, name="out.npy"):
    """``aecore infer`` on the array ``x``: (exit status, the first output or None)."""
    src = tmp_path / f"in-{name}"
    np.save(src, x)
    out = tmp_path / name
    status = main(["infer", str(model), str(src), "--out", str(out)])
    return status, (np.load(out) if status == 0 else None)


def test_cli_infer_takes_the_sample_layouts_denoise_takes(saved, tmp_path, capsys):
    from aecore.normalization import Normalization

    raw = load_digits().x_test[:5]  # the data set's own layout, (5, 1, 8, 8)
    flat = raw.reshape(5, 64)
    mlp = saved / "ae.onnx"
    norm = Normalization.from_dict(Model(mlp).metadata["normalization"])
    want = norm.invert(Model(mlp).run(norm.apply(flat)))
    # Reconstructions come back in the input's layout (as aecore denoise writes them).
    for x in (raw, flat):
        status, got = _infer(mlp, x, tmp_path)
        assert status == 0 and got.shape == x.shape
        np.testing.assert_allclose(got.reshape(5, 64), want, rtol=1e-5, atol=1e-4)
    for one in (flat[0], raw[0]):  # a single sample, flat or shaped: a batch of one
        status, got = _infer(mlp, one, tmp_path)
        assert status == 0 and got.shape == one.shape
        np.testing.assert_allclose(got.reshape(1, 64), want[:1], rtol=1e-5, atol=1e-4)
    conv = to_onnx(_small("conv-ae").eval(), tmp_path / "conv.onnx")
    want = norm.invert(Model(conv).run(norm.apply(raw)))
    for x, rows in ((flat, 5), (raw, 5), (flat[0], 1)):
        status, got = _infer(conv, x, tmp_path)
        assert status == 0 and got.shape == x.shape
        np.testing.assert_allclose(got.reshape(want[:rows].shape), want[:rows], rtol=1e-5,
                                   atol=1e-4)
    # Shapes that fit nothing: the error names the file and the samples' shape.
    status, _ = _infer(mlp, np.zeros((5, 3), np.float32), tmp_path)
    assert status == 2
    assert re.search(r"input '.*in-out\.npy' must hold samples of shape \(64,\) \(or 64 values "
                     r"each\), got an array of shape \(5, 3\)", capsys.readouterr().err)
    assert _infer(conv, np.zeros((2, 8, 9), np.float32), tmp_path)[0] == 2
    assert r"samples of shape (1, 8, 8) (or 64 values each)" in capsys.readouterr().err


@pytest.mark.parametrize("name, part", [("ae", "decoder"), ("vae", "generator")])
def test_cli_infer_takes_one_code_vector(saved, tmp_path, capsys, name, part):
    onnx_path = tmp_path / f"{part}.onnx"
    assert main(["export", str(saved / name), "--part", part, "--out", str(onnx_path)]) == 0
    z = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    status, batch = _infer(onnx_path, z, tmp_path, "batch.npy")
    assert status == 0 and batch.shape == (3, 64)
    status, one = _infer(onnx_path, z[0], tmp_path, "one.npy")
    assert status == 0
    np.testing.assert_allclose(one, batch[:1], rtol=1e-5, atol=1e-4)
    assert _infer(onnx_path, np.zeros((3, 5), np.float32), tmp_path)[0] == 2
    assert r"samples of shape (6,) (or 6 values each)" in capsys.readouterr().err


def test_cli_infer_takes_the_history_rows_recommend_takes(saved, tmp_path, capsys):
    from aecore.recommend import recommend_file

    # A model of the user's own 64-item rows (a digits one is refused as a recommender).
    model_dir = tmp_path / "rows-ae"
    save_model(_small("ae").eval(), model_dir, extra={"data": str(tmp_path / "rows.npy")})
    rec = tmp_path / "rec.onnx"
    assert main(["export", str(model_dir), "--part", "recommender", "--k", "5",
                 "--out", str(rec)]) == 0
    seen = np.random.default_rng(0).random((4, 64)) < 0.2
    want = recommend_file(model_dir, _npy(tmp_path / "h.npy", seen), tmp_path / "r.npz",
                          k=5)["items"]
    for rows in (seen, seen.astype(np.int64), seen.astype(np.uint8), seen.astype(np.float32)):
        status, items = _infer(rec, rows, tmp_path)
        assert status == 0
        np.testing.assert_array_equal(items, want)
    status, items = _infer(rec, seen[0].astype(np.int64), tmp_path)  # one user's row
    assert status == 0
    np.testing.assert_array_equal(items, want[:1])
    # Negative values are refused, as recommend refuses them.
    bad = seen.astype(np.int64) - 1
    with pytest.raises(ValueError, match="non-negative interaction values"):
        recommend_file(model_dir, _npy(tmp_path / "bad.npy", bad), tmp_path / "r.npz")
    assert _infer(rec, bad, tmp_path)[0] == 2
    assert "must hold finite, non-negative interaction values" in capsys.readouterr().err


def _npy(path, array):
    np.save(path, array)
    return path


def test_cli_export_rejects_k_outside_the_recommender(saved, tmp_path, capsys, monkeypatch):
    import aecore.export.onnx_export as onnx_export

    def never(*args, **kwargs):
        raise AssertionError("the export ran")

    monkeypatch.setattr(onnx_export, "to_onnx", never)
    for part, k in (("autoencoder", "5"), ("scorer", "10")):  # 10: the recommender's default
        assert main(["export", str(saved / "ae"), "--part", part, "--k", k,
                     "--out", str(tmp_path / "m.onnx")]) == 2
        assert f"--k is for --part recommender, not {part!r}" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_cli_quantize_of_a_conditional_model_says_it_takes_single_inputs(saved, tmp_path,
                                                                        capsys, mode):
    out = tmp_path / "q.onnx"
    assert main(["export", str(saved / "cvae"), "--part", "decoder", "--quantize", mode,
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--quantize takes single-input models" in err and "is conditional" in err
    assert not out.exists()


def test_unwritable_out_is_named_before_the_work(saved, tmp_path, capsys, monkeypatch):
    # Linux's /proc refuses new files even to root, whom file modes would not stop.
    import aecore.export.onnx_export as onnx_export

    def never(*args, **kwargs):
        raise AssertionError("the export ran")

    monkeypatch.setattr(onnx_export, "to_onnx", never)
    assert main(["export", str(saved / "ae"), "--out", "/proc/m.onnx"]) == 2
    err = capsys.readouterr().err
    assert "--out '/proc/m.onnx'" in err and "folder '/proc'" in err and ".tmp" not in err
    np.save(tmp_path / "x.npy", np.zeros((2, 64), np.float32))
    assert main(["infer", str(saved / "ae.onnx"), str(tmp_path / "x.npy"),
                 "--out", "/proc/sub/o.npy"]) == 2
    err = capsys.readouterr().err
    assert "--out '/proc/sub/o.npy'" in err and "folder '/proc'" in err and ".tmp" not in err
    # A write that fails anyway names the file it was asked for, not its temp file.
    with pytest.raises(OSError, match="can't write '/proc/b.bin': no file can be created in "
                                      "the folder '/proc'") as e:
        write_bytes("/proc/b.bin", b"1")
    assert ".tmp" not in str(e.value)


def test_topk_overlap_counts_shared_items_of_finite_slots():
    from aecore.export.quantization import topk_overlap

    want = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    scores = np.array([[3.0, 2.0, 1.0], [1.0, -np.inf, -np.inf], [-np.inf] * 3])
    got = np.array([[2, 9, 0], [3, 1, 2], [0, 1, 2]])
    # Row 0 shares 2 of 3, row 1 its one finite slot, row 2 has none and is left out.
    assert topk_overlap(want, scores, got) == pytest.approx((2 / 3 + 1) / 2)
    assert np.isnan(topk_overlap(want[2:], scores[2:], got[2:]))


def test_quantize_reports_what_a_scorer_and_a_recommender_act_on(tmp_path):
    from aecore.export.quantization import topk_overlap

    model = _small().eval()
    x = load_digits().x_test[:200].reshape(-1, 64)
    src = to_onnx(model, tmp_path / "s.onnx", part="scorer", threshold=0.05)
    report = quantize(src, tmp_path / "s8.onnx", mode="dynamic", inputs=x)
    want, got = Model(src).run_all(x), Model(tmp_path / "s8.onnx").run_all(x)
    assert 0.5 < report["flag_agreement"] <= 1
    assert report["flag_agreement"] == np.mean(want["is_anomaly"] == got["is_anomaly"])
    assert "topk_overlap" not in report
    # Dynamic int8 scales activations by the batch's range: a sample's score depends on the
    # samples beside it, and the report says by how much; static scales are fixed.
    import onnxruntime as ort

    def scores(path, rows):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(["score"], {"x": rows})[0]

    batch = scores(tmp_path / "s8.onnx", x)
    alone = np.concatenate([scores(tmp_path / "s8.onnx", x[i:i + 1]) for i in range(64)])
    assert report["batch_effect"] == pytest.approx(np.abs(alone - batch[:64]).max())
    assert report["batch_effect"] > 1e-4
    static = quantize(src, tmp_path / "s8s.onnx", mode="static", calibration=x, inputs=x)
    assert static["batch_effect"] < 1e-6

    rows = (x > 0.5).astype(np.float32)
    src = to_onnx(model, tmp_path / "r.onnx", part="recommender", k=5)
    report = quantize(src, tmp_path / "r8.onnx", mode="dynamic", inputs=rows)
    want, got = Model(src).run_all(rows), Model(tmp_path / "r8.onnx").run_all(rows)
    assert report["topk_overlap"] == topk_overlap(want["items"], want["scores"], got["items"])
    assert 0.5 < report["topk_overlap"] <= 1 and "flag_agreement" not in report


def test_cli_quantize_reports_on_the_held_out_split(saved, tmp_path, monkeypatch, capsys):
    import importlib

    q = importlib.import_module("aecore.export.quantization")
    seen = {}
    real = q.quantize

    def spy(*args, **kwargs):
        seen["inputs"] = kwargs["inputs"]
        return real(*args, **kwargs)

    monkeypatch.setattr(q, "quantize", spy)
    out = tmp_path / "scorer.onnx"
    assert main(["export", str(saved / "ae"), "--part", "scorer", "--threshold", "0.05",
                 "--out", str(out), "--quantize", "dynamic"]) == 0
    test = load_digits().x_test[:256].reshape(-1, 64)
    model = _small()
    np.testing.assert_array_equal(seen["inputs"], model.normalization.apply(test)
                                  if model.normalization is not None else test)
    assert "flags agree with fp32's on" in capsys.readouterr().out
    # The split is the training run's: its seed drew it.
    save_model(_small().eval(), tmp_path / "seeded", extra={"data": "digits", "seed": 3})
    assert main(["export", str(tmp_path / "seeded"), "--part", "encoder", "--out",
                 str(tmp_path / "e.onnx"), "--quantize", "dynamic"]) == 0
    test = load_digits(seed=3).x_test[:256].reshape(-1, 64)
    np.testing.assert_array_equal(seen["inputs"], model.normalization.apply(test)
                                  if model.normalization is not None else test)


def test_cli_static_quantization_after_the_training_file_is_gone(tmp_path, capsys):
    data = tmp_path / "rows.npy"
    np.save(data, np.random.default_rng(0).random((40, 64), dtype=np.float32))
    save_model(_small().eval(), tmp_path / "m", extra={"data": str(data)})
    data.unlink()
    args = ["export", str(tmp_path / "m"), "--out", str(tmp_path / "q.onnx"),
            "--quantize", "static"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "the model's data set, which is missing" in err and "--calibration FILE.npy" in err
    assert not (tmp_path / "q.onnx").exists()
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(1).random((16, 64), dtype=np.float32))
    assert main([*args, "--calibration", str(calib)]) == 0
    assert Model(tmp_path / "q.onnx").metadata["quantization"] == "static"


def test_quantize_stays_the_function_after_its_module_is_imported():
    # The module had the function's name: once imported (as export's CLI does), the package
    # attribute became the module and aecore.export.quantize(...) raised "not callable".
    import importlib

    import aecore.export as export

    importlib.import_module("aecore.export.quantization")
    assert callable(export.quantize) and export.quantize.__name__ == "quantize"
    from aecore.export import quantize

    assert quantize is export.quantize


def test_cli_quantize_says_when_its_report_runs_random_inputs(tmp_path, capsys):
    # A model saved without its data set (save_model without extra) was compared on random
    # inputs without a word.
    save_model(_small().eval(), tmp_path / "m")
    assert main(["export", str(tmp_path / "m"), "--out", str(tmp_path / "q.onnx"),
                 "--quantize", "dynamic"]) == 0
    assert "note: the report runs random inputs; the model's config names no data set" \
        in capsys.readouterr().out
