// Thread count of the OpenMP regions (see csrc/include/cupid/parallel.h for why).
#include "cupid/parallel.h"

#include <omp.h>
#include <pthread.h>

#include <atomic>

namespace cupid {
namespace {

std::atomic<bool> g_forked_child{false};

// Runs in the child right after fork(), before anything else there: only an atomic store.
void mark_forked_child() { g_forked_child.store(true, std::memory_order_relaxed); }

// Registered when the shared library is loaded, so that every fork() after that (os.fork,
// multiprocessing's 'fork' context, a DataLoader worker, a C library) marks its child,
// whether or not a kernel has run yet.
struct AtForkRegistration {
  AtForkRegistration() { pthread_atfork(nullptr, nullptr, &mark_forked_child); }
};
const AtForkRegistration g_registration;

}  // namespace

bool in_forked_child() { return g_forked_child.load(std::memory_order_relaxed); }

int omp_threads(int64_t work, int64_t serial_below) {
  if (work < serial_below || in_forked_child()) return 1;
  return omp_get_max_threads();
}

}  // namespace cupid
