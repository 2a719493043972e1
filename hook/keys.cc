// Key files: the node's local key pair (STATE_DIR/local.key, local.pub) that
// `shimctl --local` signs tickets with, and the trusted public keys of the config.
#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <memory>

#include "common/error.h"
#include "common/fd.h"
#include "common/file.h"
#include "common/openssl.h"
#include "hook/internal.h"

namespace shimlet::hook {
namespace {

// Public key PEM of an Ed25519 key; refuses other key types.
std::string ed25519_public_pem(EVP_PKEY* k, const std::string& what) {
  if (EVP_PKEY_get_id(k) != EVP_PKEY_ED25519) throw Error(what + ": not an Ed25519 key");
  BioPtr b(BIO_new(BIO_s_mem()));
  if (PEM_write_bio_PUBKEY(b.get(), k) != 1) throw Error(what + ": cannot encode public key");
  return bio_string(b.get());
}

}  // namespace

std::string load_public_key(const std::string& path) {
  std::string pem = read_regular_file(path, kMaxPemBytes);
  BioPtr b(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  PkeyPtr k(PEM_read_bio_PUBKEY(b.get(), nullptr, nullptr, nullptr));
  if (!k) throw Error(path + ": not a PEM public key (" + openssl_error() + ")");
  return ed25519_public_pem(k.get(), path);
}

// STATE_DIR/local.key (created once, race-safe: the key is written to a
// private temp file and link()ed into place, which never replaces a key
// another hook created first) and local.pub, always derived from local.key.
std::string ensure_local_key(const std::string& dir) {
  const std::string key_path = dir + "/local.key", pub_path = dir + "/local.pub";
  if (::access(key_path.c_str(), F_OK) != 0) {
    PkeyPtr k(EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519"));
    if (!k) throw Error("Ed25519 keygen: " + openssl_error());
    BioPtr b(BIO_new(BIO_s_mem()));
    if (PEM_write_bio_PrivateKey(b.get(), k.get(), nullptr, nullptr, 0, nullptr, nullptr) != 1)
      throw Error("encode local key: " + openssl_error());
    std::string pem = bio_string(b.get());
    std::string tmp = dir + "/.local.key.XXXXXX";
    Fd fd(::mkostemp(tmp.data(), O_CLOEXEC));  // mode 0600
    if (!fd) throw sys_error("create temp key in " + dir);
    try {
      write_all(fd.get(), pem.data(), pem.size());
      if (::fsync(fd.get()) < 0) throw sys_error("fsync " + tmp);
      if (::link(tmp.c_str(), key_path.c_str()) < 0 && errno != EEXIST) throw sys_error("link " + key_path);
    } catch (...) {
      ::unlink(tmp.c_str());
      throw;
    }
    ::unlink(tmp.c_str());
  }
  struct stat st {};
  if (::lstat(key_path.c_str(), &st) < 0) throw sys_error("lstat " + key_path);
  if (!S_ISREG(st.st_mode) || (st.st_mode & 077)) throw Error(key_path + ": must be a regular file with mode 0600");
  std::string pem = read_regular_file(key_path, kMaxPemBytes);
  BioPtr b(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  PkeyPtr k(PEM_read_bio_PrivateKey(b.get(), nullptr, nullptr, nullptr));
  if (!k) throw Error(key_path + ": not a PEM private key (" + openssl_error() + ")");
  std::string pub = ed25519_public_pem(k.get(), key_path);
  std::string have;
  try {
    have = read_regular_file(pub_path, kMaxPemBytes);
  } catch (const std::exception&) {
  }
  if (have != pub) write_file_atomic(pub_path, pub, 0644);
  return pub;
}

}  // namespace shimlet::hook
