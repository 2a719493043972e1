// Which exec sessions the shims record (docs/recording.md "Policy"): rules
// per namespace / user / group choosing none | tty | all, with the disk-full
// behaviour and the size limit, read from a YAML file (--recording-policy-file)
// beside the RBAC manifests. The master turns the decision into the ticket's
// "rec" claim (ticket/ticket.h), so the shim needs no policy of its own.
//
//   apiVersion: shimlet.io/v1
//   kind: RecordingPolicy
//   default: none                 # when no rule matches: none | tty | all
//   diskFull: fail-closed         # default for rules: fail-closed | fail-open
//   maxBytes: 268435456           # default for rules (encoded bytes per recording)
//   rules:                        # first match wins; an empty selector matches anything
//   - namespaces: [prod]
//     users: [alice]              # user names
//     groups: [sre]               # any of the user's groups
//     record: all
//     diskFull: fail-open         # optional, per rule
//     maxBytes: 1048576           # optional, per rule
//
// A rule matches when each selector it has matches (namespaces AND users AND
// groups); "tty" records interactive sessions only (tty: true).
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "ticket/ticket.h"

namespace shimlet::master {

enum class RecordMode { None, Tty, All };

struct RecordingRule {
  std::vector<std::string> namespaces, users, groups;
  RecordMode mode = RecordMode::None;
  std::optional<bool> fail_closed;
  uint64_t max_bytes = 0;  // 0: the policy's
};

class RecordingPolicy {
 public:
  static constexpr uint64_t kDefaultMaxBytes = 256ull << 20;
  RecordingPolicy() = default;  // records nothing
  // Throws shimlet::Error("SOURCE: ...") on malformed YAML or values.
  static RecordingPolicy parse(std::string_view yaml, const std::string& source = "<yaml>");
  static RecordingPolicy load(const std::string& path);

  // For an exec by `user` (with `groups`) in `ns`: the "rec" claim, or
  // nullopt (not recorded), and which rule decided ("default", "rule N"), for the audit.
  struct Decision {
    std::optional<ticket::Recording> rec;
    std::string rule;
  };
  Decision decide(const std::string& user, const std::vector<std::string>& groups, const std::string& ns,
                  bool tty) const;
  // The largest maxBytes of any rule (the store must accept it).
  uint64_t largest_max_bytes() const;
  bool records_anything() const;

 private:
  std::vector<RecordingRule> rules_;
  RecordMode default_mode_ = RecordMode::None;
  bool fail_closed_ = true;
  uint64_t max_bytes_ = kDefaultMaxBytes;
};

}  // namespace shimlet::master
