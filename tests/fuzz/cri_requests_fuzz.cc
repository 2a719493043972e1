// Fuzzes what shimlet-cri decides from untrusted input (cri/requests.h): the
// kubelet's Exec / ExecSync / PortForward request bytes (protobuf's decoder,
// then our plans and URLs) and registration files (container annotations come
// from pod specs) with the pod-sandbox mapping. First byte: which; the rest:
// the input. Only shimlet::Error may escape; invariants trap.
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>

#include "common/error.h"
#include "cri/requests.h"

namespace {

void check_url(const std::string& url) {
  // Tickets are base64url + '.', endpoints come from registrations: the URL
  // must never carry a byte that would split or re-route the request.
  for (unsigned char c : url)
    if (c <= ' ' || c == 0x7f || c == '#') __builtin_trap();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string in(reinterpret_cast<const char*>(data) + 1, size - 1);
  using namespace shimlet;
  try {
    switch (data[0] % 4) {
      case 0: {
        runtime::v1::ExecRequest r;
        if (!r.ParseFromString(in)) break;
        if (auto p = cri::plan_exec(r)) {
          if (p->cmd.empty() || (p->tty && p->stderr_) || !(p->stdin_ || p->stdout_ || p->stderr_)) __builtin_trap();
          check_url(cri::exec_url("127.0.0.1:1", "a.b.c", *p));
          if (cri::exec_claims(*p).cmd != p->cmd) __builtin_trap();
        }
        break;
      }
      case 1: {
        runtime::v1::PortForwardRequest r;
        if (!r.ParseFromString(in)) break;
        if (auto ports = cri::plan_port_forward(r)) {
          if (ports->empty()) __builtin_trap();
          for (const auto& p : *ports)
            if (p.proto != "tcp" || (p.port == 0 && ports->size() != 1)) __builtin_trap();
        }
        break;
      }
      case 2: {
        runtime::v1::ExecSyncRequest r;
        if (!r.ParseFromString(in)) break;
        if (auto p = cri::plan_exec_sync(r)) {
          if (p->cmd.empty() || p->timeout_ms < 0 || p->timeout_ms > std::numeric_limits<int>::max()) __builtin_trap();
          if (r.timeout() > 0 && r.timeout() < (int64_t{1} << 30)) (void)cri::exec_sync_timeout_message(r.timeout());
        }
        break;
      }
      case 3: {
        client::Registration reg = client::parse_registration(in, "fuzz");
        std::vector<client::Registration> live = {reg};
        const client::Registration* t = cri::pick_pod_target(live, reg.sandbox_id);
        if (t && t->cri_endpoint.empty()) __builtin_trap();
        break;
      }
    }
  } catch (const Error&) {
  }
  return 0;
}
