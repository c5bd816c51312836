// dora-merge: merge a HuggingFace PEFT LoRA / DoRA adapter into a safetensors checkpoint.
//
//   dora-merge --base model.safetensors --adapter ADAPTER_DIR [--adapter ADAPTER_DIR2 ...] --out merged.safetensors
//              [--dtype f32|bf16|f16|f64]
//   dora-merge --base model.safetensors.index.json --adapter ADAPTER_DIR --out OUT_DIR [--dtype ...]
//   dora-merge --inspect ADAPTER_DIR
//
// A thin wrapper over dora::io::merge_checkpoint / inspect_adapter (include/dora/io/merge.hpp and
// peft_reader.hpp), where the merge rule, streaming and atomic output are documented. When stderr
// is a terminal (and without --quiet) a one-line progress display (tensors, bytes, MB/s) is kept
// on it during the merge and cleared at the end; when it is not (a pipe, a file, CI logs), nothing
// of it is written. The command line is parsed by
// CLI11. Exit status: 0 on success, 1 on an error during the merge or inspection (message on
// stderr, no output written), 2 on bad usage (unknown argument, missing or bad value, an option
// other than --adapter given twice, --inspect with a merge option, a missing --base/--adapter/--out).
// Several --adapter options merge the adapters in the order given (PEFT 0.21's
// merge_and_unload(adapter_names=[...])).
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <dora/io/io.hpp>
#include <exception>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <streambuf>
#include <string>
#include <vector>

namespace {

const char* const kSynopsis =
    "usage: dora-merge --base BASE --adapter ADAPTER_DIR [--adapter ADAPTER_DIR ...] --out OUT [--dtype DTYPE]\n"
    "                  [--quiet]\n"
    "       dora-merge --inspect ADAPTER_DIR\n";

const char* const kDescription =
    "Merges every module of a PEFT LoRA/DoRA adapter (adapter_config.json + adapter_model.safetensors)\n"
    "into <module>.weight of the base checkpoint and copies every other tensor unchanged.\n"
    "DoRA: W' = diag(m / ||W + s B A||_rows) (W + s B A); LoRA: W' = W + s B A; computed in double\n"
    "and rounded once to the output dtype. Several --adapter options merge the adapters in turn, in that\n"
    "order (PEFT's merge_and_unload(adapter_names=[...]): each DoRA norm from the base weight); PEFT saves\n"
    "adapters other than \"default\" in sub-folders named after them: pass DIR/<name>.\n";

const char* const kFooter =
    "The output is written atomically: on any error nothing is left behind.\n"
    "Each option other than --adapter may be given at most once.\n"
    "Exit status: 0 success, 1 error during the merge or inspection (message on stderr), 2 bad usage.\n";

// The names --dtype accepts.
const std::map<std::string, dora::io::Dtype>& dtype_names() {
  static const std::map<std::string, dora::io::Dtype> names{
      {"f32", dora::io::Dtype::F32},   {"F32", dora::io::Dtype::F32},   {"float32", dora::io::Dtype::F32},
      {"bf16", dora::io::Dtype::BF16}, {"BF16", dora::io::Dtype::BF16}, {"bfloat16", dora::io::Dtype::BF16},
      {"f16", dora::io::Dtype::F16},   {"F16", dora::io::Dtype::F16},   {"float16", dora::io::Dtype::F16},
      {"f64", dora::io::Dtype::F64},   {"F64", dora::io::Dtype::F64},   {"float64", dora::io::Dtype::F64}};
  return names;
}

// Word-wraps `text` to lines of at most `width` characters (a longer word gets a line of its own).
std::string wrap(const std::string& text, std::size_t width) {
  std::string out, line, word;
  std::istringstream words(text);
  while (words >> word) {
    if (!line.empty() && line.size() + 1 + word.size() > width) {
      out += line + "\n";
      line.clear();
    }
    line += (line.empty() ? "" : " ") + word;
  }
  return out + line;
}

// CLI11's help with our own synopsis (the two forms of the command) in place of its one-line
// usage, option descriptions wrapped, and no "Excludes:" lists (--inspect's description says it).
class HelpFormatter : public CLI::Formatter {
 public:
  std::string make_description(const CLI::App* /*app*/) const override { return ""; }
  std::string make_usage(const CLI::App* /*app*/, std::string /*name*/) const override {
    return std::string(kSynopsis) + "\n" + kDescription;
  }
  std::string make_option_opts(const CLI::Option* opt) const override {
    return opt->get_type_size() != 0 ? " " + opt->get_type_name() : "";
  }
  std::string make_option_desc(const CLI::Option* opt) const override { return wrap(opt->get_description(), 72); }
};

// The progress line on a terminal's stderr: "tensors done/total, MB done/total, MB/s", redrawn in
// place (\r) at most 5 times a second (a merge of many small tensors would otherwise spend its
// time writing to the terminal), and erased when the merge ends or fails, so that the report or
// the error message starts on a clean line.
class ProgressLine {
 public:
  void update(const dora::io::MergeProgress& p) {
    const Clock::time_point now = Clock::now();
    if (p.tensors_done == 0) start_ = now;
    const bool last = p.tensors_done == p.tensors_total;
    // The first call draws at once (a slow first tensor still shows that work started); later ones
    // at most every 200 ms, also after a report line erased the display; the last one is not
    // drawn (it is erased at once).
    if (last || (drawn_once_ && now - drawn_ < std::chrono::milliseconds(200))) return;
    drawn_ = now;
    drawn_once_ = true;
    const double mb = 1e-6;
    const double secs = std::chrono::duration<double>(now - start_).count();
    char line[160];
    std::snprintf(line, sizeof line, "\r\033[2Kdora-merge: %zu/%zu tensors, %.1f/%.1f MB, %.1f MB/s", p.tensors_done,
                  p.tensors_total, static_cast<double>(p.bytes_done) * mb, static_cast<double>(p.bytes_total) * mb,
                  secs > 0 ? static_cast<double>(p.bytes_done) * mb / secs : 0.0);
    std::fputs(line, stderr);
    std::fflush(stderr);
    shown_ = true;
  }
  // Erases the line (the cursor goes back to its start).
  void clear() {
    if (!shown_) return;
    std::fputs("\r\033[2K", stderr);
    std::fflush(stderr);
    shown_ = false;
  }
  bool shown() const { return shown_; }

 private:
  using Clock = std::chrono::steady_clock;
  Clock::time_point start_ = Clock::now(), drawn_;
  bool shown_ = false, drawn_once_ = false;
};

// stdout for the per-module report lines, erasing the progress line first: when stdout and stderr
// are the same terminal, a report line would otherwise be written after the progress text.
class ReportBuf : public std::streambuf {
 public:
  ReportBuf(std::streambuf* out, ProgressLine* progress) : out_(out), progress_(progress) {}

 protected:
  int overflow(int c) override {
    if (c == traits_type::eof()) return traits_type::not_eof(c);
    before_write();
    const int r = out_->sputc(static_cast<char>(c));
    after_write();
    return r;
  }
  std::streamsize xsputn(const char* s, std::streamsize n) override {
    before_write();
    const std::streamsize r = out_->sputn(s, n);
    after_write();
    return r;
  }
  int sync() override { return out_->pubsync(); }

 private:
  void before_write() {
    if (progress_ != nullptr && progress_->shown()) progress_->clear();
  }
  // With a progress display, stdout is flushed at once, so that its text reaches the terminal
  // before the next progress line does (std::cout's buffer would otherwise hold it back).
  void after_write() {
    if (progress_ != nullptr) out_->pubsync();
  }
  std::streambuf* out_;
  ProgressLine* progress_;
};

int usage_error(const std::string& what) {
  std::cerr << "dora-merge: " << what << "\n" << kSynopsis << "Run 'dora-merge --help' for more information.\n";
  return 2;
}

struct Args {
  std::string base, out, inspect;
  std::vector<std::string> adapters;
  std::optional<dora::io::Dtype> dtype;
  bool quiet = false;
};

// Parses the command line into `args`. Returns the exit status when the program is to stop here
// (0 after --help, 2 on bad usage), nothing when there is work to do.
std::optional<int> parse(int argc, char** argv, Args& args) {
  CLI::App app{"", "dora-merge"};
  app.formatter(std::make_shared<HelpFormatter>());
  app.get_formatter()->column_width(26);
  app.footer(kFooter);

  // Paths: CLI11 takes the word after an option as its value even when it looks like an option
  // (--out --quiet), so such a value is refused as a missing one.
  const auto path_value = [](const std::string& s) {
    if (s.empty()) return std::string("must not be empty");
    if (s[0] == '-')
      return "needs a value; got '" + s + "', which looks like an option (write a path that starts with '-' as ./" + s +
             ")";
    return std::string();
  };
  std::string dtype_text;
  CLI::Option* base = app.add_option("--base", args.base,
                                     "base checkpoint: a .safetensors file (OUT is then a file), or the "
                                     "model.safetensors.index.json of a sharded checkpoint (OUT is then a new or "
                                     "empty directory that receives the same shards and index)")
                          ->type_name("BASE")
                          ->check(path_value);
  CLI::Option* adapter = app.add_option("--adapter", args.adapters,
                                        "PEFT adapter directory (adapter_config.json + adapter_model.safetensors); "
                                        "give it several times to merge several adapters in that order")
                             ->type_name("ADAPTER_DIR")
                             ->check(path_value);
  CLI::Option* out = app.add_option("--out", args.out, "output file, or directory for a sharded BASE")
                         ->type_name("OUT")
                         ->check(path_value);
  CLI::Option* dtype =
      app.add_option("--dtype", dtype_text,
                     "convert the floating-point tensors of the output to DTYPE: f32, bf16, f16 or f64 (also "
                     "F32, float32, ...), rounding to nearest even; default: each tensor keeps its own dtype")
          ->type_name("DTYPE")
          ->check([](const std::string& s) {
            return dtype_names().count(s) != 0 ? std::string()
                                               : "must be f32, bf16, f16 or f64 (or F32, float32, BF16, bfloat16, "
                                                 "F16, float16, F64, float64), got '" +
                                                     s + "'";
          });
  CLI::Option* quiet = app.add_flag("--quiet", args.quiet,
                                    "print nothing on success: no report and no progress display (errors still go "
                                    "to stderr)");
  CLI::Option* inspect =
      app.add_option("--inspect", args.inspect,
                     "list the modules of the adapter in ADAPTER_DIR (path, shape, rank, alpha, scaling, DoRA or "
                     "LoRA, dtype) and exit; takes no other option")
          ->type_name("ADAPTER_DIR")
          ->check(path_value);
  const std::vector<CLI::Option*> merge_options{base, adapter, out, dtype, quiet};
  for (CLI::Option* o : merge_options) inspect->excludes(o);

  // A repeated option other than --adapter is a usage error. CLI11 would reject it with a message
  // about argument counts; it takes each occurrence here and the count is checked below, with a
  // message naming the option. --adapter collects every occurrence, in order.
  std::vector<CLI::Option*> all{base, out, dtype, quiet, inspect};
  for (CLI::Option* o : all) o->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    std::cout << app.help();
    return 0;
  } catch (const CLI::ParseError& e) {
    return usage_error(e.what());
  }

  for (const CLI::Option* o : all)
    if (o->count() > 1)
      return usage_error(o->get_name() + " given " + std::to_string(o->count()) + " times; give it once");

  if (inspect->count() != 0) return std::nullopt;
  std::string missing;
  for (const CLI::Option* o : {base, adapter, out})
    if (o->count() == 0) missing += (missing.empty() ? "" : ", ") + o->get_name();
  if (!missing.empty()) return usage_error("--base, --adapter and --out are required (missing: " + missing + ")");
  if (dtype->count() != 0) args.dtype = dtype_names().at(dtype_text);
  return std::nullopt;
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  if (const std::optional<int> status = parse(argc, argv, args)) return *status;
  try {
    if (!args.inspect.empty()) {
      dora::io::inspect_adapter(dora::io::PeftAdapter(args.inspect), std::cout);
      return 0;
    }
    dora::io::MergeOptions options;
    options.dtype = args.dtype;
    // Progress only for a person watching: stderr a terminal and no --quiet.
    const bool show_progress = !args.quiet && ::isatty(STDERR_FILENO) == 1;
    ProgressLine progress;
    // Report lines erase the display first only where they would land on it: stdout a terminal too.
    ReportBuf report_buf(std::cout.rdbuf(), show_progress && ::isatty(STDOUT_FILENO) == 1 ? &progress : nullptr);
    std::ostream report(&report_buf);
    if (!args.quiet) options.log = &report;
    if (show_progress) options.progress = [&progress](const dora::io::MergeProgress& p) { progress.update(p); };
    dora::io::MergeReport r;
    try {
      r = dora::io::merge_checkpoint(args.base, args.adapters, args.out, options);
    } catch (...) {
      progress.clear();
      throw;
    }
    progress.clear();
    report.flush();
    if (!args.quiet) {
      std::cout << "merged " << r.merged.size() << " modules, copied " << r.tensors_copied << " tensors; wrote";
      for (const std::string& f : r.files_written) std::cout << " " << f;
      std::cout << "\n";
    }
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "dora-merge: error: " << e.what() << "\n";
    return 1;
  }
}
