/* The C API's error paths and buffer handling, for tests/test_bundle.py.
 *   capi_check load PATH             load PATH; print "ok" or "error <code>: <message>"
 *   capi_check misuse MODEL          NULL arguments, indices out of range, wrong sizes on a loadable MODEL
 *   capi_check aligned MODEL         run on 64-byte aligned and on misaligned inputs; print whether they agree
 * Every line is "<label>: <result>"; the process must never abort. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "quantvm.h"

static void report(const char* label, int code) {
  if (code >= 0) printf("%s: ok %d\n", label, code);
  else printf("%s: error %d: %s\n", label, quantvm_last_error_code(), quantvm_last_error());
}

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  if (!strcmp(argv[1], "load")) {
    quantvm_model* m = quantvm_load(argv[2], 0);
    if (m) printf("load: ok\n");
    else printf("load: error %d: %s\n", quantvm_last_error_code(), quantvm_last_error());
    quantvm_free(m);
    return 0;
  }
  quantvm_model* m = quantvm_load(argv[2], 1);
  if (!m) {
    printf("load: error %d: %s\n", quantvm_last_error_code(), quantvm_last_error());
    return 1;
  }
  quantvm_tensor_info in, out;
  report("input_info", quantvm_input_info(m, 0, &in));
  report("output_info", quantvm_output_info(m, 0, &out));
  char* raw = aligned_alloc(64, in.num_bytes + 64);
  for (size_t i = 0; i < in.num_bytes + 64; ++i) raw[i] = (char)(i % 7);
  float* a = malloc(out.num_bytes);
  float* b = malloc(out.num_bytes);
  const void* inputs[1] = {raw};
  size_t in_bytes[1] = {in.num_bytes};
  void* outputs[1] = {a};
  size_t out_bytes[1] = {out.num_bytes};
  if (!strcmp(argv[1], "misuse")) {
    report("load_null", quantvm_load(NULL, 0) ? 0 : -1);
    report("free_null", (quantvm_free(NULL), 0));
    report("num_inputs_null", quantvm_num_inputs(NULL));
    report("input_info_null_model", quantvm_input_info(NULL, 0, &in));
    report("input_info_null_info", quantvm_input_info(m, 0, NULL));
    report("input_info_range", quantvm_input_info(m, 5, &in));
    report("output_info_negative", quantvm_output_info(m, -1, &out));
    report("run_null_model", quantvm_run(NULL, inputs, in_bytes, outputs, out_bytes));
    report("run_null_inputs", quantvm_run(m, NULL, in_bytes, outputs, out_bytes));
    report("run_null_outputs", quantvm_run(m, inputs, in_bytes, NULL, out_bytes));
    const void* null_input[1] = {NULL};
    report("run_null_input", quantvm_run(m, null_input, in_bytes, outputs, out_bytes));
    size_t small[1] = {in.num_bytes - 4};
    report("run_input_size", quantvm_run(m, inputs, small, outputs, out_bytes));
    size_t big[1] = {out.num_bytes + 4};
    report("run_output_size", quantvm_run(m, inputs, in_bytes, outputs, big));
    quantvm_dtype wrong[1] = {QUANTVM_INT8}, right[1] = {in.dtype_code};
    report("run_typed_dtype", quantvm_run_typed(m, inputs, wrong, in_bytes, outputs, out_bytes));
    report("run_typed_null_dtypes", quantvm_run_typed(m, inputs, NULL, in_bytes, outputs, out_bytes));
    report("run_typed", quantvm_run_typed(m, inputs, right, in_bytes, outputs, out_bytes));
    report("run_after_errors", quantvm_run(m, inputs, in_bytes, outputs, out_bytes));
  } else {
    report("run_aligned", quantvm_run(m, inputs, in_bytes, outputs, out_bytes));
    memmove(raw + 4, raw, in.num_bytes); /* the same input at an address 4 bytes past a 64-byte boundary */
    inputs[0] = raw + 4;
    outputs[0] = b;
    report("run_misaligned", quantvm_run(m, inputs, in_bytes, outputs, out_bytes));
    printf("same: %s\n", memcmp(a, b, out.num_bytes) ? "no" : "yes");
  }
  free(raw); free(a); free(b);
  quantvm_free(m);
  return 0;
}
