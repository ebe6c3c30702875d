//! DRO's Reasoning Reflection Reward (R3) and its data filter (ALGORITHMS.md, "DRO"; paper
//! arXiv 2506.13351 v1 §3–4; reference/algorithms.md §1).
//!
//! For each of the G sampled outputs of a prompt, the loop teacher-forces the reference outcome
//! y after the output's reasoning (up to and including `</think>`) and records
//! ℓ^y_{i,j} = log π(y_j | q, ĉ_i, y_<j). This module turns those G × |y| log-probs into
//! rewards:
//!
//! - σ_j = std over the G outputs of ℓ^y_{i,j} (population std, ours: the paper writes "std"
//!   without a convention; σ only enters through relative weights, where the G/(G−1) factor
//!   cancels except under the softmax weighting);
//! - R3_i = Σ_j w_j·ℓ^y_{i,j}, weights from σ ([`R3Weighting`]);
//! - R = R3 + λ·r_len with r_len = 1 − β·| |y| − |ŷ_i| | / |y| (β = λ = 0.5, ours).
//!
//! If every σ_j is (numerically) 0 the group carries no signal: R3 falls back to the mean token
//! log-prob and the loop must give the whole group zero advantage
//! ([`crate::advantage::zero_groups`]).

use std::collections::HashSet;

/// σ_j at or below this counts as 0 (ours): identical contexts give log-probs equal up to
/// float rounding (~1e-7), while any real effect of the reasoning is orders of magnitude larger.
pub const SIGMA_EPS: f32 = 1e-6;

/// Log-probs are clamped to [LOGP_FLOOR, 0] and a NaN becomes LOGP_FLOOR (ours), so a −∞ from
/// an underflowed probability cannot turn σ and every reward of the group into NaN.
pub const LOGP_FLOOR: f32 = -100.0;

/// β of the length term (ours; the paper gives no value).
pub const DRO_LEN_BETA: f32 = 0.5;
/// λ, the weight of the length term in R = R3 + λ·r_len (ours; the paper gives no value).
pub const DRO_LEN_LAMBDA: f32 = 0.5;

/// How the per-token weights w_j are derived from σ (the paper's w_Δ(σ_j) is only "increasing
/// in σ"; every form here is ours, ALGORITHMS.md lists them).
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum R3Weighting {
    /// w_j = σ_j / Σ_k σ_k (the default).
    #[default]
    Normalized,
    /// w_j = softmax(σ/τ)_j. τ ≤ 0 or non-finite is taken as the limit τ → 0⁺: uniform weights
    /// over the tokens with the largest σ.
    Softmax { tau: f32 },
    /// Uniform weights over the top fraction `q` of tokens by σ: the m = ceil(q·|y|) highest
    /// (at least 1, at most |y|), plus every token tied with the m-th. q ≤ 0 or NaN keeps 1
    /// token; q ≥ 1 keeps all.
    TopQuantile { q: f32 },
}

/// The R3 rewards of one group.
#[derive(Clone, Debug, PartialEq)]
pub struct R3Group {
    /// One reward per output: R3_i when `signal`, else the mean token log-prob.
    pub rewards: Vec<f32>,
    /// False when every σ_j ≤ [`SIGMA_EPS`] (or there are no reference tokens, or fewer than
    /// two outputs): the group's advantages must be 0.
    pub signal: bool,
    /// σ_j per reference token (the common length of the rows).
    pub sigma: Vec<f32>,
    /// w_j per reference token; all zero when there is no signal.
    pub weights: Vec<f32>,
}

impl R3Group {
    /// max_j σ_j, the statistic of the stage-2 filter (0 when there are no tokens).
    pub fn max_sigma(&self) -> f32 {
        max_sigma(&self.sigma)
    }
}

fn clean_logp(x: f32) -> f32 {
    if x.is_nan() {
        LOGP_FLOOR
    } else {
        x.clamp(LOGP_FLOOR, 0.0)
    }
}

/// σ_j: the population std over outputs of each reference token's log-prob.
///
/// Rows should all have |y| entries; ours: ragged rows are cut to the shortest, so a bad row
/// cannot index out of bounds. Values are cleaned as described at [`LOGP_FLOOR`]. Fewer than
/// one row → empty.
pub fn token_sigma(logp_y: &[Vec<f32>]) -> Vec<f32> {
    let n_tok = logp_y.iter().map(Vec::len).min().unwrap_or(0);
    let g = logp_y.len() as f64;
    (0..n_tok)
        .map(|j| {
            let mean = logp_y.iter().map(|r| clean_logp(r[j]) as f64).sum::<f64>() / g;
            let var = logp_y.iter().map(|r| (clean_logp(r[j]) as f64 - mean).powi(2)).sum::<f64>() / g;
            var.sqrt() as f32
        })
        .collect()
}

/// The weights w_j for σ under `w`; they sum to 1 (all zero when σ is empty or all zero
/// under [`R3Weighting::Normalized`]).
pub fn r3_weights(sigma: &[f32], w: R3Weighting) -> Vec<f32> {
    let n = sigma.len();
    if n == 0 {
        return Vec::new();
    }
    let s: Vec<f64> = sigma.iter().map(|&x| if x.is_finite() { x.max(0.0) as f64 } else { 0.0 }).collect();
    let max = s.iter().copied().fold(0.0f64, f64::max);
    let uniform_over = |keep: &dyn Fn(f64) -> bool| -> Vec<f32> {
        let count = s.iter().filter(|&&x| keep(x)).count().max(1);
        s.iter().map(|&x| if keep(x) { (1.0 / count as f64) as f32 } else { 0.0 }).collect()
    };
    match w {
        R3Weighting::Normalized => {
            let total: f64 = s.iter().sum();
            if total <= 0.0 {
                return vec![0.0; n];
            }
            s.iter().map(|&x| (x / total) as f32).collect()
        }
        R3Weighting::Softmax { tau } if tau.is_finite() && tau > 0.0 => {
            let e: Vec<f64> = s.iter().map(|&x| ((x - max) / tau as f64).exp()).collect();
            let total: f64 = e.iter().sum();
            e.iter().map(|&x| (x / total) as f32).collect()
        }
        R3Weighting::Softmax { .. } => uniform_over(&|x| x == max),
        R3Weighting::TopQuantile { q } => {
            let m = frac_count(q, n, Rounding::Ceil).clamp(1, n);
            let mut sorted = s.clone();
            sorted.sort_unstable_by(|a, b| b.total_cmp(a));
            let threshold = sorted[m - 1];
            uniform_over(&|x| x >= threshold)
        }
    }
}

/// R3 for one group: `logp_y` holds G rows (outputs) of |y| reference-token log-probs.
///
/// With signal, R3_i = Σ_j w_j·ℓ^y_{i,j} (a weighted mean log-prob, since Σ w = 1). Without
/// (every σ_j ≤ [`SIGMA_EPS`], which includes G ≤ 1 and |y| = 0), `rewards` holds each
/// output's mean token log-prob (0 for an empty row) and `signal` is false
/// (ALGORITHMS.md: "R3 = mean token log-prob, and the group's advantages are 0").
pub fn r3_rewards(logp_y: &[Vec<f32>], w: R3Weighting) -> R3Group {
    let sigma = token_sigma(logp_y);
    let n_tok = sigma.len();
    let signal = sigma.iter().any(|&s| s > SIGMA_EPS);
    if !signal {
        let rewards = logp_y
            .iter()
            .map(|r| {
                if r.is_empty() {
                    0.0
                } else {
                    (r.iter().map(|&x| clean_logp(x) as f64).sum::<f64>() / r.len() as f64) as f32
                }
            })
            .collect();
        return R3Group { rewards, signal, weights: vec![0.0; n_tok], sigma };
    }
    let weights = r3_weights(&sigma, w);
    let rewards = logp_y
        .iter()
        .map(|r| r.iter().zip(&weights).map(|(&x, &wj)| wj as f64 * clean_logp(x) as f64).sum::<f64>() as f32)
        .collect();
    R3Group { rewards, signal, sigma, weights }
}

/// The masked-reasoning baseline's share of R3 for one group: Σ_j w_j·ℓ^base_j with the
/// group's weights, or the mean of ℓ^base without signal (as R3 is then the mean log-prob), so
/// R3_i − shift = the weighted (or mean) gain Σ_j w_j·(ℓ^y_{i,j} − ℓ^base_j) of the reasoning.
/// `base` holds y's |y| log-probs teacher-forced without reasoning.
pub fn baseline_shift(group: &R3Group, base: &[f32]) -> f32 {
    if base.is_empty() {
        return 0.0;
    }
    if group.signal {
        group.weights.iter().zip(base).map(|(&w, &b)| w as f64 * clean_logp(b) as f64).sum::<f64>() as f32
    } else {
        (base.iter().map(|&b| clean_logp(b) as f64).sum::<f64>() / base.len() as f64) as f32
    }
}

/// DRO's outcome-length term r_len = 1 − β·| |y| − |ŷ| | / |y| (paper §3, "Outcome length
/// penalty"; β = 0.5 is ours, [`DRO_LEN_BETA`]).
///
/// `ref_len` = |y| and `pred_len` = |ŷ_i| are token counts of the reference outcome and of the
/// output's own answer (after `</think>`). Not clipped below (the paper gives no clip): an
/// answer 3× the reference length with β = 0.5 scores 0. Ours: `ref_len` = 0 is treated as 1.
pub fn length_term(ref_len: usize, pred_len: usize, beta: f32) -> f32 {
    let r = ref_len.max(1) as f64;
    (1.0 - beta as f64 * (ref_len as f64 - pred_len as f64).abs() / r) as f32
}

/// R = R3 + λ·r_len (λ = 0.5 is ours, [`DRO_LEN_LAMBDA`]).
pub fn dro_reward(r3: f32, r_len: f32, lambda: f32) -> f32 {
    r3 + lambda * r_len
}

/// DRO's reward settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DroConfig {
    pub weighting: R3Weighting,
    /// β of [`length_term`].
    pub beta: f32,
    /// λ of [`dro_reward`].
    pub lambda: f32,
}

impl Default for DroConfig {
    fn default() -> Self {
        DroConfig { weighting: R3Weighting::Normalized, beta: DRO_LEN_BETA, lambda: DRO_LEN_LAMBDA }
    }
}

impl DroConfig {
    /// The full DRO rewards of a group: R3 (or the no-signal fall-back) plus λ·r_len, where
    /// `pred_lens[i]` is output i's answer length in tokens (missing entries count as 0) and
    /// the reference length is the common row length of `logp_y`. `signal` and `sigma` are as
    /// in [`r3_rewards`].
    pub fn group_rewards(&self, logp_y: &[Vec<f32>], pred_lens: &[usize]) -> R3Group {
        let mut g = r3_rewards(logp_y, self.weighting);
        let ref_len = g.sigma.len();
        for (i, r) in g.rewards.iter_mut().enumerate() {
            let pred = pred_lens.get(i).copied().unwrap_or(0);
            *r = dro_reward(*r, length_term(ref_len, pred, self.beta), self.lambda);
        }
        g
    }
}

/// max_j σ_j (0 when empty; non-finite entries ignored).
pub fn max_sigma(sigma: &[f32]) -> f32 {
    sigma.iter().copied().filter(|x| x.is_finite()).fold(0.0f32, f32::max)
}

#[derive(Clone, Copy)]
enum Rounding {
    Floor,
    Ceil,
    Round,
}

/// frac·n rounded, computed so that fractions written in decimal (0.1, 0.2, 0.7) give the
/// decimal answer despite their binary f32 representation: frac is first rounded to 6
/// decimals. Clamped to [0, n].
/// NaN and fractions ≤ 0 give 0; fractions above 1 count as 1.
fn frac_count(frac: f32, n: usize, mode: Rounding) -> usize {
    if frac.is_nan() || frac <= 0.0 {
        return 0;
    }
    let f = ((frac.min(1.0) as f64) * 1e6).round() / 1e6;
    let x = f * n as f64;
    let c = match mode {
        Rounding::Floor => (x + 1e-9).floor(),
        Rounding::Ceil => (x - 1e-9).ceil(),
        Rounding::Round => (x + 1e-9).round(),
    };
    (c.max(0.0) as usize).min(n)
}

/// The mean of the worst (highest) `worst_frac` of one output's reference-token ranks.
///
/// Rank 1 = the reference token is the arg-max. The worst set has ceil(worst_frac·|y|) tokens,
/// at least 1 (ours: "the worst 10 %" of a 5-token answer is its single worst token). `None`
/// for an empty row.
pub fn mean_worst_rank(ranks: &[u32], worst_frac: f32) -> Option<f32> {
    let n = ranks.len();
    if n == 0 {
        return None;
    }
    let m = frac_count(worst_frac, n, Rounding::Ceil).clamp(1, n);
    let mut sorted = ranks.to_vec();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    Some((sorted[..m].iter().map(|&r| r as f64).sum::<f64>() / m as f64) as f32)
}

/// Stage 1 of DRO's R3 data filter (paper §4.2.2): keep a prompt when at least one of its
/// sampled outputs has [`mean_worst_rank`] ≤ `k` — the reference is within the model's reach
/// for some reasoning. `ranks` holds one row of reference-token ranks per sampled output.
/// Defaults (ours, ALGORITHMS.md): k = 10, worst_frac = 0.1.
///
/// Ours: rows without tokens are ignored; a prompt with no non-empty row (no outputs, or an
/// empty reference) is dropped.
pub fn rank_filter_keep(ranks: &[Vec<u32>], k: u32, worst_frac: f32) -> bool {
    ranks.iter().filter_map(|r| mean_worst_rank(r, worst_frac)).any(|m| m <= k as f32)
}

/// Stage 2 of DRO's R3 data filter: given max_j σ_j of each surviving prompt, drop the
/// `drop_frac` (ALGORITHMS.md: 0.2) with the lowest values — the prompts whose reasoning barely
/// changes the reference likelihood. Returns a keep-mask in input order.
///
/// Ours: the number dropped is floor(drop_frac·n) (never more than the fraction; nothing is
/// dropped from fewer than 5 prompts at 0.2); NaN counts as the lowest value; among equal
/// values the later index is dropped first, so the result is deterministic.
pub fn sigma_filter(max_sigma: &[f32], drop_frac: f32) -> Vec<bool> {
    let n = max_sigma.len();
    let drop = frac_count(drop_frac, n, Rounding::Floor);
    let key = |i: usize| if max_sigma[i].is_nan() { f32::NEG_INFINITY } else { max_sigma[i] };
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| key(a).total_cmp(&key(b)).then(b.cmp(&a)));
    let mut keep = vec![true; n];
    for &i in &order[..drop] {
        keep[i] = false;
    }
    keep
}

/// The carry-over step of a filter round (paper §4.2.2: "each round carries forward 10 % of the
/// previous training set"): returns `new_set` followed by round(`frac`·|previous|) prompts of
/// `previous` that are not already in `new_set`, taken in `previous`'s order.
///
/// The loop decides which ones by the order it passes (shuffle `previous` with its seeded RNG
/// first for a random 10 %); this function is deterministic. If too few prompts of `previous`
/// are missing from `new_set`, all of those are carried. Duplicates in `previous` are taken once.
pub fn carry_over(new_set: &[usize], previous: &[usize], frac: f32) -> Vec<usize> {
    let quota = frac_count(frac, previous.len(), Rounding::Round);
    let mut seen: HashSet<usize> = new_set.iter().copied().collect();
    let mut out = new_set.to_vec();
    for &p in previous {
        if out.len() - new_set.len() >= quota {
            break;
        }
        if seen.insert(p) {
            out.push(p);
        }
    }
    out
}

/// The prompt set after a filter round: the survivors `new_set` with the carry-over from
/// `previous` ([`carry_over`]), or `None` (keep the set as it is) when no prompt survived —
/// carrying over alone would shrink the set to `frac` of itself each round a weak model fails
/// every prompt.
pub fn next_active(new_set: &[usize], previous: &[usize], frac: f32) -> Option<Vec<usize>> {
    if new_set.is_empty() {
        return None;
    }
    Some(carry_over(new_set, previous, frac))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// R3 minus the baseline shift equals R3 computed on ℓ^y − ℓ^base, with and without signal.
    #[test]
    fn baseline_shift_is_r3_of_the_difference() {
        let base = [-2.0f32, -0.5, -1.25];
        let rows = vec![vec![-1.0f32, -0.2, -3.0], vec![-0.4, -0.9, -1.0], vec![-2.5, -0.1, -0.7]];
        let flat = vec![vec![-1.0f32, -0.2, -3.0]; 3];
        for (logp, w) in [(rows, R3Weighting::Normalized), (flat, R3Weighting::Normalized)] {
            let g = r3_rewards(&logp, w);
            let diff: Vec<Vec<f32>> = logp.iter().map(|r| r.iter().zip(&base).map(|(a, b)| a - b).collect()).collect();
            let shift = baseline_shift(&g, &base);
            for (i, r) in logp.iter().enumerate() {
                // With signal the weights depend on σ, which the shift leaves alone.
                let want: f32 = if g.signal {
                    g.weights.iter().zip(&diff[i]).map(|(w, d)| w * d).sum()
                } else {
                    diff[i].iter().sum::<f32>() / r.len() as f32
                };
                assert!(close(g.rewards[i] - shift, want), "row {i}: {} vs {want}", g.rewards[i] - shift);
            }
        }
        assert_eq!(baseline_shift(&r3_rewards(&[vec![], vec![]], R3Weighting::Normalized), &[]), 0.0);
    }

    #[test]
    fn a_round_without_survivors_keeps_the_set() {
        let previous: Vec<usize> = (0..100).collect();
        assert_eq!(next_active(&[], &previous, 0.1), None);
        let next = next_active(&[200, 3], &previous, 0.1).unwrap();
        assert_eq!(next.len(), 12);
        assert_eq!(&next[..2], &[200, 3]);
    }

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() <= 1e-6 * (1.0 + b.abs())
    }

    fn all_close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(&x, &y)| close(x, y))
    }

    #[test]
    fn sigma_population_std() {
        // Token 0: {-1, -3} → mean -2, pop std 1. Token 1: {-2, -2} → 0.
        let l = vec![vec![-1.0, -2.0], vec![-3.0, -2.0]];
        assert!(all_close(&token_sigma(&l), &[1.0, 0.0]));
        // Three outputs: {0, -1, -2}: var = 2/3.
        let l = vec![vec![0.0], vec![-1.0], vec![-2.0]];
        assert!(all_close(&token_sigma(&l), &[(2.0f32 / 3.0).sqrt()]));
        assert!(token_sigma(&[]).is_empty());
        assert_eq!(token_sigma(&[vec![-1.0, -2.0]]), vec![0.0, 0.0]);
        // Ragged rows are cut to the shortest.
        assert_eq!(token_sigma(&[vec![-1.0, -2.0], vec![-3.0]]).len(), 1);
    }

    #[test]
    fn r3_normalized() {
        // σ = [1, 0, 3] → w = [0.25, 0, 0.75].
        let l = vec![vec![-1.0, -5.0, 0.0], vec![-3.0, -5.0, -6.0]];
        let g = r3_rewards(&l, R3Weighting::Normalized);
        assert!(g.signal);
        assert!(all_close(&g.sigma, &[1.0, 0.0, 3.0]));
        assert!(all_close(&g.weights, &[0.25, 0.0, 0.75]));
        // R3_0 = 0.25·-1 + 0 + 0.75·0 = -0.25; R3_1 = 0.25·-3 + 0.75·-6 = -5.25.
        assert!(all_close(&g.rewards, &[-0.25, -5.25]));
        assert_eq!(g.max_sigma(), 3.0);
    }

    #[test]
    fn r3_no_signal_falls_back_to_mean_logprob() {
        let l = vec![vec![-1.0, -3.0], vec![-1.0, -3.0], vec![-1.0, -3.0]];
        let g = r3_rewards(&l, R3Weighting::Normalized);
        assert!(!g.signal);
        assert_eq!(g.rewards, vec![-2.0, -2.0, -2.0]);
        assert_eq!(g.weights, vec![0.0, 0.0]);
        // Below-epsilon noise is no signal.
        let l = vec![vec![-1.0, -3.0], vec![-1.0 + 1e-7, -3.0]];
        assert!(!r3_rewards(&l, R3Weighting::Normalized).signal);
        // One output, or no reference tokens, or no outputs.
        let g = r3_rewards(&[vec![-1.0, -2.0]], R3Weighting::Normalized);
        assert!(!g.signal);
        assert_eq!(g.rewards, vec![-1.5]);
        let g = r3_rewards(&[vec![], vec![]], R3Weighting::Normalized);
        assert_eq!((g.rewards, g.signal, g.sigma.len()), (vec![0.0, 0.0], false, 0));
        let g = r3_rewards(&[], R3Weighting::Normalized);
        assert!(g.rewards.is_empty() && !g.signal);
    }

    #[test]
    fn r3_cleans_non_finite() {
        let l = vec![vec![f32::NEG_INFINITY, -1.0], vec![f32::NAN, -1.0], vec![0.5, -1.0]];
        let g = r3_rewards(&l, R3Weighting::Normalized);
        assert!(g.rewards.iter().all(|r| r.is_finite()));
        assert!(g.signal);
        // Token 0 becomes {-100, -100, 0}; only it has σ > 0, so w = [1, 0].
        assert!(all_close(&g.rewards, &[-100.0, -100.0, 0.0]));
    }

    #[test]
    fn weights_softmax() {
        let s = [0.0, (2.0f32).ln()];
        // τ = 1: softmax([0, ln 2]) = [1/3, 2/3].
        assert!(all_close(&r3_weights(&s, R3Weighting::Softmax { tau: 1.0 }), &[1.0 / 3.0, 2.0 / 3.0]));
        // τ → 0: all weight on the max; ties split.
        assert_eq!(r3_weights(&s, R3Weighting::Softmax { tau: 0.0 }), vec![0.0, 1.0]);
        assert_eq!(r3_weights(&[2.0, 1.0, 2.0], R3Weighting::Softmax { tau: -1.0 }), vec![0.5, 0.0, 0.5]);
        assert_eq!(r3_weights(&[2.0, 1.0], R3Weighting::Softmax { tau: f32::NAN }), vec![1.0, 0.0]);
        // Large σ/τ does not overflow.
        let w = r3_weights(&[1000.0, 0.0], R3Weighting::Softmax { tau: 1e-3 });
        assert!(all_close(&w, &[1.0, 0.0]));
    }

    #[test]
    fn weights_top_quantile() {
        let s = [0.1, 0.5, 0.3, 0.9, 0.2];
        // q = 0.4 of 5 tokens → 2 tokens (0.9, 0.5).
        assert_eq!(r3_weights(&s, R3Weighting::TopQuantile { q: 0.4 }), vec![0.0, 0.5, 0.0, 0.5, 0.0]);
        // q = 0.3 → ceil(1.5) = 2.
        assert_eq!(r3_weights(&s, R3Weighting::TopQuantile { q: 0.3 }), vec![0.0, 0.5, 0.0, 0.5, 0.0]);
        // q = 0.2 → exactly 1 (despite 0.2 not being exact in binary).
        assert_eq!(r3_weights(&s, R3Weighting::TopQuantile { q: 0.2 }), vec![0.0, 0.0, 0.0, 1.0, 0.0]);
        assert_eq!(r3_weights(&s, R3Weighting::TopQuantile { q: 0.0 }), vec![0.0, 0.0, 0.0, 1.0, 0.0]);
        assert_eq!(r3_weights(&s, R3Weighting::TopQuantile { q: f32::NAN }), vec![0.0, 0.0, 0.0, 1.0, 0.0]);
        assert_eq!(r3_weights(&s, R3Weighting::TopQuantile { q: 5.0 }), vec![0.2; 5]);
        // Ties at the threshold are all kept.
        assert_eq!(r3_weights(&[1.0, 2.0, 2.0, 0.0], R3Weighting::TopQuantile { q: 0.25 }), vec![0.0, 0.5, 0.5, 0.0]);
        assert!(r3_weights(&[], R3Weighting::TopQuantile { q: 0.5 }).is_empty());
    }

    #[test]
    fn weights_normalized_edges() {
        assert_eq!(r3_weights(&[0.0, 0.0], R3Weighting::Normalized), vec![0.0, 0.0]);
        assert_eq!(r3_weights(&[1.0, f32::NAN, 3.0], R3Weighting::Normalized), vec![0.25, 0.0, 0.75]);
        assert_eq!(R3Weighting::default(), R3Weighting::Normalized);
    }

    #[test]
    fn length_term_values() {
        assert_eq!(length_term(10, 10, 0.5), 1.0);
        assert_eq!(length_term(10, 20, 0.5), 0.5);
        assert_eq!(length_term(10, 0, 0.5), 0.5);
        assert_eq!(length_term(10, 30, 0.5), 0.0);
        assert_eq!(length_term(10, 50, 0.5), -1.0);
        assert_eq!(length_term(4, 5, 1.0), 0.75);
        assert_eq!(length_term(0, 0, 0.5), 1.0);
        assert_eq!(length_term(0, 2, 0.5), 0.0);
        assert_eq!(dro_reward(-2.0, 0.5, 0.5), -1.75);
        assert_eq!(dro_reward(-2.0, 0.5, 0.0), -2.0);
    }

    #[test]
    fn group_rewards_combines() {
        let cfg = DroConfig::default();
        assert_eq!((cfg.beta, cfg.lambda, cfg.weighting), (0.5, 0.5, R3Weighting::Normalized));
        // |y| = 2; σ = [1, 0] → w = [1, 0]; R3 = [-1, -3].
        let l = vec![vec![-1.0, -2.0], vec![-3.0, -2.0]];
        // pred lens 2 and 4: r_len = 1 and 1 − 0.5·2/2 = 0.5.
        let g = cfg.group_rewards(&l, &[2, 4]);
        assert!(g.signal);
        assert!(all_close(&g.rewards, &[-1.0 + 0.5, -3.0 + 0.25]));
        // Missing length counts as 0: r_len = 0.5.
        let g = cfg.group_rewards(&l, &[2]);
        assert!(close(g.rewards[1], -3.0 + 0.25));
    }

    #[test]
    fn worst_rank_means() {
        // 10 tokens, worst 10 % = 1 token: the max.
        let r: Vec<u32> = (1..=10).collect();
        assert_eq!(mean_worst_rank(&r, 0.1), Some(10.0));
        // 20 % = 2 tokens: (10 + 9)/2.
        assert_eq!(mean_worst_rank(&r, 0.2), Some(9.5));
        // 3 tokens at 10 %: ceil(0.3) = 1 → still at least the single worst.
        assert_eq!(mean_worst_rank(&[1, 50, 2], 0.1), Some(50.0));
        // 30 tokens at 10 % = exactly 3 (0.1 is not exact in binary).
        let r: Vec<u32> = (1..=30).collect();
        assert_eq!(mean_worst_rank(&r, 0.1), Some(29.0));
        assert_eq!(mean_worst_rank(&r, 1.0), Some(15.5));
        assert_eq!(mean_worst_rank(&r, 0.0), Some(30.0));
        assert_eq!(mean_worst_rank(&r, f32::NAN), Some(30.0));
        assert_eq!(mean_worst_rank(&[7], 0.1), Some(7.0));
        assert_eq!(mean_worst_rank(&[], 0.1), None);
        assert_eq!(mean_worst_rank(&[u32::MAX, u32::MAX], 1.0), Some(u32::MAX as f32));
    }

    #[test]
    fn rank_filter() {
        // Output 0: worst token rank 50 → 50 > 10; output 1: worst 10 → keep (boundary).
        assert!(rank_filter_keep(&[vec![1, 50, 1], vec![1, 10, 2]], 10, 0.1));
        assert!(!rank_filter_keep(&[vec![1, 50, 1], vec![1, 11, 2]], 10, 0.1));
        // Mean over the worst set: 20 tokens at 10 % → 2 worst (12, 8) → 10 ≤ 10.
        let mut r = vec![1u32; 18];
        r.extend([12, 8]);
        assert!(rank_filter_keep(&[r.clone()], 10, 0.1));
        r[0] = 13;
        assert!(!rank_filter_keep(&[r], 10, 0.1));
        assert!(!rank_filter_keep(&[], 10, 0.1));
        assert!(!rank_filter_keep(&[vec![], vec![]], 10, 0.1));
        assert!(rank_filter_keep(&[vec![], vec![1]], 10, 0.1));
    }

    #[test]
    fn sigma_filter_drops_lowest() {
        // 5 prompts at 20 % → drop 1: the lowest (index 3).
        assert_eq!(sigma_filter(&[0.5, 0.9, 0.3, 0.1, 0.7], 0.2), vec![true, true, true, false, true]);
        // 10 prompts → drop 2.
        let s: Vec<f32> = (0..10).map(|i| i as f32).collect();
        let keep = sigma_filter(&s, 0.2);
        assert_eq!(keep.iter().filter(|k| !**k).count(), 2);
        assert!(!keep[0] && !keep[1]);
        // 0.7 of 10 = 7 exactly (not 6).
        assert_eq!(sigma_filter(&s, 0.7).iter().filter(|k| !**k).count(), 7);
        // 4 prompts at 20 % → floor(0.8) = 0.
        assert_eq!(sigma_filter(&[1.0, 2.0, 3.0, 4.0], 0.2), vec![true; 4]);
        // Ties: the later index goes first.
        assert_eq!(sigma_filter(&[1.0, 1.0, 1.0, 2.0, 3.0], 0.4), vec![true, false, false, true, true]);
        // NaN is lowest.
        assert_eq!(sigma_filter(&[1.0, f32::NAN, 0.5, 2.0, 3.0], 0.2), vec![true, false, true, true, true]);
        assert!(sigma_filter(&[], 0.2).is_empty());
        assert_eq!(sigma_filter(&[1.0, 2.0], 1.5), vec![false, false]);
        assert_eq!(sigma_filter(&[1.0, 2.0], -1.0), vec![true, true]);
        assert_eq!(sigma_filter(&[1.0, 2.0], f32::NAN), vec![true, true]);
    }

    #[test]
    fn carry_over_previous() {
        let prev: Vec<usize> = (100..120).collect();
        // 10 % of 20 = 2, taken in order.
        assert_eq!(carry_over(&[1, 2], &prev, 0.1), vec![1, 2, 100, 101]);
        // Already-present prompts are skipped and the quota still filled.
        assert_eq!(carry_over(&[100, 5], &prev, 0.1), vec![100, 5, 101, 102]);
        // Rounding: 10 % of 5 = 0.5 → 1; of 4 = 0.4 → 0.
        assert_eq!(carry_over(&[], &[7, 8, 9, 10, 11], 0.1), vec![7]);
        assert_eq!(carry_over(&[], &[7, 8, 9, 10], 0.1), Vec::<usize>::new());
        // Not enough missing prompts: carry what there is.
        assert_eq!(carry_over(&[7, 8], &[7, 8, 9], 1.0), vec![7, 8, 9]);
        assert_eq!(carry_over(&[1], &[2, 2, 3], 1.0), vec![1, 2, 3]);
        assert_eq!(carry_over(&[1], &[], 0.1), vec![1]);
        assert_eq!(carry_over(&[1], &[2], f32::NAN), vec![1]);
    }
}
