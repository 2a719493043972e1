#include "session/preauth.h"

#include <arpa/inet.h>
#include <string.h>
#include <sys/socket.h>

namespace shimlet::session {

std::string PreauthTable::source_key(int family, const uint8_t* a) {
  static const uint8_t kMapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
  if (family == AF_INET6 && memcmp(a, kMapped, sizeof kMapped) == 0) {
    family = AF_INET;
    a += 12;
  }
  if (family == AF_INET) {
    char buf[INET_ADDRSTRLEN] = {};
    inet_ntop(AF_INET, a, buf, sizeof buf);
    return std::string("4:") + buf;
  }
  if (family == AF_INET6) return "6:" + std::string(reinterpret_cast<const char*>(a), 8);
  return "";
}

std::vector<PreauthTable::Victim> PreauthTable::add(Id id, const std::string& source, int64_t now, size_t cost) {
  std::vector<Victim> out;
  if (conns_.count(id)) return out;
  // Make room first: the new connection is the freshest, never the victim.
  while (conns_.size() >= limits_.max_total && !conns_.empty()) drop(*idlest(nullptr, 0), Why::Total, out);
  while (count(source) >= limits_.max_per_source && count(source) > 0) drop(*idlest(&source, 0), Why::PerSource, out);
  while (memory_ + cost > limits_.max_memory && !conns_.empty()) drop(*idlest(nullptr, 0), Why::Memory, out);
  conns_[id] = Conn{source, now, now, cost};
  by_accept_.insert({now, id});
  by_last_.insert({now, id});
  by_source_[source].insert({now, id});
  memory_ += cost;
  return out;
}

void PreauthTable::progress(Id id, int64_t now) {
  auto it = conns_.find(id);
  if (it == conns_.end() || it->second.last == now) return;
  Conn& c = it->second;
  by_last_.erase({c.last, id});
  auto& src = by_source_[c.source];
  src.erase({c.last, id});
  c.last = now;
  by_last_.insert({now, id});
  src.insert({now, id});
}

std::vector<PreauthTable::Victim> PreauthTable::set_cost(Id id, size_t cost) {
  std::vector<Victim> out;
  auto it = conns_.find(id);
  if (it == conns_.end()) return out;
  memory_ = memory_ - it->second.cost + cost;
  it->second.cost = cost;
  while (memory_ > limits_.max_memory) {
    std::optional<Id> v = idlest(nullptr, id);
    if (!v) break;  // only `id` is left: it alone may exceed the bound (its own cap is the caller's)
    drop(*v, Why::Memory, out);
  }
  return out;
}

void PreauthTable::remove(Id id) {
  auto it = conns_.find(id);
  if (it == conns_.end()) return;
  const Conn& c = it->second;
  by_accept_.erase({c.accepted, id});
  by_last_.erase({c.last, id});
  auto s = by_source_.find(c.source);
  if (s != by_source_.end()) {
    s->second.erase({c.last, id});
    if (s->second.empty()) by_source_.erase(s);
  }
  memory_ -= c.cost;
  conns_.erase(it);
}

void PreauthTable::drop(Id id, Why why, std::vector<Victim>& out) {
  remove(id);
  out.push_back({id, why});
}

std::optional<PreauthTable::Id> PreauthTable::idlest(const std::string* source, Id spare) const {
  const std::set<Key>* order = &by_last_;
  if (source) {
    auto s = by_source_.find(*source);
    if (s == by_source_.end()) return std::nullopt;
    order = &s->second;
  }
  for (const Key& k : *order)
    if (k.second != spare || spare == 0) return k.second;
  return std::nullopt;
}

std::vector<PreauthTable::Id> PreauthTable::expired(int64_t now) const {
  std::vector<Id> out;
  for (const Key& k : by_accept_) {
    if (k.first + limits_.timeout_ms > now) break;
    out.push_back(k.second);
  }
  return out;
}

std::optional<int64_t> PreauthTable::next_deadline() const {
  if (by_accept_.empty()) return std::nullopt;
  return by_accept_.begin()->first + limits_.timeout_ms;
}

size_t PreauthTable::count(const std::string& source) const {
  auto s = by_source_.find(source);
  return s == by_source_.end() ? 0 : s->second.size();
}

}  // namespace shimlet::session
