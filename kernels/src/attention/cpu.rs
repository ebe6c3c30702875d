//! Slice-level CPU attention (the reference for the CUDA kernels). f32 throughout; callers
//! convert bf16 in and out. Layouts as in the module docs.
//!
//! Every (query block × key block) tile of `BLOCK` × `BLOCK` is a few small GEMMs (the `gemm`
//! crate with `Parallelism::None`: parallelism stays at the task level, on
//! `smelt_engine::cpu::pool()`, so no pool is nested), with the row-wise softmax work between
//! them (online max/exp/sum and rescale; P and dS in the backward) in AVX2+FMA intrinsics, or
//! portable code on other CPUs. The query rows of up to `MAX_STACK` heads of one KV group are
//! copied (q pre-scaled) into one stacked `[heads·rows, d]` operand, so each K/V tile serves all
//! of them in one GEMM. Only the diagonal key block needs the causal mask.
//!
//! Work split (tasks are list-scheduled heaviest first unless noted):
//! - forward: one task per (sequence, block of `BLOCK` query rows, head stack); keys streamed
//!   in blocks of `BLOCK` with an online softmax: S = Q·Kᵀ, then O += P·V.
//! - backward, by group: one task per (sequence, KV head): for each head stack and query
//!   block, for each key block up to the diagonal, S = Q·Kᵀ and dP = dO·Vᵀ, P and dS from the
//!   saved lse, then dQ += dS·K (scratch), dV += Pᵀ·dO and dK += dSᵀ·Q straight into the
//!   task's own rows of the outputs. 5 GEMMs a tile.
//! - backward, two passes (when the by-group tasks are too few for the threads; rayon's split):
//!   dK/dV per (sequence, key block), dQ per (sequence, query block); P and dS are recomputed,
//!   7 GEMMs a tile. Same tiles in the same summation order, so the same bits as by group.
//! - decode: one task per (batch row, block of new tokens, head stack), keys of the slot's
//!   cache in blocks of `BLOCK` with the online softmax (the same code as the forward).
//!
//! No atomics on data (an atomic counter hands out tasks; which thread runs a task does not
//! change its result), so results are deterministic. Scratch: per worker or task
//! O(`MAX_STACK`·`BLOCK`·(d + `BLOCK`)) floats, plus D = rowsum(dO ∘ O) `[T, n_heads]` in the
//! backward.

use super::Dims;
use rayon::prelude::*;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Query rows and keys per tile.
const BLOCK: usize = 64;
/// Most query heads of one KV group stacked into one tile (`MAX_STACK·BLOCK` GEMM rows).
const MAX_STACK: usize = 4;

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

/// A strided read-only matrix: element (i, j) at `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    /// Row-major `[rows, cols]` with row stride `rs`.
    fn rows(data: &'a [f32], rows: usize, cols: usize, rs: usize) -> Self {
        View { data, rows, cols, rs, cs: 1 }
    }

    /// The transpose (no copy).
    fn t(self) -> Self {
        View { data: self.data, rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }
}

/// One past the last element a `rows × cols` matrix with strides (rs, cs) touches.
fn extent(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// `dst[m×n] = (accumulate ? dst : 0) + beta·a·b`, `dst` row-major with row stride `dst_rs`;
/// single-threaded (we are already inside a pool task).
fn mm(dst: &mut [f32], dst_rs: usize, a: View, b: View, accumulate: bool, beta: f32) {
    assert!(extent(a.rows, b.cols, dst_rs, 1) <= dst.len(), "attention tile gemm: dst out of bounds");
    // SAFETY: dst is exclusively borrowed and holds the whole strided extent.
    unsafe { gemm_raw(dst.as_mut_ptr(), dst_rs, a, b, accumulate, beta) }
}

/// [`mm`] on a raw destination.
///
/// # Safety
/// `dst` is valid for reads and writes over `extent(a.rows, b.cols, dst_rs, 1)` elements, which
/// no one else accesses during the call and which overlap neither input.
unsafe fn gemm_raw(dst: *mut f32, dst_rs: usize, a: View, b: View, accumulate: bool, beta: f32) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    assert_eq!(b.rows, k, "attention tile gemm: inner dims");
    assert!(
        extent(a.rows, a.cols, a.rs, a.cs) <= a.data.len() && extent(b.rows, b.cols, b.rs, b.cs) <= b.data.len(),
        "attention tile gemm: operand out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the asserts above bound every element gemm reads from the inputs (strides as
    // given), the caller vouches for dst; gemm computes dst = alpha·dst + beta·lhs·rhs and reads
    // dst only when `read_dst`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0f32,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// An output buffer that several tasks write at once, each to its own (strided, interleaved)
/// set of elements — the per-(sequence, KV head) slices of dq, dk and dv. Access only through
/// the unsafe methods, whose callers guarantee that disjointness.
struct Shared<'a> {
    ptr: *mut f32,
    len: usize,
    _buf: PhantomData<&'a mut [f32]>,
}

// SAFETY: a Shared is only a pointer into a buffer mutably borrowed for 'a; the methods that
// touch it require their callers to keep concurrent accesses disjoint.
unsafe impl Send for Shared<'_> {}
unsafe impl Sync for Shared<'_> {}

impl<'a> Shared<'a> {
    fn new(buf: &'a mut [f32]) -> Self {
        Shared { ptr: buf.as_mut_ptr(), len: buf.len(), _buf: PhantomData }
    }

    /// [`mm`] into the rows starting at element `off` (row stride `dst_rs`).
    ///
    /// # Safety
    /// No other thread accesses those `a.rows × b.cols` elements during the call.
    unsafe fn mm(&self, off: usize, dst_rs: usize, a: View, b: View, accumulate: bool, beta: f32) {
        assert!(off + extent(a.rows, b.cols, dst_rs, 1) <= self.len, "attention: shared output out of bounds");
        // SAFETY: in bounds (above), exclusive by the caller's guarantee; inputs are other buffers.
        unsafe { gemm_raw(self.ptr.add(off), dst_rs, a, b, accumulate, beta) }
    }

    /// Copies `src` to elements `off..off + src.len()`.
    ///
    /// # Safety
    /// No other thread accesses those elements during the call.
    unsafe fn write(&self, off: usize, src: &[f32]) {
        assert!(off + src.len() <= self.len, "attention: shared output out of bounds");
        // SAFETY: in bounds (above), exclusive by the caller's guarantee; `src` is another buffer.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(off), src.len()) }
    }
}

/// Row passes over one tile, 8 independent lanes so LLVM vectorises them; compiled for the
/// baseline target and again for AVX2+FMA, picked at run time.
mod rows {
    const W: usize = 8;
    pub use crate::fastmath::{exp_neg, EXP_MIN};

    #[inline(always)]
    fn row_max(x: &[f32]) -> f32 {
        let mut m = [f32::NEG_INFINITY; W];
        let c = x.chunks_exact(W);
        let mut r = c.remainder().iter().fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a });
        for b in c {
            for k in 0..W {
                m[k] = if b[k] > m[k] { b[k] } else { m[k] };
            }
        }
        for v in m {
            r = if v > r { v } else { r };
        }
        r
    }

    /// `x ← exp(x − m)` in place; returns the sum.
    #[inline(always)]
    fn exp_sub_sum(x: &mut [f32], m: f32) -> f32 {
        let mut s = [0f32; W];
        let mut c = x.chunks_exact_mut(W);
        for b in &mut c {
            for k in 0..W {
                b[k] = exp_neg(b[k] - m);
                s[k] += b[k];
            }
        }
        let mut r = 0f32;
        for v in c.into_remainder() {
            *v = exp_neg(*v - m);
            r += *v;
        }
        ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7])) + r
    }

    /// Online-softmax step over a tile of scores `s` (`valid.len()` rows, row stride `ld`,
    /// `nk` columns; row r's keys past `valid[r]` are masked). Overwrites the scores with the
    /// unnormalised probabilities (0 where masked), updates the running max `m` and sum `l`, and
    /// rescales row r of `acc` (`[rows, d]`) by exp(m_old − m_new).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn online_body(
        s: &mut [f32],
        ld: usize,
        nk: usize,
        valid: &[usize],
        m: &mut [f32],
        l: &mut [f32],
        acc: &mut [f32],
        d: usize,
    ) {
        for (r, &nv) in valid.iter().enumerate() {
            let row = &mut s[r * ld..r * ld + nk];
            let nv = nv.min(nk);
            if nv == 0 {
                row.fill(0.0);
                continue;
            }
            let (live, dead) = row.split_at_mut(nv);
            dead.fill(0.0);
            let m_new = row_max(live).max(m[r]);
            let sum = exp_sub_sum(live, m_new);
            if m[r] == f32::NEG_INFINITY {
                l[r] = sum;
            } else if m_new != m[r] {
                let alpha = exp_neg(m[r] - m_new);
                l[r] = l[r] * alpha + sum;
                acc[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= alpha);
            } else {
                l[r] += sum;
            }
            m[r] = m_new;
        }
    }

    /// Backward tile: `s` holds scaled scores, `dp` holds dO·Vᵀ. Overwrites `s` with
    /// P = exp(s − lse) and `dp` with dS = P ∘ (dP − D) (both 0 where masked).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn p_ds_body(s: &mut [f32], dp: &mut [f32], ld: usize, nk: usize, valid: &[usize], lse: &[f32], delta: &[f32]) {
        for (r, &nv) in valid.iter().enumerate() {
            let nv = nv.min(nk);
            let (sr, dr) = (&mut s[r * ld..r * ld + nk], &mut dp[r * ld..r * ld + nk]);
            let (li, di) = (lse[r], delta[r]);
            for (x, g) in sr[..nv].iter_mut().zip(dr[..nv].iter_mut()) {
                let p = exp_neg(*x - li);
                *x = p;
                *g = p * (*g - di);
            }
            sr[nv..].fill(0.0);
            dr[nv..].fill(0.0);
        }
    }

    /// The portable bodies, compiled for the baseline target (used without AVX2+FMA).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn online_portable(
        s: &mut [f32],
        ld: usize,
        nk: usize,
        valid: &[usize],
        m: &mut [f32],
        l: &mut [f32],
        acc: &mut [f32],
        d: usize,
    ) {
        online_body(s, ld, nk, valid, m, l, acc, d)
    }

    pub(super) fn p_ds_portable(
        s: &mut [f32],
        dp: &mut [f32],
        ld: usize,
        nk: usize,
        valid: &[usize],
        lse: &[f32],
        delta: &[f32],
    ) {
        p_ds_body(s, dp, ld, nk, valid, lse, delta)
    }

    fn has_avx2() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// See `online_body`.
    #[allow(clippy::too_many_arguments)]
    pub fn online(
        s: &mut [f32],
        ld: usize,
        nk: usize,
        valid: &[usize],
        m: &mut [f32],
        l: &mut [f32],
        acc: &mut [f32],
        d: usize,
    ) {
        assert!(
            valid.len() <= m.len()
                && valid.len() <= l.len()
                && acc.len() >= valid.len() * d
                && (valid.is_empty() || s.len() >= (valid.len() - 1) * ld + nk)
                && nk <= ld
        );
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA; the assert above bounds every row access.
            return unsafe { avx2::online(s, ld, nk, valid, m, l, acc, d) };
        }
        online_portable(s, ld, nk, valid, m, l, acc, d)
    }

    /// See `p_ds_body`.
    pub fn p_ds(s: &mut [f32], dp: &mut [f32], ld: usize, nk: usize, valid: &[usize], lse: &[f32], delta: &[f32]) {
        assert!(
            valid.len() <= lse.len()
                && valid.len() <= delta.len()
                && (valid.is_empty() || (s.len().min(dp.len()) >= (valid.len() - 1) * ld + nk))
                && nk <= ld
        );
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA; the assert above bounds every row access.
            return unsafe { avx2::p_ds(s, dp, ld, nk, valid, lse, delta) };
        }
        p_ds_portable(s, dp, ld, nk, valid, lse, delta)
    }

    /// The same passes in AVX2+FMA intrinsics (LLVM keeps the portable lanes at 128 bits and
    /// without FMA even when compiled for AVX2). Results match the portable code to rounding.
    #[cfg(target_arch = "x86_64")]
    mod avx2 {
        use super::{exp_neg, EXP_MIN};
        use std::arch::x86_64::*;

        /// `exp_neg` on 8 lanes (same polynomial, FMA-contracted).
        ///
        /// # Safety (this and the helpers below)
        /// The CPU supports AVX2 and FMA.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        #[allow(clippy::excessive_precision)]
        unsafe fn exp8(x: __m256) -> __m256 {
            let c = _mm256_set1_ps;
            // max(MIN, x) returns x when x is NaN, so NaN stays NaN.
            let x = _mm256_max_ps(c(EXP_MIN), x);
            let v = _mm256_fmadd_ps(x, c(std::f32::consts::LOG2_E), c(12_582_912.0));
            let n = _mm256_sub_ps(v, c(12_582_912.0));
            let r = _mm256_fnmadd_ps(n, c(0.693_359_375), x);
            let r = _mm256_fnmadd_ps(n, c(-2.121_944_4e-4), r);
            let mut p = c(1.987_569_1e-4);
            p = _mm256_fmadd_ps(p, r, c(1.398_199_9e-3));
            p = _mm256_fmadd_ps(p, r, c(8.333_452e-3));
            p = _mm256_fmadd_ps(p, r, c(4.166_579_6e-2));
            p = _mm256_fmadd_ps(p, r, c(1.666_666_5e-1));
            p = _mm256_fmadd_ps(p, r, c(5.000_000_1e-1));
            let e = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, c(1.0)));
            let bits = _mm256_castps_si256(v);
            let bits = _mm256_add_epi32(_mm256_sub_epi32(bits, _mm256_set1_epi32(0x4B40_0000)), _mm256_set1_epi32(127));
            _mm256_mul_ps(e, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(bits)))
        }

        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn hmax(x: __m256) -> f32 {
            let m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let m = _mm_max_ss(m, _mm_shuffle_ps::<1>(m, m));
            _mm_cvtss_f32(m)
        }

        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn hsum(x: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
            _mm_cvtss_f32(s)
        }

        /// `online_body` for AVX2+FMA CPUs.
        ///
        /// # Safety
        /// The CPU supports AVX2 and FMA; `s` holds `valid.len()` rows of stride `ld ≥ nk`, `acc`
        /// that many rows of `d`, `m` and `l` that many entries.
        #[target_feature(enable = "avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn online(
            s: &mut [f32],
            ld: usize,
            nk: usize,
            valid: &[usize],
            m: &mut [f32],
            l: &mut [f32],
            acc: &mut [f32],
            d: usize,
        ) {
            for (r, &nv) in valid.iter().enumerate() {
                let row = &mut s[r * ld..r * ld + nk];
                let nv = nv.min(nk);
                if nv == 0 {
                    row.fill(0.0);
                    continue;
                }
                let (live, dead) = row.split_at_mut(nv);
                dead.fill(0.0);
                let n8 = nv / 8 * 8;
                let ptr = live.as_mut_ptr();
                // SAFETY (all pointer accesses below): j + 8 ≤ n8 ≤ live.len().
                let mut mx = f32::NEG_INFINITY;
                if n8 > 0 {
                    let mut v = _mm256_loadu_ps(ptr);
                    for j in (8..n8).step_by(8) {
                        v = _mm256_max_ps(v, _mm256_loadu_ps(ptr.add(j)));
                    }
                    mx = hmax(v);
                }
                for &x in &live[n8..] {
                    mx = if x > mx { x } else { mx };
                }
                let m_new = if m[r] > mx { m[r] } else { mx };
                let mv = _mm256_set1_ps(m_new);
                let mut sv = _mm256_setzero_ps();
                for j in (0..n8).step_by(8) {
                    let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(ptr.add(j)), mv));
                    _mm256_storeu_ps(ptr.add(j), e);
                    sv = _mm256_add_ps(sv, e);
                }
                let mut sum = hsum(sv);
                for x in &mut live[n8..] {
                    *x = exp_neg(*x - m_new);
                    sum += *x;
                }
                if m[r] == f32::NEG_INFINITY {
                    l[r] = sum;
                } else if m_new != m[r] {
                    let alpha = exp_neg(m[r] - m_new);
                    l[r] = l[r] * alpha + sum;
                    let a = &mut acc[r * d..(r + 1) * d];
                    let av = _mm256_set1_ps(alpha);
                    let d8 = d / 8 * 8;
                    for j in (0..d8).step_by(8) {
                        // SAFETY: j + 8 ≤ d8 ≤ a.len().
                        let p = a.as_mut_ptr().add(j);
                        _mm256_storeu_ps(p, _mm256_mul_ps(_mm256_loadu_ps(p), av));
                    }
                    a[d8..].iter_mut().for_each(|x| *x *= alpha);
                } else {
                    l[r] += sum;
                }
                m[r] = m_new;
            }
        }

        /// `p_ds_body` for AVX2+FMA CPUs.
        ///
        /// # Safety
        /// The CPU supports AVX2 and FMA; `s` and `dp` hold `valid.len()` rows of stride
        /// `ld ≥ nk`, `lse` and `delta` that many entries.
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn p_ds(
            s: &mut [f32],
            dp: &mut [f32],
            ld: usize,
            nk: usize,
            valid: &[usize],
            lse: &[f32],
            delta: &[f32],
        ) {
            for (r, &nv) in valid.iter().enumerate() {
                let nv = nv.min(nk);
                let (sr, dr) = (&mut s[r * ld..r * ld + nk], &mut dp[r * ld..r * ld + nk]);
                let (li, di) = (lse[r], delta[r]);
                let (lv, dv) = (_mm256_set1_ps(li), _mm256_set1_ps(di));
                let n8 = nv / 8 * 8;
                let (sp, dpp) = (sr.as_mut_ptr(), dr.as_mut_ptr());
                for j in (0..n8).step_by(8) {
                    // SAFETY: j + 8 ≤ n8 ≤ nk = sr.len() = dr.len().
                    let p = exp8(_mm256_sub_ps(_mm256_loadu_ps(sp.add(j)), lv));
                    _mm256_storeu_ps(sp.add(j), p);
                    let g = _mm256_loadu_ps(dpp.add(j));
                    _mm256_storeu_ps(dpp.add(j), _mm256_mul_ps(p, _mm256_sub_ps(g, dv)));
                }
                for j in n8..nv {
                    let p = exp_neg(sr[j] - li);
                    sr[j] = p;
                    dr[j] = p * (dr[j] - di);
                }
                sr[nv..].fill(0.0);
                dr[nv..].fill(0.0);
            }
        }
    }
}

/// (sequence start, first row, end row) of every block of `BLOCK` rows, in token order.
fn row_blocks(cu: &[u32]) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    for w in cu.windows(2) {
        let (s, len) = (w[0] as usize, (w[1] - w[0]) as usize);
        let mut r = 0;
        while r < len {
            out.push((s, r, (r + BLOCK).min(len)));
            r += BLOCK;
        }
    }
    out
}

/// Splits `buf` into consecutive chunks of `rows·row_len` elements, one per block.
fn split_rows<'a>(mut buf: &'a mut [f32], blocks: &[(usize, usize, usize)], row_len: usize) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(blocks.len());
    for &(_, r0, r1) in blocks {
        let (head, tail) = std::mem::take(&mut buf).split_at_mut((r1 - r0) * row_len);
        out.push(head);
        buf = tail;
    }
    out
}

/// Query heads `h0..h1`, all of KV head `g`: `(h0, h1, g)`.
type Stack = (usize, usize, usize);

/// The query heads of each KV group cut into stacks of at most [`MAX_STACK`], as (first head,
/// end head, KV head), sizes balanced within a group.
fn head_stacks(dims: Dims) -> Vec<Stack> {
    let rep = dims.group();
    let n = rep.div_ceil(MAX_STACK);
    let mut out = Vec::new();
    for g in 0..dims.n_kv_heads {
        for c in 0..n {
            out.push((g * rep + c * rep / n, g * rep + (c + 1) * rep / n, g));
        }
    }
    out
}

/// Copies `scale·src` rows of heads `h0..h1` for tokens `t0..t0+nr` into `dst` stacked
/// head-major: stacked row `hh·nr + ii` = head `h0 + hh`, token `t0 + ii`. `src` is
/// `[T, row_len]` with head h at column `h·d`.
#[allow(clippy::too_many_arguments)]
fn gather(
    dst: &mut [f32],
    src: &[f32],
    row_len: usize,
    d: usize,
    h0: usize,
    h1: usize,
    t0: usize,
    nr: usize,
    scale: f32,
) {
    for hh in 0..h1 - h0 {
        for ii in 0..nr {
            let from = &src[(t0 + ii) * row_len + (h0 + hh) * d..][..d];
            let to = &mut dst[(hh * nr + ii) * d..][..d];
            if scale == 1.0 {
                to.copy_from_slice(from);
            } else {
                to.iter_mut().zip(from).for_each(|(y, x)| *y = scale * x);
            }
        }
    }
}

/// Per-task scratch for the forward and decode tiles.
struct FwdScratch {
    q: Vec<f32>,
    s: Vec<f32>,
    acc: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    /// Keys each stacked row may see (exclusive bound, relative to key 0).
    lim: Vec<usize>,
    valid: Vec<usize>,
}

impl FwdScratch {
    fn new(rows: usize, d: usize) -> Self {
        FwdScratch {
            q: vec![0.0; rows * d],
            s: vec![0.0; rows * BLOCK],
            acc: vec![0.0; rows * d],
            m: vec![0.0; rows],
            l: vec![0.0; rows],
            lim: vec![0; rows],
            valid: vec![0; rows],
        }
    }

    /// Online-softmax attention of the first `rows` stacked rows of `self.q` (already scaled)
    /// against keys `0..nkeys` of one KV head: key j at `kh[j·ks..][..d]`, value at
    /// `vh[j·ks..][..d]`; row r sees keys `< lim[r]` (≥ 1). Leaves the unnormalised output in
    /// `acc`, the running max in `m` and sum in `l`.
    fn attend(&mut self, rows: usize, d: usize, kh: &[f32], vh: &[f32], ks: usize, nkeys: usize) {
        let acc = &mut self.acc[..rows * d];
        acc.fill(0.0);
        self.m[..rows].fill(f32::NEG_INFINITY);
        self.l[..rows].fill(0.0);
        let q = View::rows(&self.q[..rows * d], rows, d, d);
        for kb in (0..nkeys).step_by(BLOCK) {
            let nk = BLOCK.min(nkeys - kb);
            for r in 0..rows {
                self.valid[r] = self.lim[r].saturating_sub(kb);
            }
            let kt = View::rows(&kh[kb * ks..], nk, d, ks);
            let vt = View::rows(&vh[kb * ks..], nk, d, ks);
            mm(&mut self.s, BLOCK, q, kt.t(), false, 1.0);
            rows::online(&mut self.s, BLOCK, nk, &self.valid[..rows], &mut self.m, &mut self.l, acc, d);
            mm(acc, d, View::rows(&self.s, rows, nk, BLOCK), vt, true, 1.0);
        }
    }
}

/// Causal GQA forward. `o` `[T, n_heads, d]`, `lse` `[n_heads, T]`.
#[allow(clippy::too_many_arguments)]
pub fn forward(q: &[f32], k: &[f32], v: &[f32], cu: &[u32], dims: Dims, scale: f32, o: &mut [f32], lse: &mut [f32]) {
    let (nh, d) = (dims.n_heads, dims.head_dim);
    let (qs, ks) = (nh * d, dims.n_kv_heads * d);
    let t = q.len() / qs.max(1);
    let stacks = head_stacks(dims);
    // One task per (sequence, query block, head stack), heaviest (most keys × heads) first.
    let mut tasks: Vec<(usize, usize, usize, Stack)> =
        row_blocks(cu).into_iter().flat_map(|(s, r0, r1)| stacks.iter().map(move |&st| (s, r0, r1, st))).collect();
    tasks.sort_by_key(|&(_, _, r1, (h0, h1, _))| std::cmp::Reverse(r1 * (h1 - h0)));
    let (o, lse) = (Shared::new(o), Shared::new(lse));
    smelt_engine::cpu::pool().install(|| {
        list_schedule(
            &tasks,
            || (FwdScratch::new(MAX_STACK * BLOCK, d), [0f32; BLOCK]),
            |(sc, lrow), &(s, r0, r1, (h0, h1, g))| {
                let n = r1 - r0;
                let rows = (h1 - h0) * n;
                gather(&mut sc.q, q, qs, d, h0, h1, s + r0, n, scale);
                for r in 0..rows {
                    sc.lim[r] = r0 + r % n + 1;
                }
                sc.attend(rows, d, &k[s * ks + g * d..], &v[s * ks + g * d..], ks, r1);
                for hh in 0..h1 - h0 {
                    let h = h0 + hh;
                    for (ii, lse_r) in lrow[..n].iter_mut().enumerate() {
                        let r = hh * n + ii;
                        let inv = 1.0 / sc.l[r];
                        sc.acc[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= inv);
                        *lse_r = sc.m[r] + sc.l[r].ln();
                        // SAFETY: rows r0..r1 of sequence s, head h of o belong to this task.
                        unsafe { o.write((s + r0 + ii) * qs + h * d, &sc.acc[r * d..(r + 1) * d]) };
                    }
                    // SAFETY: as above, for lse[h, s + r0..s + r1].
                    unsafe { lse.write(h * t + s + r0, &lrow[..n]) };
                }
            },
        )
    });
}

/// Runs `f(state, task)` for every task on the current pool's threads: each worker makes its
/// own `state` and takes the next task in order until none are left — a list schedule, so pass
/// the tasks heaviest first. Which worker runs a task must not change its result.
fn list_schedule<T: Sync, S>(tasks: &[T], state: impl Fn() -> S + Sync, f: impl Fn(&mut S, &T) + Sync) {
    let next = AtomicUsize::new(0);
    let workers = rayon::current_num_threads().min(tasks.len());
    (0..workers).into_par_iter().with_max_len(1).for_each(|_| {
        let mut st = state();
        while let Some(task) = tasks.get(next.fetch_add(1, Ordering::Relaxed)) {
            f(&mut st, task);
        }
    });
}

/// Per-task scratch for the backward tiles.
struct BwdScratch {
    q: Vec<f32>,
    d_o: Vec<f32>,
    s: Vec<f32>,
    dp: Vec<f32>,
    lse: Vec<f32>,
    delta: Vec<f32>,
    valid: Vec<usize>,
}

impl BwdScratch {
    fn new(rows: usize, d: usize) -> Self {
        BwdScratch {
            q: vec![0.0; rows * d],
            d_o: vec![0.0; rows * d],
            s: vec![0.0; rows * BLOCK],
            dp: vec![0.0; rows * BLOCK],
            lse: vec![0.0; rows],
            delta: vec![0.0; rows],
            valid: vec![0; rows],
        }
    }

    /// Loads the stacked rows of heads `h0..h1`, sequence tokens `i0..i0+nr` (sequence at `s`):
    /// scaled q, dO, lse, D.
    fn load(&mut self, x: &BwdIn, h0: usize, h1: usize, s: usize, i0: usize, nr: usize) {
        let (nh, d) = (x.dims.n_heads, x.dims.head_dim);
        gather(&mut self.q, x.q, nh * d, d, h0, h1, s + i0, nr, x.scale);
        gather(&mut self.d_o, x.d_o, nh * d, d, h0, h1, s + i0, nr, 1.0);
        for hh in 0..h1 - h0 {
            let h = h0 + hh;
            self.lse[hh * nr..(hh + 1) * nr].copy_from_slice(&x.lse[h * x.t + s + i0..][..nr]);
            for ii in 0..nr {
                self.delta[hh * nr + ii] = x.delta[(s + i0 + ii) * nh + h];
            }
        }
    }

    /// P of the last [`Self::p_ds`], `[rows, nk]`.
    fn p(&self, rows: usize, nk: usize) -> View<'_> {
        View::rows(&self.s, rows, nk, BLOCK)
    }

    /// dS of the last [`Self::p_ds`], `[rows, nk]`.
    fn ds(&self, rows: usize, nk: usize) -> View<'_> {
        View::rows(&self.dp, rows, nk, BLOCK)
    }

    /// P and dS of the stacked rows (query i0 + r % nr of the sequence) against keys
    /// `kb..kb+nk` (`kt`, `vt`: `[nk, d]` views): P in `self.s`, dS in `self.dp`.
    fn p_ds(&mut self, rows: usize, nr: usize, i0: usize, kb: usize, kt: View, vt: View) {
        let d = kt.cols;
        for r in 0..rows {
            self.valid[r] = (i0 + r % nr + 1).saturating_sub(kb);
        }
        let nk = kt.rows;
        mm(&mut self.s, BLOCK, View::rows(&self.q, rows, d, d), kt.t(), false, 1.0);
        mm(&mut self.dp, BLOCK, View::rows(&self.d_o, rows, d, d), vt.t(), false, 1.0);
        rows::p_ds(&mut self.s, &mut self.dp, BLOCK, nk, &self.valid[..rows], &self.lse, &self.delta);
    }
}

/// The backward's read-only inputs: scaled-q tiles are gathered from `q`, `delta` is
/// D = rowsum(dO ∘ O) `[T, n_heads]`.
#[derive(Clone, Copy)]
struct BwdIn<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    d_o: &'a [f32],
    lse: &'a [f32],
    delta: &'a [f32],
    dims: Dims,
    scale: f32,
    t: usize,
}

impl BwdIn<'_> {
    /// Key rows `kb..kb + nk` of KV head g of the sequence at `s`, and the matching V rows.
    fn kv(&self, s: usize, g: usize, kb: usize, nk: usize) -> (View<'_>, View<'_>) {
        let (d, ks) = (self.dims.head_dim, self.dims.n_kv_heads * self.dims.head_dim);
        let off = (s + kb) * ks + g * d;
        (View::rows(&self.k[off..], nk, d, ks), View::rows(&self.v[off..], nk, d, ks))
    }
}

/// FlashAttention-2 backward. Writes (overwrites) `dq` `[T, n_heads, d]`, `dk`/`dv`
/// `[T, n_kv_heads, d]`.
///
/// Two schedules with the same tiles, summed in the same order (so the same bits either way):
/// - by group: one task per (sequence, KV head), query blocks outer and key blocks inner, dQ
///   in scratch, dK/dV accumulated straight into their rows of the output — 5 GEMMs a tile;
/// - two passes: dK/dV per (sequence, key block), then dQ per (sequence, query block) — P and
///   dS computed twice, 7 GEMMs a tile, but many more tasks.
///
/// By group is taken when its heaviest-first list schedule on the pool's threads finishes
/// within 7/5 of the two-pass even split (e.g. one 1,024-token sequence with 2 KV heads on 2
/// threads; not the same on 16).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &[f32],
    lse: &[f32],
    d_o: &[f32],
    cu: &[u32],
    dims: Dims,
    scale: f32,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (nh, d) = (dims.n_heads, dims.head_dim);
    let qs = nh * d;
    let t = q.len() / qs.max(1);
    let pool = smelt_engine::cpu::pool();
    pool.install(|| {
        // D = rowsum(dO ∘ O), laid out [T, n_heads].
        let mut delta = vec![0f32; t * nh];
        delta.par_chunks_mut(nh).enumerate().for_each(|(tok, dl)| {
            for (h, x) in dl.iter_mut().enumerate() {
                let off = tok * qs + h * d;
                *x = dot(&d_o[off..off + d], &o[off..off + d]);
            }
        });
        let x = BwdIn { q, k, v, d_o, lse, delta: &delta, dims, scale, t };
        if by_group_wins(cu, dims.n_kv_heads, pool.current_num_threads()) {
            backward_by_group(x, cu, dq, dk, dv);
        } else {
            backward_two_pass(x, cu, dq, dk, dv);
        }
    });
}

/// Tiles of a causal sequence of `len` rows (per head).
fn causal_tiles(len: usize) -> usize {
    let nb = len.div_ceil(BLOCK);
    nb * (nb + 1) / 2
}

/// Whether the by-group backward beats the two-pass one on `threads` threads (see
/// [`backward`]): compares its list-scheduled makespan at 5 GEMMs a tile with an even split
/// of the two-pass work at 7.
fn by_group_wins(cu: &[u32], n_kv: usize, threads: usize) -> bool {
    let mut w: Vec<usize> = cu
        .windows(2)
        .flat_map(|s| std::iter::repeat_n(causal_tiles((s[1] - s[0]) as usize), n_kv))
        .filter(|&w| w > 0)
        .collect();
    w.sort_unstable_by(|a, b| b.cmp(a));
    let mut load = vec![0usize; threads.max(1)];
    for x in &w {
        *load.iter_mut().min().expect("one thread") += x;
    }
    let makespan = load.iter().copied().max().unwrap_or(0);
    5 * makespan * load.len() <= 7 * w.iter().sum::<usize>()
}

/// One task per (sequence, KV head), heaviest first; see [`backward`].
fn backward_by_group(x: BwdIn, cu: &[u32], dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
    let (nh, nkv, d) = (x.dims.n_heads, x.dims.n_kv_heads, x.dims.head_dim);
    let (qs, ks) = (nh * d, nkv * d);
    dk.fill(0.0);
    dv.fill(0.0);
    let mut tasks: Vec<(usize, usize, usize)> = cu
        .windows(2)
        .filter(|s| s[1] > s[0])
        .flat_map(|s| (0..nkv).map(move |g| (s[0] as usize, (s[1] - s[0]) as usize, g)))
        .collect();
    tasks.sort_by_key(|&(_, len, _)| std::cmp::Reverse(len));
    let stacks = head_stacks(x.dims);
    let (dq, dk, dv) = (Shared::new(dq), Shared::new(dk), Shared::new(dv));
    list_schedule(
        &tasks,
        || (BwdScratch::new(MAX_STACK * BLOCK, d), vec![0f32; MAX_STACK * BLOCK * d]),
        |(sc, acc), &(s, len, g)| {
            for &(h0, h1, _) in stacks.iter().filter(|st| st.2 == g) {
                for r0 in (0..len).step_by(BLOCK) {
                    let nr = BLOCK.min(len - r0);
                    let rows = (h1 - h0) * nr;
                    sc.load(&x, h0, h1, s, r0, nr);
                    for kb in (0..r0 + nr).step_by(BLOCK) {
                        let (kt, vt) = x.kv(s, g, kb, BLOCK.min(r0 + nr - kb));
                        sc.p_ds(rows, nr, r0, kb, kt, vt);
                        let (p, ds) = (sc.p(rows, kt.rows), sc.ds(rows, kt.rows));
                        mm(acc, d, ds, kt, kb > 0, x.scale);
                        let off = (s + kb) * ks + g * d;
                        // SAFETY: rows s..s+len, columns of KV head g of dk/dv belong to this
                        // task alone.
                        unsafe {
                            dv.mm(off, ks, p.t(), View::rows(&sc.d_o, rows, d, d), true, 1.0);
                            dk.mm(off, ks, ds.t(), View::rows(&sc.q, rows, d, d), true, 1.0);
                        }
                    }
                    for hh in 0..h1 - h0 {
                        for ii in 0..nr {
                            // SAFETY: rows s..s+len, heads of group g of dq belong to this task.
                            unsafe { dq.write((s + r0 + ii) * qs + (h0 + hh) * d, &acc[(hh * nr + ii) * d..][..d]) };
                        }
                    }
                }
            }
        },
    );
}

/// dK/dV per (sequence, key block), then dQ per (sequence, query block); see [`backward`].
fn backward_two_pass(x: BwdIn, cu: &[u32], dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
    let (nh, nkv, d) = (x.dims.n_heads, x.dims.n_kv_heads, x.dims.head_dim);
    let (qs, ks) = (nh * d, nkv * d);
    let blocks = row_blocks(cu);
    let stacks = &head_stacks(x.dims);

    // dK, dV: one task per key block; dV = Σ Pᵀ·dO, dK = Σ dSᵀ·(scale·Q) over the stacked
    // heads of each group and the query blocks at or after it.
    let dkc = split_rows(dk, &blocks, ks);
    let dvc = split_rows(dv, &blocks, ks);
    blocks.par_iter().zip(dkc.into_par_iter().zip(dvc)).for_each(|(&(s, c0, c1), (dkb, dvb))| {
        dkb.fill(0.0);
        dvb.fill(0.0);
        let len = blocks_len(cu, s);
        let mut sc = BwdScratch::new(MAX_STACK * BLOCK, d);
        for &(h0, h1, g) in stacks {
            let (kt, vt) = x.kv(s, g, c0, c1 - c0);
            for i0 in (c0..len).step_by(BLOCK) {
                let nr = BLOCK.min(len - i0);
                let rows = (h1 - h0) * nr;
                sc.load(&x, h0, h1, s, i0, nr);
                sc.p_ds(rows, nr, i0, c0, kt, vt);
                let (p, ds) = (sc.p(rows, kt.rows), sc.ds(rows, kt.rows));
                mm(&mut dvb[g * d..], ks, p.t(), View::rows(&sc.d_o, rows, d, d), true, 1.0);
                mm(&mut dkb[g * d..], ks, ds.t(), View::rows(&sc.q, rows, d, d), true, 1.0);
            }
        }
    });

    // dQ: one task per query block; dQ = scale·Σ dS·K over the key blocks up to it.
    let dqc = split_rows(dq, &blocks, qs);
    blocks.par_iter().zip(dqc).for_each(|(&(s, r0, r1), dqb)| {
        let nr = r1 - r0;
        let mut sc = BwdScratch::new(MAX_STACK * nr, d);
        let mut acc = vec![0f32; MAX_STACK * nr * d];
        for &(h0, h1, g) in stacks {
            let rows = (h1 - h0) * nr;
            sc.load(&x, h0, h1, s, r0, nr);
            for kb in (0..r1).step_by(BLOCK) {
                let (kt, vt) = x.kv(s, g, kb, BLOCK.min(r1 - kb));
                sc.p_ds(rows, nr, r0, kb, kt, vt);
                mm(&mut acc, d, sc.ds(rows, kt.rows), kt, kb > 0, x.scale);
            }
            for hh in 0..h1 - h0 {
                for ii in 0..nr {
                    dqb[ii * qs + (h0 + hh) * d..][..d].copy_from_slice(&acc[(hh * nr + ii) * d..][..d]);
                }
            }
        }
    });
}

/// Length of the sequence that starts at token `s` (a start taken from `row_blocks`).
fn blocks_len(cu: &[u32], s: usize) -> usize {
    // Starts are non-decreasing; the last sequence starting at `s` is the non-empty one.
    let b = cu.partition_point(|&x| (x as usize) <= s);
    (cu[b.min(cu.len() - 1)] as usize).saturating_sub(s)
}

/// Decode: `q` `[B, n_new, n_heads, d]`, caches `[n_slots, max_len, n_kv_heads, d]`, batch row
/// b on slot `slots[b]` (slot b without a list); `o` like q.
#[allow(clippy::too_many_arguments)]
pub fn decode(
    q: &[f32],
    n_new: usize,
    k_cache: &[f32],
    v_cache: &[f32],
    max_len: usize,
    cache_lens: &[u32],
    slots: Option<&[u32]>,
    dims: Dims,
    scale: f32,
    o: &mut [f32],
) {
    let (nh, d) = (dims.n_heads, dims.head_dim);
    let (qs, ks) = (nh * d, dims.n_kv_heads * d);
    let stacks = head_stacks(dims);
    // One task per (batch row, block of new tokens, head stack), heaviest first.
    let mut tasks: Vec<(usize, usize, usize, Stack)> = Vec::new();
    for b in 0..cache_lens.len() {
        for i0 in (0..n_new).step_by(BLOCK) {
            tasks.extend(stacks.iter().map(|&st| (b, i0, BLOCK.min(n_new - i0), st)));
        }
    }
    tasks.sort_by_key(|&(b, _, n, (h0, h1, _))| std::cmp::Reverse(cache_lens[b] as usize * n * (h1 - h0)));
    let o = Shared::new(o);
    smelt_engine::cpu::pool().install(|| {
        list_schedule(
            &tasks,
            || FwdScratch::new(MAX_STACK * BLOCK, d),
            |sc, &(b, i0, n, (h0, h1, g))| {
                let rows = (h1 - h0) * n;
                let nkeys = cache_lens[b] as usize;
                gather(&mut sc.q, q, qs, d, h0, h1, b * n_new + i0, n, scale);
                for r in 0..rows {
                    // New token i sits at position nkeys - n_new + i and sees keys up to it.
                    sc.lim[r] = nkeys - n_new + i0 + r % n + 1;
                }
                let slot = slots.map_or(b, |s| s[b] as usize);
                let base = slot * max_len * ks + g * d;
                sc.attend(rows, d, &k_cache[base..], &v_cache[base..], ks, nkeys);
                for r in 0..rows {
                    let (hh, i) = (r / n, i0 + r % n);
                    let inv = 1.0 / sc.l[r];
                    sc.acc[r * d..(r + 1) * d].iter_mut().for_each(|x| *x *= inv);
                    // SAFETY: new tokens i0..i0+n of row b, heads h0..h1 of o belong to this task.
                    unsafe { o.write((b * n_new + i) * qs + (h0 + hh) * d, &sc.acc[r * d..(r + 1) * d]) };
                }
            },
        )
    });
}

/// Copies row r of `new` (`row` elements) to slot `slots[r]`, position `positions[r]` of the
/// cache `[n_slots, max_len, row]`. Bounds are checked by the caller.
pub fn kv_cache_append<T: Copy>(
    cache: &mut [T],
    new: &[T],
    max_len: usize,
    row: usize,
    slots: &[u32],
    positions: &[u32],
) {
    for (r, (&s, &p)) in slots.iter().zip(positions).enumerate() {
        let dst = (s as usize * max_len + p as usize) * row;
        cache[dst..dst + row].copy_from_slice(&new[r * row..(r + 1) * row]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smelt_engine::Rng;

    /// Both backward schedules (the pick depends on the thread count) give the same bits.
    #[test]
    fn attention_backward_schedules_agree_bitwise() {
        let mut rng = Rng::new(5);
        for (lens, nh, nkv, d) in [(vec![1u32, 17, 0, 130, 64], 7usize, 1usize, 24usize), (vec![200, 65], 4, 2, 64)] {
            let cu: Vec<u32> = std::iter::once(0)
                .chain(lens.iter().scan(0, |a, &l| {
                    *a += l;
                    Some(*a)
                }))
                .collect();
            let t = *cu.last().unwrap() as usize;
            let dims = Dims { n_heads: nh, n_kv_heads: nkv, head_dim: d };
            let scale = 0.3;
            let (q, k, v) =
                (rng.normal_vec(t * nh * d, 1.0), rng.normal_vec(t * nkv * d, 1.0), rng.normal_vec(t * nkv * d, 1.0));
            let d_o = rng.normal_vec(t * nh * d, 1.0);
            let (mut o, mut lse) = (vec![0f32; t * nh * d], vec![0f32; nh * t]);
            forward(&q, &k, &v, &cu, dims, scale, &mut o, &mut lse);
            let delta: Vec<f32> = (0..t * nh).map(|r| dot(&d_o[r * d..][..d], &o[r * d..][..d])).collect();
            let x = BwdIn { q: &q, k: &k, v: &v, d_o: &d_o, lse: &lse, delta: &delta, dims, scale, t };
            let mut a = [vec![1f32; t * nh * d], vec![1f32; t * nkv * d], vec![1f32; t * nkv * d]];
            let mut b = a.clone();
            let [aq, ak, av] = &mut a;
            backward_by_group(x, &cu, aq, ak, av);
            let [bq, bk, bv] = &mut b;
            backward_two_pass(x, &cu, bq, bk, bv);
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                assert!(x.iter().zip(y).all(|(x, y)| x.to_bits() == y.to_bits()), "output {i} differs, lens {lens:?}");
            }
        }
        assert!(by_group_wins(&[0, 1024], 2, 2));
        assert!(!by_group_wins(&[0, 1024], 2, 16));
    }

    /// The AVX2 row passes (what runs on this CPU) against the portable ones (what runs
    /// without AVX2), on rows with every mask length and a tail that is not a multiple of 8.
    #[test]
    fn row_passes_match_portable() {
        let mut rng = Rng::new(3);
        let (ld, nk, d) = (64usize, 61usize, 24usize);
        let rows = nk + 2;
        let valid: Vec<usize> = (0..rows).collect();
        let s0: Vec<f32> = rng.normal_vec(rows * ld, 3.0);
        let dp0: Vec<f32> = rng.normal_vec(rows * ld, 1.0);
        let acc0: Vec<f32> = rng.normal_vec(rows * d, 1.0);
        let lse: Vec<f32> = rng.normal_vec(rows, 1.0).iter().map(|x| x + 4.0).collect();
        let delta: Vec<f32> = rng.normal_vec(rows, 1.0);
        let m0: Vec<f32> = (0..rows).map(|r| if r % 3 == 0 { f32::NEG_INFINITY } else { r as f32 * 0.1 }).collect();
        let l0: Vec<f32> = (0..rows).map(|r| if r % 3 == 0 { 0.0 } else { 1.0 + r as f32 }).collect();
        let close = |a: &[f32], b: &[f32], what: &str| {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert!(x == y || (x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{what}[{i}]: {x} vs {y}");
            }
        };
        let (mut s1, mut m1, mut l1, mut a1) = (s0.clone(), m0.clone(), l0.clone(), acc0.clone());
        rows::online(&mut s1, ld, nk, &valid, &mut m1, &mut l1, &mut a1, d);
        let (mut s2, mut m2, mut l2, mut a2) = (s0.clone(), m0.clone(), l0.clone(), acc0.clone());
        rows::online_portable(&mut s2, ld, nk, &valid, &mut m2, &mut l2, &mut a2, d);
        close(&s1, &s2, "p");
        close(&m1, &m2, "m");
        close(&l1, &l2, "l");
        close(&a1, &a2, "acc");
        let (mut s1, mut g1) = (s0.clone(), dp0.clone());
        rows::p_ds(&mut s1, &mut g1, ld, nk, &valid, &lse, &delta);
        let (mut s2, mut g2) = (s0.clone(), dp0.clone());
        rows::p_ds_portable(&mut s2, &mut g2, ld, nk, &valid, &lse, &delta);
        close(&s1, &s2, "P");
        close(&g1, &g2, "dS");
        for x in [-80.0f32, -10.0, -1e-3, 0.0, 0.5] {
            assert!(
                ((rows::exp_neg(x) as f64) - (x as f64).exp()).abs() <= 4.0 * f32::EPSILON as f64 * (x as f64).exp()
            );
        }
    }
}
