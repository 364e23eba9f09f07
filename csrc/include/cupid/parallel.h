// Thread count of the OpenMP regions of the CPU kernels (scan, projection, quality).
//
// A region runs on one thread in two cases:
// 1. Small work. Starting a region wakes the pool's other threads and ends on a barrier that
//    waits for all of them; on a machine whose cores other processes hold, that wait is a
//    scheduler slice (7-27 ms measured here at load 2.5-3, process at nice 10), against well under 1 ms for the
//    serial loop of a small call. Each kernel names its own threshold (a work measure and
//    the measurement it comes from) and passes it as `serial_below`.
// 2. A forked child. GNU libgomp's thread pool does not survive fork(): the child inherits the
//    parent's pool bookkeeping but not its threads, so a child forked after the parent ran a
//    parallel region hangs in its first region with more than one thread (measured: the int8
//    scan hung in a multiprocessing 'fork' child). A pthread_atfork child handler, registered
//    when the module loads, marks the process, and every region runs serially there from then
//    on; a one-thread region (`if(false)`) does not touch the pool's threads and completes.
//    The tensorsketch kernels run on the pool as well, and in a forked child start per-call
//    std::threads instead (parallel_chunks in tensorsketch.cpp), so they keep their threads there.
//
// Every region splits its outputs so that each output element is computed by one thread in
// a fixed order: results are bit-identical whatever count this returns.
#pragma once

#include <cstdint>

namespace cupid {

// Threads for an OpenMP region doing `work` (in the caller's unit): 1 when work < serial_below
// or in a forked child, else omp_get_max_threads() (the count _C.set_num_threads sets).
// Use as `num_threads(nt) if(nt > 1)`.
int omp_threads(int64_t work, int64_t serial_below);

// Whether this process was forked from one that had loaded the module (see above).
bool in_forked_child();

}  // namespace cupid
