// Programmatic dependent launch (sm_90) device side, shared by the decode kernels and the cache
// write that precedes a decode step. A kernel launched with
// cudaLaunchAttributeProgrammaticStreamSerialization may be scheduled while the kernel before it
// in the stream still runs: pdl_wait() blocks until that kernel has finished and its writes are
// visible (a no-op for an ordinary launch), so it must come before the first global-memory read;
// pdl_launch_dependents() lets the next kernel be scheduled before this grid ends.
#pragma once

namespace fireattn {

__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
__device__ __forceinline__ void pdl_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory"); }

}  // namespace fireattn
