/* quantvm C API: run a quantvm artifact (the .so written by `quantvm compile`) from C or C++, without Python.
 *
 * Link with -lquantvm (libquantvm.so needs libtvm_runtime.so and libtvm_ffi.so beside it, or on the library
 * path). `quantvm bundle MODEL.so -o DIR` writes all of them, this header and a runner into one folder.
 *
 * Only load artifacts you trust: loading one runs its code, like dlopen of any shared library. Before any of
 * its code is loaded, quantvm_load checks that the file is a complete x86-64 ELF shared library, that its
 * SHA-256 matches the digest its metadata records, and that this CPU has every feature it was compiled for.
 *
 * Errors: functions returning int return QUANTVM_OK (0) or a negative QUANTVM_ERR_* code; quantvm_load returns
 * NULL. Either way quantvm_last_error() then describes the cause (per thread). No function aborts the process.
 *
 * Threads: one model may be shared by threads; its runs take turns (a lock). For parallel runs, load the
 * model once per thread. Each run uses the model's thread count (see quantvm_load).
 */
#ifndef QUANTVM_H_
#define QUANTVM_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define QUANTVM_API __attribute__((visibility("default")))

enum {
  QUANTVM_OK = 0,
  QUANTVM_ERR_ARGUMENT = -1, /* a NULL pointer, an index out of range, a buffer of the wrong size */
  QUANTVM_ERR_ARTIFACT = -2, /* missing, unreadable, truncated, damaged or not a quantvm artifact */
  QUANTVM_ERR_HOST = -3,     /* this CPU lacks features the artifact was compiled for */
  QUANTVM_ERR_RUNTIME = -4   /* the TVM runtime failed (loading the module, running the model) */
};

typedef enum {
  QUANTVM_DTYPE_OTHER = 0, /* see quantvm_tensor_info.dtype for its name */
  QUANTVM_FLOAT32 = 1,
  QUANTVM_FLOAT64 = 2,
  QUANTVM_FLOAT16 = 3,
  QUANTVM_INT8 = 4,
  QUANTVM_UINT8 = 5,
  QUANTVM_INT16 = 6,
  QUANTVM_UINT16 = 7,
  QUANTVM_INT32 = 8,
  QUANTVM_UINT32 = 9,
  QUANTVM_INT64 = 10,
  QUANTVM_UINT64 = 11,
  QUANTVM_BOOL = 12 /* one byte per element */
} quantvm_dtype;

typedef struct quantvm_model quantvm_model;

/* One input or output, as the artifact's metadata lists it. Pointers stay valid until quantvm_free. */
typedef struct {
  const char* name;
  const char* dtype;         /* "float32", "int8", "uint8", "int64", ... */
  quantvm_dtype dtype_code;
  size_t itemsize;           /* bytes per element */
  int ndim;
  const int64_t* shape;      /* ndim dimensions, C order (row-major) */
  size_t num_bytes;          /* the size of its buffer: product of shape x itemsize */
} quantvm_tensor_info;

/* Load the artifact at `path`. `num_threads` > 0: run on that many threads (at most this host's cores);
 * 0 or negative: $TVM_NUM_THREADS if set, else the count it was compiled for, else all cores.
 * Returns NULL on failure (see quantvm_last_error). */
QUANTVM_API quantvm_model* quantvm_load(const char* path, int num_threads);

/* Free the model (NULL is ignored). */
QUANTVM_API void quantvm_free(quantvm_model* model);

/* The number of inputs / outputs, or a negative QUANTVM_ERR_* code. */
QUANTVM_API int quantvm_num_inputs(const quantvm_model* model);
QUANTVM_API int quantvm_num_outputs(const quantvm_model* model);

/* Describe input / output `index` (model order) into *info. */
QUANTVM_API int quantvm_input_info(const quantvm_model* model, int index, quantvm_tensor_info* info);
QUANTVM_API int quantvm_output_info(const quantvm_model* model, int index, quantvm_tensor_info* info);

/* The thread count runs use. */
QUANTVM_API int quantvm_num_threads(const quantvm_model* model);

/* The artifact's metadata, as JSON text (valid until quantvm_free). */
QUANTVM_API const char* quantvm_metadata_json(const quantvm_model* model);

/* Run the model. inputs[i] points at input i's data (C order, its dtype, input_bytes[i] bytes, which must be
 * its num_bytes); outputs[i] at a caller-owned buffer of output_bytes[i] bytes (its num_bytes) that receives
 * output i. Inputs aligned to 64 bytes are read in place; others are copied first. The caller keeps ownership
 * of every buffer. */
QUANTVM_API int quantvm_run(quantvm_model* model, const void* const* inputs, const size_t* input_bytes,
                            void* const* outputs, const size_t* output_bytes);

/* quantvm_run, with the dtype of each input checked too (input_dtypes[i] must be input i's dtype_code). */
QUANTVM_API int quantvm_run_typed(quantvm_model* model, const void* const* inputs, const quantvm_dtype* input_dtypes,
                                  const size_t* input_bytes, void* const* outputs, const size_t* output_bytes);

/* The last error of the calling thread ("" if none), valid until its next quantvm call. */
QUANTVM_API const char* quantvm_last_error(void);

/* The code of that error (QUANTVM_OK if none). */
QUANTVM_API int quantvm_last_error_code(void);

/* The name of a dtype code ("float32", ...). */
QUANTVM_API const char* quantvm_dtype_name(quantvm_dtype dtype);

#ifdef __cplusplus
}
#endif

#endif /* QUANTVM_H_ */
