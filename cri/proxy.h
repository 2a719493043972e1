// One gRPC call of shimlet-cri: a pass-through to the runtime as raw bytes,
// or answered here by an Interceptor (Exec, ExecSync, PortForward; cri/service.cc).
//
// Pass-through keeps everything a runtime client can see: the request and
// response messages as opaque bytes (fields this proxy does not know
// included), any number of messages each way (unary, server/client streaming
// and bidi alike: GetContainerEvents, future streaming methods), the client's
// metadata and deadline, the runtime's initial metadata, status code, message,
// details and trailing metadata. Cancellation goes both ways (the kubelet
// gone: the runtime call is cancelled). Flow control is end to end: one
// message in flight per direction (the next is read only once the previous
// one is written), so memory is bounded by two messages per call.
//
// Call order (for an Interceptor): the first request message is read, then
// handle(call, message) runs on a gRPC thread; it (or a thread it hands the
// call to) calls exactly one of answer() or forward(), after which it must
// not touch the call again. cancelled_fd() becomes readable when the client
// cancels (or its deadline passes) before that.
#pragma once
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include "common/fd.h"

namespace shimlet::cri {

// The channel to the runtime (its CRI socket).
class Upstream {
 public:
  // endpoint: "unix:///path" (or anything grpc::CreateChannel takes).
  Upstream(const std::string& endpoint, size_t max_message);
  grpc::GenericStub& stub() { return stub_; }
  grpc::Channel& channel() { return *channel_; }

 private:
  std::shared_ptr<grpc::Channel> channel_;
  grpc::GenericStub stub_;
};

class Call;
struct Interceptor {
  virtual ~Interceptor() = default;
  // Whether handle() wants this method's first message ("/pkg.Service/Method").
  virtual bool wants(const std::string& method) const = 0;
  virtual void handle(Call* call, const grpc::ByteBuffer& request) = 0;
};

class Call final : public grpc::ServerGenericBidiReactor {
 public:
  // Starts serving ctx's call: intercepted (interceptor->wants) or forwarded.
  Call(grpc::GenericCallbackServerContext* ctx, Upstream* upstream, Interceptor* interceptor, bool verbose);

  const std::string& method() const { return ctx_->method(); }
  std::chrono::system_clock::time_point deadline() const { return ctx_->deadline(); }
  // Interceptor: the answer (response null: status only, which must not be OK).
  void answer(const grpc::Status& status, const grpc::ByteBuffer* response);
  // Interceptor: hand the call, with the message already read, to the runtime.
  void forward();
  // Readable once the client has cancelled (eventfd); valid until answer/forward.
  int cancelled_fd() const { return cancelled_.get(); }

  // grpc::ServerBidiReactor
  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

 private:
  // The client side of the runtime call.
  struct Up final : grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
    Call* c;
    explicit Up(Call* call) : c(call) {}
    void OnReadInitialMetadataDone(bool ok) override { c->up_initial_metadata(ok); }
    void OnReadDone(bool ok) override { c->up_read_done(ok); }
    void OnWriteDone(bool ok) override { c->up_write_done(ok); }
    void OnWritesDoneDone(bool) override {}
    void OnDone(const grpc::Status& s) override { c->up_done(s); }
  };
  ~Call() override = default;
  void start_upstream(bool have_first);
  void up_initial_metadata(bool ok);
  void up_read_done(bool ok);
  void up_write_done(bool ok);
  void up_done(const grpc::Status& s);
  void finish_locked(const grpc::Status& s);
  void release_write_hold_locked();
  void release_read_hold_locked();
  void maybe_delete(std::unique_lock<std::recursive_mutex>& lock);
  void log_end(const grpc::Status& s, const char* how);

  grpc::GenericCallbackServerContext* ctx_;
  Upstream* upstream_;
  Interceptor* interceptor_;
  bool verbose_;
  std::chrono::steady_clock::time_point start_;
  std::recursive_mutex mu_;  // callbacks of both sides may run at once (and inline)
  grpc::ClientContext up_ctx_;
  Up up_{this};
  grpc::ByteBuffer down_msg_;  // kubelet -> runtime, one at a time
  grpc::ByteBuffer up_msg_;    // runtime -> kubelet, one at a time
  Fd cancelled_;
  bool intercepting_ = false;  // reading the first message for the interceptor / it has the call
  bool upstream_started_ = false, up_done_ = false, write_hold_ = false, read_hold_ = false;
  bool down_write_pending_ = false, finished_ = false, down_done_ = false;
  std::optional<grpc::Status> up_status_;  // the runtime's status, until the last message is written
};

// Creates a Call per incoming call (every method name).
class Service final : public grpc::CallbackGenericService {
 public:
  Service(Upstream* upstream, Interceptor* interceptor, bool verbose)
      : upstream_(upstream), interceptor_(interceptor), verbose_(verbose) {}
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override {
    return new Call(ctx, upstream_, interceptor_, verbose_);
  }

 private:
  Upstream* upstream_;
  Interceptor* interceptor_;
  bool verbose_;
};

}  // namespace shimlet::cri
