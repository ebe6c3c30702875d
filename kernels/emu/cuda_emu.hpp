// cuda_emu.hpp — runs smelt's CUDA kernels on the CPU, for machines without a GPU.
//
// What it is: the subset of CUDA C++ our kernels use, implemented in plain C++17, so that g++
// compiles a `.cu` file (after common.cuh) into a shared library whose kernels run with real
// CUDA thread semantics. kernels/src/emu.rs builds and loads it when `SMELT_CUDA_EMULATOR=1`.
//
// How work maps to CPU threads: the blocks of a launch are shared out among a few OS threads;
// each OS thread runs one block at a time, with every CUDA thread of the block a fiber
// on its own stack. A fiber runs until it reaches a synchronisation point —
// __syncthreads, a warp shuffle, mma.sync, ldmatrix — or returns; the scheduler then runs the
// next fiber.
// So the threads of a block interleave only at synchronisation points, which is exactly what a
// correct kernel may rely on: a kernel that reads shared memory another thread writes without a
// barrier in between sees stale data here (SMELT_EMU_ORDER=reverse runs the fibers in the other
// order, to expose the other half of such races).
//   __shared__ variables: thread-local statics (one copy per OS thread = per running block).
//   Warp shuffles, mma.sync and ldmatrix: all 32 lanes deposit their operands, meet, read, meet
//   again. cp.async: performed at the wait that retires it (SMELT_EMU_CP_ASYNC=eager: at the issue).
//
// What it checks, as errors returned to the launcher (never a crash):
//   - every kernel argument's kind (pointer, 32/64-bit integer, f32, f64) against the kernel's
//     parameter list, and the argument count;
//   - launch shape: block ≤ 1024 threads and within the kernel's __launch_bounds__, grid y/z ≤ 65535
//     (registers and shared memory per block are checked by kernels/src/emu.rs against ptxas's
//     report for sm_80 and sm_90, when NVRTC is installed);
//   - deadlock: threads waiting at a barrier that the others can never reach;
//   - a full-mask warp operation in a warp with an exited or missing lane (undefined on a GPU);
//   - misaligned ldmatrix rows and cp.async addresses, and cp.async copies never waited for;
//   - any load or store through a pointer misaligned for its type (a float4 / uint4 vector
//     access at an address that is not a multiple of 16, …: "misaligned address" on a GPU),
//     by -fsanitize=alignment, whose callback is defined at the end of this header (not in the
//     race detector's build);
//   - with SMELT_EMU_RACECHECK=1, data races within a block (what compute-sanitizer's racecheck
//     reports, and the same on global memory): two threads touch the same byte, one writes, and
//     no __syncthreads (or, within a warp, __syncwarp) orders them. The kernel source is then
//     compiled with -fsanitize=thread, whose per-access callbacks are the detector in namespace
//     race below (libtsan is not used). About 3x slower; see "the race detector" below.
// Out-of-bounds accesses are caught on the memory side (smelt_engine::cuda::emu): a guard page
// after every device block (SIGSEGV) and a canary after every tensor, checked after each launch.
// What it cannot check: races between blocks, GPU rounding (no FMA contraction here, exact expf
// for __expf).

#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>
#include <ucontext.h>

#define SMELT_EMU 1

// SMELT_EMU_RACECHECK: the kernel source is compiled with -fsanitize=thread, whose memory-access
// callbacks are the race detector below; SMELT_RT marks the emulator's own runtime, whose
// bookkeeping (warp slots, barrier counters) is not kernel memory and is left uninstrumented.
#ifdef SMELT_EMU_RACECHECK
#define SMELT_RT __attribute__((no_sanitize_thread))
#include <dlfcn.h>
#include <link.h>
#else
#define SMELT_RT
#endif

// ---- language ------------------------------------------------------------------------------
#ifdef SMELT_EMU_SCAN
#define __global__ __smelt_kernel__
#else
#define __global__
#endif
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#ifdef SMELT_EMU_SCAN
#define __launch_bounds__(...) __smelt_bounds__(__VA_ARGS__)
#else
#define __launch_bounds__(...)
#endif
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static thread_local

struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x, y, z; };
inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;
constexpr int warpSize = 32;

struct __attribute__((aligned(16))) float4 { float x, y, z, w; };
struct __attribute__((aligned(8))) float2 { float x, y; };
struct __attribute__((aligned(16))) uint4 { unsigned x, y, z, w; };
struct __attribute__((aligned(8))) uint2 { unsigned x, y; };
struct __attribute__((aligned(16))) int4 { int x, y, z, w; };
struct __attribute__((aligned(8))) int2 { int x, y; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }

// ---- intrinsics ----------------------------------------------------------------------------
template <class To, class From> inline To smelt_bits(From f) {
    static_assert(sizeof(To) == sizeof(From), "bit cast of different sizes");
    To t;
    std::memcpy(&t, &f, sizeof t);
    return t;
}
inline float __int_as_float(int v) { return smelt_bits<float>(v); }
inline float __uint_as_float(unsigned v) { return smelt_bits<float>(v); }
inline int __float_as_int(float v) { return smelt_bits<int>(v); }
inline unsigned __float_as_uint(float v) { return smelt_bits<unsigned>(v); }
inline double __longlong_as_double(long long v) { return smelt_bits<double>(v); }
inline long long __double_as_longlong(double v) { return smelt_bits<long long>(v); }
// Fast-math intrinsics run exactly here; their GPU error bounds are the tests' business.
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float rsqrtf(float a) { return 1.0f / sqrtf(a); }
inline float __saturatef(float a) { return a < 0.f ? 0.f : (a > 1.f ? 1.f : a); }
// CUDA's min/max accept mixed integer types (the common type wins), like its device headers.
template <class A, class B> inline auto min(A a, B b) -> std::common_type_t<A, B> {
    using C = std::common_type_t<A, B>;
    return (C)a < (C)b ? (C)a : (C)b;
}
template <class A, class B> inline auto max(A a, B b) -> std::common_type_t<A, B> {
    using C = std::common_type_t<A, B>;
    return (C)a < (C)b ? (C)b : (C)a;
}

// Atomics: blocks run on several OS threads, so these are real atomic read-modify-writes (and,
// under the race detector, atomic accesses: they race with plain accesses only).
namespace smelt_emu {
SMELT_RT inline void race_atomic(const void* p, unsigned bytes);
}
template <class T> SMELT_RT inline T smelt_atomic_add(T* p, T v) {
    smelt_emu::race_atomic(p, sizeof(T));
    if constexpr (std::is_integral_v<T>) {
        return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
    } else {
        using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
        U* q = reinterpret_cast<U*>(p);
        U old = __atomic_load_n(q, __ATOMIC_RELAXED);
        for (;;) {
            U next = smelt_bits<U>(T(smelt_bits<T>(old) + v));
            if (__atomic_compare_exchange_n(q, &old, next, false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED))
                return smelt_bits<T>(old);
        }
    }
}
inline float atomicAdd(float* p, float v) { return smelt_atomic_add(p, v); }
inline double atomicAdd(double* p, double v) { return smelt_atomic_add(p, v); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return smelt_atomic_add(p, v); }
inline int atomicAdd(int* p, int v) { return smelt_atomic_add(p, v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return smelt_atomic_add(p, v); }

// ---- the fiber runtime -----------------------------------------------------------------------
namespace smelt_emu {

enum class St : uint8_t { Ready, AtBlockBarrier, AtWarpBarrier, Done };

// Context switch. On x86-64 a few instructions that save the callee-saved registers and swap
// stacks (glibc's swapcontext also saves the signal mask, a system call per switch, which made
// the emulator several times slower); elsewhere ucontext.
#if defined(__x86_64__)
extern "C" void smelt_emu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .hidden smelt_emu_switch
    .globl smelt_emu_switch
    .type smelt_emu_switch, @function
smelt_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size smelt_emu_switch, .-smelt_emu_switch
)");
struct Context {
    void* sp = nullptr;
};
inline void switch_to(Context& save, Context& load) { smelt_emu_switch(&save.sp, load.sp); }
// A fresh context whose first switch enters `entry` on the stack [base, base + size).
inline void make_context(Context& c, char* base, size_t size, void (*entry)()) {
    uintptr_t top = (reinterpret_cast<uintptr_t>(base) + size) & ~uintptr_t(15);
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;                          // entry's return address: it never returns
    *--sp = reinterpret_cast<void*>(entry);   // popped by `ret` in smelt_emu_switch
    for (int i = 0; i < 6; ++i) *--sp = nullptr;  // rbp rbx r12 r13 r14 r15
    c.sp = sp;
}
#else
struct Context {
    ucontext_t uc;
};
inline void switch_to(Context& save, Context& load) { swapcontext(&save.uc, &load.uc); }
inline void make_context(Context& c, char* base, size_t size, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = base;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}
#endif

// One cp.async not yet performed: `group` is the number of commit_groups before it.
struct AsyncCopy {
    void* dst;
    const void* src;
    unsigned bytes;
    bool fill;  // src-size = bytes (copy) rather than 0 (zero-fill)
    unsigned group;
    SMELT_RT void perform() const {
        if (fill) std::memcpy(dst, src, bytes);
        else std::memset(dst, 0, bytes);
    }
};

struct Fiber {
    Context ctx;
    St st;
    uint3 tid;
    int lane, warp;
    unsigned shuffles;  // shuffles this thread has done: picks the slot of the next one
    char* stack;        // its stack mapping; the lowest page is the guard page
    std::vector<AsyncCopy> copies;  // issued, not yet waited for
    unsigned committed;             // cp.async.commit_group count
    unsigned wsync;                 // __syncwarp count: orders this warp's accesses (race detector)
    int quiet;                      // > 0: in the runtime, whose memory accesses are not the kernel's
};

struct Warp {
    int lanes = 0;       // lanes that exist (the last warp of an odd-sized block has fewer)
    int waiting = 0;     // lanes at the current warp barrier
    int exited = -1;     // a lane that has returned, if any
    unsigned reduced = 0;  // the operation count of the collective whose results are in `out`
    // Per-lane operands: mma.sync uses slots 0-5; shuffles alternate between slots 10 and 11.
    uint64_t slot[32][12];
    // warp_collective(): deposits (alternating like the shuffle slots) and results, per lane.
    alignas(16) unsigned char in[2][32][64];
    alignas(16) unsigned char out[32][64];
    void reset() {  // for the next block; the operand buffers are always written before read
        lanes = 0;
        waiting = 0;
        exited = -1;
        reduced = 0;
    }
};

namespace race {
struct Table;
}

struct Block {
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    int live = 0, at_block_barrier = 0, cur = 0;
    Context sched;
    void (*thunk)(const void*) = nullptr;
    const void* args = nullptr;
    std::string error;
    bool racing = false;  // a kernel fiber is running: its memory accesses are checked for races
    uint64_t gen = 0;     // one per block and per completed __syncthreads (race detector)
    race::Table* race = nullptr;
};

inline thread_local Block* B = nullptr;

constexpr size_t kStack = 256 << 10;  // each fiber's stack mapping, guard page included

SMELT_RT inline void fail(std::string msg) {
    if (B->error.empty()) B->error = std::move(msg);
}

// ---- the race detector (SMELT_EMU_RACECHECK=1) ----------------------------------------------
// What compute-sanitizer's racecheck reports, checked on every access the kernel makes to memory
// that is not its own stack: two threads of one block touch the same byte, at least one writes
// (an atomic counts as a write that races only with plain accesses), and no barrier orders them.
// Ordering: all threads of a block run between the same two __syncthreads, so accesses from
// different barrier intervals are ordered and only the current interval is remembered (entries
// carry the interval's `gen`); two lanes of one warp are also ordered by a __syncwarp between
// them. Shuffles, mma.sync and ldmatrix are not memory barriers, so they do not order accesses.
// A cp.async copy writes its destination from its issue until it lands: at the issue, in every
// barrier interval it stays in flight (unordered with every other thread), and at its wait; its
// source is read at the issue. ldmatrix reads each lane's row as that lane. Byte-exact; it remembers the last writer and two readers per byte.
// Accesses to global memory are checked within a block too; between blocks nothing is ordered
// or checked (as with racecheck).
namespace race {
struct Access {
    int tid = -1;  // linear thread index in the block; -1: none
    unsigned wsync = 0;
    bool async = false;  // a cp.async copy in flight: unordered with every other thread
};
struct Entry {
    uint64_t gen;  // the interval it belongs to; older entries are empty (0: never used)
    uintptr_t addr;
    Access w, r1, r2;
    Access w2;    // an earlier atomic writer, when several threads update the byte atomically
    bool atomic;  // every write in the interval was an atomic
};
enum Kind { Read, Write, Atomic };

// One per worker thread and launch (the workers are fresh threads), owned by its Block.
struct Table {
    std::vector<Entry> e;  // global memory: open addressing; entries of older intervals are free
    size_t used = 0;
    uint64_t gen = 0;
    uintptr_t smem_lo = 0, smem_hi = 0;  // this OS thread's __shared__ (TLS) block of this library
    Entry* smem = nullptr;               // one entry per byte of it (calloc: untouched pages stay free)
    bool busy = false;                   // inside the detector: its own library calls are not checked
    SMELT_RT ~Table() { free(smem); }
};

#ifdef SMELT_EMU_RACECHECK
constexpr bool enabled = true;
#else
constexpr bool enabled = false;
#endif

#ifdef SMELT_EMU_RACECHECK
struct FindTls {
    ElfW(Addr) base;  // this library's load address
    Table* t;
};
// Called with the loader's list lock held: it must take no loader lock itself. (dladdr here
// deadlocked against a dlopen on another thread: glibc's dlopen holds dl_load_lock and waits for
// the list lock, dladdr waits for dl_load_lock.)
SMELT_RT inline int find_tls(struct dl_phdr_info* info, size_t, void* data) {
    auto* q = static_cast<FindTls*>(data);
    if (info->dlpi_addr != q->base) return 0;
    for (int i = 0; i < info->dlpi_phnum; ++i)
        if (info->dlpi_phdr[i].p_type == PT_TLS && info->dlpi_tls_data) {
            q->t->smem_lo = reinterpret_cast<uintptr_t>(info->dlpi_tls_data);
            q->t->smem_hi = q->t->smem_lo + info->dlpi_phdr[i].p_memsz;
        }
    return 1;
}
#endif

SMELT_RT inline Table* new_table() {
    auto* t = new Table;
    t->e.resize(1 << 12);
#ifdef SMELT_EMU_RACECHECK
    // This thread's TLS block of the library exists by now: the worker has set B and blockDim.
    Dl_info self;
    if (dladdr(reinterpret_cast<void*>(&find_tls), &self)) {
        FindTls q{(ElfW(Addr))self.dli_fbase, t};
        dl_iterate_phdr(find_tls, &q);
    }
    if (t->smem_hi > t->smem_lo) t->smem = static_cast<Entry*>(calloc(t->smem_hi - t->smem_lo, sizeof(Entry)));
#endif
    return t;
}

SMELT_RT inline size_t slot_of(uintptr_t a, size_t mask) { return (size_t)((a * 0x9E3779B97F4A7C15ull) >> 20) & mask; }

// The entry of global-memory byte `a` in the current interval (new and empty if it had none).
SMELT_RT inline Entry& global_entry(Table& t, uintptr_t a) {
    for (;;) {
        const size_t mask = t.e.size() - 1;
        for (size_t i = slot_of(a, mask);; i = (i + 1) & mask) {
            Entry& x = t.e[i];
            if (x.gen == t.gen && x.addr == a) return x;
            if (x.gen != t.gen) {
                if (2 * (t.used + 1) <= t.e.size()) {
                    x = Entry{t.gen, a, {}, {}, {}, {}, false};
                    t.used++;
                    return x;
                }
                break;  // half full: grow and look again
            }
        }
        std::vector<Entry> old(t.e.size() * 2);
        old.swap(t.e);
        const size_t mask2 = t.e.size() - 1;
        for (const Entry& x : old)
            if (x.gen == t.gen)
                for (size_t i = slot_of(x.addr, mask2);; i = (i + 1) & mask2)
                    if (t.e[i].gen != t.gen) {
                        t.e[i] = x;
                        break;
                    }
    }
}

// Whether accesses a and b (by different threads) may run concurrently in this interval.
SMELT_RT inline bool concurrent(const Access& a, const Access& b) {
    return a.tid >= 0 && b.tid >= 0 && a.tid != b.tid &&
           (a.async || b.async || (a.tid >> 5) != (b.tid >> 5) || a.wsync == b.wsync);
}

SMELT_RT inline void report(const Table& t, uintptr_t a, const Access& first, Kind first_kind, const Access& now,
                            Kind kind) {
    const uint3 p = B->fibers[first.tid].tid, q = B->fibers[now.tid].tid;
    const Fiber* owner = nullptr;
    for (const Fiber& f : B->fibers)
        if (a >= reinterpret_cast<uintptr_t>(f.stack) && a < reinterpret_cast<uintptr_t>(f.stack) + kStack) owner = &f;
    char where[96];
    if (a >= t.smem_lo && a < t.smem_hi)
        snprintf(where, sizeof where, "shared memory at %p", reinterpret_cast<void*>(a));
    else if (owner)
        snprintf(where, sizeof where, "a local variable of thread (%u,%u,%u)", owner->tid.x, owner->tid.y, owner->tid.z);
    else
        snprintf(where, sizeof where, "global memory at %p", reinterpret_cast<void*>(a));
    const char* what[] = {"reads", "writes", "atomically updates"};
    char m[400];
    snprintf(m, sizeof m, "race on %s: thread (%u,%u,%u) %s it and thread (%u,%u,%u) %s it with no %s between them",
             where, p.x, p.y, p.z, what[first_kind], q.x, q.y, q.z, what[kind],
             (first.tid >> 5) == (now.tid >> 5) ? "__syncwarp or __syncthreads" : "__syncthreads");
    fail(m);
}

// Checks byte `a`'s entry against an access `now`, then records it; false on a race (reported).
SMELT_RT inline bool check(const Table& t, Entry& x, uintptr_t a, const Access& now, Kind kind) {
    for (const Access* w : {&x.w, &x.w2})
        if (concurrent(*w, now) && !(kind == Atomic && x.atomic)) {
            report(t, a, *w, x.atomic ? Atomic : Write, now, kind);
            return false;
        }
    if (kind != Read) {
        for (const Access* r : {&x.r1, &x.r2})
            if (concurrent(*r, now)) {
                report(t, a, *r, Read, now, kind);
                return false;
            }
        if (kind == Write) {
            x.atomic = false;  // and stays so: a later atomic by another thread races with it
            x.w2 = {};
        } else if (x.w.tid < 0) {
            x.atomic = true;
        } else if (x.atomic && x.w.tid != now.tid) {
            x.w2 = x.w;  // keep another atomic writer, so a plain access by this one still races
        }
        x.w = now;
    } else if (x.r1.tid < 0 || x.r1.tid == now.tid) {
        x.r1 = now;
    } else {
        x.r2 = now;
    }
    return true;
}

// Checks and records an access of `bytes` bytes at `p` by thread `tid` (default: the running
// one); `async`: by a cp.async copy that thread has in flight.
SMELT_RT inline void access(const void* p, size_t bytes, Kind kind, int tid = -1, bool async = false) {
    Block* b = B;
    if (!enabled || !b || !b->racing || !b->error.empty()) return;
    if (!b->race) {
        b->racing = false;  // constructing it calls instrumented library code
        b->race = new_table();
        b->racing = true;
    }
    Table& t = *b->race;
    if (t.busy) return;
    if (tid < 0) tid = b->cur;
    const Fiber& f = b->fibers.data()[tid];
    const uintptr_t a0 = reinterpret_cast<uintptr_t>(p);
    const uintptr_t stack = reinterpret_cast<uintptr_t>(f.stack);
    if (a0 >= stack && a0 < stack + kStack) return;  // its own locals
    if (t.gen != b->gen) {
        t.gen = b->gen;
        t.used = 0;
    }
    // Busy from here: growing the table and reporting call instrumented library code.
    t.busy = true;
    const Access now{tid, f.wsync, async};
    if (t.smem && a0 >= t.smem_lo && a0 + bytes <= t.smem_hi) {
        Entry* e = t.smem + (a0 - t.smem_lo);
        for (size_t i = 0; i < bytes; ++i) {
            if (e[i].gen != t.gen) e[i] = Entry{t.gen, a0 + i, {}, {}, {}, {}, false};
            if (!check(t, e[i], a0 + i, now, kind)) break;
        }
    } else {
        for (uintptr_t a = a0; a < a0 + bytes; ++a)
            if (!check(t, global_entry(t, a), a, now, kind)) break;
    }
    t.busy = false;
}

// A new barrier interval: every copy still in flight may land in it, so each is a write again.
SMELT_RT inline void copies_in_flight() {
    if (!enabled) return;
    Block& b = *B;
    for (size_t i = 0; i < b.fibers.size(); ++i)
        for (const AsyncCopy& c : b.fibers.data()[i].copies)
            if (c.bytes) access(c.dst, c.bytes, Write, (int)i, true);
}

// Library code the runtime calls (std::vector, std::string) is instrumented too; its accesses are
// the emulator's, not the kernel's (and a heap block one fiber's vector frees and another's
// reuses would look like shared data). A Quiet scope, per fiber because a scope may span a
// yield, hides them; the runtime reports the kernel's own accesses through access() directly.
struct Quiet {
    Fiber& f;
    SMELT_RT Quiet() : f(B->fibers[B->cur]) { ++f.quiet; }
    SMELT_RT ~Quiet() { --f.quiet; }
};

// An access by the kernel's own code (the -fsanitize=thread callbacks): outside Quiet scopes.
SMELT_RT inline void access_by_kernel(const void* p, size_t bytes, Kind kind) {
    Block* b = B;
    if (b && b->racing && b->fibers[b->cur].quiet == 0) access(p, bytes, kind);
}
}  // namespace race

SMELT_RT inline void race_atomic(const void* p, unsigned bytes) { race::access(p, bytes, race::Atomic); }

// Releases the fibers waiting with state `s`: all of the block's (warp < 0), or one warp's.
SMELT_RT inline void release(St s, int warp) {
    const size_t lo = warp < 0 ? 0 : (size_t)warp * 32;
    const size_t hi = warp < 0 ? B->fibers.size() : std::min(B->fibers.size(), lo + 32);
    for (size_t i = lo; i < hi; ++i)
        if (B->fibers[i].st == s) B->fibers[i].st = St::Ready;
}

SMELT_RT inline void yield_to_scheduler() {
    Fiber& f = B->fibers[B->cur];
    switch_to(f.ctx, B->sched);
}

SMELT_RT inline void sync_block() {
    Block& b = *B;
    if (++b.at_block_barrier == b.live) {
        b.at_block_barrier = 0;
        b.gen++;
        race::copies_in_flight();
        release(St::AtBlockBarrier, -1);
        return;
    }
    b.fibers[b.cur].st = St::AtBlockBarrier;
    yield_to_scheduler();
}

SMELT_RT inline void sync_warp(const char* op) {
    Block& b = *B;
    Fiber& f = b.fibers[b.cur];
    Warp& w = b.warps[f.warp];
    if (w.lanes != 32 || w.exited >= 0) {
        char m[200];
        if (w.lanes != 32)
            snprintf(m, sizeof m, "%s with a full mask in warp %d, which has only %d threads (blockDim %u)", op, f.warp,
                     w.lanes, blockDim.x * blockDim.y * blockDim.z);
        else
            snprintf(m, sizeof m, "%s with a full mask in warp %d after lane %d returned", op, f.warp, w.exited);
        fail(m);
        f.st = St::AtWarpBarrier;  // never released: the scheduler abandons the block
        yield_to_scheduler();
        return;
    }
    if (++w.waiting == 32) {
        w.waiting = 0;
        release(St::AtWarpBarrier, f.warp);
        return;
    }
    f.st = St::AtWarpBarrier;
    yield_to_scheduler();
}

SMELT_RT inline void check_mask(unsigned mask, const char* op) {
    if (mask != 0xffffffffu) {
        char m[120];
        snprintf(m, sizeof m, "%s with mask %#x: the emulator supports full-warp masks only", op, mask);
        fail(m);
    }
}

// Every lane deposits `v`, all meet, each reads lane `src(lane)`'s value, all meet again.
template <class T, class F> SMELT_RT inline T shuffle(unsigned mask, T v, F src, const char* op) {
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
    check_mask(mask, op);
    Fiber& f = B->fibers[B->cur];
    Warp& w = B->warps[f.warp];
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    // One barrier per shuffle: consecutive shuffles use different slots, and a lane can write a
    // slot again only two shuffles later, past a barrier every lane reaches after its read.
    const int k = 10 + (f.shuffles++ & 1);
    w.slot[f.lane][k] = bits;
    sync_warp(op);
    T out;
    std::memcpy(&out, &w.slot[src(f.lane)][k], sizeof(T));
    return out;
}

// A warp-wide data exchange in one rendezvous: every lane deposits v; after the barrier the first
// lane to run applies `all` to the 32 deposits (in lane order, transformed in place) and every
// lane reads its own entry. For trivially copyable T up to 64 bytes (a reduction state struct
// fits). The results are rewritten only after the next barrier, which every lane reaches after
// its read; deposits alternate between two buffers for the same reason.
template <class T, class F> SMELT_RT inline T warp_collective(T v, F all, const char* name) {
    static_assert(sizeof(T) <= 64 && std::is_trivially_copyable_v<T>, "warp collective over an unsupported type");
    race::Quiet quiet;
    Fiber& f = B->fibers[B->cur];
    Warp& w = B->warps[f.warp];
    const int k = f.shuffles++ & 1;
    std::memcpy(w.in[k][f.lane], &v, sizeof(T));
    sync_warp(name);
    if (w.reduced != f.shuffles) {
        w.reduced = f.shuffles;
        T x[32];
        for (int l = 0; l < 32; ++l) std::memcpy(&x[l], w.in[k][l], sizeof(T));
        all(x);
        for (int l = 0; l < 32; ++l) std::memcpy(w.out[l], &x[l], sizeof(T));
    }
    T out;
    std::memcpy(&out, w.out[f.lane], sizeof(T));
    return out;
}

// `for (o = 16; o > 0; o >>= 1) v = op(v, <v of lane ^ o>)`: the xor butterfly that warp
// reductions do with five __shfl_xor_sync, replayed with the same operations in the same order
// (so the same bits) in one rendezvous.
template <class T, class Op> inline T butterfly(T v, Op op, const char* name) {
    return warp_collective(v, [&](T* x) {
        T y[32];
        for (int o = 16; o > 0; o >>= 1) {
            for (int l = 0; l < 32; ++l) y[l] = op(x[l], x[l ^ o]);
            for (int l = 0; l < 32; ++l) x[l] = y[l];
        }
    }, name);
}

// `for (o = 1; o < 32; o <<= 1) { y = <v of lane - o>; if (lane >= o) v = op(v, y); }`: the
// inclusive scan done with five __shfl_up_sync, replayed the same way.
template <class T, class Op> inline T scan_up(T v, Op op, const char* name) {
    return warp_collective(v, [&](T* x) {
        T y[32];
        for (int o = 1; o < 32; o <<= 1) {
            for (int l = 0; l < 32; ++l) y[l] = l >= o ? op(x[l], x[l - o]) : x[l];
            for (int l = 0; l < 32; ++l) x[l] = y[l];
        }
    }, name);
}

SMELT_RT inline void fiber_main() {
    Block& b = *B;
    b.thunk(b.args);
    Fiber& f = b.fibers[b.cur];
    ++f.quiet;  // the kernel has returned
    if (!f.copies.empty()) {
        char m[160];
        snprintf(m, sizeof m, "thread (%u,%u,%u) returned with %zu cp.async copies never waited for", f.tid.x,
                 f.tid.y, f.tid.z, f.copies.size());
        fail(m);
    }
    f.st = St::Done;
    b.live--;
    Warp& w = b.warps[f.warp];
    if (w.exited < 0) w.exited = f.lane;
    if (w.waiting > 0) {
        char m[160];
        snprintf(m, sizeof m, "lane %d of warp %d returned while %d lanes wait at a warp-synchronous operation", f.lane,
                 f.warp, w.waiting);
        fail(m);
    }
    // Threads that have exited count as arrived at __syncthreads (as on sm_70+ hardware).
    if (b.at_block_barrier > 0 && b.at_block_barrier == b.live) {
        b.at_block_barrier = 0;
        b.gen++;
        race::copies_in_flight();
        release(St::AtBlockBarrier, -1);
    }
    // Back to the scheduler for good: this fiber is never resumed.
    Context dead;
    switch_to(dead, b.sched);
}


// Fiber stacks of one OS thread, reused by every block it runs.
struct Stacks {
    std::vector<char*> s;
    char* get(size_t i) {
        while (s.size() <= i) {
            void* p = mmap(nullptr, kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (p == MAP_FAILED) return nullptr;
            mprotect(p, 4096, PROT_NONE);  // guard page: an overflow faults instead of corrupting
            s.push_back(static_cast<char*>(p));
        }
        return s[i];
    }
    ~Stacks() {
        for (char* p : s) munmap(p, kStack);
    }
};

// Stacks outlive launches: mapping and first touching up to 1,024 fresh stacks per worker made
// every launch cost milliseconds, far more than the small kernels themselves.
struct StackPool {
    std::mutex lock;
    std::vector<std::unique_ptr<Stacks>> free;
    std::unique_ptr<Stacks> take() {
        std::lock_guard<std::mutex> g(lock);
        if (free.empty()) return std::make_unique<Stacks>();
        auto s = std::move(free.back());
        free.pop_back();
        return s;
    }
    void put(std::unique_ptr<Stacks> s) {
        std::lock_guard<std::mutex> g(lock);
        free.push_back(std::move(s));
    }
};
// One pool for every emulator library in the process (built with -fvisibility=hidden).
inline __attribute__((visibility("default"))) StackPool stack_pool;

inline std::string describe_deadlock(const Block& b) {
    int at_block = 0, at_warp = 0, done = 0;
    for (auto& f : b.fibers) {
        at_block += f.st == St::AtBlockBarrier;
        at_warp += f.st == St::AtWarpBarrier;
        done += f.st == St::Done;
    }
    char m[240];
    snprintf(m, sizeof m,
             "deadlock in block (%u,%u,%u): %d threads at __syncthreads, %d at a warp-synchronous operation, "
             "%d returned (threads wait at barriers the others never reach)",
             blockIdx.x, blockIdx.y, blockIdx.z, at_block, at_warp, done);
    return m;
}

// Runs one block to completion; false (with b.error set) on an error.
SMELT_RT inline bool run_block(Block& b, Stacks& stacks, bool reverse) {
    const unsigned n = blockDim.x * blockDim.y * blockDim.z;
    b.fibers.resize(n);
    b.warps.resize((n + 31) / 32);
    for (Warp& w : b.warps) w.reset();
    b.live = (int)n;
    b.at_block_barrier = 0;
    b.error.clear();
    b.gen++;
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = b.fibers[i];
        f.st = St::Ready;
        f.tid = {i % blockDim.x, (i / blockDim.x) % blockDim.y, i / (blockDim.x * blockDim.y)};
        f.lane = (int)(i % 32);
        f.warp = (int)(i / 32);
        f.shuffles = 0;
        f.copies.clear();
        f.committed = 0;
        f.wsync = 0;
        f.quiet = 0;
        b.warps[f.warp].lanes++;
        char* stack = stacks.get(i);
        if (!stack) {
            b.error = "cannot map a fiber stack (out of memory)";
            return false;
        }
        // Stack tops staggered within 64 KiB: at one stride apart they would all share the same
        // few cache sets, and every fiber switch would miss.
        const size_t stagger = (size_t)((i * 2654435761u) >> 22) * 64;
        f.stack = stack;
        make_context(f.ctx, stack + 4096, kStack - 4096 - stagger, fiber_main);
    }
    while (b.live > 0) {
        bool ran = false;
        for (unsigned k = 0; k < n; ++k) {
            const unsigned i = reverse ? n - 1 - k : k;
            if (b.fibers[i].st != St::Ready) continue;
            b.cur = (int)i;
            threadIdx = b.fibers[i].tid;
            b.racing = true;
            switch_to(b.sched, b.fibers[i].ctx);
            b.racing = false;
            ran = true;
            if (!b.error.empty()) return false;
        }
        if (!ran) {
            b.error = describe_deadlock(b);
            return false;
        }
    }
    return true;
}

// Kernel argument kinds, in the order of the Rust `Arg` enum.
enum Kind : uint8_t { KPtr, KI32, KU32, KU64, KI64, KF32, KF64 };
inline const char* kind_name(uint8_t k) {
    static const char* n[] = {"pointer", "i32", "u32", "u64", "i64", "f32", "f64"};
    return k < 7 ? n[k] : "unknown";
}

template <class P> inline bool accepts(uint8_t k) {
    if constexpr (std::is_pointer_v<P>) return k == KPtr;
    else if constexpr (std::is_same_v<P, float>) return k == KF32;
    else if constexpr (std::is_same_v<P, double>) return k == KF64;
    else if constexpr (std::is_integral_v<P> && sizeof(P) == 4) return std::is_signed_v<P> ? k == KI32 : k == KU32;
    else if constexpr (std::is_integral_v<P> && sizeof(P) == 8) return std::is_signed_v<P> ? k == KI64 : k == KU64;
    else return false;
}
template <class P> inline const char* param_name() {
    if constexpr (std::is_pointer_v<P>) return "pointer";
    else if constexpr (std::is_same_v<P, float>) return "f32";
    else if constexpr (std::is_same_v<P, double>) return "f64";
    else if constexpr (std::is_integral_v<P> && sizeof(P) == 4) return std::is_signed_v<P> ? "i32" : "u32";
    else if constexpr (std::is_integral_v<P> && sizeof(P) == 8) return std::is_signed_v<P> ? "i64" : "u64";
    else return "an unsupported type";
}
template <class P> inline P unpack(uint64_t bits) {
    if constexpr (std::is_pointer_v<P>) return reinterpret_cast<P>(static_cast<uintptr_t>(bits));
    else if constexpr (sizeof(P) == 4) return smelt_bits<P>(static_cast<uint32_t>(bits));
    else return smelt_bits<P>(bits);
}

template <class... A, size_t... I>
inline std::tuple<A...> unpack_all(const uint64_t* a, std::index_sequence<I...>) {
    return std::tuple<A...>(unpack<A>(a[I])...);
}

// Index of the first argument whose kind the parameter does not accept, or -1.
template <class... A, size_t... I> inline int first_bad_arg(const uint8_t* kinds, std::index_sequence<I...>) {
    int bad = -1;
    ((bad < 0 && !accepts<A>(kinds[I]) ? (void)(bad = (int)I) : (void)0), ...);
    return bad;
}

template <class... A> struct Call {
    void (*f)(A...);
    std::tuple<A...> args;
    SMELT_RT static void run(const void* self) {
        auto* c = static_cast<const Call*>(self);
        std::apply(c->f, c->args);  // each CUDA thread gets its own copies of the parameters
    }
};

inline int report(char* err, size_t len, const std::string& m) {
    snprintf(err, len, "%s", m.c_str());
    return 1;
}

// A fault inside a kernel (a read or write that reaches the guard page after a device block, or
// any other unmapped address) still ends the process, as it must, but first says which kernel,
// block and thread faulted and where — or that the thread overflowed its fiber stack (the
// handler runs on each worker's alternate signal stack, so it has a stack left to say so). Each
// emulator library chains to the handler installed before it (in the end Rust's, then the
// default action); a library's handler speaks only for its own kernels.
inline thread_local const char* current_kernel = nullptr;
inline struct sigaction previous_segv, previous_bus;

SMELT_RT inline void fault_handler(int sig, siginfo_t* info, void* ctx) {
    if (current_kernel && B) {
        char m[400];
        const char* a = info ? static_cast<const char*>(info->si_addr) : nullptr;
        const Fiber* f = B->cur >= 0 && B->cur < (int)B->fibers.size() ? &B->fibers[B->cur] : nullptr;
        const int n = f && a >= f->stack && a < f->stack + 4096
            ? snprintf(m, sizeof m,
                       "\nCUDA emulator: kernel %s, block (%u,%u,%u), thread (%u,%u,%u) overflowed its stack "
                       "(%zu KiB per emulated thread): a large local array? On a GPU it would be local memory\n",
                       current_kernel, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z,
                       (kStack - 4096) >> 10)
            : snprintf(m, sizeof m,
                               "\nCUDA emulator: kernel %s, block (%u,%u,%u), thread (%u,%u,%u) touched unmapped "
                               "memory at %p: out of bounds of its device buffers (the guard page after a block, or "
                               "no device memory at all)\n",
                               current_kernel, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y,
                               threadIdx.z, info ? info->si_addr : nullptr);
        if (n > 0) (void)!write(2, m, (size_t)std::min(n, (int)sizeof m - 1));
    }
    const struct sigaction& prev = sig == SIGBUS ? previous_bus : previous_segv;
    if (prev.sa_flags & SA_SIGINFO) {
        if (prev.sa_sigaction) return prev.sa_sigaction(sig, info, ctx);
    } else if (prev.sa_handler != SIG_IGN && prev.sa_handler != SIG_DFL && prev.sa_handler) {
        return prev.sa_handler(sig);
    }
    // Default action: restore it and return, so the faulting access repeats and ends the process.
    signal(sig, SIG_DFL);
}

inline void install_fault_handler() {
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = fault_handler;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(SIGSEGV, &sa, &previous_segv);
        sigaction(SIGBUS, &sa, &previous_bus);
    });
}

// Launches kernel `f` over grid × block; returns 0, or 1 with a message in `err`.
template <class... A>
SMELT_RT int launch(const char* name, void (*f)(A...), unsigned max_threads, const uint64_t* args, const uint8_t* kinds,
           int nargs, const unsigned* grid, const unsigned* block, char* err, size_t errlen) {
    constexpr int np = sizeof...(A);
    if (nargs != np)
        return report(err, errlen,
                      std::string(name) + ": the launcher passes " + std::to_string(nargs) + " arguments, the kernel takes " +
                          std::to_string(np));
    const int bad = first_bad_arg<A...>(kinds, std::index_sequence_for<A...>{});
    if (bad >= 0) {
        const char* want[] = {"", param_name<A>()...};
        return report(err, errlen,
                      std::string(name) + ": argument " + std::to_string(bad) + " is passed as " + kind_name(kinds[bad]) +
                          " but the kernel's parameter is " + want[bad + 1]);
    }
    const unsigned long long threads = (unsigned long long)block[0] * block[1] * block[2];
    if (threads == 0 || threads > 1024 || grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[1] > 65535 ||
        grid[2] > 65535 || grid[0] > 0x7fffffffu || block[2] > 64)
        return report(err, errlen,
                      std::string(name) + ": invalid launch: grid (" + std::to_string(grid[0]) + "," +
                          std::to_string(grid[1]) + "," + std::to_string(grid[2]) + ") block (" +
                          std::to_string(block[0]) + "," + std::to_string(block[1]) + "," + std::to_string(block[2]) +
                          ")");
    if (max_threads && threads > max_threads)
        return report(err, errlen,
                      std::string(name) + ": a block of " + std::to_string(threads) +
                          " threads exceeds the kernel's __launch_bounds__(" + std::to_string(max_threads) +
                          "): the driver refuses this launch");
    Call<A...> call{f, unpack_all<A...>(args, std::index_sequence_for<A...>{})};
    const unsigned long long nblocks = (unsigned long long)grid[0] * grid[1] * grid[2];
    const char* order = getenv("SMELT_EMU_ORDER");
    const bool reverse = order && strcmp(order, "reverse") == 0;
    unsigned workers = std::max(1u, std::thread::hardware_concurrency());
    if (const char* w = getenv("SMELT_EMU_THREADS")) workers = std::max(1, atoi(w));
    workers = (unsigned)std::min<unsigned long long>(workers, nblocks);
    std::atomic<unsigned long long> next{0};
    std::atomic<bool> failed{false};
    std::string first_error;
    std::atomic_flag error_lock = ATOMIC_FLAG_INIT;
    install_fault_handler();
    auto work = [&] {
        // The fault handler's own stack: a fiber that overflowed its stack has none left.
        std::vector<char> alt(64 << 10);
        stack_t ss{}, old_ss{};
        ss.ss_sp = alt.data();
        ss.ss_size = alt.size();
        sigaltstack(&ss, &old_ss);
        current_kernel = name;
        std::unique_ptr<Stacks> stacks = stack_pool.take();
        Block b;
        b.thunk = &Call<A...>::run;
        b.args = &call;
        B = &b;
        blockDim = {block[0], block[1], block[2]};
        gridDim = {grid[0], grid[1], grid[2]};
        for (;;) {
            const unsigned long long i = next.fetch_add(1);
            if (i >= nblocks || failed.load()) break;
            blockIdx = {(unsigned)(i % grid[0]), (unsigned)((i / grid[0]) % grid[1]), (unsigned)(i / ((unsigned long long)grid[0] * grid[1]))};
            if (!run_block(b, *stacks, reverse)) {
                while (error_lock.test_and_set()) {
                }
                if (!failed.exchange(true)) {
                    char where[80];
                    snprintf(where, sizeof where, " (block (%u,%u,%u))", blockIdx.x, blockIdx.y, blockIdx.z);
                    first_error = std::string(name) + ": " + b.error + where;
                }
                error_lock.clear();
                break;
            }
        }
        B = nullptr;
        delete b.race;
        stack_pool.put(std::move(stacks));
        sigaltstack(&old_ss, nullptr);
    };
    // Always fresh threads, even for one block: __shared__ memory then starts zeroed in every
    // launch instead of holding the caller's previous launch's values.
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < workers; ++t) pool.emplace_back(work);
    for (auto& t : pool) t.join();
    return failed.load() ? report(err, errlen, first_error) : 0;
}

}  // namespace smelt_emu

inline void __syncthreads() { smelt_emu::sync_block(); }
SMELT_RT inline void __syncwarp(unsigned mask = 0xffffffffu) {
    smelt_emu::check_mask(mask, "__syncwarp");
    smelt_emu::B->fibers[smelt_emu::B->cur].wsync++;
    smelt_emu::sync_warp("__syncwarp");
}
template <class T> inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    return smelt_emu::shuffle(mask, v, [=](int l) { return (l & ~(width - 1)) + (src & (width - 1)); }, "__shfl_sync");
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return smelt_emu::shuffle(
        mask, v, [=](int l) { int s = l ^ lane_mask; return s < ((l & ~(width - 1)) + width) ? s : l; },
        "__shfl_xor_sync");
}
template <class T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return smelt_emu::shuffle(
        mask, v, [=](int l) { return (int)(l & (width - 1)) >= (int)delta ? l - (int)delta : l; }, "__shfl_up_sync");
}
template <class T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return smelt_emu::shuffle(
        mask, v, [=](int l) { return (int)(l & (width - 1)) + (int)delta < width ? l + (int)delta : l; },
        "__shfl_down_sync");
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, with the PTX ISA's fragment layout
// (lane = 4·groupID + threadID_in_group; the lower half of each register is the lower index):
//   A (16×16, 4 regs): a0 (row g, k 2t..2t+1), a1 (row g+8, k 2t..), a2 (row g, k 2t+8..), a3 (row g+8, k 2t+8..)
//   B (16×8, 2 regs):  b0 (k 2t..2t+1, col g), b1 (k 2t+8..2t+9, col g)
//   C (16×8, 4 f32):   c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1)
SMELT_RT inline void smelt_emu_mma_m16n8k16_bf16(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    using namespace smelt_emu;
    race::Quiet quiet;
    Fiber& f = B->fibers[B->cur];
    Warp& w = B->warps[f.warp];
    uint64_t* s = w.slot[f.lane];
    for (int i = 0; i < 4; ++i) s[i] = a[i];
    s[4] = b0;
    s[5] = b1;
    sync_warp("mma.sync");
    auto bf = [](uint32_t reg, int hi) { return __uint_as_float((hi ? reg >> 16 : reg & 0xffffu) << 16); };
    auto A = [&](int r, int k) {  // element (r, k) of A
        const int g = r & 7, t = (k & 7) >> 1, reg = (r >= 8) + 2 * (k >= 8);
        return bf((uint32_t)w.slot[4 * g + t][reg], k & 1);
    };
    auto Bm = [&](int k, int n) {  // element (k, n) of B
        const int t = (k & 7) >> 1;
        return bf((uint32_t)w.slot[4 * n + t][4 + (k >= 8)], k & 1);
    };
    const int g = f.lane >> 2, t = f.lane & 3;
    for (int i = 0; i < 4; ++i) {
        const int r = g + 8 * (i >> 1), n = 2 * t + (i & 1);
        float acc = c[i];
        for (int k = 0; k < 16; ++k) acc += A(r, k) * Bm(k, n);
        c[i] = acc;
    }
    sync_warp("mma.sync");
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lane i gives the address of row i % 8 of
// matrix i / 8 (8 b16 = 16 bytes, 16-byte aligned); register m of lane l receives matrix m's
// elements (row l/4, cols 2(l%4), 2(l%4)+1), or with .trans (rows 2(l%4), 2(l%4)+1, col l/4);
// the lower index in the lower half.
SMELT_RT inline void smelt_emu_ldmatrix_x4(uint32_t* r, const void* row, bool trans) {
    using namespace smelt_emu;
    Fiber& f = B->fibers[B->cur];
    Warp& w = B->warps[f.warp];
    if (reinterpret_cast<uintptr_t>(row) % 16 != 0) {
        char m[120];
        snprintf(m, sizeof m, "ldmatrix: lane %d's row address %p is not 16-byte aligned", f.lane, row);
        fail(m);
    }
    w.slot[f.lane][6] = reinterpret_cast<uintptr_t>(row);
    race::access(row, 16, race::Read);  // the lane's row; the warp's reads of the others' are not its own
    race::Quiet quiet;
    sync_warp("ldmatrix");
    auto at = [&](int m, int rw, int col) {
        return (uint32_t)reinterpret_cast<const uint16_t*>(w.slot[8 * m + rw][6])[col];
    };
    const int l = f.lane;
    for (int m = 0; m < 4; ++m)
        r[m] = trans ? at(m, 2 * (l & 3), l >> 2) | (at(m, 2 * (l & 3) + 1, l >> 2) << 16)
                     : at(m, l >> 2, 2 * (l & 3)) | (at(m, l >> 2, 2 * (l & 3) + 1) << 16);
    sync_warp("ldmatrix");
}

// cp.async.{ca,cg}.shared.global of 4, 8 or 16 bytes (src-size = bytes, or 0 to zero-fill). A
// GPU may perform the copy at any moment between the issue and the cp.async.wait_group that
// retires it; the emulator takes one end: by default the wait (a kernel that reads the
// destination before waiting sees stale data), with SMELT_EMU_CP_ASYNC=eager the issue (a
// kernel that copies into a buffer other warps still read, without a barrier between, corrupts
// their reads — run it with SMELT_EMU_ORDER=reverse too, so each warp gets to be the late one).
inline bool cp_async_eager() {
    static const bool eager = [] {
        const char* e = getenv("SMELT_EMU_CP_ASYNC");
        return e && strcmp(e, "eager") == 0;
    }();
    return eager;
}
SMELT_RT inline void smelt_emu_cp_async(void* dst, const void* src, unsigned bytes, bool fill) {
    using namespace smelt_emu;
    Fiber& f = B->fibers[B->cur];
    if (reinterpret_cast<uintptr_t>(dst) % bytes != 0 || (fill && reinterpret_cast<uintptr_t>(src) % bytes != 0)) {
        char m[140];
        snprintf(m, sizeof m, "cp.async of %u bytes from %p to %p: both must be %u-byte aligned", bytes, src, dst, bytes);
        fail(m);
        return;
    }
    AsyncCopy c{dst, src, bytes, fill, f.committed};
    // The copy may land any time until its wait: a write from now (see copies_in_flight).
    race::access(dst, bytes, race::Write, -1, true);
    if (fill) race::access(src, bytes, race::Read, -1, true);
    race::Quiet quiet;
    if (cp_async_eager()) {
        c.perform();
        c.bytes = 0;  // listed as done, so that a copy never waited for is still an error
    }
    f.copies.push_back(c);
}
SMELT_RT inline void smelt_emu_cp_async_commit() { smelt_emu::B->fibers[smelt_emu::B->cur].committed++; }
// Waits until at most `n` of the newest committed groups are pending (uncommitted copies stay).
SMELT_RT inline void smelt_emu_cp_async_wait(unsigned n) {
    using namespace smelt_emu;
    race::Quiet quiet;
    Fiber& f = B->fibers[B->cur];
    const unsigned done = f.committed >= n ? f.committed - n : 0;  // groups [0, done) complete
    size_t keep = 0;
    for (size_t i = 0; i < f.copies.size(); ++i) {
        AsyncCopy& c = f.copies[i];
        if (c.group < done) {
            if (c.bytes) race::access(c.dst, c.bytes, race::Write);
            c.perform();
        } else {
            f.copies[keep++] = c;
        }
    }
    f.copies.resize(keep);
}

// One exported entry point per kernel (kernels/src/emu.rs appends these after the source, with the
// kernel's __launch_bounds__ thread count, or 0 when it declares none).
#define SMELT_EMU_EXPORT(name, max_threads)                                                                  \
    extern "C" __attribute__((visibility("default"))) int smelt_emu_launch_##name(const uint64_t* args, const uint8_t* kinds, int nargs,           \
                                           const unsigned* grid, const unsigned* block, char* err,           \
                                           size_t errlen) {                                                  \
        return smelt_emu::launch(#name, &name, (unsigned)(max_threads), args, kinds, nargs, grid, block, err, \
                                 errlen);                                                                    \
    }

#ifdef SMELT_EMU_RACECHECK
// -fsanitize=thread's callbacks, implemented by the race detector instead of libtsan (which is
// never linked): plain loads and stores of the kernel code, and the atomics of inlined library
// code (performed as they are, unchecked).
#define SMELT_EMU_TSAN_RW(n)                                                                                       \
    extern "C" SMELT_RT void __tsan_read##n(void* p) { smelt_emu::race::access_by_kernel(p, n, smelt_emu::race::Read); }    \
    extern "C" SMELT_RT void __tsan_write##n(void* p) { smelt_emu::race::access_by_kernel(p, n, smelt_emu::race::Write); }  \
    extern "C" SMELT_RT void __tsan_unaligned_read##n(void* p) { smelt_emu::race::access_by_kernel(p, n, smelt_emu::race::Read); } \
    extern "C" SMELT_RT void __tsan_unaligned_write##n(void* p) { smelt_emu::race::access_by_kernel(p, n, smelt_emu::race::Write); }
SMELT_EMU_TSAN_RW(1)
SMELT_EMU_TSAN_RW(2)
SMELT_EMU_TSAN_RW(4)
SMELT_EMU_TSAN_RW(8)
SMELT_EMU_TSAN_RW(16)
extern "C" SMELT_RT void __tsan_read_range(void* p, unsigned long n) { smelt_emu::race::access_by_kernel(p, n, smelt_emu::race::Read); }
extern "C" SMELT_RT void __tsan_write_range(void* p, unsigned long n) { smelt_emu::race::access_by_kernel(p, n, smelt_emu::race::Write); }
extern "C" SMELT_RT void __tsan_init() {}
extern "C" SMELT_RT void __tsan_func_entry(void*) {}
extern "C" SMELT_RT void __tsan_func_exit() {}
extern "C" SMELT_RT void __tsan_vptr_update(void*, void*) {}
#define SMELT_EMU_TSAN_ATOMIC(n, T)                                                                                \
    extern "C" SMELT_RT T __tsan_atomic##n##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); } \
    extern "C" SMELT_RT void __tsan_atomic##n##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); } \
    extern "C" SMELT_RT T __tsan_atomic##n##_exchange(volatile T* a, T v, int) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); } \
    extern "C" SMELT_RT T __tsan_atomic##n##_fetch_add(volatile T* a, T v, int) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); } \
    extern "C" SMELT_RT T __tsan_atomic##n##_fetch_sub(volatile T* a, T v, int) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); } \
    extern "C" SMELT_RT T __tsan_atomic##n##_fetch_and(volatile T* a, T v, int) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); } \
    extern "C" SMELT_RT T __tsan_atomic##n##_fetch_or(volatile T* a, T v, int) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); } \
    extern "C" SMELT_RT T __tsan_atomic##n##_fetch_xor(volatile T* a, T v, int) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); } \
    extern "C" SMELT_RT bool __tsan_atomic##n##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {    \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                  \
    }                                                                                                              \
    extern "C" SMELT_RT bool __tsan_atomic##n##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {      \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                  \
    }
SMELT_EMU_TSAN_ATOMIC(8, uint8_t)
SMELT_EMU_TSAN_ATOMIC(16, uint16_t)
SMELT_EMU_TSAN_ATOMIC(32, uint32_t)
SMELT_EMU_TSAN_ATOMIC(64, uint64_t)
extern "C" SMELT_RT void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
extern "C" SMELT_RT void __tsan_atomic_signal_fence(int) {}
#endif

// -fsanitize=alignment's callback (kernels/src/emu.rs compiles every kernel with it; libubsan is
// never linked). GCC calls it for a load or store whose pointer is null or misaligned for the
// accessed type; only misalignment is reported here, as a launch failure naming the type, the
// address and the source line.
namespace smelt_emu {
struct UbsanLocation {
    const char* file;
    uint32_t line, column;
};
struct UbsanType {
    uint16_t kind, info;
    char name[1];
};
struct UbsanTypeMismatch {
    UbsanLocation loc;
    const UbsanType* type;
    unsigned char log_alignment, check_kind;
};
}  // namespace smelt_emu
extern "C" SMELT_RT void __ubsan_handle_type_mismatch_v1(void* data, void* ptr) {
    const auto* d = static_cast<const smelt_emu::UbsanTypeMismatch*>(data);
    const uintptr_t align = uintptr_t(1) << d->log_alignment;
    if (ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % align == 0) return;
    char m[320];
    snprintf(m, sizeof m, "misaligned address: %p accessed as %s, which needs %zu-byte alignment (%s:%u)", ptr,
             d->type->name, (size_t)align, d->loc.file, d->loc.line);
    if (smelt_emu::B) {
        smelt_emu::fail(m);
    } else {
        fprintf(stderr, "smelt CUDA emulator: %s\n", m);
    }
}
