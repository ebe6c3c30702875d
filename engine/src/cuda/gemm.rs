//! Row-major matmul on raw device pointers through cuBLAS (`cublasGemmEx`,
//! `cublasGemmStridedBatchedEx`), f32 or 16-bit inputs with fp32 accumulation.
//!
//! cuBLAS is column-major. A row-major `[r, c]` matrix read column-major is its transpose, so
//! row-major `C = op(A)·op(B)` is column-major `Cᵀ = op(B)ᵀ·op(A)ᵀ`: call cuBLAS with the
//! operands swapped, `m`/`n` swapped, and the transpose flags kept.

use cudarc::cublas::{result as blas, sys as blas_sys};

use super::CudaDevice;
use crate::{DType, Error, Result};

/// The shape and types of one row-major matmul `C[m,n] = alpha·op(A)·op(B) + beta·C`.
///
/// `A` is stored `[m,k]`, or `[k,m]` when `trans_a`; `B` is stored `[k,n]`, or `[n,k]` when
/// `trans_b` (a PyTorch `Linear` weight, so `x·Wᵀ` is `trans_b = true`). All three are dense.
#[derive(Clone, Copy, Debug)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    /// Element type of A and B: F32, BF16 or F16.
    pub ab_dtype: DType,
    /// Element type of C: F32 (any inputs) or the inputs' 16-bit type.
    pub c_dtype: DType,
    pub alpha: f32,
    pub beta: f32,
}

impl Gemm {
    /// `C = A·B` with the given dtypes (no transposes, alpha 1, beta 0).
    pub fn new(m: usize, n: usize, k: usize, ab_dtype: DType, c_dtype: DType) -> Self {
        Gemm { m, n, k, trans_a: false, trans_b: false, ab_dtype, c_dtype, alpha: 1.0, beta: 0.0 }
    }
    pub fn trans(mut self, trans_a: bool, trans_b: bool) -> Self {
        self.trans_a = trans_a;
        self.trans_b = trans_b;
        self
    }
    /// `C += A·B` instead of `C = A·B`.
    pub fn accumulate(mut self, yes: bool) -> Self {
        self.beta = if yes { 1.0 } else { 0.0 };
        self
    }
    pub fn scale(mut self, alpha: f32, beta: f32) -> Self {
        self.alpha = alpha;
        self.beta = beta;
        self
    }

    fn describe(&self) -> String {
        format!(
            "m={} n={} k={} trans_a={} trans_b={} {}x{}->{}",
            self.m, self.n, self.k, self.trans_a, self.trans_b, self.ab_dtype, self.ab_dtype, self.c_dtype
        )
    }

    fn check(&self) -> Result<(blas_sys::cudaDataType, blas_sys::cudaDataType)> {
        let ty = |d: DType| match d {
            DType::F32 => Some(blas_sys::cudaDataType::CUDA_R_32F),
            DType::BF16 => Some(blas_sys::cudaDataType::CUDA_R_16BF),
            DType::F16 => Some(blas_sys::cudaDataType::CUDA_R_16F),
            _ => None,
        };
        let (Some(ab), Some(c)) = (ty(self.ab_dtype), ty(self.c_dtype)) else {
            return Err(Error::shape("matmul (cuda)", format!("unsupported dtypes: {}", self.describe())));
        };
        // cuBLAS has no f32-input → 16-bit-output GEMM with f32 compute.
        if self.ab_dtype == DType::F32 && self.c_dtype != DType::F32 {
            return Err(Error::shape("matmul (cuda)", format!("f32 inputs need an f32 output: {}", self.describe())));
        }
        if self.ab_dtype != DType::F32 && self.c_dtype != DType::F32 && self.c_dtype != self.ab_dtype {
            return Err(Error::shape("matmul (cuda)", format!("mixed 16-bit types: {}", self.describe())));
        }
        let max = i32::MAX as usize;
        if self.m > max || self.n > max || self.k > max {
            return Err(Error::shape("matmul (cuda)", format!("dimension over i32::MAX: {}", self.describe())));
        }
        Ok((ab, c))
    }
}

/// Fast-path precision knob: `SMELT_ALLOW_TF32=1` lets f32 GEMMs use TF32 tensor cores
/// (about 10 mantissa bits). Off by default so f32 results match the CPU to fp32 rounding.
fn allow_tf32() -> bool {
    static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *V.get_or_init(|| std::env::var("SMELT_ALLOW_TF32").as_deref() == Ok("1"))
}

impl CudaDevice {
    /// Row-major `C = alpha·op(A)·op(B) + beta·C` on device pointers `a`, `b`, `c` (which must
    /// hold the extents [`Gemm`] describes), queued on this device's compute stream.
    pub fn gemm(&self, g: &Gemm, a: u64, b: u64, c: u64) -> Result<()> {
        self.gemm_strided_batched(g, 1, a, 0, b, 0, c, 0)
    }

    /// `batch` independent matmuls; operand `i` starts `stride_*·i` **elements** after the base
    /// pointer (a stride of 0 reuses one operand for every batch entry).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_strided_batched(
        &self,
        g: &Gemm,
        batch: usize,
        a: u64,
        stride_a: usize,
        b: u64,
        stride_b: usize,
        c: u64,
        stride_c: usize,
    ) -> Result<()> {
        let (ab_ty, c_ty) = g.check()?;
        if g.m == 0 || g.n == 0 || batch == 0 {
            return Ok(());
        }
        let _turn = self.stream_turn();
        if batch > i32::MAX as usize {
            return Err(Error::shape("matmul (cuda)", format!("batch {batch} over i32::MAX: {}", g.describe())));
        }
        if g.k == 0 {
            // Nothing to multiply: C = beta·C. cuBLAS would reject the zero leading dimensions.
            if g.beta == 0.0 {
                let elem = g.c_dtype.size_in_bytes();
                for i in 0..batch {
                    let off = (i * stride_c * elem) as u64;
                    self.memset_zero(c + off, g.m * g.n * elem)?;
                }
                return Ok(());
            } else if g.beta == 1.0 {
                return Ok(());
            }
            return Err(Error::shape("matmul (cuda)", format!("k = 0 with beta {} is not supported", g.beta)));
        }

        let name = || {
            let t = |t: bool| if t { 'T' } else { 'N' };
            let batched = if batch > 1 { " batched" } else { "" };
            format!("cublas gemm {}→{} {}{}{batched}", g.ab_dtype, g.c_dtype, t(g.trans_a), t(g.trans_b))
        };
        if self.is_emulated() {
            let g = *g;
            let run = move || {
                // SAFETY: the caller's contract, as for the cuBLAS call below.
                unsafe { super::emu::gemm_strided_batched(&g, batch, a, stride_a, b, stride_b, c, stride_c) }?;
                super::emu::check_canary(c).map_err(|e| Error::Cuda { op: "matmul (emulator)", detail: e })
            };
            if self.emu_record(|| Box::new(run)) {
                return Ok(());
            }
            return super::profile::timed(self, name, run);
        }
        let op = |t: bool| {
            if t {
                blas_sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                blas_sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        // Column-major call: C'[n,m] = op(B')[n,k] · op(A')[k,m], B' = B as stored, A' = A.
        let (m_, n_, k_) = (g.n as i32, g.m as i32, g.k as i32);
        let lda_ = if g.trans_b { g.k } else { g.n } as i32;
        let ldb_ = if g.trans_a { g.m } else { g.k } as i32;
        let ldc_ = g.n as i32;
        let compute = match (g.ab_dtype, allow_tf32()) {
            (DType::F32, true) => blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            _ => blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        };
        let (alpha, beta) = (g.alpha, g.beta);
        let handle = self.blas()?;
        let guard = handle.lock().map_err(|_| Error::Cuda { op: "cublas", detail: "handle lock poisoned".into() })?;
        self.bind()?;
        // SAFETY: the caller guarantees the pointers hold the described extents; alpha/beta are
        // host f32 values (the handle is in host pointer mode, scale type f32 for COMPUTE_32F).
        let res = super::profile::timed(self, name, || unsafe {
            if batch == 1 {
                blas::gemm_ex(
                    *guard.handle(),
                    op(g.trans_b),
                    op(g.trans_a),
                    m_,
                    n_,
                    k_,
                    (&alpha as *const f32).cast(),
                    b as *const _,
                    ab_ty,
                    lda_,
                    a as *const _,
                    ab_ty,
                    ldb_,
                    (&beta as *const f32).cast(),
                    c as *mut _,
                    c_ty,
                    ldc_,
                    compute,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            } else {
                blas::gemm_strided_batched_ex(
                    *guard.handle(),
                    op(g.trans_b),
                    op(g.trans_a),
                    m_,
                    n_,
                    k_,
                    (&alpha as *const f32).cast(),
                    b as *const _,
                    ab_ty,
                    lda_,
                    stride_b as i64,
                    a as *const _,
                    ab_ty,
                    ldb_,
                    stride_a as i64,
                    (&beta as *const f32).cast(),
                    c as *mut _,
                    c_ty,
                    ldc_,
                    stride_c as i64,
                    batch as i32,
                    compute,
                    blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
        });
        drop(guard);
        res.map_err(|e| Error::Cuda { op: "matmul (cublasGemmEx)", detail: format!("{:?}: {}", e.0, g.describe()) })?;
        self.debug_sync("matmul (cublasGemmEx)")
    }
}
