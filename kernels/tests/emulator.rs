//! The CUDA emulator itself (`kernels/emu/cuda_emu.hpp`): warp and block collectives, the
//! mma.sync fragment layout, and the errors it promises — argument kinds, exited lanes in
//! warp operations, deadlocks — plus the property that makes it useful for finding races:
//! threads interleave only at synchronisation points. Needs a C++17 compiler (`g++`, or `$CXX`);
//! runs on any machine, GPU or not.
#![cfg(feature = "cuda")]

use smelt_engine::{DType, Device, Tensor};
use smelt_kernels::cuda::{launch, Arg, LaunchCfg};
use smelt_kernels::KernelSource;

const SRC: KernelSource = KernelSource {
    name: "emu_selftest",
    src: r#"
extern "C" __global__ void block_sums(const float* x, float* out, u32 n) {
    __shared__ float scratch[32];
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    const float v = block_sum(i < n ? x[i] : 0.0f, scratch);
    if (threadIdx.x == 0) out[blockIdx.x] = v;
}
// Inclusive prefix sum within each warp with __shfl_up_sync.
extern "C" __global__ void warp_scan(const float* x, float* out) {
    const int lane = threadIdx.x & 31;
    float s = x[threadIdx.x];
    for (int o = 1; o < 32; o <<= 1) {
        const float y = __shfl_up_sync(0xffffffffu, s, o);
        if (lane >= o) s += y;
    }
    out[threadIdx.x] = s;
}
// warp_sum / warp_max (one rendezvous on the emulator) next to the shuffle butterfly they stand for.
extern "C" __global__ void butterflies(const float* x, float* out) {
    const float v = x[threadIdx.x];
    float s = v, m = v;
    for (int o = 16; o > 0; o >>= 1) {
        s += __shfl_xor_sync(0xffffffffu, s, o);
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    }
    out[4 * threadIdx.x] = warp_sum(v);
    out[4 * threadIdx.x + 1] = s;
    out[4 * threadIdx.x + 2] = warp_max(v);
    out[4 * threadIdx.x + 3] = m;
}
// Out of bounds on purpose: out[i] = 1 for i < n + extra; y = x[i].
extern "C" __global__ void write_past(float* out, u32 n, u32 extra) {
    if (threadIdx.x < n + extra) out[threadIdx.x] = 1.0f;
}
extern "C" __global__ void read_at(const float* x, u64 i, float* y) { y[0] = x[i]; }
// A local array larger than an emulated thread's stack, touched from its top down (so the first
// fault is in the guard page under the stack, not in whatever is mapped below it).
extern "C" __global__ void deep_stack(float* y) {
    volatile char buf[300 << 10];
    for (int i = (int)sizeof(buf) - 1; i >= 0; i -= 512) buf[i] = (char)i;
    y[0] = buf[0];
}
// out[t] = s[63 - t] after every thread wrote s[t] = t: needs the barrier.
extern "C" __global__ void reverse(float* out, u32 with_barrier) {
    __shared__ float s[64];
    s[threadIdx.x] = (float)threadIdx.x;
    if (with_barrier) __syncthreads();
    out[threadIdx.x] = s[63 - threadIdx.x];
}
extern "C" __global__ void takes_u64(u64 n, float* out) {
    if (threadIdx.x == 0) out[0] = (float)n;
}
extern "C" __global__ void lane_exits(float* out) {
    if (threadIdx.x == 3) return;
    const float v = warp_sum(1.0f);
    if (threadIdx.x == 0) out[0] = v;
}
extern "C" __global__ void split_barriers(float* out) {
    float v = 1.0f;
    if (threadIdx.x >= 32 && (threadIdx.x & 31) < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
    __syncthreads();
    out[threadIdx.x] = v;
}
// One m16n8k16 bf16 mma: A [16,16] and B [16,8] row-major bf16 in, C [16,8] f32 out, loaded
// into fragments as the PTX ISA lays them out.
extern "C" __global__ void mma_tile(const bf16_t* a, const bf16_t* b, float* c) {
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    auto pack = [](bf16_t lo, bf16_t hi) { return (u32)lo | ((u32)hi << 16); };
    u32 ar[4];
    for (int r = 0; r < 4; ++r) {
        const int row = g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
        ar[r] = pack(a[row * 16 + col], a[row * 16 + col + 1]);
    }
    const u32 b0 = pack(b[(2 * t) * 8 + g], b[(2 * t + 1) * 8 + g]);
    const u32 b1 = pack(b[(2 * t + 8) * 8 + g], b[(2 * t + 9) * 8 + g]);
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    smelt_emu_mma_m16n8k16_bf16(acc, ar, b0, b1);
    for (int i = 0; i < 4; ++i) c[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)] = acc[i];
}
// Four 8×8 b16 matrices (row-major, 32 rows of 8) copied to shared memory with cp.async into rows
// padded to 16 elements (the second half zero-filled over a 0xffff pattern), then read back with
// ldmatrix_x4 and ldmatrix_x4_trans: out[32·r + lane] = register r, r < 4 plain, 4..8 transposed.
// early[lane] is the first word of the lane's row read before the wait; pad[lane] after it.
extern "C" __global__ void staged_fragments(const bf16_t* m, u32* out, u32* early, u32* pad) {
    __shared__ __align__(16) bf16_t s[32 * 16];
    const int l = threadIdx.x;
    for (int i = 8; i < 16; ++i) s[l * 16 + i] = 0xffffu;
    cp_async16(s + l * 16, m + l * 8, true);
    cp_async16(s + l * 16 + 8, m, false);
    cp_async_commit();
    early[l] = *(const u32*)(s + l * 16);
    cp_async_wait<0>();
    __syncthreads();
    pad[l] = *(const u32*)(s + l * 16 + 8);
    u32 r[4];
    ldmatrix_x4(r, s + l * 16);
    for (int i = 0; i < 4; ++i) out[32 * i + l] = r[i];
    ldmatrix_x4_trans(r, s + l * 16);
    for (int i = 0; i < 4; ++i) out[32 * (4 + i) + l] = r[i];
}
// Every thread reads s[63 - t], then copies y[t] into s[t] with no barrier between the two (a
// write-after-read race on a GPU), and waits for it only after the next barrier.
extern "C" __global__ void copy_over_read(const float* x, const float* y, float* out) {
    __shared__ __align__(16) float s[64];
    const int t = threadIdx.x;
    s[t] = x[t];
    __syncthreads();
    const float r = s[63 - t];
    cp_async4(s + t, y + t, true);
    cp_async_commit();
    __syncthreads();
    cp_async_wait<0>();
    out[t] = r;
}
// Lane t writes s[t], then reads its neighbour's s[t ^ 1]: ordered only by the __syncwarp.
extern "C" __global__ void neighbour(float* out, u32 with_syncwarp) {
    __shared__ float s[32];
    s[threadIdx.x] = (float)threadIdx.x;
    if (with_syncwarp) __syncwarp();
    out[threadIdx.x] = s[threadIdx.x ^ 1];
}
// Counts x into 8 shared bins with atomicAdd; threads 0-7 read the bins back after a barrier (or
// without one: a race between their reads and the other threads' atomics).
extern "C" __global__ void histogram(const u32* x, u32* out, u32 with_barrier) {
    __shared__ u32 bins[8];
    if (threadIdx.x < 8) bins[threadIdx.x] = 0;
    __syncthreads();
    atomicAdd(&bins[x[threadIdx.x] & 7], 1u);
    if (with_barrier) __syncthreads();
    if (threadIdx.x < 8) out[threadIdx.x] = bins[threadIdx.x];
}
// Threads 0-7 zero the bins and every thread counts into them with no barrier between: the
// atomics of threads 8.. race with the plain zeroing.
extern "C" __global__ void zero_then_count(u32* out) {
    __shared__ u32 bins[8];
    if (threadIdx.x < 8) bins[threadIdx.x] = 0;
    atomicAdd(&bins[threadIdx.x & 7], 1u);
    __syncthreads();
    if (threadIdx.x < 8) out[threadIdx.x] = bins[threadIdx.x];
}
// Reads s after a barrier but before the copies into it are waited for: they may land any time.
extern "C" __global__ void copy_across_barrier(const float* x, float* out) {
    __shared__ __align__(16) float s[64];
    const int t = threadIdx.x;
    cp_async4(s + t, x + t, true);
    cp_async_commit();
    __syncthreads();
    out[t] = s[63 - t];
    __syncthreads();
    cp_async_wait<0>();
}
// y = the 4 floats at x + offset, as one 16-byte vector load (common.cuh's ld16).
extern "C" __global__ void vector_load_at(const float* x, u32 offset, float* y) { ld16(x + offset, y); }
// Issues a copy and returns without waiting for it.
extern "C" __global__ void unwaited_copy(const float* x, float* y) {
    __shared__ __align__(16) float s[4];
    cp_async16(s, x, true);
    cp_async_commit();
    y[0] = 1.0f;
}
"#,
};

fn dev() -> Device {
    smelt_engine::cuda::emu::enable();
    let d = smelt_engine::cuda::device(0).expect("the emulated device");
    assert!(d.is_emulated());
    Device::Cuda(0)
}

fn on(v: &[f32], dev: Device) -> Tensor {
    Tensor::from_slice(v, &[v.len()], Device::Cpu).unwrap().to_device(dev).unwrap()
}

fn cfg(grid: u32, block: u32) -> LaunchCfg {
    LaunchCfg { grid: (grid, 1, 1), block: (block, 1, 1), smem: 0 }
}

fn run(name: &str, c: LaunchCfg, args: &[Arg]) -> smelt_engine::Result<()> {
    launch(0, &SRC, name, c, args)
}

/// Runs test `name` of this binary again in a child process with `env` set (the child takes the
/// branch that does the dangerous or process-wide thing) and returns what it did.
fn run_in_child(name: &str, env: (&str, &str)) -> std::process::Output {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads", "1"])
        .env(env.0, env.1)
        .output()
        .unwrap()
}

#[test]
fn collectives_match_the_host() {
    let dev = dev();
    let n = 1000usize;
    let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
    let (xd, out) = (on(&x, dev), on(&[f32::NAN; 4], dev));
    run(
        "block_sums",
        cfg(4, 256),
        &[Arg::Ptr(xd.cuda_ptr().unwrap()), Arg::Ptr(out.cuda_ptr().unwrap()), Arg::U32(n as u32)],
    )
    .unwrap();
    let got = out.to_vec::<f32>().unwrap();
    for (b, g) in got.iter().enumerate() {
        let want: f64 = x[(b * 256).min(n)..((b + 1) * 256).min(n)].iter().map(|&v| v as f64).sum();
        assert!((*g as f64 - want).abs() < 1e-3, "block {b}: {g} vs {want}");
    }

    let x: Vec<f32> = (0..64).map(|i| (i % 5) as f32 + 0.5).collect();
    let (xd, out) = (on(&x, dev), on(&[f32::NAN; 64], dev));
    run("warp_scan", cfg(1, 64), &[Arg::Ptr(xd.cuda_ptr().unwrap()), Arg::Ptr(out.cuda_ptr().unwrap())]).unwrap();
    let got = out.to_vec::<f32>().unwrap();
    for w in 0..2 {
        let mut s = 0.0;
        for l in 0..32 {
            s += x[w * 32 + l];
            assert_eq!(got[w * 32 + l], s, "warp {w} lane {l}");
        }
    }
}

/// The emulator's one-rendezvous warp reductions give the shuffle butterfly's bits.
#[test]
fn warp_reductions_equal_the_shuffle_butterfly() {
    let dev = dev();
    let x: Vec<f32> = (0..64).map(|i| ((i * 7919 % 1009) as f32 - 500.0) * 1.37e-3 + 1.0 / (i + 1) as f32).collect();
    let (xd, out) = (on(&x, dev), on(&[f32::NAN; 256], dev));
    run("butterflies", cfg(1, 64), &[Arg::Ptr(xd.cuda_ptr().unwrap()), Arg::Ptr(out.cuda_ptr().unwrap())]).unwrap();
    let got = out.to_vec::<f32>().unwrap();
    for t in 0..64 {
        let w = &x[t / 32 * 32..t / 32 * 32 + 32];
        let max = w.iter().cloned().fold(f32::MIN, f32::max);
        assert_eq!(got[4 * t].to_bits(), got[4 * t + 1].to_bits(), "warp_sum, thread {t}");
        assert_eq!(got[4 * t + 2], max, "warp_max, thread {t}");
        assert_eq!(got[4 * t + 3], max, "shuffle max, thread {t}");
        let sum: f64 = w.iter().map(|&v| v as f64).sum();
        assert!((got[4 * t] as f64 - sum).abs() < 1e-5, "thread {t}: {} vs {sum}", got[4 * t]);
    }
}

/// The mma.sync emulation against a float64 matmul of the same bf16 values, with the fragments
/// loaded from the PTX ISA's layout.
#[test]
fn mma_m16n8k16_matches_a_matmul() {
    let dev = dev();
    let a: Vec<f32> = (0..256).map(|i| ((i * 13 % 29) as f32 - 14.0) / 8.0).collect();
    let b: Vec<f32> = (0..128).map(|i| ((i * 7 % 17) as f32 - 8.0) / 4.0).collect();
    let bf = |v: &[f32]| Tensor::from_slice(v, &[v.len()], Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
    let (ah, bh) = (bf(&a), bf(&b));
    let (a64, b64) = (ah.to_vec_f32().unwrap(), bh.to_vec_f32().unwrap());
    let (ad, bd, cd) = (ah.to_device(dev).unwrap(), bh.to_device(dev).unwrap(), on(&[f32::NAN; 128], dev));
    run(
        "mma_tile",
        cfg(1, 32),
        &[Arg::Ptr(ad.cuda_ptr().unwrap()), Arg::Ptr(bd.cuda_ptr().unwrap()), Arg::Ptr(cd.cuda_ptr().unwrap())],
    )
    .unwrap();
    let c = cd.to_vec::<f32>().unwrap();
    for r in 0..16 {
        for n in 0..8 {
            let want: f64 = (0..16).map(|k| a64[r * 16 + k] as f64 * b64[k * 8 + n] as f64).sum();
            assert!((c[r * 8 + n] as f64 - want).abs() < 1e-4, "C[{r},{n}] = {} vs {want}", c[r * 8 + n]);
        }
    }
}

/// ldmatrix's fragment layout (plain and transposed) as the PTX ISA gives it, and cp.async: copy
/// and zero-fill, performed at the wait (so a read before it sees the old contents), and a copy
/// never waited for is an error.
#[test]
fn ldmatrix_and_cp_async_follow_the_ptx_isa() {
    let dev = dev();
    // Element (matrix mi, row r, col c) = 64·mi + 8·r + c + 1, as raw b16 bits.
    let m: Vec<smelt_engine::bf16> = (0..256).map(|i| smelt_engine::bf16::from_bits(i as u16 + 1)).collect();
    let md = Tensor::from_slice(&m, &[256], Device::Cpu).unwrap().to_device(dev).unwrap();
    let u32s = |n: usize| Tensor::zeros(&[n], DType::U32, dev).unwrap();
    let (out, early, pad) = (u32s(256), u32s(32), u32s(32));
    let ptr = |t: &Tensor| Arg::Ptr(t.cuda_ptr().unwrap());
    run("staged_fragments", cfg(1, 32), &[ptr(&md), ptr(&out), ptr(&early), ptr(&pad)]).unwrap();
    let (out, early, pad) =
        (out.to_vec::<u32>().unwrap(), early.to_vec::<u32>().unwrap(), pad.to_vec::<u32>().unwrap());
    let el = |mi: usize, r: usize, c: usize| (64 * mi + 8 * r + c + 1) as u32;
    for l in 0..32 {
        let (g, t) = (l / 4, l % 4);
        for mi in 0..4 {
            let plain = el(mi, g, 2 * t) | el(mi, g, 2 * t + 1) << 16;
            let trans = el(mi, 2 * t, g) | el(mi, 2 * t + 1, g) << 16;
            assert_eq!(out[32 * mi + l], plain, "ldmatrix lane {l} matrix {mi}");
            assert_eq!(out[32 * (4 + mi) + l], trans, "ldmatrix.trans lane {l} matrix {mi}");
        }
    }
    assert_eq!(early, vec![0; 32], "a read before cp.async.wait_group sees the old shared memory");
    assert_eq!(pad, vec![0; 32], "src-size 0 zero-fills");
    let (x, y) = (on(&[1.0; 4], dev), on(&[0.0; 1], dev));
    let e = run("unwaited_copy", cfg(1, 32), &[ptr(&x), ptr(&y)]).unwrap_err().to_string();
    assert!(e.contains("unwaited_copy") && e.contains("cp.async copies never waited for"), "{e}");
}

/// The two ends of a cp.async's window: performed at the wait (default), the racy kernel above
/// reads the old values; performed at the issue (`SMELT_EMU_CP_ASYNC=eager`, in a child process
/// of this test binary), the race shows.
#[test]
fn eager_cp_async_exposes_a_copy_over_unfinished_reads() {
    let run_it = || {
        let dev = dev();
        let x: Vec<f32> = (0..64).map(|i| i as f32).collect();
        let (xd, yd, out) = (on(&x, dev), on(&[-1.0; 64], dev), on(&[f32::NAN; 64], dev));
        let ptr = |t: &Tensor| Arg::Ptr(t.cuda_ptr().unwrap());
        run("copy_over_read", cfg(1, 64), &[ptr(&xd), ptr(&yd), ptr(&out)]).unwrap();
        out.to_vec::<f32>().unwrap()
    };
    let name = "eager_cp_async_exposes_a_copy_over_unfinished_reads";
    if std::env::var_os("SMELT_EMU_CP_ASYNC").is_some() {
        println!("result {:?}", run_it());
        return;
    }
    let want: Vec<f32> = (0..64).rev().map(|i| i as f32).collect();
    assert_eq!(run_it(), want, "copies performed at the wait: every read sees the old value");
    let out = run_in_child(name, ("SMELT_EMU_CP_ASYNC", "eager"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let line =
        text.lines().find(|l| l.contains("result [")).unwrap_or_else(|| panic!("no result from the child: {text}"));
    assert!(line.contains("-1.0"), "copies performed at the issue: late readers see the new value; {line}");
}

/// The race detector (`SMELT_EMU_RACECHECK=1`, in a child process of this test binary): each racy
/// kernel above is reported with the threads and the missing barrier, and its ordered twin passes.
#[test]
fn racecheck_reports_unordered_accesses() {
    if std::env::var_os("SMELT_EMU_RACECHECK").is_none() {
        let out = run_in_child("racecheck_reports_unordered_accesses", ("SMELT_EMU_RACECHECK", "1"));
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && text.contains("racecheck cases passed"), "{text}");
        return;
    }
    let dev = dev();
    let ptr = |t: &Tensor| Arg::Ptr(t.cuda_ptr().unwrap());
    let out = on(&[0.0; 64], dev);
    let race = |name: &str, c: LaunchCfg, args: &[Arg], want: &[&str]| {
        let e = run(name, c, args).expect_err(name).to_string();
        assert!(want.iter().all(|w| e.contains(w)), "{name}: {e}");
    };
    run("reverse", cfg(1, 64), &[ptr(&out), Arg::U32(1)]).unwrap();
    race(
        "reverse",
        cfg(1, 64),
        &[ptr(&out), Arg::U32(0)],
        &["race on shared memory", "thread (31,0,0) reads", "thread (32,0,0) writes", "no __syncthreads"],
    );
    run("neighbour", cfg(1, 32), &[ptr(&out), Arg::U32(1)]).unwrap();
    race(
        "neighbour",
        cfg(1, 32),
        &[ptr(&out), Arg::U32(0)],
        &["race on shared memory", "thread (0,0,0) reads", "thread (1,0,0) writes", "no __syncwarp"],
    );
    let ids: Vec<u32> = (0..64u32).map(|i| i * 7 % 11).collect();
    let ids = Tensor::from_slice(&ids, &[64], Device::Cpu).unwrap().to_device(dev).unwrap();
    let bins = Tensor::zeros(&[8], DType::U32, dev).unwrap();
    run("histogram", cfg(1, 64), &[ptr(&ids), ptr(&bins), Arg::U32(1)]).unwrap();
    assert_eq!(bins.to_vec::<u32>().unwrap().iter().sum::<u32>(), 64);
    race("histogram", cfg(1, 64), &[ptr(&ids), ptr(&bins), Arg::U32(0)], &["atomically updates"]);
    let (x, y) = (on(&[1.0; 64], dev), on(&[2.0; 64], dev));
    race("copy_over_read", cfg(1, 64), &[ptr(&x), ptr(&y), ptr(&out)], &["race on shared memory", "writes"]);
    race("zero_then_count", cfg(1, 64), &[ptr(&bins)], &["race on shared memory", "atomically updates"]);
    race("copy_across_barrier", cfg(1, 64), &[ptr(&x), ptr(&out)], &["race on shared memory", "writes it", "reads it"]);
    let (xs, sums) = (on(&[1.0; 1000], dev), on(&[0.0; 4], dev));
    run("block_sums", cfg(4, 256), &[ptr(&xs), ptr(&sums), Arg::U32(1000)]).unwrap();
    println!("racecheck cases passed");
}

/// The race detector's first access on each worker finds the library's `__shared__` block by
/// walking the loaded objects. It once asked the loader (dladdr) from inside that walk, which
/// deadlocks against a dlopen on another thread (glibc takes the two loader locks in the other
/// order there): CI hung when one test loaded a freshly built kernel library while another
/// launched. Here a thread loads and unloads a library in a loop while racechecked launches run;
/// the child process must finish within 5 minutes (it takes seconds; the limit leaves room for
/// building the race detector's library on a busy machine).
#[test]
fn racecheck_launches_survive_libraries_loading_on_other_threads() {
    if std::env::var_os("SMELT_EMU_RACECHECK").is_none() {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "racecheck_launches_survive_libraries_loading_on_other_threads", "--test-threads", "1"])
            .env("SMELT_EMU_RACECHECK", "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        let hung = loop {
            if child.try_wait().unwrap().is_some() {
                break false;
            }
            if start.elapsed() > std::time::Duration::from_secs(300) {
                let _ = child.kill();
                break true;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let out = child.wait_with_output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(
            !hung,
            "racechecked launches with a library loading on another thread: no end after 300 s (deadlock)\n{text}"
        );
        assert!(out.status.success(), "the child failed: {}\n{text}", out.status);
        return;
    }
    let dev = dev();
    let dir = std::env::temp_dir().join(format!("smelt-emu-dlopen-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (src, lib) = (dir.join("tiny.cpp"), dir.join("libtiny.so"));
    std::fs::write(&src, "extern \"C\" int tiny() { return 7; }\n").unwrap();
    let cxx = std::env::var("CXX").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "g++".into());
    let built = std::process::Command::new(cxx).args(["-shared", "-fPIC", "-o"]).arg(&lib).arg(&src).status().unwrap();
    assert!(built.success(), "building {}", lib.display());
    let (xs, sums) = (on(&[1.0; 1000], dev), on(&[0.0; 4], dev));
    // The library built for this source is loaded before the loader thread starts.
    run(
        "block_sums",
        cfg(4, 256),
        &[Arg::Ptr(xs.cuda_ptr().unwrap()), Arg::Ptr(sums.cuda_ptr().unwrap()), Arg::U32(1000)],
    )
    .unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let loads = std::thread::scope(|s| {
        let loader = s.spawn(|| {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: our own one-function library; no initialisers.
                let l = unsafe { libloading::Library::new(&lib) }.unwrap();
                drop(l);
                n += 1;
            }
            n
        });
        for _ in 0..200 {
            let args = [Arg::Ptr(xs.cuda_ptr().unwrap()), Arg::Ptr(sums.cuda_ptr().unwrap()), Arg::U32(1000)];
            run("block_sums", cfg(4, 256), &args).unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        loader.join().unwrap()
    });
    assert_eq!(sums.to_vec::<f32>().unwrap(), vec![256.0, 256.0, 256.0, 232.0]);
    assert!(loads > 0);
    let _ = std::fs::remove_dir_all(&dir);
}
/// Threads interleave only at barriers: without `__syncthreads`, thread 0 reads s[63] before
/// thread 63 has run at all, as a racing GPU may.
#[test]
fn missing_barrier_is_visible() {
    let dev = dev();
    let want: Vec<f32> = (0..64).rev().map(|i| i as f32).collect();
    let out = on(&[f32::NAN; 64], dev);
    run("reverse", cfg(1, 64), &[Arg::Ptr(out.cuda_ptr().unwrap()), Arg::U32(1)]).unwrap();
    assert_eq!(out.to_vec::<f32>().unwrap(), want);
    run("reverse", cfg(1, 64), &[Arg::Ptr(out.cuda_ptr().unwrap()), Arg::U32(0)]).unwrap();
    let racy = out.to_vec::<f32>().unwrap();
    assert_ne!(racy[0], want[0], "thread 0 saw thread 63's write without a barrier");
}

#[test]
fn errors_name_the_kernel_and_the_problem() {
    let dev = dev();
    let out = on(&[0.0; 64], dev);
    let p = Arg::Ptr(out.cuda_ptr().unwrap());
    run("takes_u64", cfg(1, 32), &[Arg::U64(7), p]).unwrap();
    assert_eq!(out.to_vec::<f32>().unwrap()[0], 7.0);

    let e = run("takes_u64", cfg(1, 32), &[Arg::U32(7), p]).unwrap_err().to_string();
    assert!(e.contains("takes_u64") && e.contains("argument 0 is passed as u32") && e.contains("u64"), "{e}");
    let e = run("takes_u64", cfg(1, 32), &[Arg::U64(7)]).unwrap_err().to_string();
    assert!(e.contains("passes 1 arguments, the kernel takes 2"), "{e}");
    let e = run("lane_exits", cfg(1, 32), &[p]).unwrap_err().to_string();
    assert!(e.contains("lane 3") && e.contains("returned"), "{e}");
    let e = run("split_barriers", cfg(1, 64), &[p]).unwrap_err().to_string();
    assert!(e.contains("deadlock") && e.contains("block (0,0,0)"), "{e}");
    let e = run("warp_scan", cfg(1, 48), &[p, p]).unwrap_err().to_string();
    assert!(e.contains("only 16 threads"), "{e}");
    let e = run("no_such_kernel", cfg(1, 32), &[p]).unwrap_err().to_string();
    assert!(e.contains("no kernel `no_such_kernel`"), "{e}");
    let e = run("takes_u64", cfg(1, 2048), &[Arg::U64(7), p]).unwrap_err().to_string();
    assert!(e.contains("invalid launch"), "{e}");
}

/// A write past a tensor's end (into the allocator's slack, where a GPU would not notice) is an
/// error naming the kernel and the argument.
#[test]
fn writes_past_a_tensor_are_reported() {
    let dev = dev();
    let out = on(&[0.0; 10], dev);
    let p = Arg::Ptr(out.cuda_ptr().unwrap());
    run("write_past", cfg(1, 32), &[p, Arg::U32(10), Arg::U32(0)]).unwrap();
    let e = run("write_past", cfg(1, 32), &[p, Arg::U32(10), Arg::U32(1)]).unwrap_err().to_string();
    assert!(e.contains("write_past") && e.contains("argument 0") && e.contains("40-byte device buffer"), "{e}");
    assert!(e.contains("bytes 0..=3 after its end"), "{e}");
}

/// A 16-byte vector load from an address that is not a multiple of 16 faults on a GPU
/// ("misaligned address"); the emulator fails the launch, naming the type and the line.
#[test]
fn misaligned_vector_loads_are_reported() {
    let dev = dev();
    let x = on(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], dev);
    let y = on(&[0.0; 4], dev);
    let args = |offset| [Arg::Ptr(x.cuda_ptr().unwrap()), Arg::U32(offset), Arg::Ptr(y.cuda_ptr().unwrap())];
    run("vector_load_at", cfg(1, 1), &args(4)).unwrap();
    assert_eq!(y.to_vec::<f32>().unwrap(), [5.0, 6.0, 7.0, 8.0]);
    let e = run("vector_load_at", cfg(1, 1), &args(2)).unwrap_err().to_string();
    assert!(e.contains("vector_load_at") && e.contains("misaligned address"), "{e}");
    assert!(e.contains("float4") && e.contains("16-byte alignment") && e.contains("common.cuh"), "{e}");
}

/// A read past a tensor's block reaches its guard page: the process dies with SIGSEGV, saying
/// which kernel, block and thread faulted (the test runs the read in a child process of this
/// test binary).
#[test]
fn reads_past_a_block_hit_the_guard_page() {
    let name = "reads_past_a_block_hit_the_guard_page";
    if std::env::var_os("SMELT_EMU_GUARD_CHILD").is_some() {
        let dev = dev();
        // 4,000 bytes in a 4,096-byte block that ends at most 255 bytes before the guard page:
        // byte 4,352 from the start is inside the guard page.
        let (x, y) = (on(&[1.0; 1000], dev), on(&[0.0; 1], dev));
        let args = [Arg::Ptr(x.cuda_ptr().unwrap()), Arg::U64(1000), Arg::Ptr(y.cuda_ptr().unwrap())];
        run("read_at", cfg(1, 1), &args).unwrap(); // just past the end: inside the block, no fault
        let args = [args[0], Arg::U64(4352 / 4), args[2]];
        let r = run("read_at", cfg(1, 1), &args);
        println!("the read past the block returned {r:?}");
        return;
    }
    let out = run_in_child(name, ("SMELT_EMU_GUARD_CHILD", "1"));
    use std::os::unix::process::ExitStatusExt;
    let (text, err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.signal(), Some(11), "expected SIGSEGV; status {:?}, stdout:\n{text}", out.status);
    assert!(err.contains("kernel read_at, block (0,0,0), thread (0,0,0)") && err.contains("guard page"), "{err}");
}

/// A thread that overflows its fiber stack also dies with SIGSEGV, and the message says so
/// (the fault handler runs on the worker's alternate signal stack).
#[test]
fn stack_overflow_is_named() {
    let name = "stack_overflow_is_named";
    if std::env::var_os("SMELT_EMU_STACK_CHILD").is_some() {
        let y = on(&[0.0; 1], dev());
        let r = run("deep_stack", cfg(1, 1), &[Arg::Ptr(y.cuda_ptr().unwrap())]);
        println!("the deep stack returned {r:?}");
        return;
    }
    let out = run_in_child(name, ("SMELT_EMU_STACK_CHILD", "1"));
    use std::os::unix::process::ExitStatusExt;
    let (text, err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.signal(), Some(11), "expected SIGSEGV; status {:?}, stdout:\n{text}", out.status);
    assert!(err.contains("kernel deep_stack, block (0,0,0), thread (0,0,0) overflowed its stack"), "{err}");
}

/// Plain CUDA that NVRTC compiles too, so the emulator knows what ptxas gives each kernel.
const LIMITS: KernelSource = KernelSource {
    name: "emu_limits",
    src: r#"
extern "C" __global__ void __launch_bounds__(64) bounded(float* out) { out[threadIdx.x] = 1.0f; }
// Each round needs all 96 values twice, around a sum over them: ptxas (no launch bounds, so up to
// 255 registers) keeps them in registers, far more than the 64 per thread a 1,024-thread block
// leaves.
extern "C" __global__ void heavy(const float* x, float* out) {
    float r[96];
    #pragma unroll
    for (int i = 0; i < 96; ++i) r[i] = x[i * blockDim.x + threadIdx.x];
    #pragma unroll
    for (int round = 0; round < 4; ++round) {
        float t = 0.0f;
        #pragma unroll
        for (int i = 0; i < 96; ++i) t += r[i] * r[i];
        t = 1.0f / t;
        #pragma unroll
        for (int i = 0; i < 96; ++i) r[i] = r[i] * t + (float)i;
    }
    float s = 0.0f;
    #pragma unroll
    for (int i = 0; i < 96; ++i) s += r[i];
    out[threadIdx.x] = s;
}
"#,
};

/// A block larger than the kernel's `__launch_bounds__` is refused, as the driver refuses it.
#[test]
fn launch_bounds_are_enforced() {
    let dev = dev();
    let out = on(&[0.0; 128], dev);
    let p = Arg::Ptr(out.cuda_ptr().unwrap());
    launch(0, &LIMITS, "bounded", cfg(1, 64), &[p]).unwrap();
    let e = launch(0, &LIMITS, "bounded", cfg(1, 128), &[p]).unwrap_err().to_string();
    assert!(e.contains("bounded") && e.contains("128 threads exceeds") && e.contains("__launch_bounds__(64)"), "{e}");
}

/// With NVRTC installed, each launch is checked against the registers ptxas gave the kernel:
/// 1,024 threads of `heavy` cannot fit one SM's 65,536 registers, 128 can.
#[test]
fn register_limits_are_enforced_with_nvrtc() {
    let dev = dev();
    if let Err(e) = smelt_kernels::cuda::nvrtc_status() {
        return smelt_kernels::testing::skip_without_nvrtc("register_limits_are_enforced_with_nvrtc", e);
    }
    let res = smelt_kernels::cuda::compile_resources(LIMITS.name, LIMITS.src, "sm_90").unwrap();
    let heavy = res.iter().find(|r| r.kernel == "heavy").expect("ptxas reports `heavy`");
    assert!(heavy.registers > 64, "the test needs a kernel over 64 registers: {heavy:?}");
    let bounded = res.iter().find(|r| r.kernel == "bounded").expect("ptxas reports `bounded`");
    assert!(bounded.registers <= 32, "{bounded:?}");

    let x: Vec<f32> = (0..96 * 1024).map(|i| 0.5 + (i % 7) as f32 / 100.0).collect();
    let (xd, out) = (on(&x, dev), on(&[f32::NAN; 1024], dev));
    let args = [Arg::Ptr(xd.cuda_ptr().unwrap()), Arg::Ptr(out.cuda_ptr().unwrap())];
    let e = launch(0, &LIMITS, "heavy", cfg(1, 1024), &args).unwrap_err().to_string();
    assert!(e.contains("heavy") && e.contains("1024 threads") && e.contains("LAUNCH_OUT_OF_RESOURCES"), "{e}");
    launch(0, &LIMITS, "heavy", cfg(1, 128), &args).unwrap();
    assert!(out.to_vec::<f32>().unwrap()[..128].iter().all(|v| v.is_finite()));
}
