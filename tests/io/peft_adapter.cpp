// PEFT adapters (dora/io/peft_adapter.hpp) against real PEFT 0.21 output (tests/data/peft, made by
// tools/make_peft_fixtures.py): config and scaling rules, merge_checkpoint (the dora-merge tool)
// against merge_and_unload in float32 (1e-6 relative) and bfloat16 (ulp distances), layers built
// from a loaded adapter against PEFT's forward, the C++-saved adapter, sharded checkpoints,
// fan_in_fan_out, dtype conversion, and hostile files (clear error naming the file and tensor, no
// output left behind).
//
// Relative error = max |ours - ref| / max |ref| per tensor. bfloat16 ulp distance = difference of
// the two values' positions in the ordered list of bfloat16 numbers (0 = bitwise equal).

#include <dirent.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dora/io/peft_adapter.hpp>
#include <fstream>
#include <ios>
#include <iostream>
#include <iterator>
#include <limits>
#include <nlohmann/json.hpp>
#include <optional>
#include <ostream>
#include <sstream>
#include <stdexcept>
#include <streambuf>
#include <string>
#include <type_traits>
#include <vector>

#include "io_support.hpp"
#include "test_support.hpp"

using dora::io::Dtype;
using dora::io::MergeOptions;
using dora::io::PeftAdapter;
using dora::io::SafetensorsReader;
using dora::io::SafetensorsWriter;
using dora::io::TensorInfo;
using dora_test::rel_err;

using namespace dora_test;

namespace {

using MatD = dora::Matrix<double>;
using MatF = dora::Matrix<float>;

const std::string kData = std::string(DORA_TEST_DATA_DIR) + "/peft";

void write_text(const std::string& path, const std::string& s) {
  std::ofstream out(path, std::ios::binary);
  out << s;
}

void copy_adapter(const std::string& from, const std::string& to) {
  REQUIRE(::mkdir(to.c_str(), 0755) == 0);
  for (const char* f : {"adapter_config.json", "adapter_model.safetensors"})
    write_bytes(to + "/" + f, read_bytes(from + "/" + f));
}

std::vector<std::string> cases() {
  std::vector<std::string> names;
  for (const auto& n : read_json(kData + "/cases.json")) names.push_back(n.get<std::string>());
  return names;
}

bool is_bf16_case(const std::string& c) { return c.find("bf16") != std::string::npos; }

// Position of a bfloat16 value (exactly representable in float) in the ordered bfloat16 numbers.
int bf16_order(float v) {
  std::uint32_t bits;
  std::memcpy(&bits, &v, 4);
  const int h = static_cast<int>(bits >> 16);
  return (h & 0x8000) ? -(h & 0x7fff) : h;
}

struct UlpStats {
  int max = 0;
  long over0 = 0, over1 = 0, n = 0;
};
// a and b must hold bfloat16 values.
UlpStats ulp_stats(const MatF& a, const MatF& b) {
  UlpStats s;
  REQUIRE(a.rows() == b.rows());
  REQUIRE(a.cols() == b.cols());
  for (Eigen::Index i = 0; i < a.size(); ++i) {
    const int d = std::abs(bf16_order(a.data()[i]) - bf16_order(b.data()[i]));
    s.max = std::max(s.max, d);
    s.over0 += d > 0;
    s.over1 += d > 1;
    ++s.n;
  }
  return s;
}

float round_bf16(double v) { return dora::io::detail::bf16_to_float(dora::io::detail::double_to_bf16(v)); }

// Rewrites a safetensors file through `edit`, which may drop (return false) or replace tensors.
template <typename Edit>
void rewrite(const std::string& src, const std::string& dst, Edit edit) {
  std::vector<std::uint8_t> copy = read_bytes(src);
  const SafetensorsReader r = SafetensorsReader::from_memory(copy.data(), copy.size(), src);
  SafetensorsWriter w(dst);
  w.set_metadata(r.metadata());
  for (const TensorInfo& t : r.tensors()) {
    MatD m = r.matrix<double>(t.name);
    std::vector<std::int64_t> shape = t.shape;
    if (!edit(t.name, &m, &shape)) continue;
    if (shape.size() == 1)
      w.add(t.name, Eigen::VectorXd(Eigen::Map<const Eigen::VectorXd>(m.data(), m.size())), t.dtype);
    else
      w.add(t.name, m, t.dtype);
  }
  w.finish();
}

// merge_checkpoint must throw an error whose message holds every piece of `needles`, and leave
// no output (nor any temporary) in the output's directory.
void expect_merge_error(const std::string& base, const std::string& adapter, const TempDir& outdir,
                        const std::vector<std::string>& needles, const MergeOptions& options = {}) {
  const std::string out = outdir / "merged.safetensors";
  std::string msg = "<no error>";
  try {
    dora::io::merge_checkpoint(base, adapter, out, options);
  } catch (const std::runtime_error& e) {
    msg = e.what();
  }
  INFO("error: " << msg);
  for (const std::string& n : needles) CHECK(msg.find(n) != std::string::npos);
  CHECK(list_dir(outdir.path).empty());
}

}  // namespace

TEST_CASE("PEFT pattern keys follow get_pattern_key", "[peft][config]") {
  const auto m = [](const std::string& key, const std::string& path) {
    return dora::io::detail::pattern_key_matches("cfg", key, path);
  };
  CHECK(m("fc1", "fc1"));
  CHECK(m("fc1", "mlp.fc1"));
  CHECK(m("fc1", "model.layers.0.mlp.fc1"));
  CHECK_FALSE(m("fc1", "mlp.fc10"));
  CHECK_FALSE(m("q_proj", "xq_proj"));
  CHECK(m("mlp.fc2", "mlp.fc2"));
  CHECK(m("fc.*", "mlp.fc1"));
  CHECK(m("layers\\.0\\.mlp\\.fc1", "model.layers.0.mlp.fc1"));
  CHECK_FALSE(m("layers\\.0\\.mlp\\.fc1", "model.layers.10.mlp.fc1"));

  dora::io::PeftConfig c = dora::io::PeftConfig::parse(
      R"({"r": 8, "lora_alpha": 16, "use_rslora": true, "rank_pattern": {"fc1": 4, "mlp.fc1": 2}, "alpha_pattern": {"fc.*": 3}})",
      "cfg.json");
  // First matching key in file order wins (a Python dict keeps insertion order).
  CHECK(c.rank_for("mlp.fc1") == 4);
  CHECK(c.rank_for("q_proj") == 8);
  CHECK(c.alpha_for("mlp.fc2") == 3.0);
  CHECK(c.scaling_for("mlp.fc1") == 3.0 / 2.0);  // rank 4 (first key), alpha 3
  CHECK(c.scaling_for("q_proj") == 16.0 / std::sqrt(8.0));
}

TEST_CASE("adapter config and scaling agree with PEFT's live layers", "[peft][fixtures]") {
  for (const std::string& c : cases()) {
    const nlohmann::json meta = read_json(kData + "/" + c + "/meta.json");
    const PeftAdapter a(kData + "/" + c + "/adapter");
    REQUIRE(a.modules().size() == meta.at("modules").size());
    for (const auto& kv : meta.at("modules").items()) {
      const dora::io::PeftModule& m = a.module(kv.key());
      INFO(c << " " << kv.key() << ": rank " << m.rank << " alpha " << m.alpha << " scaling " << m.scaling
             << " vs PEFT " << kv.value().dump());
      CHECK(m.rank == kv.value().at("r").get<Eigen::Index>());
      CHECK(m.alpha == kv.value().at("lora_alpha").get<double>());
      CHECK(std::abs(m.scaling - kv.value().at("scaling").get<double>()) <= 1e-15 * m.scaling);
      CHECK(m.use_dora == kv.value().at("use_dora").get<bool>());
      CHECK(m.d_out == kv.value().at("d_out").get<Eigen::Index>());
      CHECK(m.d_in == kv.value().at("d_in").get<Eigen::Index>());
      CHECK(a.config().targets(kv.key()));
    }
  }
}

TEST_CASE("merge_checkpoint reproduces PEFT's merge_and_unload", "[peft][merge]") {
  for (const std::string& c : cases()) {
    const std::string dir = kData + "/" + c;
    TempDir tmp;
    const std::string out = tmp / "merged.safetensors";
    const dora::io::MergeReport rep =
        dora::io::merge_checkpoint(dir + "/base_model.safetensors", dir + "/adapter", out);
    CHECK(rep.merged.size() == 4);
    const SafetensorsReader ours(out), peft(dir + "/merged_model.safetensors"), base(dir + "/base_model.safetensors");
    REQUIRE(ours.tensors().size() == peft.tensors().size());
    for (const TensorInfo& t : peft.tensors()) {
      REQUIRE(ours.contains(t.name));
      CHECK(ours.info(t.name).dtype == t.dtype);
      const bool adapted = PeftAdapter(dir + "/adapter").find(t.name.substr(0, t.name.size() - 7)) != nullptr &&
                           t.name.size() > 7 && t.name.compare(t.name.size() - 7, 7, ".weight") == 0;
      if (!adapted) {
        // Copied byte for byte.
        const TensorInfo& bt = base.info(t.name);
        CHECK(std::memcmp(ours.raw(t.name), base.raw(t.name), bt.end - bt.begin) == 0);
        continue;
      }
      if (!is_bf16_case(c)) {
        const double err = rel_err(ours.matrix<double>(t.name), peft.matrix<double>(t.name));
        INFO(c << " " << t.name << ": f32 merge relative error vs PEFT = " << err << " (tolerance 1e-6)");
        CHECK(err <= 1e-6);
      } else {
        // bf16: PEFT rounds to bf16 after each step (delta, W + delta, norm, m / n, product); we
        // compute in double and round once. Measured: the ulp distance to PEFT's bf16 result, and
        // the distance to the bf16 rounding of PEFT's own float64 merge of the same stored values
        // (merged_f64: what a single rounding gives), which must be 0 ulp (<= 1 allowed for ties).
        const MatF o = ours.matrix<float>(t.name);
        const UlpStats vs_peft = ulp_stats(o, peft.matrix<float>(t.name));
        const SafetensorsReader f64(dir + "/merged_f64.safetensors");
        const MatD exact = f64.matrix<double>(t.name);
        MatF exact_rounded(exact.rows(), exact.cols());
        for (Eigen::Index i = 0; i < exact.size(); ++i) exact_rounded.data()[i] = round_bf16(exact.data()[i]);
        const UlpStats vs_exact = ulp_stats(o, exact_rounded);
        const UlpStats peft_vs_exact = ulp_stats(peft.matrix<float>(t.name), exact_rounded);
        INFO(c << " " << t.name << ": bf16 ulp distance to PEFT's bf16 merge: max " << vs_peft.max << ", "
               << vs_peft.over0 << " of " << vs_peft.n << " differ, " << vs_peft.over1 << " by more than 1 ulp; "
               << "to the rounded f64 merge: max " << vs_exact.max << " (" << vs_exact.over0 << " differ); PEFT's bf16 "
               << "merge to the rounded f64 merge: max " << peft_vs_exact.max << " (" << peft_vs_exact.over0
               << " differ)");
        CHECK(vs_exact.max <= 1);
        CHECK(vs_peft.max <= 1);
      }
    }
  }
}

TEST_CASE("layers built from a loaded adapter reproduce PEFT's outputs", "[peft][layers]") {
  for (const std::string& c : cases()) {
    const std::string dir = kData + "/" + c;
    const PeftAdapter a(dir + "/adapter");
    const SafetensorsReader base(dir + "/base_model.safetensors"), io(dir + "/io.safetensors");
    const bool bf16 = is_bf16_case(c);
    for (const dora::io::PeftModule& m : a.modules()) {
      const std::string bias_name = m.path + ".bias";
      // Double layers on the stored values: PEFT's float64 copy of the same model for bf16 cases.
      const MatD W = base.matrix<double>(m.weight_name());
      const dora::Vector<double> b = base.contains(bias_name) ? base.vector<double>(bias_name) : dora::Vector<double>();
      const dora::BaseLayer<double> bl = b.size() ? dora::borrow(W, b) : dora::borrow(W);
      const MatD x = io.matrix<double>("x." + m.path);
      MatD y;
      if (m.use_dora) {
        dora::DoraLinear<double> layer = a.make_dora<double>(m.path, bl);
        y = layer.forward(x);
        CHECK(layer.magnitude() == a.weights<double>(m).magnitude);  // from the file, not recomputed
      } else {
        y = a.make_lora<double>(m.path, bl).forward(x);
      }
      const double err = rel_err(y, io.matrix<double>((bf16 ? "y64." : "y.") + m.path));
      const double tol = bf16 ? 1e-12 : 1e-5;
      INFO(c << " " << m.path << ": layer output relative error vs PEFT " << (bf16 ? "(float64 copy)" : "(float32)")
             << " = " << err << " (tolerance " << tol << ")");
      CHECK(err <= tol);
      if (bf16) {
        const double e16 = rel_err(y, io.matrix<double>("y." + m.path));
        INFO(c << " " << m.path << ": vs PEFT's bfloat16 forward = " << e16 << " (tolerance 2e-2: bf16 arithmetic)");
        CHECK(e16 <= 2e-2);
      }
      if (!bf16) {  // float layers too
        const MatF Wf = base.matrix<float>(m.weight_name());
        const dora::Vector<float> bf = base.contains(bias_name) ? base.vector<float>(bias_name) : dora::Vector<float>();
        const dora::BaseLayer<float> blf = bf.size() ? dora::borrow(Wf, bf) : dora::borrow(Wf);
        const MatF xf = io.matrix<float>("x." + m.path);
        const MatF yf =
            m.use_dora ? a.make_dora<float>(m.path, blf).forward(xf) : a.make_lora<float>(m.path, blf).forward(xf);
        const double ef = rel_err(yf, io.matrix<float>("y." + m.path));
        INFO(c << " " << m.path << ": float layer output relative error vs PEFT = " << ef);
        CHECK(ef <= 1e-5);
      }
    }
  }
}

TEST_CASE("shared reference adapter (peft_dora_adapter_f32)", "[peft][merge][reference]") {
  // The project's own copy (tests/data/peft-0.21.0-shared): always present, so missing is a failure.
  const std::string dir = std::string(DORA_SHARED_REFERENCE_DIR) + "/peft_dora_adapter_f32";
  for (const char* f :
       {"adapter_config.json", "adapter_model.safetensors", "base_model.safetensors", "merged_model.safetensors"}) {
    INFO("shared reference file " << dir << "/" << f);
    REQUIRE(exists(dir + "/" + f));
  }
  TempDir tmp;
  dora::io::merge_checkpoint(dir + "/base_model.safetensors", dir, tmp / "m.safetensors");
  const SafetensorsReader ours(tmp / "m.safetensors"), peft(dir + "/merged_model.safetensors");
  for (const TensorInfo& t : peft.tensors()) {
    const double err = rel_err(ours.matrix<double>(t.name), peft.matrix<double>(t.name));
    INFO(t.name << ": relative error vs PEFT merge_and_unload = " << err);
    CHECK(err <= 1e-6);
  }
}

TEST_CASE("adapter saved from C++ reloads with the same parameters and outputs", "[peft][save]") {
  for (const char* name : {"cpp_saved", "cpp_saved_lora"}) {
    const std::string dir = kData + "/" + name;
    const PeftAdapter a(dir + "/adapter");
    const SafetensorsReader base(dir + "/base_model.safetensors"), io(dir + "/io.safetensors");
    dora::io::PeftAdapterWriter writer;
    std::vector<MatF> Ws;
    std::vector<dora::Vector<float>> bs;
    Ws.reserve(a.modules().size());
    bs.reserve(a.modules().size());
    for (const dora::io::PeftModule& m : a.modules()) {
      Ws.push_back(base.matrix<float>(m.weight_name()));
      bs.push_back(base.contains(m.path + ".bias") ? base.vector<float>(m.path + ".bias") : dora::Vector<float>());
      const dora::BaseLayer<float> bl = bs.back().size() ? dora::borrow(Ws.back(), bs.back()) : dora::borrow(Ws.back());
      const MatF x = io.matrix<float>("x." + m.path);
      MatF y;
      if (m.use_dora) {
        dora::DoraLinear<float> layer = a.make_dora<float>(m.path, bl);
        y = layer.forward(x);
        writer.add(m.path, layer);
      } else {
        dora::LoraLinear<float> layer = a.make_lora<float>(m.path, bl);
        y = layer.forward(x);
        writer.add(m.path, layer);
      }
      const double err = rel_err(y, io.matrix<float>("y." + m.path));
      INFO(name << " " << m.path << ": reloaded layer vs the saved C++ output: " << err);
      CHECK(err <= 1e-6);
    }
    // Round trip: the same tensors and the same resolved ranks / scalings.
    TempDir tmp;
    writer.write(tmp / "adapter");
    const PeftAdapter b(tmp / "adapter");
    REQUIRE(b.modules().size() == a.modules().size());
    for (std::size_t i = 0; i < a.modules().size(); ++i) {
      const dora::io::PeftModule &ma = a.modules()[i], &mb = b.modules()[i];
      CHECK(ma.path == mb.path);
      CHECK(ma.rank == mb.rank);
      CHECK(ma.scaling == mb.scaling);
      CHECK(a.weights<float>(ma).A == b.weights<float>(mb).A);
      CHECK(a.weights<float>(ma).B == b.weights<float>(mb).B);
      CHECK(a.weights<float>(ma).magnitude == b.weights<float>(mb).magnitude);
    }
  }
  // What PEFT said when it loaded these directories (tools/check_peft_load.py, committed output).
  std::ifstream log(kData + "/check_peft_load.txt");
  const std::string text((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
  CHECK(text.find("ALL OK") != std::string::npos);
}

TEST_CASE("writer rejects adapters PEFT cannot express", "[peft][save]") {
  const MatD W = dora_test::random_matrix<double>(6, 5, 1);
  dora::AdapterConfig c;
  c.rank = 2;
  c.init = dora::Init::gaussian;
  const dora::LoraLinear<double> lora(dora::borrow(W), c);
  const dora::DoraLinear<double> dora_layer(dora::borrow(W), c);
  dora::io::PeftAdapterWriter w;
  w.add("a", lora);
  CHECK_THROWS_WITH(w.add("b", dora_layer), Catch::Contains("use_dora is one setting"));
  CHECK_THROWS_WITH(w.add("a", lora), Catch::Contains("added twice"));
  dora::AdapterConfig rs = c;
  rs.use_rslora = true;
  const dora::LoraLinear<double> lora_rs(dora::borrow(W), rs);
  CHECK_THROWS_WITH(w.add("c", lora_rs), Catch::Contains("use_rslora"));
}

TEST_CASE("sharded checkpoint: output mirrors the input's shards", "[peft][merge][sharded]") {
  const std::string dir = kData + "/dora_f32";
  TempDir tmp;
  // Split the base into two shards with an index, as HF checkpoints ship.
  const SafetensorsReader base(dir + "/base_model.safetensors");
  nlohmann::ordered_json idx;
  idx["metadata"]["total_size"] = 0;
  {
    SafetensorsWriter s1(tmp / "model-00001-of-00002.safetensors"), s2(tmp / "model-00002-of-00002.safetensors");
    s1.set_metadata({{"format", "pt"}});
    s2.set_metadata({{"format", "pt"}});
    std::size_t k = 0;
    for (const TensorInfo& t : base.tensors()) {
      SafetensorsWriter& s = (k++ % 2 == 0) ? s1 : s2;
      s.add_raw(t.name, t.dtype, t.shape, base.raw(t.name), t.end - t.begin);
      idx["weight_map"][t.name] = (&s == &s1) ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
    }
    s1.finish();
    s2.finish();
  }
  write_text(tmp / "model.safetensors.index.json", idx.dump(2));
  const std::string out = tmp / "merged";
  const dora::io::MergeReport rep =
      dora::io::merge_checkpoint(tmp / "model.safetensors.index.json", dir + "/adapter", out);
  CHECK(rep.merged.size() == 4);
  CHECK(list_dir(out) == std::vector<std::string>{"model-00001-of-00002.safetensors",
                                                  "model-00002-of-00002.safetensors", "model.safetensors.index.json"});
  const nlohmann::json oidx = read_json(out + "/model.safetensors.index.json");
  CHECK(oidx.at("weight_map") == nlohmann::json::parse(idx.at("weight_map").dump()));
  // Same values as the single-file merge, tensor by tensor, in the same shards.
  dora::io::merge_checkpoint(dir + "/base_model.safetensors", dir + "/adapter", tmp / "single.safetensors");
  const SafetensorsReader single(tmp / "single.safetensors");
  std::size_t total = 0;
  for (const auto& kv : oidx.at("weight_map").items()) {
    const SafetensorsReader shard(out + "/" + kv.value().get<std::string>());
    const TensorInfo& t = shard.info(kv.key());
    total += t.end - t.begin;
    REQUIRE(t.end - t.begin == single.info(kv.key()).end - single.info(kv.key()).begin);
    CHECK(std::memcmp(shard.raw(kv.key()), single.raw(kv.key()), t.end - t.begin) == 0);
  }
  CHECK(oidx.at("metadata").at("total_size").get<std::size_t>() == total);

  // An existing non-empty output directory is refused, and nothing is left beside it.
  const std::vector<std::string> before = list_dir(tmp.path);
  CHECK_THROWS_WITH(dora::io::merge_checkpoint(tmp / "model.safetensors.index.json", dir + "/adapter", out),
                    Catch::Contains("not empty"));
  CHECK(list_dir(tmp.path) == before);
  // A failure while writing (a shard listed in the index that lacks a tensor) leaves no directory.
  idx["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors";
  write_text(tmp / "bad.index.json", idx.dump());
  CHECK_THROWS_WITH(dora::io::merge_checkpoint(tmp / "bad.index.json", dir + "/adapter", tmp / "out2"),
                    Catch::Contains("ghost.weight"));
  CHECK_FALSE(exists(tmp / "out2"));
  // Nothing beside the inputs (bad.index.json was added by this test).
  std::vector<std::string> after = list_dir(tmp.path);
  after.erase(std::remove(after.begin(), after.end(), "bad.index.json"), after.end());
  CHECK(after == before);
}

TEST_CASE("fan_in_fan_out: base weights stored transposed", "[peft][merge]") {
  const std::string dir = kData + "/dora_f32";
  TempDir tmp;
  const PeftAdapter a(dir + "/adapter");
  // Conv1D layout: every adapted weight stored [d_in, d_out].
  rewrite(dir + "/base_model.safetensors", tmp / "base_t.safetensors",
          [&](const std::string& n, MatD* m, std::vector<std::int64_t>* shape) {
            if (a.find(n.substr(0, n.size() - 7)) != nullptr && n.compare(n.size() - 7, 7, ".weight") == 0) {
              *m = MatD(m->transpose());
              *shape = {m->rows(), m->cols()};
            }
            return true;
          });
  copy_adapter(dir + "/adapter", tmp / "adapter");
  nlohmann::ordered_json cfg = nlohmann::ordered_json::parse(read_bytes(tmp / "adapter/adapter_config.json"));
  cfg["fan_in_fan_out"] = true;
  write_text(tmp / "adapter/adapter_config.json", cfg.dump());
  dora::io::merge_checkpoint(tmp / "base_t.safetensors", tmp / "adapter", tmp / "m.safetensors");
  const SafetensorsReader ours(tmp / "m.safetensors"), peft(dir + "/merged_model.safetensors");
  for (const dora::io::PeftModule& m : a.modules()) {
    const double err =
        rel_err(MatD(ours.matrix<double>(m.weight_name()).transpose()), peft.matrix<double>(m.weight_name()));
    INFO(m.path << ": fan_in_fan_out merge (transposed back) vs PEFT = " << err);
    CHECK(err <= 1e-6);
  }
  // The un-transposed base no longer fits.
  TempDir out;
  expect_merge_error(dir + "/base_model.safetensors", tmp / "adapter", out,
                     {"fan_in_fan_out", "base_model.safetensors"});
}

TEST_CASE("The dtype option converts every tensor, rounding once", "[peft][merge]") {
  const std::string dir = kData + "/dora_f32";
  TempDir tmp;
  MergeOptions opt;
  opt.dtype = Dtype::BF16;
  dora::io::merge_checkpoint(dir + "/base_model.safetensors", dir + "/adapter", tmp / "bf16.safetensors", opt);
  opt.dtype = Dtype::F64;
  dora::io::merge_checkpoint(dir + "/base_model.safetensors", dir + "/adapter", tmp / "f64.safetensors", opt);
  const SafetensorsReader b16(tmp / "bf16.safetensors"), f64(tmp / "f64.safetensors"),
      peft(dir + "/merged_model.safetensors");
  for (const TensorInfo& t : b16.tensors()) {
    CHECK(t.dtype == Dtype::BF16);
    CHECK(f64.info(t.name).dtype == Dtype::F64);
    const MatD exact = f64.matrix<double>(t.name);
    MatF rounded(exact.rows(), exact.cols());
    for (Eigen::Index i = 0; i < exact.size(); ++i) rounded.data()[i] = round_bf16(exact.data()[i]);
    const UlpStats s = ulp_stats(b16.matrix<float>(t.name), rounded);
    INFO(t.name << ": bf16 output vs bf16(f64 output): max ulp " << s.max);
    CHECK(s.max == 0);
    CHECK(rel_err(exact, peft.matrix<double>(t.name)) <= 1e-6);
  }
}

TEST_CASE("hostile safetensors files at the merge level", "[peft][hostile]") {
  const std::string dir = kData + "/dora_f32";
  const std::string A = "base_model.model.q_proj.lora_A.weight";
  // Each hostile image is placed as the base checkpoint and as the adapter's weights file.
  struct Case {
    const char* what;
    std::vector<std::uint8_t> bytes;
    std::vector<std::string> needles;  // besides the file name
  };
  const std::vector<std::uint8_t> good_base = read_bytes(dir + "/base_model.safetensors");
  const std::vector<std::uint8_t> good_adapter = read_bytes(dir + "/adapter/adapter_model.safetensors");
  for (int target = 0; target < 2; ++target) {
    const std::vector<std::uint8_t>& good = target == 0 ? good_base : good_adapter;
    const std::string tensor = target == 0 ? "q_proj.weight" : A;
    std::vector<Case> hostile;
    {
      std::vector<std::uint8_t> b(good.begin(), good.end() - 10);
      hostile.push_back({"truncated", b, {"tensor '"}});
    }
    {
      std::vector<std::uint8_t> b = good;
      const std::uint64_t n = b.size();
      std::memcpy(b.data(), &n, 8);
      hostile.push_back({"header length past the end", b, {"runs past the end"}});
    }
    {
      std::vector<std::uint8_t> b = good;
      const std::uint64_t n = 200'000'000;
      std::memcpy(b.data(), &n, 8);
      hostile.push_back({"header over 100 MB", b, {"exceeds the limit"}});
    }
    {
      std::vector<std::uint8_t> b = good;
      b[9] = '!';
      hostile.push_back({"invalid JSON", b, {"invalid JSON"}});
    }
    const std::string t1 = "\"" + tensor + "\"";
    hostile.push_back({"offsets out of range",
                       make_file("{" + t1 +
                                     ":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]},\"x\":{\"dtype\":"
                                     "\"F32\",\"shape\":[2],\"data_offsets\":[16,24]}}",
                                 16),
                       {"tensor '", "past the end"}});
    hostile.push_back({"overlapping offsets",
                       make_file("{" + t1 +
                                     ":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,16]},\"x\":{\"dtype\":"
                                     "\"F32\",\"shape\":[2,2],\"data_offsets\":[8,24]}}",
                                 24),
                       {"tensor '", "overlaps"}});
    hostile.push_back({"shape x dtype size mismatch",
                       make_file("{" + t1 + ":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,16]}}", 16),
                       {"tensor '" + tensor + "'", "needs 24"}});
    hostile.push_back({"unknown dtype",
                       make_file("{" + t1 + ":{\"dtype\":\"F8_E4M3X\",\"shape\":[2,2],\"data_offsets\":[0,4]}}", 4),
                       {"tensor '" + tensor + "'", "unknown dtype 'F8_E4M3X'"}});
    for (const Case& hc : hostile) {
      DYNAMIC_SECTION((target == 0 ? "base: " : "adapter: ") << hc.what) {
        TempDir tmp, out;
        std::string base = dir + "/base_model.safetensors", adapter = dir + "/adapter", file;
        if (target == 0) {
          base = file = tmp / "base.safetensors";
          write_bytes(base, hc.bytes);
        } else {
          copy_adapter(dir + "/adapter", tmp / "adapter");
          adapter = tmp / "adapter";
          file = adapter + "/adapter_model.safetensors";
          write_bytes(file, hc.bytes);
        }
        std::vector<std::string> needles = hc.needles;
        needles.push_back(file);
        expect_merge_error(base, adapter, out, needles);
      }
    }
  }
}

TEST_CASE("inconsistent adapters are rejected naming the file and tensor", "[peft][hostile]") {
  const std::string dir = kData + "/dora_f32";
  const std::string pre = "base_model.model.";
  const auto with_tensors = [&](const TempDir& tmp, auto edit) {
    copy_adapter(dir + "/adapter", tmp / "adapter");
    rewrite(dir + "/adapter/adapter_model.safetensors", tmp / "adapter/adapter_model.safetensors", edit);
    return tmp / "adapter";
  };
  const std::string wfile = "adapter/adapter_model.safetensors";
  SECTION("missing lora_A") {
    TempDir tmp, out;
    const std::string a = with_tensors(tmp, [&](const std::string& n, MatD*, std::vector<std::int64_t>*) {
      return n != pre + "v_proj.lora_A.weight";
    });
    expect_merge_error(dir + "/base_model.safetensors", a, out, {wfile, pre + "v_proj.lora_A.weight", "missing"});
  }
  SECTION("missing lora_B") {
    TempDir tmp, out;
    const std::string a = with_tensors(tmp, [&](const std::string& n, MatD*, std::vector<std::int64_t>*) {
      return n != pre + "mlp.fc1.lora_B.weight";
    });
    expect_merge_error(dir + "/base_model.safetensors", a, out, {wfile, pre + "mlp.fc1.lora_B.weight", "missing"});
  }
  SECTION("missing magnitude with use_dora") {
    TempDir tmp, out;
    const std::string a = with_tensors(tmp, [&](const std::string& n, MatD*, std::vector<std::int64_t>*) {
      return n != pre + "q_proj.lora_magnitude_vector";
    });
    expect_merge_error(dir + "/base_model.safetensors", a, out,
                       {wfile, pre + "q_proj.lora_magnitude_vector", "use_dora"});
  }
  SECTION("magnitude spelled with .weight is accepted") {
    TempDir tmp, out;
    copy_adapter(dir + "/adapter", tmp / "adapter");
    {
      const SafetensorsReader r(dir + "/adapter/adapter_model.safetensors");
      SafetensorsWriter w(tmp / "adapter/adapter_model.safetensors");
      for (const TensorInfo& t : r.tensors()) {
        const bool mag = t.name.size() > 21 && t.name.compare(t.name.size() - 21, 21, "lora_magnitude_vector") == 0;
        w.add_raw(mag ? t.name + ".weight" : t.name, t.dtype, t.shape, r.raw(t.name), t.end - t.begin);
      }
      w.finish();
    }
    dora::io::merge_checkpoint(dir + "/base_model.safetensors", tmp / "adapter", out / "a.safetensors");
    dora::io::merge_checkpoint(dir + "/base_model.safetensors", dir + "/adapter", out / "b.safetensors");
    CHECK(read_bytes(out / "a.safetensors") == read_bytes(out / "b.safetensors"));
  }
  SECTION("A and B ranks disagree") {
    TempDir tmp, out;
    const std::string a = with_tensors(tmp, [&](const std::string& n, MatD* m, std::vector<std::int64_t>* shape) {
      if (n == pre + "v_proj.lora_B.weight") {
        *m = MatD::Ones(m->rows(), m->cols() + 1);
        *shape = {m->rows(), m->cols()};
      }
      return true;
    });
    expect_merge_error(dir + "/base_model.safetensors", a, out,
                       {wfile, pre + "v_proj.lora_B.weight", "disagrees with lora_A"});
  }
  SECTION("rank disagrees with r in the config") {
    TempDir tmp, out;
    copy_adapter(dir + "/adapter", tmp / "adapter");
    nlohmann::ordered_json cfg = nlohmann::ordered_json::parse(read_bytes(tmp / "adapter/adapter_config.json"));
    cfg["r"] = 5;
    write_text(tmp / "adapter/adapter_config.json", cfg.dump());
    expect_merge_error(dir + "/base_model.safetensors", tmp / "adapter", out,
                       {wfile, pre + "mlp.fc2.lora_A.weight", "disagrees with", "adapter_config.json", "r = 5"});
  }
  SECTION("rank disagrees with rank_pattern") {
    TempDir tmp, out;
    copy_adapter(dir + "/adapter", tmp / "adapter");
    nlohmann::ordered_json cfg = nlohmann::ordered_json::parse(read_bytes(tmp / "adapter/adapter_config.json"));
    cfg["rank_pattern"] = {{"fc1", 3}};
    write_text(tmp / "adapter/adapter_config.json", cfg.dump());
    expect_merge_error(dir + "/base_model.safetensors", tmp / "adapter", out,
                       {wfile, pre + "mlp.fc1.lora_A.weight", "rank_pattern", "r = 3"});
  }
  SECTION("base weight shape does not match") {
    TempDir tmp, out;
    rewrite(dir + "/base_model.safetensors", tmp / "base.safetensors",
            [&](const std::string& n, MatD* m, std::vector<std::int64_t>* shape) {
              if (n == "mlp.fc2.weight") {
                *m = MatD::Zero(m->rows(), m->cols() - 1);
                *shape = {m->rows(), m->cols()};
              }
              return true;
            });
    expect_merge_error(tmp / "base.safetensors", dir + "/adapter", out,
                       {tmp / "base.safetensors", "'mlp.fc2.weight'", "32 x 47", "needs 32 x 48"});
  }
  SECTION("base lacks an adapted weight") {
    TempDir tmp, out;
    rewrite(dir + "/base_model.safetensors", tmp / "base.safetensors",
            [&](const std::string& n, MatD*, std::vector<std::int64_t>*) { return n != "v_proj.weight"; });
    expect_merge_error(tmp / "base.safetensors", dir + "/adapter", out, {"'v_proj.weight'", "not found"});
  }
  SECTION("layer on a wrong-shaped base weight") {
    const PeftAdapter a(dir + "/adapter");
    const MatD W = MatD::Zero(24, 31);
    CHECK_THROWS_WITH(a.make_dora<double>("q_proj", dora::borrow(W)),
                      Catch::Contains("q_proj") && Catch::Contains("needs 24 x 32"));
    CHECK_THROWS_AS(a.make_lora<double>("q_proj", dora::borrow(W)), dora::io::PeftError);
  }
  SECTION("unsupported or invalid config values") {
    const std::vector<std::pair<std::string, std::string>> bad = {
        {R"({"r": 4, "lora_alpha": 8, "peft_type": "IA3"})", "peft_type"},
        {R"({"r": 4, "lora_alpha": 8, "bias": "all"})", "'bias'"},
        {R"({"r": 4, "lora_alpha": 8, "use_dora": "yes"})", "'use_dora'"},
        {R"({"r": 0, "lora_alpha": 8})", "'r'"},
        {R"({"r": 4, "lora_alpha": 8, "modules_to_save": ["classifier"]})", "modules_to_save"},
        {R"({"r": 4, "lora_alpha": 8, "lora_bias": true})", "lora_bias"},
        {R"({"r": 4, "lora_alpha": 8, "rank_pattern": {"fc(": 2}})", "pattern key 'fc('"},
        {R"({"r": 4, "lora_alpha": 8, "target_modules": 3})", "target_modules"},
        {R"({"lora_alpha": 8})", "missing 'r'"},
        {R"({"r": 4, "lora_alpha": 8,)", "invalid JSON"},
    };
    for (const auto& b : bad) {
      TempDir tmp, out;
      copy_adapter(dir + "/adapter", tmp / "adapter");
      write_text(tmp / "adapter/adapter_config.json", b.first);
      expect_merge_error(dir + "/base_model.safetensors", tmp / "adapter", out, {"adapter_config.json", b.second});
    }
  }
  SECTION("missing files") {
    TempDir tmp, out;
    expect_merge_error(dir + "/base_model.safetensors", tmp / "nope", out, {"nope", "does not exist"});
    REQUIRE(::mkdir((tmp / "empty").c_str(), 0755) == 0);
    expect_merge_error(dir + "/base_model.safetensors", tmp / "empty", out, {"adapter_config.json", "missing"});
    expect_merge_error(tmp / "nobase.safetensors", dir + "/adapter", out, {"nobase.safetensors", "cannot open"});
  }
}

// ---------------------------------------------------------------------------------------------
// Every safetensors dtype in a base checkpoint; the inactive-row rule against DoraLinear; sharded
// output: total_size and failures after the first shard.

namespace {

// The size of a safetensors file's data buffer from its framing alone: file size - 8 - header length.
std::size_t data_bytes_of_file(const std::string& path) {
  const std::vector<std::uint8_t> b = read_bytes(path);
  REQUIRE(b.size() >= 8);
  std::uint64_t n;
  std::memcpy(&n, b.data(), 8);
  REQUIRE(n <= b.size() - 8);
  return b.size() - 8 - static_cast<std::size_t>(n);
}

struct RawTensor {
  std::string name;
  Dtype dtype;
  std::vector<std::int64_t> shape;
  std::vector<std::uint8_t> bytes;
};

// Tensors of every dtype the merge does not convert, as checkpoints hold them (I64 position ids, a
// BOOL mask, quantized U8 / I8 / F8 / F4 / F6 data and scales, C64 rotary tables, ...): random
// bytes from a fixed seed; bits per element written out here, independently of the library.
std::vector<RawTensor> extra_tensors() {
  struct Spec {
    const char* name;
    Dtype dtype;
    std::vector<std::int64_t> shape;
    std::size_t bits;
  };
  const std::vector<Spec> specs = {
      {"embeddings.position_ids", Dtype::I64, {1, 7}, 64},
      {"attn.causal_mask", Dtype::BOOL, {3, 5}, 8},
      {"quant.q_u8", Dtype::U8, {4, 6}, 8},
      {"quant.q_i8", Dtype::I8, {4, 6}, 8},
      {"quant.f8_e4m3", Dtype::F8_E4M3, {4, 6}, 8},
      {"quant.f8_e5m2", Dtype::F8_E5M2, {5}, 8},
      {"quant.f8_e8m0_scales", Dtype::F8_E8M0, {4}, 8},
      {"quant.f8_e4m3fnuz", Dtype::F8_E4M3FNUZ, {3}, 8},
      {"quant.f8_e5m2fnuz", Dtype::F8_E5M2FNUZ, {3}, 8},
      {"quant.f4_packed", Dtype::F4, {4, 6}, 4},
      {"quant.f6_e2m3", Dtype::F6_E2M3, {8}, 6},
      {"quant.f6_e3m2", Dtype::F6_E3M2, {4}, 6},
      {"buffers.i16", Dtype::I16, {3}, 16},
      {"buffers.u16", Dtype::U16, {3}, 16},
      {"buffers.i32", Dtype::I32, {2, 2}, 32},
      {"buffers.u32", Dtype::U32, {2}, 32},
      {"buffers.u64", Dtype::U64, {2}, 64},
      {"rope.freqs_cis", Dtype::C64, {3, 2}, 64},
      {"buffers.step", Dtype::I64, {}, 64},
  };
  std::uint32_t state = 12345;
  std::vector<RawTensor> out;
  for (const Spec& s : specs) {
    std::size_t n = 1;
    for (std::int64_t d : s.shape) n *= static_cast<std::size_t>(d);
    RawTensor t{s.name, s.dtype, s.shape, std::vector<std::uint8_t>(n * s.bits / 8)};
    for (std::uint8_t& b : t.bytes) {
      state = state * 1664525u + 1013904223u;
      b = static_cast<std::uint8_t>(state >> 24);
    }
    out.push_back(std::move(t));
  }
  return out;
}

// The dora_f32 base with `bf16_weight` stored as BF16 (an adapted BF16 weight beside the F32 ones)
// and, when `extras` is not null, those tensors interleaved with the base's.
void write_mixed_base(const std::string& src, const std::string& dst, const std::string& bf16_weight,
                      const std::vector<RawTensor>* extras) {
  const SafetensorsReader r(src);
  SafetensorsWriter w(dst);
  w.set_metadata(r.metadata());
  std::size_t k = 0;
  for (const TensorInfo& t : r.tensors()) {
    if (t.name == bf16_weight)
      w.add(t.name, r.matrix<double>(t.name), Dtype::BF16);
    else
      w.add_raw(t.name, t.dtype, t.shape, r.raw(t.name), t.nbytes());
    for (int j = 0; j < 2 && extras != nullptr && k < extras->size(); ++j, ++k)
      w.add_raw((*extras)[k].name, (*extras)[k].dtype, (*extras)[k].shape, (*extras)[k].bytes.data(),
                (*extras)[k].bytes.size());
  }
  for (; extras != nullptr && k < extras->size(); ++k)
    w.add_raw((*extras)[k].name, (*extras)[k].dtype, (*extras)[k].shape, (*extras)[k].bytes.data(),
              (*extras)[k].bytes.size());
  w.finish();
}

// Splits a single-file checkpoint into shards (tensor names per shard, in order) with an index
// at dir/model.safetensors.index.json; returns the index path.
std::string write_shards(const std::string& src, const std::string& dir,
                         const std::vector<std::vector<std::string>>& shards) {
  const SafetensorsReader r(src);
  nlohmann::ordered_json idx;
  idx["metadata"]["total_size"] = 0;
  for (std::size_t k = 0; k < shards.size(); ++k) {
    const std::string file =
        "model-0000" + std::to_string(k + 1) + "-of-0000" + std::to_string(shards.size()) + ".safetensors";
    SafetensorsWriter w(dir + "/" + file);
    w.set_metadata(r.metadata());
    for (const std::string& n : shards[k]) {
      const TensorInfo& t = r.info(n);
      w.add_raw(n, t.dtype, t.shape, r.raw(n), t.nbytes());
      idx["weight_map"][n] = file;
    }
    w.finish();
  }
  write_text(dir + "/model.safetensors.index.json", idx.dump(2));
  return dir + "/model.safetensors.index.json";
}

// Every tensor of `a` in `b` with the same dtype, shape and bytes.
void require_same_tensors(const SafetensorsReader& a, const SafetensorsReader& b) {
  for (const TensorInfo& t : a.tensors()) {
    INFO("tensor " << t.name << " of " << a.path() << " vs " << b.path());
    REQUIRE(b.contains(t.name));
    const TensorInfo& u = b.info(t.name);
    REQUIRE(u.dtype == t.dtype);
    REQUIRE(u.shape == t.shape);
    REQUIRE(u.nbytes() == t.nbytes());
    CHECK(std::memcmp(a.raw(t.name), b.raw(t.name), t.nbytes()) == 0);
  }
}

std::vector<std::string> names_containing(const std::string& dir, const std::string& part) {
  std::vector<std::string> out;
  for (const std::string& n : list_dir(dir))
    if (n.find(part) != std::string::npos) out.push_back(n);
  return out;
}

}  // namespace

TEST_CASE("merge copies tensors of every dtype byte for byte, with and without --dtype", "[peft][merge][dtypes]") {
  const std::string dir = kData + "/dora_f32";
  TempDir tmp;
  const std::vector<RawTensor> extras = extra_tensors();
  write_mixed_base(dir + "/base_model.safetensors", tmp / "plain.safetensors", "v_proj.weight", nullptr);
  write_mixed_base(dir + "/base_model.safetensors", tmp / "mixed.safetensors", "v_proj.weight", &extras);
  REQUIRE(SafetensorsReader(tmp / "plain.safetensors").info("v_proj.weight").dtype == Dtype::BF16);
  const std::vector<std::optional<Dtype>> dtypes = {std::nullopt, Dtype::BF16, Dtype::F32, Dtype::F64, Dtype::F16};
  for (const std::optional<Dtype>& dt : dtypes) {
    const std::string tag = dt ? dora::io::dtype_name(*dt) : "keep";
    INFO("--dtype " << tag);
    MergeOptions opt;
    opt.dtype = dt;
    const std::string plain_out = tmp / ("plain_" + tag + ".safetensors"),
                      mixed_out = tmp / ("mixed_" + tag + ".safetensors");
    dora::io::merge_checkpoint(tmp / "plain.safetensors", dir + "/adapter", plain_out, opt);
    const dora::io::MergeReport rep =
        dora::io::merge_checkpoint(tmp / "mixed.safetensors", dir + "/adapter", mixed_out, opt);
    CHECK(rep.merged.size() == 4);
    CHECK(rep.tensors_copied == 5 + extras.size());
    const SafetensorsReader mixed(mixed_out), plain(plain_out), in(tmp / "mixed.safetensors");
    REQUIRE(mixed.tensors().size() == in.tensors().size());
    // The float tensors (merged or converted) are exactly what the merge gives without the extras.
    require_same_tensors(plain, mixed);
    // Every extra keeps its dtype, shape and bytes, whatever --dtype says.
    for (const RawTensor& e : extras) {
      INFO("extra tensor " << e.name << " (" << dora::io::dtype_name(e.dtype) << ")");
      const TensorInfo& t = mixed.info(e.name);
      CHECK(t.dtype == e.dtype);
      CHECK(t.shape == e.shape);
      REQUIRE(t.nbytes() == e.bytes.size());
      CHECK(std::memcmp(mixed.raw(e.name), e.bytes.data(), e.bytes.size()) == 0);
    }
    // Float tensors take --dtype (or keep theirs); the adapted BF16 weight is merged in BF16.
    for (const TensorInfo& t : in.tensors()) {
      if (!dora::io::dtype_is_convertible(t.dtype)) continue;
      CHECK(mixed.info(t.name).dtype == (dt ? *dt : t.dtype));
    }
    const double err = rel_err(mixed.matrix<double>("v_proj.weight"),
                               SafetensorsReader(dir + "/merged_model.safetensors").matrix<double>("v_proj.weight"));
    INFO("v_proj.weight (BF16 base) merged vs PEFT's float32 merge: relative error " << err);
    CHECK(err <= 1e-2);
  }
}

TEST_CASE("sharded merge copies every dtype and counts the real output bytes in total_size",
          "[peft][merge][sharded][dtypes]") {
  const std::string dir = kData + "/dora_f32";
  TempDir tmp;
  const std::vector<RawTensor> extras = extra_tensors();
  write_mixed_base(dir + "/base_model.safetensors", tmp / "mixed.safetensors", "v_proj.weight", &extras);
  std::vector<std::vector<std::string>> shards(2);
  {
    const SafetensorsReader in(tmp / "mixed.safetensors");
    for (std::size_t k = 0; k < in.tensors().size(); ++k)
      shards[k < in.tensors().size() / 2 ? 0 : 1].push_back(in.tensors()[k].name);
  }
  const std::string index = write_shards(tmp / "mixed.safetensors", tmp.path, shards);
  std::size_t input_total = 0;
  for (const char* f : {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"})
    input_total += data_bytes_of_file(tmp / f);
  for (const std::optional<Dtype>& dt :
       {std::optional<Dtype>(), std::optional<Dtype>(Dtype::BF16), std::optional<Dtype>(Dtype::F64)}) {
    const std::string tag = dt ? dora::io::dtype_name(*dt) : "keep";
    INFO("--dtype " << tag);
    MergeOptions opt;
    opt.dtype = dt;
    const std::string out = tmp / ("out_" + tag), single = tmp / ("single_" + tag + ".safetensors");
    dora::io::merge_checkpoint(index, dir + "/adapter", out, opt);
    dora::io::merge_checkpoint(tmp / "mixed.safetensors", dir + "/adapter", single, opt);
    const SafetensorsReader s(single);
    std::size_t files_total = 0, tensors_total = 0, n_tensors = 0;
    for (std::size_t k = 0; k < 2; ++k) {
      const std::string f = out + "/model-0000" + std::to_string(k + 1) + "-of-00002.safetensors";
      const SafetensorsReader shard(f);
      REQUIRE(shard.tensors().size() == shards[k].size());
      require_same_tensors(shard, s);  // same bytes as the single-file merge, extras included
      for (const TensorInfo& t : shard.tensors()) tensors_total += t.nbytes();
      n_tensors += shard.tensors().size();
      files_total += data_bytes_of_file(f);
    }
    CHECK(n_tensors == s.tensors().size());
    const nlohmann::json oidx = read_json(out + "/model.safetensors.index.json");
    const std::size_t total_size = oidx.at("metadata").at("total_size").get<std::size_t>();
    INFO("total_size " << total_size << ", data bytes of the written shards " << files_total << ", input "
                       << input_total);
    CHECK(total_size == files_total);
    CHECK(total_size == tensors_total);
    if (!dt) CHECK(total_size == input_total);
  }
}

TEST_CASE("sharded merge to bf16: total_size is the bf16 output's bytes", "[peft][merge][sharded]") {
  const std::string dir = kData + "/dora_f32";
  TempDir tmp;
  std::vector<std::vector<std::string>> shards(2);
  const SafetensorsReader base(dir + "/base_model.safetensors");
  for (const TensorInfo& t : base.tensors()) shards[t.name.rfind("mlp.", 0) == 0 ? 0 : 1].push_back(t.name);
  const std::string index = write_shards(dir + "/base_model.safetensors", tmp.path, shards);
  MergeOptions opt;
  opt.dtype = Dtype::BF16;
  dora::io::merge_checkpoint(index, dir + "/adapter", tmp / "out", opt);
  std::size_t files_total = 0;
  for (const std::string& f : list_dir(tmp / "out")) {
    if (f == "model.safetensors.index.json") continue;
    files_total += data_bytes_of_file(tmp / "out" + "/" + f);
    const SafetensorsReader shard(tmp / "out" + "/" + f);
    for (const TensorInfo& t : shard.tensors()) CHECK(t.dtype == Dtype::BF16);
  }
  const std::size_t total_size =
      read_json(tmp / "out/model.safetensors.index.json").at("metadata").at("total_size").get<std::size_t>();
  INFO("total_size " << total_size << ", data bytes of the written shards " << files_total);
  CHECK(total_size == files_total);
  CHECK(total_size == 18048 / 2);  // the F32 base holds 18048 bytes of tensors
}

TEST_CASE("an adapted weight that is not F16/BF16/F32/F64 is refused before anything is written",
          "[peft][merge][dtypes][hostile]") {
  const std::string dir = kData + "/dora_f32";
  for (const Dtype dt : {Dtype::I8, Dtype::F8_E4M3, Dtype::U8, Dtype::I32, Dtype::F8_E5M2, Dtype::C64}) {
    const std::string dn = dora::io::dtype_name(dt);
    DYNAMIC_SECTION("q_proj.weight stored as " << dn) {
      TempDir tmp, out;
      {
        const SafetensorsReader r(dir + "/base_model.safetensors");
        SafetensorsWriter w(tmp / "base.safetensors");
        for (const TensorInfo& t : r.tensors()) {
          if (t.name == "q_proj.weight") {
            const std::vector<std::uint8_t> q(24 * 32 * dora::io::dtype_bits(dt) / 8, 3);
            w.add_raw(t.name, dt, t.shape, q.data(), q.size());
          } else {
            w.add_raw(t.name, t.dtype, t.shape, r.raw(t.name), t.nbytes());
          }
        }
        w.finish();
      }
      const std::vector<std::string> needles = {tmp / "base.safetensors", "tensor 'q_proj.weight'", "has dtype " + dn,
                                                "module 'q_proj'"};
      expect_merge_error(tmp / "base.safetensors", dir + "/adapter", out, needles);
      MergeOptions bf16;
      bf16.dtype = Dtype::BF16;
      expect_merge_error(tmp / "base.safetensors", dir + "/adapter", out, needles, bf16);
      // Sharded: refused before the output directory (or its temporary) exists.
      std::vector<std::vector<std::string>> shards(2);
      const SafetensorsReader edited(tmp / "base.safetensors");
      for (const TensorInfo& t : edited.tensors()) shards[t.name.rfind("mlp.", 0) == 0 ? 0 : 1].push_back(t.name);
      TempDir sh;
      const std::string index = write_shards(tmp / "base.safetensors", sh.path, shards);
      const std::vector<std::string> before = list_dir(sh.path);
      CHECK_THROWS_WITH(dora::io::merge_checkpoint(index, dir + "/adapter", sh / "out"),
                        Catch::Contains("tensor 'q_proj.weight'") && Catch::Contains("has dtype " + dn) &&
                            Catch::Contains("module 'q_proj'"));
      CHECK(list_dir(sh.path) == before);
    }
  }
  SECTION("an output dtype that is not F16/BF16/F32/F64") {
    for (const Dtype dt : {Dtype::I8, Dtype::F8_E4M3, Dtype::I64, Dtype::BOOL}) {
      TempDir out;
      MergeOptions opt;
      opt.dtype = dt;
      expect_merge_error(dir + "/base_model.safetensors", dir + "/adapter", out,
                         {"output dtype " + std::string(dora::io::dtype_name(dt)), "F16, BF16, F32, F64"}, opt);
    }
  }
  SECTION("an adapter tensor that is not F16/BF16/F32/F64") {
    const std::string key = "base_model.model.v_proj.lora_B.weight";
    for (const Dtype dt : {Dtype::I8, Dtype::F8_E4M3}) {
      TempDir tmp, out;
      copy_adapter(dir + "/adapter", tmp / "adapter");
      {
        const SafetensorsReader r(dir + "/adapter/adapter_model.safetensors");
        SafetensorsWriter w(tmp / "adapter/adapter_model.safetensors");
        for (const TensorInfo& t : r.tensors()) {
          if (t.name == key) {
            const std::vector<std::uint8_t> q(static_cast<std::size_t>(t.numel()), 1);
            w.add_raw(t.name, dt, t.shape, q.data(), q.size());
          } else {
            w.add_raw(t.name, t.dtype, t.shape, r.raw(t.name), t.nbytes());
          }
        }
        w.finish();
      }
      expect_merge_error(dir + "/base_model.safetensors", tmp / "adapter", out,
                         {"adapter/adapter_model.safetensors", "tensor '" + key + "'",
                          "has dtype " + std::string(dora::io::dtype_name(dt)), "module 'v_proj'"});
      CHECK_THROWS_WITH(PeftAdapter(tmp / "adapter"), Catch::Contains(key));
    }
  }
}

namespace {

// Distance in units in the last place between two doubles (0: bitwise equal up to the sign of zero).
std::int64_t ulp_distance(double a, double b) {
  if (a == b) return 0;
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<std::int64_t>::max();
  const auto order = [](double v) {
    std::int64_t i;
    std::memcpy(&i, &v, 8);
    return i < 0 ? std::numeric_limits<std::int64_t>::min() - i : i;
  };
  const std::int64_t d = order(a) - order(b);
  return d < 0 ? -d : d;
}

}  // namespace

TEST_CASE("io merge and DoraLinear::merge agree on inactive, overflowing and underflowing rows",
          "[peft][merge][inactive]") {
  // Rows: 0 ordinary; 1 m / n overflows (m = 1e300, n ~ 1e-10, B = 0): inactive; 2 zero direction
  // (W = 0, B = 0): inactive; 3 entries ~1e-200 (squares underflow to 0 in a plain sum); 4 entries
  // ~1e200 (squares overflow); 5 ordinary. F64 throughout, saved with the library's writer.
  // d_in = 2^18 makes the merge work in several blocks of stored rows (2^20 / cols values each):
  // rows 4-5 in a second block in the stored layout, two blocks of the transposed one.
  for (const Eigen::Index d_in : {Eigen::Index{5}, Eigen::Index{1} << 18}) {
    DYNAMIC_SECTION("d_in " << d_in) {
      const Eigen::Index d_out = 6, r = 2;
      MatD W = dora_test::random_matrix<double>(d_out, d_in, 101);
      MatD A = dora_test::random_matrix<double>(r, d_in, 102);
      MatD B = dora_test::random_matrix<double>(d_out, r, 103);
      W.row(1) *= 1e-10 / std::sqrt(static_cast<double>(d_in));  // n ~ 1e-10 whatever d_in
      B.row(1).setZero();
      W.row(2).setZero();
      B.row(2).setZero();
      W.row(3) *= 1e-200;
      B.row(3) *= 1e-200;
      W.row(4) *= 1e200;
      B.row(4).setZero();
      dora::AdapterConfig cfg;
      cfg.rank = r;
      cfg.alpha = 3;
      cfg.init = dora::Init::user;
      dora::DoraLinear<double> layer(dora::borrow(W), cfg, A, B);
      dora::Vector<double> m = layer.magnitude();
      m[0] = 1.25;
      m[1] = 1e300;
      m[2] = 1.5;
      m[3] = 3e-200;
      m[4] = 2e200;
      layer.set_magnitude(m);
      const dora::DoraMerge<double> want = layer.merge();
      // The layer's own verdicts, so the test is about agreement on these very rows.
      REQUIRE(want.scale[1] == 0.0);
      REQUIRE(want.scale[2] == 0.0);
      REQUIRE(want.scale[3] != 0.0);
      REQUIRE(want.scale[4] != 0.0);
      REQUIRE(std::isfinite(want.row_norm[3]));
      REQUIRE(want.row_norm[3] > 0.0);
      REQUIRE(std::isfinite(want.row_norm[4]));
      INFO("layer scales: " << want.scale.transpose() << "; row norms " << want.row_norm.transpose());

      for (const bool fan_in_fan_out : {false, true}) {
        DYNAMIC_SECTION((fan_in_fan_out ? "fan_in_fan_out (stored [d_in, d_out])" : "stored [d_out, d_in]")) {
          TempDir tmp;
          dora::io::PeftAdapterWriter writer(Dtype::F64);
          writer.add("layer", layer);
          writer.write(tmp / "adapter");
          if (fan_in_fan_out) {
            nlohmann::ordered_json c = nlohmann::ordered_json::parse(read_bytes(tmp / "adapter/adapter_config.json"));
            c["fan_in_fan_out"] = true;
            write_text(tmp / "adapter/adapter_config.json", c.dump());
          }
          {
            SafetensorsWriter base(tmp / "base.safetensors");
            base.add("layer.weight", fan_in_fan_out ? MatD(W.transpose()) : W, Dtype::F64);
            base.finish();
          }
          dora::io::merge_checkpoint(tmp / "base.safetensors", tmp / "adapter", tmp / "merged.safetensors");
          const MatD stored = SafetensorsReader(tmp / "merged.safetensors").matrix<double>("layer.weight");
          const MatD got = fan_in_fan_out ? MatD(stored.transpose()) : stored;
          REQUIRE(got.rows() == d_out);
          REQUIRE(got.cols() == d_in);
          for (Eigen::Index i = 0; i < d_out; ++i) {
            std::int64_t max_ulp = 0;
            for (Eigen::Index j = 0; j < d_in; ++j)
              max_ulp = std::max(max_ulp, ulp_distance(got(i, j), want.weight(i, j)));
            const double rel = rel_err(got.row(i), want.weight.row(i));
            INFO("row " << i << ": io merge " << got.row(i).head(3) << " ... vs DoraLinear::merge "
                        << want.weight.row(i).head(3) << " ...: max distance " << max_ulp << " ulp, relative " << rel);
            if (i == 1 || i == 2) {
              CHECK(got.row(i).isZero(0.0));
              CHECK(want.weight.row(i).isZero(0.0));
            }
            if (i == 3 || i == 4) CHECK(got.row(i).cwiseAbs().minCoeff() > 0.0);
            if (i >= 1 && i <= 4) {
              // Both take the scaled norm of the same row here: the same n, the same merged row.
              CHECK(max_ulp <= 1);
            } else {
              // Ordinary rows: n summed differently (the layer's factored expansion, the io's
              // direct sum): a few ulps at d_in = 5 and within 1e-13 relative at 2^18.
              if (d_in < 100) CHECK(max_ulp <= 8);
              CHECK(rel <= 1e-13);
            }
          }
        }
      }
    }
  }
}

namespace {

// A log stream that fails like a full disk after `lines` lines: with exceptions(badbit) set, the
// merge sees std::ios_base::failure. When it fails it records the entries of `watch_dir` whose
// names contain `watch_part`, and of the first such directory.
class FailingLogBuf : public std::streambuf {
 public:
  FailingLogBuf(int lines, std::string watch_dir, std::string watch_part)
      : lines_(lines), watch_dir_(std::move(watch_dir)), watch_part_(std::move(watch_part)) {}
  std::vector<std::string> seen_beside, seen_inside;

 protected:
  std::streamsize xsputn(const char* s, std::streamsize n) override {
    if (lines_ <= 0) {
      if (seen_beside.empty()) {
        seen_beside = names_containing(watch_dir_, watch_part_);
        if (!seen_beside.empty()) seen_inside = list_dir(watch_dir_ + "/" + seen_beside.front());
      }
      return 0;  // nothing written: the stream sets badbit
    }
    lines_ -= static_cast<int>(std::count(s, s + n, '\n'));
    return n;
  }
  int overflow(int c) override {
    const char ch = static_cast<char>(c);
    return xsputn(&ch, 1) == 1 ? c : traits_type::eof();
  }

 private:
  int lines_;
  std::string watch_dir_, watch_part_;
};

// Lowers the file size limit for the current process while alive (writes past it fail with EFBIG:
// a quota or a full disk as write(2) reports it); SIGXFSZ is ignored meanwhile.
struct FileSizeLimit {
  rlimit old{};
  void (*old_handler)(int) = nullptr;
  explicit FileSizeLimit(rlim_t bytes) {
    REQUIRE(::getrlimit(RLIMIT_FSIZE, &old) == 0);
    old_handler = std::signal(SIGXFSZ, SIG_IGN);
    rlimit lim = old;
    lim.rlim_cur = bytes;
    REQUIRE(::setrlimit(RLIMIT_FSIZE, &lim) == 0);
  }
  ~FileSizeLimit() {
    ::setrlimit(RLIMIT_FSIZE, &old);
    std::signal(SIGXFSZ, old_handler);
  }
};

}  // namespace

TEST_CASE("a sharded merge that fails after writing a shard leaves nothing behind", "[peft][merge][sharded][atomic]") {
  const std::string dir = kData + "/dora_f32";
  TempDir tmp;
  // Shard 1: the two MLP modules (small); shard 2: the rest and a 1 MiB buffer written first.
  const std::vector<std::uint8_t> big(std::size_t{1} << 20, 7);
  {
    const SafetensorsReader r(dir + "/base_model.safetensors");
    SafetensorsWriter w(tmp / "with_big.safetensors");
    w.set_metadata(r.metadata());
    for (const TensorInfo& t : r.tensors()) w.add_raw(t.name, t.dtype, t.shape, r.raw(t.name), t.nbytes());
    w.add_raw("a_big_buffer", Dtype::U8, {1 << 20}, big.data(), big.size());
    w.finish();
  }
  std::vector<std::vector<std::string>> shards(2);
  const SafetensorsReader with_big(tmp / "with_big.safetensors");
  for (const TensorInfo& t : with_big.tensors())
    if (t.name.rfind("mlp.", 0) == 0) shards[0].push_back(t.name);
  shards[1].push_back("a_big_buffer");
  for (const TensorInfo& t : with_big.tensors())
    if (t.name.rfind("mlp.", 0) != 0 && t.name != "a_big_buffer") shards[1].push_back(t.name);
  const std::string index = write_shards(tmp / "with_big.safetensors", tmp.path, shards);
  const std::vector<std::string> before = list_dir(tmp.path);
  const std::string out = tmp / "merged";

  SECTION("shard 2 cannot be written (file size limit: EFBIG)") {
    std::string msg = "<no error>";
    {
      const FileSizeLimit limit(256 << 10);  // shard 1 is ~12 KB, shard 2 over 1 MiB
      try {
        dora::io::merge_checkpoint(index, dir + "/adapter", out);
      } catch (const std::exception& e) {
        msg = e.what();
      }
    }
    INFO("error: " << msg);
    CHECK_THAT(msg, Catch::Contains("merged.tmp.") && Catch::Contains("/model-00002-of-00002.safetensors") &&
                        Catch::Contains("write failed"));
    CHECK(list_dir(tmp.path) == before);
    CHECK(names_containing(tmp.path, ".tmp.").empty());
    CHECK_FALSE(exists(out));
  }
  SECTION("the log stream fails while shard 2 is being written") {
    FailingLogBuf buf(2, tmp.path, "merged.tmp.");  // shard 1 logs its two modules
    std::ostream log(&buf);
    log.exceptions(std::ios::badbit | std::ios::failbit);
    MergeOptions opt;
    opt.log = &log;
    CHECK_THROWS_AS(dora::io::merge_checkpoint(index, dir + "/adapter", out, opt), std::ios_base::failure);
    // When it failed, shard 1 was complete in the temporary directory and shard 2 half written.
    INFO("beside the output at the failure: " << nlohmann::json(buf.seen_beside).dump()
                                              << "; in the temporary directory: "
                                              << nlohmann::json(buf.seen_inside).dump());
    REQUIRE(buf.seen_beside.size() == 1);
    REQUIRE(buf.seen_inside.size() == 2);
    CHECK(buf.seen_inside[0] == "model-00001-of-00002.safetensors");
    CHECK(buf.seen_inside[1].rfind("model-00002-of-00002.safetensors.tmp.", 0) == 0);
    CHECK(list_dir(tmp.path) == before);
    CHECK(names_containing(tmp.path, ".tmp.").empty());
    CHECK_FALSE(exists(out));
  }
}

// ---------------------------------------------------------------------------------------------
// Embedding and ConvNd modules (tests/data/layers, made by real PEFT 0.21: W, A, B, m, bias and
// PEFT's merge_and_unload result W_merged). Each case becomes an adapter directory with PEFT's key
// names and shapes plus a one-module base checkpoint, and merge_checkpoint's result is compared
// with W_merged.

namespace {

const std::string kLayers = std::string(DORA_TEST_DATA_DIR) + "/layers";

std::vector<std::string> layer_cases() {
  std::vector<std::string> names;
  for (const auto& n : read_json(kLayers + "/index.json")) names.push_back(n.get<std::string>());
  return names;
}

// Copies tensor `from` of `r` into `w` as `to`, with its bytes as stored and `shape` (default: its own).
void copy_tensor(const SafetensorsReader& r, const std::string& from, SafetensorsWriter& w, const std::string& to,
                 std::vector<std::int64_t> shape = {}) {
  const TensorInfo& t = r.info(from);
  w.add_raw(to, t.dtype, shape.empty() ? t.shape : shape, r.raw(from), t.nbytes());
}

struct LayerCase {
  std::string name;
  nlohmann::json meta;
  bool embedding = false, dora = false, f64 = false;
};

LayerCase layer_case(const std::string& name) {
  LayerCase c;
  c.name = name;
  c.meta = read_json(kLayers + "/" + name + ".json");
  c.embedding = c.meta.at("layer").get<std::string>() == "embedding";
  c.dora = c.meta.at("kind").get<std::string>() == "dora";
  c.f64 = c.meta.at("dtype").get<std::string>() == "float64";
  return c;
}

// Writes `dir`/adapter (PEFT's names: module "layer") and `dir`/base.safetensors from a layer case.
// magnitude_flat: store a conv's magnitude as [out] instead of PEFT's [1, out, 1...].
void write_layer_case(const LayerCase& c, const std::string& dir, bool magnitude_flat = false) {
  const SafetensorsReader r(kLayers + "/" + c.name + ".safetensors");
  const std::string ad = dir + "/adapter";
  REQUIRE(::mkdir(ad.c_str(), 0755) == 0);
  nlohmann::json cfg = {{"peft_type", "LORA"},
                        {"r", c.meta.at("r")},
                        {"lora_alpha", c.meta.at("alpha")},
                        {"use_dora", c.dora},
                        {"use_rslora", c.meta.at("use_rslora")},
                        {"target_modules", {"layer"}},
                        {"bias", "none"},
                        {"lora_dropout", 0.0}};
  write_text(ad + "/adapter_config.json", cfg.dump(2));
  {
    SafetensorsWriter w(ad + "/adapter_model.safetensors");
    const std::string p = "base_model.model.layer.";
    copy_tensor(r, "A", w, p + (c.embedding ? "lora_embedding_A" : "lora_A.weight"));
    copy_tensor(r, "B", w, p + (c.embedding ? "lora_embedding_B" : "lora_B.weight"));
    if (c.dora) {
      std::vector<std::int64_t> shape;
      if (magnitude_flat) shape = {r.info("m").numel()};
      copy_tensor(r, "m", w, p + "lora_magnitude_vector", shape);
    }
    w.finish();
  }
  SafetensorsWriter b(dir + "/base.safetensors");
  copy_tensor(r, "W", b, "layer.weight");
  if (r.contains("bias")) copy_tensor(r, "bias", b, "layer.bias");
  b.finish();
}

}  // namespace

TEST_CASE("Embedding and Conv1d/2d/3d adapters merge as PEFT's merge_and_unload", "[peft][merge][layers]") {
  int merged_cases = 0, refused_cases = 0, flat_cases = 0;
  const std::vector<std::string> names = layer_cases();
  for (std::size_t i = 0; i < names.size(); ++i) {
    const std::string& name = names[i];
    const LayerCase c = layer_case(name);
    const SafetensorsReader ref(kLayers + "/" + name + ".safetensors");
    // Conv magnitudes: PEFT's [1, out, 1...], and [out] for the DoRA conv cases at odd positions.
    const bool flat = !c.embedding && c.dora && i % 2 == 1;
    flat_cases += flat;
    {
      INFO("case " << name << (flat ? " (magnitude stored as [out])" : ""));
      TempDir tmp;
      write_layer_case(c, tmp.path, flat);
      const PeftAdapter adapter(tmp / "adapter");
      REQUIRE(adapter.modules().size() == 1);
      const dora::io::PeftModule& m = adapter.modules()[0];
      CHECK(m.kind == (c.embedding ? dora::io::ModuleKind::embedding : dora::io::ModuleKind::conv));
      CHECK(m.scaling == Approx(c.meta.at("scaling").get<double>()).epsilon(1e-15));
      CHECK(m.base_shape(false) == ref.info("W").shape);
      if (!ref.contains("W_merged")) {
        // Grouped convolutions: PEFT refuses to merge them (refused.json), and so do we.
        CHECK(m.groups == c.meta.at("groups").get<Eigen::Index>());
        expect_merge_error(tmp / "base.safetensors", tmp / "adapter", TempDir(),
                           {"module 'layer'", "groups = 2", "cannot be merged", "PEFT 0.21 refuses"});
        ++refused_cases;
        continue;
      }
      const std::string out = tmp / "merged.safetensors";
      const dora::io::MergeReport rep = dora::io::merge_checkpoint(tmp / "base.safetensors", tmp / "adapter", out);
      REQUIRE(rep.merged.size() == 1);
      CHECK(rep.merged[0].kind == m.kind_name());
      const SafetensorsReader ours(out);
      CHECK(ours.info("layer.weight").shape == ref.info("W_merged").shape);
      CHECK(ours.info("layer.weight").dtype == ref.info("W_merged").dtype);
      const Eigen::Index rows = ref.info("W").shape[0];
      const Eigen::Index cols = ref.info("W").numel() / rows;
      const double err =
          rel_err(ours.reshaped<double>("layer.weight", rows, cols), ref.reshaped<double>("W_merged", rows, cols));
      const double tol = c.f64 ? 1e-12 : 1e-6;
      std::cout << name << " (" << m.kind_name() << ", " << (c.dora ? "DoRA" : "LoRA") << ", "
                << (c.f64 ? "f64" : "f32") << "): merged weight vs PEFT's W_merged, relative error " << err
                << " (tolerance " << tol << ")\n";
      INFO(name << ": relative error " << err << ", tolerance " << tol);
      CHECK(err <= tol);
      if (ref.contains("bias")) {
        const TensorInfo& bt = ref.info("bias");
        CHECK(std::memcmp(ours.raw("layer.bias"), ref.raw("bias"), bt.nbytes()) == 0);
      }
      ++merged_cases;
    }
  }
  std::cout << "layer cases merged: " << merged_cases << " (" << flat_cases
            << " with a conv magnitude stored as [out]), refused (groups > 1): " << refused_cases << "\n";
  CHECK(merged_cases == 25);
  CHECK(refused_cases == 2);
  CHECK(flat_cases > 0);
}

TEST_CASE("inspect lists Embedding and Conv modules with their type", "[peft][inspect][layers]") {
  for (const char* name :
       {"embedding_dora_f64", "conv3d_dora_f64_bias", "conv2d_lora_f64_groups2", "conv1d_lora_f64_bias"}) {
    DYNAMIC_SECTION(name) {
      const LayerCase c = layer_case(name);
      TempDir tmp;
      write_layer_case(c, tmp.path);
      std::ostringstream s;
      dora::io::inspect_adapter(PeftAdapter(tmp / "adapter"), s);
      std::cout << s.str();
      const std::string expect = std::string(name) == "embedding_dora_f64"     ? "layer  [20, 12]  rank 4"
                                 : std::string(name) == "conv3d_dora_f64_bias" ? "layer  [4, 2, 3, 3, 3]  rank 2"
                                 : std::string(name) == "conv1d_lora_f64_bias" ? "layer  [6, 4, 3]  rank 4"
                                                                               : "layer  [6, 2, 3, 3]  rank 4";
      CHECK(s.str().find(expect) != std::string::npos);
      const std::string kind = std::string(name) == "embedding_dora_f64"     ? "  Embedding\n"
                               : std::string(name) == "conv3d_dora_f64_bias" ? "  Conv3d\n"
                               : std::string(name) == "conv1d_lora_f64_bias" ? "  Conv1d\n"
                                                                             : "  Conv2d (groups 2: not mergeable";
      CHECK(s.str().find(kind) != std::string::npos);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// A real checkpoint layout (tests/data/peft_layers, tools/make_llama_reference.py): a tiny random
// LlamaForCausalLM saved by transformers, a PEFT 0.21 DoRA adapter on every projection plus
// embed_tokens (Embedding) and lm_head, saved with PEFT's save_embedding_layers (the adapter carries
// both base_layer weights), and PEFT's merge_and_unload() saved by transformers.

namespace {

const std::string kLlama = std::string(DORA_TEST_DATA_DIR) + "/peft_layers";

// Compares every tensor of `ours` with PEFT's merged checkpoint `peft`: float32 within 1e-6
// relative per tensor; bfloat16 within 1 bf16 ulp per element (PEFT merges in float32, the
// adapter's dtype, and rounds once; we merge in double and round once: the two roundings can land
// on neighbouring bf16 values where the float32 result sits next to a rounding boundary).
// Unadapted tensors must be equal byte for byte.
void compare_llama(const std::vector<std::string>& ours_files, const std::string& peft_file, bool bf16,
                   const std::string& label) {
  std::vector<SafetensorsReader> ours;
  for (const std::string& f : ours_files) ours.emplace_back(f);
  const auto find = [&](const std::string& name) -> const SafetensorsReader& {
    for (const SafetensorsReader& r : ours)
      if (r.contains(name)) return r;
    FAIL("tensor " << name << " missing from the output");
    return ours[0];
  };
  const SafetensorsReader peft(peft_file);
  std::size_t total = 0;
  for (const SafetensorsReader& r : ours) total += r.tensors().size();
  CHECK(total == peft.tensors().size());
  double worst = 0.0;
  int worst_ulp = 0;
  long ulp_differ = 0;
  for (const TensorInfo& t : peft.tensors()) {
    const SafetensorsReader& o = find(t.name);
    const TensorInfo& ot = o.info(t.name);
    CHECK(ot.dtype == t.dtype);
    CHECK(ot.shape == t.shape);
    const Eigen::Index rows = t.shape.empty() ? 1 : t.shape[0];
    const Eigen::Index cols = rows == 0 ? 0 : t.numel() / rows;
    if (!bf16) {
      const double err = rel_err(o.reshaped<double>(t.name, rows, cols), peft.reshaped<double>(t.name, rows, cols));
      worst = std::max(worst, err);
      INFO(label << " " << t.name << ": relative error vs PEFT " << err << " (tolerance 1e-6)");
      CHECK(err <= 1e-6);
    } else {
      const UlpStats s = ulp_stats(o.reshaped<float>(t.name, rows, cols), peft.reshaped<float>(t.name, rows, cols));
      worst_ulp = std::max(worst_ulp, s.max);
      ulp_differ += s.over0;
      INFO(label << " " << t.name << ": bf16 ulp distance to PEFT: max " << s.max << ", " << s.over0 << " of " << s.n
                 << " elements differ (tolerance 1 ulp)");
      CHECK(s.max <= 1);
    }
  }
  if (!bf16)
    std::cout << label << ": largest relative error vs PEFT's merge_and_unload over " << peft.tensors().size()
              << " tensors: " << worst << " (tolerance 1e-6)\n";
  else
    std::cout << label << ": largest bf16 ulp distance to PEFT's merge_and_unload: " << worst_ulp << ", " << ulp_differ
              << " elements differ (tolerance 1 ulp)\n";
}

}  // namespace

TEST_CASE("a real Llama checkpoint: embed_tokens, lm_head and every projection merge as merge_and_unload",
          "[peft][merge][llama]") {
  for (const char* variant : {"f32", "bf16"}) {
    DYNAMIC_SECTION(variant) {
      const std::string dir = kLlama + "/llama_" + variant;
      const PeftAdapter adapter(dir + "/adapter");
      REQUIRE(adapter.modules().size() == 16);
      const dora::io::PeftModule& emb = adapter.module("model.embed_tokens");
      CHECK(emb.kind == dora::io::ModuleKind::embedding);
      CHECK(emb.rank == 8);  // rank_pattern {"embed_tokens": 8}
      CHECK(emb.d_out == 64);
      CHECK(emb.d_in == 128);
      CHECK_FALSE(emb.key_base_weight.empty());
      CHECK_FALSE(adapter.module("lm_head").key_base_weight.empty());
      CHECK(adapter.module("model.layers.1.self_attn.o_proj").scaling == 1.0);  // alpha_pattern {"o_proj": 4}
      TempDir tmp;
      const std::string out = tmp / "merged.safetensors";
      const dora::io::MergeReport rep =
          dora::io::merge_checkpoint(dir + "/base/model.safetensors", dir + "/adapter", out);
      CHECK(rep.merged.size() == 16);
      int embeddings = 0;
      for (const dora::io::MergedModule& m : rep.merged) embeddings += m.kind == "Embedding";
      CHECK(embeddings == 1);
      compare_llama({out}, dir + "/merged/model.safetensors", std::string(variant) == "bf16",
                    std::string("llama ") + variant);
    }
  }
}

TEST_CASE("a real Llama checkpoint, sharded by transformers, merges into the same shards", "[peft][merge][llama]") {
  const std::string dir = kLlama + "/llama_f32";
  TempDir tmp;
  const std::string out = tmp / "merged";
  const dora::io::MergeReport rep =
      dora::io::merge_checkpoint(dir + "/base_sharded/model.safetensors.index.json", dir + "/adapter", out);
  CHECK(rep.merged.size() == 16);
  std::vector<std::string> shards;
  for (const std::string& n : list_dir(out))
    if (n != "model.safetensors.index.json") shards.push_back(out + "/" + n);
  CHECK(shards.size() == 4);
  compare_llama(shards, dir + "/merged/model.safetensors", false, "llama f32 sharded");
}

TEST_CASE("the base weight saved in the adapter (save_embedding_layers) is what gets merged", "[peft][merge][llama]") {
  // PEFT's load puts base_layer.weight into the model, so the checkpoint's own embed_tokens and
  // lm_head weights do not matter: zero them, and the merge must still be PEFT's.
  const std::string dir = kLlama + "/llama_f32";
  TempDir tmp;
  rewrite(dir + "/base/model.safetensors", tmp / "base.safetensors",
          [](const std::string& n, MatD* m, std::vector<std::int64_t>*) {
            if (n == "model.embed_tokens.weight" || n == "lm_head.weight") m->setZero();
            return true;
          });
  const std::string out = tmp / "merged.safetensors";
  dora::io::merge_checkpoint(tmp / "base.safetensors", dir + "/adapter", out);
  compare_llama({out}, dir + "/merged/model.safetensors", false, "llama f32, checkpoint's embeddings zeroed");
  SECTION("a saved base weight whose shape differs from the checkpoint's is refused, naming both") {
    TempDir bad, outdir;
    rewrite(dir + "/base/model.safetensors", bad / "base.safetensors",
            [](const std::string& n, MatD* m, std::vector<std::int64_t>* shape) {
              if (n == "model.embed_tokens.weight") {
                *m = MatD::Zero(m->rows() + 2, m->cols());  // a resized vocabulary
                *shape = {m->rows(), m->cols()};
              }
              return true;
            });
    expect_merge_error(bad / "base.safetensors", dir + "/adapter", outdir,
                       {"'model.embed_tokens.weight'", "[130, 64]", "needs [128, 64]", "Embedding"});
  }
}

TEST_CASE("merge progress: one call before the first tensor, one after each, counts only grow",
          "[peft][merge][progress]") {
  for (const bool sharded : {false, true}) {
    DYNAMIC_SECTION((sharded ? "sharded" : "single file")) {
      const std::string dir = kLlama + "/llama_f32";
      const std::string base =
          sharded ? dir + "/base_sharded/model.safetensors.index.json" : dir + "/base/model.safetensors";
      std::size_t tensors = 0, bytes = 0;
      if (sharded) {
        for (const std::string& n : list_dir(dir + "/base_sharded"))
          if (n.size() > 12 && n.compare(n.size() - 12, 12, ".safetensors") == 0) {
            const SafetensorsReader r(dir + "/base_sharded/" + n);
            for (const TensorInfo& t : r.tensors()) bytes += t.nbytes();
            tensors += r.tensors().size();
          }
      } else {
        const SafetensorsReader r(base);
        for (const TensorInfo& t : r.tensors()) bytes += t.nbytes();
        tensors = r.tensors().size();
      }
      std::vector<dora::io::MergeProgress> calls;
      MergeOptions options;
      options.progress = [&calls](const dora::io::MergeProgress& p) { calls.push_back(p); };
      TempDir tmp;
      dora::io::merge_checkpoint(base, dir + "/adapter", tmp / "out", options);
      std::cout << "progress (" << (sharded ? "sharded" : "single file") << "): " << calls.size() << " calls for "
                << tensors << " tensors, " << bytes << " bytes\n";
      REQUIRE(calls.size() == tensors + 1);
      CHECK(calls.front().tensors_done == 0);
      CHECK(calls.front().bytes_done == 0);
      CHECK(calls.front().tensor.empty());
      for (std::size_t i = 0; i < calls.size(); ++i) {
        INFO("call " << i << ": " << calls[i].tensors_done << "/" << calls[i].tensors_total << " tensors, "
                     << calls[i].bytes_done << "/" << calls[i].bytes_total << " bytes");
        CHECK(calls[i].tensors_total == tensors);
        CHECK(calls[i].bytes_total == bytes);
        CHECK(calls[i].tensors_done == i);
        if (i > 0) {
          CHECK(calls[i].bytes_done > calls[i - 1].bytes_done);
          CHECK_FALSE(calls[i].tensor.empty());
        }
      }
      CHECK(calls.back().tensors_done == calls.back().tensors_total);
      CHECK(calls.back().bytes_done == calls.back().bytes_total);
    }
  }
  SECTION("an exception from the callback aborts the merge and leaves nothing") {
    TempDir outdir;
    MergeOptions options;
    int n = 0;
    options.progress = [&n](const dora::io::MergeProgress&) {
      if (++n == 5) throw std::runtime_error("stop at the 4th tensor");
    };
    expect_merge_error(kLlama + "/llama_f32/base/model.safetensors", kLlama + "/llama_f32/adapter", outdir,
                       {"stop at the 4th tensor"}, options);
  }
}

TEST_CASE("every io error is a dora::io::IoError", "[peft][errors]") {
  CHECK_THROWS_AS(PeftAdapter("/nonexistent/adapter"), dora::io::IoError);
  CHECK_THROWS_AS(SafetensorsReader("/nonexistent/x.safetensors"), dora::io::IoError);
  CHECK_THROWS_AS(PeftAdapter("/nonexistent/adapter"), dora::io::SafetensorsError);  // as before IoError existed
  static_assert(std::is_base_of<dora::io::IoError, dora::io::PeftError>::value, "PeftError is an IoError");
  static_assert(std::is_base_of<std::runtime_error, dora::io::IoError>::value, "IoError is a runtime_error");
}

TEST_CASE("inconsistent Embedding and Conv adapters are rejected naming the tensor and shapes",
          "[peft][hostile][layers]") {
  using Shape = std::vector<std::int64_t>;
  // An adapter directory holding F64 tensors of the given shapes (all ones), r = 4.
  const auto make = [](const TempDir& tmp, const std::vector<std::pair<std::string, Shape>>& tensors, bool dora) {
    const std::string ad = tmp / "adapter";
    REQUIRE(::mkdir(ad.c_str(), 0755) == 0);
    write_text(ad + "/adapter_config.json",
               std::string(R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_dora": )") +
                   (dora ? "true" : "false") + "}");
    SafetensorsWriter w(ad + "/adapter_model.safetensors");
    for (const auto& t : tensors) {
      std::int64_t n = 1;
      for (const std::int64_t d : t.second) n *= d;
      const std::vector<double> ones(static_cast<std::size_t>(n), 1.0);
      w.add_raw("base_model.model." + t.first, Dtype::F64, t.second, ones.data(), ones.size() * sizeof(double));
    }
    w.finish();
    return ad;
  };
  const auto expect = [](const std::string& adapter, const std::vector<std::string>& needles) {
    std::string msg = "<no error>";
    try {
      PeftAdapter a(adapter);
    } catch (const dora::io::PeftError& e) {
      msg = e.what();
    }
    std::cout << "refused: " << msg << "\n";
    INFO("error: " << msg);
    for (const std::string& n : needles) CHECK(msg.find(n) != std::string::npos);
  };
  TempDir tmp;
  SECTION("embedding and linear tensor names mixed") {
    expect(make(tmp, {{"emb.lora_embedding_A", {4, 20}}, {"emb.lora_B.weight", {12, 4}}}, false),
           {"base_model.model.emb.lora_B.weight", "mixes an Embedding adapter tensor"});
  }
  SECTION("embedding ranks disagree") {
    expect(make(tmp, {{"emb.lora_embedding_A", {4, 20}}, {"emb.lora_embedding_B", {12, 3}}}, false),
           {"base_model.model.emb.lora_embedding_B", "rank 3", "[12, 3]", "[4, 20]"});
  }
  SECTION("embedding lora_embedding_B missing") {
    expect(make(tmp, {{"emb.lora_embedding_A", {4, 20}}}, false), {"base_model.model.emb.lora_embedding_B", "missing"});
  }
  SECTION("conv lora_B is not a 1x1 kernel") {
    expect(make(tmp, {{"c.lora_A.weight", {4, 3, 3, 3}}, {"c.lora_B.weight", {5, 4, 3, 3}}}, false),
           {"base_model.model.c.lora_B.weight", "1x1 kernel", "[5, 4, 3, 3]"});
  }
  SECTION("conv lora_B's channels do not divide the rank") {
    expect(make(tmp, {{"c.lora_A.weight", {4, 3, 3, 3}}, {"c.lora_B.weight", {5, 3, 1, 1}}}, false),
           {"base_model.model.c.lora_B.weight", "does not divide", "rank 4"});
  }
  SECTION("conv lora_A and lora_B of different ranks") {
    expect(make(tmp, {{"c.lora_A.weight", {4, 3, 3, 3}}, {"c.lora_B.weight", {5, 4, 1}}}, false),
           {"base_model.model.c.lora_B.weight", "Conv2d", "[5, 4, 1]"});
  }
  SECTION("conv magnitude of a wrong shape") {
    expect(make(tmp,
                {{"c.lora_A.weight", {4, 3, 3, 3}},
                 {"c.lora_B.weight", {5, 4, 1, 1}},
                 {"c.lora_magnitude_vector", {1, 5, 2, 1}}},
                true),
           {"base_model.model.c.lora_magnitude_vector", "[1, 5, 2, 1]", "needs [5] or [1, 5, 1, 1]", "Conv2d"});
  }
  SECTION("lora_A of rank 6") {
    expect(make(tmp, {{"c.lora_A.weight", {4, 3, 1, 1, 1, 1}}, {"c.lora_B.weight", {5, 4, 1, 1, 1, 1}}}, false),
           {"base_model.model.c.lora_A.weight", "[4, 3, 1, 1, 1, 1]", "Conv1d/2d/3d"});
  }
  SECTION("a full copy of a base tensor (modules_to_save, or a resized embedding not adapted)") {
    expect(make(tmp, {{"q.lora_A.weight", {4, 8}}, {"q.lora_B.weight", {8, 4}}, {"model.embed_tokens.weight", {16, 8}}},
                false),
           {"base_model.model.model.embed_tokens.weight", "full copy", "not supported"});
  }
  SECTION("a saved base_layer.weight of a module without LoRA tensors") {
    expect(make(tmp, {{"q.lora_A.weight", {4, 8}}, {"q.lora_B.weight", {8, 4}}, {"emb.base_layer.weight", {16, 8}}},
                false),
           {"base_model.model.emb.base_layer.weight", "no LoRA tensors"});
  }
  SECTION("a saved base_layer.weight of the wrong shape") {
    expect(
        make(
            tmp,
            {{"emb.lora_embedding_A", {4, 20}}, {"emb.lora_embedding_B", {12, 4}}, {"emb.base_layer.weight", {12, 20}}},
            false),
        {"base_model.model.emb.base_layer.weight", "[12, 20]", "needs [20, 12]", "Embedding"});
  }
  SECTION("make_lora on an Embedding module") {
    const std::string ad = make(tmp, {{"emb.lora_embedding_A", {4, 20}}, {"emb.lora_embedding_B", {12, 4}}}, false);
    const PeftAdapter a(ad);
    const MatD W = MatD::Zero(12, 20);
    std::string msg = "<no error>";
    try {
      a.make_lora<double>("emb", dora::borrow(W));
    } catch (const dora::io::PeftError& e) {
      msg = e.what();
    }
    INFO(msg);
    CHECK(msg.find("'emb' is an Embedding adapter, not a Linear one") != std::string::npos);
  }
}

TEST_CASE("PeftAdapterWriter writes Embedding and Conv modules under PEFT's names and shapes", "[peft][save][layers]") {
  int written = 0;
  for (const std::string& name : layer_cases()) {
    const LayerCase c = layer_case(name);
    INFO("case " << name);
    const SafetensorsReader ref(kLayers + "/" + name + ".safetensors");
    const TensorInfo& at = ref.info("A");
    const TensorInfo& bt = ref.info("B");
    const Eigen::Index r = at.shape[0];
    const MatD A = ref.reshaped<double>("A", r, at.numel() / r);
    const MatD B = ref.reshaped<double>("B", bt.shape[0], bt.numel() / bt.shape[0]);
    Eigen::VectorXd m;
    if (c.dora) m = ref.reshaped<double>("m", ref.info("m").numel(), 1).col(0);
    dora::AdapterConfig cfg;
    cfg.rank = r;
    cfg.alpha = c.meta.at("alpha").get<double>();
    cfg.use_rslora = c.meta.at("use_rslora").get<bool>();
    dora::io::PeftAdapterWriter w(c.f64 ? Dtype::F64 : Dtype::F32);
    if (c.embedding) {
      w.add_embedding("layer", cfg, A, B, m);
    } else {
      const std::vector<std::int64_t> kernel(at.shape.begin() + 2, at.shape.end());
      w.add_conv("layer", cfg, at.shape[1], kernel, A, B, m, c.meta.at("groups").get<Eigen::Index>());
    }
    TempDir tmp;
    w.write(tmp / "adapter");
    // PEFT's key names and shapes, the values bit for bit (the case's own dtype).
    const SafetensorsReader saved(tmp / "adapter/adapter_model.safetensors");
    const std::string p = "base_model.model.layer.";
    const std::vector<std::pair<std::string, std::string>> keys{
        {"A", p + (c.embedding ? "lora_embedding_A" : "lora_A.weight")},
        {"B", p + (c.embedding ? "lora_embedding_B" : "lora_B.weight")},
        {"m", p + "lora_magnitude_vector"}};
    CHECK(saved.tensors().size() == (c.dora ? 3u : 2u));
    for (const auto& k : keys) {
      if (k.first == "m" && !c.dora) continue;
      REQUIRE(saved.contains(k.second));
      CHECK(saved.info(k.second).shape == ref.info(k.first).shape);
      const bool same = std::memcmp(saved.raw(k.second), ref.raw(k.first), ref.info(k.first).nbytes()) == 0;
      CHECK(same);
    }
    // Read back and, where PEFT can, merged into the case's base: PEFT's W_merged.
    const PeftAdapter back(tmp / "adapter");
    REQUIRE(back.modules().size() == 1);
    CHECK(back.modules()[0].kind_name() ==
          (c.embedding ? std::string("Embedding") : "Conv" + std::to_string(at.shape.size() - 2) + "d"));
    if (ref.contains("W_merged")) {
      SafetensorsWriter b(tmp / "base.safetensors");
      copy_tensor(ref, "W", b, "layer.weight");
      b.finish();
      dora::io::merge_checkpoint(tmp / "base.safetensors", tmp / "adapter", tmp / "merged.safetensors");
      const SafetensorsReader ours(tmp / "merged.safetensors");
      const Eigen::Index rows = ref.info("W").shape[0];
      const Eigen::Index cols = ref.info("W").numel() / rows;
      const double err =
          rel_err(ours.reshaped<double>("layer.weight", rows, cols), ref.reshaped<double>("W_merged", rows, cols));
      INFO("relative error vs W_merged " << err);
      CHECK(err <= (c.f64 ? 1e-12 : 1e-6));
    }
    ++written;
  }
  std::cout << "adapters written from the layer cases and read back: " << written << "\n";
  CHECK(written == 27);
  SECTION("inconsistent matrices are refused naming the module") {
    dora::AdapterConfig cfg;
    cfg.rank = 4;
    dora::io::PeftAdapterWriter w;
    CHECK_THROWS_WITH(w.add_embedding("emb", cfg, MatD::Ones(3, 20), MatD::Ones(12, 4)),
                      Catch::Contains("'emb'") && Catch::Contains("rank 4"));
    CHECK_THROWS_WITH(w.add_conv("c", cfg, 3, {3, 3}, MatD::Ones(4, 26), MatD::Ones(5, 4)),
                      Catch::Contains("'c'") && Catch::Contains("needs 27 columns"));
    CHECK_THROWS_WITH(w.add_conv("c", cfg, 3, {3, 3, 3, 3}, MatD::Ones(4, 243), MatD::Ones(5, 4)),
                      Catch::Contains("1, 2 or 3 sizes"));
    CHECK_THROWS_WITH(w.add_conv("c", cfg, 3, {3, 3}, MatD::Ones(4, 27), MatD::Ones(5, 4), Eigen::VectorXd::Ones(4)),
                      Catch::Contains("magnitude has 4 entries"));
  }
}

// ---------------------------------------------------------------------------------------------
// Embedding and ConvNd layers saved with PeftAdapterWriter::add(path, layer) and rebuilt with
// make_{lora,dora}_{embedding,conv}: for every case of tests/data/layers, a layer built from the
// case's A, B (and m) is written, read back, rebuilt on the same base, and must compute the same
// forward bit for bit, which must be PEFT's y (1e-12 relative in double, 1e-5 in float).
//
// With DORA_PEFT_LAYERS_OUT=DIR in the environment, each case also goes to DIR/<case>/ for
// tools/check_peft_load.py (real PEFT loads the adapter onto a torch module of the same shape and
// compares its forward with the C++ one): adapter/, base_model.safetensors (layer.weight [+ bias]),
// io.safetensors (x.layer or ids.layer, y.layer = the C++ forward, torch's shapes),
// merged_model.safetensors (dora::io::merge_checkpoint) and module.json (the torch module).
// tests/data/peft_layers/written/ holds such a run, with the check's output; the adapters written
// now must equal its adapter_model.safetensors byte for byte.

namespace {

const std::string kWritten = std::string(DORA_TEST_DATA_DIR) + "/peft_layers/written";

// What a layer case's base module is, as in tools/make_layer_reference.py.
dora::ConvGeometry case_geometry(const LayerCase& c, const SafetensorsReader& ref) {
  dora::ConvGeometry g;
  const std::vector<std::int64_t>& x = ref.info("x").shape;
  g.dims = static_cast<int>(x.size()) - 2;
  g.in_channels = c.meta.at("in_channels").get<Eigen::Index>();
  g.out_channels = c.meta.at("out_channels").get<Eigen::Index>();
  g.groups = c.meta.at("groups").get<Eigen::Index>();
  for (int a = 0; a < g.dims; ++a) {
    g.kernel[a] = c.meta.at("kernel_size")[a].get<Eigen::Index>();
    g.stride[a] = c.meta.at("stride")[a].get<Eigen::Index>();
    g.padding[a] = c.meta.at("padding")[a].get<Eigen::Index>();
    g.dilation[a] = c.meta.at("dilation")[a].get<Eigen::Index>();
    g.input[a] = x[a + 2];
  }
  return g;
}

template <typename MA, typename MB>
bool bitwise_equal(const MA& a, const MB& b) {
  return a.rows() == b.rows() && a.cols() == b.cols() &&
         std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.size()) * sizeof(*a.data())) == 0;
}

// The message of the PeftError that f throws ("<no error>" if none).
template <typename F>
std::string peft_error_of(F&& f) {
  try {
    f();
  } catch (const dora::io::PeftError& e) {
    return e.what();
  }
  return "<no error>";
}

void check_message(const std::string& msg, const std::vector<std::string>& needles) {
  std::cout << "refused: " << msg << "\n";
  INFO("error: " << msg);
  for (const std::string& n : needles) CHECK(msg.find(n) != std::string::npos);
}

// Writes `layer` as module "layer" of an adapter in `dir`/adapter, reads it back, rebuilds it with
// `build` (PeftAdapter -> layer) and checks the round trip; returns the original layer's forward.
template <typename Layer, typename Input, typename Build>
typename Layer::MatrixType round_trip(const LayerCase& c, Layer& layer, const Input& input, const std::string& dir,
                                      Build build) {
  dora::io::PeftAdapterWriter writer(c.f64 ? Dtype::F64 : Dtype::F32);
  writer.add("layer", layer);
  writer.write(dir + "/adapter");
  const PeftAdapter back(dir + "/adapter");
  REQUIRE(back.modules().size() == 1);
  CHECK(back.module("layer").scaling == Approx(c.meta.at("scaling").get<double>()).epsilon(1e-15));
  Layer rebuilt = build(back);
  CHECK(bitwise_equal(rebuilt.lora_A(), layer.lora_A()));
  CHECK(bitwise_equal(rebuilt.lora_B(), layer.lora_B()));
  CHECK(rebuilt.config().rank == layer.config().rank);
  CHECK(rebuilt.config().alpha == layer.config().alpha);
  CHECK(rebuilt.config().use_rslora == layer.config().use_rslora);
  layer.eval();
  const typename Layer::MatrixType y = layer.forward(input);
  const typename Layer::MatrixType y_back = rebuilt.forward(input);
  const bool same = bitwise_equal(y_back, y);
  std::cout << c.name << ": rebuilt layer's forward bit for bit equal to the original's: " << (same ? "yes" : "NO")
            << "\n";
  CHECK(same);
  // The adapter written now is the committed one byte for byte (tests/data/peft_layers/written).
  const std::string committed = kWritten + "/" + c.name + "/adapter/adapter_model.safetensors";
  if (exists(committed)) {
    const bool same_file = read_bytes(committed) == read_bytes(dir + "/adapter/adapter_model.safetensors");
    INFO("committed adapter " << committed);
    CHECK(same_file);
  }
  return y;
}

// DIR/<case>/ for tools/check_peft_load.py (see the comment above).
template <typename Scalar>
void export_case(const LayerCase& c, const SafetensorsReader& ref, const std::string& from,
                 const dora::Matrix<Scalar>& y, const std::string& out_root) {
  const std::string out = out_root + "/" + c.name;
  remove_tree(out);
  REQUIRE(::mkdir(out.c_str(), 0755) == 0);
  REQUIRE(::mkdir((out + "/adapter").c_str(), 0755) == 0);
  for (const char* f : {"adapter_config.json", "adapter_model.safetensors"})
    write_bytes(out + "/adapter/" + f, read_bytes(from + "/adapter/" + f));
  {
    SafetensorsWriter b(out + "/base_model.safetensors");
    copy_tensor(ref, "W", b, "layer.weight");
    if (ref.contains("bias")) copy_tensor(ref, "bias", b, "layer.bias");
    b.finish();
  }
  {
    SafetensorsWriter io(out + "/io.safetensors");
    if (c.embedding)
      copy_tensor(ref, "ids", io, "ids.layer");
    else
      copy_tensor(ref, "x", io, "x.layer");
    io.add_raw("y.layer", c.f64 ? Dtype::F64 : Dtype::F32, ref.info("y").shape, y.data(),
               static_cast<std::size_t>(y.size()) * sizeof(Scalar));
    io.finish();
  }
  // PEFT cannot merge grouped convolutions, and merge_checkpoint refuses them too.
  if (c.embedding || c.meta.at("groups").get<Eigen::Index>() == 1)
    dora::io::merge_checkpoint(out + "/base_model.safetensors", out + "/adapter", out + "/merged_model.safetensors");
  nlohmann::json mod = {{"path", "layer"}, {"dtype", c.f64 ? "float64" : "float32"}};
  if (c.embedding) {
    mod["type"] = "Embedding";
    mod["num_embeddings"] = ref.info("W").shape[0];
    mod["embedding_dim"] = ref.info("W").shape[1];
    mod["padding_idx"] = c.meta.at("padding_idx");
  } else {
    mod["type"] = "Conv" + std::to_string(ref.info("x").shape.size() - 2) + "d";
    for (const char* k :
         {"in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "bias"})
      mod[k] = c.meta.at(k);
  }
  write_text(out + "/module.json", mod.dump(2) + "\n");
}

template <typename Scalar>
void layer_round_trip(const LayerCase& c, double tol) {
  using M = dora::Matrix<Scalar>;
  const SafetensorsReader ref(kLayers + "/" + c.name + ".safetensors");
  const M W = rows_first<Scalar>(ref, "W"), A = rows_first<Scalar>(ref, "A"), B = rows_first<Scalar>(ref, "B");
  dora::Vector<Scalar> m;
  if (c.dora) m = ref.reshaped<Scalar>("m", ref.info("m").numel(), 1).col(0);
  dora::AdapterConfig cfg;
  cfg.rank = A.rows();
  cfg.alpha = c.meta.at("alpha").get<double>();
  cfg.use_rslora = c.meta.at("use_rslora").get<bool>();
  TempDir tmp;
  M y;
  if (c.embedding) {
    const dora::TokenIds ids = Eigen::Map<const dora::TokenIds>(reinterpret_cast<const std::int64_t*>(ref.raw("ids")),
                                                                ref.info("ids").numel());
    const Eigen::Index pad = c.meta.at("padding_idx").is_null() ? dora::EmbeddingBase<Scalar>::no_padding
                                                                : c.meta.at("padding_idx").get<Eigen::Index>();
    const dora::EmbeddingBase<Scalar> base = dora::borrow_embedding(W, pad);
    if (c.dora) {
      dora::DoraEmbedding<Scalar> layer(base, cfg, A, B);
      layer.set_magnitude(m);
      y = round_trip(c, layer, ids, tmp.path, [&](const PeftAdapter& a) {
        dora::DoraEmbedding<Scalar> l = a.make_dora_embedding<Scalar>("layer", base);
        CHECK(bitwise_equal(l.magnitude(), layer.magnitude()));
        return l;
      });
    } else {
      dora::LoraEmbedding<Scalar> layer(base, cfg, A, B);
      y = round_trip(c, layer, ids, tmp.path,
                     [&](const PeftAdapter& a) { return a.make_lora_embedding<Scalar>("layer", base); });
    }
  } else {
    const dora::ConvGeometry g = case_geometry(c, ref);
    const M x = rows_first<Scalar>(ref, "x");
    const dora::Vector<Scalar> bias =
        ref.contains("bias") ? dora::Vector<Scalar>(ref.reshaped<Scalar>("bias", ref.info("bias").numel(), 1).col(0))
                             : dora::Vector<Scalar>();
    const dora::ConvBase<Scalar> base = bias.size() > 0 ? dora::borrow_conv(W, bias, g) : dora::borrow_conv(W, g);
    if (c.dora) {
      dora::DoraConv<Scalar> layer(base, cfg, A, B);
      layer.set_magnitude(m);
      y = round_trip(c, layer, x, tmp.path, [&](const PeftAdapter& a) {
        dora::DoraConv<Scalar> l = a.make_dora_conv<Scalar>("layer", base);
        CHECK(bitwise_equal(l.magnitude(), layer.magnitude()));
        return l;
      });
    } else {
      dora::LoraConv<Scalar> layer(base, cfg, A, B);
      y = round_trip(c, layer, x, tmp.path,
                     [&](const PeftAdapter& a) { return a.make_lora_conv<Scalar>("layer", base); });
    }
  }
  const M y_peft = rows_first<Scalar>(ref, "y");
  REQUIRE(y.rows() == y_peft.rows());
  REQUIRE(y.cols() == y_peft.cols());
  const double err = rel_err(y, y_peft);
  std::printf(
      "%-40s forward of the layer rebuilt from the written adapter vs PEFT's y: relative error %.2e "
      "(tolerance %.0e)\n",
      c.name.c_str(), err, tol);
  INFO(c.name << ": relative error vs PEFT's y " << err << ", tolerance " << tol);
  CHECK(err <= tol);
  if (const char* out = std::getenv("DORA_PEFT_LAYERS_OUT")) export_case<Scalar>(c, ref, tmp.path, y, out);
}

}  // namespace

TEST_CASE("Embedding and Conv layers written with PeftAdapterWriter::add reload bit for bit and match PEFT",
          "[peft][save][layers]") {
  int round_trips = 0, grouped = 0;
  for (const std::string& name : layer_cases()) {
    const LayerCase c = layer_case(name);
    INFO("case " << name);
    if (!c.embedding && c.meta.at("groups").get<Eigen::Index>() != 1) {
      // The builders check the base's groups against the adapter's (r / lora_B.shape[1]).
      const SafetensorsReader ref(kLayers + "/" + name + ".safetensors");
      const TensorInfo& at = ref.info("A");
      const MatD A = rows_first<double>(ref, "A"), B = rows_first<double>(ref, "B");
      Eigen::VectorXd m;
      if (c.dora) m = ref.reshaped<double>("m", ref.info("m").numel(), 1).col(0);
      dora::AdapterConfig cfg;
      cfg.rank = A.rows();
      cfg.alpha = c.meta.at("alpha").get<double>();
      dora::io::PeftAdapterWriter w(Dtype::F64);
      const Eigen::Index groups = c.meta.at("groups").get<Eigen::Index>();
      w.add_conv("layer", cfg, at.shape[1], std::vector<std::int64_t>(at.shape.begin() + 2, at.shape.end()), A, B, m,
                 groups);
      TempDir tmp;
      w.write(tmp / "adapter");
      const PeftAdapter a(tmp / "adapter");
      dora::ConvGeometry g = case_geometry(c, ref);
      g.groups = 1;
      const MatD W = MatD::Zero(g.out_channels, g.weight_cols());
      const dora::ConvBase<double> base = dora::borrow_conv(W, g);
      const std::string msg = peft_error_of([&] {
        if (c.dora)
          a.make_dora_conv<double>("layer", base);
        else
          a.make_lora_conv<double>("layer", base);
      });
      check_message(msg, {"module 'layer'", "Conv2d adapter with groups 2", "base convolution has groups 1"});
      ++grouped;
    }
    if (c.f64)
      layer_round_trip<double>(c, 1e-12);
    else
      layer_round_trip<float>(c, 1e-5);
    ++round_trips;
  }
  std::cout << "layers written, reloaded and matched with PEFT: " << round_trips
            << ", of them grouped convolutions: " << grouped << "\n";
  CHECK(round_trips == 27);
  CHECK(grouped == 2);
}

TEST_CASE("the Embedding and Conv builders refuse a base of another shape or a module of another kind",
          "[peft][layers][hostile]") {
  // An embedding module (V = 20, dim 12, DoRA) and a Conv2d one (out 5, in 3, kernel 3x3, LoRA).
  TempDir tmp;
  dora::AdapterConfig cfg;
  cfg.rank = 4;
  cfg.alpha = 8;
  const MatD We = dora_test::random_matrix<double>(20, 12, 1);
  const MatD Ae = dora_test::random_matrix<double>(4, 20, 2), Be = dora_test::random_matrix<double>(12, 4, 3);
  {
    dora::io::PeftAdapterWriter w(Dtype::F64);
    w.add("emb", dora::DoraEmbedding<double>(dora::borrow_embedding(We), cfg, Ae, Be));
    w.write(tmp / "dora");
  }
  dora::ConvGeometry g;
  g.dims = 2;
  g.in_channels = 3;
  g.out_channels = 5;
  g.kernel = {3, 3, 1};
  g.input = {6, 7, 1};
  const MatD Wc = dora_test::random_matrix<double>(5, 27, 4);
  const MatD Ac = dora_test::random_matrix<double>(4, 27, 5), Bc = dora_test::random_matrix<double>(5, 4, 6);
  {
    dora::io::PeftAdapterWriter w(Dtype::F64);
    w.add("conv", dora::LoraConv<double>(dora::borrow_conv(Wc, g), cfg, Ac, Bc));
    w.write(tmp / "lora");
  }
  const PeftAdapter dora_ad(tmp / "dora"), lora_ad(tmp / "lora");
  CHECK(dora_ad.module("emb").kind_name() == "Embedding");
  CHECK(lora_ad.module("conv").kind_name() == "Conv2d");
  CHECK(lora_ad.tensors().info("base_model.model.conv.lora_A.weight").shape == std::vector<std::int64_t>{4, 3, 3, 3});

  SECTION("an embedding table of another vocabulary or width") {
    const MatD V21 = MatD::Zero(21, 12), E11 = MatD::Zero(20, 11);
    check_message(peft_error_of([&] { dora_ad.make_dora_embedding<double>("emb", dora::borrow_embedding(V21)); }),
                  {"'emb.weight'", "[21, 12]", "needs [20, 12]", "[num_embeddings, embedding_dim]",
                   "Embedding module 'emb'", "[4, 20]", "[12, 4]"});
    check_message(peft_error_of([&] { dora_ad.make_dora_embedding<double>("emb", dora::borrow_embedding(E11)); }),
                  {"[20, 11]", "needs [20, 12]"});
    // The same table transposed (a Linear layer's [d_out, d_in] view of it) is refused too.
    const MatD T = MatD::Zero(12, 20);
    check_message(peft_error_of([&] { dora_ad.make_dora_embedding<double>("emb", dora::borrow_embedding(T)); }),
                  {"[12, 20]", "needs [20, 12]"});
  }
  SECTION("a convolution of another kernel, channel count or dimension") {
    dora::ConvGeometry k32 = g;
    k32.kernel = {3, 2, 1};
    const MatD W32 = MatD::Zero(5, 18);
    check_message(peft_error_of([&] { lora_ad.make_lora_conv<double>("conv", dora::borrow_conv(W32, k32)); }),
                  {"'conv.weight'", "[5, 3, 3, 2]", "needs [5, 3, 3, 3]", "Conv2d module 'conv'", "[4, 3, 3, 3]",
                   "[5, 4, 1, 1]"});
    dora::ConvGeometry out6 = g;
    out6.out_channels = 6;
    const MatD W6 = MatD::Zero(6, 27);
    check_message(peft_error_of([&] { lora_ad.make_lora_conv<double>("conv", dora::borrow_conv(W6, out6)); }),
                  {"[6, 3, 3, 3]", "needs [5, 3, 3, 3]"});
    dora::ConvGeometry in4 = g;
    in4.in_channels = 4;
    const MatD W4 = MatD::Zero(5, 36);
    check_message(peft_error_of([&] { lora_ad.make_lora_conv<double>("conv", dora::borrow_conv(W4, in4)); }),
                  {"[5, 4, 3, 3]", "needs [5, 3, 3, 3]"});
    // Conv3d with kernel (3, 3, 1): the same element count, another rank.
    dora::ConvGeometry d3 = g;
    d3.dims = 3;
    check_message(peft_error_of([&] { lora_ad.make_lora_conv<double>("conv", dora::borrow_conv(Wc, d3)); }),
                  {"[5, 3, 3, 3, 1]", "needs [5, 3, 3, 3]"});
  }
  SECTION("a module of another kind, or LoRA for DoRA") {
    const dora::ConvBase<double> cb = dora::borrow_conv(Wc, g);
    const dora::EmbeddingBase<double> eb = dora::borrow_embedding(We);
    check_message(peft_error_of([&] { dora_ad.make_dora_conv<double>("emb", cb); }),
                  {"'emb' is an Embedding adapter, not a Conv one", "make_dora_conv()", "use make_dora_embedding()"});
    check_message(peft_error_of([&] { lora_ad.make_lora_embedding<double>("conv", eb); }),
                  {"'conv' is a Conv2d adapter, not an Embedding one", "use make_lora_conv()"});
    check_message(peft_error_of([&] { dora_ad.make_lora_embedding<double>("emb", eb); }),
                  {"'emb' is DoRA", "use make_dora_embedding()"});
    check_message(peft_error_of([&] { lora_ad.make_dora_conv<double>("conv", cb); }),
                  {"'conv' is LoRA (no magnitude)", "use make_lora_conv()"});
    check_message(peft_error_of([&] { lora_ad.make_lora<double>("conv", dora::borrow(Wc)); }),
                  {"'conv' is a Conv2d adapter, not a Linear one", "use make_lora_conv()"});
    check_message(peft_error_of([&] { dora_ad.make_dora_embedding<double>("nope", eb); }),
                  {"no adapted module 'nope'"});
  }
  SECTION("the builders' layers are the written ones") {
    const dora::DoraEmbedding<double> e = dora_ad.make_dora_embedding<double>("emb", dora::borrow_embedding(We));
    CHECK(bitwise_equal(e.lora_A(), Ae));
    CHECK(bitwise_equal(e.lora_B(), Be));
    const dora::LoraConv<double> l = lora_ad.make_lora_conv<double>("conv", dora::borrow_conv(Wc, g));
    CHECK(bitwise_equal(l.lora_A(), Ac));
    CHECK(bitwise_equal(l.lora_B(), Bc));
  }
}
