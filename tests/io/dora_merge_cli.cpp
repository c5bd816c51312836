// The dora-merge executable (tools/dora_merge.cpp), run as a child process with posix_spawn (no
// shell): its exit statuses (0 success, 1 error during the merge, 2 bad usage), its messages on
// stdout and stderr, the files it leaves, and its output against dora::io::merge_checkpoint called
// in this process on the PEFT-made fixture tests/data/peft/dora_f32.
//
// Every test works in its own temporary directory: <tmp>/out receives the outputs (and must stay
// empty after an error), <tmp>/cap the captured stdout and stderr of each run.

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <dora/io/peft_adapter.hpp>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "test_support.hpp"

extern char** environ;  // POSIX: the program declares it itself

namespace {

namespace fs = std::filesystem;
using dora::io::Dtype;
using dora::io::SafetensorsReader;
using dora::io::TensorInfo;

const std::string kExe = DORA_MERGE_EXE;
const std::string kCase = std::string(DORA_TEST_DATA_DIR) + "/peft/dora_f32";
const std::string kBase = kCase + "/base_model.safetensors";
const std::string kAdapter = kCase + "/adapter";
// The four modules of the fixture's adapter: their weights are merged, the other five tensors copied.
const std::vector<std::string> kMergedTensors{"mlp.fc1.weight", "mlp.fc2.weight", "q_proj.weight", "v_proj.weight"};

// A fresh directory under the temporary directory (/tmp), removed with its contents at the end.
class TempDir {
 public:
  TempDir() {
    std::string t = (fs::temp_directory_path() / "dora-merge-cli-XXXXXX").string();
    if (::mkdtemp(t.data()) == nullptr) throw std::runtime_error("mkdtemp failed for " + t);
    path_ = t;
    fs::create_directory(out());
    fs::create_directory(path_ / "cap");
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }
  fs::path out() const { return path_ / "out"; }
  fs::path cap() const { return path_ / "cap"; }

 private:
  fs::path path_;
};

std::string read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

// Names in `dir`, sorted ("<missing>" when it does not exist).
std::vector<std::string> entries(const fs::path& dir) {
  std::vector<std::string> names;
  if (!fs::exists(dir)) return {"<missing>"};
  for (const fs::directory_entry& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

struct Run {
  std::string command;  // for messages: the words, space-separated
  int status = -1;      // exit status; -1 when the process did not exit normally
  std::string out, err;
  std::string describe() const {
    return "$ " + command + "\nexit status " + std::to_string(status) + "\n--- stdout:\n" + out + "--- stderr:\n" + err;
  }
};

// Runs dora-merge with `args`, stdin from /dev/null, stdout and stderr captured in files under `cap`.
Run run(const fs::path& cap, const std::vector<std::string>& args) {
  static int counter = 0;
  const std::string n = std::to_string(counter++);
  const std::string out_file = (cap / (n + ".stdout")).string(), err_file = (cap / (n + ".stderr")).string();
  std::vector<std::string> words{kExe};
  words.insert(words.end(), args.begin(), args.end());
  std::vector<char*> argv;
  Run r;
  for (std::string& w : words) {
    argv.push_back(w.data());
    r.command += (r.command.empty() ? "" : " ") + (w.empty() ? std::string("''") : w);
  }
  argv.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  REQUIRE(::posix_spawn_file_actions_init(&actions) == 0);
  REQUIRE(::posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0) == 0);
  REQUIRE(::posix_spawn_file_actions_addopen(&actions, 1, out_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644) == 0);
  REQUIRE(::posix_spawn_file_actions_addopen(&actions, 2, err_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644) == 0);
  pid_t pid = 0;
  const int rc = ::posix_spawn(&pid, kExe.c_str(), &actions, nullptr, argv.data(), environ);
  ::posix_spawn_file_actions_destroy(&actions);
  INFO("posix_spawn " << kExe << ": " << std::strerror(rc));
  REQUIRE(rc == 0);
  int ws = 0;
  while (::waitpid(pid, &ws, 0) < 0) REQUIRE(errno == EINTR);
  r.status = WIFEXITED(ws) ? WEXITSTATUS(ws) : -1;
  r.out = read_file(out_file);
  r.err = read_file(err_file);
  return r;
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// `s` with every run of white space made one space (help text is wrapped to the terminal's width).
std::string squeeze(const std::string& s) {
  std::istringstream in(s);
  std::string out, word;
  while (in >> word) out += " " + word;
  return out + " ";
}

// --base, --adapter and --out of a merge of the fixture into <tmp>/out/merged.safetensors.
std::vector<std::string> merge_args(const TempDir& tmp) {
  return {"--base", kBase, "--adapter", kAdapter, "--out", (tmp.out() / "merged.safetensors").string()};
}

std::vector<std::string> operator+(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// A usage error: exit status 2, nothing on stdout, `message` (and the usage) on stderr, nothing in
// the output directory.
void check_usage_error(const TempDir& tmp, const std::vector<std::string>& args, const std::string& message) {
  const Run r = run(tmp.cap(), args);
  INFO(r.describe());
  INFO("expected: exit status 2, stderr naming \"" << message << "\", nothing written");
  CHECK(r.status == 2);
  CHECK(r.out.empty());
  CHECK(contains(r.err, "dora-merge: "));
  CHECK(contains(r.err, message));
  CHECK(contains(r.err, "usage: dora-merge"));
  CHECK(entries(tmp.out()).empty());
}

// An error during the merge: exit status 1, "dora-merge: error:" and every one of `names` on
// stderr, no usage text, nothing left in the output directory (no output, no temporary).
void check_merge_error(const TempDir& tmp, const std::vector<std::string>& args, const std::vector<std::string>& names,
                       const std::vector<std::string>& expected_entries = {}) {
  const Run r = run(tmp.cap(), args);
  INFO(r.describe());
  CHECK(r.status == 1);
  CHECK(r.err.rfind("dora-merge: error: ", 0) == 0);
  for (const std::string& n : names) {
    INFO("stderr should name " << n);
    CHECK(contains(r.err, n));
  }
  CHECK_FALSE(contains(r.err, "usage:"));
  INFO("the output directory holds only what the test put there");
  CHECK(entries(tmp.out()) == expected_entries);
}

// Relative size of one unit in the last place of `d` (the tolerance between two roundings to d of
// nearly equal doubles).
double ulp(Dtype d) {
  switch (d) {
    case Dtype::F16:
      return 0x1p-10;
    case Dtype::BF16:
      return 0x1p-7;
    case Dtype::F32:
      return 0x1p-23;
    default:
      return 0x1p-52;
  }
}

dora::Matrix<double> values(const SafetensorsReader& r, const TensorInfo& t) {
  if (t.shape.size() == 2) return r.matrix<double>(t.name);
  if (t.shape.size() > 2) return r.reshaped<double>(t.name, t.shape[0], t.numel() / t.shape[0]);  // a conv kernel
  return r.vector<double>(t.name).transpose();
}

// Checks that the checkpoint `got` (written by dora-merge) has the tensors, order, metadata and
// shapes of the base, every tensor in `dtype` (each tensor's base dtype when none), and the contents
// of `ref` (written by merge_checkpoint in this process with the same dtype): copied tensors byte
// for byte, merged ones within one unit in the last place (the same computation, but compiled in
// another translation unit, where -march=native may contract it differently).
void check_checkpoint(const fs::path& got, const fs::path& ref, const SafetensorsReader& base,
                      std::optional<Dtype> dtype) {
  INFO("output " << got.string() << " vs merge_checkpoint's " << ref.string());
  REQUIRE(fs::is_regular_file(got));
  const SafetensorsReader g(got.string()), e(ref.string());
  CHECK(g.metadata() == base.metadata());
  REQUIRE(g.tensors().size() == base.tensors().size());
  REQUIRE(e.tensors().size() == base.tensors().size());
  for (std::size_t k = 0; k < base.tensors().size(); ++k) {
    const TensorInfo& b = base.tensors()[k];
    const TensorInfo& t = g.tensors()[k];
    const Dtype want = dtype ? *dtype : b.dtype;
    INFO("tensor " << b.name << ": dtype " << dora::io::dtype_name(t.dtype) << ", expected "
                   << dora::io::dtype_name(want));
    REQUIRE(t.name == b.name);
    CHECK(t.shape == b.shape);
    CHECK(t.dtype == want);
    CHECK(e.tensors()[k].dtype == want);
    const bool merged = std::count(kMergedTensors.begin(), kMergedTensors.end(), b.name) != 0;
    const std::string gb(reinterpret_cast<const char*>(g.raw(b.name)), t.end - t.begin);
    const std::string eb(reinterpret_cast<const char*>(e.raw(b.name)), e.info(b.name).end - e.info(b.name).begin);
    if (!merged) {
      INFO("a copied tensor: byte for byte merge_checkpoint's");
      const bool same_bytes = gb == eb;  // (not CHECK(gb == eb): Catch would print the raw bytes)
      CHECK(same_bytes);
      continue;
    }
    const dora::Matrix<double> gv = values(g, t), ev = values(e, e.info(b.name)), bv = values(base, b);
    const double err = dora_test::rel_err(gv, ev);
    INFO("a merged tensor: max |dora-merge - merge_checkpoint| / max |merge_checkpoint| = "
         << err << " (tolerance " << ulp(want) << "); bytes equal: " << (gb == eb ? "yes" : "no"));
    CHECK(err <= ulp(want));
    INFO("and it differs from the base weight by " << dora_test::rel_err(gv, bv));
    CHECK(dora_test::rel_err(gv, bv) > ulp(want));
  }
}

}  // namespace

TEST_CASE("help: --help and -h print the usage on stdout and exit 0", "[cli]") {
  TempDir tmp;
  for (const char* flag : {"--help", "-h"}) {
    const Run r = run(tmp.cap(), {flag});
    INFO(r.describe());
    INFO("expected: exit 0, the synopsis, every option and the exit statuses on stdout, nothing on stderr");
    CHECK(r.status == 0);
    CHECK(r.err.empty());
    CHECK(r.out.rfind("usage: dora-merge --base BASE --adapter ADAPTER_DIR [--adapter ADAPTER_DIR ...] --out OUT", 0) ==
          0);
    CHECK(contains(r.out, "dora-merge --inspect ADAPTER_DIR"));
    const std::string words = squeeze(r.out);
    for (const char* opt : {"-h,--help", "--base BASE", "--adapter ADAPTER_DIR", "--out OUT", "--dtype DTYPE",
                            "--quiet", "--inspect ADAPTER_DIR"}) {
      INFO("option " << opt);
      CHECK(contains(words, std::string(" ") + opt + " "));
    }
    CHECK(contains(words, "DTYPE: f32, bf16, f16 or f64"));
    CHECK(contains(words,
                   "Exit status: 0 success, 1 error during the merge or inspection (message on stderr), 2 bad usage."));
  }
  INFO("--help wins over the other arguments and writes nothing");
  const Run r = run(tmp.cap(), merge_args(tmp) + std::vector<std::string>{"--help"});
  CHECK(r.status == 0);
  CHECK(contains(r.out, "usage: dora-merge"));
  CHECK(entries(tmp.out()).empty());
}

TEST_CASE("no arguments: exit 2, the required options named", "[cli][usage]") {
  TempDir tmp;
  check_usage_error(tmp, {}, "--base, --adapter and --out are required (missing: --base, --adapter, --out)");
}

TEST_CASE("a missing merge option: exit 2 naming it, nothing written", "[cli][usage]") {
  TempDir tmp;
  const std::string out = (tmp.out() / "merged.safetensors").string();
  check_usage_error(tmp, {"--base", kBase, "--adapter", kAdapter}, "(missing: --out)");
  check_usage_error(tmp, {"--base", kBase, "--out", out}, "(missing: --adapter)");
  check_usage_error(tmp, {"--adapter", kAdapter, "--out", out, "--quiet"}, "(missing: --base)");
  check_usage_error(tmp, {"--dtype", "bf16"}, "(missing: --base, --adapter, --out)");
}

TEST_CASE("an unknown option or a stray argument: exit 2 naming it, nothing written", "[cli][usage]") {
  TempDir tmp;
  check_usage_error(tmp, merge_args(tmp) + std::vector<std::string>{"--bogus"}, "not expected: --bogus");
  check_usage_error(tmp, merge_args(tmp) + std::vector<std::string>{"stray"}, "not expected: stray");
  check_usage_error(tmp, merge_args(tmp) + std::vector<std::string>{"-q"}, "not expected: -q");
  check_usage_error(tmp, merge_args(tmp) + std::vector<std::string>{"--Base", kBase}, "--Base");
}

TEST_CASE("a missing or empty value: exit 2 naming the option, nothing written", "[cli][usage]") {
  TempDir tmp;
  const std::string out = (tmp.out() / "merged.safetensors").string();
  SECTION("the option is the last word") {
    check_usage_error(tmp, {"--adapter", kAdapter, "--out", out, "--base"}, "--base: 1 required BASE missing");
    check_usage_error(tmp, {"--base", kBase, "--out", out, "--adapter"}, "--adapter: 1 required ADAPTER_DIR missing");
    check_usage_error(tmp, {"--base", kBase, "--adapter", kAdapter, "--out"}, "--out: 1 required OUT missing");
    check_usage_error(tmp, merge_args(tmp) + std::vector<std::string>{"--dtype"}, "--dtype: 1 required DTYPE missing");
    check_usage_error(tmp, {"--inspect"}, "--inspect: 1 required ADAPTER_DIR missing");
  }
  SECTION("the next word is an option, not a value") {
    check_usage_error(tmp, {"--base", kBase, "--adapter", kAdapter, "--out", "--quiet"},
                      "--out: needs a value; got '--quiet', which looks like an option");
    check_usage_error(tmp, {"--base", "--adapter", kAdapter, "--out", out}, "--base: needs a value; got '--adapter'");
    check_usage_error(tmp, {"--base", kBase, "--adapter", "--out", out}, "--adapter: needs a value; got '--out'");
    check_usage_error(tmp, {"--inspect", "--quiet"}, "--inspect: needs a value; got '--quiet'");
    check_usage_error(tmp, merge_args(tmp) + std::vector<std::string>{"--dtype", "--quiet"},
                      "--dtype: must be f32, bf16, f16 or f64");
  }
  SECTION("an empty value") {
    check_usage_error(tmp, {"--base", "", "--adapter", kAdapter, "--out", out}, "--base: must not be empty");
    check_usage_error(tmp, {"--base", kBase, "--adapter", "", "--out", out}, "--adapter: must not be empty");
    check_usage_error(tmp, {"--base", kBase, "--adapter", kAdapter, "--out", ""}, "--out: must not be empty");
    check_usage_error(tmp, {"--inspect", ""}, "--inspect: must not be empty");
  }
}

TEST_CASE("an option other than --adapter given twice: exit 2 naming it, nothing written", "[cli][usage][repeat]") {
  TempDir tmp;
  // Every command here would be a valid merge if the repeat were taken as "the last one wins".
  const std::string out = (tmp.out() / "merged.safetensors").string();
  const std::string out2 = (tmp.out() / "other.safetensors").string();
  const std::string adapter2 = (tmp.path() / "adapter2").string();
  fs::copy(kAdapter, adapter2);
  SECTION("--base") {
    check_usage_error(tmp, {"--base", kBase, "--adapter", kAdapter, "--base", kBase, "--out", out},
                      "--base given 2 times; give it once");
  }
  SECTION("--out") {
    check_usage_error(tmp, {"--base", kBase, "--adapter", kAdapter, "--out", out, "--out", out2},
                      "--out given 2 times; give it once");
  }
  SECTION("--out three times, also as --out=VALUE") {
    check_usage_error(tmp, merge_args(tmp) + std::vector<std::string>{"--out=" + out2, "--out", out},
                      "--out given 3 times; give it once");
  }
  SECTION("--dtype") {
    check_usage_error(tmp, merge_args(tmp) + std::vector<std::string>{"--dtype", "f32", "--dtype", "bf16"},
                      "--dtype given 2 times; give it once");
  }
  SECTION("--quiet") {
    check_usage_error(tmp, merge_args(tmp) + std::vector<std::string>{"--quiet", "--quiet"},
                      "--quiet given 2 times; give it once");
  }
  SECTION("--inspect") {
    check_usage_error(tmp, {"--inspect", kAdapter, "--inspect", adapter2}, "--inspect given 2 times; give it once");
  }
}

TEST_CASE("inspect: --inspect lists the adapter's modules, and is a usage error with a merge option",
          "[cli][inspect]") {
  TempDir tmp;
  SECTION("alone: exit 0, one line per module on stdout") {
    const Run r = run(tmp.cap(), {"--inspect", kAdapter});
    INFO(r.describe());
    CHECK(r.status == 0);
    CHECK(r.err.empty());
    CHECK(contains(r.out, "4 modules, DoRA"));
    for (const char* m :
         {"mlp.fc1  [48, 32]  rank 6", "mlp.fc2  [32, 48]  rank 4  alpha 3", "q_proj  [24, 32]", "v_proj  [16, 32]"}) {
      INFO("module line " << m);
      CHECK(contains(r.out, m));
    }
  }
  SECTION("with a merge option: exit 2 naming both") {
    const std::string out = (tmp.out() / "merged.safetensors").string();
    const std::vector<std::pair<std::vector<std::string>, std::string>> cases{
        {{"--base", kBase}, "--base excludes --inspect"},
        {{"--adapter", kAdapter}, "--adapter excludes --inspect"},
        {{"--out", out}, "--out excludes --inspect"},
        {{"--dtype", "bf16"}, "--dtype excludes --inspect"},
        {{"--quiet"}, "--quiet excludes --inspect"}};
    for (const auto& [extra, message] : cases) {
      check_usage_error(tmp, std::vector<std::string>{"--inspect", kAdapter} + extra, message);
      check_usage_error(tmp, extra + std::vector<std::string>{"--inspect", kAdapter}, message);
    }
    check_usage_error(tmp, std::vector<std::string>{"--inspect", kAdapter} + merge_args(tmp), "excludes --inspect");
  }
  SECTION("a directory that is not an adapter: exit 1 naming it") {
    const std::string missing = (tmp.path() / "no-such-adapter").string();
    check_merge_error(tmp, {"--inspect", missing}, {missing});
  }
}

TEST_CASE("a bad --dtype value: exit 2 naming the value, nothing written", "[cli][usage][dtype]") {
  TempDir tmp;
  for (const char* bad : {"f8", "int8", "F8_E4M3", "fp16", "Float32", "BFLOAT16", "32", "f32 ", " bf16"}) {
    check_usage_error(tmp, merge_args(tmp) + std::vector<std::string>{"--dtype", bad},
                      std::string("--dtype: must be f32, bf16, f16 or f64 (or F32, float32, BF16, bfloat16, F16, "
                                  "float16, F64, float64), got '") +
                          bad + "'");
  }
  check_usage_error(tmp, merge_args(tmp) + std::vector<std::string>{"--dtype", ""}, "--dtype: must be");
}

TEST_CASE("merge with each --dtype value and without: exit 0, the dtype asked for, merge_checkpoint's values",
          "[cli][merge][dtype]") {
  const SafetensorsReader base(kBase);
  const std::vector<std::pair<std::string, std::optional<Dtype>>> cases{
      {"", std::nullopt},     {"f32", Dtype::F32},     {"F32", Dtype::F32},       {"float32", Dtype::F32},
      {"bf16", Dtype::BF16},  {"BF16", Dtype::BF16},   {"bfloat16", Dtype::BF16}, {"f16", Dtype::F16},
      {"F16", Dtype::F16},    {"float16", Dtype::F16}, {"f64", Dtype::F64},       {"F64", Dtype::F64},
      {"float64", Dtype::F64}};
  for (const auto& [name, dtype] : cases) {
    TempDir tmp;
    INFO("--dtype " << (name.empty() ? "(not given)" : name) << ": expected output dtype "
                    << (dtype ? dora::io::dtype_name(*dtype) : "each tensor's own (F32)"));
    const fs::path out = tmp.out() / "merged.safetensors";
    std::vector<std::string> args = merge_args(tmp);
    if (!name.empty()) args = args + std::vector<std::string>{"--dtype", name};
    const Run r = run(tmp.cap(), args);
    INFO(r.describe());
    REQUIRE(r.status == 0);
    CHECK(r.err.empty());
    INFO("stdout: one line per merged module and a summary naming the output");
    for (const std::string& t : kMergedTensors) CHECK(contains(r.out, "merged " + t + " "));
    CHECK(contains(r.out, "merged 4 modules, copied 5 tensors; wrote " + out.string() + "\n"));
    CHECK(entries(tmp.out()) == std::vector<std::string>{"merged.safetensors"});

    const fs::path ref = tmp.path() / "reference.safetensors";
    dora::io::MergeOptions options;
    options.dtype = dtype;
    dora::io::merge_checkpoint(kBase, kAdapter, ref.string(), options);
    check_checkpoint(out, ref, base, dtype);
  }
}

TEST_CASE("the merge without --dtype agrees with PEFT's merge_and_unload", "[cli][merge]") {
  TempDir tmp;
  const Run r = run(tmp.cap(), merge_args(tmp) + std::vector<std::string>{"--quiet"});
  INFO(r.describe());
  REQUIRE(r.status == 0);
  const SafetensorsReader got((tmp.out() / "merged.safetensors").string()), peft(kCase + "/merged_model.safetensors");
  REQUIRE(got.tensors().size() == peft.tensors().size());
  for (const TensorInfo& t : peft.tensors()) {
    const double err = dora_test::rel_err(values(got, got.info(t.name)), values(peft, t));
    INFO(t.name << ": relative error vs PEFT " << err << " (tolerance 1e-6)");
    CHECK(err <= 1e-6);
  }
}

// Three adapters saved by PEFT from one model (tools/make_multi_layer_reference.py): "default" in
// adapters/, "second" and "third" in sub-folders named after them (PEFT's layout), on a Linear with
// bias, one without, an Embedding and a Conv2d; merged.safetensors is PEFT 0.21's
// merge_and_unload(adapter_names=["default", "second", "third"]), merged_default_third.safetensors
// that of ["default", "third"].
const std::string kMultiCkpt = std::string(DORA_TEST_DATA_DIR) + "/multi_layers/checkpoint";

TEST_CASE("several --adapter options merge in turn, as PEFT's merge_and_unload(adapter_names=...)",
          "[cli][merge][multi]") {
  TempDir tmp;
  const std::string base = kMultiCkpt + "/base.safetensors", dir = kMultiCkpt + "/adapters";
  const auto check_against = [&](const std::vector<std::string>& adapters, const std::string& peft_file) {
    const std::string out = (tmp.out() / "merged.safetensors").string();
    std::vector<std::string> args{"--base", base};
    for (const std::string& a : adapters) args.insert(args.end(), {"--adapter", a});
    args.insert(args.end(), {"--out", out});
    const Run r = run(tmp.cap(), args);
    INFO(r.describe());
    REQUIRE(r.status == 0);
    const SafetensorsReader got(out), peft(kMultiCkpt + "/" + peft_file), b(base);
    REQUIRE(got.tensors().size() == peft.tensors().size());
    double worst = 0.0;
    std::size_t changed = 0;
    for (const TensorInfo& t : peft.tensors()) {
      const double err = dora_test::rel_err(values(got, got.info(t.name)), values(peft, t));
      INFO(t.name << ": relative error vs PEFT " << err << " (tolerance 1e-6)");
      CHECK(err <= 1e-6);
      worst = std::max(worst, err);
      if (dora_test::rel_err(values(b, b.info(t.name)), values(peft, t)) > 1e-3) ++changed;
    }
    std::printf("dora-merge, %zu adapters vs PEFT's merge_and_unload: worst relative error %.2e over %zu tensors\n",
                adapters.size(), worst, peft.tensors().size());
    CHECK(changed == 4);  // q, v, emb, conv: the data does adapt every one of them
    fs::remove(out);
  };
  check_against({dir, dir + "/second", dir + "/third"}, "merged.safetensors");
  check_against({dir, dir + "/third"}, "merged_default_third.safetensors");
  // The directory of the sub-folders is not an adapter: refused, naming them.
  const Run r = run(tmp.cap(), {"--base", base, "--adapter", dir + "/..", "--out", (tmp.out() / "x").string()});
  CHECK(r.status == 1);
  CHECK_THAT(r.err, Catch::Contains("holds adapters in sub-folders") && Catch::Contains("adapters"));
  const Run r2 = run(tmp.cap(), {"--inspect", kMultiCkpt});
  CHECK(r2.status == 1);
  CHECK_THAT(r2.err, Catch::Contains("holds adapters in sub-folders") && Catch::Contains(" adapters"));
}

TEST_CASE("quiet: --quiet prints nothing and writes the same output", "[cli][merge][quiet]") {
  TempDir tmp;
  const std::string loud = (tmp.out() / "loud.safetensors").string();
  const std::string quiet = (tmp.out() / "quiet.safetensors").string();
  const Run a = run(tmp.cap(), {"--base", kBase, "--adapter", kAdapter, "--out", loud, "--dtype", "bf16"});
  const Run b = run(tmp.cap(), {"--quiet", "--base", kBase, "--adapter", kAdapter, "--out", quiet, "--dtype", "bf16"});
  INFO(a.describe());
  INFO(b.describe());
  INFO("expected: both exit 0; the first prints its report, the --quiet one nothing; same bytes");
  CHECK(a.status == 0);
  CHECK(b.status == 0);
  CHECK(contains(a.out, "merged 4 modules"));
  CHECK(b.out.empty());
  CHECK(b.err.empty());
  const bool same_bytes = read_file(loud) == read_file(quiet);
  CHECK(same_bytes);
  CHECK(entries(tmp.out()) == std::vector<std::string>{"loud.safetensors", "quiet.safetensors"});
}

TEST_CASE("merge errors: exit 1, the problem named on stderr, no output or temporary left", "[cli][merge][errors]") {
  TempDir tmp;
  const std::string out = (tmp.out() / "merged.safetensors").string();
  SECTION("the adapter directory does not exist") {
    const std::string missing = (tmp.path() / "no-such-adapter").string();
    check_merge_error(tmp, {"--base", kBase, "--adapter", missing, "--out", out}, {missing});
  }
  SECTION("the base file does not exist") {
    const std::string missing = (tmp.path() / "no-such-base.safetensors").string();
    check_merge_error(tmp, {"--base", missing, "--adapter", kAdapter, "--out", out}, {missing});
  }
  SECTION("the base lacks a module the adapter adapts") {
    const SafetensorsReader base(kBase);
    const std::string partial = (tmp.path() / "partial.safetensors").string();
    dora::io::SafetensorsWriter w(partial);
    w.set_metadata(base.metadata());
    for (const TensorInfo& t : base.tensors())
      if (t.name != "v_proj.weight") w.add_raw(t.name, t.dtype, t.shape, base.raw(t.name), t.end - t.begin);
    w.finish();
    check_merge_error(tmp, {"--base", partial, "--adapter", kAdapter, "--out", out, "--quiet"},
                      {partial, "v_proj.weight", "no such weight"});
  }
  SECTION("the output's directory does not exist") {
    const std::string deep = (tmp.out() / "no-such-dir" / "merged.safetensors").string();
    check_merge_error(tmp, {"--base", kBase, "--adapter", kAdapter, "--out", deep}, {deep});
  }
  SECTION("the output is an existing directory: the rename fails at the end, the temporary is removed") {
    fs::create_directory(tmp.out() / "taken");
    const std::string taken = (tmp.out() / "taken").string();
    check_merge_error(tmp, {"--base", kBase, "--adapter", kAdapter, "--out", taken, "--dtype", "f16"}, {taken},
                      {"taken"});
    CHECK(entries(tmp.out() / "taken").empty());
  }
}

TEST_CASE("a sharded base: --out is a directory with the same shards and index as merge_checkpoint's",
          "[cli][merge][sharded]") {
  TempDir tmp;
  // The fixture's base split into two shards with an index, as HF checkpoints ship.
  const SafetensorsReader base(kBase);
  const fs::path in = tmp.path() / "sharded";
  fs::create_directory(in);
  const std::string s1 = "model-00001-of-00002.safetensors", s2 = "model-00002-of-00002.safetensors";
  nlohmann::ordered_json idx;
  idx["metadata"]["total_size"] = 0;
  {
    dora::io::SafetensorsWriter w1((in / s1).string()), w2((in / s2).string());
    w1.set_metadata(base.metadata());
    w2.set_metadata(base.metadata());
    std::size_t k = 0;
    for (const TensorInfo& t : base.tensors()) {
      const bool first = k++ % 2 == 0;
      (first ? w1 : w2).add_raw(t.name, t.dtype, t.shape, base.raw(t.name), t.end - t.begin);
      idx["weight_map"][t.name] = first ? s1 : s2;
    }
    w1.finish();
    w2.finish();
  }
  const fs::path index = in / "model.safetensors.index.json";
  std::ofstream(index) << idx.dump(2);

  const fs::path out = tmp.out() / "merged", ref = tmp.path() / "reference";
  const Run r = run(tmp.cap(), {"--base", index.string(), "--adapter", kAdapter, "--out", out.string(), "--dtype",
                                "bf16", "--quiet"});
  INFO(r.describe());
  REQUIRE(r.status == 0);
  CHECK(r.out.empty());
  dora::io::MergeOptions options;
  options.dtype = Dtype::BF16;
  dora::io::merge_checkpoint(index.string(), kAdapter, ref.string(), options);
  INFO("expected in " << out.string() << ": the two shards and the index, as merge_checkpoint writes them");
  CHECK(entries(tmp.out()) == std::vector<std::string>{"merged"});
  CHECK(entries(out) == std::vector<std::string>{s1, s2, "model.safetensors.index.json"});
  CHECK(entries(out) == entries(ref));
  CHECK(read_file(out / "model.safetensors.index.json") ==
        read_file(ref / "model.safetensors.index.json"));  // JSON text
  for (const std::string& s : {s1, s2}) {
    const SafetensorsReader shard((in / s).string());
    check_checkpoint(out / s, ref / s, shard, Dtype::BF16);
  }
}

// ---------------------------------------------------------------------------------------------
// A real checkpoint layout (tests/data/peft_layers: a tiny Llama saved by transformers, a PEFT 0.21
// DoRA adapter on every projection, embed_tokens and lm_head) through the executable, and the
// progress display, which appears only when stderr is a terminal.

namespace {

const std::string kLlama = std::string(DORA_TEST_DATA_DIR) + "/peft_layers";

// Runs dora-merge with stdout in a file and stderr on a new pseudo-terminal (so isatty(2) holds
// there), collecting everything written to the terminal until the process exits.
Run run_on_terminal(const fs::path& cap, const std::vector<std::string>& args) {
  const int master = ::posix_openpt(O_RDWR | O_NOCTTY);
  REQUIRE(master >= 0);
  REQUIRE(::grantpt(master) == 0);
  REQUIRE(::unlockpt(master) == 0);
  const std::string slave = ::ptsname(master);
  static int counter = 0;
  const std::string out_file = (cap / ("tty" + std::to_string(counter++) + ".stdout")).string();
  std::vector<std::string> words{kExe};
  words.insert(words.end(), args.begin(), args.end());
  std::vector<char*> argv;
  Run r;
  for (std::string& w : words) {
    argv.push_back(w.data());
    r.command += (r.command.empty() ? "" : " ") + w;
  }
  r.command += "  (stderr on the terminal " + slave + ")";
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  REQUIRE(::posix_spawn_file_actions_init(&actions) == 0);
  REQUIRE(::posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0) == 0);
  REQUIRE(::posix_spawn_file_actions_addopen(&actions, 1, out_file.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644) == 0);
  REQUIRE(::posix_spawn_file_actions_addopen(&actions, 2, slave.c_str(), O_RDWR | O_NOCTTY, 0) == 0);
  REQUIRE(::posix_spawn_file_actions_addclose(&actions, master) == 0);
  pid_t pid = 0;
  const int rc = ::posix_spawn(&pid, kExe.c_str(), &actions, nullptr, argv.data(), environ);
  ::posix_spawn_file_actions_destroy(&actions);
  REQUIRE(rc == 0);
  // Read the terminal while the child runs (a full terminal buffer would block it); after it has
  // exited and the slave is closed, read() fails with EIO.
  char buf[4096];
  for (;;) {
    const ssize_t n = ::read(master, buf, sizeof buf);
    if (n > 0) {
      r.err.append(buf, static_cast<std::size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    break;
  }
  int ws = 0;
  while (::waitpid(pid, &ws, 0) < 0) REQUIRE(errno == EINTR);
  ::close(master);
  r.status = WIFEXITED(ws) ? WEXITSTATUS(ws) : -1;
  r.out = read_file(out_file);
  return r;
}

}  // namespace

TEST_CASE("a real Llama checkpoint with embedding and lm_head adapters: dora-merge gives PEFT's merge",
          "[cli][merge][llama]") {
  TempDir tmp;
  const std::string dir = kLlama + "/llama_f32";
  const std::string out = (tmp.out() / "merged.safetensors").string();
  const Run r =
      run(tmp.cap(), {"--base", dir + "/base/model.safetensors", "--adapter", dir + "/adapter", "--out", out});
  INFO(r.describe());
  REQUIRE(r.status == 0);
  CHECK(r.err.empty());  // stderr is a file here: no progress display
  CHECK(contains(r.out, "merged model.embed_tokens.weight [128, 64] F32  rank 8  DoRA  scaling 1  Embedding"));
  CHECK(contains(r.out, "(base weight from the adapter)"));
  CHECK(contains(r.out, "merged 16 modules, copied 5 tensors"));
  const SafetensorsReader got(out), peft(dir + "/merged/model.safetensors");
  REQUIRE(got.tensors().size() == peft.tensors().size());
  double worst = 0.0;
  for (const TensorInfo& t : peft.tensors()) {
    const double err = dora_test::rel_err(values(got, got.info(t.name)), values(peft, t));
    worst = std::max(worst, err);
    INFO(t.name << ": relative error vs PEFT " << err << " (tolerance 1e-6)");
    CHECK(err <= 1e-6);
  }
  std::cout << "dora-merge on the Llama f32 checkpoint: largest relative error vs PEFT " << worst << "\n";
  const Run i = run(tmp.cap(), {"--inspect", dir + "/adapter"});
  INFO(i.describe());
  CHECK(i.status == 0);
  CHECK(contains(i.out, "16 modules, DoRA"));
  CHECK(contains(i.out,
                 "model.embed_tokens  [128, 64]  rank 8  alpha 8  scaling 1  DoRA  F32  Embedding  (carries its "
                 "base weight, F32)"));
  CHECK(contains(i.out, "lm_head  [128, 64]  rank 4  alpha 8  scaling 2  DoRA  F32  Linear  (carries its base weight"));
  CHECK(contains(i.out, "model.layers.0.mlp.down_proj  [64, 96]  rank 4"));
}

TEST_CASE("progress: shown on a terminal's stderr on one line and cleared at the end, none with --quiet or on a pipe",
          "[cli][merge][progress]") {
  TempDir tmp;
  const std::string dir = kLlama + "/llama_f32";
  const std::vector<std::string> args{"--base", dir + "/base_sharded/model.safetensors.index.json", "--adapter",
                                      dir + "/adapter"};
  SECTION("stderr a terminal: the progress line, redrawn with \\r, erased at the end") {
    const Run r = run_on_terminal(tmp.cap(), args + std::vector<std::string>{"--out", (tmp.out() / "m").string()});
    INFO(r.describe());
    CHECK(r.status == 0);
    CHECK(contains(r.err, "\r\033[2Kdora-merge: 0/21 tensors, 0.0/0.3 MB"));
    CHECK(contains(r.err, "MB/s"));
    CHECK_FALSE(contains(r.err, "\n"));  // one line, never a new one
    const std::string erase = "\r\033[2K";
    CHECK(r.err.size() >= erase.size());
    CHECK(r.err.compare(r.err.size() - erase.size(), erase.size(), erase) == 0);  // cleared at the end
    CHECK(contains(r.out, "merged 16 modules"));
  }
  SECTION("stderr a terminal, --quiet: nothing at all") {
    const Run r =
        run_on_terminal(tmp.cap(), args + std::vector<std::string>{"--quiet", "--out", (tmp.out() / "m").string()});
    INFO(r.describe());
    CHECK(r.status == 0);
    CHECK(r.err.empty());
    CHECK(r.out.empty());
  }
  SECTION("stderr a terminal, an error: the line is erased before the message") {
    const Run r = run_on_terminal(tmp.cap(), args + std::vector<std::string>{"--out", "/nonexistent-dir/m"});
    INFO(r.describe());
    CHECK(r.status == 1);
    CHECK(contains(r.err, "\r\033[2Kdora-merge: error: "));
    CHECK(entries(tmp.out()).empty());
  }
  SECTION("stderr not a terminal: nothing on it") {
    const Run r = run(tmp.cap(), args + std::vector<std::string>{"--out", (tmp.out() / "m").string()});
    INFO(r.describe());
    CHECK(r.status == 0);
    CHECK(r.err.empty());
  }
}
