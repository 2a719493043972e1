// shimlet-cri's interceptor (Exec, ExecSync, PortForward through the shims)
// and the server around it. See cri/cri.h and docs/design.md "CRI proxy".
#include <grpcpp/grpcpp.h>
#include <openssl/crypto.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <ctime>
#include <limits>
#include <mutex>
#include <thread>
#include <unordered_set>

#include "client/client.h"
#include "common/log.h"
#include "common/systemd.h"
#include "cri/cri.h"
#include "cri/proxy.h"
#include "cri/requests.h"

namespace shimlet::cri {
namespace {

constexpr const char* kTicketSubject = "system:shimlet-cri";  // the audit `user` of tickets minted here
constexpr size_t kMaxFallbackLogged = 4096;                   // containers remembered for "log once"

std::string to_string(const grpc::ByteBuffer& b) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!b.Dump(&slices).ok()) return out;
  for (const auto& s : slices) out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

grpc::ByteBuffer to_buffer(const std::string& s) {
  grpc::Slice slice(s);
  return grpc::ByteBuffer(&slice, 1);
}

// The shim that wrote this registration and the container's init still run
// (pid and start time, client::registration_alive); one without a recorded
// shim pid is not trusted.
bool shim_alive(const client::Registration& r) { return r.shim_pid > 0 && r.alive; }

class ShimInterceptor final : public Interceptor {
 public:
  explicit ShimInterceptor(const Options& opt) : opt_(opt) {}

  bool wants(const std::string& m) const override {
    // v1alpha2 has the same messages (older kubelets and crictl): served alike.
    for (const char* v : {"/runtime.v1.RuntimeService/", "/runtime.v1alpha2.RuntimeService/"})
      if (m.starts_with(v)) {
        std::string_view name = std::string_view(m).substr(strlen(v));
        return name == "Exec" || name == "ExecSync" || name == "PortForward";
      }
    return false;
  }

  void handle(Call* call, const grpc::ByteBuffer& request) override {
    std::string_view name = call->method();
    name = name.substr(name.rfind('/') + 1);
    std::string bytes = to_string(request);
    try {
      if (name == "Exec") return exec(call, bytes);
      if (name == "PortForward") return port_forward(call, bytes);
      return exec_sync(call, bytes);
    } catch (const std::exception& e) {
      // A failure of ours (unreadable node key, ...): the runtime serves it.
      log::error("cannot serve the call through a shim: the runtime serves it",
                 {{"method", call->method()}, {"error", e.what()}});
      call->forward();
    }
  }

 private:
  // STATE/<id>/registration.json of a live shim, else nullopt (logged once per container).
  std::optional<client::Registration> live(const std::string& id, const std::string& method) {
    auto r = client::read_registration(opt_.state_dir + "/" + id + "/registration.json");
    if (r && r->id == id && shim_alive(*r)) return r;
    fallback(id, method, r ? "its shim is not running" : "no shim registered (hook not registered?)");
    return std::nullopt;
  }

  void fallback(const std::string& id, const std::string& method, const std::string& why) {
    std::lock_guard lock(mu_);
    if (logged_.size() >= kMaxFallbackLogged) logged_.clear();
    if (logged_.insert(id).second)
      log::warn("container served by the runtime, not a shim",
                {{"container", id}, {"method", method}, {"reason", why}});
  }

  void answer(Call* call, const google::protobuf::MessageLite& m) {
    grpc::ByteBuffer b = to_buffer(m.SerializeAsString());
    call->answer(grpc::Status::OK, &b);
  }

  std::string mint(const client::Registration& reg, ticket::Claims c) {
    std::string key = client::read_node_key(opt_.state_dir);
    std::string t =
        client::sign_local_ticket(reg.id, opt_.state_dir + "/local.key", key, std::move(c), {},
                                  static_cast<int64_t>(std::time(nullptr)), kTicketSubject, opt_.url_ticket_lifetime_s);
    OPENSSL_cleanse(key.data(), key.size());
    return t;
  }

  void exec(Call* call, const std::string& bytes) {
    runtime::v1::ExecRequest req;
    std::optional<ExecPlan> plan;
    if (!req.ParseFromString(bytes) || !(plan = plan_exec(req))) return call->forward();
    auto reg = live(req.container_id(), call->method());
    if (!reg) return call->forward();
    if (reg->cri_endpoint.empty()) {
      fallback(reg->id, call->method(), "its shim has no CRI listener (hook config cri_listen)");
      return call->forward();
    }
    runtime::v1::ExecResponse resp;
    resp.set_url(exec_url(reg->cri_endpoint, mint(*reg, exec_claims(*plan)), *plan));
    answer(call, resp);
  }

  void port_forward(Call* call, const std::string& bytes) {
    runtime::v1::PortForwardRequest req;
    std::optional<std::vector<ticket::Port>> ports;
    if (!req.ParseFromString(bytes) || !(ports = plan_port_forward(req))) return call->forward();
    std::vector<client::Registration> alive;
    for (auto& r : client::load_registrations(opt_.state_dir))
      if ((r.id == req.pod_sandbox_id() || r.sandbox_id == req.pod_sandbox_id()) && shim_alive(r))
        alive.push_back(std::move(r));
    const client::Registration* reg = pick_pod_target(alive, req.pod_sandbox_id());
    if (!reg) {
      fallback(req.pod_sandbox_id(), call->method(), "no live shim with a CRI listener in this pod");
      return call->forward();
    }
    runtime::v1::PortForwardResponse resp;
    resp.set_url(port_forward_url(reg->cri_endpoint, mint(*reg, port_forward_claims(*ports))));
    answer(call, resp);
  }

  void exec_sync(Call* call, const std::string& bytes) {
    runtime::v1::ExecSyncRequest req;
    std::optional<ExecSyncPlan> plan;
    if (!req.ParseFromString(bytes) || !(plan = plan_exec_sync(req))) return call->forward();
    auto reg = live(req.container_id(), call->method());
    if (!reg) return call->forward();
    if (reg->local_socket.empty()) {
      fallback(reg->id, call->method(), "its shim has no local socket (an older hook)");
      return call->forward();
    }
    if (running_.fetch_add(1) >= opt_.max_exec_sync) {
      running_.fetch_sub(1);
      log::warn("too many ExecSync calls at once: this one goes to the runtime",
                {{"container", reg->id}, {"limit", opt_.max_exec_sync}});
      return call->forward();
    }
    // The exec blocks on its own event loop: off gRPC's callback threads.
    try {
      std::thread([this, call, reg = std::move(*reg), plan = std::move(*plan), timeout_s = req.timeout()]() mutable {
        run_exec_sync(call, reg, plan, timeout_s);
        running_.fetch_sub(1);
      }).detach();
    } catch (...) {
      running_.fetch_sub(1);
      throw;
    }
  }

  void run_exec_sync(Call* call, const client::Registration& reg, const ExecSyncPlan& plan, int64_t timeout_s) {
    int64_t timeout_ms = plan.timeout_ms;
    if (auto dl = call->deadline(); dl != std::chrono::system_clock::time_point::max()) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(dl - std::chrono::system_clock::now()).count();
      left = std::max<int64_t>(left, 1);
      // A deadline beyond the timer's int: its cancellation ends the exec.
      if (left <= std::numeric_limits<int>::max() && (timeout_ms == 0 || left < timeout_ms)) timeout_ms = left;
    }
    client::CapturedExec r;
    try {
      client::LocalExec le = client::local_exec_for(reg, opt_.state_dir);
      le.sub = kTicketSubject;
      client::ExecOptions ex;
      ex.command = plan.cmd;
      r = client::run_captured_exec(le, ex, opt_.exec_sync_max_output, static_cast<int>(timeout_ms),
                                    call->cancelled_fd());
    } catch (const std::exception& e) {
      r.error = e.what();
    }
    // The client gone, or the time up: answered as such even when the shim had
    // not taken the exec yet (running it again elsewhere would overrun both).
    if (r.cancelled) return call->answer(grpc::Status(grpc::StatusCode::CANCELLED, "context canceled"), nullptr);
    if (!r.timed_out && (!r.request_sent || (r.http_status != 0 && r.http_status != 200 && !r.status_received))) {
      // Nothing ran: the runtime can still serve it.
      fallback(reg.id, call->method(), "the shim did not take the exec: " + r.error);
      return call->forward();
    }
    if (r.timed_out) {
      // containerd kills the exec and answers DeadlineExceeded naming the
      // request's timeout (the client's own deadline: the client sees its own error).
      return call->answer(
          grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED,
                       timeout_s > 0 ? exec_sync_timeout_message(timeout_s) : "context deadline exceeded"),
          nullptr);
    }
    if (!r.status_received)
      return call->answer(grpc::Status(grpc::StatusCode::UNKNOWN, "exec through the shim failed: " + r.error), nullptr);
    if (!r.status_error.empty())  // the command could not start: containerd's runc exec error is UNKNOWN too
      return call->answer(grpc::Status(grpc::StatusCode::UNKNOWN, "failed to exec in container: " + r.status_error),
                          nullptr);
    runtime::v1::ExecSyncResponse resp;
    resp.set_stdout(std::move(r.out));
    resp.set_stderr(std::move(r.err));
    resp.set_exit_code(r.exit_code);
    size_t size = resp.ByteSizeLong();
    if (size > opt_.max_message)  // what the gRPC send of containerd's (Go) server says
      return call->answer(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                                       "grpc: trying to send message larger than max (" + std::to_string(size) +
                                           " vs. " + std::to_string(opt_.max_message) + ")"),
                          nullptr);
    answer(call, resp);
  }

  const Options& opt_;

 public:
  // ExecSync threads still running (each ends soon after its call is cancelled).
  unsigned running() const { return running_.load(); }

 private:
  std::mutex mu_;
  std::unordered_set<std::string> logged_;
  std::atomic<unsigned> running_{0};
};

}  // namespace

int run(const Options& opt) {
  log::set_component("cri");
  signal(SIGPIPE, SIG_IGN);
  // SIGTERM/SIGINT are taken by sigwait below: blocked before gRPC starts its
  // threads, which inherit the mask.
  sigset_t sigs;
  sigemptyset(&sigs);
  sigaddset(&sigs, SIGTERM);
  sigaddset(&sigs, SIGINT);
  pthread_sigmask(SIG_BLOCK, &sigs, nullptr);
  // The socket is root's: the kubelet is root, and a CRI socket is a root shell.
  umask(077);
  Upstream upstream(opt.runtime_endpoint, opt.max_message);
  ShimInterceptor interceptor(opt);
  Service service(&upstream, &interceptor, opt.verbose);
  grpc::ServerBuilder b;
  b.AddListeningPort("unix:" + opt.listen, grpc::InsecureServerCredentials());
  b.SetMaxReceiveMessageSize(static_cast<int>(opt.max_message));
  b.SetMaxSendMessageSize(static_cast<int>(opt.max_message));
  b.RegisterCallbackGenericService(&service);
  std::unique_ptr<grpc::Server> server = b.BuildAndStart();
  if (!server) throw Error("cannot serve on unix:" + opt.listen);
  log::info("serving", {{"listen", opt.listen}, {"runtime", opt.runtime_endpoint}, {"state_dir", opt.state_dir}});
  systemd::ready("serving " + opt.listen);  // Type=notify (deploy/systemd/shimlet-cri.service)

  // SIGTERM/SIGINT: stop taking calls, cancel the running ones after 5 s.
  int sig = 0;
  sigwait(&sigs, &sig);
  log::info("stopping", {{"signal", sig}});
  systemd::stopping();
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  server->Wait();
  // ExecSync threads answered their (cancelled) calls; let them return.
  while (interceptor.running()) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  return 0;
}

}  // namespace shimlet::cri
