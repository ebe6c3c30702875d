//! The CUDA emulator's device side (`SMELT_CUDA_EMULATOR=1`): device memory is host memory,
//! copies are `memcpy`, and cuBLAS is replaced by an f32-accumulating matmul through the `gemm`
//! crate. Kernels run under `kernels/emu/cuda_emu.hpp` (see `smelt_kernels::emu`).
//!
//! Purpose: every device test (`*device*`) runs the real CUDA sources, launch configurations and
//! argument lists on a machine without a GPU. Passing under the emulator is evidence about
//! indexing, synchronisation and launcher/kernel agreement, not about GPU rounding, timing or
//! resource limits; it does not replace a run on a GPU.
//!
//! Fresh allocations are filled with 0xFF bytes (NaN in f32, bf16 and f16), so a kernel that
//! reads memory nobody wrote produces NaN instead of a plausible zero.

use std::alloc::Layout;

use half::{bf16, f16};

use super::gemm::Gemm;
use crate::{DType, Error, Result};

/// Device memory of the emulator: 256-byte aligned like `cuMemAlloc`.
const ALIGN: usize = 256;

/// Total memory the emulated device reports (allocations are not limited by it).
pub(super) const TOTAL_MEM: usize = 16 << 30;

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

pub(super) fn malloc(bytes: usize) -> Result<u64> {
    let layout = Layout::from_size_align(bytes, ALIGN).map_err(|_| Error::Cuda {
        op: "alloc (emulator)",
        detail: format!("{bytes} bytes is not a valid allocation size"),
    })?;
    // SAFETY: `bytes > 0` (the caller never allocates empty blocks); freed with the same layout.
    let p = unsafe { std::alloc::alloc(layout) };
    if p.is_null() {
        return Err(Error::Cuda { op: "alloc (emulator)", detail: format!("host allocation of {bytes} bytes failed") });
    }
    // SAFETY: `p` points at `bytes` writable bytes.
    unsafe { std::ptr::write_bytes(p, 0xff, bytes) };
    Ok(p as u64)
}

/// # Safety
/// `ptr` came from [`malloc`] with this `bytes` and is not used afterwards.
pub(super) unsafe fn free(ptr: u64, bytes: usize) {
    std::alloc::dealloc(ptr as *mut u8, Layout::from_size_align_unchecked(bytes, ALIGN));
}

/// # Safety
/// Both ranges are valid emulator memory (or host memory) of `bytes` bytes.
pub(super) unsafe fn copy(src: u64, dst: u64, bytes: usize) {
    std::ptr::copy(src as *const u8, dst as *mut u8, bytes);
}

/// # Safety
/// The range is valid emulator memory.
pub(super) unsafe fn zero(ptr: u64, bytes: usize) {
    std::ptr::write_bytes(ptr as *mut u8, 0, bytes);
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
