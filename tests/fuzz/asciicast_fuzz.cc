// The asciicast reader in both modes (the master's strict ingest of uploaded
// recordings and the player's lenient one), fed in two pieces split at an
// input-chosen point, and the byte mapping's round trip on the same bytes.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "recording/asciicast.h"

using namespace shimlet::recording;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  size_t cut = size ? data[0] % (size + 1) : 0;
  for (bool strict : {true, false}) {
    Reader r(Reader::Limits{64 * 1024, strict});
    Summary sum;
    auto on = [&](Event&& e) {
      sum.add(e);
      uint16_t c, w;
      if (e.code == "r") parse_size(e.data, c, w);
    };
    if (r.feed(in.substr(0, cut), on) && r.feed(in.substr(cut), on)) r.finish(on);
    if (r.error().empty() && r.consumed() > size) abort();
    (void)sum.complete();
  }
  // Any bytes survive the mapping exactly.
  std::string lit;
  append_json_bytes(lit, in);
  auto j = nlohmann::json::parse(lit, nullptr, false);
  if (j.is_discarded() || !j.is_string() || text_to_bytes(j.get<std::string>()) != in) abort();
  (void)unfinished_utf8_suffix(in);
  return 0;
}
