#include "master/relay.h"

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>
#include <event2/util.h>
#include <openssl/err.h>
#include <sys/socket.h>

#include <cstring>

#include "common/clock.h"
#include "common/event.h"
#include "common/log.h"
#include "common/openssl.h"
#include "proto/tls.h"

namespace shimlet::master {

namespace {

// Why a bufferevent reported an error: the socket's errno or OpenSSL's queue.
std::string bev_error(bufferevent* bev, short what) {
  if (what & BEV_EVENT_TIMEOUT) return "timed out";
  std::string why;
  while (unsigned long e = bufferevent_get_openssl_error(bev)) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    if (!why.empty()) why += "; ";
    why += buf;
  }
  int err = EVUTIL_SOCKET_ERROR();
  if (why.empty() && err) why = evutil_socket_error_to_string(err);
  return why.empty() ? "connection error" : why;
}

}  // namespace

struct Relayer::Relay {
  Relayer* owner = nullptr;
  event_base* base = nullptr;
  BevPtr client, shim;
  RelayOptions opt;
  RelayStats st;
  int64_t start_ms = monotonic_ms();
  bool closing = false, half_closed = false;
  EventPtr idle, linger;

  // ---- setup
  void begin() {
    idle.reset(evtimer_new(base, on_idle, this));
    linger.reset(evtimer_new(base, on_linger, this));
    if (!idle || !linger) {  // no memory; we run inside a libevent callback: end here, no throw
      st.error = "cannot create the relay's timers";
      client.reset();
      return finish();
    }
    bufferevent_setcb(client.get(), on_client_read, on_client_write, on_client_event, this);
    bufferevent_disable(client.get(), EV_READ);  // until the shim is connected
    bufferevent_enable(client.get(), EV_WRITE);

    sockaddr_storage ss{};
    int sl = sizeof ss;
    if (evutil_parse_sockaddr_port(opt.endpoint.c_str(), reinterpret_cast<sockaddr*>(&ss), &sl) != 0)
      return fail_connect("bad shim endpoint \"" + opt.endpoint + "\"");
    bufferevent* b = nullptr;
    if (opt.tls) {
      SSL* ssl = SSL_new(opt.tls);
      if (!ssl) return fail_connect("SSL_new: " + openssl_error());
      b = bufferevent_openssl_socket_new(base, -1, ssl, BUFFEREVENT_SSL_CONNECTING,
                                         BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS);
      if (!b) {
        SSL_free(ssl);
        return fail_connect("cannot create the TLS connection");
      }
      bufferevent_openssl_set_allow_dirty_shutdown(b, 1);
    } else {
      b = bufferevent_socket_new(base, -1, BEV_OPT_CLOSE_ON_FREE | BEV_OPT_DEFER_CALLBACKS);
      if (!b) return fail_connect("cannot create the connection");
    }
    shim.reset(b);
    timeval tv{opt.connect_timeout_ms / 1000, (opt.connect_timeout_ms % 1000) * 1000};
    bufferevent_set_timeouts(b, &tv, &tv);  // covers connect (write) and the TLS handshake (read)
    bufferevent_setcb(b, on_shim_read, on_shim_write, on_shim_event, this);
    bufferevent_enable(b, EV_READ | EV_WRITE);
    if (bufferevent_socket_connect(b, reinterpret_cast<sockaddr*>(&ss), sl) != 0)
      return fail_connect("cannot connect to " + opt.endpoint + ": " +
                          evutil_socket_error_to_string(EVUTIL_SOCKET_ERROR()));
  }

  void connected() {
    if (opt.tls) {
      if (auto bad = proto::pin_mismatch(bufferevent_openssl_get_ssl(shim.get()), opt.pin)) return fail_connect(*bad);
    }
    st.connected = true;
    bufferevent_set_timeouts(shim.get(), nullptr, nullptr);
    if (!opt.shim_preamble.empty()) bufferevent_write(shim.get(), opt.shim_preamble.data(), opt.shim_preamble.size());
    if (!opt.client_preamble.empty())
      bufferevent_write(client.get(), opt.client_preamble.data(), opt.client_preamble.size());
    touch();
    bufferevent_enable(client.get(), EV_READ);
    bufferevent_enable(shim.get(), EV_READ);
    // Bytes the client sent after its request head are already buffered.
    if (evbuffer_get_length(bufferevent_get_input(client.get()))) pump(client.get(), shim.get(), st.bytes_in);
  }

  void fail_connect(const std::string& why) {
    st.error = "cannot reach the shim at " + opt.endpoint + ": " + why;
    shim.reset();
    if (opt.connect_error_response) {
      std::string r = opt.connect_error_response(st.error);
      bufferevent_write(client.get(), r.data(), r.size());
    }
    start_close();
  }

  // ---- splice
  void touch() {
    timeval tv{opt.idle_timeout_s, 0};
    evtimer_add(idle.get(), &tv);
  }

  // Moves what `from` received to `to`'s output; pauses `from` while `to`
  // has more than max_buffer queued (resumed by to's write callback).
  void pump(bufferevent* from, bufferevent* to, uint64_t& count) {
    evbuffer* in = bufferevent_get_input(from);
    size_t n = evbuffer_get_length(in);
    if (!n) return;
    if (!to) {
      evbuffer_drain(in, n);
      return;
    }
    count += n;
    if (opt.on_bytes) opt.on_bytes(&count == &st.bytes_in, n);
    evbuffer_add_buffer(bufferevent_get_output(to), in);
    touch();
    if (evbuffer_get_length(bufferevent_get_output(to)) >= opt.max_buffer) {
      bufferevent_disable(from, EV_READ);
      bufferevent_setwatermark(to, EV_WRITE, opt.max_buffer / 2, 0);
    }
  }

  void drained(bufferevent* to, bufferevent* from) {
    if (closing) {
      maybe_finish();
      return;
    }
    bufferevent_setwatermark(to, EV_WRITE, 0, 0);
    if (from) bufferevent_enable(from, EV_READ);
  }

  // Either side closed or failed: flush what is queued toward the side still
  // open (while it keeps reading: linger_ms without progress ends it, a
  // reader slower than the rest is not cut), end our half, wait for its close.
  void side_closed(bool is_client, short what) {
    bufferevent* gone = is_client ? client.get() : shim.get();
    bufferevent* other = is_client ? shim.get() : client.get();
    if (!closing && st.connected) pump(gone, other, is_client ? st.bytes_in : st.bytes_out);
    if (closing && (what & BEV_EVENT_TIMEOUT) && st.error.empty())
      st.error = std::string(is_client ? "client" : "shim") + " did not read the remaining output";
    if (!(what & BEV_EVENT_EOF) && st.error.empty())
      st.error = std::string(is_client ? "client" : "shim") + ": " + bev_error(gone, what);
    if (is_client)
      client.reset();
    else if (!st.connected && !closing)
      return fail_connect(bev_error(gone, what));
    else
      shim.reset();
    start_close();
  }

  void start_close() {
    if (!closing) {
      closing = true;
      evtimer_del(idle.get());
      // A write timeout restarts with every write that makes progress.
      timeval tv{opt.linger_ms / 1000, (opt.linger_ms % 1000) * 1000};
      for (bufferevent* b : {client.get(), shim.get()})
        if (b) bufferevent_set_timeouts(b, nullptr, &tv);
    }
    // The side still open is read and its bytes dropped: a peer that writes
    // (a ping, its Close) to a socket closed with unread bytes gets a reset,
    // which discards the output it has not read yet.
    bool one_open = !client != !shim;
    for (bufferevent* b : {client.get(), shim.get()})
      if (b) one_open ? bufferevent_enable(b, EV_READ) : bufferevent_disable(b, EV_READ);
    maybe_finish();
  }

  void maybe_finish() {
    for (bufferevent* b : {client.get(), shim.get()})
      if (b && evbuffer_get_length(bufferevent_get_output(b))) return;  // on_*_write calls again
    if (half_closed && (client || shim)) return;                        // its EOF or the linger timer ends it
    if (st.connected && !client != !shim) {
      // All is in the kernel, not necessarily read by the peer (a slow
      // reader may be megabytes behind): end our side of it and wait for the
      // peer to close its own, as long as an idle connection may last.
      half_closed = true;
      bufferevent* b = client ? client.get() : shim.get();
      if (SSL* ssl = bufferevent_openssl_get_ssl(b))
        SSL_shutdown(ssl);
      else
        shutdown(bufferevent_getfd(b), SHUT_WR);
      bufferevent_set_timeouts(b, nullptr, nullptr);
      timeval tv{opt.idle_timeout_s, 0};
      evtimer_add(linger.get(), &tv);
      return;
    }
    finish();
  }

  void finish() {
    // close_notify where the output is flushed, so TLS peers see a clean end.
    for (bufferevent* b : {client.get(), shim.get()})
      if (b && !evbuffer_get_length(bufferevent_get_output(b)))
        if (SSL* ssl = bufferevent_openssl_get_ssl(b)) SSL_shutdown(ssl);
    st.duration_ms = monotonic_ms() - start_ms;
    auto on_end = std::move(opt.on_end);
    RelayStats stats = st;
    Relayer* o = owner;
    o->relays_.erase(this);  // `this` is gone
    if (on_end) {
      try {
        on_end(stats);
      } catch (const std::exception& e) {
        log::error("relay end callback failed", {{"error", e.what()}});
      }
    }
  }

  // ---- libevent callbacks
  static Relay* self(void* p) { return static_cast<Relay*>(p); }
  static void on_client_read(bufferevent*, void* p) {
    auto* r = self(p);
    r->pump(r->client.get(), r->shim.get(), r->st.bytes_in);
  }
  static void on_shim_read(bufferevent*, void* p) {
    auto* r = self(p);
    r->pump(r->shim.get(), r->client.get(), r->st.bytes_out);
  }
  static void on_client_write(bufferevent*, void* p) {
    auto* r = self(p);
    r->drained(r->client.get(), r->shim.get());
  }
  static void on_shim_write(bufferevent*, void* p) {
    auto* r = self(p);
    r->drained(r->shim.get(), r->client.get());
  }
  static void on_client_event(bufferevent*, short what, void* p) { self(p)->side_closed(true, what); }
  static void on_shim_event(bufferevent*, short what, void* p) {
    auto* r = self(p);
    if (what & BEV_EVENT_CONNECTED) return r->connected();
    r->side_closed(false, what);
  }
  static void on_linger(evutil_socket_t, short, void* p) { self(p)->finish(); }
  static void on_idle(evutil_socket_t, short, void* p) {
    auto* r = self(p);
    r->st.error = "idle for " + std::to_string(r->opt.idle_timeout_s) + "s";
    r->start_close();
  }
};

Relayer::Relayer() = default;
Relayer::~Relayer() = default;

void Relayer::start(event_base* base, BevPtr client, RelayOptions opt) {
  auto r = std::make_unique<Relay>();
  Relay* raw = r.get();
  r->owner = this;
  r->base = base;
  r->client = std::move(client);
  r->opt = std::move(opt);
  relays_.emplace(raw, std::move(r));
  raw->begin();  // may end (and free) the relay at once
}

}  // namespace shimlet::master
