// The backend probe of `make test`: takes a first snapshot of one registered page under
// whatever MEMSNAP_BACKEND asks for (unset: auto) and says, by its exit status, whether the
// suites can run under it. Not part of the gtest binary.
//
//   0   the backend is running. Prints its name first; for auto, then why each better
//       backend is unavailable (memsnap's own reason).
//   77  memsnap cannot provide it here (memsnap_set_backend answers Unsupported, the first
//       snapshot refuses it with a reason, which is printed) and the kernel, asked without
//       memsnap (kernel_offers.h), does not offer it either. The only answer on which
//       `make test` skips a backend.
//   1   anything else, printed: memsnap refuses what the kernel offers, or offers what the
//       kernel does not; auto did not pick the best backend memsnap can provide; the first
//       snapshot came up with another backend. A crash ends the probe with a signal, which
//       `make test` reports as a failure too.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "../kernel_offers.h"
#include "MemorySnapshot.h"

using namespace mozilla::recordreplay;

namespace {

const int kUnsupported = 77;

const char* Name(MemsnapBackend b) {
  switch (b) {
    case MemsnapBackend::LinuxMprotect: return "mprotect";
    case MemsnapBackend::LinuxUffd: return "uffd";
    case MemsnapBackend::LinuxUffdAsync: return "uffd-async";
    case MemsnapBackend::MacExceptionPort:
    case MemsnapBackend::MacSignal: return "auto";
    default: return "inactive";
  }
}

void FirstSnapshot() {
  InitializeMemorySnapshots();
  if (memsnap_set_tracking_mode(MemsnapTrackingMode::RegisteredOnly) != MemsnapStatus::Ok) {
    fprintf(stderr, "memsnap_set_tracking_mode failed\n");
    _exit(1);
  }
  AllocateMemory(memsnap_page_size(), MemoryKind::Tracked);
  TakeFirstMemorySnapshot();
}

MemsnapBackend Running() {
  MemsnapStats s;
  memset(&s, 0, sizeof s);
  s.struct_size = sizeof s;
  if (memsnap_get_stats(&s) != MemsnapStatus::Ok) return MemsnapBackend::Inactive;
  return s.backend;
}

#ifdef __linux__
// The requests, best first (the order auto prefers them in).
struct Request {
  int value;  // memsnap_set_backend's argument
  const char* name;  // MEMSNAP_BACKEND's spelling
  MemsnapBackend backend;
};
const Request kLinux[] = {
    {3, "uffd-async", MemsnapBackend::LinuxUffdAsync},
    {2, "uffd", MemsnapBackend::LinuxUffd},
    {1, "mprotect", MemsnapBackend::LinuxMprotect},
};

// Whether the kernel offers `r` to this process, asked without memsnap.
bool KernelOffers(const Request& r, char* why, size_t cap) {
  return r.value == 1 || mstest::KernelOffersUffd(r.value == 3, why, cap);
}

enum class Answer { Available, Unsupported, Inconsistent };

// Asks memsnap, in a child of its own (memsnap starts once per process), whether it can
// provide `r`: memsnap_set_backend's status, and when that is Unsupported the first
// snapshot forced through MEMSNAP_BACKEND must refuse it with a reason, which goes into
// `why`. Anything else is Inconsistent, described in `why`.
Answer Ask(const Request& r, char* why, size_t cap) {
  int fds[2];
  if (pipe(fds) != 0) {
    snprintf(why, cap, "pipe failed");
    return Answer::Inconsistent;
  }
  pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    dup2(fds[1], 2);
    alarm(30);
    setenv("MEMSNAP_BACKEND", r.name, 1);
    MemsnapStatus st = memsnap_set_backend(r.value);
    if (st == MemsnapStatus::Ok) _exit(0);
    if (st != MemsnapStatus::Unsupported) {
      fprintf(stderr, "memsnap_set_backend(%d): %s\n", r.value, memsnap_status_string(st));
      _exit(4);
    }
    FirstSnapshot();  // must abort with memsnap's reason
    fprintf(stderr, "memsnap_set_backend(%d) said Unsupported, yet the first snapshot took it\n",
            r.value);
    _exit(3);
  }
  close(fds[1]);
  char out[1024];
  size_t len = 0;
  for (ssize_t n; len < sizeof out - 1 && (n = read(fds[0], out + len, sizeof out - 1 - len)) > 0;)
    len += (size_t)n;
  out[len] = 0;
  close(fds[0]);
  int status = 0;
  if (pid < 0 || waitpid(pid, &status, 0) != pid) {
    snprintf(why, cap, "fork or waitpid failed");
    return Answer::Inconsistent;
  }
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return Answer::Available;
  char* nl = strchr(out, '\n');
  if (nl) *nl = 0;
  const char* reason = strstr(out, "unavailable: ");
  if (WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT && reason) {
    snprintf(why, cap, "%s", reason + strlen("unavailable: "));
    return Answer::Unsupported;
  }
  snprintf(why, cap, "asking memsnap for %s: status %#x, \"%.300s\"", r.name, status, out);
  return Answer::Inconsistent;
}

// Whether memsnap's and the kernel's answers for `r` agree; prints the disagreement.
bool Agree(const Request& r, Answer a, const char* memsnap_why) {
  char kernel_why[160] = "";
  const bool offered = KernelOffers(r, kernel_why, sizeof kernel_why);
  if (a == Answer::Unsupported && offered) {
    printf("memsnap refuses %s, which this kernel offers: %s\n", r.name, memsnap_why);
    return false;
  }
  if (a == Answer::Available && !offered) {
    printf("memsnap accepts %s, which this kernel does not offer: %s\n", r.name, kernel_why);
    return false;
  }
  return true;
}

#endif  // __linux__

}  // namespace

int main() {
  const char* env = getenv("MEMSNAP_BACKEND");
  const bool automatic = !env || !*env || strcmp(env, "auto") == 0;
#ifdef __linux__
  if (automatic) {
    // Auto must pick the best backend memsnap can provide, and every better one it passes
    // over must be refused with a reason (which is printed: the fallback says why).
    char line[1024] = "";
    size_t used = 0;
    const Request* best = nullptr;
    for (const Request& r : kLinux) {
      if (r.value == 1) {
        best = &r;
        break;
      }
      char why[512] = "";
      const Answer a = Ask(r, why, sizeof why);
      if (a == Answer::Inconsistent) {
        printf("%s\n", why);
        return 1;
      }
      if (!Agree(r, a, why)) return 1;
      if (a == Answer::Available) {
        best = &r;
        break;
      }
      used += (size_t)snprintf(line + used, sizeof line - used, "; %s unavailable: %s", r.name,
                               why);
      if (used >= sizeof line) used = sizeof line - 1;
    }
    FirstSnapshot();
    const MemsnapBackend got = Running();
    if (got != best->backend) {
      printf("auto chose %s, but the best backend memsnap can provide here is %s\n", Name(got),
             best->name);
      return 1;
    }
    printf("%s (auto%s)\n", best->name, line);
    return 0;
  }
  for (const Request& r : kLinux) {
    if (strcmp(env, r.name) != 0) continue;
    if (r.value != 1) {
      char why[512] = "";
      const Answer a = Ask(r, why, sizeof why);
      if (a == Answer::Inconsistent) {
        printf("%s\n", why);
        return 1;
      }
      if (!Agree(r, a, why)) return 1;
      if (a == Answer::Unsupported) {
        printf("%s\n", why);
        return kUnsupported;
      }
    }
    FirstSnapshot();
    const MemsnapBackend got = Running();
    if (got != r.backend) {
      printf("asked for %s, the first snapshot runs %s\n", r.name, Name(got));
      return 1;
    }
    printf("%s\n", r.name);
    return 0;
  }
  printf("MEMSNAP_BACKEND=%s is not a backend this probe knows\n", env);
  return 1;
#else
  // macOS has one mechanism, chosen by memsnap: `make test` runs it as `auto`.
  if (!automatic) {
    printf("MEMSNAP_BACKEND=%s: only auto exists on this system\n", env);
    return kUnsupported;
  }
  FirstSnapshot();
  const MemsnapBackend got = Running();
  printf("%s\n", Name(got));
  return got == MemsnapBackend::Inactive ? 1 : 0;
#endif
}
