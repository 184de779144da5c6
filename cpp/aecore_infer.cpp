// Run an exported aecore model with ONNX Runtime's C++ API.
//
//   aecore_infer MODEL.onnx INPUT.npy OUT_PREFIX [LABELS.npy]
//
// INPUT.npy holds float32 model inputs (B, ...), already normalised (the model's metadata
// "normalization" says how); for a VQ-VAE's code decoder, integer code indices (B, num_latents)
// in [0, num_codes). A conditional model also takes LABELS.npy, integer class ids (B,) in
// [0, num_classes). Each output is written to OUT_PREFIX.<output name>.npy, and the model's
// metadata is printed.
#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "npy.h"

int main(int argc, char** argv) {
  if (argc < 4 || argc > 5) {
    std::cerr << "usage: " << argv[0] << " MODEL.onnx INPUT.npy OUT_PREFIX [LABELS.npy]\n";
    return 2;
  }
  // A library older than the headers has no API table of their version: every call through
  // the C++ API would then dereference null.
  if (OrtGetApiBase()->GetApi(ORT_API_VERSION) == nullptr) {
    std::cerr << "error: the ONNX Runtime library (" << OrtGetApiBase()->GetVersionString()
              << ") is older than the headers this program was built with (API version "
              << ORT_API_VERSION << ", ONNX Runtime 1." << ORT_API_VERSION
              << "): upgrade it, e.g. pip install 'onnxruntime>=1." << ORT_API_VERSION
              << "', and rebuild\n";
    return 1;
  }
  try {
    Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "aecore");
    Ort::SessionOptions options;
    options.SetIntraOpNumThreads(1);
    Ort::Session session(env, argv[1], options);
    Ort::AllocatorWithDefaultOptions alloc;

    Ort::ModelMetadata meta = session.GetModelMetadata();
    // 0: not in the metadata, ids are not range-checked (class ids of a conditional model,
    // code indices of a code decoder).
    int64_t num_classes = 0, num_codes = 0;
    for (auto& key : meta.GetCustomMetadataMapKeysAllocated(alloc)) {
      auto value = meta.LookupCustomMetadataMapAllocated(key.get(), alloc);
      std::cout << key.get() << " = " << value.get() << "\n";
      std::string k = key.get();
      if (k == "num_classes" || k == "num_codes") {
        char* end = nullptr;
        long long n = std::strtoll(value.get(), &end, 10);
        if (end != value.get() && *end == '\0' && n > 0)
          (k == "num_classes" ? num_classes : num_codes) = n;
      }
    }

    // The first input is float32 samples, or int64 code indices for a code decoder.
    bool int_input = session.GetInputTypeInfo(0).GetTensorTypeAndShapeInfo().GetElementType() ==
                     ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    npy::Array x;
    npy::IntArray xi;
    if (int_input) {
      xi = npy::load_int64(argv[2]);
      x.shape = xi.shape;
    } else {
      x = npy::load_float32(argv[2]);
    }
    size_t n_inputs = session.GetInputCount();
    if (n_inputs != static_cast<size_t>(argc - 3)) {
      std::cerr << "error: the model takes " << n_inputs << " input(s)\n";
      return 2;
    }
    std::vector<std::string> in_names, out_names;
    for (size_t i = 0; i < n_inputs; ++i)
      in_names.push_back(session.GetInputNameAllocated(i, alloc).get());
    for (size_t i = 0; i < session.GetOutputCount(); ++i)
      out_names.push_back(session.GetOutputNameAllocated(i, alloc).get());
    auto expected = session.GetInputTypeInfo(0).GetTensorTypeAndShapeInfo().GetShape();
    if (expected.size() != x.shape.size()) {
      std::cerr << "error: input must have rank " << expected.size() << ", got "
                << x.shape.size() << "\n";
      return 2;
    }
    for (size_t i = 1; i < expected.size(); ++i) {
      if (expected[i] > 0 && expected[i] != x.shape[i]) {
        std::cerr << "error: input dimension " << i << " must be " << expected[i] << ", got "
                  << x.shape[i] << "\n";
        return 2;
      }
    }
    // The same rules as the Python runtime (export/runtime.py): ONNX Runtime would run an empty
    // batch, and a NaN sample scores NaN, which no threshold flags as an anomaly.
    if (x.shape[0] == 0) {
      std::cerr << "error: " << argv[2] << ": input '" << in_names[0] << "' is an empty batch\n";
      return 2;
    }
    for (float v : x.data) {
      if (!std::isfinite(v)) {
        std::cerr << "error: " << argv[2] << ": input '" << in_names[0]
                  << "' contains NaN or Inf\n";
        return 2;
      }
    }
    // An out-of-range code index decodes to NaN in the graph.
    if (int_input && num_codes > 0) {
      auto [lo, hi] = std::minmax_element(xi.data.begin(), xi.data.end());
      if (*lo < 0 || *hi >= num_codes) {
        std::cerr << "error: " << argv[2] << ": input '" << in_names[0]
                  << "' must hold code indices in [0, " << num_codes << "), got values in ["
                  << *lo << ", " << *hi << "]\n";
        return 2;
      }
    }

    Ort::MemoryInfo mem = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
    std::vector<Ort::Value> inputs;
    if (int_input)
      inputs.push_back(Ort::Value::CreateTensor<int64_t>(mem, xi.data.data(), xi.data.size(),
                                                         x.shape.data(), x.shape.size()));
    else
      inputs.push_back(Ort::Value::CreateTensor<float>(mem, x.data.data(), x.data.size(),
                                                       x.shape.data(), x.shape.size()));
    std::vector<int64_t> labels;
    std::vector<int64_t> label_shape;
    if (argc == 5) {
      const char* path = argv[4];
      npy::IntArray y = npy::load_int64(path);
      labels = std::move(y.data);
      if (y.shape.size() > 1) {
        std::cerr << "error: " << path << ": input '" << in_names[1]
                  << "' must be one class id per sample, shape (" << x.shape[0] << ",)\n";
        return 2;
      }
      // A 0-d file is one id, as the Python CLI reads it.
      label_shape = {static_cast<int64_t>(labels.size())};
      if (label_shape[0] != x.shape[0]) {
        std::cerr << "error: " << path << ": input '" << in_names[1] << "' has batch "
                  << label_shape[0] << ", but '" << in_names[0] << "' has " << x.shape[0] << "\n";
        return 2;
      }
      // An out-of-range id one-hot encodes to zeros in the graph: a silent wrong answer.
      if (num_classes > 0) {
        auto [lo, hi] = std::minmax_element(labels.begin(), labels.end());
        if (*lo < 0 || *hi >= num_classes) {
          std::cerr << "error: " << path << ": input '" << in_names[1]
                    << "' must hold class ids in [0, " << num_classes << "), got values in ["
                    << *lo << ", " << *hi << "]\n";
          return 2;
        }
      }
      inputs.push_back(Ort::Value::CreateTensor<int64_t>(mem, labels.data(), labels.size(),
                                                         label_shape.data(), label_shape.size()));
    }

    std::vector<const char*> in_c, out_c;
    for (auto& s : in_names) in_c.push_back(s.c_str());
    for (auto& s : out_names) out_c.push_back(s.c_str());

    auto outputs = session.Run(Ort::RunOptions{nullptr}, in_c.data(), inputs.data(),
                               inputs.size(), out_c.data(), out_c.size());
    // Every output is written before any replaces a file: a scorer's score and is_anomaly
    // come from one run, never one from an earlier run.
    npy::Outputs files;
    std::vector<std::string> paths;
    for (size_t i = 0; i < outputs.size(); ++i) {
      auto info = outputs[i].GetTensorTypeAndShapeInfo();
      auto shape = info.GetShape();
      size_t count = info.GetElementCount();
      paths.push_back(std::string(argv[3]) + "." + out_names[i] + ".npy");
      switch (info.GetElementType()) {
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
          files.add(paths.back(), "<f4", shape, outputs[i].GetTensorData<float>(), count * 4);
          break;
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64:
          files.add(paths.back(), "<i8", shape, outputs[i].GetTensorData<int64_t>(), count * 8);
          break;
        case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL:
          files.add(paths.back(), "|b1", shape, outputs[i].GetTensorData<bool>(), count);
          break;
        default:
          std::cerr << "error: output " << out_names[i] << " has an unsupported type\n";
          return 1;
      }
    }
    files.commit();
    for (const auto& path : paths) std::cout << "wrote " << path << "\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
