#include <fcntl.h>
#include <gtest/gtest.h>

#include "common/base64.h"
#include "common/error.h"
#include "common/fd.h"
#include "common/hostport.h"
#include "common/systemd.h"
#include "tests/unit/temp_dir.h"

using namespace shimlet;

TEST(Base64, RoundTripsUrlAlphabetWithoutPadding) {
  for (size_t n = 0; n < 64; n++) {
    std::string in = random_bytes(n);
    std::string enc = base64url_encode(in);
    EXPECT_EQ(enc.find_first_of("+/="), std::string::npos);
    auto dec = base64url_decode(enc);
    ASSERT_TRUE(dec.has_value()) << enc;
    EXPECT_EQ(*dec, in);
  }
}

TEST(Base64, RejectsBadInput) {
  EXPECT_FALSE(base64url_decode("a").has_value());
  EXPECT_FALSE(base64url_decode("ab+c").has_value());
  EXPECT_FALSE(base64_decode("a*==").has_value());
  EXPECT_EQ(*base64_decode("aGk="), "hi");
}

TEST(Fd, ClosesOnDestruction) {
  int raw;
  {
    Pipe p = make_pipe();
    raw = p.read.get();
    EXPECT_GE(raw, 0);
  }
  EXPECT_EQ(fcntl(raw, F_GETFD), -1);
}

#include <openssl/pem.h>

#include "common/ed25519.h"

namespace {
std::string pem_of(EVP_PKEY* k, bool priv) {
  BIO* b = BIO_new(BIO_s_mem());
  if (priv)
    PEM_write_bio_PrivateKey(b, k, nullptr, nullptr, 0, nullptr, nullptr);
  else
    PEM_write_bio_PUBKEY(b, k);
  char* d;
  long n = BIO_get_mem_data(b, &d);
  std::string s(d, static_cast<size_t>(n));
  BIO_free(b);
  return s;
}
}  // namespace

TEST(Ed25519Pem, FastPathLoadsTheSameKeysAsOpenSSL) {
  EVP_PKEY* k = EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519");
  ASSERT_NE(k, nullptr);
  EVP_PKEY* pub = ed25519_public_from_pem(pem_of(k, false));
  EVP_PKEY* priv = ed25519_private_from_pem(pem_of(k, true));
  ASSERT_NE(pub, nullptr);
  ASSERT_NE(priv, nullptr);
  EXPECT_EQ(EVP_PKEY_eq(k, pub), 1);
  EXPECT_EQ(EVP_PKEY_eq(k, priv), 1);
  EVP_PKEY_free(pub);
  EVP_PKEY_free(priv);
  EVP_PKEY_free(k);
}

TEST(Ed25519Pem, OtherShapesFallBack) {
  EXPECT_EQ(ed25519_public_from_pem("garbage"), nullptr);
  EXPECT_EQ(ed25519_private_from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"), nullptr);
  EVP_PKEY* ec = EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-256");
  ASSERT_NE(ec, nullptr);
  EXPECT_EQ(ed25519_public_from_pem(pem_of(ec, false)), nullptr);
  EXPECT_EQ(ed25519_private_from_pem(pem_of(ec, true)), nullptr);
  EVP_PKEY_free(ec);
}

TEST(Ed25519Pem, GeneratedKeysRoundTripThroughOpenSSLReaders) {
  EVP_PKEY* k = ed25519_generate();
  std::string priv = ed25519_private_pem(k), pub = ed25519_public_pem(k);
  BIO* b = BIO_new_mem_buf(priv.data(), static_cast<int>(priv.size()));
  EVP_PKEY* back = PEM_read_bio_PrivateKey(b, nullptr, nullptr, nullptr);
  BIO_free(b);
  ASSERT_NE(back, nullptr) << priv;
  EXPECT_EQ(EVP_PKEY_eq(k, back), 1);
  b = BIO_new_mem_buf(pub.data(), static_cast<int>(pub.size()));
  EVP_PKEY* backpub = PEM_read_bio_PUBKEY(b, nullptr, nullptr, nullptr);
  BIO_free(b);
  ASSERT_NE(backpub, nullptr) << pub;
  EXPECT_EQ(EVP_PKEY_eq(k, backpub), 1);
  EVP_PKEY_free(back);
  EVP_PKEY_free(backpub);
  EVP_PKEY_free(k);
}

namespace {
// PEM of DER under label, 64 columns, with the given line ending.
std::string pem_wrap_der(const std::string& der, const char* label, const char* eol = "\n") {
  std::string b64 = base64_encode(der), out = std::string("-----BEGIN ") + label + "-----" + eol;
  for (size_t i = 0; i < b64.size(); i += 64) out += b64.substr(i, 64) + eol;
  return out + "-----END " + label + "-----" + eol;
}
// DER inside a PEM (the first block).
std::string der_of(const std::string& pem, const char* label) {
  std::string begin = std::string("-----BEGIN ") + label + "-----", end = std::string("-----END ") + label + "-----";
  size_t b = pem.find(begin) + begin.size(), e = pem.find(end);
  std::string b64;
  for (char c : pem.substr(b, e - b))
    if (c != '\n') b64 += c;
  return *base64_decode(b64);
}
}  // namespace

TEST(Ed25519Pem, AcceptsCrlfAndSurroundingText) {
  EVP_PKEY* k = ed25519_generate();
  std::string spki = ed25519_spki_der(k);
  ASSERT_EQ(spki.size(), 44u);
  std::string pem = "comment line\r\n" + pem_wrap_der(spki, "PUBLIC KEY", "\r\n") + "trailer\n";
  EVP_PKEY* pub = ed25519_public_from_pem(pem);
  ASSERT_NE(pub, nullptr);
  EXPECT_EQ(EVP_PKEY_eq(k, pub), 1);
  EVP_PKEY_free(pub);
  EVP_PKEY_free(k);
}

TEST(Ed25519Pem, RejectsWrongPrefixLengthLabelAndGarbage) {
  EVP_PKEY* k = ed25519_generate();
  std::string spki = der_of(ed25519_public_pem(k), "PUBLIC KEY");
  std::string pkcs8 = der_of(ed25519_private_pem(k), "PRIVATE KEY");
  ASSERT_EQ(spki.size(), 44u);
  ASSERT_EQ(pkcs8.size(), 48u);
  // Sanity: the unmodified DER loads.
  EVP_PKEY* ok = ed25519_private_from_pem(pem_wrap_der(pkcs8, "PRIVATE KEY"));
  ASSERT_NE(ok, nullptr);
  EVP_PKEY_free(ok);
  for (size_t i = 0; i < 12; i++) {  // every byte of the SPKI prefix matters
    std::string bad = spki;
    bad[i] ^= 0x01;
    EXPECT_EQ(ed25519_public_from_pem(pem_wrap_der(bad, "PUBLIC KEY")), nullptr) << "byte " << i;
  }
  for (size_t i = 0; i < 16; i++) {  // and of the PKCS#8 prefix
    std::string bad = pkcs8;
    bad[i] ^= 0x01;
    EXPECT_EQ(ed25519_private_from_pem(pem_wrap_der(bad, "PRIVATE KEY")), nullptr) << "byte " << i;
  }
  // X25519 shares the shape but not the OID (1.3.101.110).
  std::string x25519 = spki;
  x25519[8] = 0x6e;
  EXPECT_EQ(ed25519_public_from_pem(pem_wrap_der(x25519, "PUBLIC KEY")), nullptr);
  // Truncated, extended, wrong label, bad base64, no END line, huge body.
  EXPECT_EQ(ed25519_public_from_pem(pem_wrap_der(spki.substr(0, 43), "PUBLIC KEY")), nullptr);
  EXPECT_EQ(ed25519_public_from_pem(pem_wrap_der(spki + "x", "PUBLIC KEY")), nullptr);
  EXPECT_EQ(ed25519_private_from_pem(pem_wrap_der(pkcs8 + std::string(2, '\0'), "PRIVATE KEY")), nullptr);
  EXPECT_EQ(ed25519_private_from_pem(pem_wrap_der(spki, "PRIVATE KEY")), nullptr);
  EXPECT_EQ(ed25519_public_from_pem(pem_wrap_der(pkcs8, "PUBLIC KEY")), nullptr);
  EXPECT_EQ(ed25519_public_from_pem(pem_wrap_der(spki, "CERTIFICATE")), nullptr);
  EXPECT_EQ(ed25519_public_from_pem("-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----\n"), nullptr);
  EXPECT_EQ(ed25519_public_from_pem("-----BEGIN PUBLIC KEY-----\n" + base64_encode(spki) + "\n"), nullptr);
  EXPECT_EQ(ed25519_public_from_pem(pem_wrap_der(std::string(100000, 'A'), "PUBLIC KEY")), nullptr);
  EXPECT_EQ(ed25519_public_from_pem(""), nullptr);
  EXPECT_EQ(ed25519_spki_der(nullptr), "");
  EVP_PKEY_free(k);
}

// ---- the utility layer: files, clocks, pidfds, OpenSSL, text, libevent

#include <openssl/err.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "common/clock.h"
#include "common/error.h"
#include "common/event.h"
#include "common/file.h"
#include "common/openssl.h"
#include "common/pidfd.h"
#include "common/text.h"

namespace {

struct TempDir : shimlet::test::TempDir {
  TempDir() : shimlet::test::TempDir("common-test") {}
};

int code_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::system_error& e) {
    return e.code().value();
  }
  return 0;
}

}  // namespace

TEST(File, ReadsBoundedKeepingErrno) {
  TempDir d;
  std::string p = d.path + "/f";
  std::ofstream(p) << "hello";
  EXPECT_EQ(read_file(p, 5), "hello");
  EXPECT_EQ(read_regular_file(p, 5), "hello");
  EXPECT_THROW(read_file(p, 4), Error);
  EXPECT_THROW(read_regular_file(p, 4), Error);
  // errno survives into the exception, and the message names the path.
  EXPECT_EQ(code_of([&] { read_file(d.path + "/missing", 10); }), ENOENT);
  try {
    read_file(d.path + "/missing", 10);
  } catch (const std::system_error& e) {
    EXPECT_NE(std::string(e.what()).find(d.path + "/missing"), std::string::npos) << e.what();
  }
  // Not a regular file: refused before any read (a FIFO would block).
  std::string fifo = d.path + "/fifo";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  EXPECT_THROW(read_regular_file(fifo, 10, O_NONBLOCK), Error);
  EXPECT_THROW(read_regular_file(d.path, 10), Error);
  // O_NOFOLLOW and friends are honoured.
  std::string link = d.path + "/link";
  ASSERT_EQ(symlink(p.c_str(), link.c_str()), 0);
  EXPECT_EQ(code_of([&] { read_file(link, 10, O_NOFOLLOW); }), ELOOP);
  EXPECT_EQ(read_file(link, 10), "hello");
}

TEST(File, ReadFdAndReadIfReadable) {
  TempDir d;
  std::string p = d.path + "/f";
  std::ofstream(p) << std::string(40000, 'x');  // more than one read chunk
  Fd fd(open(p.c_str(), O_RDONLY | O_CLOEXEC));
  EXPECT_EQ(read_fd(fd.get(), 40000, "f").size(), 40000u);
  EXPECT_EQ(read_file_if_readable(p, 40000)->size(), 40000u);
  errno = 0;
  EXPECT_FALSE(read_file_if_readable(p, 39999));
  EXPECT_EQ(errno, EFBIG);
  EXPECT_FALSE(read_file_if_readable(d.path + "/missing", 10));
  EXPECT_EQ(errno, ENOENT);
}

TEST(File, WriteAtomicReplacesWithModeAndLeavesNoTemp) {
  TempDir d;
  std::string p = d.path + "/state.json";
  write_file_atomic(p, "one", 0600);
  write_file_atomic(p, "two", 0640);
  EXPECT_EQ(read_file(p, 10), "two");
  struct stat st {};
  ASSERT_EQ(stat(p.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0640u);
  size_t n = 0;
  for (auto& e : std::filesystem::directory_iterator(d.path)) n += e.path().filename() != "state.json";
  EXPECT_EQ(n, 0u);
  EXPECT_EQ(code_of([&] { write_file_atomic(d.path + "/no/such/dir/f", "x", 0600); }), ENOENT);
}

TEST(Clock, MonotonicAndDeadline) {
  int64_t a = monotonic_ms();
  Deadline never(1 << 30), now(0), soon(50);
  EXPECT_GT(never.left_ms(), 1000);
  EXPECT_TRUE(now.passed());
  EXPECT_EQ(now.left_ms(), 0);
  EXPECT_LE(soon.left_ms(), 50);
  usleep(60 * 1000);
  EXPECT_TRUE(soon.passed());
  EXPECT_GE(monotonic_ms() - a, 60);
}

TEST(Pidfd, OpenSignalAndGone) {
  pid_t child = fork();
  if (child == 0) {
    pause();
    _exit(0);
  }
  Fd p = open_pidfd(child);
  ASSERT_TRUE(p);
  EXPECT_EQ(fcntl(p.get(), F_GETFD) & FD_CLOEXEC, FD_CLOEXEC);
  EXPECT_EQ(pidfd_signal(p.get(), 0), 0);
  EXPECT_EQ(pidfd_signal(p.get(), SIGKILL), 0);
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  EXPECT_EQ(pidfd_signal(p.get(), 0), -1);
  EXPECT_EQ(errno, ESRCH);
  EXPECT_FALSE(open_pidfd(child));  // reaped: no such process
  EXPECT_EQ(errno, ESRCH);
}

TEST(OpenSsl, ErrorQueueAsOneLine) {
  ERR_clear_error();
  EXPECT_EQ(openssl_error(), "no OpenSSL error");
  BioPtr b(BIO_new_mem_buf("not a key", -1));
  PkeyPtr k(PEM_read_bio_PrivateKey(b.get(), nullptr, nullptr, nullptr));
  EXPECT_FALSE(k);
  std::string e = openssl_error();
  EXPECT_NE(e, "no OpenSSL error");
  EXPECT_EQ(e.find('\n'), std::string::npos);
  EXPECT_EQ(openssl_error(), "no OpenSSL error");  // the queue was cleared
  BioPtr m(BIO_new(BIO_s_mem()));
  BIO_write(m.get(), "abc", 3);
  EXPECT_EQ(bio_string(m.get()), "abc");
}

TEST(Text, OneLine) {
  EXPECT_EQ(one_line("a\nb\tc\x7f", 100), "a b c");
  EXPECT_EQ(one_line("abcdef", 3), "abc");
  EXPECT_EQ(one_line("trailing  \r\n"), "trailing");
  EXPECT_EQ(one_line(""), "");
}

TEST(Event, CheckedCreation) {
  EventBasePtr base = new_event_base();
  ASSERT_TRUE(base);
  bool fired = false;
  EventPtr t = new_timer(
      base.get(), [](evutil_socket_t, short, void* f) { *static_cast<bool*>(f) = true; }, &fired);
  timeval zero{0, 0};
  event_add(t.get(), &zero);
  event_base_loop(base.get(), EVLOOP_ONCE);
  EXPECT_TRUE(fired);
  EXPECT_TRUE(new_evbuffer());
}

TEST(HostPort, NamesAddressesAndPorts) {
  auto hp = shimlet::parse_host_port("master.example:6443");
  EXPECT_EQ(hp.host, "master.example");
  EXPECT_EQ(hp.port, 6443);
  hp = shimlet::parse_host_port("10.0.0.1");
  EXPECT_EQ(hp.host, "10.0.0.1");
  EXPECT_FALSE(hp.port);
  hp = shimlet::parse_host_port("[fd00::1]:2379");
  EXPECT_EQ(hp.host, "fd00::1");
  EXPECT_EQ(hp.port, 2379);
  for (const char* bad : {"", ":1", "h:", "h:0", "h:65536", "h:1x", "[::1", "[::1]x", "[nope]:1", "::1:80"})
    EXPECT_THROW(shimlet::parse_host_port(bad), shimlet::Error) << bad;
}

#include <sys/socket.h>
#include <sys/un.h>

#include <cstring>

// The notifications as systemd receives them: datagrams on $NOTIFY_SOCKET.
TEST(Systemd, NotifiesOnTheSocketAndReadsTheWatchdog) {
  test::TempDir dir;
  std::string path = dir.path + "/notify";
  Fd sock(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  ASSERT_TRUE(sock);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  ASSERT_LT(path.size(), sizeof addr.sun_path);
  memcpy(addr.sun_path, path.c_str(), path.size());
  ASSERT_EQ(::bind(sock.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0) << strerror(errno);
  auto next = [&] {
    char buf[256];
    ssize_t n = ::recv(sock.get(), buf, sizeof buf, MSG_DONTWAIT);
    return n < 0 ? std::string("(none)") : std::string(buf, static_cast<size_t>(n));
  };

  ::unsetenv("NOTIFY_SOCKET");
  systemd::ready("outside systemd");  // a no-op
  EXPECT_FALSE(systemd::watchdog_interval());

  ASSERT_EQ(::setenv("NOTIFY_SOCKET", path.c_str(), 1), 0);
  systemd::ready("serving /run/x.sock");
  EXPECT_EQ(next(), "READY=1\nSTATUS=serving /run/x.sock");
  systemd::watchdog_ping();
  EXPECT_EQ(next(), "WATCHDOG=1");
  systemd::stopping();
  EXPECT_EQ(next(), "STOPPING=1");
  EXPECT_EQ(next(), "(none)");

  ASSERT_EQ(::setenv("WATCHDOG_USEC", "30000000", 1), 0);
  ASSERT_EQ(::setenv("WATCHDOG_PID", std::to_string(getpid()).c_str(), 1), 0);
  EXPECT_EQ(systemd::watchdog_interval(), std::chrono::seconds(30));
  ASSERT_EQ(::setenv("WATCHDOG_PID", "1", 1), 0);  // another process's watchdog
  EXPECT_FALSE(systemd::watchdog_interval());
  for (const char* v : {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"}) ::unsetenv(v);
}
