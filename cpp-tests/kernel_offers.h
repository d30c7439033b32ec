// Whether this kernel and process offer the userfaultfd write-tracking backends, decided
// without memsnap: from what the kernel itself reports (a userfaultfd can be created,
// UFFDIO_API's feature bits, the kernel release). The suite and the backend probe of
// `make test` compare memsnap's verdict (memsnap_set_backend's Unsupported) against this,
// so a memsnap that wrongly refuses a backend fails instead of skipping it.
//
// Deliberately simpler than memsnap's own probe (which also registers, arms and scans
// pages): agreement between two different ways of asking is the point. Debian 12's
// headers predate the 6.7 uapi, hence the numbers spelled out below.
#ifndef MEMSNAP_KERNEL_OFFERS_H
#define MEMSNAP_KERNEL_OFFERS_H

#include <cstddef>
#include <cstdint>
#include <cstdio>

#ifdef __linux__
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <cerrno>
#endif

namespace mstest {

#ifdef __linux__
namespace kernel_offers_detail {
struct UffdioApi {
  uint64_t api, features, ioctls;
};
constexpr unsigned long kUffdioApi = 0xc018aa3fUL;        // _IOWR(0xAA, 0x3F, uffdio_api)
constexpr unsigned long kUserfaultfdIocNew = 0xaa00UL;    // _IO(0xAA, 0x00)
constexpr uint64_t kUffdApi = 0xAA;
constexpr uint64_t kFeatureWp = 1ull << 0;                // UFFD_FEATURE_PAGEFAULT_FLAG_WP
constexpr uint64_t kFeatureWpUnpopulated = 1ull << 13;    // UFFD_FEATURE_WP_UNPOPULATED (6.4)
constexpr uint64_t kFeatureWpAsync = 1ull << 15;          // UFFD_FEATURE_WP_ASYNC (6.7)
constexpr int kUserModeOnly = 1;                          // UFFD_USER_MODE_ONLY

// A userfaultfd by any of the ways a process may get one, or -1 with errno.
inline int OpenAnyUserfaultfd() {
  const int flags = O_CLOEXEC | O_NONBLOCK;
  int fd = (int)syscall(SYS_userfaultfd, flags);
  if (fd >= 0) return fd;
  const int first = errno;
  int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
  if (dev >= 0) {
    fd = ioctl(dev, kUserfaultfdIocNew, flags);
    close(dev);
    if (fd >= 0) return fd;
  }
  fd = (int)syscall(SYS_userfaultfd, flags | kUserModeOnly);
  if (fd >= 0) return fd;
  errno = first;
  return -1;
}

// The kernel release as major * 1000 + minor (6.18 -> 6018), 0 if unreadable.
inline int KernelRelease() {
  struct utsname u;
  if (uname(&u) != 0) return 0;
  int major = 0, minor = 0;
  if (sscanf(u.release, "%d.%d", &major, &minor) != 2) return 0;
  return major * 1000 + minor;
}
}  // namespace kernel_offers_detail

// Whether the kernel offers userfaultfd write protection to this process: in async mode
// (`async`: WP_ASYNC, Linux 6.7) or sync mode. When it does not, `why` (if given) says
// what is missing.
inline bool KernelOffersUffd(bool async, char* why = nullptr, size_t cap = 0) {
  using namespace kernel_offers_detail;
  auto say = [&](const char* fmt, long a) {
    if (why && cap) snprintf(why, cap, fmt, a);
    return false;
  };
  const int fd = OpenAnyUserfaultfd();
  if (fd < 0) return say("no userfaultfd can be created (errno %ld)", errno);
  UffdioApi api = {kUffdApi, 0, 0};
  const int r = ioctl(fd, kUffdioApi, &api);
  const int err = errno;
  close(fd);
  if (r != 0) return say("UFFDIO_API failed (errno %ld)", err);
  if (!(api.features & kFeatureWp))
    return say("no UFFD_FEATURE_PAGEFAULT_FLAG_WP (features %#lx)", (long)api.features);
  // Without WP_UNPOPULATED a first write to a never-touched page does not fault: sync
  // write protection cannot track anonymous memory (memsnap refuses it the same way).
  if (!(api.features & kFeatureWpUnpopulated))
    return say("no UFFD_FEATURE_WP_UNPOPULATED (features %#lx)", (long)api.features);
  if (!async) return true;
  if (KernelRelease() < 6007) return say("kernel release %ld before 6.7", KernelRelease());
  if (!(api.features & kFeatureWpAsync))
    return say("no UFFD_FEATURE_WP_ASYNC (features %#lx)", (long)api.features);
  return true;
}
#else
inline bool KernelOffersUffd(bool, char* why = nullptr, size_t cap = 0) {
  if (why && cap) snprintf(why, cap, "no userfaultfd on this system");
  return false;
}
#endif

}  // namespace mstest

#endif  // MEMSNAP_KERNEL_OFFERS_H
