// shimlet-node-metrics [--config HOOK_CONFIG] [--output FILE]: prints the
// node's metrics, or writes them atomically to FILE (node_exporter's textfile
// collector reads whole files only); hook/metrics.h.
#include <CLI/CLI.hpp>
#include <cstdio>

#include "common/file.h"
#include "common/log.h"
#include "common/version.h"
#include "hook/metrics.h"

int main(int argc, char** argv) {
  using namespace shimlet;
  log::set_component("node-metrics");
  std::string config, output;
  CLI::App app{"shimlet-node-metrics: this node's shimlet metrics in the Prometheus text format",
               "shimlet-node-metrics"};
  app.set_version_flag("--version", "shimlet-node-metrics " SHIMLET_VERSION, "Print the version and exit");
  app.add_option("--config", config, "The hook's configuration (its state_dir; default /run/shimlet)")
      ->type_name("FILE");
  app.add_option("--output", output, "Write the metrics to FILE atomically (0644) instead of stdout")
      ->type_name("FILE");
  CLI11_PARSE(app, argc, argv);
  try {
    hook::Config cfg = config.empty() ? hook::parse_config("{}", "/") : hook::load_config(config, "/");
    std::string text = hook::node_metrics(cfg);
    if (output.empty()) {
      fputs(text.c_str(), stdout);
      return fflush(stdout) == 0 ? 0 : 1;
    }
    write_file_atomic(output, text, 0644);
    return 0;
  } catch (const std::exception& e) {
    log::error("shimlet-node-metrics failed", {{"error", e.what()}});
    return 1;
  }
}
