// OCI seccomp -> BPF (nsenter/seccomp.h).
#include "nsenter/seccomp.h"

#include <errno.h>
#include <linux/seccomp.h>
#include <seccomp.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cctype>
#include <map>
#include <memory>
#include <optional>

#include "common/error.h"
#include "common/fd.h"
#include "common/file.h"

namespace shimlet::nsenter {
namespace {

uint32_t seccomp_action(const std::string& a, std::optional<unsigned> errno_ret) {
  if (a == "SCMP_ACT_KILL" || a == "SCMP_ACT_KILL_THREAD") return SCMP_ACT_KILL_THREAD;
  if (a == "SCMP_ACT_KILL_PROCESS") return SCMP_ACT_KILL_PROCESS;
  if (a == "SCMP_ACT_TRAP") return SCMP_ACT_TRAP;
  if (a == "SCMP_ACT_ERRNO") return SCMP_ACT_ERRNO(errno_ret.value_or(EPERM));
  if (a == "SCMP_ACT_TRACE") return SCMP_ACT_TRACE(errno_ret.value_or(EPERM));
  if (a == "SCMP_ACT_ALLOW") return SCMP_ACT_ALLOW;
  if (a == "SCMP_ACT_LOG") return SCMP_ACT_LOG;
  throw Error("seccomp: unsupported action " + a);
}

scmp_compare seccomp_op(const std::string& op) {
  if (op == "SCMP_CMP_NE") return SCMP_CMP_NE;
  if (op == "SCMP_CMP_LT") return SCMP_CMP_LT;
  if (op == "SCMP_CMP_LE") return SCMP_CMP_LE;
  if (op == "SCMP_CMP_EQ") return SCMP_CMP_EQ;
  if (op == "SCMP_CMP_GE") return SCMP_CMP_GE;
  if (op == "SCMP_CMP_GT") return SCMP_CMP_GT;
  if (op == "SCMP_CMP_MASKED_EQ") return SCMP_CMP_MASKED_EQ;
  throw Error("seccomp: unsupported operator " + op);
}

// runc's stub (libcontainer/seccomp/patchbpf) ahead of a profile whose
// default does not allow and is not ENOSYS: on each listed architecture, a
// syscall numbered above the profile's highest there fails with ENOSYS, so
// libc falls back from syscalls newer than the profile (clone3 -> clone).
// x86_64 and x32 share one audit arch and are told apart by __X32_SYSCALL_BIT.
std::vector<sock_filter> enosys_stub(const oci::Seccomp& s, const std::vector<uint32_t>& arches) {
  constexpr uint32_t kX32Bit = 0x40000000;
  std::map<uint32_t, std::optional<uint32_t>> native, x32;  // audit arch -> highest syscall
  for (uint32_t arch : arches) {
    std::optional<uint32_t> last;
    for (const auto& r : s.syscalls)
      for (const auto& name : r.names) {
        int nr = seccomp_syscall_resolve_name_arch(arch, name.c_str());
        if (nr >= 0 && (!last || static_cast<uint32_t>(nr) > *last)) last = static_cast<uint32_t>(nr);
      }
    if (!last) continue;
    if (arch == SCMP_ARCH_X32)
      x32[SCMP_ARCH_X86_64] = last;
    else
      native[arch] = last;
  }
  for (const auto& [audit, _] : x32) native.try_emplace(audit);
  if (native.empty()) return {};
  // Jump targets resolved at the end: kOut falls through to libseccomp's program.
  constexpr uint8_t kEnosys = 0xfe, kOut = 0xff;
  std::vector<sock_filter> f;
  for (const auto& [audit, last] : native) {
    auto x = x32.find(audit);
    size_t checks = (last ? 1 : 0) + (x != x32.end() ? 1 : 0) + (last && x != x32.end() ? 1 : 0);
    f.push_back(BPF_STMT(BPF_LD | BPF_W | BPF_ABS, 4));  // seccomp_data.arch
    f.push_back(BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, audit, 0, static_cast<uint8_t>(1 + checks)));
    f.push_back(BPF_STMT(BPF_LD | BPF_W | BPF_ABS, 0));  // seccomp_data.nr
    if (last && x != x32.end()) {
      f.push_back(BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, kX32Bit, 0, 1));
      f.push_back(BPF_JUMP(BPF_JMP | BPF_JGT | BPF_K, *x->second, kEnosys, kOut));
      f.push_back(BPF_JUMP(BPF_JMP | BPF_JGT | BPF_K, *last, kEnosys, kOut));
    } else if (last) {
      f.push_back(BPF_JUMP(BPF_JMP | BPF_JGT | BPF_K, *last, kEnosys, kOut));
    } else {
      f.push_back(BPF_JUMP(BPF_JMP | BPF_JGT | BPF_K, *x->second, kEnosys, kOut));
    }
  }
  size_t out = f.size(), enosys = f.size() + 1;
  f.push_back(BPF_JUMP(BPF_JMP | BPF_JA, 1, 0, 0));
  f.push_back(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS));
  for (size_t i = 0; i < out; i++) {
    auto target = [&](uint8_t& j) {
      if (j == kEnosys || j == kOut) j = static_cast<uint8_t>((j == kEnosys ? enosys : out) - i - 1);
    };
    if (BPF_CLASS(f[i].code) == BPF_JMP) {
      target(f[i].jt);
      target(f[i].jf);
    }
  }
  return f;
}

}  // namespace

SeccompProgram compile_seccomp(const oci::Seccomp& s) {
  SeccompProgram out;
  uint32_t def = seccomp_action(s.default_action, s.default_errno_ret);
  std::unique_ptr<void, void (*)(void*)> ctx(seccomp_init(def), [](void* c) { seccomp_release(c); });
  if (!ctx) throw Error("seccomp_init failed");
  // NO_NEW_PRIVS is decided by config.process.noNewPrivileges, not libseccomp.
  if (int rc = seccomp_attr_set(ctx.get(), SCMP_FLTATR_CTL_NNP, 0); rc < 0)
    throw sys_error("seccomp_attr_set(CTL_NNP)", -rc);
  std::vector<uint32_t> arches;
  for (const auto& a : s.architectures) {
    std::string name = a.rfind("SCMP_ARCH_", 0) == 0 ? a.substr(10) : a;
    for (auto& ch : name) ch = static_cast<char>(::tolower(static_cast<unsigned char>(ch)));
    uint32_t arch = seccomp_arch_resolve_name(name.c_str());
    if (arch == 0) throw Error("seccomp: unknown architecture " + a);
    int rc = seccomp_arch_add(ctx.get(), arch);
    if (rc < 0 && rc != -EEXIST) throw sys_error("seccomp_arch_add(" + a + ")", -rc);
    arches.push_back(arch);
  }
  for (const auto& f : s.flags) {
    if (f == "SECCOMP_FILTER_FLAG_LOG") {
      out.flags |= SECCOMP_FILTER_FLAG_LOG;
    } else if (f == "SECCOMP_FILTER_FLAG_SPEC_ALLOW") {
      out.flags |= SECCOMP_FILTER_FLAG_SPEC_ALLOW;
    } else if (f == "SECCOMP_FILTER_FLAG_TSYNC") {
      // The child is single-threaded: nothing to synchronise.
    } else {
      throw Error("seccomp: unsupported flag " + f);
    }
  }
  for (const auto& r : s.syscalls) {
    uint32_t act = seccomp_action(r.action, r.errno_ret);
    if (act == def) continue;  // libseccomp rejects it; it is a no-op anyway
    std::vector<scmp_arg_cmp> conds;
    unsigned per_index[6] = {};
    bool repeated = false;
    for (const auto& a : r.args) {
      conds.push_back(scmp_arg_cmp{a.index, seccomp_op(a.op), a.value, a.value_two});
      repeated |= ++per_index[a.index % 6] > 1;
    }
    for (const auto& name : r.names) {
      int nr = seccomp_syscall_resolve_name(name.c_str());
      if (nr == __NR_SCMP_ERROR) continue;  // unknown to this libseccomp/arch: runc ignores it too
      auto add = [&](const scmp_arg_cmp* c, unsigned n) {
        int rc = seccomp_rule_add_array(ctx.get(), act, nr, n, c);
        if (rc < 0) throw sys_error("seccomp: adding rule for syscall " + name, -rc);
      };
      if (conds.empty()) {
        add(nullptr, 0);
      } else if (repeated) {
        // Several conditions on one argument: each is its own rule (OR), as runc does.
        for (const auto& c : conds) add(&c, 1);
      } else {
        add(conds.data(), static_cast<unsigned>(conds.size()));
      }
    }
  }
  // Export the BPF program through a memfd (libseccomp 2.5 exports to fds only).
  Fd mem(::memfd_create("shimlet-seccomp", MFD_CLOEXEC));
  if (!mem) throw sys_error("memfd_create");
  if (int rc = seccomp_export_bpf(ctx.get(), mem.get()); rc < 0) throw sys_error("seccomp_export_bpf", -rc);
  if (::lseek(mem.get(), 0, SEEK_SET) < 0) throw sys_error("lseek memfd");
  std::string prog = read_fd(mem.get(), BPF_MAXINSNS * sizeof(sock_filter) * 8, "seccomp program");
  if (prog.empty() || prog.size() % sizeof(sock_filter) != 0) throw Error("seccomp: bad exported program size");
  if (def != SCMP_ACT_ALLOW && def != SCMP_ACT_LOG && def != SCMP_ACT_ERRNO(ENOSYS)) out.bpf = enosys_stub(s, arches);
  size_t stub = out.bpf.size();
  if (stub + prog.size() / sizeof(sock_filter) > BPF_MAXINSNS)
    throw Error("seccomp: filter has " + std::to_string(stub + prog.size() / sizeof(sock_filter)) +
                " instructions, more than the kernel's limit of " + std::to_string(BPF_MAXINSNS));
  out.bpf.resize(stub + prog.size() / sizeof(sock_filter));
  memcpy(out.bpf.data() + stub, prog.data(), prog.size());
  return out;
}

}  // namespace shimlet::nsenter
