// YAML documents as a small bounded tree, parsed by libyaml (the C parser
// behind PyYAML, fuzzed for years in OSS-Fuzz). We used yaml-cpp 0.7 before:
// Debian 12's version loops forever on some inputs (found by
// master_rbac_fuzz, seeds in tests/fuzz/corpus/master_rbac/), so every YAML
// file we read (RBAC manifests, kubeconfigs) goes through here instead.
//
// Anchors and aliases are refused (no manifest we read needs them, and
// aliases are the "billion laughs" expansion); depth and node count are
// bounded. Scalars keep their text; tags are ignored, so `true`, `3` and
// `"3"` are all the scalar text the caller asked for.
#pragma once
#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace shimlet::yaml {

struct Node {
  enum class Kind { Null, Scalar, Sequence, Map };
  Kind kind = Kind::Null;
  std::string scalar;             // Kind::Scalar
  bool plain = false;             // unquoted scalar (null/~ are Null, not Scalar)
  std::vector<Node> items;        // Kind::Sequence; Kind::Map: the values
  std::vector<std::string> keys;  // Kind::Map: keys[i] names items[i], in document order

  bool is_null() const { return kind == Kind::Null; }
  bool is_scalar() const { return kind == Kind::Scalar; }
  bool is_seq() const { return kind == Kind::Sequence; }
  bool is_map() const { return kind == Kind::Map; }
  // The value of a map key, or nullptr (also when this is not a map).
  const Node* get(std::string_view key) const;
};

struct Limits {
  size_t max_depth = 64;
  size_t max_nodes = 1 << 20;
};

// Parses every document of a stream. Throws shimlet::Error with line and
// column on malformed YAML, aliases, anchors, non-scalar map keys, duplicate
// keys, or when a limit is exceeded. An empty stream gives no documents; an
// empty document ("---" alone) gives a Null node.
std::vector<Node> load_all(std::string_view text, const Limits& limits = {});

}  // namespace shimlet::yaml
