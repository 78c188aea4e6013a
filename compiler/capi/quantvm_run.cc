// quantvm-run: run a quantvm artifact on .npy inputs through the C API (quantvm.h), without Python.
//
//   quantvm-run MODEL.so --input NAME=FILE.npy ... [--output-dir OUT] [--repeat N] [--warmup N] [--threads N]
//
// Writes OUT/<output name>.npy per output. With --repeat N it runs --warmup times (default 1) untimed, then N
// times timed, and prints one JSON line: {"repeat": N, "median_ms": ..., "min_ms": ..., "times_ms": [...]}.

#include "quantvm.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

const char* const kUsage =
    "usage: quantvm-run MODEL.so --input NAME=FILE.npy ... [--output-dir OUT] [--repeat N] [--warmup N] "
    "[--threads N]\n"
    "  --input NAME=FILE.npy  an input (C order, little-endian); FILE.npy alone when the model has one input\n"
    "  --output-dir OUT       write OUT/<output name>.npy for every output (OUT is created if missing)\n"
    "  --repeat N             time N runs after the warm-up; print one JSON line with the latencies\n"
    "  --warmup N             untimed runs before the timed ones (default 1)\n"
    "  --threads N            threads per run (default: $TVM_NUM_THREADS, else the compiled count)\n";

// .npy descr codes of the dtypes quantvm_tensor_info names
const std::map<std::string, std::string> kDescr = {
    {"f4", "float32"}, {"f8", "float64"}, {"f2", "float16"}, {"i1", "int8"},   {"u1", "uint8"},
    {"i2", "int16"},   {"u2", "uint16"},  {"i4", "int32"},   {"u4", "uint32"}, {"i8", "int64"},
    {"u8", "uint64"},  {"b1", "bool"}};

struct Array {
  std::string dtype;
  std::vector<int64_t> shape;
  std::shared_ptr<char> storage;  // 64-byte aligned: the C API then reads it in place
  char* data = nullptr;
  size_t bytes = 0;
};

std::shared_ptr<char> aligned(size_t bytes) {
  void* p = std::aligned_alloc(64, std::max<size_t>(64, (bytes + 63) / 64 * 64));
  if (!p) throw Error("out of memory");
  return std::shared_ptr<char>(static_cast<char*>(p), std::free);
}

std::string header_value(const std::string& header, const std::string& key, const std::string& file) {
  size_t at = header.find("'" + key + "'");
  if (at == std::string::npos) throw Error(file + ": not a valid .npy file (its header has no '" + key + "')");
  at = header.find(':', at);
  size_t end = key == "shape" ? header.find(')', at) + 1 : header.find_first_of(",}", at);
  std::string value = header.substr(at + 1, end - at - 1);
  value.erase(0, value.find_first_not_of(" "));
  value.erase(value.find_last_not_of(" ") + 1);
  return value;
}

Array read_npy(const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw Error("cannot read " + file + ": " + std::strerror(errno));
  in.seekg(0, std::ios::end);
  size_t size = size_t(in.tellg());
  in.seekg(0);
  auto storage = aligned(size);
  if (!in.read(storage.get(), std::streamsize(size))) throw Error("cannot read " + file);
  const char* raw = storage.get();
  if (size < 10 || std::memcmp(raw, "\x93NUMPY", 6) != 0) throw Error(file + " is not a .npy file");
  int major = raw[6];
  size_t header_len, start;
  if (major == 1) {
    header_len = uint8_t(raw[8]) | size_t(uint8_t(raw[9])) << 8;
    start = 10;
  } else if (major == 2 || major == 3) {
    if (size < 12) throw Error(file + " is truncated");
    header_len = 0;
    for (int i = 0; i < 4; ++i) header_len |= size_t(uint8_t(raw[8 + i])) << (8 * i);
    start = 12;
  } else {
    throw Error(file + ": .npy format version " + std::to_string(major) + " is not supported");
  }
  if (start + header_len > size) throw Error(file + " is truncated (its header ends past the end of the file)");
  std::string header(raw + start, header_len);
  Array array;
  std::string descr = header_value(header, "descr", file);
  if (descr.size() < 4 || (descr[0] != '\'' && descr[0] != '"'))
    throw Error(file + ": dtype " + descr + " is not supported (a plain numeric dtype is)");
  descr = descr.substr(1, descr.size() - 2);
  char order = descr[0];
  std::string code = descr.substr(1);
  auto known = kDescr.find(code);
  if (known == kDescr.end()) throw Error(file + ": dtype '" + descr + "' is not supported");
  if (order == '>' && code.back() != '1')
    throw Error(file + " is big-endian ('" + descr + "'); save it little-endian (numpy: a.astype(a.dtype.newbyteorder('<')))");
  if (order != '<' && order != '|' && order != '=') throw Error(file + ": byte order of '" + descr + "' is not supported");
  array.dtype = known->second;
  if (header_value(header, "fortran_order", file) != "False")
    throw Error(file + " is in Fortran order; save it in C order (numpy: np.ascontiguousarray)");
  std::string shape = header_value(header, "shape", file);
  size_t count = 1;
  for (size_t i = 0; i < shape.size();) {
    if (std::isdigit(static_cast<unsigned char>(shape[i]))) {
      size_t used = 0;
      int64_t dim = std::stoll(shape.substr(i), &used);
      array.shape.push_back(dim);
      count *= size_t(dim);
      i += used;
    } else {
      ++i;
    }
  }
  size_t itemsize = std::stoul(code.substr(1));
  array.bytes = count * itemsize;
  size_t offset = start + header_len;
  if (offset + array.bytes > size)
    throw Error(file + " is truncated: its header announces " + std::to_string(array.bytes) + " bytes of data, it holds " +
                std::to_string(size - offset));
  if (offset % 64 == 0) {
    array.storage = storage;
    array.data = storage.get() + offset;
  } else {  // (numpy pads headers to 64 bytes; other writers may not)
    array.storage = aligned(array.bytes);
    array.data = array.storage.get();
    std::memcpy(array.data, raw + offset, array.bytes);
  }
  return array;
}

std::string shape_text(const int64_t* shape, size_t ndim) {
  std::string out = "[";
  for (size_t i = 0; i < ndim; ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + "]";
}

const std::map<std::string, std::string> kNpyDescr = {
    {"float32", "<f4"}, {"float64", "<f8"}, {"float16", "<f2"}, {"int8", "|i1"},   {"uint8", "|u1"},
    {"int16", "<i2"},   {"uint16", "<u2"},  {"int32", "<i4"},   {"uint32", "<u4"}, {"int64", "<i8"},
    {"uint64", "<u8"},  {"bool", "|b1"}};

void write_npy(const std::string& file, const quantvm_tensor_info& info, const void* data) {
  std::string shape = "(";
  for (int i = 0; i < info.ndim; ++i) shape += std::to_string(info.shape[i]) + (info.ndim == 1 || i + 1 < info.ndim ? "," : "");
  for (size_t i = 0; i + 1 < shape.size(); ++i)
    if (shape[i] == ',' && shape[i + 1] != ')') shape.insert(i + 1, " "), ++i;
  shape += ")";
  std::string header = "{'descr': '" + kNpyDescr.at(info.dtype) + "', 'fortran_order': False, 'shape': " + shape + ", }";
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::string tmp = file + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw Error("cannot write " + tmp + ": " + std::strerror(errno));
    out.write("\x93NUMPY\x01\x00", 8);
    char len[2] = {char(header.size() & 0xff), char(header.size() >> 8)};
    out.write(len, 2);
    out.write(header.data(), std::streamsize(header.size()));
    out.write(static_cast<const char*>(data), std::streamsize(info.num_bytes));
    out.close();
    if (!out) {
      std::remove(tmp.c_str());
      throw Error("cannot write " + file + ": " + std::strerror(errno));
    }
  }
  if (std::rename(tmp.c_str(), file.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw Error("cannot write " + file + ": " + std::strerror(errno));
  }
}

// An output name as a file name: letters, digits, '.', '_' and '-' kept, anything else '_'; unique.
std::string safe_name(const std::string& name, std::set<std::string>* used) {
  std::string out;
  for (char c : name) out += (std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-') ? c : '_';
  if (out.empty() || out[0] == '.') out = "_" + out;
  std::string unique = out;
  for (int n = 2; used->count(unique); ++n) unique = out + "_" + std::to_string(n);
  used->insert(unique);
  return unique;
}

void make_dirs(const std::string& dir) {
  for (size_t at = 1; at <= dir.size(); ++at) {
    if (at == dir.size() || dir[at] == '/') {
      std::string part = dir.substr(0, at);
      if (mkdir(part.c_str(), 0777) != 0 && errno != EEXIST) throw Error("cannot create " + part + ": " + std::strerror(errno));
    }
  }
  struct stat st;
  if (stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) throw Error("--output-dir " + dir + " is not a folder");
}

int whole(const std::string& flag, const char* text, int minimum) {
  char* end = nullptr;
  long value = std::strtol(text, &end, 10);
  if (end == text || *end || value < minimum || value > 1000000000)
    throw Error(flag + " needs a whole number >= " + std::to_string(minimum) + ", got '" + text + "'");
  return int(value);
}

struct ModelHandle {
  quantvm_model* model;
  ~ModelHandle() { quantvm_free(model); }
};

void check(int code, const char* what) {
  if (code < 0) throw Error(std::string(what) + ": " + quantvm_last_error());
}

int run(int argc, char** argv) {
  std::string model_path, output_dir;
  std::vector<std::string> input_args;
  int repeat = 0, warmup = 1, threads = 0;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> const char* {
      if (i + 1 >= argc) throw Error(arg + " needs a value\n" + kUsage);
      return argv[++i];
    };
    if (arg == "-h" || arg == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    } else if (arg == "--input" || arg == "-i") {
      input_args.push_back(value());
    } else if (arg == "--output-dir" || arg == "-o") {
      output_dir = value();
    } else if (arg == "--repeat") {
      repeat = whole(arg, value(), 1);
    } else if (arg == "--warmup") {
      warmup = whole(arg, value(), 0);
    } else if (arg == "--threads") {
      threads = whole(arg, value(), 1);
    } else if (arg.rfind("-", 0) == 0) {
      throw Error("unknown option " + arg + "\n" + kUsage);
    } else if (model_path.empty()) {
      model_path = arg;
    } else {
      throw Error("unexpected argument " + arg + "\n" + kUsage);
    }
  }
  if (model_path.empty()) throw Error(std::string("no model given\n") + kUsage);

  ModelHandle handle{quantvm_load(model_path.c_str(), threads)};
  if (!handle.model) throw Error(quantvm_last_error());
  quantvm_model* model = handle.model;
  int n_in = quantvm_num_inputs(model), n_out = quantvm_num_outputs(model);
  check(n_in, "quantvm_num_inputs");
  check(n_out, "quantvm_num_outputs");
  std::vector<quantvm_tensor_info> in_info(n_in), out_info(n_out);
  std::map<std::string, int> index;
  std::string names;
  for (int i = 0; i < n_in; ++i) {
    check(quantvm_input_info(model, i, &in_info[i]), "quantvm_input_info");
    index[in_info[i].name] = i;
    names += (i ? ", " : "") + std::string(in_info[i].name);
  }
  for (int i = 0; i < n_out; ++i) check(quantvm_output_info(model, i, &out_info[i]), "quantvm_output_info");

  std::vector<Array> arrays(n_in);
  std::vector<bool> given(n_in, false);
  for (const std::string& pair : input_args) {
    size_t eq = pair.rfind('=');
    std::string name = eq == std::string::npos ? "" : pair.substr(0, eq);
    std::string file = eq == std::string::npos ? pair : pair.substr(eq + 1);
    if (eq == std::string::npos) {
      if (n_in != 1)
        throw Error("--input " + pair + ": the model has " + std::to_string(n_in) + " inputs; name it as NAME=FILE.npy (inputs: " + names + ")");
      name = in_info[0].name;
    }
    auto found = index.find(name);
    if (found == index.end()) throw Error("--input " + pair + ": unknown input '" + name + "'; the model's inputs are " + names);
    const quantvm_tensor_info& info = in_info[found->second];
    Array array = read_npy(file);
    if (array.dtype != info.dtype)
      throw Error(file + ": dtype " + array.dtype + " given for input '" + name + "', " + info.dtype + " expected");
    if (array.shape != std::vector<int64_t>(info.shape, info.shape + info.ndim))
      throw Error(file + ": shape " + shape_text(array.shape.data(), array.shape.size()) + " given for input '" + name +
                  "', " + shape_text(info.shape, info.ndim) + " expected");
    arrays[found->second] = array;
    given[found->second] = true;
  }
  std::string missing;
  for (int i = 0; i < n_in; ++i)
    if (!given[i]) missing += (missing.empty() ? "" : ", ") + std::string(in_info[i].name);
  if (!missing.empty()) throw Error("missing --input for " + missing + " (inputs: " + names + ")");

  std::vector<const void*> in_ptrs(n_in);
  std::vector<size_t> in_bytes(n_in), out_bytes(n_out);
  std::vector<std::shared_ptr<char>> out_storage(n_out);
  std::vector<void*> out_ptrs(n_out);
  for (int i = 0; i < n_in; ++i) in_ptrs[i] = arrays[i].data, in_bytes[i] = arrays[i].bytes;
  for (int i = 0; i < n_out; ++i) {
    out_storage[i] = aligned(out_info[i].num_bytes);
    out_ptrs[i] = out_storage[i].get();
    out_bytes[i] = out_info[i].num_bytes;
  }
  auto once = [&] { check(quantvm_run(model, in_ptrs.data(), in_bytes.data(), out_ptrs.data(), out_bytes.data()), "quantvm_run"); };

  if (repeat > 0) {
    for (int i = 0; i < warmup; ++i) once();
    std::vector<double> ms;
    for (int i = 0; i < repeat; ++i) {
      auto start = std::chrono::steady_clock::now();
      once();
      ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
    }
    std::vector<double> sorted = ms;
    std::sort(sorted.begin(), sorted.end());
    double median = sorted.size() % 2 ? sorted[sorted.size() / 2]
                                      : (sorted[sorted.size() / 2 - 1] + sorted[sorted.size() / 2]) / 2;
    double mean = 0;
    for (double t : ms) mean += t / ms.size();
    std::ostringstream line;
    line.precision(6);
    line << "{\"repeat\": " << repeat << ", \"warmup\": " << warmup << ", \"threads\": " << quantvm_num_threads(model)
         << ", \"median_ms\": " << median << ", \"min_ms\": " << sorted.front() << ", \"mean_ms\": " << mean
         << ", \"times_ms\": [";
    for (size_t i = 0; i < ms.size(); ++i) line << (i ? ", " : "") << ms[i];
    line << "]}";
    std::puts(line.str().c_str());
  } else {
    once();
  }
  if (!output_dir.empty()) {
    make_dirs(output_dir);
    std::set<std::string> used;
    for (int i = 0; i < n_out; ++i) {
      std::string file = output_dir + "/" + safe_name(out_info[i].name, &used) + ".npy";
      write_npy(file, out_info[i], out_ptrs[i]);
      if (repeat == 0)
        std::printf("%s: %s %s -> %s\n", out_info[i].name, out_info[i].dtype, shape_text(out_info[i].shape, out_info[i].ndim).c_str(),
                    file.c_str());
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& err) {
    std::fprintf(stderr, "quantvm-run: error: %s\n", err.what());
    return 1;
  }
}
