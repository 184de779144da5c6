"""Deployment latency: torch eager vs ONNX Runtime fp32 vs ONNX Runtime int8 (dynamic), for the
784-512-128-32 autoencoder at batch 1 and 256, interleaved in one process.

Two modes: ``alternating`` times one call per turn, right after the other engines ran (their
weights have pushed this one's out of the L2 cache); ``steady`` times 20 back-to-back calls per
turn, as a service running one model sees it. Both are interleaved round-robin.

int8's speed-up depends on the CPU: with VNNI (one instruction per 4-way int8 dot product) it
is several times fp32's, on AVX2 alone about 1.5x; each case records which the CPU has, and
``bench_int8_gemm_ceiling`` measures the most int8 can give here: one bare int8 GEMM of the
model's largest layer against the same GEMM in fp32, with no quantization work around it.
"""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from aecore.autoencoder import AutoEncoder
from aecore.export import Model, quantize, to_onnx
from bench.harness import interleaved, quick, record, rounds_for


def int8_dot_isa() -> str:
    """The x86 int8 dot-product instructions this CPU has (ORT's int8 GEMMs use them when
    present), from /proc/cpuinfo; "none" without them, "unknown" where that file is absent."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    found = [f for f in ("avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return ",".join(found) or "none"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-bench")
    torch.manual_seed(0)
    model = AutoEncoder(784, [512, 128], 32, output_activation="sigmoid").eval()
    fp32 = to_onnx(model, root / "fp32.onnx")
    calib = np.random.default_rng(0).random((64, 784), dtype=np.float32)
    report = quantize(fp32, root / "int8.onnx", mode="dynamic", inputs=calib)
    # One intra-op thread each, so that no engine gets more cores than another.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield model, Model(fp32, threads=1), Model(root / "int8.onnx", threads=1), report
    torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", ["steady", "alternating"])
@pytest.mark.parametrize("batch", [1, 256])
def bench_ort_vs_eager(benchmark, models, batch, mode):
    model, fp32, int8, report = models
    x = np.random.default_rng(1).random((batch, 784), dtype=np.float32)
    xt = torch.from_numpy(x)

    def eager():
        with torch.inference_mode():
            return model(xt)

    fns = {"eager": eager, "ort_fp32": lambda: fp32.run(x), "ort_int8": lambda: int8.run(x)}
    # Steady: back-to-back calls per turn (fewer at batch 256, where one call takes ms).
    inner = 1 if mode == "alternating" else (20 if batch == 1 else 4)
    rounds = (30 if quick() else 200) // inner + 5
    stats = interleaved(fns, rounds=rounds_for(benchmark, rounds), inner=inner)
    info = record(benchmark, kernel="onnx_runtime", case=f"784-512-128-32 batch {batch}",
                  mode=f"inference, {mode}", stats=stats, size=batch * 784)
    fp32_vs_eager = stats["ort_fp32"]["median"] / stats["eager"]["median"]
    int8_throughput_vs_fp32 = stats["ort_fp32"]["median"] / stats["ort_int8"]["median"]
    info.update({"ort_fp32_latency_over_eager": fp32_vs_eager,
                 "int8_throughput_over_fp32": int8_throughput_vs_fp32,
                 "int8_size_over_fp32": report["size_ratio"], "int8_dot_isa": int8_dot_isa()})
    benchmark.extra_info.update(info)
    print(f"batch {batch} {mode}: ORT fp32 / eager latency {fp32_vs_eager:.2f}, int8 "
          f"throughput / fp32 {int8_throughput_vs_fp32:.2f}, "
          f"int8 file / fp32 {report['size_ratio']:.2f} (int8 dot ISA: {info['int8_dot_isa']})")
    benchmark.pedantic(fns["ort_int8"], rounds=rounds_for(benchmark, 20), iterations=1)


def _gemm_session(op: str, x_type: int, w: np.ndarray, out_type: int, extra=()):
    """A one-node ONNX Runtime session, y = op(x, W, *extra), on one intra-op thread."""
    import onnxruntime as ort

    m, k = 256, w.shape[0]
    inits = [numpy_helper.from_array(w, "W"), *extra]
    graph = helper.make_graph(
        [helper.make_node(op, ["x", "W", *(t.name for t in extra)], ["y"])], op,
        [helper.make_tensor_value_info("x", x_type, [m, k])],
        [helper.make_tensor_value_info("y", out_type, [m, w.shape[1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.checker.check_model(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def bench_int8_gemm_ceiling(benchmark):
    """fp32 MatMul vs u8 x s8 MatMulInteger (what dynamic int8 runs) at the model's largest
    layer, 256 x 784 -> 512: the int8 / fp32 throughput ratio the whole model can at most reach
    on this CPU, since its int8 path adds quantization work around the same GEMMs."""
    rng = np.random.default_rng(0)
    k, n = 784, 512
    fp32 = _gemm_session("MatMul", TensorProto.FLOAT,
                         rng.standard_normal((k, n), dtype=np.float32), TensorProto.FLOAT)
    int8 = _gemm_session("MatMulInteger", TensorProto.UINT8,
                         rng.integers(-127, 128, (k, n), dtype=np.int8), TensorProto.INT32,
                         [numpy_helper.from_array(np.array(128, np.uint8), "x_zero")])
    xf = rng.standard_normal((256, k), dtype=np.float32)
    xq = rng.integers(0, 256, (256, k), dtype=np.uint8)
    fns = {"gemm_int8": lambda: int8.run(None, {"x": xq}),
           "gemm_fp32": lambda: fp32.run(None, {"x": xf})}
    stats = interleaved(fns, rounds=rounds_for(benchmark, 30 if quick() else 100), inner=4)
    info = record(benchmark, kernel="int8_gemm", case="256x784->512", mode="inference",
                  stats=stats)
    ratio = stats["gemm_fp32"]["median"] / stats["gemm_int8"]["median"]
    info.update({"int8_gemm_throughput_over_fp32": ratio, "int8_dot_isa": int8_dot_isa()})
    benchmark.extra_info.update(info)
    print(f"GEMM 256x784->512: int8 throughput / fp32 {ratio:.2f} "
          f"(int8 dot ISA: {info['int8_dot_isa']})")
    benchmark.pedantic(fns["gemm_int8"], rounds=rounds_for(benchmark, 20), iterations=1)
