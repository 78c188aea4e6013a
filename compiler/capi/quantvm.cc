// libquantvm: the C API of quantvm.h over TVM's runtime (tvm-ffi modules and the Relax VM).
//
// Loading follows compiler/runtime.py's load(): the artifact's bytes are checked first (a complete x86-64 ELF
// shared library, its .quantvm_meta JSON, the SHA-256 it records as compiler/artifact.py computes it, the CPU
// features it needs against /proc/cpuinfo as targets/host.py reads them), and only then is it dlopen'ed
// (tvm::ffi::Module::LoadFromFile) and a Relax VM made on the CPU with the pooled allocator.

#include "quantvm.h"

#include <elf.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/string.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <mutex>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

constexpr const char* kSection = ".quantvm_meta";
constexpr const char* kFormat = "quantvm-artifact";
constexpr int64_t kFormatVersion = 2;
constexpr const char* kDigestSlot = "\"artifact_sha256\": \"";  // json.dumps spells it so; 64 hex chars follow
constexpr size_t kAlignment = 64;                                // TVM's kAllocAlignment
constexpr int kShareAllCores = -3;                               // ThreadGroup::kSpecifyThreadShareAllCore
constexpr int kPooledAllocator = 2;                              // relax.VirtualMachine.POOLED_ALLOCATOR

thread_local std::string last_error;
thread_local int last_code = QUANTVM_OK;

struct Failure : std::runtime_error {
  int code;
  Failure(int code, const std::string& what) : std::runtime_error(what), code(code) {}
};

[[noreturn]] void fail(int code, const std::string& what) { throw Failure(code, what); }

void set_error(int code, const std::string& what) {
  last_code = code;
  last_error = what;
}

void clear_error() {
  last_code = QUANTVM_OK;
  last_error.clear();
}

// Runs `body`, turning every exception into the thread's last error and `on_error`.
template <typename T, typename F>
T guarded(T on_error, F&& body) {
  clear_error();
  try {
    return body();
  } catch (const Failure& err) {
    set_error(err.code, err.what());
  } catch (const ffi::Error& err) {
    set_error(QUANTVM_ERR_RUNTIME, std::string("TVM runtime: ") + err.kind() + ": " + err.message());
  } catch (const std::bad_alloc&) {
    set_error(QUANTVM_ERR_RUNTIME, "out of memory");
  } catch (const std::exception& err) {
    set_error(QUANTVM_ERR_RUNTIME, err.what());
  } catch (...) {
    set_error(QUANTVM_ERR_RUNTIME, "unknown C++ exception");
  }
  if constexpr (std::is_same_v<T, int>) return last_code;  // the cause's code, not one fixed per function
  return on_error;
}

// ---------------------------------------------------------------------------------------------- SHA-256

struct Sha256 {
  uint32_t h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  uint8_t block[64];
  size_t fill = 0;
  uint64_t bits = 0;

  static uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

  void compress(const uint8_t* p) {
    static const uint32_t k[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
    uint32_t w[64];
    for (int i = 0; i < 16; ++i)
      w[i] = uint32_t(p[4 * i]) << 24 | uint32_t(p[4 * i + 1]) << 16 | uint32_t(p[4 * i + 2]) << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; ++i) {
      uint32_t s0 = rotr(w[i - 15], 7) ^ rotr(w[i - 15], 18) ^ (w[i - 15] >> 3);
      uint32_t s1 = rotr(w[i - 2], 17) ^ rotr(w[i - 2], 19) ^ (w[i - 2] >> 10);
      w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
    for (int i = 0; i < 64; ++i) {
      uint32_t t1 = hh + (rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25)) + ((e & f) ^ (~e & g)) + k[i] + w[i];
      uint32_t t2 = (rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
      hh = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
  }

  void update(const uint8_t* p, size_t n) {
    bits += uint64_t(n) * 8;
    if (fill) {
      size_t take = std::min(n, 64 - fill);
      std::memcpy(block + fill, p, take);
      fill += take; p += take; n -= take;
      if (fill < 64) return;
      compress(block);
      fill = 0;
    }
    for (; n >= 64; p += 64, n -= 64) compress(p);
    std::memcpy(block, p, n);
    fill = n;
  }

  std::string hexdigest() {
    uint64_t total = bits;
    uint8_t pad[72] = {0x80};
    size_t padlen = (fill < 56 ? 56 : 120) - fill;
    update(pad, padlen);
    uint8_t len[8];
    for (int i = 0; i < 8; ++i) len[i] = uint8_t(total >> (56 - 8 * i));
    update(len, 8);
    static const char* hex = "0123456789abcdef";
    std::string out;
    for (uint32_t v : h)
      for (int s = 28; s >= 0; s -= 4) out += hex[(v >> s) & 15];
    return out;
  }
};

// ---------------------------------------------------------------------------------------------- the file

struct Mapped {
  const uint8_t* data = nullptr;
  size_t size = 0;
  ~Mapped() {
    if (data) munmap(const_cast<uint8_t*>(data), size);
  }
};

// The metadata section of the artifact mapped in `file`, after checking that the ELF headers, program
// headers (PT_LOAD segments) and section headers all lie within the file.
std::string metadata_section(const Mapped& file, const std::string& path, size_t* section_offset) {
  const auto not_artifact = [&](const std::string& why) {
    fail(QUANTVM_ERR_ARTIFACT, path + " is not a quantvm artifact: " + why);
  };
  const auto truncated = [&](const std::string& what) {
    fail(QUANTVM_ERR_ARTIFACT, path + " is truncated or damaged: its " + what + " ends past the end of the file (" +
                                   std::to_string(file.size) + " bytes)");
  };
  if (file.size < EI_NIDENT || std::memcmp(file.data, ELFMAG, SELFMAG) != 0)
    not_artifact("not an ELF file");
  if (file.data[EI_CLASS] != ELFCLASS64 || file.data[EI_DATA] != ELFDATA2LSB)
    not_artifact("not a 64-bit little-endian ELF file");
  if (file.size < sizeof(Elf64_Ehdr)) truncated("ELF header");
  Elf64_Ehdr eh;
  std::memcpy(&eh, file.data, sizeof eh);
  if (eh.e_type != ET_DYN) not_artifact("not an ELF shared library");
  if (eh.e_machine != EM_X86_64)
    not_artifact("built for another architecture (ELF machine " + std::to_string(eh.e_machine) + ", not x86-64)");
  const auto within = [&](uint64_t offset, uint64_t count, uint64_t entry) {
    if (entry != 0 && count > (UINT64_MAX - offset) / entry) return false;
    return offset + count * entry <= file.size;
  };
  if (eh.e_phentsize != sizeof(Elf64_Phdr) || !within(eh.e_phoff, eh.e_phnum, sizeof(Elf64_Phdr)))
    truncated("program header table");
  for (int i = 0; i < eh.e_phnum; ++i) {
    Elf64_Phdr ph;
    std::memcpy(&ph, file.data + eh.e_phoff + i * sizeof ph, sizeof ph);
    if ((ph.p_type == PT_LOAD || ph.p_type == PT_DYNAMIC) && !within(ph.p_offset, 1, ph.p_filesz))
      truncated("loadable segment " + std::to_string(i));
  }
  if (eh.e_shoff == 0 || eh.e_shnum == 0) not_artifact("it has no section headers, so no " + std::string(kSection));
  if (eh.e_shentsize != sizeof(Elf64_Shdr) || !within(eh.e_shoff, eh.e_shnum, sizeof(Elf64_Shdr)))
    truncated("section header table");
  std::vector<Elf64_Shdr> sections(eh.e_shnum);
  std::memcpy(sections.data(), file.data + eh.e_shoff, eh.e_shnum * sizeof(Elf64_Shdr));
  for (size_t i = 0; i < sections.size(); ++i)
    if (sections[i].sh_type != SHT_NOBITS && !within(sections[i].sh_offset, 1, sections[i].sh_size))
      truncated("section " + std::to_string(i));
  if (eh.e_shstrndx >= sections.size()) not_artifact("damaged section name table");
  const Elf64_Shdr& names = sections[eh.e_shstrndx];
  for (const Elf64_Shdr& s : sections) {
    if (s.sh_name >= names.sh_size) continue;
    const char* name = reinterpret_cast<const char*>(file.data + names.sh_offset + s.sh_name);
    size_t room = names.sh_size - s.sh_name;
    if (strnlen(name, room) == room || std::strcmp(name, kSection) != 0) continue;
    if (s.sh_type == SHT_NOBITS) not_artifact(std::string("its ") + kSection + " section holds no bytes");
    *section_offset = s.sh_offset;
    return std::string(reinterpret_cast<const char*>(file.data + s.sh_offset), s.sh_size);
  }
  not_artifact(std::string("it has no ") + kSection + " section (not exported by quantvm, or damaged)");
  __builtin_unreachable();
}

// SHA-256 of the file with the 64 digest characters at `slot` read as "0"s (compiler/artifact.py's scheme).
std::string artifact_digest(const Mapped& file, size_t slot) {
  Sha256 sha;
  sha.update(file.data, slot);
  const std::string placeholder(64, '0');
  sha.update(reinterpret_cast<const uint8_t*>(placeholder.data()), 64);
  sha.update(file.data + slot + 64, file.size - slot - 64);
  return sha.hexdigest();
}

// ---------------------------------------------------------------------------------------------- metadata

ffi::Any field(const ffi::Map<ffi::Any, ffi::Any>& object, const char* key, const std::string& path) {
  auto value = object.Get(ffi::String(key));
  if (!value.has_value()) fail(QUANTVM_ERR_ARTIFACT, path + ": its quantvm metadata has no \"" + key + "\" entry");
  return *value;
}

template <typename T>
T as(const ffi::Any& value, const std::string& what, const std::string& path) {
  auto out = value.as<T>();
  if (!out.has_value()) fail(QUANTVM_ERR_ARTIFACT, path + ": its quantvm metadata is corrupted (" + what + ")");
  return *out;
}

using JsonObject = ffi::Map<ffi::Any, ffi::Any>;
using JsonArray = ffi::Array<ffi::Any>;

struct DtypeName {
  const char* name;
  quantvm_dtype code;
  size_t itemsize;
  DLDataType dl;
};

const DtypeName kDtypes[] = {
    {"float32", QUANTVM_FLOAT32, 4, {kDLFloat, 32, 1}}, {"float64", QUANTVM_FLOAT64, 8, {kDLFloat, 64, 1}},
    {"float16", QUANTVM_FLOAT16, 2, {kDLFloat, 16, 1}}, {"int8", QUANTVM_INT8, 1, {kDLInt, 8, 1}},
    {"uint8", QUANTVM_UINT8, 1, {kDLUInt, 8, 1}},       {"int16", QUANTVM_INT16, 2, {kDLInt, 16, 1}},
    {"uint16", QUANTVM_UINT16, 2, {kDLUInt, 16, 1}},    {"int32", QUANTVM_INT32, 4, {kDLInt, 32, 1}},
    {"uint32", QUANTVM_UINT32, 4, {kDLUInt, 32, 1}},    {"int64", QUANTVM_INT64, 8, {kDLInt, 64, 1}},
    {"uint64", QUANTVM_UINT64, 8, {kDLUInt, 64, 1}},    {"bool", QUANTVM_BOOL, 1, {kDLBool, 8, 1}},
};

struct TensorSpec {
  std::string name, dtype;
  const DtypeName* type;
  std::vector<int64_t> shape;
  size_t num_bytes;
  int64_t index_extent = 0;  // > 0: a Gather reads this input as indices, which must lie in [-extent, extent)
  std::string index_node;    // that Gather
};

std::vector<TensorSpec> tensor_specs(const JsonObject& meta, const char* kind, const std::string& path) {
  std::vector<TensorSpec> specs;
  for (const ffi::Any& item : as<JsonArray>(field(meta, kind, path), kind, path)) {
    JsonObject spec = as<JsonObject>(item, kind, path);
    TensorSpec out;
    out.name = std::string(as<ffi::String>(field(spec, "name", path), "a tensor name", path));
    out.dtype = std::string(as<ffi::String>(field(spec, "dtype", path), "a dtype", path));
    out.type = nullptr;
    for (const DtypeName& d : kDtypes)
      if (out.dtype == d.name) out.type = &d;
    if (!out.type)
      fail(QUANTVM_ERR_ARTIFACT, path + ": " + kind + " " + out.name + " has dtype " + out.dtype +
                                     ", which the C API does not handle");
    size_t count = 1;
    for (const ffi::Any& dim : as<JsonArray>(field(spec, "shape", path), "a shape", path)) {
      auto value = dim.as<int64_t>();
      if (!value.has_value() || *value < 0)
        fail(QUANTVM_ERR_ARTIFACT, path + ": " + kind + " " + out.name +
                                       " has a dynamic dimension; the C API runs fixed shapes only");
      out.shape.push_back(*value);
      count *= size_t(*value);
    }
    out.num_bytes = count * out.type->itemsize;
    if (auto bound = spec.Get(ffi::String("index_bound")); bound.has_value()) {
      JsonObject b = as<JsonObject>(*bound, "an index bound", path);
      out.index_extent = as<int64_t>(field(b, "extent", path), "an index extent", path);
      out.index_node = std::string(as<ffi::String>(field(b, "node", path), "an index node", path));
    }
    specs.push_back(std::move(out));
  }
  return specs;
}

template <typename T>
void check_index_values(const TensorSpec& s, size_t position, const T* values) {
  const size_t count = s.num_bytes / sizeof(T);
  for (size_t k = 0; k < count; ++k)
    if (int64_t(values[k]) < -s.index_extent || int64_t(values[k]) >= s.index_extent)
      fail(QUANTVM_ERR_ARGUMENT, "quantvm_run: input " + std::to_string(position) + " (" + s.name + "): value " +
                                     std::to_string(int64_t(values[k])) + " at flat index " + std::to_string(k) +
                                     " is out of range for Gather '" + s.index_node + "', which takes indices in [" +
                                     std::to_string(-s.index_extent) + ", " + std::to_string(s.index_extent - 1) + "]");
}

// An input a Gather reads as indices, checked as run() checks it: the kernel would read outside its table.
void check_indices(const TensorSpec& s, size_t position, const void* data) {
  if (s.index_extent <= 0) return;
  if (s.dtype == "int64") check_index_values(s, position, static_cast<const int64_t*>(data));
  if (s.dtype == "int32") check_index_values(s, position, static_cast<const int32_t*>(data));
}

std::set<std::string> host_flags() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string key = line.substr(0, colon);
    key.erase(key.find_last_not_of(" \t") + 1);
    key.erase(0, key.find_first_not_of(" \t"));
    if (key != "flags") continue;
    std::istringstream words(line.substr(colon + 1));
    std::set<std::string> flags;
    for (std::string w; words >> w;) flags.insert(w);
    return flags;
  }
  return {};
}

std::string host_model_name() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0 && line.find(':') != std::string::npos) {
      std::string name = line.substr(line.find(':') + 1);
      name.erase(0, name.find_first_not_of(" \t"));
      return name;
    }
  }
  return "unknown CPU";
}

int host_cores() {
  long n = sysconf(_SC_NPROCESSORS_CONF);
  return n > 0 ? int(n) : 1;
}

// compiler/runtime.py's resolve_num_threads: the argument, else $TVM_NUM_THREADS, else the compiled count,
// else all cores; at most the cores.
int resolve_threads(int requested, int64_t compiled) {
  int cores = host_cores();
  int count = cores;
  if (requested > 0) {
    count = requested;
  } else if (const char* env = std::getenv("TVM_NUM_THREADS"); env && *env) {
    char* end = nullptr;
    long value = std::strtol(env, &end, 10);
    while (end && (*end == ' ' || *end == '\t' || *end == '\n')) ++end;
    if (end == env || *end != '\0' || value < 1)
      fail(QUANTVM_ERR_ARGUMENT, std::string("TVM_NUM_THREADS must be a whole number of threads >= 1, got '") +
                                     env + "'");
    count = int(std::min<long>(value, cores));
  } else if (compiled > 0) {
    count = int(compiled);
  }
  return std::min(count, cores);
}

// A CPU tensor over memory the caller owns: freeing it frees nothing.
struct Borrowed {
  void* data;
  void AllocData(DLTensor* tensor) { tensor->data = data; }
  void FreeData(DLTensor*) {}
};

struct AlignedBuffer {
  void* data = nullptr;
  size_t size = 0;
  ~AlignedBuffer() { std::free(data); }
  void* get(size_t bytes) {
    if (bytes > size || !data) {
      std::free(data);
      data = std::aligned_alloc(kAlignment, std::max<size_t>(kAlignment, (bytes + kAlignment - 1) / kAlignment * kAlignment));
      if (!data) throw std::bad_alloc();
      size = bytes;
    }
    return data;
  }
};

thread_local int pool_threads = 0;  // TVM keeps one pool per calling thread: what this thread's was set to

void use_threads(int count) {
  if (pool_threads == count) return;
  ffi::Array<ffi::String> cpus;
  for (int i = 0; i < host_cores(); ++i) cpus.push_back(ffi::String(std::to_string(i)));
  ffi::Function::GetGlobalRequired("runtime.config_threadpool")(kShareAllCores, count, cpus);
  pool_threads = count;
}

void flatten(const ffi::Any& value, std::vector<ffi::Tensor>* out) {
  if (auto tensor = value.as<ffi::Tensor>()) {
    out->push_back(*tensor);
  } else if (auto array = value.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& item : *array) flatten(item, out);
  } else {
    fail(QUANTVM_ERR_RUNTIME, std::string("the model returned a ") + value.GetTypeKey() + ", not tensors");
  }
}

// TVM 0.27's VM executable logs "Warning: Scope Loaded:" from C++ for every constant it loads,
// unconditionally (compiler/quiet.py drops them in Python). While alive, this sends fd 2 to an in-memory file;
// on destruction it restores fd 2 and writes back every line but those.
class ScopeWarningsSilenced {
 public:
  ScopeWarningsSilenced() {
    std::fflush(stderr);
    int memory = memfd_create("quantvm-stderr", MFD_CLOEXEC);  // in memory: a root with no /tmp works too
    capture_ = memory >= 0 ? fdopen(memory, "w+") : std::tmpfile();
    if (!capture_ && memory >= 0) close(memory);
    saved_ = capture_ ? dup(2) : -1;
    if (saved_ < 0 || dup2(fileno(capture_), 2) < 0) restore();
  }
  ~ScopeWarningsSilenced() { restore(); }

 private:
  void restore() {
    if (saved_ >= 0) {
      std::fflush(stderr);
      dup2(saved_, 2);
      close(saved_);
      saved_ = -1;
      std::rewind(capture_);
      char line[4096];
      while (std::fgets(line, sizeof line, capture_))
        if (!std::strstr(line, "Warning: Scope Loaded:") && !std::strstr(line, "Warning: Scope Saving:"))
          std::fputs(line, stderr);
      std::fflush(stderr);
    }
    if (capture_) std::fclose(capture_);
    capture_ = nullptr;
  }
  std::FILE* capture_ = nullptr;
  int saved_ = -1;
};

}  // namespace

struct quantvm_model {
  std::string path, metadata_json;
  std::vector<TensorSpec> inputs, outputs;
  int num_threads = 1;
  ffi::Module library{ffi::UnsafeInit()};
  ffi::Module vm{ffi::UnsafeInit()};
  ffi::Function main;
  std::vector<AlignedBuffer> staging;  // copies of inputs that are not 64-byte aligned
  std::mutex lock;
};

extern "C" {

quantvm_model* quantvm_load(const char* path_arg, int num_threads) {
  return guarded<quantvm_model*>(nullptr, [&]() -> quantvm_model* {
    if (!path_arg) fail(QUANTVM_ERR_ARGUMENT, "quantvm_load: path is NULL");
    const std::string path(path_arg);
    auto model = std::make_unique<quantvm_model>();
    model->path = path;
    std::string section;
    size_t section_offset = 0;
    {
      int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) {
        int err = errno;
        fail(QUANTVM_ERR_ARTIFACT, err == ENOENT ? "artifact not found: " + path
                                                  : "cannot read " + path + ": " + std::strerror(err));
      }
      struct stat st;
      if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        fail(QUANTVM_ERR_ARTIFACT, "cannot read " + path + ": not a regular file");
      }
      Mapped file;
      file.size = size_t(st.st_size);
      if (file.size > 0) {
        void* p = mmap(nullptr, file.size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
          int err = errno;
          close(fd);
          fail(QUANTVM_ERR_ARTIFACT, "cannot read " + path + ": " + std::strerror(err));
        }
        file.data = static_cast<const uint8_t*>(p);
      }
      close(fd);
      section = metadata_section(file, path, &section_offset);
      size_t first = section.find(kDigestSlot);
      if (first == std::string::npos || section.find(kDigestSlot, first + 1) != std::string::npos ||
          first + std::strlen(kDigestSlot) + 64 > section.size())
        fail(QUANTVM_ERR_ARTIFACT, path + ": its quantvm metadata is corrupted (no single artifact_sha256 entry)");
      size_t slot = section_offset + first + std::strlen(kDigestSlot);
      std::string recorded(reinterpret_cast<const char*>(file.data + slot), 64);
      std::string actual = artifact_digest(file, slot);
      if (actual != recorded)
        fail(QUANTVM_ERR_ARTIFACT, path + " is damaged or was modified after export: its SHA-256 is " +
                                       actual.substr(0, 16) + "..., its metadata records " + recorded.substr(0, 16) +
                                       "...; re-export it");
    }
    // the metadata: NUL-terminated JSON
    section = section.substr(0, section.find('\0'));
    ffi::String error;
    ffi::Any parsed = ffi::json::Parse(ffi::String(section), &error);
    if (!error.empty()) fail(QUANTVM_ERR_ARTIFACT, path + ": its quantvm metadata is corrupted (" + std::string(error) + ")");
    auto meta_opt = parsed.as<JsonObject>();
    if (!meta_opt) fail(QUANTVM_ERR_ARTIFACT, path + " is not a quantvm artifact (its metadata is not a JSON object)");
    JsonObject meta = *meta_opt;
    auto format = meta.Get(ffi::String("format"));
    if (!format || !format->as<ffi::String>() || std::string(*format->as<ffi::String>()) != kFormat)
      fail(QUANTVM_ERR_ARTIFACT, path + " is not a quantvm artifact (metadata format is not " + kFormat + ")");
    int64_t version = 0;
    if (auto v = meta.Get(ffi::String("format_version"))) version = v->as<int64_t>().value_or(kFormatVersion + 1);
    if (version > kFormatVersion)
      fail(QUANTVM_ERR_ARTIFACT, path + " uses artifact format " + std::to_string(version) +
                                     ", newer than this libquantvm reads (" + std::to_string(kFormatVersion) + ")");
    model->metadata_json = section;

    JsonObject target = as<JsonObject>(field(meta, "target", path), "target", path);
    std::set<std::string> flags = host_flags();
    std::string missing;
    for (const ffi::Any& f : as<JsonArray>(field(target, "required_features", path), "required_features", path)) {
      std::string flag(as<ffi::String>(f, "a required feature", path));
      if (!flags.count(flag)) missing += (missing.empty() ? "" : ", ") + flag;
    }
    if (!missing.empty()) {
      std::string name = target.Get(ffi::String("name")).value_or(ffi::String("?")).as<ffi::String>().value_or("?");
      std::string mcpu = target.Get(ffi::String("mcpu")).value_or(ffi::String("?")).as<ffi::String>().value_or("?");
      fail(QUANTVM_ERR_HOST, path + " was built for target '" + name + "' (mcpu " + mcpu +
                                 ") and needs CPU features this host lacks: " + missing + " (host: " +
                                 host_model_name() + "). Compile for target 'native' to run here.");
    }
    int64_t compiled_threads = 0;
    if (auto t = target.Get(ffi::String("num_threads"))) compiled_threads = t->as<int64_t>().value_or(0);
    model->num_threads = resolve_threads(num_threads, compiled_threads);
    model->inputs = tensor_specs(meta, "inputs", path);
    model->outputs = tensor_specs(meta, "outputs", path);
    model->staging.resize(model->inputs.size());

    // only now does any of its code load
    try {
      ScopeWarningsSilenced quiet;
      // dlopen searches the library path for a name without '/': hand it the file's absolute path
      char* absolute = realpath(path.c_str(), nullptr);
      std::string resolved = absolute ? absolute : path;
      std::free(absolute);
      model->library = ffi::Module::LoadFromFile(ffi::String(resolved));
      ffi::Function load = model->library->GetFunction("vm_load_executable").value_or(ffi::Function());
      if (load == nullptr) fail(QUANTVM_ERR_ARTIFACT, path + " holds no Relax VM executable");
      model->vm = load().cast<ffi::Module>();
      ffi::Function init = model->vm->GetFunction("vm_initialization").value_or(ffi::Function());
      if (init == nullptr) fail(QUANTVM_ERR_RUNTIME, path + ": the VM has no vm_initialization");
      init(int(kDLCPU), 0, kPooledAllocator);
      model->main = model->vm->GetFunction("main").value_or(ffi::Function());
      if (model->main == nullptr) fail(QUANTVM_ERR_ARTIFACT, path + " has no main function");
    } catch (const ffi::Error& err) {
      fail(QUANTVM_ERR_RUNTIME, "cannot load " + path + ": " + err.kind() + ": " + err.message());
    }
    return model.release();
  });
}

void quantvm_free(quantvm_model* model) {
  try {
    delete model;
  } catch (...) {
  }
}

int quantvm_num_inputs(const quantvm_model* model) {
  return guarded<int>(QUANTVM_ERR_ARGUMENT, [&] {
    if (!model) fail(QUANTVM_ERR_ARGUMENT, "quantvm_num_inputs: model is NULL");
    return int(model->inputs.size());
  });
}

int quantvm_num_outputs(const quantvm_model* model) {
  return guarded<int>(QUANTVM_ERR_ARGUMENT, [&] {
    if (!model) fail(QUANTVM_ERR_ARGUMENT, "quantvm_num_outputs: model is NULL");
    return int(model->outputs.size());
  });
}

int quantvm_num_threads(const quantvm_model* model) {
  return guarded<int>(QUANTVM_ERR_ARGUMENT, [&] {
    if (!model) fail(QUANTVM_ERR_ARGUMENT, "quantvm_num_threads: model is NULL");
    return model->num_threads;
  });
}

const char* quantvm_metadata_json(const quantvm_model* model) {
  return guarded<const char*>(nullptr, [&] {
    if (!model) fail(QUANTVM_ERR_ARGUMENT, "quantvm_metadata_json: model is NULL");
    return model->metadata_json.c_str();
  });
}

static int tensor_info(const char* fn, const quantvm_model* model, const std::vector<TensorSpec>* specs, int index,
                       quantvm_tensor_info* info) {
  return guarded<int>(QUANTVM_ERR_ARGUMENT, [&] {
    if (!model) fail(QUANTVM_ERR_ARGUMENT, std::string(fn) + ": model is NULL");
    if (!info) fail(QUANTVM_ERR_ARGUMENT, std::string(fn) + ": info is NULL");
    if (index < 0 || size_t(index) >= specs->size())
      fail(QUANTVM_ERR_ARGUMENT, std::string(fn) + ": index " + std::to_string(index) + " out of range (the model has " +
                                     std::to_string(specs->size()) + ")");
    const TensorSpec& s = (*specs)[index];
    info->name = s.name.c_str();
    info->dtype = s.dtype.c_str();
    info->dtype_code = s.type->code;
    info->itemsize = s.type->itemsize;
    info->ndim = int(s.shape.size());
    info->shape = s.shape.data();
    info->num_bytes = s.num_bytes;
    return QUANTVM_OK;
  });
}

int quantvm_input_info(const quantvm_model* model, int index, quantvm_tensor_info* info) {
  return tensor_info("quantvm_input_info", model, model ? &model->inputs : nullptr, index, info);
}

int quantvm_output_info(const quantvm_model* model, int index, quantvm_tensor_info* info) {
  return tensor_info("quantvm_output_info", model, model ? &model->outputs : nullptr, index, info);
}

int quantvm_run(quantvm_model* model, const void* const* inputs, const size_t* input_bytes, void* const* outputs,
                const size_t* output_bytes) {
  return guarded<int>(QUANTVM_ERR_RUNTIME, [&] {
    if (!model) fail(QUANTVM_ERR_ARGUMENT, "quantvm_run: model is NULL");
    const size_t n_in = model->inputs.size(), n_out = model->outputs.size();
    if (n_in && (!inputs || !input_bytes))
      fail(QUANTVM_ERR_ARGUMENT, std::string("quantvm_run: ") + (!inputs ? "inputs" : "input_bytes") + " is NULL");
    if (n_out && (!outputs || !output_bytes))
      fail(QUANTVM_ERR_ARGUMENT, std::string("quantvm_run: ") + (!outputs ? "outputs" : "output_bytes") + " is NULL");
    for (size_t i = 0; i < n_in; ++i) {
      const TensorSpec& s = model->inputs[i];
      if (!inputs[i]) fail(QUANTVM_ERR_ARGUMENT, "quantvm_run: input " + std::to_string(i) + " (" + s.name + ") is NULL");
      if (input_bytes[i] != s.num_bytes)
        fail(QUANTVM_ERR_ARGUMENT, "quantvm_run: input " + std::to_string(i) + " (" + s.name + ") has " +
                                       std::to_string(input_bytes[i]) + " bytes; it takes " + std::to_string(s.num_bytes) +
                                       " (" + s.dtype + " " + std::to_string(s.shape.size()) + "-d shape)");
      check_indices(s, i, inputs[i]);
    }
    for (size_t i = 0; i < n_out; ++i) {
      const TensorSpec& s = model->outputs[i];
      if (!outputs[i]) fail(QUANTVM_ERR_ARGUMENT, "quantvm_run: output " + std::to_string(i) + " (" + s.name + ") is NULL");
      if (output_bytes[i] != s.num_bytes)
        fail(QUANTVM_ERR_ARGUMENT, "quantvm_run: output " + std::to_string(i) + " (" + s.name + ") buffer has " +
                                       std::to_string(output_bytes[i]) + " bytes; it needs " + std::to_string(s.num_bytes));
    }
    std::lock_guard<std::mutex> hold(model->lock);
    use_threads(model->num_threads);
    std::vector<ffi::Any> args;
    args.reserve(n_in);
    for (size_t i = 0; i < n_in; ++i) {
      const TensorSpec& s = model->inputs[i];
      void* data = const_cast<void*>(inputs[i]);
      if (reinterpret_cast<uintptr_t>(data) % kAlignment != 0) {  // kernels may assume TVM's 64-byte alignment
        void* copy = model->staging[i].get(s.num_bytes);
        std::memcpy(copy, data, s.num_bytes);
        data = copy;
      }
      args.emplace_back(ffi::Tensor::FromNDAlloc(Borrowed{data}, ffi::ShapeView(s.shape.data(), s.shape.size()),
                                                 s.type->dl, DLDevice{kDLCPU, 0}));
    }
    std::vector<ffi::AnyView> views(args.begin(), args.end());
    ffi::Any result;
    model->main.CallPacked(views.data(), int32_t(views.size()), &result);
    std::vector<ffi::Tensor> results;
    flatten(result, &results);
    if (results.size() != n_out)
      fail(QUANTVM_ERR_RUNTIME, "the model returned " + std::to_string(results.size()) + " tensors; its metadata lists " +
                                    std::to_string(n_out));
    for (size_t i = 0; i < n_out; ++i) {
      const ffi::Tensor& t = results[i];
      DLDataType dt = t.dtype();
      size_t bytes = size_t(t.numel()) * ((dt.bits * dt.lanes + 7) / 8);
      if (t.device().device_type != kDLCPU || !t.IsContiguous() || bytes != model->outputs[i].num_bytes)
        fail(QUANTVM_ERR_RUNTIME, "output " + std::to_string(i) + " (" + model->outputs[i].name +
                                      ") is not the contiguous CPU tensor its metadata describes");
      std::memcpy(outputs[i], static_cast<const char*>(t.data_ptr()) + t.byte_offset(), model->outputs[i].num_bytes);
    }
    return QUANTVM_OK;
  });
}

int quantvm_run_typed(quantvm_model* model, const void* const* inputs, const quantvm_dtype* input_dtypes,
                      const size_t* input_bytes, void* const* outputs, const size_t* output_bytes) {
  int checked = guarded<int>(QUANTVM_ERR_RUNTIME, [&] {
    if (!model) fail(QUANTVM_ERR_ARGUMENT, "quantvm_run_typed: model is NULL");
    if (!model->inputs.empty() && !input_dtypes) fail(QUANTVM_ERR_ARGUMENT, "quantvm_run_typed: input_dtypes is NULL");
    for (size_t i = 0; i < model->inputs.size(); ++i) {
      const TensorSpec& s = model->inputs[i];
      if (input_dtypes[i] != s.type->code)
        fail(QUANTVM_ERR_ARGUMENT, "quantvm_run_typed: input " + std::to_string(i) + " (" + s.name + ") is " +
                                       quantvm_dtype_name(input_dtypes[i]) + "; it takes " + s.dtype);
    }
    return QUANTVM_OK;
  });
  return checked != QUANTVM_OK ? checked : quantvm_run(model, inputs, input_bytes, outputs, output_bytes);
}

const char* quantvm_last_error(void) { return last_error.c_str(); }

int quantvm_last_error_code(void) { return last_code; }

const char* quantvm_dtype_name(quantvm_dtype dtype) {
  for (const DtypeName& d : kDtypes)
    if (d.code == dtype) return d.name;
  return "other";
}

}  // extern "C"
