/* Run a quantvm artifact from C: fill every input with a fixed pattern, print every output value.
 *
 *   make && ./example MODEL.so
 *
 * Input element i holds ((i * 7) % 13 - 6) / 4 (as the input's dtype: truncated for integers). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "quantvm.h"

static void fill(const quantvm_tensor_info* info, void* data) {
  size_t n = info->num_bytes / info->itemsize;
  for (size_t i = 0; i < n; ++i) {
    double v = ((double)((i * 7) % 13) - 6.0) / 4.0;
    switch (info->dtype_code) {
      case QUANTVM_FLOAT32: ((float*)data)[i] = (float)v; break;
      case QUANTVM_FLOAT64: ((double*)data)[i] = v; break;
      case QUANTVM_INT8: ((int8_t*)data)[i] = (int8_t)v; break;
      case QUANTVM_UINT8: ((uint8_t*)data)[i] = (uint8_t)((i * 7) % 13); break;
      case QUANTVM_INT32: ((int32_t*)data)[i] = (int32_t)v; break;
      case QUANTVM_INT64: ((int64_t*)data)[i] = (int64_t)v; break;
      default: memset(data, 0, info->num_bytes); return;
    }
  }
}

int main(int argc, char** argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s MODEL.so\n", argv[0]);
    return 2;
  }
  quantvm_model* model = quantvm_load(argv[1], 0);
  if (!model) {
    fprintf(stderr, "error: %s\n", quantvm_last_error());
    return 1;
  }
  int n_in = quantvm_num_inputs(model), n_out = quantvm_num_outputs(model);
  const void** inputs = calloc(n_in, sizeof *inputs);
  size_t* input_bytes = calloc(n_in, sizeof *input_bytes);
  void** outputs = calloc(n_out, sizeof *outputs);
  size_t* output_bytes = calloc(n_out, sizeof *output_bytes);
  quantvm_tensor_info* out_info = calloc(n_out, sizeof *out_info);
  for (int i = 0; i < n_in; ++i) {
    quantvm_tensor_info info;
    quantvm_input_info(model, i, &info);
    void* data = aligned_alloc(64, (info.num_bytes + 63) / 64 * 64); /* aligned: read in place, not copied */
    fill(&info, data);
    inputs[i] = data;
    input_bytes[i] = info.num_bytes;
  }
  for (int i = 0; i < n_out; ++i) {
    quantvm_output_info(model, i, &out_info[i]);
    outputs[i] = malloc(out_info[i].num_bytes);
    output_bytes[i] = out_info[i].num_bytes;
  }
  int status = 0;
  if (quantvm_run(model, inputs, input_bytes, outputs, output_bytes) != QUANTVM_OK) {
    fprintf(stderr, "error: %s\n", quantvm_last_error());
    status = 1;
  }
  for (int i = 0; status == 0 && i < n_out; ++i) {
    printf("%s %s", out_info[i].name, out_info[i].dtype);
    for (int d = 0; d < out_info[i].ndim; ++d) printf(" %lld", (long long)out_info[i].shape[d]);
    printf("\n");
    size_t n = out_info[i].num_bytes / out_info[i].itemsize;
    for (size_t k = 0; k < n; ++k) {
      if (out_info[i].dtype_code == QUANTVM_FLOAT32) printf("%.9g\n", ((float*)outputs[i])[k]);
      else if (out_info[i].dtype_code == QUANTVM_INT64) printf("%lld\n", (long long)((int64_t*)outputs[i])[k]);
    }
  }
  for (int i = 0; i < n_in; ++i) free((void*)inputs[i]);
  for (int i = 0; i < n_out; ++i) free(outputs[i]);
  free(inputs); free(input_bytes); free(outputs); free(output_bytes); free(out_info);
  quantvm_free(model);
  return status;
}
