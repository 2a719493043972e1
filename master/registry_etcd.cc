#include "master/registry_etcd.h"

#include <unistd.h>

#include <algorithm>
#include <climits>
#include <ctime>
#include <optional>

#include "common/base64.h"
#include "common/error.h"
#include "common/log.h"

namespace shimlet::master {

namespace er = etcd_records;
using etcd::Compare;
using etcd::Op;

namespace {

constexpr int64_t kMasterLeaseTtlS = 30;       // a dead master's heartbeat key goes within this
constexpr int64_t kMasterKeepAliveMs = 10000;  // its renewal period
constexpr int64_t kKeepAliveDedupMs = 1000;    // etcd TTLs are whole seconds: one renewal per second is enough
constexpr int64_t kErrorLogEveryMs = 10000;    // the same etcd error is logged at most this often
constexpr size_t kMaxPendingConfirmations = 64;

Compare mod_is(const std::string& key, int64_t rev) {
  Compare c;
  c.key = key;
  c.target = Compare::Target::Mod;
  c.number = rev;
  return c;
}

// create_revision 0: the key does not exist.
Compare absent(const std::string& key) {
  Compare c;
  c.key = key;
  c.target = Compare::Target::Create;
  c.number = 0;
  return c;
}

Compare version_is(const std::string& key, int64_t v) {
  Compare c;
  c.key = key;
  c.target = Compare::Target::Version;
  c.number = v;
  return c;
}

Op put_op(const std::string& key, std::string value, int64_t lease) {
  Op o;
  o.kind = Op::Kind::Put;
  o.key = key;
  o.value = std::move(value);
  o.lease = lease;
  return o;
}

Op get_op(const std::string& key) {
  Op o;
  o.kind = Op::Kind::Get;
  o.key = key;
  return o;
}

Op delete_op(const std::string& key) {
  Op o;
  o.kind = Op::Kind::Delete;
  o.key = key;
  return o;
}

const std::vector<etcd::KeyValue>& first_op(const etcd::Result& r) {
  static const std::vector<etcd::KeyValue> kNone;
  return r.op_kvs.empty() ? kNone : r.op_kvs[0];
}

std::string host_name() {
  char h[256] = {};
  if (::gethostname(h, sizeof h - 1) != 0) return "";
  return h;
}

}  // namespace

// A container key as last seen (in the copy, or read back by a lost Txn).
struct EtcdRegistry::Known {
  bool exists = false;
  bool corrupt = false;  // exists but does not decode: its owner is unknown
  std::string node;
  int64_t mod_revision = 0, lease = 0;
  std::string value;
};

namespace {

// What a lost Txn's Get read back about a container key.
EtcdRegistry::Known known_from(const std::vector<etcd::KeyValue>& kvs, const std::string& id) {
  EtcdRegistry::Known k;
  if (kvs.empty()) return k;
  k.exists = true;
  k.mod_revision = kvs[0].mod_revision;
  k.lease = kvs[0].lease;
  k.value = kvs[0].value;
  try {
    k.node = er::decode_container(kvs[0].value, id).node;
  } catch (const Error&) {
    k.corrupt = true;
  }
  return k;
}

}  // namespace

struct EtcdRegistry::PutOp {
  std::string node, id, value;
  Done done;
  int attempts = 0;
  std::optional<Known> seen;  // read back by the last lost Txn
  int64_t lease = 0;          // the node's etcd lease, once known
  int64_t dead_lease = 0;     // a lease found expired: never use it again
};

struct EtcdRegistry::RemoveOp {
  std::string node, id;
  Done done;
  int attempts = 0;
  std::optional<Known> seen;
};

EtcdRegistry::EtcdRegistry(event_base* base, EtcdOptions opt, int64_t lease_ms, size_t max_entries)
    : lease_ms_(lease_ms),
      max_(max_entries),
      opt_(std::move(opt)),
      prefix_(er::key_prefix(opt_.prefix)),
      master_id_(hex_encode(random_bytes(8))),
      base_(base),
      loop_(base) {
  if (opt_.max_staleness_ms < 1000) throw Error("--etcd-max-cache-staleness must be at least 1s");
  if (opt_.host.empty()) opt_.host = host_name();
  client_ = std::make_unique<etcd::Client>(opt_.client);
  etcd::WatchHandler h;
  h.reset = [this](std::vector<etcd::KeyValue> kvs, int64_t rev) {
    post([this, kvs = std::move(kvs), rev]() mutable { on_reset(std::move(kvs), rev); });
  };
  h.events = [this](std::vector<etcd::Event> evs) {
    post([this, evs = std::move(evs)]() mutable { on_events(std::move(evs)); });
  };
  h.error = [this](std::string e) { post([this, e = std::move(e)] { on_error(e); }); };
  watch_ = client_->watch_prefix(prefix_, std::move(h));
  tick_ = new_event(base_, -1, EV_PERSIST, on_tick, this);
  const int64_t every = std::clamp<int64_t>(opt_.max_staleness_ms / 5, 100, 1000);
  timeval tv{every / 1000, static_cast<suseconds_t>((every % 1000) * 1000)};
  if (evtimer_add(tick_.get(), &tv) != 0) throw Error("cannot start the etcd registry's timer");
  last_compact_ms_ = monotonic_ms();
  log::info("registry in etcd", {{"endpoints",
                                  [&] {
                                    nlohmann::json a = nlohmann::json::array();
                                    for (const auto& e : client_->endpoints()) a.push_back(e.url);
                                    return a;
                                  }()},
                                 {"prefix", prefix_},
                                 {"master_id", master_id_},
                                 {"max_staleness_ms", opt_.max_staleness_ms}});
}

EtcdRegistry::~EtcdRegistry() {
  tick_.reset();
  // Threads first: after this nothing posts any more.
  watch_.reset();
  client_.reset();
}

void EtcdRegistry::post(std::function<void()> fn) { loop_.post(std::move(fn)); }

// ---------------------------------------------------------------- writes

EtcdRegistry::Known EtcdRegistry::known_container(const std::string& id) const {
  Known k;
  auto m = meta_.find(id);
  if (m == meta_.end()) return k;
  k.exists = true;
  k.mod_revision = m->second.mod_revision;
  k.lease = m->second.lease;
  k.value = m->second.value;
  if (const Registration* r = entries_.get(id))
    k.node = r->node;
  else
    k.corrupt = true;
  return k;
}

void EtcdRegistry::put(const std::string& node, const std::string& id, Registration r, const std::string& peer_ip,
                       Done done) {
  if (auto refused = prepare_put(node, id, r, peer_ip)) return done(*refused);
  if (!meta_.count(id) && entries_.size() >= max_) return done({429, "registry full", 0});
  auto op = std::make_shared<PutOp>();
  op->node = node;
  op->id = id;
  op->value = er::encode_container(r);
  op->done = std::move(done);
  put_step(op);
}

void EtcdRegistry::put_step(std::shared_ptr<PutOp> op) {
  if (op->attempts >= kMaxAttempts)
    return op->done({503,
                     "etcd: the registration of " + op->id + " lost " + std::to_string(kMaxAttempts) +
                         " races with other writers in a row; try again",
                     0});
  Known k = op->seen ? *op->seen : known_container(op->id);
  op->seen.reset();
  if (k.exists && !k.corrupt && k.node != op->node)
    return op->done({403, "container " + op->id + " is registered by node \"" + k.node + "\"", 0});
  if (op->lease == 0) {
    node_lease(op->node, op->dead_lease, [this, op](int64_t lease, std::optional<std::string> err) {
      if (err) return op->done({503, *err, 0});
      op->lease = lease;
      put_step(op);
    });
    return;
  }
  // A record that does not decode names no node: it is the node's whose
  // etcd lease it is attached to.
  if (k.exists && k.corrupt && k.lease != op->lease)
    return op->done(
        {403, "container " + op->id + " has an unreadable record not on node \"" + op->node + "\"'s lease", 0});
  const std::string key = er::container_key(prefix_, op->id);
  if (k.exists && !k.corrupt && k.lease == op->lease && k.value == op->value) {
    // A renewal that changes nothing: keep the node's lease alive, write nothing.
    const int64_t now = monotonic_ms();
    int64_t& last = last_keepalive_ms_[op->lease];
    if (now - last < kKeepAliveDedupMs) return op->done({200, "", 0});
    client_->lease_keep_alive(op->lease, [this, op, now](etcd::Result r) {
      post([this, op, now, r = std::move(r)] {
        if (r.error) return op->done({503, *r.error, 0});
        if (r.ttl <= 0) {
          // The lease expired (and the node's keys with it): register afresh.
          op->dead_lease = op->lease;
          op->lease = 0;
          lease_hint_.erase(op->node);
          op->attempts++;
          return put_step(op);
        }
        last_keepalive_ms_[op->lease] = now;
        op->done({200, "", 0});
      });
    });
    return;
  }
  etcd::Txn t;
  t.compare.push_back(k.exists ? mod_is(key, k.mod_revision) : absent(key));
  t.success.push_back(put_op(key, op->value, op->lease));
  t.failure.push_back(get_op(key));
  const bool created = !k.exists;
  op->attempts++;
  client_->txn(std::move(t), [this, op, created](etcd::Result r) {
    post([this, op, created, r = std::move(r)] {
      if (r.error) {
        if (r.not_found) {  // the node's lease expired meanwhile
          op->dead_lease = op->lease;
          op->lease = 0;
          lease_hint_.erase(op->node);
          return put_step(op);
        }
        return op->done({503, *r.error, 0});
      }
      if (!r.succeeded) {
        op->seen = known_from(first_op(r), op->id);
        return put_step(op);
      }
      last_keepalive_ms_[op->lease] = monotonic_ms();  // a Put attached to it proves it alive
      when_applied(r.revision, [op, created] { op->done({created ? 201 : 200, "", 0}); });
    });
  });
}

void EtcdRegistry::node_lease(const std::string& node, int64_t avoid,
                              std::function<void(int64_t lease, std::optional<std::string> error)> cb) {
  int64_t known = 0;
  if (auto it = nodes_.find(node); it != nodes_.end()) known = it->second.lease;
  if (!known)
    if (auto h = lease_hint_.find(node); h != lease_hint_.end()) known = h->second;
  if (known && known != avoid) return cb(known, std::nullopt);
  auto& waiters = granting_[node];
  waiters.push_back(std::move(cb));
  if (waiters.size() > 1) return;  // this node's lease is being made: wait for it
  auto finish = [this, node](int64_t lease, std::optional<std::string> err) {
    auto w = std::move(granting_[node]);
    granting_.erase(node);
    for (auto& f : w) f(lease, err);
  };
  const int64_t ttl = std::max<int64_t>(1, lease_ms_ / 1000);
  client_->lease_grant(ttl, [this, node, avoid, finish](etcd::Result g) {
    post([this, node, avoid, finish, g = std::move(g)] {
      if (g.error) return finish(0, *g.error);
      // Record it under nodes/NODE unless another master was faster.
      auto record = std::make_shared<std::function<void(int attempt, int64_t cur_mod)>>();
      *record = [this, node, avoid, finish, g, record](int attempt, int64_t cur_mod) {
        const std::string key = er::node_key(prefix_, node);
        etcd::Txn t;
        t.compare.push_back(cur_mod ? mod_is(key, cur_mod) : absent(key));
        t.success.push_back(put_op(key, er::encode_node({node, g.lease_id, g.ttl}), g.lease_id));
        t.failure.push_back(get_op(key));
        client_->txn(std::move(t), [this, node, avoid, finish, g, record, attempt](etcd::Result r) {
          post([this, node, avoid, finish, g, record, attempt, r = std::move(r)] {
            auto drop_ours = [&] { client_->lease_revoke(g.lease_id, [](etcd::Result) {}); };
            if (r.error) {
              drop_ours();
              return finish(0, *r.error);
            }
            const auto& kvs = first_op(r);
            int64_t theirs = 0, mod = 0;
            if (!r.succeeded && !kvs.empty()) {
              mod = kvs[0].mod_revision;
              try {
                theirs = er::decode_node(kvs[0].value, node).lease;
              } catch (const Error& e) {
                on_error("ignoring an invalid node record " + kvs[0].key + ": " + e.what());
              }
            }
            // Ours is recorded: this Txn, or its replay on the next member
            // (the first one applied it but answered too late).
            if (r.succeeded || theirs == g.lease_id) {
              lease_hint_[node] = g.lease_id;
              last_keepalive_ms_[g.lease_id] = monotonic_ms();
              return finish(g.lease_id, std::nullopt);
            }
            if (theirs && theirs != avoid) {  // another master recorded one first: use it
              drop_ours();
              lease_hint_[node] = theirs;
              return finish(theirs, std::nullopt);
            }
            if (attempt + 1 >= kMaxAttempts) {
              drop_ours();
              return finish(0, "etcd: the lease record of node " + node + " kept changing; try again");
            }
            (*record)(attempt + 1, mod);  // absent, dead or invalid: replace it
          });
        });
      };
      int64_t cur_mod = 0;
      if (auto it = nodes_.find(node); it != nodes_.end()) cur_mod = it->second.mod_revision;
      (*record)(0, cur_mod);
    });
  });
}

void EtcdRegistry::remove(const std::string& node, const std::string& id, Done done) {
  auto op = std::make_shared<RemoveOp>();
  op->node = node;
  op->id = id;
  op->done = std::move(done);
  remove_step(op);
}

void EtcdRegistry::remove_step(std::shared_ptr<RemoveOp> op) {
  if (op->attempts >= kMaxAttempts)
    return op->done({503, "etcd: the removal of " + op->id + " lost races with other writers; try again", 0});
  const bool from_etcd = op->seen.has_value();
  Known k = op->seen ? *op->seen : known_container(op->id);
  op->seen.reset();
  const std::string key = er::container_key(prefix_, op->id);
  if (!k.exists && !from_etcd) {
    // Not in the copy, which may lag etcd or not be loaded yet: only a
    // quorum read may say "not registered" (the node takes 404 as done).
    op->attempts++;
    client_->range(key, {}, [this, op](etcd::Result r) {
      post([this, op, r = std::move(r)] {
        if (r.error) return op->done({503, *r.error, 0});
        op->seen = known_from(r.kvs, op->id);
        remove_step(op);
      });
    });
    return;
  }
  if (!k.exists) return op->done({404, "container " + op->id + " is not registered", 0});
  if (!k.corrupt && k.node != op->node)
    return op->done({403, "container " + op->id + " is registered by node \"" + k.node + "\"", 0});
  if (k.corrupt) {  // no node named: the node's whose etcd lease it is attached to
    int64_t mine = 0;
    if (auto it = nodes_.find(op->node); it != nodes_.end()) mine = it->second.lease;
    if (auto h = lease_hint_.find(op->node); !mine && h != lease_hint_.end()) mine = h->second;
    if (!k.lease || k.lease != mine)
      return op->done(
          {403, "container " + op->id + " has an unreadable record not on node \"" + op->node + "\"'s lease", 0});
  }
  etcd::Txn t;
  t.compare.push_back(mod_is(key, k.mod_revision));
  t.success.push_back(delete_op(key));
  t.failure.push_back(get_op(key));
  op->attempts++;
  client_->txn(std::move(t), [this, op](etcd::Result r) {
    post([this, op, r = std::move(r)] {
      if (r.error) return op->done({503, *r.error, 0});
      if (!r.succeeded) {
        op->seen = known_from(first_op(r), op->id);
        return remove_step(op);
      }
      when_applied(r.revision, [op] { op->done({200, "", 0}); });
    });
  });
}

void EtcdRegistry::when_applied(int64_t revision, std::function<void()> fn) {
  if (applied_ >= revision) return fn();
  apply_waiters_.emplace(revision, std::make_pair(monotonic_ms() + kApplyWaitMs, std::move(fn)));
}

// ---------------------------------------------------------------- the watch

void EtcdRegistry::apply(const etcd::KeyValue& kv, bool deleted, const std::map<std::string, int64_t>& nodes_deleted) {
  er::Key k = er::parse_key(prefix_, kv.key);
  switch (k.kind) {
    case er::Kind::Container: {
      if (deleted) {
        if (const Registration* cur = entries_.get(k.name)) {
          // Deleted in the same revision as its node's lease record: the
          // node's etcd lease expired (a DELETE would be a revision of its own).
          auto nd = nodes_deleted.find(cur->node);
          if (nd != nodes_deleted.end() && nd->second == kv.mod_revision) expired_.push_back(*cur);
          entries_.erase(k.name);
        }
        meta_.erase(k.name);
        return;
      }
      if (!meta_.count(k.name) && meta_.size() >= max_) {
        on_error("more than " + std::to_string(max_) + " containers under " + prefix_ + ": ignoring " + k.name);
        return;
      }
      meta_[k.name] = Meta{kv.mod_revision, kv.lease, kv.value};
      try {
        Registration r = er::decode_container(kv.value, k.name);
        r.expires_ms = INT64_MAX;  // the node's etcd lease governs
        r.registered = kv.create_revision;
        entries_.upsert(std::move(r));
      } catch (const Error& e) {
        // Not trusted, not served; its key may still be replaced by its node.
        entries_.erase(k.name);
        on_error("ignoring an invalid container record " + kv.key.substr(0, 300) + ": " + e.what());
      }
      return;
    }
    case er::Kind::Node:
      lease_hint_.erase(k.name);  // the watch knows better from here on
      if (deleted) {
        nodes_.erase(k.name);
        return;
      }
      try {
        nodes_[k.name] = NodeInfo{er::decode_node(kv.value, k.name).lease, kv.mod_revision};
      } catch (const Error& e) {
        nodes_[k.name] = NodeInfo{0, kv.mod_revision};  // replaced at the node's next registration
        on_error("ignoring an invalid node record " + kv.key.substr(0, 300) + ": " + e.what());
      }
      return;
    case er::Kind::Master:
      if (deleted) {
        masters_.erase(k.name);
        return;
      }
      try {
        er::decode_master(kv.value, k.name);
        masters_.insert(k.name);
      } catch (const Error& e) {
        on_error("ignoring an invalid master record " + kv.key.substr(0, 300) + ": " + e.what());
      }
      return;
    case er::Kind::Other:
      return;
  }
}

void EtcdRegistry::on_reset(std::vector<etcd::KeyValue> kvs, int64_t revision) {
  entries_.clear();
  meta_.clear();
  nodes_.clear();
  masters_.clear();
  for (const auto& kv : kvs) apply(kv, false, {});
  const bool first = !loaded_;
  loaded_ = true;
  applied_ = revision;
  advance(revision);
  probe();  // confirmed current at once, not at the next tick
  log::info(first ? "registry loaded from etcd" : "registry listed again from etcd", {{"containers", entries_.size()},
                                                                                      {"nodes", nodes_.size()},
                                                                                      {"masters", masters_.size()},
                                                                                      {"revision", revision}});
}

void EtcdRegistry::on_events(std::vector<etcd::Event> events) {
  // All events of one revision come in one batch: a node's lease expiry
  // deletes its record and its containers in the same revision.
  std::map<std::string, int64_t> nodes_deleted;
  for (const auto& e : events)
    if (e.deleted)
      if (er::Key k = er::parse_key(prefix_, e.kv.key); k.kind == er::Kind::Node)
        nodes_deleted[k.name] = e.kv.mod_revision;
  int64_t last = applied_;
  for (const auto& e : events) {
    apply(e.kv, e.deleted, nodes_deleted);
    last = std::max(last, e.kv.mod_revision);
  }
  advance(last);
}

void EtcdRegistry::advance(int64_t revision) {
  applied_ = std::max(applied_, revision);
  while (!apply_waiters_.empty() && apply_waiters_.begin()->first <= applied_) {
    auto fn = std::move(apply_waiters_.begin()->second.second);
    apply_waiters_.erase(apply_waiters_.begin());
    fn();
  }
  while (!confirm_.empty() && confirm_.front().first <= applied_) {
    confirmed_ms_ = std::max(confirmed_ms_, confirm_.front().second);
    confirm_.pop_front();
  }
}

void EtcdRegistry::on_error(const std::string& e) {
  const int64_t now = monotonic_ms();
  if (e != last_error_ || now - last_error_log_ms_ >= kErrorLogEveryMs) {
    log::warn("etcd", {{"error", e}});
    last_error_log_ms_ = now;
  }
  last_error_ = e;
}

std::vector<Registration> EtcdRegistry::expire(int64_t) { return std::exchange(expired_, {}); }

std::optional<std::string> EtcdRegistry::unavailable(int64_t now_ms) const {
  const std::string cause = last_error_.empty() ? "" : "; last etcd error: " + last_error_;
  if (!loaded_) return "not loaded from etcd yet" + cause;
  if (confirmed_ms_ < 0 || now_ms - confirmed_ms_ > opt_.max_staleness_ms)
    return "the copy of etcd was last confirmed current " +
           (confirmed_ms_ < 0 ? std::string("never") : std::to_string(now_ms - confirmed_ms_) + " ms ago") +
           " (limit " + std::to_string(opt_.max_staleness_ms) + " ms)" + cause;
  return std::nullopt;
}

// ---------------------------------------------------------------- freshness, heartbeat, compaction

void EtcdRegistry::on_tick(evutil_socket_t, short, void* arg) {
  auto* self = static_cast<EtcdRegistry*>(arg);
  const int64_t now = monotonic_ms();
  // Writes whose revision the watch has not shown within the bound answer anyway.
  for (auto it = self->apply_waiters_.begin(); it != self->apply_waiters_.end();) {
    if (it->second.first <= now) {
      auto fn = std::move(it->second.second);
      it = self->apply_waiters_.erase(it);
      fn();
    } else {
      ++it;
    }
  }
  for (auto it = self->last_keepalive_ms_.begin(); it != self->last_keepalive_ms_.end();)
    it = now - it->second > 60000 ? self->last_keepalive_ms_.erase(it) : std::next(it);
  // A watch that does not deliver this master's own heartbeat is stuck on a
  // member that lags or is cut off: start it again on the next endpoint.
  if (self->heartbeat_rev_ > self->applied_ && now - self->heartbeat_written_ms_ > self->opt_.max_staleness_ms / 2) {
    self->watch_->restart("it has not delivered revision " + std::to_string(self->heartbeat_rev_) +
                          " (this master's heartbeat) within " + std::to_string(now - self->heartbeat_written_ms_) +
                          " ms");
    self->heartbeat_written_ms_ = now;
  }
  if (self->master_lease_ && !self->master_lease_busy_ && now - self->master_lease_renewed_ms_ >= kMasterKeepAliveMs) {
    self->master_lease_busy_ = true;
    self->client_->lease_keep_alive(self->master_lease_, [self, now](etcd::Result r) {
      self->post([self, now, r = std::move(r)] {
        self->master_lease_busy_ = false;
        if (r.error) return self->on_error("renewing this master's lease: " + *r.error);
        if (r.ttl <= 0)
          self->master_lease_ = 0;  // granted again with the next heartbeat
        else
          self->master_lease_renewed_ms_ = now;
      });
    });
  }
  self->probe();
  if (self->opt_.compaction_interval_s > 0 && !self->compacting_ &&
      now - self->last_compact_ms_ >= self->opt_.compaction_interval_s * 1000)
    self->compact_round();
}

void EtcdRegistry::probe() {
  if (probing_) return;
  probing_ = true;
  const int64_t t0 = monotonic_ms();
  etcd::RangeOptions o;
  o.count_only = true;  // a linearizable read: its revision is at least every write committed before t0
  client_->range(er::master_key(prefix_, master_id_), o, [this, t0](etcd::Result r) {
    post([this, t0, r = std::move(r)] {
      probing_ = false;
      if (r.error) return on_error("freshness check: " + *r.error);
      last_error_.clear();
      if (loaded_ && applied_ >= r.revision) {
        confirmed_ms_ = std::max(confirmed_ms_, t0);
        return;
      }
      confirm_.emplace_back(r.revision, t0);
      if (confirm_.size() > kMaxPendingConfirmations) confirm_.pop_front();
      // Something changed that the watch has not shown (maybe outside the
      // prefix, which it never will): a write of ours under the prefix, made
      // after the read, proves the watch has delivered everything up to it.
      heartbeat();
    });
  });
}

void EtcdRegistry::heartbeat() {
  if (master_lease_busy_) return;
  if (master_lease_ == 0) {
    master_lease_busy_ = true;
    client_->lease_grant(kMasterLeaseTtlS, [this](etcd::Result g) {
      post([this, g = std::move(g)] {
        master_lease_busy_ = false;
        if (g.error) return on_error("granting this master's lease: " + *g.error);
        master_lease_ = g.lease_id;
        master_lease_renewed_ms_ = monotonic_ms();
        heartbeat();
      });
    });
    return;
  }
  if (heartbeat_busy_) return;  // the one in flight will do
  er::MasterRecord m{master_id_, opt_.host, log::rfc3339(::time(nullptr)), static_cast<int64_t>(::getpid())};
  etcd::Txn t;  // no compare: always succeeds
  t.success.push_back(put_op(er::master_key(prefix_, master_id_), er::encode_master(m), master_lease_));
  heartbeat_busy_ = true;
  client_->txn(std::move(t), [this](etcd::Result r) {
    post([this, r = std::move(r)] {
      heartbeat_busy_ = false;
      if (r.error) {
        if (r.not_found) master_lease_ = 0;
        return on_error("heartbeat: " + *r.error);
      }
      if (r.revision > applied_) {
        heartbeat_rev_ = r.revision;
        heartbeat_written_ms_ = monotonic_ms();
      }
    });
  });
}

void EtcdRegistry::compact_round() {
  compacting_ = true;
  const std::string key = er::compact_key(prefix_);
  etcd::Txn t;
  t.compare.push_back(version_is(key, compact_version_));
  t.success.push_back(put_op(key, std::to_string(compact_rev_), 0));
  t.failure.push_back(get_op(key));
  client_->txn(std::move(t), [this](etcd::Result r) {
    post([this, r = std::move(r)] {
      compacting_ = false;
      last_compact_ms_ = monotonic_ms();
      if (r.error) return on_error("compaction: " + *r.error);
      if (!r.succeeded) {  // another master compacts this round
        const auto& kvs = first_op(r);
        compact_version_ = kvs.empty() ? 0 : kvs[0].version;
        compact_rev_ = r.revision;
        return;
      }
      const int64_t target = compact_rev_;
      compact_version_++;
      compact_rev_ = r.revision;
      if (target <= 0) return;
      client_->compact(target, [this, target](etcd::Result c) {
        post([this, target, c = std::move(c)] {
          if (c.error && !c.compacted)  // compacted already (by another master): done
            on_error("compacting to revision " + std::to_string(target) + ": " + *c.error);
          else
            log::info("etcd compacted", {{"revision", target}});
        });
      });
    });
  });
}

}  // namespace shimlet::master
