"""End-to-end training steps of every family: one Adam step (loss forward, backward, update) of
aecore's model as is, against the same model under torch.compile (compile time reported apart).

On CPU aecore's kernels run their torch reference paths, so "aecore" here is eager PyTorch with
aecore's op boundaries; on CUDA it runs the Triton kernels.
"""

import time

import pytest
import torch

from aecore import data as datasets
from aecore import families
from bench.harness import device, quick, run_case

BATCH = 256


@pytest.fixture(scope="module")
def digits():
    return datasets.load_digits()


@pytest.mark.parametrize("name", sorted(families.BUILDERS))
def bench_train_step(benchmark, digits, name):
    dev = device()
    sizes = families.Sizes(hidden=[256, 64], latent=16, channels=[16, 32])
    torch.manual_seed(0)
    flat = name not in families.IMAGE_INPUT
    x = torch.from_numpy(digits.inputs("train", flat=flat)[:BATCH]).to(dev)
    y = families.train_targets(name, digits, x.cpu().numpy(), sizes.latent)
    y = None if y is None else torch.from_numpy(y).to(dev)

    def stepper(loss_fn, model):
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)

        def step():
            out = loss_fn(x, y)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
        return step

    eager_model = families.build(name, digits, sizes).to(dev).train()
    compiled_model = families.build(name, digits, sizes).to(dev).train()
    compiled_model.load_state_dict(eager_model.state_dict())
    fns = {"aecore": stepper(eager_model.loss, eager_model)}
    compile_s = None
    if not benchmark.disabled:
        from torch._dynamo.utils import counters

        compiled = stepper(torch.compile(compiled_model.loss), compiled_model)
        # Steps until one compiles nothing new (a model whose step recompiles, say for a value
        # it specialised on, shows here as more steps and graphs).
        graphs, steps = counters["stats"]["unique_graphs"], 0
        t0 = time.perf_counter()
        while True:
            before = counters["stats"]["unique_graphs"]
            compiled()
            steps += 1
            if counters["stats"]["unique_graphs"] == before or steps == 5:
                break
        if dev == "cuda":
            torch.cuda.synchronize()  # the steps' kernels, not only their launch
        compile_s = time.perf_counter() - t0
        benchmark.extra_info["compiled_graphs"] = counters["stats"]["unique_graphs"] - graphs
        benchmark.extra_info["compile_steps"] = steps
        fns["compile"] = compiled
    # No size: the families are not a sweep of one workload, so no time-vs-size plot.
    run_case(benchmark, fns, rounds=10 if quick() else 30, kernel="train_step",
             case=f"{name} B{BATCH}", mode="full", compile_s=compile_s)
