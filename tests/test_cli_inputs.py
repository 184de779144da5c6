"""``aecore train`` rejects bad options before loading or training; model folders survive a
crash while being saved over."""

import json

import numpy as np
import pytest
import torch

import aecore.io
from aecore.autoencoder import AutoEncoder
from aecore.cli import main
from aecore.io import load_model, save_model

FAST = {"--model": "ae", "--data": "digits", "--epochs": "1", "--limit": "50",
        "--hidden": "16"}


def _train(tmp_path, **flags) -> list[str]:
    opts = {**FAST, "--out": str(tmp_path / "run"), **flags}
    return ["train", "--quiet", *[t for k, v in opts.items() if v is not None for t in (k, v)]]


@pytest.mark.parametrize("flags, message", [
    ({"--seed": "-1"}, "--seed must be a non-negative integer, got -1"),
    ({"--weight": "0.5"}, "--weight is for families with a penalty or prior weight; 'ae'"),
    ({"--channels": "8"}, "--channels is for convolutional families; 'ae' is sized by --hidden"),
    ({"--model": "conv-ae", "--hidden": "8"}, "--hidden is for MLP families; 'conv-ae'"),
    ({"--model": "vq-vae", "--latent": "12"}, "--latent must be a multiple of 8 for vq-vae"),
])
def test_train_rejects_flags_the_family_would_ignore(tmp_path, capsys, flags, message):
    assert main(_train(tmp_path, **flags)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "0", "--batch-size must be a positive integer, got 0"),
    ("--epochs", "0", "--epochs must be a positive integer, got 0"),
    ("--limit", "0", "--limit must be a positive integer, got 0"),
    ("--limit", "-5", "--limit must be a positive integer, got -5"),
    ("--latent", "0", "--latent must be a positive integer, got 0"),
    ("--hidden", ",", "--hidden must be a comma-separated list of positive integers"),
    ("--hidden", "16,0", "--hidden must be a comma-separated list of positive integers"),
    ("--channels", ",", "--channels must be a comma-separated list of positive integers"),
    ("--activation", "foo", "--activation must be one of identity, relu, "),
])
def test_train_rejects_bad_numbers_up_front(tmp_path, capsys, flag, value, message):
    # --batch-size 0 crashed in default_epochs, which only runs without --epochs.
    extra = {"--epochs": None} if flag == "--batch-size" else {}
    assert main(_train(tmp_path, **extra, **{flag: value})) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing trained or written


@pytest.mark.parametrize("flags, message", [
    # torch.manual_seed overflowed at 2**64 without naming the flag.
    ({"--seed": str(2**64)}, f"--seed must be at most 2**32 - 1 (4294967295), got {2**64}"),
    ({"--seed": str(2**32)}, "--seed must be at most 2**32 - 1"),
    # The Trainer's and the models' own checks name their arguments (lr, beta, lam, weight).
    ({"--lr": "0"}, "--lr must be a positive finite number, got 0.0"),
    ({"--lr": "inf"}, "--lr must be a positive finite number, got inf"),
    ({"--model": "vae", "--weight": "-1"}, "--weight must be a finite number >= 0, got -1.0"),
    ({"--model": "cae", "--weight": "nan"}, "--weight must be a finite number >= 0, got nan"),
    ({"--model": "sparse-ae", "--weight": "-1"}, "--weight must be a finite number >= 0"),
    ({"--val-fraction": "1"}, "--val-fraction must be in [0, 1), got 1.0"),
    # The Trainer's own message named its val_fraction argument, not the flags.
    ({"--limit": "1"}, "1 training sample (--limit 1) is too few to hold out a validation split "
                       "(--val-fraction 0.1): train on more samples or pass --val-fraction 0"),
    ({"--patience": "0"}, "--patience must be a positive integer, got 0"),
    # Finite in float64 but not in float32, in which the noise is added.
    ({"--corruption": "gaussian:1e39"},
     "--corruption: sigma must be at most float32's largest value"),
    ({"--corruption": "mask:2"}, "--corruption: fraction must be in [0, 1], got 2.0"),
])
def test_train_names_the_flag_of_a_bad_value(tmp_path, capsys, flags, message):
    assert main(_train(tmp_path, **flags)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_train_says_when_the_model_does_not_fit_in_memory(tmp_path, capsys):
    # 16 x 10**12 weights: the allocation fails at once (a RuntimeError from torch).
    assert main(_train(tmp_path, **{"--latent": str(10**12)})) == 2
    err = capsys.readouterr().err
    assert err.startswith("aecore train: error: not enough memory for model 'ae' of 64 inputs "
                          "with --hidden 16, --latent 1000000000000: ")
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv", [
    ["sample", "no-such-model", "--seed", str(2**64)],
    ["sample", "no-such-model", "--seed", "-1"],
    ["quickstart", "--seed", str(2**64)],
])
def test_other_commands_check_the_seed_range(tmp_path, capsys, argv):
    assert main([*argv, "--out", str(tmp_path / "out.png")]) == 2
    assert "error: --seed must be " in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()


def test_train_records_the_data_root_by_absolute_path(tmp_path, monkeypatch):
    # search and static-quantized export read the data set from the config's folder, from
    # whatever working directory they run in.
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--quiet", "--model", "ae", "--data", "digits", "--data-root", "data",
                 "--epochs", "1", "--limit", "50", "--hidden", "16", "--out", "run"]) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data_root"] == str((tmp_path / "data").resolve())
    assert main(["train", "--quiet", "--model", "ae", "--data", "digits", "--epochs", "1",
                 "--limit", "50", "--hidden", "16", "--out", "run2"]) == 0
    assert json.loads((tmp_path / "run2" / "config.json").read_text())["data_root"] is None


def test_train_records_data_files_by_absolute_path_and_says_when_resume_finds_nothing(
        tmp_path, capsys, monkeypatch):
    import json

    np.save(tmp_path / "rows.npy", np.random.default_rng(0).random((40, 6)).astype(np.float32))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--quiet", "--model", "ae", "--data", "rows.npy", "--epochs", "1",
                 "--out", "run", "--resume"]) == 0
    assert "no checkpoint in run/checkpoints: training from the start" in capsys.readouterr().err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"] == str(tmp_path / "rows.npy")


def test_train_takes_a_csv_label_column_and_later_commands_reload_it(tmp_path, capsys):
    import json

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    table = np.c_[rng.random((60, 5)) + labels[:, None], labels]
    np.savetxt(tmp_path / "t.csv", table, delimiter=",", header="a,b,c,d,e,label", comments="")
    run = tmp_path / "cvae"
    assert main(["train", "--quiet", "--model", "cvae", "--data", str(tmp_path / "t.csv"),
                 "--label-column", "5", "--epochs", "1", "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["label_column"] == 5 and config["sample_shape"] == [5]
    assert main(["export", str(run), "--part", "decoder", "--out", str(tmp_path / "d.onnx")]) == 0
    # Quantizing reloads the table as it was trained (five features, the labels apart) for its
    # calibration and report rows.
    assert main(["train", "--quiet", "--model", "ae", "--data", str(tmp_path / "t.csv"),
                 "--label-column", "5", "--epochs", "1", "--out", str(tmp_path / "ae")]) == 0
    for mode in ("dynamic", "static"):
        assert main(["export", str(tmp_path / "ae"), "--part", "encoder", "--out",
                     str(tmp_path / f"e-{mode}.onnx"), "--quantize", mode]) == 0
    # The data set changed under the trained model: the error names it, not a flag never given.
    np.savetxt(tmp_path / "t.csv", np.c_[table, table[:, :1]], delimiter=",")
    assert main(["export", str(tmp_path / "ae"), "--part", "encoder", "--out",
                 str(tmp_path / "e-again.onnx"), "--quantize", "static"]) == 2
    err = capsys.readouterr().err
    assert f"the model's data set {str(tmp_path / 't.csv')!r} (config.json) must hold samples " \
        "of shape (5,)" in err and "--calibration" not in err
    # Errors about the label column name the flag.
    assert main(["train", "--quiet", "--model", "ae", "--data", "digits", "--label-column", "0",
                 "--epochs", "1", "--out", str(tmp_path / "x")]) == 2
    assert "--label-column is for .npy/.csv tables; the data set 'digits'" in \
        capsys.readouterr().err
    assert main(["train", "--quiet", "--model", "ae", "--data", str(tmp_path / "t.csv"),
                 "--label-column", "9", "--epochs", "1", "--out", str(tmp_path / "y")]) == 2
    assert "--label-column must be a column index of the 7 columns" in capsys.readouterr().err


def test_train_out_must_not_be_a_file(tmp_path, capsys):
    (tmp_path / "run").write_text("keep me")
    assert main(_train(tmp_path)) == 2
    assert "--out must be a folder path" in capsys.readouterr().err
    assert (tmp_path / "run").read_text() == "keep me"
    assert main(_train(tmp_path, **{"--out": str(tmp_path / "run" / "sub")})) == 2
    capsys.readouterr()
    (tmp_path / "run").unlink()
    (tmp_path / "run" / "loss.png").mkdir(parents=True)  # found before training, not after
    assert main(_train(tmp_path)) == 2
    assert "/loss.png' is a folder, where the file loss.png goes" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["loss.png"]


def _ae(hidden: int) -> AutoEncoder:
    torch.manual_seed(hidden)
    return AutoEncoder(12, [hidden], 2).eval()


def test_save_model_over_a_folder_survives_a_crash(tmp_path, monkeypatch):
    old, old_history = _ae(6), [{"epoch": 1, "train_loss": 6.0}]
    save_model(old, tmp_path / "m", history=old_history)
    write_json = aecore.io.write_json

    def crash_on_config(path, obj):
        if path.name == aecore.io.CONFIG:
            raise KeyboardInterrupt("killed while saving")
        return write_json(path, obj)

    monkeypatch.setattr(aecore.io, "write_json", crash_on_config)
    with pytest.raises(KeyboardInterrupt):
        # The new weights and history are written, the config is not.
        save_model(_ae(8), tmp_path / "m", history=[{"epoch": 1, "train_loss": 8.0}])
    monkeypatch.undo()
    x = torch.rand(3, 12)
    # Still the old model, with its own history.
    torch.testing.assert_close(load_model(tmp_path / "m")(x), old(x))
    assert aecore.io.load_history(tmp_path / "m") == old_history

    new, new_history = _ae(8), [{"epoch": 1, "train_loss": 8.5}]
    save_model(new, tmp_path / "m", history=new_history)
    torch.testing.assert_close(load_model(tmp_path / "m")(x), new(x))
    assert aecore.io.load_history(tmp_path / "m") == new_history
    # One weights and one history file left: the crashed save's and the old ones are gone.
    assert len(list((tmp_path / "m").glob("*.safetensors"))) == 1
    assert len(list((tmp_path / "m").glob("history*.json"))) == 1
    save_model(old, tmp_path / "m")
    torch.testing.assert_close(load_model(tmp_path / "m")(x), old(x))
    assert aecore.io.load_history(tmp_path / "m") == []
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json",
                                                                  "model.safetensors"]


@pytest.mark.parametrize("kwargs,error,match", [
    ({"extra": {"seed": torch.tensor(1)}}, TypeError, "extra must hold JSON values only"),
    ({"extra": {"family": "vae"}}, ValueError, r"extra must not set config.json's own keys"),
    ({"extra": [1]}, TypeError, "extra must be a dict or None"),
    ({"history": [{"epoch": 2, "x": object()}]}, TypeError, "history must hold JSON values"),
], ids=["tensor-in-extra", "reserved-key", "extra-not-dict", "object-in-history"])
def test_save_model_rejects_what_it_cannot_write_before_writing(tmp_path, kwargs, error, match):
    old = _ae(6)
    save_model(old, tmp_path / "m", history=[{"epoch": 1}])
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    with pytest.raises(error, match=match):
        save_model(_ae(8), tmp_path / "m", **{"history": [{"epoch": 2}], **kwargs})
    # Nothing written: the old model, its history and no orphan weights file.
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before


@pytest.mark.parametrize("field,value,match", [
    ("sample_shape", [1, "a", 5], "'sample_shape' must be a list of ints >= 1"),
    ("sample_shape", [-1, -28, 28], "'sample_shape' must be a list of ints >= 1"),
    ("sample_shape", [0, 28, 28], "'sample_shape' must be a list of ints >= 1"),
    ("seed", "abc", "'seed' must be an int >= 0, got 'abc'"),
    ("seed", 1.7, "'seed' must be an int >= 0, got 1.7"),  # would rebuild another split
    ("data", 5, "'data' must be a string, got 5"),
    ("data_root", 5, "'data_root' must be a string, got 5"),
    ("label_column", "x", "'label_column' must be an int, got 'x'"),
])
def test_training_record_names_a_damaged_field(tmp_path, field, value, match):
    save_model(_ae(6), tmp_path / "m", extra={"data": "digits", "seed": 0})
    config = aecore.io.read_config(tmp_path / "m")
    aecore.io.write_json(tmp_path / "m" / "config.json", {**config, field: value})
    with pytest.raises(ValueError, match=match):
        aecore.io.training_record(tmp_path / "m")


def test_save_model_leaves_files_it_did_not_write(tmp_path):
    # A folder that held no model: its files stay, whatever their names.
    folder = tmp_path / "m"
    folder.mkdir()
    theirs = ["model.safetensors", "model-00001-of-00002.safetensors", "model-best.safetensors"]
    for name in theirs:
        (folder / name).write_bytes(b"not ours")
    model = _ae(6)
    save_model(model, folder, history=[{"epoch": 1, "train_loss": 1.0}])
    assert all((folder / name).read_bytes() == b"not ours" for name in theirs)
    x = torch.rand(3, 12)
    torch.testing.assert_close(load_model(folder)(x), model(x))
    (folder / "history.json").write_text("{not json")
    with pytest.raises(ValueError, match="history.json' is not valid JSON"):
        aecore.io.load_history(folder)
    # Saving another model over it with no history drops the old model's history.
    save_model(_ae(8), folder)
    assert aecore.io.load_history(folder) == []
    assert all((folder / name).read_bytes() == b"not ours" for name in theirs[1:])


def test_save_model_takes_numpy_normalization_values(tmp_path):
    from aecore.normalization import Normalization

    model = _ae(6)
    model.normalization = Normalization(np.zeros(12), np.float32(2.0))
    save_model(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["normalization"] == {"mean": [0.0] * 12, "std": 2.0}
    assert load_model(tmp_path / "m").normalization == model.normalization


def test_train_refuses_to_start_over_an_earlier_runs_checkpoints(tmp_path, capsys):
    assert main(_train(tmp_path)) == 0
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert main(_train(tmp_path)) == 2
    assert "holds an earlier run's checkpoints" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before
    assert main(_train(tmp_path, **{"--resume": None}) + ["--resume"]) == 0


def test_load_model_reads_folders_saved_before_config_named_the_weights(tmp_path):
    model = _ae(6)
    save_model(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config.pop("weights") == "model.safetensors"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    x = torch.rand(3, 12)
    torch.testing.assert_close(load_model(tmp_path / "m")(x), model(x))
    config["weights"] = "../elsewhere.safetensors"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'weights' must be a .safetensors file name"):
        load_model(tmp_path / "m")


def test_load_history_reads_folders_saved_before_config_named_it(tmp_path):
    history = [{"epoch": 1, "train_loss": 1.0}]
    save_model(_ae(6), tmp_path / "m", history=history)
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    assert config.pop("history") == "history.json"
    path.write_text(json.dumps(config))
    assert aecore.io.load_history(tmp_path / "m") == history
    (tmp_path / "m" / "history.json").unlink()
    assert aecore.io.load_history(tmp_path / "m") == []  # such a folder may have none
    path.write_text(json.dumps({**config, "history": "history.json"}))
    with pytest.raises(FileNotFoundError, match=r"no history file .*\(named by config.json\)"):
        aecore.io.load_history(tmp_path / "m")
    for bad in ("../h.json", "config.json", "h.txt", 3):
        path.write_text(json.dumps({**config, "history": bad}))
        with pytest.raises(ValueError, match="'history' must be a .json file name"):
            aecore.io.load_history(tmp_path / "m")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the Trainer moves the "
                    "model there, and evaluation must move its inputs along")
def test_quickstart_and_train_evaluate_on_cuda(tmp_path, monkeypatch):
    from aecore import data
    from aecore.quickstart import run

    monkeypatch.setattr(data, "find_fashion_mnist", lambda root=None: None)  # digits: fast
    run(out=tmp_path / "qs", epochs=1, progress=False)
    # A 2-D code on tabular data: the latent plot encodes the test set on the model's device.
    assert main(["train", "--quiet", "--model", "ae", "--data", "swiss-roll", "--epochs", "1",
                 "--limit", "200", "--out", str(tmp_path / "sr")]) == 0
    assert (tmp_path / "sr" / "latent.png").is_file()


def test_commands_refuse_models_and_folders_they_cannot_serve(tmp_path, capsys):
    # A digits autoencoder and a digits cvae, one epoch each.
    assert main(_train(tmp_path)) == 0
    cvae = tmp_path / "cvae"
    assert main(_train(tmp_path, **{"--model": "cvae", "--out": str(cvae)})) == 0
    ae = tmp_path / "run"
    rows = np.random.default_rng(0).integers(0, 17, (5, 64)).astype(np.float32)
    np.save(tmp_path / "q.npy", rows)

    def refused(args, message):
        assert main(args) == 2
        assert message in capsys.readouterr().err

    # Pixels are no interaction rows: recommending from them would answer nonsense.
    refused(["recommend", str(ae), str(tmp_path / "q.npy"), "--out", str(tmp_path / "r.npz")],
            "was trained on 'digits', not on (users, items) interaction rows")
    refused(["export", str(ae), "--part", "recommender", "--out", str(tmp_path / "r.onnx")],
            "was trained on 'digits', not on (users, items) interaction rows")
    # A conditional model encodes with labels, which search has no flag for.
    refused(["search", str(cvae), str(tmp_path / "q.npy"), "--out", str(tmp_path / "n.npz")],
            f"the model in {str(cvae)!r} is a conditional 'cvae': it encodes with labels")
    # aecore sample's checks name its flags.
    grid = ["--out", str(tmp_path / "g.png")]
    refused(["sample", str(ae), *grid], "the model in")
    refused(["sample", str(cvae), "--n", "0", *grid], "--n must be in [1, 4096]")
    refused(["sample", str(cvae), "--n", "5000", *grid], "--n must be in [1, 4096]")
    refused(["sample", str(cvae), "--label", "10", *grid], "--label must be in [0, 10), got 10")
    assert not (tmp_path / "g.png").exists()
    # A scorer threshold below 0 would flag every input.
    refused(["export", str(ae), "--part", "scorer", "--threshold", "-1", "--out",
             str(tmp_path / "s.onnx")], "threshold must be a finite number >= 0, got -1.0")
    # One calibration sample is taken as other commands take it.
    np.save(tmp_path / "one.npy", rows[0])
    assert main(["export", str(ae), "--part", "encoder", "--quantize", "static",
                 "--calibration", str(tmp_path / "one.npy"), "--out",
                 str(tmp_path / "e.onnx")]) == 0
    np.save(tmp_path / "nan.npy", np.full((3, 64), np.nan, np.float32))
    refused(["export", str(ae), "--part", "encoder", "--quantize", "static", "--calibration",
             str(tmp_path / "nan.npy"), "--out", str(tmp_path / "e2.onnx")],
            "--calibration contains NaN or Inf")
    # A model of a table of the user's own (0/1 rows) exports as a recommender; --k is checked.
    np.save(tmp_path / "rows.npy", (rows > 8).astype(np.float32).repeat(8, axis=0))
    mine = tmp_path / "rows-model"
    assert main(_train(tmp_path, **{"--data": str(tmp_path / "rows.npy"), "--out": str(mine),
                                    "--limit": None})) == 0
    refused(["export", str(mine), "--part", "recommender", "--k", "0", "--out",
             str(tmp_path / "r.onnx")], "--k must be an int in [1, 64] (the number of items)")
    assert main(["export", str(mine), "--part", "recommender", "--k", "3", "--out",
                 str(tmp_path / "r.onnx")]) == 0
    # A folder of other files is no --out: its config.json or loss.png would be replaced.
    other = tmp_path / "mine"
    other.mkdir()
    (other / "loss.png").write_bytes(b"my plot")
    refused(_train(tmp_path, **{"--out": str(other)}), "holds other files and no aecore model")
    assert [p.name for p in other.iterdir()] == ["loss.png"]
    # Nor is another tool's model folder, though it holds a config.json.
    (other / "config.json").write_text('{"model_type": "bert"}')
    refused(_train(tmp_path, **{"--out": str(other)}),
            "holds a config.json that is not an aecore model's")
    assert sorted(p.name for p in other.iterdir()) == ["config.json", "loss.png"]
