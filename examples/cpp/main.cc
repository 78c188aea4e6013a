// Run a quantvm artifact from C++: a small RAII wrapper over quantvm.h, inputs filled with a fixed pattern
// (element i: ((i * 7) % 13 - 6) / 4, float32 inputs only), every output value printed.
//
//   make && ./example MODEL.so
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "quantvm.h"

class Model {
 public:
  explicit Model(const std::string& path, int threads = 0) : model_(quantvm_load(path.c_str(), threads)) {
    if (!model_) throw std::runtime_error(quantvm_last_error());
  }
  ~Model() { quantvm_free(model_); }
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  std::vector<quantvm_tensor_info> inputs() const { return infos(quantvm_num_inputs(model_), quantvm_input_info); }
  std::vector<quantvm_tensor_info> outputs() const { return infos(quantvm_num_outputs(model_), quantvm_output_info); }

  // Runs on float32 inputs; returns the outputs as bytes.
  std::vector<std::vector<float>> run(const std::vector<std::vector<float>>& in) {
    std::vector<const void*> in_ptrs;
    std::vector<size_t> in_bytes;
    for (const auto& v : in) in_ptrs.push_back(v.data()), in_bytes.push_back(v.size() * sizeof(float));
    std::vector<std::vector<float>> out;
    for (const auto& info : outputs()) out.emplace_back(info.num_bytes / sizeof(float));
    std::vector<void*> out_ptrs;
    std::vector<size_t> out_bytes;
    for (auto& v : out) out_ptrs.push_back(v.data()), out_bytes.push_back(v.size() * sizeof(float));
    if (quantvm_run(model_, in_ptrs.data(), in_bytes.data(), out_ptrs.data(), out_bytes.data()) != QUANTVM_OK)
      throw std::runtime_error(quantvm_last_error());
    return out;
  }

 private:
  std::vector<quantvm_tensor_info> infos(int n, int (*get)(const quantvm_model*, int, quantvm_tensor_info*)) const {
    if (n < 0) throw std::runtime_error(quantvm_last_error());
    std::vector<quantvm_tensor_info> out(n);
    for (int i = 0; i < n; ++i)
      if (get(model_, i, &out[i]) != QUANTVM_OK) throw std::runtime_error(quantvm_last_error());
    return out;
  }
  quantvm_model* model_;
};

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s MODEL.so\n", argv[0]);
    return 2;
  }
  try {
    Model model(argv[1]);
    std::vector<std::vector<float>> inputs;
    for (const auto& info : model.inputs()) {
      if (info.dtype_code != QUANTVM_FLOAT32) throw std::runtime_error(std::string("input ") + info.name + " is not float32");
      std::vector<float> v(info.num_bytes / sizeof(float));
      for (size_t i = 0; i < v.size(); ++i) v[i] = (float((i * 7) % 13) - 6.0f) / 4.0f;
      inputs.push_back(std::move(v));
    }
    auto outputs = model.run(inputs);  // (vectors are 16-byte aligned: the C API copies them to 64-byte alignment)
    auto infos = model.outputs();
    for (size_t i = 0; i < outputs.size(); ++i) {
      std::printf("%s %s", infos[i].name, infos[i].dtype);
      for (int d = 0; d < infos[i].ndim; ++d) std::printf(" %lld", static_cast<long long>(infos[i].shape[d]));
      std::printf("\n");
      for (float x : outputs[i]) std::printf("%.9g\n", x);
    }
  } catch (const std::exception& err) {
    std::fprintf(stderr, "error: %s\n", err.what());
    return 1;
  }
  return 0;
}
