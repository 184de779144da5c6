"""ONNX export of every family and part, verified in ONNX Runtime and onnx.reference."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator

from aecore import families
from aecore.data import load_digits
from aecore.export import Model, VerificationError, quantize, to_onnx
from aecore.normalization import Normalization


def _small(name):
    """A small model of each family (random weights: parity does not need training)."""
    digits = load_digits()
    sizes = families.Sizes(hidden=[24], latent=6, channels=[4, 8])
    torch.manual_seed(0)
    return families.build(name, digits, sizes)


FAMILIES = [f for f in ("ae", "tied-ae", "cae", "grae", "conv-ae", "sparse-ae", "vae", "cvae",
                         "vq-vae") if f in families.BUILDERS]


def _parts(model):
    parts = ["autoencoder", "encoder", "decoder", "scorer"]
    if model.family in ("vae", "cvae"):
        parts.append("generator")
    if model.family == "vq-vae":
        parts.append("code_decoder")
    return parts


def _inputs(model, part, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, *model.input_shape, generator=g)
    cond = model.family == "cvae"
    y = torch.randint(0, max(getattr(model, "num_classes", 1), 1), (batch,), generator=g)
    if part == "code_decoder":
        return (torch.randint(0, model.num_codes, (batch, model.num_latents), generator=g),)
    if part in ("decoder", "generator"):
        with torch.no_grad():
            code = model.encode(x, y) if cond else model.encode(x)
            if model.family == "vq-vae":  # its decoder takes quantized codes
                code = model.quantize(code)
        code = code[0] if isinstance(code, tuple) else code
        x = torch.randn(code.shape, generator=g) if part == "generator" else code
    return (x, y) if cond else (x,)


def _torch_outputs(model, part, inputs, threshold):
    with torch.no_grad():
        if part == "autoencoder":
            out = model(*inputs)
        elif part == "encoder":
            out = model.encode(*inputs)
            if model.family == "vq-vae":  # the quantized code and its indices
                out = model.quantize(out)
        elif part in ("decoder", "generator"):
            out = model.decode(*inputs)
        elif part == "code_decoder":
            out = model.decode_codes(*inputs)
        else:
            err = model.reconstruction_error(*inputs)
            out = (err, err > threshold)
    out = out if isinstance(out, tuple) else (out,)
    return [o.numpy() for o in out]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    for name in FAMILIES:
        model = _small(name).eval()
        for part in _parts(model):
            path = root / f"{name}-{part}.onnx"
            to_onnx(model, path, part=part, threshold=0.05)
            out[name, part] = (model, path)
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_every_part_matches_torch_in_ort_and_reference(exported, name):
    for (fam, part), (model, path) in exported.items():
        if fam != name:
            continue
        proto = onnx.load(str(path))
        assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}, (name, part)
        assert not proto.functions
        runtime = Model(path)
        reference = ReferenceEvaluator(proto)
        names = [i.name for i in proto.graph.input]
        for batch in (1, 3, 257):
            inputs = _inputs(model, part, batch)
            want = _torch_outputs(model, part, inputs, 0.05)
            arrays = [t.numpy() for t in inputs]
            got_ort = list(runtime.run_all(*arrays).values())
            got_ref = reference.run(None, dict(zip(names, arrays)))
            for got in (got_ort, got_ref):
                assert len(got) == len(want)
                for g, w in zip(got, want):
                    assert g.shape == w.shape, (name, part, batch)
                    if w.dtype == np.bool_:
                        assert np.array_equal(g, w), (name, part, batch)
                    else:
                        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5,
                                                   err_msg=f"{name} {part} batch {batch}")


@pytest.mark.parametrize("name", [f for f in FAMILIES if f not in ("vae", "cvae")])
def test_encoder_then_decoder_is_the_autoencoder(exported, name):
    # The parts compose: what the encoder part writes, the decoder part takes back (for the
    # VQ-VAE the quantized code, beside the code indices a compressed file keeps).
    x = _inputs(exported[name, "autoencoder"][0], "autoencoder", 9)[0].numpy()
    codes = Model(exported[name, "encoder"][1]).run_all(x)
    back = Model(exported[name, "decoder"][1]).run_all(next(iter(codes.values())))
    whole = Model(exported[name, "autoencoder"][1]).run_all(x)
    np.testing.assert_allclose(next(iter(back.values())), next(iter(whole.values())),
                               rtol=1e-5, atol=1e-6)
    if name == "vq-vae":
        model = exported[name, "encoder"][0]
        assert list(codes) == ["z", "indices"] and codes["indices"].dtype == np.int64
        assert codes["indices"].shape == (9, model.num_latents)
        with torch.no_grad():
            want = model.decode_codes(torch.from_numpy(codes["indices"]))
        np.testing.assert_allclose(next(iter(back.values())), want.numpy(), rtol=1e-5,
                                   atol=1e-6)
        # The indices alone, what a compressed file keeps, decode to the same.
        from_indices = Model(exported[name, "code_decoder"][1]).run(codes["indices"])
        np.testing.assert_allclose(from_indices, next(iter(whole.values())), rtol=1e-5,
                                   atol=1e-6)


def test_code_decoder_refuses_indices_outside_the_codebook(exported):
    model, path = exported["vq-vae", "code_decoder"]
    runtime = Model(path)
    assert runtime.input_names == ["indices"] and runtime.metadata["num_codes"] == model.num_codes
    good = np.zeros((2, model.num_latents), np.int64)
    for bad_value in (-1, model.num_codes):
        bad = good.copy()
        bad[1, 0] = bad_value
        with pytest.raises(ValueError, match=rf"input 'indices' must hold code indices in "
                                             rf"\[0, {model.num_codes}\)"):
            runtime.run(bad)
        # Unchecked, the graph gives NaN for that sample (ONNX's Gather would wrap -1 to the
        # last code), never another code's reconstruction; the other sample decodes as usual.
        raw = runtime.session.run(None, {"indices": bad})[0]
        assert np.isnan(raw[1]).all() and np.isfinite(raw[0]).all()
    with pytest.raises(TypeError, match="input 'indices' must be a int64 array"):
        runtime.run(good.astype(np.float32))
    huge = good.astype(np.uint64)
    huge[0, 0] = 2**63  # named as it is, not as the int64 it would wrap to
    with pytest.raises(ValueError, match=r"got values in \[0, 9223372036854775808\]"):
        runtime.run(huge)
    # Quantized variants keep the NaN: int8 first layers would turn a NaN code into numbers.
    bad = good.copy()
    bad[1, 0] = -1
    calib = np.random.default_rng(0).integers(0, model.num_codes, (32, model.num_latents))
    for mode in ("dynamic", "static", "fp16"):
        q = Path(path).with_name(f"codes-{mode}.onnx")
        quantize(path, q, mode=mode, calibration=calib if mode == "static" else None)
        raw = Model(q).session.run(None, {"indices": bad})[0]
        assert np.isnan(raw[1]).all() and np.isfinite(raw[0]).all(), mode
    stripped = onnx.load(str(path))
    del stripped.metadata_props[:]
    onnx.helper.set_model_props(stripped, {"part": "code_decoder"})
    onnx.save(stripped, str(Path(path).with_name("stripped.onnx")))
    with pytest.raises(ValueError, match="code decoder without a num_codes entry"):
        quantize(Path(path).with_name("stripped.onnx"), Path(path).with_name("s8.onnx"))
    with pytest.raises(ValueError, match="part='code_decoder' decodes a VQ-VAE's code indices; "
                                         "'ae' has no codebook"):
        to_onnx(exported["ae", "autoencoder"][0], Path(path).with_name("no.onnx"),
                part="code_decoder")


def test_metadata_round_trips(exported):
    model, path = exported["ae", "scorer"]
    meta = Model(path).metadata
    assert meta["family"] == "ae" and meta["part"] == "scorer"
    assert meta["input_shape"] == [64] and meta["latent_dim"] == 6
    assert meta["normalization"] == {"mean": 0.0, "std": 16.0}
    assert meta["threshold"] == 0.05
    assert meta["aecore_version"] == __import__("aecore").__version__
    assert "threshold" not in Model(exported["ae", "encoder"][1]).metadata


def test_scorer_flags_non_finite_scores(exported):
    # A corrupt sample's NaN score must come out anomalous, not normal (NaN > t is false).
    import onnxruntime as ort

    _, path = exported["ae", "scorer"]
    x = np.full((3, 64), 0.5, np.float32)
    x[1, 7] = np.nan
    x[2, 0] = np.inf
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    score, flag = session.run(None, {"x": x})
    assert np.isnan(score[1]) and not np.isfinite(score[2])
    assert flag.tolist() == [bool(score[0] > 0.05), True, True]


def test_failed_verification_leaves_no_file(tmp_path):
    from aecore.autoencoder import AutoEncoder

    class Diverging(AutoEncoder):
        """Its exported math differs from its eager math, as a wrong reference path would."""

        def forward(self, x):
            out = super().forward(x)
            return out * 2 if torch.onnx.is_in_onnx_export() else out

    model = Diverging(8, [6], 2)
    target = tmp_path / "bad.onnx"
    with pytest.raises(VerificationError, match=r"max abs error"):
        to_onnx(model, target)
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_bad_arguments(tmp_path):
    model = _small("ae")
    with pytest.raises(ValueError, match="part must be one of"):
        to_onnx(model, tmp_path / "m.onnx", part="everything")
    with pytest.raises(ValueError, match="needs a threshold"):
        to_onnx(model, tmp_path / "m.onnx", part="scorer")
    with pytest.raises(ValueError, match="needs a model with a prior"):
        to_onnx(model, tmp_path / "m.onnx", part="generator")
    with pytest.raises(TypeError, match="must be an aecore model"):
        to_onnx(torch.nn.Linear(2, 2), tmp_path / "m.onnx")
    with pytest.raises(TypeError, match=r"to_onnx exports float32 models; this one has "
                                        r"parameters of \['torch.float64'\]"):
        to_onnx(_small("ae").double(), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def _fashion_or_digits():
    from aecore import data as datasets

    if datasets.find_fashion_mnist() is not None:
        d = datasets.load_fashion_mnist().subset(12000, 2000)
        return d, [512, 128], 32
    return datasets.load_digits(), [48, 24], 8


def test_int8_reconstruction_mse_within_3_percent(tmp_path):
    from aecore.autoencoder import AutoEncoder
    from aecore.train import Trainer

    data, hidden, latent = _fashion_or_digits()
    torch.manual_seed(0)
    model = AutoEncoder(data.input_dim, hidden, latent, output_activation="sigmoid")
    Trainer(model, lr=2e-3, batch_size=256, epochs=2, progress=False).fit(data.inputs("train"))
    fp32 = to_onnx(model, tmp_path / "fp32.onnx")
    x = data.inputs("test")
    report = quantize(fp32, tmp_path / "int8.onnx", mode="dynamic", inputs=x[:256])
    assert report["dst_bytes"] < 0.3 * report["src_bytes"]
    mse32 = np.mean((Model(fp32).run(x) - x) ** 2)
    mse8 = np.mean((Model(tmp_path / "int8.onnx").run(x) - x) ** 2)
    print(f"{data.name}: recon MSE fp32 {mse32:.5f}, int8 {mse8:.5f} "
          f"({100 * (mse8 / mse32 - 1):+.2f}%), size {report['size_ratio']:.2f}")
    assert abs(mse8 / mse32 - 1) < 0.03
    static = quantize(fp32, tmp_path / "static.onnx", mode="static", calibration=x[:512])
    mse_static = np.mean((Model(tmp_path / "static.onnx").run(x) - x) ** 2)
    assert static["dst_bytes"] < 0.35 * static["src_bytes"]
    assert mse_static < 1.1 * mse32
    half = quantize(fp32, tmp_path / "fp16.onnx", mode="fp16", inputs=x[:64])
    assert 0.45 < half["size_ratio"] < 0.55 and half["max_abs_error"] < 1e-2
    assert Model(tmp_path / "int8.onnx").metadata["quantization"] == "dynamic"
    assert Model(tmp_path / "int8.onnx").metadata["family"] == "ae"


def test_quantize_errors(exported, tmp_path):
    path = exported["ae", "autoencoder"][1]
    with pytest.raises(ValueError, match="mode must be one of"):
        quantize(path, tmp_path / "q.onnx", mode="int4")
    with pytest.raises(ValueError, match="needs calibration"):
        quantize(path, tmp_path / "q.onnx", mode="static")
    with pytest.raises(ValueError, match=r"calibration must have shape \(N, 64\)"):
        quantize(path, tmp_path / "q.onnx", mode="static", calibration=np.zeros((4, 3)))


def test_cli_export_and_infer(tmp_path):
    from aecore.cli import main
    from aecore.io import save_model

    model = _small("ae")
    model.normalization = Normalization(mean=0.0, std=16.0)
    save_model(model, tmp_path / "m", extra={"data": "digits"})
    onnx_path = tmp_path / "m.onnx"
    assert main(["export", str(tmp_path / "m"), "--part", "scorer", "--threshold", "0.1",
                 "--out", str(onnx_path)]) == 0
    raw = load_digits().x_test[:5].reshape(5, 64)
    np.save(tmp_path / "in.npy", raw)
    assert main(["infer", str(onnx_path), str(tmp_path / "in.npy"),
                 "--out", str(tmp_path / "score.npy")]) == 0
    score = np.load(tmp_path / "score.npy")
    flags = np.load(tmp_path / "score.is_anomaly.npy")
    with torch.no_grad():
        want = model.reconstruction_error(torch.from_numpy(raw / 16.0).float()).numpy()
    np.testing.assert_allclose(score, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(flags, want > 0.1)
    q = tmp_path / "q.onnx"
    assert main(["export", str(tmp_path / "m"), "--out", str(q), "--quantize", "static"]) == 0
    assert json.loads(json.dumps(Model(q).metadata))["quantization"] == "static"
    assert Path(q).stat().st_size < onnx_path.stat().st_size


def test_cli_code_decoder_decompresses_the_encoders_indices(tmp_path, capsys):
    # Compress with the encoder part (its indices file), decompress with the code decoder:
    # the autoencoder's reconstructions, in the data's units; int8 variants calibrate on the
    # model's data set encoded to indices.
    from aecore.cli import main
    from aecore.io import save_model

    model = _small("vq-vae")
    model.normalization = Normalization(mean=0.0, std=16.0)
    save_model(model, tmp_path / "m", extra={"data": "digits"})
    raw = load_digits().x_test[:7].reshape(7, 64)
    np.save(tmp_path / "x.npy", raw)
    for part in ("autoencoder", "encoder", "code_decoder"):
        assert main(["export", str(tmp_path / "m"), "--part", part, "--out",
                     str(tmp_path / f"{part}.onnx")]) == 0
    assert main(["infer", str(tmp_path / "encoder.onnx"), str(tmp_path / "x.npy"), "--out",
                 str(tmp_path / "z.npy")]) == 0
    indices = np.load(tmp_path / "z.indices.npy")
    assert indices.dtype == np.int64 and indices.shape == (7, model.num_latents)
    assert main(["infer", str(tmp_path / "code_decoder.onnx"), str(tmp_path / "z.indices.npy"),
                 "--out", str(tmp_path / "back.npy")]) == 0
    assert main(["infer", str(tmp_path / "autoencoder.onnx"), str(tmp_path / "x.npy"), "--out",
                 str(tmp_path / "whole.npy")]) == 0
    back, whole = np.load(tmp_path / "back.npy"), np.load(tmp_path / "whole.npy")
    np.testing.assert_allclose(back.reshape(whole.shape), whole, rtol=1e-5, atol=1e-4)
    assert whole.max() > 2  # inverted normalisation: the data's units, not [0, 1]
    np.save(tmp_path / "f.npy", indices.astype(np.float32))
    capsys.readouterr()
    assert main(["infer", str(tmp_path / "code_decoder.onnx"), str(tmp_path / "f.npy"), "--out",
                 str(tmp_path / "no.npy")]) == 2
    assert "must hold integer code indices, got dtype float32" in capsys.readouterr().err
    for mode in ("dynamic", "static"):
        q = tmp_path / f"{mode}.onnx"
        assert main(["export", str(tmp_path / "m"), "--part", "code_decoder", "--quantize",
                     mode, "--out", str(q)]) == 0
        assert f"wrote {q} ({mode})" in capsys.readouterr().out
        got = Model(q).run(indices)
        assert np.isfinite(got).all() and got.shape == Model(tmp_path / "code_decoder.onnx").run(
            indices).shape


def test_verification_compares_finite_scores_beside_minus_inf():
    # A recommender's scores hold -inf where a user has fewer than k unseen items; the
    # tolerance, scaled by max |want|, became infinite there and any finite score passed.
    from aecore.export.onnx_export import compare

    want = np.array([[0.5, -np.inf], [0.25, 0.125]], np.float32)
    assert compare(want.copy(), want, 1e-4, 1e-5) == (0.0, None)
    wrong = want.copy()
    wrong[0, 0] = 99.0
    err, problem = compare(wrong, want, 1e-4, 1e-5)
    assert err == 98.5 and problem == "max abs error 98.5"
    moved = want.copy()
    moved[0, 1], moved[1, 1] = 0.125, -np.inf
    assert compare(moved, want, 1e-4, 1e-5)[1].startswith("non-finite values where torch")
