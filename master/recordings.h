// The master's store of session recordings (docs/recording.md "On the
// master"): nodes upload each finished recording in chunks (at least once,
// resumable from the size the master reports); every byte is checked by the
// strict asciicast reader as it arrives, so only well-formed recordings are
// stored, and the metadata comes from the recording itself. Memory is
// bounded: chunks go to disk as they come, per-upload state is a reader's
// partial line and counters (at most kMaxLive uploads in memory; others are
// rebuilt from their file when they resume).
//
// Layout (DIR = --recording-dir, 0700):
//   DIR/.uploads/<id>.part       bytes received so far (0600)
//   DIR/.uploads/<id>.node       the uploading node and container id
//   DIR/<namespace>/<id>.cast    the recording, byte for byte as the node wrote it
//   DIR/<namespace>/<id>.json    its metadata (the Session object of the read API)
// A finished recording is the pair in its namespace: the .json is written
// first, the .cast renamed in last (fsync'ed), and only a .cast with its
// .json is listed. Partial uploads not resumed for 24 hours are removed.
#pragma once
#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "recording/asciicast.h"

namespace shimlet::master {

class RecordingStore {
 public:
  static constexpr size_t kMaxLive = 64;
  static constexpr size_t kMaxReadBytes = 1u << 20;  // one read API response (= masterclient::kMaxResponseBody)
  static constexpr int64_t kStaleUploadS = 24 * 3600;

  RecordingStore() = default;  // disabled: uploads are refused (404)
  // Creates DIR and DIR/.uploads (0700) and indexes the stored recordings.
  // max_bytes: the largest recording accepted. Throws shimlet::Error.
  RecordingStore(std::string dir, uint64_t max_bytes);
  bool enabled() const { return !dir_.empty(); }
  const std::string& dir() const { return dir_; }

  // Who registered a container id: the node, or nullopt when unregistered.
  using OwnerOf = std::function<std::optional<std::string>(const std::string& container_id)>;

  struct Upload {
    int code = 200;  // 200 taken; 400 malformed / id taken; 403 another node's container; 409 offset beyond size;
                     // 413 too large; 404 no store
    std::string error;
    uint64_t size = 0;      // bytes the master has (the offset to resume from)
    bool complete = false;  // stored whole: the node may delete its copy
    nlohmann::json stored;  // the metadata, when this request finished the recording (for the audit line)
  };
  // One chunk of `node`'s recording `id`: the bytes at `offset` (an empty
  // body asks for the size). With `final`, the chunk ends the recording.
  Upload upload(const std::string& node, const std::string& id, uint64_t offset, bool final, std::string_view body,
                const OwnerOf& owner, int64_t now_s);

  // Metadata of stored recordings, newest first: namespace "" = all, user "" = any.
  std::vector<nlohmann::json> list(const std::string& ns, const std::string& user, size_t limit) const;
  // Metadata of one recording by id, with its namespace; nullopt = none.
  std::optional<nlohmann::json> get(const std::string& id) const;
  // Bytes [offset, offset + length) of a stored recording (length <= kMaxReadBytes).
  std::optional<std::string> read(const std::string& id, uint64_t offset, size_t length) const;
  // Where a recording is (or will be) kept.
  std::string path_of(const std::string& ns, const std::string& id) const;

 private:
  struct Live {
    std::string node, container_id;
    uint64_t size = 0;
    recording::Reader reader{recording::Reader::Limits{4u << 20, true}};
    recording::Summary summary;
  };
  struct Indexed {
    std::string ns, user, start;
  };
  Live* live(const std::string& id, const std::string& node, bool create, std::string& why);
  void drop_upload(const std::string& id);
  void sweep_stale(int64_t now_s);
  nlohmann::json metadata(const std::string& id, const Live& l, int64_t now_s, bool registered) const;
  void index(const std::string& ns, const std::string& id);

  std::string dir_;
  uint64_t max_bytes_ = 0;
  std::map<std::string, std::unique_ptr<Live>> live_;
  std::list<std::string> lru_;  // live_ ids, most recent first
  std::map<std::string, Indexed> index_;
  int64_t last_sweep_s_ = 0;
};

}  // namespace shimlet::master
