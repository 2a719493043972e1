#include "cri/proxy.h"

#include <errno.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "common/log.h"

namespace shimlet::cri {
namespace {

// Reconnecting to a restarted runtime: gRPC's default backoff starts at 1 s
// and grows to 120 s, which would leave the node's kubelet failing for
// minutes after containerd is back. The runtime is a local socket: retry fast.
constexpr int kReconnectMinMs = 100;
constexpr int kReconnectMaxMs = 1000;

// Headers gRPC itself writes (pseudo-headers, grpc-*: timeout, encodings,
// status; te/content-type/user-agent): never copied from one call to the other.
bool transport_header(std::string_view k) {
  return k.empty() || k[0] == ':' || k.starts_with("grpc-") || k == "te" || k == "content-type" || k == "user-agent" ||
         k == "host";
}

std::string str(grpc::string_ref r) { return std::string(r.data(), r.size()); }

}  // namespace

Upstream::Upstream(const std::string& endpoint, size_t max_message)
    : channel_([&] {
        grpc::ChannelArguments args;
        args.SetMaxReceiveMessageSize(static_cast<int>(max_message));
        args.SetMaxSendMessageSize(static_cast<int>(max_message));
        args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, kReconnectMinMs);
        args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, kReconnectMinMs);
        args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, kReconnectMaxMs);
        return grpc::CreateCustomChannel(endpoint, grpc::InsecureChannelCredentials(), args);
      }()),
      stub_(channel_) {}

Call::Call(grpc::GenericCallbackServerContext* ctx, Upstream* upstream, Interceptor* interceptor, bool verbose)
    : ctx_(ctx), upstream_(upstream), interceptor_(interceptor), verbose_(verbose) {
  start_ = std::chrono::steady_clock::now();
  std::unique_lock lock(mu_);
  if (interceptor_ && interceptor_->wants(ctx_->method())) {
    cancelled_ = Fd(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    int e = errno;
    if (cancelled_) {  // else (fd limit): the runtime serves it
      intercepting_ = true;
      StartRead(&down_msg_);
      return;
    }
    log::warn("eventfd failed: the call goes to the runtime", {{"method", ctx_->method()}, {"error", strerror(e)}});
  }
  start_upstream(false);
}

void Call::start_upstream(bool have_first) {
  for (const auto& [k, v] : ctx_->client_metadata()) {
    std::string key = str(k);
    if (!transport_header(key)) up_ctx_.AddMetadata(key, str(v));
  }
  up_ctx_.set_deadline(ctx_->deadline());
  upstream_->stub().PrepareBidiStreamingCall(&up_ctx_, ctx_->method(), grpc::StubOptions(), &up_);
  upstream_started_ = true;
  // The runtime call must not end (OnDone) while we may still start a read or
  // a write on it: one hold per direction, released when that direction is over.
  up_.AddMultipleHolds(2);
  write_hold_ = read_hold_ = true;
  if (have_first)
    up_.StartWrite(&down_msg_);
  else
    StartRead(&down_msg_);
  up_.StartCall();
}

// ---- kubelet -> runtime

void Call::OnReadDone(bool ok) {
  std::unique_lock lock(mu_);
  if (intercepting_) {
    if (!ok) return finish_locked(grpc::Status(grpc::StatusCode::INTERNAL, "no request message"));
    lock.unlock();  // the interceptor may answer at once (answer() locks)
    interceptor_->handle(this, down_msg_);
    return;
  }
  if (!write_hold_) return;  // the runtime's side is over: drop
  if (!ok) {                 // the client half-closed
    up_.StartWritesDone();
    release_write_hold_locked();
    return;
  }
  up_.StartWrite(&down_msg_);
}

void Call::up_write_done(bool ok) {
  std::unique_lock lock(mu_);
  if (!ok) return release_write_hold_locked();  // the runtime's call is over
  if (finished_ || !write_hold_) return;
  StartRead(&down_msg_);
}

// ---- runtime -> kubelet

void Call::up_initial_metadata(bool ok) {
  std::unique_lock lock(mu_);
  // Before the first message or the status goes out (both wait for this).
  if (ok)
    for (const auto& [k, v] : up_ctx_.GetServerInitialMetadata()) {
      std::string key = str(k);
      if (!transport_header(key)) ctx_->AddInitialMetadata(key, str(v));
    }
  up_.StartRead(&up_msg_);
}

void Call::up_read_done(bool ok) {
  std::unique_lock lock(mu_);
  if (!ok || finished_) {
    // The runtime's last message: its status follows. Stop forwarding the
    // client's messages too (a bidi client may never half-close).
    release_read_hold_locked();
    release_write_hold_locked();
    return;
  }
  down_write_pending_ = true;
  StartWrite(&up_msg_);
}

void Call::OnWriteDone(bool ok) {
  std::unique_lock lock(mu_);
  down_write_pending_ = false;
  if (intercepting_) return;
  if (!ok) {  // the client is gone
    up_ctx_.TryCancel();
    release_read_hold_locked();
    return;
  }
  up_.StartRead(&up_msg_);
}

void Call::up_done(const grpc::Status& s) {
  std::unique_lock lock(mu_);
  up_done_ = true;
  if (!finished_) {
    for (const auto& [k, v] : up_ctx_.GetServerTrailingMetadata()) {
      std::string key = str(k);
      if (!transport_header(key)) ctx_->AddTrailingMetadata(key, str(v));
    }
    log_end(s, "forwarded");
    finish_locked(s);
  }
  maybe_delete(lock);
}

// ---- both

void Call::answer(const grpc::Status& status, const grpc::ByteBuffer* response) {
  std::unique_lock lock(mu_);
  log_end(status, "answered");
  if (response) {
    up_msg_ = *response;  // must outlive the write: the call owns it
    finished_ = true;
    StartWriteAndFinish(&up_msg_, grpc::WriteOptions(), status);
  } else {
    finish_locked(status);
  }
}

void Call::forward() {
  std::unique_lock lock(mu_);
  intercepting_ = false;
  cancelled_.reset();
  start_upstream(true);
}

void Call::OnCancel() {
  std::unique_lock lock(mu_);
  if (cancelled_) {
    uint64_t one = 1;
    (void)!::write(cancelled_.get(), &one, sizeof one);
  }
  if (upstream_started_ && !up_done_) up_ctx_.TryCancel();
}

void Call::OnDone() {
  std::unique_lock lock(mu_);
  down_done_ = true;
  maybe_delete(lock);
}

void Call::finish_locked(const grpc::Status& s) {
  if (finished_) return;
  finished_ = true;
  Finish(s);
}

void Call::release_write_hold_locked() {
  if (!write_hold_) return;
  write_hold_ = false;
  up_.RemoveHold();
}

void Call::release_read_hold_locked() {
  if (!read_hold_) return;
  read_hold_ = false;
  up_.RemoveHold();
}

void Call::maybe_delete(std::unique_lock<std::recursive_mutex>& lock) {
  if (!down_done_ || (upstream_started_ && !up_done_)) return;
  lock.unlock();
  delete this;
}

void Call::log_end(const grpc::Status& s, const char* how) {
  if (!verbose_) return;
  auto ms = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - start_).count();
  log::info("call", {{"method", ctx_->method()},
                     {"how", how},
                     {"code", static_cast<int>(s.error_code())},
                     {"ms", static_cast<double>(ms) / 1000.0}});
}

}  // namespace shimlet::cri
