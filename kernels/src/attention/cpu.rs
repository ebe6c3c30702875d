//! Slice-level CPU attention (the reference for the CUDA kernels). f32 throughout; callers
//! convert bf16 in and out. Layouts as in the module docs.
//!
//! Work split (all inside `smelt_engine::cpu::pool()`):
//! - forward and dQ: one task per (sequence, block of `BLOCK` query rows), all heads — the
//!   task's output rows are one contiguous chunk of `o`/`dq`; K/V are streamed in blocks of
//!   `BLOCK` keys with an online softmax, each key block reused across the task's rows.
//! - dK/dV: one task per (sequence, block of `BLOCK` keys), all KV heads, looping over the
//!   query heads of each group and the query rows at or after the block (no atomics, so the
//!   result is deterministic; P is recomputed once for dK/dV and once for dQ).
//! - decode: one task per (batch row, new token, head).

use super::Dims;
use rayon::prelude::*;

const BLOCK: usize = 64;

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

#[inline]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
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

/// Causal GQA forward. `o` `[T, n_heads, d]`, `lse` `[n_heads, T]`.
#[allow(clippy::too_many_arguments)]
pub fn forward(q: &[f32], k: &[f32], v: &[f32], cu: &[u32], dims: Dims, scale: f32, o: &mut [f32], lse: &mut [f32]) {
    let (nh, d) = (dims.n_heads, dims.head_dim);
    let t = q.len() / (nh * d).max(1);
    let blocks = row_blocks(cu);
    let chunks = split_rows(o, &blocks, nh * d);
    let lses: Vec<Vec<f32>> = smelt_engine::cpu::pool().install(|| {
        blocks
            .par_iter()
            .zip(chunks)
            .map(|(&(s, r0, r1), oc)| {
                let mut l = vec![0f32; nh * (r1 - r0)];
                forward_block(q, k, v, dims, scale, s, r0, r1, oc, &mut l);
                l
            })
            .collect()
    });
    for (&(s, r0, r1), l) in blocks.iter().zip(&lses) {
        let n = r1 - r0;
        for h in 0..nh {
            lse[h * t + s + r0..h * t + s + r1].copy_from_slice(&l[h * n..(h + 1) * n]);
        }
    }
}

/// Rows `r0..r1` of the sequence starting at token `s`, all heads. `oc` holds those rows of o;
/// `lse_out` is `[n_heads, r1 - r0]`.
#[allow(clippy::too_many_arguments)]
fn forward_block(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dims: Dims,
    scale: f32,
    s: usize,
    r0: usize,
    r1: usize,
    oc: &mut [f32],
    lse_out: &mut [f32],
) {
    let (nh, d, rep) = (dims.n_heads, dims.head_dim, dims.group());
    let (qs, ks) = (nh * d, dims.n_kv_heads * d);
    let n = r1 - r0;
    let mut m = vec![f32::NEG_INFINITY; n];
    let mut l = vec![0f32; n];
    let mut sc = [0f32; BLOCK];
    oc.fill(0.0);
    for h in 0..nh {
        let g = h / rep;
        m.fill(f32::NEG_INFINITY);
        l.fill(0.0);
        for kb in (0..r1).step_by(BLOCK) {
            let kend = (kb + BLOCK).min(r1);
            for i in r0.max(kb)..r1 {
                let ii = i - r0;
                let lim = kend.min(i + 1);
                let qi = &q[(s + i) * qs + h * d..][..d];
                let mut mx = f32::NEG_INFINITY;
                for j in kb..lim {
                    let x = scale * dot(qi, &k[(s + j) * ks + g * d..][..d]);
                    sc[j - kb] = x;
                    mx = mx.max(x);
                }
                let m_new = m[ii].max(mx);
                let acc = &mut oc[ii * qs + h * d..][..d];
                let alpha = (m[ii] - m_new).exp();
                if alpha != 1.0 {
                    acc.iter_mut().for_each(|x| *x *= alpha);
                    l[ii] *= alpha;
                }
                for j in kb..lim {
                    let p = (sc[j - kb] - m_new).exp();
                    l[ii] += p;
                    axpy(p, &v[(s + j) * ks + g * d..][..d], acc);
                }
                m[ii] = m_new;
            }
        }
        for ii in 0..n {
            let inv = 1.0 / l[ii];
            oc[ii * qs + h * d..][..d].iter_mut().for_each(|x| *x *= inv);
            lse_out[h * n + ii] = m[ii] + l[ii].ln();
        }
    }
}

/// FlashAttention-2 backward. Writes (overwrites) `dq` `[T, n_heads, d]`, `dk`/`dv`
/// `[T, n_kv_heads, d]`.
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
    let (nh, nkv, d, rep) = (dims.n_heads, dims.n_kv_heads, dims.head_dim, dims.group());
    let (qs, ks) = (nh * d, nkv * d);
    let t = q.len() / qs.max(1);
    let blocks = row_blocks(cu);
    smelt_engine::cpu::pool().install(|| {
        // D = rowsum(dO ∘ O), laid out [T, n_heads].
        let mut delta = vec![0f32; t * nh];
        delta.par_chunks_mut(nh).enumerate().for_each(|(tok, dl)| {
            for (h, x) in dl.iter_mut().enumerate() {
                let off = tok * qs + h * d;
                *x = dot(&d_o[off..off + d], &o[off..off + d]);
            }
        });
        let delta = &delta;

        // dK, dV: one task per key block.
        let dkc = split_rows(dk, &blocks, ks);
        let dvc = split_rows(dv, &blocks, ks);
        blocks.par_iter().zip(dkc.into_par_iter().zip(dvc)).for_each(|(&(s, c0, c1), (dkb, dvb))| {
            dkb.fill(0.0);
            dvb.fill(0.0);
            let len = blocks_len(cu, s);
            for h in 0..nh {
                let g = h / rep;
                for i in c0..len {
                    let qi = &q[(s + i) * qs + h * d..][..d];
                    let doi = &d_o[(s + i) * qs + h * d..][..d];
                    let (li, di) = (lse[h * t + s + i], delta[(s + i) * nh + h]);
                    for j in c0..c1.min(i + 1) {
                        let kj = &k[(s + j) * ks + g * d..][..d];
                        let vj = &v[(s + j) * ks + g * d..][..d];
                        let p = (scale * dot(qi, kj) - li).exp();
                        let ds = p * (dot(doi, vj) - di);
                        let jj = j - c0;
                        axpy(p, doi, &mut dvb[jj * ks + g * d..][..d]);
                        axpy(scale * ds, qi, &mut dkb[jj * ks + g * d..][..d]);
                    }
                }
            }
        });

        // dQ: one task per query block.
        let dqc = split_rows(dq, &blocks, qs);
        blocks.par_iter().zip(dqc).for_each(|(&(s, r0, r1), dqb)| {
            dqb.fill(0.0);
            for h in 0..nh {
                let g = h / rep;
                for kb in (0..r1).step_by(BLOCK) {
                    let kend = (kb + BLOCK).min(r1);
                    for i in r0.max(kb)..r1 {
                        let qi = &q[(s + i) * qs + h * d..][..d];
                        let doi = &d_o[(s + i) * qs + h * d..][..d];
                        let (li, di) = (lse[h * t + s + i], delta[(s + i) * nh + h]);
                        let acc = &mut dqb[(i - r0) * qs + h * d..][..d];
                        for j in kb..kend.min(i + 1) {
                            let kj = &k[(s + j) * ks + g * d..][..d];
                            let vj = &v[(s + j) * ks + g * d..][..d];
                            let p = (scale * dot(qi, kj) - li).exp();
                            let ds = p * (dot(doi, vj) - di);
                            axpy(scale * ds, kj, acc);
                        }
                    }
                }
            }
        });
    });
}

/// Length of the sequence that starts at token `s` (a start taken from `row_blocks`).
fn blocks_len(cu: &[u32], s: usize) -> usize {
    // Starts are non-decreasing; the last sequence starting at `s` is the non-empty one.
    let b = cu.partition_point(|&x| (x as usize) <= s);
    (cu[b.min(cu.len() - 1)] as usize).saturating_sub(s)
}

/// Decode: `q` `[B, n_new, n_heads, d]`, caches `[n_slots, max_len, n_kv_heads, d]`, batch row
/// b on slot b; `o` like q.
#[allow(clippy::too_many_arguments)]
pub fn decode(
    q: &[f32],
    n_new: usize,
    k_cache: &[f32],
    v_cache: &[f32],
    max_len: usize,
    cache_lens: &[u32],
    dims: Dims,
    scale: f32,
    o: &mut [f32],
) {
    let (nh, d, rep) = (dims.n_heads, dims.head_dim, dims.group());
    let ks = dims.n_kv_heads * d;
    smelt_engine::cpu::pool().install(|| {
        o.par_chunks_mut(d).enumerate().for_each(|(idx, acc)| {
            let h = idx % nh;
            let i = (idx / nh) % n_new;
            let b = idx / (nh * n_new);
            let g = h / rep;
            let nkeys = cache_lens[b] as usize - n_new + i + 1;
            let qi = &q[idx * d..][..d];
            let base = b * max_len;
            let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
            let mut sc = [0f32; BLOCK];
            acc.fill(0.0);
            for kb in (0..nkeys).step_by(BLOCK) {
                let kend = (kb + BLOCK).min(nkeys);
                let mut mx = f32::NEG_INFINITY;
                for j in kb..kend {
                    let x = scale * dot(qi, &k_cache[(base + j) * ks + g * d..][..d]);
                    sc[j - kb] = x;
                    mx = mx.max(x);
                }
                let m_new = m.max(mx);
                let alpha = (m - m_new).exp();
                if alpha != 1.0 {
                    acc.iter_mut().for_each(|x| *x *= alpha);
                    l *= alpha;
                }
                for j in kb..kend {
                    let p = (sc[j - kb] - m_new).exp();
                    l += p;
                    axpy(p, &v_cache[(base + j) * ks + g * d..][..d], acc);
                }
                m = m_new;
            }
            let inv = 1.0 / l;
            acc.iter_mut().for_each(|x| *x *= inv);
        })
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
