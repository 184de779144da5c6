"""The ``aecore`` command line."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t]
    except ValueError:
        msg = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None


# Seeds reach numpy, torch and scikit-learn; the last takes 32-bit seeds only.
SEED_MAX = 2**32 - 1


def _check_seed(seed: int) -> None:
    if seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {seed}")
    if seed > SEED_MAX:
        raise ValueError(f"--seed must be at most 2**32 - 1 ({SEED_MAX}), got {seed}")


def _cmd_quickstart(args) -> int:
    from aecore.quickstart import run

    _check_seed(args.seed)
    run(out=args.out, epochs=args.epochs, seed=args.seed, data_root=args.data_root,
        progress=not args.quiet)
    return 0


def _cmd_train(args) -> int:
    import torch

    from aecore import data as datasets
    from aecore.checkpoint import holds_checkpoints, latest_checkpoint
    from aecore.families import (
        IMAGE_INPUT,
        USES_LABELS,
        Sizes,
        build,
        check_flags,
        check_sizes,
        default_corruption,
        default_epochs,
        train_targets,
    )
    from aecore.io import CONFIG, check_model_dir, check_output_dir, save_model
    from aecore.plots import plot_history
    from aecore.train import Trainer, TrainingDiverged, init_distributed

    # Checked before anything is loaded or trained: bad values would only fail later, or
    # quietly mean something else (--limit 0: all samples).
    for flag, value in (("--batch-size", args.batch_size), ("--epochs", args.epochs),
                        ("--limit", args.limit)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    _check_seed(args.seed)
    # The Trainer and the models check these too, but by their argument names (lr, beta, lam).
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a positive finite number, got {args.lr}")
    if args.weight is not None and not (math.isfinite(args.weight) and args.weight >= 0):
        raise ValueError(f"--weight must be a finite number >= 0, got {args.weight}")
    if not 0.0 <= args.val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.patience is not None and args.patience < 1:
        raise ValueError(f"--patience must be a positive integer, got {args.patience}")
    if args.corruption is not None:
        from aecore.corruption import parse_corruption

        try:
            parse_corruption(args.corruption)
        except ValueError as e:
            raise ValueError(f"--corruption: {e}") from None
    check_output_dir(Path(args.out) / "checkpoints", "--out")
    check_output_dir(args.out, "--out", ("loss.png", "latent.png"))
    check_model_dir(args.out, "--out")
    out = Path(args.out)
    if (out.is_dir() and not (out / CONFIG).is_file()
            and not (out / "checkpoints").is_dir() and any(out.iterdir())):
        # Its config.json, loss.png or model.safetensors would be replaced among them.
        raise ValueError(f"--out {args.out} holds other files and no aecore model: choose a new "
                         "or empty folder")
    if not args.resume and holds_checkpoints(Path(args.out) / "checkpoints"):
        raise ValueError(f"--out {args.out} holds an earlier run's checkpoints "
                         f"({Path(args.out) / 'checkpoints'}): pass --resume to continue it, or "
                         "choose another --out (or remove that folder) to start over")
    sizes = Sizes(hidden=args.hidden, latent=args.latent, activation=args.activation,
                  channels=args.channels, weight=args.weight)
    check_sizes(sizes)
    check_flags(args.model, sizes)
    rank, _ = init_distributed()
    torch.manual_seed(args.seed)
    data = datasets.load(args.data, root=args.data_root, seed=args.seed,
                         label_column=args.label_column, label_name="--label-column")
    if args.limit is not None:
        data = data.subset(args.limit, args.limit)
    try:
        model = build(args.model, data, sizes)
    except (RuntimeError, MemoryError) as e:
        # torch reports a failed allocation as a RuntimeError; any other one is a bug to show.
        if not isinstance(e, MemoryError) and "alloc" not in str(e):
            raise
        given = ", ".join(f"{flag} {value}" for flag, value in (
            ("--hidden", args.hidden and ",".join(map(str, args.hidden))),
            ("--latent", args.latent),
            ("--channels", args.channels and ",".join(map(str, args.channels))))
            if value is not None)
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"not enough memory for model {args.model!r} of {data.input_dim} "
                         f"inputs{' with ' + given if given else ''}: {detail}") from None
    flat = args.model not in IMAGE_INPUT
    x = data.inputs("train", flat=flat)
    if args.val_fraction > 0 and len(x) < 2:  # one sample can't also give a validation split
        limit = f" (--limit {args.limit})" if args.limit is not None else ""
        raise ValueError(f"{len(x)} training sample{limit} is too few to hold out a validation "
                         f"split (--val-fraction {args.val_fraction}): train on more samples or "
                         "pass --val-fraction 0")
    y = train_targets(args.model, data, x, model.latent_dim, seed=args.seed)
    spec = args.corruption or default_corruption(args.model, data)
    corruption = None
    if spec:
        from aecore.corruption import parse_corruption

        corruption = parse_corruption(spec)
    out = Path(args.out)
    epochs = args.epochs if args.epochs is not None else default_epochs(
        round(len(x) * (1 - args.val_fraction)), args.batch_size)
    trainer = Trainer(model, lr=args.lr, batch_size=args.batch_size, epochs=epochs,
                      val_fraction=args.val_fraction, seed=args.seed, patience=args.patience,
                      corruption=corruption, amp=args.amp, progress=not args.quiet,
                      checkpoint_dir=out / "checkpoints")
    try:
        if args.resume and latest_checkpoint(out / "checkpoints") is None:
            print(f"no checkpoint in {out / 'checkpoints'}: training from the start",
                  file=sys.stderr)
        history = trainer.fit(x, y, resume=args.resume)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if rank != 0:
        return 0
    from aecore.train import evaluate

    x_test = data.inputs("test", flat=flat)
    # Targets exist for the training set only: a geometry model is scored on reconstruction.
    labelled = args.model in USES_LABELS
    test = evaluate(model, x_test, data.labels("test") if labelled else None)
    if data.interactions:
        from aecore.recommend import ranking_report

        # Held-out users: rank each one's held-out items from the rest of their row.
        test.update(ranking_report(model, data.x_test, data.x_train, seed=args.seed))
    elif corruption is not None:
        from aecore.corruption import denoise_report

        # PSNR of the corrupted held-out inputs and of the model's output, against the clean ones.
        test.update(denoise_report(model, torch.from_numpy(x_test), corruption,
                                   torch.Generator().manual_seed(args.seed),
                                   labels=torch.from_numpy(data.labels("test")) if labelled
                                   else None))
    # A data file or folder by its absolute path: later commands (search, static quantization)
    # find it from any working directory.
    data_ref = args.data if args.data in datasets.NAMES else str(Path(args.data).resolve())
    data_root = None if args.data_root is None else str(Path(args.data_root).resolve())
    save_model(model, out, history,
               extra={"data": data_ref, "data_root": data_root, "seed": args.seed,
                      "label_column": args.label_column,
                      "model": args.model, "corruption": spec, "test": test,
                      "sample_shape": list(data.sample_shape)})
    plot_history(history, out / "loss.png")
    if model.latent_dim == 2 and not data.is_image:
        from aecore.plots import plot_latent_2d

        device = next(model.parameters()).device
        inputs = torch.from_numpy(x_test).to(device)
        with torch.no_grad():  # a conditional model encodes with its labels
            code = (model.encode(inputs, torch.from_numpy(data.labels("test")).to(device))
                    if labelled else model.encode(inputs))
        code = code[0] if isinstance(code, tuple) else code
        plot_latent_2d(code.cpu().numpy(), out / "latent.png", color=data.labels("test"),
                       title=f"{args.model} codes of {data.name}")
    print("test " + "  ".join(f"{k}={v:.5g}" for k, v in test.items()))
    print(f"saved {out}")
    return 0


def _cmd_sample(args) -> int:
    from aecore.io import check_output, load_model, training_record
    from aecore.vae import MAX_GRID, VAE, grid_shape, sample_grid

    _check_seed(args.seed)
    check_output(args.out, ".png")
    model = load_model(args.model_dir)
    # The API's checks, in the flags' names.
    if not isinstance(model, VAE):
        raise ValueError(f"aecore sample draws from a vae, beta-vae or cvae; the model in "
                         f"{str(args.model_dir)!r} has family {model.family!r}, which has no prior")
    if not 1 <= args.n <= MAX_GRID:
        raise ValueError(f"--n must be in [1, {MAX_GRID}] (one PNG grid), got {args.n}")
    classes = model.num_classes
    if args.label is not None and not classes:
        raise ValueError(f"--label is for conditional models (cvae); {model.family!r} has none")
    if args.label is not None and not 0 <= args.label < classes:
        raise ValueError(f"--label must be in [0, {classes}), got {args.label}")
    shape = args.image_shape
    if shape is None:
        # A flat model of images draws them in the shape of its training data's samples.
        shape = training_record(args.model_dir)["sample_shape"]
        shape = shape if shape is not None and len(shape) == 3 else None
    grid_shape(model, shape, "--image-shape")
    sample_grid(model, args.n, args.out, label=args.label, seed=args.seed, image_shape=shape)
    print(f"wrote {args.out}")
    return 0


def _cmd_export(args) -> int:
    from aecore.export.cli import export_cli

    export_cli(args.model_dir, args.part, args.out, quantize=args.quantize,
               threshold=args.threshold, calibration=args.calibration, k=args.k)
    return 0


def _cmd_infer(args) -> int:
    from aecore.export.cli import infer_cli

    infer_cli(args.model, args.input, args.out, labels_path=args.labels)
    return 0


def _cmd_denoise(args) -> int:
    from aecore.corruption import denoise_file

    denoise_file(args.model_dir, args.input, args.out, labels_npy=args.labels)
    print(f"wrote {args.out}")
    return 0


def _cmd_search(args) -> int:
    from aecore.search import search_file

    search_file(args.model_dir, args.query, args.out, gallery=args.gallery, k=args.k,
                metric=args.metric, grid=args.grid, data_root=args.data_root)
    return 0


def _cmd_recommend(args) -> int:
    from aecore.recommend import recommend_file

    recommend_file(args.model_dir, args.history, args.out, k=args.k)
    return 0


def _cmd_bench(args) -> int:
    from aecore.bench_report import main as bench_main

    return bench_main(out=args.out, quick=args.quick, only=args.only)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aecore", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quickstart", help="train an autoencoder on Fashion-MNIST (or digits), "
                       "compare with PCA, plot reconstructions")
    q.add_argument("--out", default="runs/quickstart")
    q.add_argument("--epochs", type=int, default=None)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--data-root", default=None, help="folder holding the Fashion-MNIST files")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(fn=_cmd_quickstart)

    t = sub.add_parser("train", help="train a model family and save it")
    t.add_argument("--model", default="ae")
    t.add_argument("--data", default="fashion-mnist",
                   help="fashion-mnist, digits, swiss-roll, movielens-100k or a .npy/.csv path")
    t.add_argument("--data-root", default=None)
    t.add_argument("--epochs", type=int, default=None,
                   help="default: 10, more on small data sets (at least 1500 steps)")
    t.add_argument("--out", required=True)
    t.add_argument("--hidden", type=_ints, default=None, help="hidden sizes, e.g. 512,128")
    t.add_argument("--latent", type=int, default=None)
    t.add_argument("--channels", type=_ints, default=None, help="conv channels, e.g. 32,64")
    t.add_argument("--activation", default=None,
                   help="hidden activation (default: relu; silu for 3-D data such as the swiss "
                        "roll)")
    t.add_argument("--weight", type=float, default=None,
                   help="the family's penalty weight (cae, grae: lambda; beta-vae: beta; "
                        "sparse-ae)")
    t.add_argument("--corruption", default=None,
                   help="denoising: gaussian:SIGMA, mask:FRACTION or saltpepper:FRACTION")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--val-fraction", type=float, default=0.1)
    t.add_argument("--patience", type=int, default=None, help="early stopping patience")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--limit", type=int, default=None, help="use the first N samples only")
    t.add_argument("--label-column", type=int, default=None,
                   help="PATH.csv/.npy tables: the column of class ids (cvae; colours plots)")
    t.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(fn=_cmd_train)

    s = sub.add_parser("sample", help="draw samples from a trained VAE's prior as a PNG grid")
    s.add_argument("model_dir")
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--out", default="samples.png")
    s.add_argument("--label", type=int, default=None, help="class for a conditional model")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-shape", type=_ints, default=None,
                   help="draw a flat model's samples as H,W or C,H,W images (default: the "
                        "training data's sample shape, else square)")
    s.set_defaults(fn=_cmd_sample)

    e = sub.add_parser("export", help="export a trained model to ONNX")
    e.add_argument("model_dir")
    e.add_argument("--part", default="autoencoder",
                   choices=["autoencoder", "encoder", "decoder", "code_decoder", "generator",
                            "scorer", "recommender"])
    e.add_argument("--out", required=True)
    e.add_argument("--quantize", choices=["dynamic", "static", "fp16"], default=None)
    e.add_argument("--calibration", default=None, help=".npy inputs for static quantization")
    e.add_argument("--threshold", type=float, default=None, help="scorer's anomaly threshold")
    e.add_argument("--k", type=int, default=None, help="recommender's items per user (10)")
    e.set_defaults(fn=_cmd_export)

    i = sub.add_parser("infer", help="run an exported ONNX model on a .npy file")
    i.add_argument("model")
    i.add_argument("input")
    i.add_argument("--out", required=True)
    i.add_argument("--labels", default=None, help=".npy of int class ids (conditional models)")
    i.set_defaults(fn=_cmd_infer)

    d = sub.add_parser("denoise", help="denoise a .npy batch with a trained model")
    d.add_argument("model_dir")
    d.add_argument("input")
    d.add_argument("--out", default="denoised.npy")
    d.add_argument("--labels", default=None, help=".npy of int class ids (conditional models)")
    d.set_defaults(fn=_cmd_denoise)

    f = sub.add_parser("search", help="find the gallery samples nearest to each query by "
                       "latent similarity")
    f.add_argument("model_dir")
    f.add_argument("query", help=".npy of raw query samples")
    f.add_argument("--gallery", default=None,
                   help=".npy of raw samples, or a data set name (its training split); default: "
                        "the data set the model was trained on")
    f.add_argument("--data-root", default=None)
    f.add_argument("--k", type=int, default=10)
    f.add_argument("--metric", choices=["cosine", "l2"], default="cosine")
    f.add_argument("--out", default="neighbours.npz")
    f.add_argument("--grid", default=None, help="PNG of the queries beside their neighbours")
    f.set_defaults(fn=_cmd_search)

    r = sub.add_parser("recommend", help="recommend items to users from their interaction rows")
    r.add_argument("model_dir")
    r.add_argument("history", help=".npy of (users, items) interactions (0/1), or one row")
    r.add_argument("--k", type=int, default=10)
    r.add_argument("--out", default="recommendations.npz")
    r.set_defaults(fn=_cmd_recommend)

    b = sub.add_parser("bench", help="benchmark every kernel against eager and torch.compile")
    b.add_argument("--quick", action="store_true")
    b.add_argument("--only", default=None)
    b.add_argument("--out", default="runs/bench")
    b.set_defaults(fn=_cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, TypeError, OSError) as e:  # OSError: missing, unwritable, not a dir
        print(f"aecore {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
