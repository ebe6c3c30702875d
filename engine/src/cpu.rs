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
}
