#include "common/yaml.h"

#include <yaml.h>

#include "common/error.h"

namespace shimlet::yaml {
namespace {

// libyaml wants caller storage for its parser; this owns it.
struct Parser {
  yaml_parser_t p{};
  bool live = false;
  Parser() = default;
  Parser(const Parser&) = delete;
  Parser& operator=(const Parser&) = delete;
  ~Parser() {
    if (live) yaml_parser_delete(&p);
  }
};

// One event at a time; the event is freed when the holder goes out of scope.
struct Event {
  yaml_event_t ev{};
  bool live = false;
  ~Event() {
    if (live) yaml_event_delete(&ev);
  }
};

std::string where(const yaml_mark_t& m) {
  return "line " + std::to_string(m.line + 1) + " column " + std::to_string(m.column + 1);
}

class Builder {
 public:
  Builder(yaml_parser_t* p, const Limits& l) : p_(p), l_(l) {}

  void next(Event& e) {
    if (!yaml_parser_parse(p_, &e.ev)) {
      std::string why = p_->problem ? p_->problem : "parse error";
      if (p_->context) why = std::string(p_->context) + ": " + why;
      throw Error("invalid YAML at " + where(p_->problem_mark) + ": " + why);
    }
    e.live = true;
  }

  // Builds the node whose first event is e.
  Node node(Event& e, size_t depth) {
    if (++count_ > l_.max_nodes) throw Error("YAML has more than " + std::to_string(l_.max_nodes) + " nodes");
    if (depth > l_.max_depth) throw Error("YAML nested deeper than " + std::to_string(l_.max_depth));
    const yaml_mark_t mark = e.ev.start_mark;
    Node n;
    switch (e.ev.type) {
      case YAML_ALIAS_EVENT:
        throw Error("YAML aliases are not supported (at " + where(mark) + ")");
      case YAML_SCALAR_EVENT: {
        if (e.ev.data.scalar.anchor) throw Error("YAML anchors are not supported (at " + where(mark) + ")");
        std::string v(reinterpret_cast<const char*>(e.ev.data.scalar.value), e.ev.data.scalar.length);
        bool plain = e.ev.data.scalar.style == YAML_PLAIN_SCALAR_STYLE;
        // YAML 1.1/1.2 core schema nulls, only when unquoted.
        if (plain && (v.empty() || v == "~" || v == "null" || v == "Null" || v == "NULL")) return n;
        n.kind = Node::Kind::Scalar;
        n.scalar = std::move(v);
        n.plain = plain;
        return n;
      }
      case YAML_SEQUENCE_START_EVENT: {
        if (e.ev.data.sequence_start.anchor) throw Error("YAML anchors are not supported (at " + where(mark) + ")");
        n.kind = Node::Kind::Sequence;
        for (;;) {
          Event c;
          next(c);
          if (c.ev.type == YAML_SEQUENCE_END_EVENT) break;
          n.items.push_back(node(c, depth + 1));
        }
        return n;
      }
      case YAML_MAPPING_START_EVENT: {
        if (e.ev.data.mapping_start.anchor) throw Error("YAML anchors are not supported (at " + where(mark) + ")");
        n.kind = Node::Kind::Map;
        for (;;) {
          Event k;
          next(k);
          if (k.ev.type == YAML_MAPPING_END_EVENT) break;
          const yaml_mark_t km = k.ev.start_mark;
          Node key = node(k, depth + 1);
          if (!key.is_scalar()) throw Error("YAML map keys must be strings (at " + where(km) + ")");
          if (n.get(key.scalar)) throw Error("duplicate YAML key \"" + key.scalar + "\" (at " + where(km) + ")");
          Event v;
          next(v);
          n.items.push_back(node(v, depth + 1));
          n.keys.push_back(std::move(key.scalar));
        }
        return n;
      }
      default:
        throw Error("unexpected YAML event at " + where(mark));
    }
  }

 private:
  yaml_parser_t* p_;
  const Limits& l_;
  size_t count_ = 0;
};

}  // namespace

const Node* Node::get(std::string_view key) const {
  if (kind != Kind::Map) return nullptr;
  for (size_t i = 0; i < keys.size(); ++i)
    if (keys[i] == key) return &items[i];
  return nullptr;
}

std::vector<Node> load_all(std::string_view text, const Limits& limits) {
  Parser parser;
  if (!yaml_parser_initialize(&parser.p)) throw Error("libyaml: parser initialisation failed (out of memory)");
  parser.live = true;
  yaml_parser_set_input_string(&parser.p, reinterpret_cast<const unsigned char*>(text.data()), text.size());
  Builder b(&parser.p, limits);
  std::vector<Node> docs;
  {
    Event e;
    b.next(e);
    if (e.ev.type != YAML_STREAM_START_EVENT) throw Error("invalid YAML: no stream start");
  }
  for (;;) {
    Event e;
    b.next(e);
    if (e.ev.type == YAML_STREAM_END_EVENT) break;
    if (e.ev.type != YAML_DOCUMENT_START_EVENT) throw Error("invalid YAML: expected a document");
    Event body;
    b.next(body);
    docs.push_back(b.node(body, 0));
    Event end;
    b.next(end);
    if (end.ev.type != YAML_DOCUMENT_END_EVENT) throw Error("invalid YAML: expected the document's end");
  }
  return docs;
}

}  // namespace shimlet::yaml
