//! The CPU backend: one rayon thread pool for every CPU kernel, and f32 matmul through the
//! `gemm` crate.
//!
//! Thread count: `SMELT_NUM_THREADS` if set, else [`set_num_threads`] if called before first
//! use, else the number of available cores.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use crate::{Error, Result};

static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
static REQUESTED: AtomicUsize = AtomicUsize::new(0);

/// Sets the CPU thread count. Takes effect only before the first CPU kernel runs; returns
/// false if the pool already exists.
pub fn set_num_threads(n: usize) -> bool {
    REQUESTED.store(n, Ordering::SeqCst);
    POOL.get().is_none()
}

fn configured_threads() -> usize {
    if let Some(n) = std::env::var("SMELT_NUM_THREADS").ok().and_then(|s| s.trim().parse::<usize>().ok()) {
        if n > 0 {
            return n;
        }
    }
    match REQUESTED.load(Ordering::SeqCst) {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        n => n,
    }
}

/// The pool every CPU kernel runs on.
pub fn pool() -> &'static rayon::ThreadPool {
    POOL.get_or_init(|| {
        let n = configured_threads();
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("smelt-cpu-{i}"))
            .build()
            .unwrap_or_else(|_| rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("1-thread pool"))
    })
}

/// Number of threads in the CPU pool.
pub fn num_threads() -> usize {
    pool().current_num_threads()
}

/// Row-major f32 matmul: `C[m,n] = op(A)·op(B)` (or `C += …` when `accumulate`).
///
/// `A` is stored `[m,k]`, or `[k,m]` when `trans_a`; `B` is stored `[k,n]`, or `[n,k]` when
/// `trans_b` (the layout of a PyTorch `Linear` weight, so `x·Wᵀ` is `trans_b = true`).
#[allow(clippy::too_many_arguments)]
pub fn matmul_f32(
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
) -> Result<()> {
    if a.len() != m * k || b.len() != k * n || c.len() != m * n {
        return Err(Error::shape(
            "matmul",
            format!(
                "m={m} n={n} k={k} trans_a={trans_a} trans_b={trans_b}: a has {} elements (want {}), b {} (want {}), c {} (want {})",
                a.len(), m * k, b.len(), k * n, c.len(), m * n
            ),
        ));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return Ok(());
    }
    if trans_b && !trans_a && m <= FEW_ROWS {
        nt_few_rows(a, b, c, m, n, k, accumulate);
        return Ok(());
    }
    // (row stride, column stride) of each operand as a logical matrix.
    let (a_rs, a_cs) = if trans_a { (1, m as isize) } else { (k as isize, 1) };
    let (b_rs, b_cs) = if trans_b { (1, k as isize) } else { (n as isize, 1) };
    let flops = 2.0 * m as f64 * n as f64 * k as f64;
    let threads = num_threads();
    let par = if threads > 1 && flops > 2e6 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    pool().install(|| unsafe {
        // SAFETY: the slices were checked above to hold exactly the strided extents used.
        // gemm computes dst = alpha·dst + beta·lhs·rhs, reading dst only when `read_dst`.
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        );
    });
    Ok(())
}

/// Rows of A up to which `A·Bᵀ` runs as dot products ([`nt_few_rows`]) instead of the gemm
/// crate. Measured on `smelt bench generate --shape small-cpu` (2 threads): 1.24× faster decode
/// steps at 8 rows, even at 16, slower at 32.
pub const FEW_ROWS: usize = 12;

/// `C = A·Bᵀ` (or `C += A·Bᵀ`) for a few rows of A, as in decoding: each output is a dot product
/// of two rows contiguous along k, and B is streamed once per 4 rows of A. The gemm crate would
/// first copy Bᵀ into its packed layout with strided scalar loads, which at small m costs as
/// much as the arithmetic. Every output's sum runs in the same order whatever m and n are.
fn nt_few_rows(a: &[f32], b: &[f32], c: &mut [f32], m: usize, n: usize, k: usize, accumulate: bool) {
    use rayon::prelude::*;
    /// Columns of C per task.
    const NB: usize = 64;
    struct Out(*mut f32);
    // SAFETY: tasks write disjoint column blocks of C.
    unsafe impl Send for Out {}
    unsafe impl Sync for Out {}
    impl Out {
        /// Stores `v` at element `i` of C, or adds it there.
        ///
        /// # Safety
        /// `i` is inside C, and no other task touches it.
        unsafe fn put(&self, i: usize, v: f32, add: bool) {
            let p = self.0.add(i);
            *p = if add { *p + v } else { v };
        }
    }
    let out = Out(c.as_mut_ptr());
    let task = |t: usize| {
        let (j0, j1) = (t * NB, ((t + 1) * NB).min(n));
        for j in (j0..j1).step_by(4) {
            let nj = 4.min(j1 - j);
            for i in (0..m).step_by(4) {
                let mi = 4.min(m - i);
                let d = dots4x4(&a[i * k..(i + mi) * k], &b[j * k..(j + nj) * k], k);
                for (r, dr) in d.iter().enumerate().take(mi) {
                    for (q, &x) in dr.iter().enumerate().take(nj) {
                        // SAFETY: (i + r, j + q) is inside C, in this task's column block.
                        unsafe { out.put((i + r) * n + j + q, x, accumulate) };
                    }
                }
            }
        }
    };
    let tasks = n.div_ceil(NB);
    if num_threads() > 1 && 2 * m * n * k > 2_000_000 {
        pool().install(|| (0..tasks).into_par_iter().for_each(task));
    } else {
        (0..tasks).for_each(task);
    }
}

/// The dot products of up to 4 rows of `a` with up to 4 rows of `b` (rows of length k).
fn dots4x4(a: &[f32], b: &[f32], k: usize) -> [[f32; 4]; 4] {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { dots4x4_avx2(a, b, k) };
    }
    let mut d = [[0f32; 4]; 4];
    for (r, ar) in a.chunks_exact(k).enumerate() {
        for (q, bq) in b.chunks_exact(k).enumerate() {
            d[r][q] = ar.iter().zip(bq).map(|(x, y)| x * y).sum();
        }
    }
    d
}

/// [`dots4x4`] on 8-lane FMA accumulators.
///
/// # Safety
/// The CPU supports AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)] // fixed 4×4 register blocks, indexed as such
unsafe fn dots4x4_avx2(a: &[f32], b: &[f32], k: usize) -> [[f32; 4]; 4] {
    use std::arch::x86_64::*;
    let (mi, nj) = (a.len() / k, b.len() / k);
    let k8 = k / 8 * 8;
    let mut acc = [[_mm256_setzero_ps(); 4]; 4];
    for p in (0..k8).step_by(8) {
        let mut bv = [_mm256_setzero_ps(); 4];
        for q in 0..nj {
            bv[q] = _mm256_loadu_ps(b.as_ptr().add(q * k + p));
        }
        for r in 0..mi {
            let av = _mm256_loadu_ps(a.as_ptr().add(r * k + p));
            for q in 0..4 {
                acc[r][q] = _mm256_fmadd_ps(av, bv[q], acc[r][q]);
            }
        }
    }
    let mut d = [[0f32; 4]; 4];
    for r in 0..mi {
        for q in 0..nj {
            let x = acc[r][q];
            let s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
            let tail: f32 = (k8..k).map(|p| a[r * k + p] * b[q * k + p]).sum();
            d[r][q] = _mm_cvtss_f32(s) + tail;
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Rng;

    fn naive(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, ta: bool, tb: bool) -> Vec<f64> {
        let mut c = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for p in 0..k {
                    let av = if ta { a[p * m + i] } else { a[i * k + p] };
                    let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                    s += av as f64 * bv as f64;
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    #[test]
    fn matmul_matches_f64_reference_on_odd_shapes() {
        let mut rng = Rng::new(1);
        for &(m, n, k) in &[(1, 7, 13), (33, 65, 17), (1, 1, 1), (64, 3, 200), (130, 257, 31)] {
            for &(ta, tb) in &[(false, false), (true, false), (false, true), (true, true)] {
                let a = rng.normal_vec(m * k, 1.0);
                let b = rng.normal_vec(k * n, 1.0);
                let want = naive(&a, &b, m, n, k, ta, tb);
                let mut c = rng.normal_vec(m * n, 1.0);
                let c0 = c.clone();
                matmul_f32(&a, &b, &mut c, m, n, k, ta, tb, false).unwrap();
                let tol = 1e-5 * (k as f64).sqrt() * 4.0;
                for (x, y) in c.iter().zip(&want) {
                    assert!((*x as f64 - y).abs() <= tol * (1.0 + y.abs()), "m{m} n{n} k{k} ta{ta} tb{tb}: {x} vs {y}");
                }
                // accumulate adds onto what was there
                let mut acc = c0.clone();
                matmul_f32(&a, &b, &mut acc, m, n, k, ta, tb, true).unwrap();
                for ((x, y), z) in acc.iter().zip(&want).zip(&c0) {
                    assert!((*x as f64 - (y + *z as f64)).abs() <= tol * (1.0 + y.abs() + z.abs() as f64));
                }
            }
        }
    }

    #[test]
    fn matmul_rejects_bad_lengths() {
        let mut c = vec![0f32; 4];
        let e = matmul_f32(&[1.0; 3], &[1.0; 4], &mut c, 2, 2, 2, false, false, false).unwrap_err();
        assert!(e.to_string().contains("matmul"), "{e}");
    }

    /// The few-rows path (A·Bᵀ as dot products) against the f64 reference on odd shapes: row
    /// counts around the 4-row blocks, n around the 4-column and 64-column blocks, k not a
    /// multiple of 8, with and without accumulation; and bitwise the same outputs whatever the
    /// number of rows.
    #[test]
    fn few_rows_nt_matches_reference() {
        let mut rng = Rng::new(9);
        for (m, n, k) in [(1, 1, 1), (1, 130, 7), (3, 5, 16), (5, 67, 33), (FEW_ROWS, 257, 64), (2, 64, 1)] {
            let a = rng.normal_vec(m * k, 1.0);
            let b = rng.normal_vec(n * k, 1.0);
            let want = naive(&a, &b, m, n, k, false, true);
            let mut c = vec![f32::NAN; m * n];
            matmul_f32(&a, &b, &mut c, m, n, k, false, true, false).unwrap();
            for (x, w) in c.iter().zip(&want) {
                assert!((*x as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()) * (k as f64).sqrt(), "{m}x{n}x{k}: {x} vs {w}");
            }
            let mut acc = vec![1.5f32; m * n];
            matmul_f32(&a, &b, &mut acc, m, n, k, false, true, true).unwrap();
            for (x, y) in acc.iter().zip(&c) {
                assert_eq!(*x, 1.5 + *y, "{m}x{n}x{k}: accumulate");
            }
            // Row 0 alone gives row 0's outputs, bit for bit.
            let mut one = vec![0f32; n];
            matmul_f32(&a[..k], &b, &mut one, 1, n, k, false, true, false).unwrap();
            assert_eq!(one, c[..n], "{m}x{n}x{k}: row 0 alone");
        }
    }
}
