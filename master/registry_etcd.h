// The registry in etcd (shimlet-master --etcd-servers; docs/design.md
// "Registry in etcd"): several masters share it and any one may die.
//
// Keys (master/etcd_records.h) under --etcd-prefix: containers/ID (the
// registration), nodes/NODE (the node's etcd lease id), masters/MID (each
// live master's heartbeat), compact_rev_key (the compactor's).
//
// Leases: one etcd lease per node, TTL = --lease-duration. A node's first
// registration, through any master, grants it and records its id under
// nodes/NODE in a Txn that only creates (two masters racing agree on one);
// a renewal through any master that changes nothing is one LeaseKeepAlive
// of that id (no write); a new or changed registration is a Put attached to
// it. When a node stops renewing, etcd expires the lease and deletes all of
// the node's keys in one revision; every master sees that on its watch and
// audits lease_expired. (So with etcd a container lives as long as its node
// renews anything: a container whose shim alone died stays listed until its
// poststop unregisters it or the node's lease lapses.)
//
// Ownership across masters: every write is a Txn guarded by the key's
// revision as this master last saw it (create revision 0 = absent); a lost
// race reads the key back in the same Txn and decides again, at most
// kMaxAttempts times. A node therefore cannot take another node's container,
// whichever masters the two go through.
//
// Reads never wait for etcd: a watch on the prefix keeps entries() current
// on the loop. The copy is trusted only while it is known to be current:
// every probe interval a quorum read gives the store's revision R at time
// t0; once the watch has delivered R (when nothing under the prefix changed
// since, this master's heartbeat write, made after the read, proves it) the
// copy is current as of t0. With no such proof younger than
// --etcd-max-cache-staleness, unavailable() says why and grants, pod lists,
// relays and ownership checks answer 503 (fail closed) until one comes. A
// watch that does not deliver the heartbeat within half that bound is
// restarted on the next endpoint.
//
// A successful write answers once the watch has applied its revision (at
// most kApplyWaitMs later), so the master that took a registration lists it
// at once. The compactor (kube-apiserver's scheme: one master per interval
// wins a Txn on compact_rev_key and compacts to the revision the previous
// round saw) keeps etcd's history bounded; --etcd-compaction-interval 0 = off.
//
// Threads: etcd::Client's; every result is posted to the loop (LoopPost) and
// all state here is the loop's.
#pragma once
#include <event2/event.h>

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "common/event.h"
#include "etcd/client.h"
#include "master/etcd_records.h"
#include "master/loop_post.h"
#include "master/registry.h"

namespace shimlet::master {

struct EtcdOptions {
  etcd::Config client;
  std::string prefix = "/shimlet";      // --etcd-prefix
  int64_t max_staleness_ms = 10000;     // --etcd-max-cache-staleness
  int64_t compaction_interval_s = 300;  // --etcd-compaction-interval (0 = none)
  std::string host;                     // this master's address, for its heartbeat record
};

class EtcdRegistry final : public Registry {
 public:
  // Connects lazily: the constructor starts the watch and the probe and
  // returns; until the first list arrives unavailable() says so. Throws
  // shimlet::Error for bad options (endpoints, TLS files, prefix).
  EtcdRegistry(event_base* base, EtcdOptions opt, int64_t lease_ms, size_t max_entries = 100000);
  ~EtcdRegistry() override;

  int64_t lease_ms() const override { return lease_ms_; }
  void put(const std::string& node, const std::string& id, Registration r, const std::string& peer_ip,
           Done done) override;
  void remove(const std::string& node, const std::string& id, Done done) override;
  std::vector<Registration> expire(int64_t now_ms) override;
  std::optional<std::string> unavailable(int64_t now_ms) const override;
  const Entries& entries() const override { return entries_; }

  static constexpr int kMaxAttempts = 5;         // Txn retries after lost races
  static constexpr int64_t kApplyWaitMs = 2000;  // a write's answer waits this long at most for the watch

  struct Known;  // a container key as last seen (registry_etcd.cc)

 private:
  struct PutOp;
  struct RemoveOp;

  // Writes
  void put_step(std::shared_ptr<PutOp> op);
  void remove_step(std::shared_ptr<RemoveOp> op);
  void node_lease(const std::string& node, int64_t avoid,
                  std::function<void(int64_t lease, std::optional<std::string> error)> cb);
  Known known_container(const std::string& id) const;
  // Runs fn once the watch has applied `revision` (or kApplyWaitMs passed).
  void when_applied(int64_t revision, std::function<void()> fn);

  // The watch (results posted here)
  void on_reset(std::vector<etcd::KeyValue> kvs, int64_t revision);
  void on_events(std::vector<etcd::Event> events);
  void on_error(const std::string& e);
  void apply(const etcd::KeyValue& kv, bool deleted, const std::map<std::string, int64_t>& nodes_deleted);
  void advance(int64_t revision);

  // Freshness, heartbeat, compaction (loop timer)
  static void on_tick(evutil_socket_t, short, void* arg);
  void probe();
  void heartbeat();
  void compact_round();

  void post(std::function<void()> fn);

  int64_t lease_ms_;
  size_t max_;
  EtcdOptions opt_;
  std::string prefix_;  // "PREFIX/"
  std::string master_id_;
  event_base* base_;
  LoopPost loop_;
  std::unique_ptr<etcd::Client> client_;
  std::unique_ptr<etcd::Client::Watch> watch_;
  EventPtr tick_;

  // The copy (loop only)
  Entries entries_;
  struct Meta {
    int64_t mod_revision = 0, lease = 0;
    std::string value;
  };
  std::map<std::string, Meta> meta_;  // container id -> its key as applied
  struct NodeInfo {
    int64_t lease = 0, mod_revision = 0;
  };
  std::map<std::string, NodeInfo> nodes_;      // from nodes/NODE
  std::map<std::string, int64_t> lease_hint_;  // node -> lease this master just recorded (until the watch has it)
  std::map<std::string, std::vector<std::function<void(int64_t, std::optional<std::string>)>>>
      granting_;                                  // node -> waiters
  std::map<int64_t, int64_t> last_keepalive_ms_;  // lease id -> when this master last renewed it
  std::set<std::string> masters_;                 // live masters (their heartbeat keys)
  bool loaded_ = false;
  int64_t applied_ = 0;  // the last revision the copy reflects
  std::vector<Registration> expired_;
  std::multimap<int64_t, std::pair<int64_t, std::function<void()>>> apply_waiters_;  // revision -> (deadline, fn)

  // Freshness
  int64_t confirmed_ms_ = -1;                        // the copy is known current as of this time (monotonic)
  std::deque<std::pair<int64_t, int64_t>> confirm_;  // (revision, t0): current as of t0 once applied_ >= revision
  bool probing_ = false;
  int64_t last_probe_ms_ = 0;
  bool heartbeat_busy_ = false;
  int64_t heartbeat_rev_ = 0, heartbeat_written_ms_ = 0;  // the last heartbeat not yet seen on the watch
  std::string last_error_;
  int64_t last_error_log_ms_ = -1000000;

  // The master's own lease (its heartbeat key) and the compactor
  int64_t master_lease_ = 0;
  int64_t master_lease_renewed_ms_ = 0;
  bool master_lease_busy_ = false;
  int64_t compact_version_ = 0, compact_rev_ = 0, last_compact_ms_ = 0;
  bool compacting_ = false;
};

}  // namespace shimlet::master
