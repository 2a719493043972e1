#include "etcd/client.h"

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <set>
#include <thread>

#include "common/error.h"
#include "common/file.h"
#include "common/hostport.h"
#include "common/log.h"
#include "common/text.h"
#include "etcdserverpb/rpc.grpc.pb.h"

namespace shimlet::etcd {

namespace pb = etcdserverpb;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

namespace {

constexpr int64_t kListPage = 500;          // keys per Range page when listing a prefix
constexpr size_t kMaxListKeys = 2'000'000;  // a prefix bigger than this is refused, not loaded
constexpr size_t kMaxErrorText = 1024;      // bound on error lines built from server text
constexpr size_t kMaxPemBytes = 1 << 20;    // a CA bundle, a certificate chain or a key
constexpr int kMaxMessageBytes = 64 << 20;  // a watch batch (a node's lease expiring) can be large
constexpr int kBackoffStartMs = 100, kBackoffMaxMs = 2000;

std::string read_pem(const std::string& path, const char* what) {
  std::string s;
  try {
    s = read_regular_file(path, kMaxPemBytes);
  } catch (const std::exception& e) {
    throw Error(std::string("the etcd ") + what + ": " + e.what());
  }
  if (s.find("-----BEGIN") == std::string::npos) throw Error(std::string("etcd ") + what + " " + path + ": not PEM");
  return s;
}

const char* code_name(grpc::StatusCode c) {
  switch (c) {
    case grpc::StatusCode::CANCELLED:
      return "CANCELLED";
    case grpc::StatusCode::INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND:
      return "NOT_FOUND";
    case grpc::StatusCode::FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case grpc::StatusCode::OUT_OF_RANGE:
      return "OUT_OF_RANGE";
    case grpc::StatusCode::PERMISSION_DENIED:
      return "PERMISSION_DENIED";
    case grpc::StatusCode::UNAUTHENTICATED:
      return "UNAUTHENTICATED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
      return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::UNAVAILABLE:
      return "UNAVAILABLE";
    default:
      return "error";
  }
}

std::string describe(const Endpoint& ep, const grpc::Status& st) {
  return one_line(ep.url + ": " + code_name(st.error_code()) + ": " + st.error_message(), kMaxErrorText);
}

// Another member may answer what this one could not.
bool retryable(const grpc::Status& st) {
  switch (st.error_code()) {
    case grpc::StatusCode::UNAVAILABLE:
    case grpc::StatusCode::DEADLINE_EXCEEDED:
    case grpc::StatusCode::RESOURCE_EXHAUSTED:
    case grpc::StatusCode::UNKNOWN:
      return true;
    default:
      return false;
  }
}

KeyValue from_pb(const mvccpb::KeyValue& k) {
  KeyValue kv;
  kv.key = k.key();
  kv.value = k.value();
  kv.create_revision = k.create_revision();
  kv.mod_revision = k.mod_revision();
  kv.version = k.version();
  kv.lease = k.lease();
  return kv;
}

void to_pb(const Compare& c, pb::Compare* o) {
  o->set_key(c.key);
  switch (c.result) {
    case Compare::Result::Equal:
      o->set_result(pb::Compare::EQUAL);
      break;
    case Compare::Result::Greater:
      o->set_result(pb::Compare::GREATER);
      break;
    case Compare::Result::Less:
      o->set_result(pb::Compare::LESS);
      break;
    case Compare::Result::NotEqual:
      o->set_result(pb::Compare::NOT_EQUAL);
      break;
  }
  switch (c.target) {
    case Compare::Target::Version:
      o->set_target(pb::Compare::VERSION);
      o->set_version(c.number);
      break;
    case Compare::Target::Create:
      o->set_target(pb::Compare::CREATE);
      o->set_create_revision(c.number);
      break;
    case Compare::Target::Mod:
      o->set_target(pb::Compare::MOD);
      o->set_mod_revision(c.number);
      break;
    case Compare::Target::Value:
      o->set_target(pb::Compare::VALUE);
      o->set_value(c.value);
      break;
    case Compare::Target::Lease:
      o->set_target(pb::Compare::LEASE);
      o->set_lease(c.number);
      break;
  }
}

void to_pb(const Op& op, pb::RequestOp* o) {
  switch (op.kind) {
    case Op::Kind::Get:
      o->mutable_request_range()->set_key(op.key);
      break;
    case Op::Kind::Put: {
      auto* p = o->mutable_request_put();
      p->set_key(op.key);
      p->set_value(op.value);
      p->set_lease(op.lease);
      break;
    }
    case Op::Kind::Delete:
      o->mutable_request_delete_range()->set_key(op.key);
      break;
  }
}

// gRPC takes deadlines on the system clock; ours are monotonic.
std::chrono::system_clock::time_point grpc_deadline(Clock::time_point t) {
  return std::chrono::system_clock::now() +
         std::chrono::duration_cast<std::chrono::system_clock::duration>(t - Clock::now());
}

// "[v6]" for gRPC targets, the name or IPv4 literal otherwise.
std::string target_of(const Endpoint& ep) {
  std::string h = ep.host.find(':') != std::string::npos ? "[" + ep.host + "]" : ep.host;
  return h + ":" + std::to_string(ep.port);
}

}  // namespace

std::vector<Endpoint> parse_endpoints(std::string_view list) {
  std::vector<Endpoint> out;
  size_t pos = 0;
  while (pos <= list.size()) {
    size_t comma = list.find(',', pos);
    std::string_view item = list.substr(pos, comma == std::string_view::npos ? std::string_view::npos : comma - pos);
    pos = comma == std::string_view::npos ? list.size() + 1 : comma + 1;
    while (!item.empty() && item.front() == ' ') item.remove_prefix(1);
    while (!item.empty() && item.back() == ' ') item.remove_suffix(1);
    if (item.empty()) continue;
    auto bad = [&](const std::string& why) {
      return Error("bad etcd server URL '" + one_line(item.substr(0, 256)) + "': " + why);
    };
    Endpoint ep;
    ep.url = std::string(item);
    std::string_view rest;
    if (item.substr(0, 8) == "https://") {
      rest = item.substr(8);
    } else if (item.substr(0, 7) == "http://") {
      ep.tls = false;
      rest = item.substr(7);
    } else {
      throw bad("must start with https:// or http://");
    }
    if (!rest.empty() && rest.back() == '/') rest.remove_suffix(1);
    if (rest.find_first_of("/?#@ \t\r\n") != std::string_view::npos)
      throw bad("HOST[:PORT] only (no path, user info or query)");
    try {
      HostPort hp = parse_host_port(rest);
      ep.host = std::move(hp.host);
      if (hp.port) ep.port = *hp.port;
    } catch (const Error& e) {
      throw bad(e.what());
    }
    for (char c : ep.host)
      if (!isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '-' && c != ':' && c != '_')
        throw bad("bad character in the host");
    out.push_back(std::move(ep));
    if (out.size() > 64) throw Error("more than 64 etcd servers");
  }
  if (out.empty()) throw Error("no etcd server URL given");
  return out;
}

std::string prefix_end(std::string_view prefix) {
  std::string end(prefix);
  while (!end.empty()) {
    unsigned char c = static_cast<unsigned char>(end.back());
    if (c < 0xff) {
      end.back() = static_cast<char>(c + 1);
      return end;
    }
    end.pop_back();
  }
  return std::string(1, '\0');  // every key
}

// ---------------------------------------------------------------- client

struct Conn {
  Endpoint ep;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<pb::KV::Stub> kv;
  std::unique_ptr<pb::Lease::Stub> lease;
  std::unique_ptr<pb::Watch::Stub> watch;
};

// Waits until `until` (or until the channel changes state) in a way that
// polls gRPC's connections: with the synchronous API only a thread waiting
// inside gRPC drives its I/O, and a call that fails fast (its channel in
// TRANSIENT_FAILURE) does not wait, so with nothing else running a member
// that came back would only be reconnected when some gRPC timer fires.
void idle(Conn& c, Clock::time_point until) {
  auto st = c.channel->GetState(true);
  c.channel->WaitForStateChange(st, grpc_deadline(until));
}

struct Job {
  const char* what = "";
  std::function<grpc::Status(Conn&, grpc::ClientContext&, Result&)> call;
  Callback cb;
  Clock::time_point deadline;
};

struct Client::Impl {
  Config cfg;
  std::vector<std::unique_ptr<Conn>> conns;
  std::atomic<size_t> preferred{0};

  std::mutex mu;
  std::condition_variable cv;
  std::deque<Job> queue;
  bool stopping = false;
  std::set<grpc::ClientContext*> active;
  std::vector<std::thread> workers;

  // Registers a context for cancellation at stop(); false when stopping.
  bool track(grpc::ClientContext* c) {
    std::lock_guard lk(mu);
    if (stopping) return false;
    active.insert(c);
    return true;
  }
  void untrack(grpc::ClientContext* c) {
    std::lock_guard lk(mu);
    active.erase(c);
  }

  void submit(Job j) {
    j.deadline = Clock::now() + milliseconds(cfg.request_timeout_ms);
    {
      std::lock_guard lk(mu);
      if (!stopping && queue.size() < cfg.max_queued) {
        queue.push_back(std::move(j));
        cv.notify_one();
        return;
      }
    }
    Result r;
    r.error = std::string("etcd ") + j.what + ": " + std::to_string(cfg.max_queued) +
              " calls already waiting for etcd (overloaded or unreachable)";
    deliver(j, std::move(r));
  }

  static void deliver(Job& j, Result r) {
    try {
      j.cb(std::move(r));
    } catch (const std::exception& e) {
      log::error("etcd callback failed", {{"call", j.what}, {"error", e.what()}});
    }
  }

  void worker() {
    for (;;) {
      Job j;
      {
        std::unique_lock lk(mu);
        cv.wait(lk, [&] { return stopping || !queue.empty(); });
        if (stopping) return;
        j = std::move(queue.front());
        queue.pop_front();
      }
      run(j);
    }
  }

  // Tries the endpoints in turn, from the one that answered last, until one
  // answers or the deadline passes. A round where every member failed at
  // once (no leader yet, all unreachable) is followed by a short pause and
  // another round: an election finishes within the deadline.
  void run(Job& j) {
    const size_t n = conns.size();
    const size_t first = preferred.load() % n;
    std::string errs;
    int pause_ms = 25;
    for (size_t i = 0;; ++i) {
      const auto now = Clock::now();
      if (now >= j.deadline) break;
      const size_t idx = (first + i) % n;
      Conn& c = *conns[idx];
      grpc::ClientContext ctx;
      // This member's share of what is left: the rest of the round splits it.
      ctx.set_deadline(grpc_deadline(now + (j.deadline - now) / static_cast<int>(n - i % n)));
      if (!track(&ctx)) return;
      Result r;
      grpc::Status st;
      try {
        st = j.call(c, ctx, r);
      } catch (const std::exception& e) {
        st = grpc::Status(grpc::StatusCode::INTERNAL, e.what());
      }
      untrack(&ctx);
      {
        std::lock_guard lk(mu);
        if (stopping) return;
      }
      r.endpoint = c.ep.url;
      if (st.ok()) {
        preferred = idx;
        deliver(j, std::move(r));
        return;
      }
      if (!retryable(st)) {
        preferred = idx;
        r.not_found = st.error_code() == grpc::StatusCode::NOT_FOUND;
        r.compacted = st.error_code() == grpc::StatusCode::OUT_OF_RANGE;
        r.error = std::string("etcd ") + j.what + " at " + describe(c.ep, st);
        deliver(j, std::move(r));
        return;
      }
      if (i < n) errs += (errs.empty() ? "" : "; ") + describe(c.ep, st);  // the first round's reasons
      if ((i + 1) % n == 0) {
        const auto until = std::min(j.deadline, Clock::now() + milliseconds(pause_ms));
        idle(*conns[(first + i + 1) % n], until);
        {
          std::lock_guard lk(mu);
          if (stopping) return;
        }
        pause_ms = std::min(pause_ms * 2, 500);
      }
    }
    Result r;
    r.error = std::string("etcd ") + j.what + ": no member answered within " + std::to_string(cfg.request_timeout_ms) +
              " ms (" + (errs.empty() ? "queued too long" : errs) + ")";
    deliver(j, std::move(r));
  }

  void stop() {
    {
      std::lock_guard lk(mu);
      stopping = true;
      for (auto* c : active) c->TryCancel();
      queue.clear();
    }
    cv.notify_all();
    for (auto& t : workers)
      if (t.joinable()) t.join();
    workers.clear();
  }
};

Client::Client(Config cfg) : impl_(std::make_shared<Impl>()) {
  if (cfg.endpoints.empty()) throw Error("no etcd endpoints");
  if (cfg.cert_file.empty() != cfg.key_file.empty()) throw Error("--etcd-certfile and --etcd-keyfile go together");
  grpc::SslCredentialsOptions ssl;
  if (!cfg.ca_file.empty()) ssl.pem_root_certs = read_pem(cfg.ca_file, "CA file");
  if (!cfg.cert_file.empty()) {
    ssl.pem_cert_chain = read_pem(cfg.cert_file, "certificate file");
    ssl.pem_private_key = read_pem(cfg.key_file, "key file");
  }
  if (cfg.request_timeout_ms < 100) cfg.request_timeout_ms = 100;
  if (cfg.workers < 1) cfg.workers = 1;
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(kMaxMessageBytes);
  // A member that comes back is used again within a second, not after
  // gRPC's default exponential backoff (up to two minutes). (The "min
  // backoff" is each connection attempt's timeout: a busy machine needs more
  // than a fraction of a second to finish a TLS handshake.)
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 200);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 5000);
  // Dead connections under a long-lived watch are noticed (etcd's default
  // --grpc-keepalive-min-time is 5 s; pings only while a call is open).
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 10000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 5000);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 0);
  // Each endpoint its own connection, whatever other channels exist.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  for (const auto& ep : cfg.endpoints) {
    auto c = std::make_unique<Conn>();
    c->ep = ep;
    auto creds = ep.tls ? grpc::SslCredentials(ssl) : grpc::InsecureChannelCredentials();
    c->channel = grpc::CreateCustomChannel(target_of(ep), creds, args);
    c->kv = pb::KV::NewStub(c->channel);
    c->lease = pb::Lease::NewStub(c->channel);
    c->watch = pb::Watch::NewStub(c->channel);
    impl_->conns.push_back(std::move(c));
  }
  impl_->cfg = std::move(cfg);
  for (int i = 0; i < impl_->cfg.workers; i++) impl_->workers.emplace_back([p = impl_.get()] { p->worker(); });
}

Client::~Client() { impl_->stop(); }

const std::vector<Endpoint>& Client::endpoints() const { return impl_->cfg.endpoints; }

void Client::range(std::string key, RangeOptions opt, Callback cb) {
  Job j;
  j.what = "range";
  j.cb = std::move(cb);
  j.call = [key = std::move(key), opt = std::move(opt)](Conn& c, grpc::ClientContext& ctx, Result& r) {
    pb::RangeRequest rq;
    rq.set_key(key);
    rq.set_range_end(opt.range_end);
    rq.set_limit(opt.limit);
    rq.set_revision(opt.revision);
    rq.set_serializable(opt.serializable);
    rq.set_count_only(opt.count_only);
    pb::RangeResponse rs;
    grpc::Status st = c.kv->Range(&ctx, rq, &rs);
    if (!st.ok()) return st;
    r.revision = rs.header().revision();
    r.count = rs.count();
    r.more = rs.more();
    for (const auto& k : rs.kvs()) r.kvs.push_back(from_pb(k));
    return st;
  };
  impl_->submit(std::move(j));
}

void Client::txn(Txn t, Callback cb) {
  Job j;
  j.what = "txn";
  j.cb = std::move(cb);
  auto rq = std::make_shared<pb::TxnRequest>();
  for (const auto& c : t.compare) to_pb(c, rq->add_compare());
  for (const auto& o : t.success) to_pb(o, rq->add_success());
  for (const auto& o : t.failure) to_pb(o, rq->add_failure());
  j.call = [rq](Conn& c, grpc::ClientContext& ctx, Result& r) {
    pb::TxnResponse rs;
    grpc::Status st = c.kv->Txn(&ctx, *rq, &rs);
    if (!st.ok()) return st;
    r.revision = rs.header().revision();
    r.succeeded = rs.succeeded();
    for (const auto& op : rs.responses()) {
      std::vector<KeyValue> kvs;
      if (op.has_response_range())
        for (const auto& k : op.response_range().kvs()) kvs.push_back(from_pb(k));
      r.op_kvs.push_back(std::move(kvs));
    }
    return st;
  };
  impl_->submit(std::move(j));
}

void Client::lease_grant(int64_t ttl_s, Callback cb) {
  Job j;
  j.what = "lease grant";
  j.cb = std::move(cb);
  j.call = [ttl_s](Conn& c, grpc::ClientContext& ctx, Result& r) {
    pb::LeaseGrantRequest rq;
    rq.set_ttl(ttl_s);
    pb::LeaseGrantResponse rs;
    grpc::Status st = c.lease->LeaseGrant(&ctx, rq, &rs);
    if (!st.ok()) return st;
    if (!rs.error().empty()) return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, rs.error());
    r.revision = rs.header().revision();
    r.lease_id = rs.id();
    r.ttl = rs.ttl();
    return st;
  };
  impl_->submit(std::move(j));
}

void Client::lease_revoke(int64_t id, Callback cb) {
  Job j;
  j.what = "lease revoke";
  j.cb = std::move(cb);
  j.call = [id](Conn& c, grpc::ClientContext& ctx, Result& r) {
    pb::LeaseRevokeRequest rq;
    rq.set_id(id);
    pb::LeaseRevokeResponse rs;
    grpc::Status st = c.lease->LeaseRevoke(&ctx, rq, &rs);
    if (st.ok()) r.revision = rs.header().revision();
    return st;
  };
  impl_->submit(std::move(j));
}

void Client::lease_keep_alive(int64_t id, Callback cb) {
  Job j;
  j.what = "lease keep-alive";
  j.cb = std::move(cb);
  j.call = [id](Conn& c, grpc::ClientContext& ctx, Result& r) {
    // etcd answers each request on the stream before it reads the next, so
    // one request then a half-close gets exactly one answer.
    auto stream = c.lease->LeaseKeepAlive(&ctx);
    pb::LeaseKeepAliveRequest rq;
    rq.set_id(id);
    if (!stream->Write(rq)) {
      grpc::Status st = stream->Finish();
      return st.ok() ? grpc::Status(grpc::StatusCode::UNAVAILABLE, "keep-alive stream closed") : st;
    }
    stream->WritesDone();
    pb::LeaseKeepAliveResponse rs;
    bool got = stream->Read(&rs);
    grpc::Status st = stream->Finish();
    if (!got) return st.ok() ? grpc::Status(grpc::StatusCode::UNAVAILABLE, "no keep-alive answer") : st;
    r.revision = rs.header().revision();
    r.lease_id = rs.id();
    r.ttl = rs.ttl();
    return grpc::Status::OK;
  };
  impl_->submit(std::move(j));
}

void Client::compact(int64_t revision, Callback cb) {
  Job j;
  j.what = "compact";
  j.cb = std::move(cb);
  j.call = [revision](Conn& c, grpc::ClientContext& ctx, Result& r) {
    pb::CompactionRequest rq;
    rq.set_revision(revision);
    pb::CompactionResponse rs;
    grpc::Status st = c.kv->Compact(&ctx, rq, &rs);
    if (st.ok()) r.revision = rs.header().revision();
    return st;
  };
  impl_->submit(std::move(j));
}

// ---------------------------------------------------------------- watch

struct Client::Watch::Impl {
  std::shared_ptr<Client::Impl> client;  // the channels outlive the thread
  std::string prefix, end;
  WatchHandler h;
  size_t cursor = 0;

  std::mutex mu;
  std::condition_variable cv;
  bool stop = false;
  std::string restart_why;
  grpc::ClientContext* ctx = nullptr;  // the call in progress (cancelled by stop/restart)
  std::thread thread;

  Conn& conn() { return *client->conns[cursor % client->conns.size()]; }
  void next_endpoint() { cursor++; }

  bool begin(grpc::ClientContext* c) {
    std::lock_guard lk(mu);
    if (stop) return false;
    ctx = c;
    return true;
  }
  // Ends a call; returns why it was cancelled by restart() ("" = it was not).
  std::string end_call() {
    std::lock_guard lk(mu);
    ctx = nullptr;
    return std::exchange(restart_why, "");
  }
  bool stopped() {
    std::lock_guard lk(mu);
    return stop;
  }
  // Waits ms (polling the next endpoint's connection: idle()) unless
  // stopped; false when stopped.
  bool sleep_ms(int ms) {
    const auto until = Clock::now() + milliseconds(ms);
    while (Clock::now() < until) {
      if (stopped()) return false;
      idle(conn(), std::min(until, Clock::now() + milliseconds(100)));
    }
    return !stopped();
  }
  void report(const std::string& e) {
    if (h.error) h.error(one_line(e, kMaxErrorText));
  }

  // Lists the prefix at one revision, in pages; false on failure (reported).
  bool list(int64_t* revision) {
    std::vector<KeyValue> all;
    int64_t rev = 0;
    std::string key = prefix;
    for (;;) {
      grpc::ClientContext c;
      c.set_deadline(grpc_deadline(Clock::now() + milliseconds(client->cfg.request_timeout_ms)));
      if (!begin(&c)) return false;
      pb::RangeRequest rq;
      rq.set_key(key);
      rq.set_range_end(end);
      rq.set_limit(kListPage);
      rq.set_revision(rev);
      pb::RangeResponse rs;
      grpc::Status st = conn().kv->Range(&c, rq, &rs);
      std::string why = end_call();
      if (!st.ok()) {
        if (!stopped())
          report("etcd list of " + prefix + " at " + describe(conn().ep, st) + (why.empty() ? "" : " (" + why + ")"));
        return false;
      }
      if (rev == 0) rev = rs.header().revision();
      for (const auto& k : rs.kvs()) all.push_back(from_pb(k));
      if (all.size() > kMaxListKeys) {
        report("etcd list of " + prefix + ": more than " + std::to_string(kMaxListKeys) + " keys");
        return false;
      }
      if (!rs.more() || rs.kvs_size() == 0) break;
      key = rs.kvs(rs.kvs_size() - 1).key() + std::string(1, '\0');
    }
    if (h.reset) h.reset(std::move(all), rev);
    *revision = rev;
    return true;
  }

  void run() {
    int64_t next = 0;  // next revision to watch from; 0 = list first
    int backoff = kBackoffStartMs;
    while (!stopped()) {
      if (next == 0) {
        int64_t rev = 0;
        if (!list(&rev)) {
          next_endpoint();
          if (!sleep_ms(backoff)) return;
          backoff = std::min(backoff * 2, kBackoffMaxMs);
          continue;
        }
        next = rev + 1;
      }
      grpc::ClientContext c;
      if (!begin(&c)) return;
      Conn& cn = conn();
      auto stream = cn.watch->Watch(&c);
      pb::WatchRequest wr;
      auto* cr = wr.mutable_create_request();
      cr->set_key(prefix);
      cr->set_range_end(end);
      cr->set_start_revision(next);
      std::string failure;
      if (stream->Write(wr)) {
        pb::WatchResponse rs;
        while (stream->Read(&rs)) {
          if (rs.canceled()) {
            if (rs.compact_revision() > 0) {
              failure = "the watch fell behind compaction at revision " + std::to_string(rs.compact_revision()) +
                        ": listing again";
              next = 0;
            } else {
              failure = "etcd cancelled the watch: " + rs.cancel_reason();
            }
            c.TryCancel();
            break;
          }
          if (rs.created()) {
            backoff = kBackoffStartMs;
            continue;
          }
          if (rs.events_size() == 0) continue;
          std::vector<Event> evs;
          evs.reserve(static_cast<size_t>(rs.events_size()));
          int64_t last = next - 1;
          for (const auto& e : rs.events()) {
            Event ev;
            ev.deleted = e.type() == mvccpb::Event::DELETE;
            ev.kv = from_pb(e.kv());
            last = std::max(last, ev.kv.mod_revision);
            evs.push_back(std::move(ev));
          }
          next = last + 1;
          if (h.events) h.events(std::move(evs));
        }
      }
      grpc::Status st = stream->Finish();
      std::string why = end_call();
      if (stopped()) return;
      if (!why.empty())
        failure = "watch on " + cn.ep.url + " restarted: " + why;
      else if (failure.empty())
        failure =
            "watch on " + describe(cn.ep, st.ok() ? grpc::Status(grpc::StatusCode::UNAVAILABLE, "stream ended") : st);
      report(failure);
      next_endpoint();
      if (!sleep_ms(backoff)) return;
      backoff = std::min(backoff * 2, kBackoffMaxMs);
    }
  }
};

Client::Watch::Watch(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Client::Watch::~Watch() {
  {
    std::lock_guard lk(impl_->mu);
    impl_->stop = true;
    if (impl_->ctx) impl_->ctx->TryCancel();
  }
  impl_->cv.notify_all();
  if (impl_->thread.joinable()) impl_->thread.join();
}

void Client::Watch::restart(const std::string& why) {
  std::lock_guard lk(impl_->mu);
  if (!impl_->ctx) return;
  impl_->restart_why = why;
  impl_->ctx->TryCancel();
}

std::unique_ptr<Client::Watch> Client::watch_prefix(std::string prefix, WatchHandler h) {
  auto w = std::make_unique<Watch::Impl>();
  w->client = impl_;
  w->end = prefix_end(prefix);
  w->prefix = std::move(prefix);
  w->h = std::move(h);
  w->cursor = impl_->preferred.load();
  Watch::Impl* raw = w.get();
  std::unique_ptr<Watch> out(new Watch(std::move(w)));
  raw->thread = std::thread([raw] { raw->run(); });
  return out;
}

}  // namespace shimlet::etcd
