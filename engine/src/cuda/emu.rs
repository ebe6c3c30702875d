//! The CUDA emulator's device side (`SMELT_CUDA_EMULATOR=1`): device memory is host memory,
//! copies are `memcpy`, and cuBLAS is replaced by an f32-accumulating matmul through the `gemm`
//! crate. Kernels run under `kernels/emu/cuda_emu.hpp` (see `smelt_kernels::emu`).
//!
//! Purpose: every device test (`*device*`) runs the real CUDA sources, launch configurations and
//! argument lists on a machine without a GPU. Passing under the emulator is evidence about
//! indexing, synchronisation, bounds and launcher/kernel agreement, not about GPU rounding or
//! timing; it does not replace a run on a GPU.
//!
//! Fresh allocations are filled with 0xFF bytes (NaN in f32, bf16 and f16), so a kernel that
//! reads memory nobody wrote produces NaN instead of a plausible zero.
//!
//! Out-of-bounds accesses, which a GPU often lets pass silently:
//! - every block ends just before a guard page (no access), so a kernel that reads or writes
//!   past the block ends the process with SIGSEGV instead of touching a neighbour;
//! - the bytes between a tensor's end and the guard page (the allocator's size-class slack) hold
//!   a canary, checked after every launch for each pointer the kernel was given
//!   ([`check_canary`]): a write past the tensor's end is an error naming the kernel.

use std::collections::BTreeMap;
use std::sync::Mutex;

use half::{bf16, f16};

use super::gemm::Gemm;
use crate::{DType, Error, Result};

/// Device memory of the emulator: 256-byte aligned like `cuMemAlloc`.
const ALIGN: usize = 256;

/// Total memory the emulated device reports; the allocator holds allocations to it, so
/// out-of-memory paths can be tested. A dry run ([`dry`]) reports an H100's 80 GB, so it can
/// lay out the launches of models that would not fit here (its memory is never touched).
pub(super) fn total_mem() -> usize {
    if dry() {
        80 << 30
    } else {
        16 << 30
    }
}

/// `SMELT_EMU_DRY=1` (with the emulator): kernels and matmuls are not run, copies to the
/// device and fills are skipped and copies to the host read zeros. What remains is every
/// launch's kernel, grid, block and resources, in the order a real run queues them, at any
/// model size in seconds: `smelt bench step|generate --profile` then prints how each launch
/// would fill an H100 (`smelt_kernels::emu::take_dry_launches`). Results are meaningless.
pub fn dry() -> bool {
    static ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENV.get_or_init(|| std::env::var("SMELT_EMU_DRY").as_deref() == Ok("1"))
}

static FORCED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether `cuda:0` is the emulator: `SMELT_CUDA_EMULATOR=1`, or [`enable`] was called.
pub fn requested() -> bool {
    static ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    FORCED.load(std::sync::atomic::Ordering::Relaxed)
        || *ENV.get_or_init(|| std::env::var("SMELT_CUDA_EMULATOR").as_deref() == Ok("1"))
}

/// Makes `cuda:0` the emulator for the rest of the process (for tests of the emulator itself);
/// it must run before the first [`super::device`] call.
pub fn enable() {
    FORCED.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn page() -> usize {
    static P: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *P.get_or_init(|| usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(4096))
}

/// The mapping behind a block of `bytes` at `ptr`: (base, length, guard page start).
fn mapping(ptr: u64, bytes: usize) -> (usize, usize, usize) {
    let pg = page();
    let len = (bytes + ALIGN - 1).div_ceil(pg) * pg + pg;
    let guard = (ptr as usize + bytes).div_ceil(pg) * pg;
    (guard + pg - len, len, guard)
}

pub(super) fn malloc(bytes: usize) -> Result<u64> {
    let fail = |detail: String| Error::Cuda { op: "alloc (emulator)", detail };
    let pg = page();
    let len = (bytes + ALIGN - 1).div_ceil(pg) * pg + pg;
    // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(fail(format!("mapping {len} bytes of host memory failed")));
    }
    let guard = base as usize + len - pg;
    // SAFETY: the last page of the mapping just made.
    if unsafe { libc::mprotect(guard as *mut libc::c_void, pg, libc::PROT_NONE) } != 0 {
        // SAFETY: the mapping just made, unused.
        unsafe { libc::munmap(base, len) };
        return Err(fail("protecting a guard page failed".into()));
    }
    // The block ends as close to the guard page as 256-byte alignment allows.
    let ptr = (guard - bytes) & !(ALIGN - 1);
    if !dry() {
        // SAFETY: [ptr, ptr + bytes) lies inside the writable part of the mapping.
        unsafe { std::ptr::write_bytes(ptr as *mut u8, 0xff, bytes) };
    }
    Ok(ptr as u64)
}

/// # Safety
/// `ptr` came from [`malloc`] with this `bytes` and is not used afterwards.
pub(super) unsafe fn free(ptr: u64, bytes: usize) {
    let (base, len, _) = mapping(ptr, bytes);
    libc::munmap(base as *mut libc::c_void, len);
}

const CANARY: u8 = 0xA5;

/// Live blocks by start address: (tensor bytes, end of the canary = the guard page).
fn live() -> std::sync::MutexGuard<'static, BTreeMap<u64, (usize, usize)>> {
    static LIVE: Mutex<BTreeMap<u64, (usize, usize)>> = Mutex::new(BTreeMap::new());
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// A block of size class `class` at `ptr` now holds a tensor of `bytes`: the rest of the block,
/// up to its guard page, becomes canary.
pub(super) fn track(ptr: u64, bytes: usize, class: usize) {
    if dry() {
        return;
    }
    let (_, _, guard) = mapping(ptr, class);
    let start = ptr as usize + bytes;
    // SAFETY: [start, guard) lies inside the block's writable mapping.
    unsafe { std::ptr::write_bytes(start as *mut u8, CANARY, guard - start) };
    live().insert(ptr, (bytes, guard));
}

pub(super) fn untrack(ptr: u64) {
    live().remove(&ptr);
}

/// Whether the canary after the tensor holding `ptr` is intact; the error says how many bytes
/// past the tensor's end were overwritten. Pointers outside any live tensor pass (host memory).
pub fn check_canary(ptr: u64) -> std::result::Result<(), String> {
    let map = live();
    let Some((&start, &(bytes, guard))) = map.range(..=ptr).next_back() else { return Ok(()) };
    if ptr as usize >= guard {
        return Ok(());
    }
    let end = start as usize + bytes;
    // SAFETY: [end, guard) is the tensor's canary, inside its live block's mapping.
    let canary = unsafe { std::slice::from_raw_parts(end as *const u8, guard - end) };
    match canary.iter().rposition(|&b| b != CANARY) {
        None => Ok(()),
        Some(last) => {
            let first = canary.iter().position(|&b| b != CANARY).unwrap_or(last);
            Err(format!(
                "wrote past the end of a {bytes}-byte device buffer (bytes {first}..={last} after its end changed)"
            ))
        }
    }
}

/// # Safety
/// Both ranges are valid emulator memory (or host memory) of `bytes` bytes.
pub(super) unsafe fn copy(src: u64, dst: u64, bytes: usize) {
    if !dry() {
        std::ptr::copy(src as *const u8, dst as *mut u8, bytes);
    }
}

/// A copy to the host: in a dry run the host reads zeros.
///
/// # Safety
/// As [`copy`].
pub(super) unsafe fn copy_to_host(src: u64, dst: u64, bytes: usize) {
    if dry() {
        std::ptr::write_bytes(dst as *mut u8, 0, bytes);
    } else {
        copy(src, dst, bytes);
    }
}

/// # Safety
/// The range is valid emulator memory.
pub(super) unsafe fn zero(ptr: u64, bytes: usize) {
    if !dry() {
        std::ptr::write_bytes(ptr as *mut u8, 0, bytes);
    }
}

/// Reads `n` elements of `dtype` at `ptr` as f32.
///
/// # Safety
/// `ptr` holds `n` elements of `dtype`.
unsafe fn load(ptr: u64, n: usize, dtype: DType) -> Vec<f32> {
    match dtype {
        DType::BF16 => std::slice::from_raw_parts(ptr as *const bf16, n).iter().map(|v| v.to_f32()).collect(),
        DType::F16 => std::slice::from_raw_parts(ptr as *const f16, n).iter().map(|v| v.to_f32()).collect(),
        _ => std::slice::from_raw_parts(ptr as *const f32, n).to_vec(),
    }
}

/// The emulator's cuBLAS: `C = alpha·op(A)·op(B) + beta·C` per batch entry, f32 accumulation,
/// C rounded to its dtype; beta = 0 never reads C (as cuBLAS).
///
/// # Safety
/// The pointers hold the extents `g` and the strides describe (checked by the caller's contract,
/// as for the cuBLAS path).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_strided_batched(
    g: &Gemm,
    batch: usize,
    a: u64,
    stride_a: usize,
    b: u64,
    stride_b: usize,
    c: u64,
    stride_c: usize,
) -> Result<()> {
    if dry() {
        return Ok(());
    }
    let (ea, ec) = (g.ab_dtype.size_in_bytes() as u64, g.c_dtype.size_in_bytes() as u64);
    let mut prod = vec![0f32; g.m * g.n];
    for i in 0..batch as u64 {
        let av = load(a + i * stride_a as u64 * ea, g.m * g.k, g.ab_dtype);
        let bv = load(b + i * stride_b as u64 * ea, g.k * g.n, g.ab_dtype);
        crate::cpu::matmul_f32(&av, &bv, &mut prod, g.m, g.n, g.k, g.trans_a, g.trans_b, false)?;
        let cp = c + i * stride_c as u64 * ec;
        let old = if g.beta != 0.0 { load(cp, g.m * g.n, g.c_dtype) } else { Vec::new() };
        let out =
            prod.iter().enumerate().map(|(j, &p)| g.alpha * p + if g.beta != 0.0 { g.beta * old[j] } else { 0.0 });
        match g.c_dtype {
            DType::BF16 => {
                let dst = std::slice::from_raw_parts_mut(cp as *mut bf16, g.m * g.n);
                dst.iter_mut().zip(out).for_each(|(d, v)| *d = bf16::from_f32(v));
            }
            DType::F16 => {
                let dst = std::slice::from_raw_parts_mut(cp as *mut f16, g.m * g.n);
                dst.iter_mut().zip(out).for_each(|(d, v)| *d = f16::from_f32(v));
            }
            _ => {
                let dst = std::slice::from_raw_parts_mut(cp as *mut f32, g.m * g.n);
                dst.iter_mut().zip(out).for_each(|(d, v)| *d = v);
            }
        }
    }
    Ok(())
}
