// An etcd v3 client for shimlet-master's registry (docs/design.md "Registry
// in etcd"): the KV, Lease and Watch calls it needs, over etcd's gRPC API
// (Debian's libgrpc++; etcd/proto/ is the subset of etcd's public API we
// use), TLS with a client certificate, several endpoints with failover.
//
// Threads: a caller never blocks on etcd. A call is queued (bounded:
// Config::max_queued, beyond which it fails at once) for a small pool of
// worker threads that run it with gRPC's synchronous API under a deadline
// (Config::request_timeout_ms) and call back ON THAT WORKER THREAD with the
// Result. A Watch runs on its own thread and calls back there too. Callbacks
// must be quick and must not destroy the Client; shimlet-master hands them to
// its event loop (master/loop_post.h).
//
// Failover: one gRPC channel per endpoint. A call starts at the endpoint
// that answered last and moves to the next one when the current one is
// unreachable (gRPC UNAVAILABLE: refused, reset, "no leader", etcd's own
// request timeout) or when its share of the deadline passes (remaining time
// / remaining endpoints, so one hung member cannot eat the whole deadline).
// Any other error is etcd's answer and ends the call. A write that timed out
// on one member may still have been applied there: callers write only in
// compare-guarded Txns, where a replay fails its compare and says so.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace shimlet::etcd {

struct Endpoint {
  std::string url;   // as given, for messages
  std::string host;  // name or IP literal (no brackets)
  uint16_t port = 2379;
  bool tls = true;  // https:// (http:// = plaintext)
};
// Parses kube-apiserver's --etcd-servers: comma-separated
// http(s)://HOST[:PORT] (no path, user info, query). Throws shimlet::Error.
std::vector<Endpoint> parse_endpoints(std::string_view list);

struct Config {
  std::vector<Endpoint> endpoints;
  std::string ca_file;    // PEM bundle verifying the members ("" = the system trust store)
  std::string cert_file;  // client certificate (PEM), with key_file
  std::string key_file;
  int request_timeout_ms = 5000;  // each call, all endpoints tried included
  size_t max_queued = 1024;       // calls waiting for a worker
  int workers = 4;
};

struct KeyValue {
  std::string key, value;
  int64_t create_revision = 0, mod_revision = 0, version = 0, lease = 0;
};

struct Event {
  bool deleted = false;  // DELETE (kv.mod_revision = the deletion's revision), else PUT
  KeyValue kv;
};

// One Txn comparison: `target(key) result number/value`.
struct Compare {
  enum class Target { Version, Create, Mod, Value, Lease };
  enum class Result { Equal, Greater, Less, NotEqual };
  std::string key;
  Target target = Target::Mod;
  Result result = Result::Equal;
  int64_t number = 0;  // Version/Create/Mod/Lease
  std::string value;   // Value
};

struct Op {
  enum class Kind { Get, Put, Delete };
  Kind kind = Kind::Get;
  std::string key, value;
  int64_t lease = 0;  // Put
};

struct Txn {
  std::vector<Compare> compare;
  std::vector<Op> success, failure;
};

// The outcome of one call.
struct Result {
  std::optional<std::string> error;  // nullopt = etcd answered; else one line: what, where, why
  bool not_found = false;            // etcd answered NOT_FOUND (a lease that does not exist)
  bool compacted = false;            // etcd answered OUT_OF_RANGE (a revision already compacted)
  int64_t revision = 0;              // the response header's store revision
  std::string endpoint;              // the member that answered (or the last one tried)
  // Range: the keys (and count, more). Txn: `succeeded`, and for each op of
  // the branch that ran, the keys its Get returned (empty for Put/Delete).
  std::vector<KeyValue> kvs;
  int64_t count = 0;
  bool more = false;
  bool succeeded = false;
  std::vector<std::vector<KeyValue>> op_kvs;
  // LeaseGrant / LeaseKeepAlive: the lease and its TTL (keep-alive: <= 0 =
  // the lease is gone).
  int64_t lease_id = 0, ttl = 0;
};
using Callback = std::function<void(Result)>;

struct RangeOptions {
  std::string range_end;  // "" = only the key; prefix_end(p) = every key under p
  int64_t limit = 0;
  int64_t revision = 0;       // 0 = now
  bool serializable = false;  // false = linearizable (a quorum read)
  bool count_only = false;
};

// The range end that selects every key starting with prefix.
std::string prefix_end(std::string_view prefix);

// What a Watch reports, on its own thread.
struct WatchHandler {
  // The full contents under the prefix at `revision` (at start, and again
  // after the watch fell behind a compaction): replaces what was known.
  std::function<void(std::vector<KeyValue> kvs, int64_t revision)> reset;
  // Changes after that, in revision order; every event of one revision in one call.
  std::function<void(std::vector<Event> events)> events;
  // A failed list or stream (the watch retries on the next endpoint by itself).
  std::function<void(std::string error)> error;
};

class Client {
 public:
  // Creates the channels (no connection yet) and starts the workers. Reads
  // the TLS files now; throws shimlet::Error naming a bad file or endpoint.
  explicit Client(Config cfg);
  // Cancels calls in flight and joins the workers; queued calls are dropped
  // without their callback. Destroy every Watch first.
  ~Client();
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  void range(std::string key, RangeOptions opt, Callback cb);
  void txn(Txn t, Callback cb);
  void lease_grant(int64_t ttl_s, Callback cb);
  void lease_revoke(int64_t id, Callback cb);
  // One LeaseKeepAlive round trip (a short stream: one request, one answer).
  void lease_keep_alive(int64_t id, Callback cb);
  void compact(int64_t revision, Callback cb);

  // A prefix watch with its own thread: lists the prefix (linearizable, in
  // pages, at one revision), reports it (reset), then watches from the next
  // revision; a broken stream resumes from the last revision seen on the
  // next endpoint (short backoff); a watch that fell behind a compaction
  // lists again. restart() drops the current stream and goes on at the next
  // endpoint (the registry calls it when its own heartbeat does not come back).
  class Watch {
   public:
    ~Watch();  // stops and joins the thread
    void restart(const std::string& why);
    struct Impl;

   private:
    friend class Client;
    explicit Watch(std::unique_ptr<Impl> impl);
    std::unique_ptr<Impl> impl_;
  };
  std::unique_ptr<Watch> watch_prefix(std::string prefix, WatchHandler h);

  const std::vector<Endpoint>& endpoints() const;
  struct Impl;

 private:
  std::shared_ptr<Impl> impl_;
};

}  // namespace shimlet::etcd
