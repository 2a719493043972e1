#include "proto/h2.h"

#include <openssl/err.h>
#include <string.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <utility>

#include "common/openssl.h"
#include "proto/tls.h"

namespace shimlet::proto {

const std::string* find_header(const Headers& h, const std::string& name) {
  for (auto& [k, v] : h)
    if (k == name) return &v;
  return nullptr;
}

namespace {
std::vector<nghttp2_nv> to_nv(const Headers& h) {
  std::vector<nghttp2_nv> nv;
  nv.reserve(h.size());
  for (auto& [k, v] : h)
    nv.push_back({reinterpret_cast<uint8_t*>(const_cast<char*>(k.data())),
                  reinterpret_cast<uint8_t*>(const_cast<char*>(v.data())), k.size(), v.size(), NGHTTP2_NV_FLAG_NONE});
  return nv;
}
uint32_t settings_max_header(const H2Settings& s) { return s.max_header_list; }
// Keep at most this much encoded output queued in the socket buffer before
// asking nghttp2 for more: bounds memory and keeps latency low.
constexpr size_t kSocketHighWater = 1u << 20;
}  // namespace

// Why not bufferevent_openssl: it reads one TLS record (two read(2) calls,
// header then body) per trip through the event loop and copies it into an
// evbuffer, and it cannot use OpenSSL's read-ahead (bytes OpenSSL buffered are
// invisible to epoll, and libevent 2.1 stops reading at a record boundary).
// Here one readable event drains the socket in reads of kReadAhead (lent to
// OpenSSL as a memory BIO once connected; read-ahead only for the handshake)
// and hands nghttp2 up to kReadBatch at a time, so forwarded data leaves in
// large writes; frames go out through one SSL_write per kMaxWrite (DATA
// frames straight from their stream's buffer: send_frame).
namespace {
constexpr size_t kReadBatch = 256u << 10;  // plaintext fed to nghttp2 at once
constexpr size_t kReadAhead = 128u << 10;  // raw bytes per read(2) (raw_; OpenSSL's buffer in the handshake)
constexpr size_t kMaxReadTurn = 4u << 20;  // then let other events run (a kick reads on)
constexpr size_t kMaxWrite = 256u << 10;   // plaintext per SSL_write
constexpr int kWriteBuffer = 256 << 10;    // TLS records per write(2)
constexpr const char* kPeerClosed = "connection closed by peer";

// Drops what was taken from the front of buf (up to off): all of it when
// nothing is left, else only once it is more than half, so the move is never
// larger than what was taken since the last one.
void compact(std::string& buf, size_t& off) {
  if (off == buf.size()) {
    buf.clear();
    off = 0;
  } else if (off > buf.size() / 2) {
    buf.erase(0, off);
    off = 0;
  }
}
}  // namespace

std::vector<nghttp2_settings_entry> server_settings(const H2Settings& s) {
  return {
      {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, s.stream_window},
      {NGHTTP2_SETTINGS_MAX_FRAME_SIZE, s.max_frame_size},
      {NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, s.max_header_list},
      {NGHTTP2_SETTINGS_ENABLE_PUSH, 0},
  };
}

H2Conn::H2Conn(event_base* base, int fd, SSL* ssl, Role role, Handler* handler, H2Settings settings, Handover handover)
    : base_(base),
      fd_(fd),
      ssl_(ssl),
      role_(role),
      handler_(handler),
      settings_(settings),
      handover_(std::move(handover)) {
  try {
    if (ssl_) setup_tls();
    rev_ = new_event(base_, fd_, EV_READ | EV_PERSIST, on_io, this);
    wev_ = new_event(base_, fd_, EV_WRITE, on_io, this);
    kick_ = new_event(base_, -1, 0, on_kick, this);
    pump_ev_ = new_event(base_, -1, 0, on_pump, this);
    if (settings_.ping_interval_s > 0) ping_ = new_event(base_, -1, EV_PERSIST, on_ping_timer, this);
    if (ssl_ && !SSL_is_init_finished(ssl_)) hs_timer_ = new_timer(base_, on_handshake_timeout, this);
  } catch (...) {
    // The connection was ours from the first line on; no destructor runs.
    SSL_free(ssl_);
    if (fd_ >= 0) ::close(fd_);
    throw;
  }
  if (hs_timer_) {
    timeval tv{settings_.handshake_timeout_s, 0};
    evtimer_add(hs_timer_.get(), &tv);
  }
  event_add(rev_.get(), nullptr);
  // The handshake (or, after one done by the caller, the HTTP/2 start) runs
  // from the loop: handlers are never called from inside this constructor.
  event_active(kick_.get(), 0, 0);
}

void H2Conn::setup_tls() {
  if (SSL_get_fd(ssl_) != fd_) SSL_set_fd(ssl_, fd_);
  // Records collect in a write buffer and leave in one write(2) per flush,
  // not one per 16 KiB record. Reads keep the plain socket BIO.
  if (BIO* sock = SSL_get_wbio(ssl_)) {
    BIO* buf = BIO_new(BIO_f_buffer());
    if (buf && BIO_set_write_buffer_size(buf, kWriteBuffer) == 1 && BIO_up_ref(sock) == 1) {
      SSL_set0_wbio(ssl_, BIO_push(buf, sock));
    } else if (buf) {
      BIO_free(buf);
    }
  }
  // A connection handed over by the pre-authentication gate was kept lean
  // while it waited (buffers released when empty); this one is busy now.
  SSL_clear_mode(ssl_, SSL_MODE_RELEASE_BUFFERS);
  // Only before a handshake: these reset OpenSSL's state machine.
  if (!SSL_is_init_finished(ssl_)) {
    if (role_ == Role::Server)
      SSL_set_accept_state(ssl_);
    else
      SSL_set_connect_state(ssl_);
  }
  // A larger read buffer takes effect only if none was allocated yet (a
  // handshake done by the caller has one of the default size).
  SSL_set_default_read_buffer_len(ssl_, kReadAhead);
  // A peer that closes without close_notify just closed (as with
  // bufferevent_openssl's dirty shutdown): HTTP/2's own framing tells a cut
  // stream (no END_STREAM, no exit status) from a finished one.
  SSL_set_options(ssl_, SSL_OP_IGNORE_UNEXPECTED_EOF);
  SSL_set_read_ahead(ssl_, 1);
}

H2Conn::~H2Conn() {
  for (EventPtr* e : {&ping_, &rev_, &wev_, &kick_, &hs_timer_, &pump_ev_}) e->reset();
  if (h2_) nghttp2_session_del(h2_);
  SSL_free(ssl_);
  if (fd_ >= 0) ::close(fd_);
}

void H2Conn::on_kick(evutil_socket_t, short, void* arg) {
  auto* self = static_cast<H2Conn*>(arg);
  if (self->closed_) return;
  if (!self->connected_) return self->handshake();
  self->read_tls();
  if (!self->closed_) self->pump();
}

void H2Conn::on_handshake_timeout(evutil_socket_t, short, void* arg) {
  auto* self = static_cast<H2Conn*>(arg);
  if (!self->connected_) self->close("TLS handshake timed out");
}

void H2Conn::on_io(evutil_socket_t, short what, void* arg) {
  auto* self = static_cast<H2Conn*>(arg);
  if (self->closed_) return;
  if (!self->connected_) return self->handshake();
  if ((what & EV_READ) || ((what & EV_WRITE) && self->read_wants_write_)) {
    self->read_wants_write_ = false;
    self->read_tls();
    if (self->closed_) return;
  }
  if (what & EV_READ) self->write_wants_read_ = false;  // an SSL_write that waited for input may go on
  self->pump();
}

// Why an SSL call that did not just have to wait failed, as one line.
std::string H2Conn::tls_failure(int err) {
  if (err == SSL_ERROR_ZERO_RETURN) return kPeerClosed;
  if (err == SSL_ERROR_SSL) return "TLS error: " + openssl_error();
  if (err == SSL_ERROR_SYSCALL) {
    if (ERR_peek_error()) return "TLS error: " + openssl_error();
    if (errno == 0) return kPeerClosed;  // EOF without close_notify (we allow a dirty shutdown)
    return std::string("connection error: ") + strerror(errno);
  }
  return "TLS error: SSL error " + std::to_string(err);
}

void H2Conn::handshake() {
  if (!ssl_) return connected();
  ERR_clear_error();
  errno = 0;
  int r = SSL_do_handshake(ssl_);
  if (r == 1) return connected();
  int err = SSL_get_error(ssl_, r);
  if (err == SSL_ERROR_WANT_READ) return;  // rev_ is always armed
  if (err == SSL_ERROR_WANT_WRITE) {
    event_add(wev_.get(), nullptr);
    return;
  }
  // A peer that closes during the handshake just closed (kept as before).
  std::string why = tls_failure(err);
  close(why == kPeerClosed ? why : "TLS handshake failed: " + why);
}

void H2Conn::connected() {
  hs_timer_.reset();
  if (ssl_) {
    const unsigned char* alpn = nullptr;
    unsigned alpn_len = 0;
    SSL_get0_alpn_selected(ssl_, &alpn, &alpn_len);
    if (alpn_len != 2 || memcmp(alpn, "h2", 2) != 0) return close("peer did not negotiate ALPN h2");
    // From here on OpenSSL reads records from our buffer (refill_tls), not
    // the socket: with read-ahead, OpenSSL 3.0 moves every byte it holds to
    // the front of its buffer once per record (ssl3_read_n), about 3.5
    // copies per byte with 128 KiB reads (measured: half the client's AES
    // time). Bytes it read ahead during the handshake stay in its buffer.
    BIO* empty = BIO_new(BIO_s_mem());
    if (!empty) return close("out of memory (TLS read buffer)");
    BIO_set_mem_eof_return(empty, -1);  // empty means "wait", not EOF
    SSL_set0_rbio(ssl_, empty);
    SSL_set_read_ahead(ssl_, 0);
  }
  if (std::optional<std::string> err = handler_->on_connected(ssl_)) return close(*err);
  nghttp2_session_callbacks* cbs;
  if (nghttp2_session_callbacks_new(&cbs) != 0) return close("out of memory (nghttp2 callbacks)");
  nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, frame_recv_cb);
  nghttp2_session_callbacks_set_on_header_callback(cbs, header_cb);
  nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, begin_headers_cb);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, data_chunk_cb);
  nghttp2_session_callbacks_set_on_stream_close_callback(cbs, stream_close_cb);
  nghttp2_session_callbacks_set_data_source_read_length_callback(cbs, read_length_cb);
  nghttp2_session_callbacks_set_on_frame_send_callback(cbs, frame_send_cb);
  nghttp2_session_callbacks_set_send_data_callback(cbs, send_data_cb);
  nghttp2_option* opt;
  if (nghttp2_option_new(&opt) != 0) {
    nghttp2_session_callbacks_del(cbs);
    return close("out of memory (nghttp2 options)");
  }
  // We return window only for bytes actually delivered (consume()): a slow
  // reader stops the peer instead of growing our buffers.
  nghttp2_option_set_no_auto_window_update(opt, 1);
  nghttp2_option_set_max_send_header_block_length(opt, settings_max_header(settings_));
  // We use no priorities: closed streams need not be kept for the
  // dependency tree (with no advertised stream limit nghttp2 would keep
  // every closed stream of a long-lived connection).
  nghttp2_option_set_no_closed_streams(opt, 1);
  // The server does not advertise its stream limit (see H2Settings): open
  // up to ours rather than nghttp2's default of 100 before queueing.
  if (role_ == Role::Client) nghttp2_option_set_peer_max_concurrent_streams(opt, settings_.max_concurrent_streams);
  int rv = role_ == Role::Server ? nghttp2_session_server_new2(&h2_, cbs, this, opt)
                                 : nghttp2_session_client_new2(&h2_, cbs, this, opt);
  nghttp2_option_del(opt);
  nghttp2_session_callbacks_del(cbs);
  if (rv != 0) return close(std::string("nghttp2 session: ") + nghttp2_strerror(rv));
  std::vector<nghttp2_settings_entry> iv = server_settings(settings_);
  // Server: the limit is enforced in begin_headers_cb with REFUSED_STREAM,
  // not advertised (see H2Settings::max_concurrent_streams). Client: limits
  // pushed streams only (push is off anyway).
  if (role_ == Role::Client) iv.push_back({NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, settings_.max_concurrent_streams});
  nghttp2_submit_settings(h2_, NGHTTP2_FLAG_NONE, iv.data(), iv.size());
  nghttp2_session_set_local_window_size(h2_, NGHTTP2_FLAG_NONE, 0, static_cast<int32_t>(settings_.connection_window));
  connected_ = true;
  if (ping_) {
    timeval pt{settings_.ping_interval_s, 0};
    event_add(ping_.get(), &pt);
  }
  pump();
  if (!closed_ && !handover_.preread.empty()) {
    std::string early = std::move(handover_.preread);
    handover_.preread.clear();
    feed(reinterpret_cast<const uint8_t*>(early.data()), early.size());
  }
  // The peer may have sent its preface with the handshake's last flight
  // (OpenSSL may hold it already: read-ahead).
  if (!closed_) read_tls();
  if (!closed_) pump();
}

// Drains the socket (and OpenSSL's read-ahead) into nghttp2, a batch at a
// time. EOF and errors close the connection after the bytes before them were
// processed.
void H2Conn::read_tls() {
  if (!rbuf_) rbuf_ = std::make_unique_for_overwrite<uint8_t[]>(kReadBatch);
  size_t turn = 0;
  for (;;) {
    size_t got = 0;
    std::string why;
    while (got < kReadBatch) {
      if (!ssl_) {
        ssize_t r;
        if (first_read_ && settings_.accept_fds > 0) {
          // The peer's fds ride on its first byte (Handover::pass_fds).
          // One slot more than accepted: a peer sending more is told apart.
          std::vector<int> fds(settings_.accept_fds + 1, -1);
          size_t nfds = 0;
          r = recv_fds_nothrow(fd_, rbuf_.get() + got, kReadBatch - got, fds, &nfds);
          for (size_t i = 0; i < nfds; i++) passed_fds_.emplace_back(fds[i]);
          if ((r < 0 && errno == EMSGSIZE) || nfds > settings_.accept_fds) {
            passed_fds_.clear();
            why = "connection error: more than " + std::to_string(settings_.accept_fds) + " file descriptors passed";
            break;
          }
          // The fds ride on the first byte: until one has come (EAGAIN, EINTR
          // or any other failure before it), the next read looks for them.
          if (r > 0) first_read_ = false;
        } else {
          r = ::read(fd_, rbuf_.get() + got, kReadBatch - got);
        }
        if (r > 0) {
          got += static_cast<size_t>(r);
          continue;
        }
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        why = r == 0 ? kPeerClosed : std::string("connection error: ") + strerror(errno);
        break;
      }
      ERR_clear_error();
      errno = 0;
      int r = SSL_read(ssl_, rbuf_.get() + got, static_cast<int>(kReadBatch - got));
      if (r > 0) {
        got += static_cast<size_t>(r);
        continue;
      }
      int err = SSL_get_error(ssl_, r);
      if (err == SSL_ERROR_WANT_READ) {
        if (int f = refill_tls(why); f > 0) continue;
        break;
      }
      if (err == SSL_ERROR_WANT_WRITE) {  // a post-handshake message must go out first
        read_wants_write_ = true;
        event_add(wev_.get(), nullptr);
        break;
      }
      why = tls_failure(err);
      break;
    }
    if (got) feed(rbuf_.get(), got);
    if (closed_) return;
    if (!why.empty()) return close(why);
    if (got < kReadBatch) return;  // the socket is drained (or waits for a write)
    if ((turn += got) >= kMaxReadTurn) {
      // Let other events run; what OpenSSL holds is not seen by epoll.
      event_active(kick_.get(), 0, 0);
      return;
    }
  }
}

// OpenSSL took every byte lent to it (it reads exactly a record's header,
// then its body, without read-ahead): lends it the next read(2), up to
// kReadAhead. 1: bytes came; 0: none yet (EAGAIN); -1: EOF or error (why).
int H2Conn::refill_tls(std::string& why) {
  if (!connected_) return 0;  // the handshake reads the socket itself
  if (!raw_) raw_ = std::make_unique_for_overwrite<uint8_t[]>(kReadAhead);
  for (;;) {
    ssize_t r = ::read(fd_, raw_.get(), kReadAhead);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return 0;
    if (r <= 0) {
      // As OpenSSL's own EOF with SSL_OP_IGNORE_UNEXPECTED_EOF: HTTP/2's
      // framing tells a cut stream from a finished one.
      why = r == 0 ? kPeerClosed : std::string("connection error: ") + strerror(errno);
      return -1;
    }
    BIO* b = BIO_new_mem_buf(raw_.get(), static_cast<int>(r));
    if (!b) {
      why = "out of memory (TLS read buffer)";
      return -1;
    }
    BIO_set_mem_eof_return(b, -1);
    SSL_set0_rbio(ssl_, b);  // frees the drained one
    return 1;
  }
}

void H2Conn::feed(const uint8_t* data, size_t len) {
  if (!h2_ || closed_) return;
  in_pump_ = true;
  ssize_t n = nghttp2_session_mem_recv(h2_, data, len);
  in_pump_ = false;
  if (n < 0) return close(std::string("HTTP/2 protocol error: ") + nghttp2_strerror(static_cast<int>(n)));
  bytes_in_ += static_cast<uint64_t>(n);
}

// Hands queued frames to SSL_write (plaintext: send(2)) until the socket is full.
void H2Conn::write_tls() {
  while (!ssl_ && woff_ < wbuf_.size()) {
    // Plaintext: wbuf_ is the write buffer, written as it is.
    ssize_t r;
    if (!handover_.pass_fds.empty()) {
      // One byte carries the fds: a one-byte send is never partial.
      int e = send_fds_nothrow(fd_, handover_.pass_fds, wbuf_.data() + woff_, 1);
      errno = e;
      r = e ? -1 : 1;
      if (!e) handover_.pass_fds.clear();
    } else {
      r = ::send(fd_, wbuf_.data() + woff_, wbuf_.size() - woff_, MSG_NOSIGNAL);
    }
    if (r > 0) {
      woff_ += static_cast<size_t>(r);
      continue;
    }
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      event_add(wev_.get(), nullptr);
      break;
    }
    return close(std::string("connection error: ") + strerror(errno));
  }
  while (ssl_ && woff_ < wbuf_.size() && !write_wants_read_) {
    size_t n = retry_len_ ? retry_len_ : std::min(wbuf_.size() - woff_, kMaxWrite);
    ERR_clear_error();
    errno = 0;
    int r = SSL_write(ssl_, wbuf_.data() + woff_, static_cast<int>(n));
    if (r > 0) {
      retry_len_ = 0;
      woff_ += static_cast<size_t>(r);
      continue;
    }
    int err = SSL_get_error(ssl_, r);
    if (err == SSL_ERROR_WANT_WRITE || err == SSL_ERROR_WANT_READ) {
      retry_len_ = n;  // SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER: same bytes, maybe elsewhere
      if (err == SSL_ERROR_WANT_WRITE)
        event_add(wev_.get(), nullptr);
      else
        write_wants_read_ = true;
      break;
    }
    return close(tls_failure(err));
  }
  flush_tls();
  if (closed_) return;
  compact(wbuf_, woff_);
}

// Writes what the write buffer holds; waits for room when the socket is full.
void H2Conn::flush_tls() {
  BIO* w = ssl_ ? SSL_get_wbio(ssl_) : nullptr;
  if (!w || BIO_wpending(w) == 0) {
    flush_pending_ = false;
    return;
  }
  errno = 0;
  if (BIO_flush(w) > 0) {
    flush_pending_ = false;
    return;
  }
  if (BIO_should_retry(w)) {
    flush_pending_ = true;
    event_add(wev_.get(), nullptr);
    return;
  }
  close(std::string("connection error: ") + (errno ? strerror(errno) : "write failed"));
}

bool H2Conn::output_empty() const {
  BIO* w = ssl_ ? SSL_get_wbio(ssl_) : nullptr;
  return wbuf_.size() == woff_ && (!w || BIO_wpending(w) == 0);
}

void H2Conn::on_ping_timer(evutil_socket_t, short, void* arg) {
  auto* self = static_cast<H2Conn*>(arg);
  if (!self->h2_ || self->closed_) return;
  // A peer (or path) that stopped answering: give up instead of hanging until
  // TCP's retransmission timeout.
  if (self->ping_outstanding_)
    return self->close("no reply to keepalive PING within " + std::to_string(self->settings_.ping_interval_s) + " s");
  self->ping_outstanding_ = true;
  nghttp2_submit_ping(self->h2_, NGHTTP2_FLAG_NONE, nullptr);
  self->pump();
}

void H2Conn::pump() {
  if (!h2_ || closed_ || in_pump_) return;
  std::vector<int32_t> drained;
  in_pump_ = true;
  for (;;) {
    while (wbuf_.size() - woff_ < kSocketHighWater) {
      const uint8_t* data;
      ssize_t n = nghttp2_session_mem_send(h2_, &data);
      if (n < 0) {
        in_pump_ = false;
        return close(std::string("HTTP/2 send error: ") + nghttp2_strerror(static_cast<int>(n)));
      }
      if (n == 0) break;
      bytes_out_ += static_cast<uint64_t>(n);
      wbuf_.append(reinterpret_cast<const char*>(data), static_cast<size_t>(n));
      if (!handover_.sent.empty() && wbuf_.size() - woff_ >= handover_.sent.size()) {
        // Our first SETTINGS went out through the gate already (the same
        // bytes): nghttp2 counts it as sent, the peer got it once.
        if (wbuf_.compare(woff_, handover_.sent.size(), handover_.sent) != 0) {
          in_pump_ = false;
          return close("internal error: the gate's server preface differs from ours");
        }
        wbuf_.erase(woff_, handover_.sent.size());
        handover_.sent.clear();
      }
    }
    bool more = wbuf_.size() - woff_ >= kSocketHighWater || data_blocked_;
    data_blocked_ = false;
    write_tls();
    if (closed_) {
      in_pump_ = false;
      return;
    }
    // Stopped at the high-water mark and the socket took it all: make more.
    if (!more || woff_ != wbuf_.size() || retry_len_ || flush_pending_) break;
  }
  in_pump_ = false;
  // Tell handlers whose buffers drained (outside nghttp2 callbacks).
  for (auto& [id, o] : out_) {
    size_t left = o.buf.size() - o.off;
    if (!o.below_low && left <= settings_.out_low_water) {
      o.below_low = true;
      drained.push_back(id);
    }
  }
  if (total_high_ && total_out_ <= settings_.total_high_water / 2) {
    total_high_ = false;
    drained.push_back(0);
  }
  for (int32_t id : drained) {
    handler_->on_drain(id);
    if (closed_) return;
  }
  if (closed_) return;
  if (!nghttp2_session_want_read(h2_) && !nghttp2_session_want_write(h2_) && output_empty())
    close(closing_ ? "connection shut down" : !proto_error_.empty() ? proto_error_ : "peer ended the HTTP/2 session");
}

void H2Conn::flush() { pump(); }

// Body bytes (send) and window updates (consume) that handlers submit during
// one callback leave in one batch, when the loop gets to it: a session reading
// 16 datagrams (or chunks) in a row makes one SSL_write and one write(2), not
// sixteen. Headers, stream ends, resets and GOAWAY go at once (an exec's exit
// status is a stream end: it must not wait for the session's cleanup).
void H2Conn::pump_later() {
  if (closed_ || !h2_) return;
  event_active(pump_ev_.get(), 0, 0);  // no-op while already active
}

void H2Conn::on_pump(evutil_socket_t, short, void* arg) { static_cast<H2Conn*>(arg)->pump(); }

void H2Conn::close(const std::string& why) {
  if (closed_) return;
  closed_ = true;
  for (const EventPtr* e : {&ping_, &rev_, &wev_, &kick_, &hs_timer_, &pump_ev_})
    if (*e) event_del(e->get());
  handler_->on_closed(why);
}

int H2Conn::begin_headers_cb(nghttp2_session* session, const nghttp2_frame* f, void* arg) {
  auto* self = static_cast<H2Conn*>(arg);
  if (f->hd.type != NGHTTP2_HEADERS) return 0;
  int32_t id = f->hd.stream_id;
  if (self->role_ == Role::Server && f->headers.cat == NGHTTP2_HCAT_REQUEST) {
    if (self->open_in_ >= self->settings_.max_concurrent_streams) {
      // A stream error, not a connection error (RFC 9113 5.1.2): the
      // client may retry it later; its other streams go on. Our RST marks
      // the stream closing, so nghttp2 adds no INTERNAL_ERROR reset of its own
      // for the callback failure, which makes it skip this header block.
      nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, id, NGHTTP2_REFUSED_STREAM);
      self->handler_->on_stream_refused(id);
      return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
    }
    self->open_in_++;
    nghttp2_session_set_stream_user_data(session, id, self);  // counted: uncounted on close
  }
  self->in_headers_[id].clear();
  return 0;
}

int H2Conn::header_cb(nghttp2_session*, const nghttp2_frame* f, const uint8_t* name, size_t namelen,
                      const uint8_t* value, size_t valuelen, uint8_t, void* arg) {
  auto* self = static_cast<H2Conn*>(arg);
  if (f->hd.type != NGHTTP2_HEADERS) return 0;
  auto& h = self->in_headers_[f->hd.stream_id];
  h.emplace_back(std::string(reinterpret_cast<const char*>(name), namelen),
                 std::string(reinterpret_cast<const char*>(value), valuelen));
  return 0;
}

int H2Conn::frame_recv_cb(nghttp2_session*, const nghttp2_frame* f, void* arg) {
  auto* self = static_cast<H2Conn*>(arg);
  int32_t id = f->hd.stream_id;
  bool end = f->hd.flags & NGHTTP2_FLAG_END_STREAM;
  if (f->hd.type == NGHTTP2_HEADERS && (f->hd.flags & NGHTTP2_FLAG_END_HEADERS)) {
    auto it = self->in_headers_.find(id);
    Headers h = it == self->in_headers_.end() ? Headers{} : std::move(it->second);
    if (it != self->in_headers_.end()) self->in_headers_.erase(it);
    self->handler_->on_headers(id, h, end);
    if (end) self->handler_->on_remote_end(id);
  } else if (f->hd.type == NGHTTP2_DATA && end) {
    self->handler_->on_remote_end(id);
  } else if (f->hd.type == NGHTTP2_PING && (f->hd.flags & NGHTTP2_FLAG_ACK)) {
    self->ping_outstanding_ = false;
  }
  return 0;
}

int H2Conn::data_chunk_cb(nghttp2_session*, uint8_t, int32_t id, const uint8_t* data, size_t len, void* arg) {
  static_cast<H2Conn*>(arg)->handler_->on_data(id, data, len);
  return 0;
}

int H2Conn::stream_close_cb(nghttp2_session* session, int32_t id, uint32_t code, void* arg) {
  auto* self = static_cast<H2Conn*>(arg);
  if (self->open_in_ > 0 && nghttp2_session_get_stream_user_data(session, id) == self) self->open_in_--;
  if (auto it = self->out_.find(id); it != self->out_.end()) {
    self->total_out_ -= it->second.buf.size() - it->second.off;
    self->out_.erase(it);
  }
  self->in_headers_.erase(id);
  self->handler_->on_stream_close(id, code);
  return 0;
}

int H2Conn::frame_send_cb(nghttp2_session*, const nghttp2_frame* f, void* arg) {
  auto* self = static_cast<H2Conn*>(arg);
  // nghttp2 ends the session itself on a connection error of the peer's
  // (malformed frame, bad preface...): remember why for the close reason.
  if (f->hd.type == NGHTTP2_GOAWAY && f->goaway.error_code != NGHTTP2_NO_ERROR && self->proto_error_.empty()) {
    std::string debug(reinterpret_cast<const char*>(f->goaway.opaque_data), f->goaway.opaque_data_len);
    self->proto_error_ = std::string("HTTP/2 protocol error: ") + nghttp2_http2_strerror(f->goaway.error_code);
    if (!debug.empty()) self->proto_error_ += ": " + debug;
  }
  return 0;
}

ssize_t H2Conn::read_length_cb(nghttp2_session*, uint8_t, int32_t, int32_t session_window, int32_t stream_window,
                               uint32_t remote_max_frame, void*) {
  // Bigger DATA frames than nghttp2's 16 KiB default: fewer frames, fewer
  // TLS records per byte.
  int64_t n = std::min<int64_t>({session_window, stream_window, remote_max_frame, 65536});
  return static_cast<ssize_t>(std::max<int64_t>(n, 1));
}

ssize_t H2Conn::data_read_cb(nghttp2_session*, int32_t id, uint8_t*, size_t length, uint32_t* flags,
                             nghttp2_data_source*, void* arg) {
  auto* self = static_cast<H2Conn*>(arg);
  auto it = self->out_.find(id);
  if (it == self->out_.end()) {
    *flags |= NGHTTP2_DATA_FLAG_EOF;
    return 0;
  }
  Out& o = it->second;
  size_t avail = o.buf.size() - o.off;
  size_t n = std::min(length, avail);
  if (n == 0 && !o.eof) {
    o.deferred = true;
    return NGHTTP2_ERR_DEFERRED;
  }
  // The bytes are taken in send_data_cb, straight from o.buf to the TLS
  // output (not copied into nghttp2's frame buffer first).
  *flags |= NGHTTP2_DATA_FLAG_NO_COPY;
  if (o.eof && n == avail) *flags |= NGHTTP2_DATA_FLAG_EOF;
  return static_cast<ssize_t>(n);
}

int H2Conn::send_data_cb(nghttp2_session*, nghttp2_frame* f, const uint8_t* framehd, size_t length,
                         nghttp2_data_source*, void* arg) {
  auto* self = static_cast<H2Conn*>(arg);
  // nghttp2 would send every DATA frame the windows allow in one
  // mem_send call: keep our output bounded, it asks again later.
  if (self->wbuf_.size() - self->woff_ >= kSocketHighWater) {
    self->data_blocked_ = true;
    return NGHTTP2_ERR_WOULDBLOCK;
  }
  auto it = self->out_.find(f->hd.stream_id);
  // We never pad; a buffer that lost the promised bytes is a bug, not input.
  if (f->data.padlen > 0 || (length > 0 && (it == self->out_.end() || it->second.buf.size() - it->second.off < length)))
    return NGHTTP2_ERR_CALLBACK_FAILURE;
  self->bytes_out_ += 9 + length;
  if (length == 0) {
    self->wbuf_.append(reinterpret_cast<const char*>(framehd), 9);
    return 0;
  }
  Out& o = it->second;
  self->send_frame(framehd, o.buf.data() + o.off, length);
  o.off += length;
  self->total_out_ -= length;
  compact(o.buf, o.off);
  return 0;
}

// One DATA frame: straight from the stream's buffer into SSL_write (which
// copies it once, into its record) while nothing waits before it, else
// queued in wbuf_ behind what waits. Saves copying every byte into wbuf_
// first (measured: a sixth of the session's CPU per byte was memmove; the
// 9-byte header becomes a TLS record of its own, 22 bytes more per frame).
void H2Conn::send_frame(const uint8_t* framehd, const char* data, size_t len) {
  size_t done = 0;
  bool direct = ssl_ && woff_ == wbuf_.size() && !retry_len_ && !write_wants_read_ && handover_.sent.empty();
  if (direct) {
    ERR_clear_error();
    size_t n = 9;  // the length of the call that did not go through
    int r = SSL_write(ssl_, framehd, 9);
    if (r == 9) {
      while (done < len) {
        n = std::min(len - done, kMaxWrite);
        ERR_clear_error();
        r = SSL_write(ssl_, data + done, static_cast<int>(n));
        if (r <= 0) break;
        done += static_cast<size_t>(r);
      }
      if (done == len) return;
    } else {
      wbuf_.append(reinterpret_cast<const char*>(framehd), 9);
    }
    // SSL_write waits (for room, or for input): write_tls repeats the same
    // call, from wbuf_ (SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER). On a failure
    // it fails again there and closes (not from inside nghttp2).
    int err = SSL_get_error(ssl_, r);
    if (err == SSL_ERROR_WANT_WRITE || err == SSL_ERROR_WANT_READ) {
      retry_len_ = n;
      if (err == SSL_ERROR_WANT_READ) write_wants_read_ = true;
    }
  } else {
    wbuf_.append(reinterpret_cast<const char*>(framehd), 9);
  }
  wbuf_.append(data + done, len - done);
}

nghttp2_data_provider H2Conn::provider() {
  nghttp2_data_provider p{};
  p.read_callback = data_read_cb;
  return p;
}

int32_t H2Conn::request(const Headers& h, bool has_body) {
  if (!h2_ || closed_) return -1;
  auto nv = to_nv(h);
  nghttp2_data_provider p = provider();
  int32_t id = nghttp2_submit_request(h2_, nullptr, nv.data(), nv.size(), has_body ? &p : nullptr, nullptr);
  if (id < 0) return -1;
  if (has_body) out_[id].has_provider = true;
  pump();
  return id;
}

bool H2Conn::respond(int32_t stream, const Headers& h, bool has_body) {
  if (!h2_ || closed_) return false;
  auto nv = to_nv(h);
  nghttp2_data_provider p = provider();
  if (has_body) out_[stream].has_provider = true;
  int rv = nghttp2_submit_response(h2_, stream, nv.data(), nv.size(), has_body ? &p : nullptr);
  if (rv != 0) {
    out_.erase(stream);
    return false;
  }
  pump();
  return true;
}

void H2Conn::respond_simple(int32_t stream, int status, const std::string& content_type, const std::string& body) {
  if (!respond(stream, {{":status", std::to_string(status)}, {"content-type", content_type}}, true)) return;
  send(stream, body.data(), body.size());
  end(stream);
}

size_t H2Conn::send(int32_t stream, const void* data, size_t len) {
  auto it = out_.find(stream);
  if (it == out_.end() || closed_) return 0;
  Out& o = it->second;
  o.buf.append(static_cast<const char*>(data), len);
  total_out_ += len;
  if (total_out_ > settings_.total_high_water) total_high_ = true;
  size_t left = o.buf.size() - o.off;
  if (left > settings_.out_low_water) o.below_low = false;
  if (o.deferred) {
    o.deferred = false;
    nghttp2_session_resume_data(h2_, stream);
  }
  pump_later();
  return left;
}

void H2Conn::end(int32_t stream) {
  auto it = out_.find(stream);
  if (it == out_.end() || closed_) return;
  it->second.eof = true;
  if (it->second.deferred) {
    it->second.deferred = false;
    nghttp2_session_resume_data(h2_, stream);
  }
  pump();
}

size_t H2Conn::outbound(int32_t stream) const {
  auto it = out_.find(stream);
  return it == out_.end() ? 0 : it->second.buf.size() - it->second.off;
}

bool H2Conn::is_open(int32_t stream) const {
  return h2_ && !closed_ && nghttp2_session_find_stream(h2_, stream) != nullptr;
}

void H2Conn::reset(int32_t stream, uint32_t code) {
  if (!h2_ || closed_) return;
  nghttp2_submit_rst_stream(h2_, NGHTTP2_FLAG_NONE, stream, code);
  pump();
}

void H2Conn::consume(int32_t stream, size_t len) {
  if (!h2_ || closed_ || len == 0) return;
  nghttp2_session_consume(h2_, stream, len);
  pump_later();
}

void H2Conn::shutdown() {
  if (!h2_ || closed_) {
    if (!closed_) close("connection shut down");
    return;
  }
  closing_ = true;
  nghttp2_session_terminate_session(h2_, NGHTTP2_NO_ERROR);
  pump();
}

}  // namespace shimlet::proto
