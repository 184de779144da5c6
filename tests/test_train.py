import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aecore import data as datasets
from aecore.autoencoder import AutoEncoder
from aecore.checkpoint import latest_checkpoint
from aecore.io import load_history
from aecore.train import Trainer, TrainingDiverged


@pytest.fixture(scope="module")
def digits():
    return datasets.load_digits().inputs("train")


def _model(seed=0):
    torch.manual_seed(seed)
    return AutoEncoder(64, [32], 8, output_activation="sigmoid")


def test_training_lowers_the_loss_and_records_history(digits):
    hist = Trainer(_model(), lr=3e-3, batch_size=64, epochs=4, progress=False).fit(digits)
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4]
    assert {"train_loss", "val_loss", "train_mse", "val_mse"} <= set(hist[0])
    assert hist[-1]["train_loss"] < 0.6 * hist[0]["train_loss"]
    assert hist[-1]["val_loss"] < hist[0]["val_loss"]


def test_same_seed_same_run(digits):
    a = Trainer(_model(), epochs=2, progress=False, seed=3).fit(digits)
    b = Trainer(_model(), epochs=2, progress=False, seed=3).fit(digits)
    assert [h["train_loss"] for h in a] == [h["train_loss"] for h in b]


def test_resume_equals_uninterrupted_run(digits, tmp_path):
    full = Trainer(_model(), epochs=4, progress=False, checkpoint_dir=tmp_path / "a").fit(digits)
    Trainer(_model(), epochs=2, progress=False, checkpoint_dir=tmp_path / "b").fit(digits)
    # A new process would start from a fresh model: resume must restore everything.
    resumed = Trainer(_model(seed=99), epochs=4, progress=False,
                      checkpoint_dir=tmp_path / "b").fit(digits, resume=True)
    assert [h["train_loss"] for h in resumed] == [h["train_loss"] for h in full]
    assert [h["val_loss"] for h in resumed] == [h["val_loss"] for h in full]


def test_crash_while_saving_keeps_previous_checkpoint(digits, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    Trainer(_model(), epochs=1, progress=False, checkpoint_dir=ckpt).fit(digits)
    good = latest_checkpoint(ckpt)
    import aecore.checkpoint as checkpoint

    real = checkpoint.save_state
    calls = {"n": 0}

    def dying(path, tensors, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the optimizer file of the next checkpoint
            raise KeyboardInterrupt("killed mid-save")
        return real(path, tensors, metadata)

    monkeypatch.setattr(checkpoint, "save_state", dying)
    with pytest.raises(KeyboardInterrupt):
        Trainer(_model(), epochs=2, progress=False, checkpoint_dir=ckpt).fit(digits, resume=True)
    monkeypatch.setattr(checkpoint, "save_state", real)
    assert latest_checkpoint(ckpt) == good
    resumed = Trainer(_model(), epochs=2, progress=False, checkpoint_dir=ckpt)
    hist = resumed.fit(digits, resume=True)
    assert [h["epoch"] for h in hist] == [1, 2]


def test_nan_loss_stops_with_clear_message(digits, tmp_path):
    model = _model()
    trainer = Trainer(model, epochs=3, progress=False, checkpoint_dir=tmp_path)
    trainer.fit(digits[:200])
    good = latest_checkpoint(tmp_path)
    nan = torch.tensor(float("nan"))
    model.loss = lambda x, y=None, target=None: {"loss": nan * x.sum()}
    trainer = Trainer(model, epochs=5, progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 4, step 1.*last good"):
        trainer.fit(digits[:200], resume=True)
    assert latest_checkpoint(tmp_path) == good


def test_early_stopping_restores_best(digits):
    # A huge learning rate makes validation loss stall quickly.
    trainer = Trainer(_model(), lr=0.5, epochs=30, patience=2, progress=False)
    hist = trainer.fit(digits)
    assert len(hist) < 30
    best = min(h["val_loss"] for h in hist)
    from aecore.train import evaluate

    x_val = torch.from_numpy(digits)[trainer._split(len(digits))[1]]
    assert evaluate(trainer.model, x_val)["loss"] == pytest.approx(best, rel=1e-5)


def test_early_stopping_keeps_the_best_weights_across_a_resume(digits, tmp_path):
    def trainer(epochs, folder, seed=0):
        return Trainer(_model(seed), lr=0.5, epochs=epochs, patience=3, progress=False,
                       checkpoint_dir=tmp_path / folder)

    full = trainer(30, "a")
    hist = full.fit(digits)
    stop = len(hist)
    best_epoch = min(hist, key=lambda h: h["val_loss"])["epoch"]
    assert stop < 30 and best_epoch < stop
    # Interrupted after the best epoch, before the stop; a fresh process resumes.
    trainer(best_epoch + 1, "b").fit(digits)
    resumed = trainer(30, "b", seed=99)
    def losses(h):
        return [{k: v for k, v in r.items() if k != "time_s"} for r in h]

    assert losses(resumed.fit(digits, resume=True)) == losses(hist)
    for k, v in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k


def test_bad_arguments():
    with pytest.raises(ValueError, match="lr must be"):
        Trainer(_model(), lr=0)
    with pytest.raises(ValueError, match="val_fraction"):
        Trainer(_model(), val_fraction=1.0)
    with pytest.raises(ValueError, match="one label per sample"):
        Trainer(_model(), progress=False).fit(np.zeros((10, 64), np.float32), np.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        Trainer(_model(), progress=False).fit(np.full((10, 64), np.nan, np.float32))
    with pytest.raises(TypeError, match="x must be"):
        Trainer(_model(), progress=False).fit([[0.0] * 64])


def test_two_process_gloo_training(tmp_path):
    """torchrun-style data parallelism on CPU: the ranks stay identical and the loss falls."""
    script = tmp_path / "worker.py"
    script.write_text(f"""
import json, os, torch
from aecore import data as datasets
from aecore.autoencoder import AutoEncoder
from aecore.train import Trainer
torch.manual_seed(int(os.environ["RANK"]) + 1)  # different inits: rank 0's must win
x = datasets.load_digits().inputs("train")
model = AutoEncoder(64, [32], 8, output_activation="sigmoid")
hist = Trainer(model, lr=3e-3, epochs=3, batch_size=64, progress=False).fit(x)
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
json.dump({{"params": flat.tolist(), "hist": hist}},
          open(r"{tmp_path}/rank" + os.environ["RANK"] + ".json", "w"))
""")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r),
                                                                   "LOCAL_RANK": str(r)})
             for r in range(2)]
    assert [p.wait(timeout=240) for p in procs] == [0, 0]
    r0, r1 = (json.loads(Path(tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert np.array_equal(r0["params"], r1["params"])
    assert r0["hist"][-1]["train_loss"] < r0["hist"][0]["train_loss"]
    drop_time = [{k: v for k, v in h.items() if k != "time_s"} for h in r0["hist"]]
    assert drop_time == [{k: v for k, v in h.items() if k != "time_s"} for h in r1["hist"]]


def test_cli_train_writes_weights_config_history(tmp_path):
    from aecore.cli import main

    out = tmp_path / "run"
    assert main(["train", "--model", "tied-ae", "--data", "digits", "--epochs", "2",
                 "--out", str(out), "--quiet"]) == 0
    assert {"model.safetensors", "config.json", "history.json", "loss.png"} <= {
        p.name for p in out.iterdir()}
    hist = load_history(out)
    assert len(hist) == 2 and {"train_loss", "val_loss"} <= set(hist[0])
    config = json.loads((out / "config.json").read_text())
    assert config["kwargs"]["tied"] is True and config["normalization"] == {"mean": 0.0,
                                                                           "std": 16.0}
    assert main(["train", "--model", "nope", "--data", "digits", "--out", str(out)]) == 2
