// A full disk for a unit test: a file size limit (RLIMIT_FSIZE) with SIGXFSZ
// ignored, so writes past it fail with EFBIG (a short write first), both
// restored on scope exit.
#pragma once
#include <signal.h>
#include <sys/resource.h>

namespace shimlet::test {

class FileSizeLimit {
 public:
  explicit FileSizeLimit(rlim_t bytes) {
    struct sigaction ign {};
    ign.sa_handler = SIG_IGN;
    sigaction(SIGXFSZ, &ign, &old_);
    getrlimit(RLIMIT_FSIZE, &saved_);
    rlimit small{bytes, saved_.rlim_max};
    setrlimit(RLIMIT_FSIZE, &small);
  }
  ~FileSizeLimit() {
    setrlimit(RLIMIT_FSIZE, &saved_);
    sigaction(SIGXFSZ, &old_, nullptr);
  }
  FileSizeLimit(const FileSizeLimit&) = delete;
  FileSizeLimit& operator=(const FileSizeLimit&) = delete;

 private:
  struct sigaction old_ {};
  rlimit saved_{};
};

}  // namespace shimlet::test
