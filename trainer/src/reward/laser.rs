//! LASER, LASER-D and LASER-DE length shaping (ALGORITHMS.md, "LASER, LASER-D, LASER-DE";
//! paper arXiv 2505.15612 §4–5, official code `hkust-nlp/Laser`,
//! `verl/utils/reward_score/length_penalty.py`; reference/algorithms.md §2).
//!
//! - LASER: `R = C + α·1[correct]·1[L ≤ L_T]`, α = 0.5.
//! - LASER-D: the target L_A depends on the prompt's difficulty bucket (from its group's
//!   accuracy) and is re-chosen from monitor rollouts ([`adapt_targets`]).
//! - LASER-DE: as LASER-D, plus +α for an incorrect output longer than its target unless the
//!   output is repetitive ([`RepetitionRule`]: [`is_repetitive`], ours, or
//!   [`is_repetitive_ngram`], the released code's).
//!
//! Bad-format outputs (truncated, no answer) never get a length bonus: the official code only
//! shapes scores of exactly +1 (correct) and −0.5 (incorrect), so they stay at −1.

use std::fmt;
use std::str::FromStr;

use super::correctness::Outcome;

/// α, the length-reward scale; 0.5 in every LASER experiment (never tuned).
pub const LASER_ALPHA: f32 = 0.5;

/// I, the step of the LASER-D candidate grid (paper §5.2, code `interval=1024`).
pub const LASER_D_INTERVAL: usize = 1024;

/// Which length shaping is applied on top of the correctness reward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum LengthShaping {
    #[default]
    None,
    /// One fixed target L_T for every prompt.
    Laser,
    /// Per-difficulty adaptive targets.
    LaserD,
    /// LaserD plus the exploration bonus for long, non-repetitive incorrect outputs.
    LaserDE,
}

impl LengthShaping {
    /// Whether the targets are per difficulty bucket and adapted from monitor rollouts.
    pub fn is_adaptive(self) -> bool {
        matches!(self, LengthShaping::LaserD | LengthShaping::LaserDE)
    }

    /// Whether incorrect outputs need the repetition check.
    pub fn needs_repetition_check(self) -> bool {
        self == LengthShaping::LaserDE
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LengthShaping::None => "none",
            LengthShaping::Laser => "laser",
            LengthShaping::LaserD => "laser-d",
            LengthShaping::LaserDE => "laser-de",
        }
    }
}

impl fmt::Display for LengthShaping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LengthShaping {
    type Err = String;

    /// `none`, `laser`, `laser-d`, `laser-de` (case-insensitive; `_` or nothing may replace `-`).
    fn from_str(s: &str) -> Result<Self, String> {
        let k: String = s.trim().to_ascii_lowercase().chars().filter(|c| *c != '-' && *c != '_').collect();
        match k.as_str() {
            "none" => Ok(LengthShaping::None),
            "laser" => Ok(LengthShaping::Laser),
            "laserd" => Ok(LengthShaping::LaserD),
            "laserde" => Ok(LengthShaping::LaserDE),
            _ => Err(format!("unknown length shaping `{s}` (expected none, laser, laser-d or laser-de)")),
        }
    }
}

/// The length bonus added to the correctness reward (0 or `alpha`).
///
/// - `Laser` / `LaserD`: `alpha` when the output is correct and `len ≤ target` (the boundary
///   L = target earns it: the paper's `1[L ≤ L_T]`).
/// - `LaserDE`: the same, plus `alpha` when the output is [`Outcome::Incorrect`] (a wrong
///   answer, not bad format), `len > target` and not `repetitive` (paper Table 2:
///   α·(1−I(R))·I(L > L_A); code `compute_length_reward_larse_de`).
/// - `None`: 0.
///
/// `target` is L_T for LASER and the bucket's L_A ([`LaserTargets::get`]) for LASER-D/-DE;
/// `len` counts response tokens.
pub fn length_bonus(
    outcome: Outcome,
    len: usize,
    target: usize,
    repetitive: bool,
    alpha: f32,
    mode: LengthShaping,
) -> f32 {
    let within = len <= target;
    match (mode, outcome) {
        (LengthShaping::None, _) | (_, Outcome::BadFormat) => 0.0,
        (_, Outcome::Correct) if within => alpha,
        (LengthShaping::LaserDE, Outcome::Incorrect) if !within && !repetitive => alpha,
        _ => 0.0,
    }
}

/// `base` (the correctness reward) plus [`length_bonus`].
///
/// With LASER's scale and α = 0.5: correct and short 1.5, correct and long 1.0, incorrect
/// −0.5 (LASER-DE: 0.0 when long and not repetitive), bad format −1.0.
pub fn shaped_reward(
    base: f32,
    outcome: Outcome,
    len: usize,
    target: usize,
    repetitive: bool,
    alpha: f32,
    mode: LengthShaping,
) -> f32 {
    base + length_bonus(outcome, len, target, repetitive, alpha, mode)
}

/// A prompt's difficulty bucket, read from its group's accuracy (LASER §5.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Difficulty {
    /// acc ≥ 2/3 (the paper's "high accuracy").
    Easy,
    /// 1/3 ≤ acc < 2/3.
    Medium,
    /// acc < 1/3.
    Hard,
}

impl Difficulty {
    pub const ALL: [Difficulty; 3] = [Difficulty::Easy, Difficulty::Medium, Difficulty::Hard];

    /// The bucket of a group accuracy in [0, 1]: ≥ 2/3 easy, ≥ 1/3 medium, else hard.
    ///
    /// Ours: both thresholds are lowered by 1e-6 so that an accuracy of exactly 2/3 or 1/3
    /// computed in floating point (`2.0 / 3.0` as f32, `4.0 / 6.0`, a sum of f32 ones divided by
    /// 6, …) lands in the higher bucket as the paper's k/3 rule on counts intends. NaN is
    /// hard. Prefer [`Difficulty::from_counts`] when the counts are at hand.
    pub fn from_accuracy(acc: f32) -> Self {
        const TOL: f32 = 1e-6;
        if acc >= 2.0 / 3.0 - TOL {
            Difficulty::Easy
        } else if acc >= 1.0 / 3.0 - TOL {
            Difficulty::Medium
        } else {
            Difficulty::Hard
        }
    }

    /// The bucket of `correct` correct outputs out of `total`, in exact integer arithmetic
    /// (3·correct ≥ 2·total easy, 3·correct ≥ total medium). No outputs → hard.
    pub fn from_counts(correct: usize, total: usize) -> Self {
        if total == 0 {
            return Difficulty::Hard;
        }
        let (c, t) = (correct.min(total) as u128 * 3, total as u128);
        if c >= 2 * t {
            Difficulty::Easy
        } else if c >= t {
            Difficulty::Medium
        } else {
            Difficulty::Hard
        }
    }

    /// |C_d|, the fewest correct outputs (of `k` per prompt) a prompt of this bucket has:
    /// ceil(2k/3), ceil(k/3), 1 for easy, medium, hard (6, 3, 1 at k = 8, ALGORITHMS.md and
    /// the paper's Eq. 3; the code's default `round_method='floor'` gives 5, 2, 1 instead).
    pub fn min_correct(self, k: usize) -> usize {
        match self {
            Difficulty::Easy => (2 * k).div_ceil(3),
            Difficulty::Medium => k.div_ceil(3),
            Difficulty::Hard => 1,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Difficulty::Easy => "easy",
            Difficulty::Medium => "medium",
            Difficulty::Hard => "hard",
        }
    }
}

impl fmt::Display for Difficulty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The length targets of the three difficulty buckets, in response tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LaserTargets {
    pub easy: usize,
    pub medium: usize,
    pub hard: usize,
}

impl LaserTargets {
    /// The same target for every bucket: LASER's fixed L_T, or LASER-D's targets before the
    /// first monitor round.
    pub fn uniform(target: usize) -> Self {
        LaserTargets { easy: target, medium: target, hard: target }
    }

    pub fn get(&self, d: Difficulty) -> usize {
        match d {
            Difficulty::Easy => self.easy,
            Difficulty::Medium => self.medium,
            Difficulty::Hard => self.hard,
        }
    }

    pub fn set(&mut self, d: Difficulty, target: usize) {
        match d {
            Difficulty::Easy => self.easy = target,
            Difficulty::Medium => self.medium = target,
            Difficulty::Hard => self.hard = target,
        }
    }
}

impl fmt::Display for LaserTargets {
    /// `easy=… medium=… hard=…`, for the log line written whenever the targets change.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "easy={} medium={} hard={}", self.easy, self.medium, self.hard)
    }
}

/// One monitor rollout: its length in response tokens and whether it was correct.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MonitorResponse {
    pub len: usize,
    pub correct: bool,
}

/// The LASER-D candidate grid {L_T, L_T+I, …, max_completion_length}.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetSearch {
    /// L_T, the smallest target LASER-D may choose (the lower bound of the search).
    pub lower: usize,
    /// I, the grid step (1024 in the paper). 0 means the grid is just {L_T, max}.
    pub interval: usize,
    /// max_completion_length, the last candidate and the fall-back.
    pub max_len: usize,
}

impl TargetSearch {
    /// The paper's grid: step [`LASER_D_INTERVAL`] from `lower` to `max_len`.
    pub fn new(lower: usize, max_len: usize) -> Self {
        TargetSearch { lower, interval: LASER_D_INTERVAL, max_len }
    }

    /// The candidates in increasing order: L_T, L_T+I, … while below `max_len`, then `max_len`
    /// itself (ours: always the last candidate even when it is off the grid; the code's grid
    /// is `[L_T] + multiples of 1024` when L_T < 1024, ALGORITHMS.md's is L_T + k·I, which we
    /// follow). With L_T ≥ `max_len` the only candidate is `max_len`.
    pub fn candidates(&self) -> Vec<usize> {
        let mut out = Vec::new();
        let mut l = self.lower;
        while l < self.max_len {
            out.push(l);
            if self.interval == 0 {
                break;
            }
            l = match l.checked_add(self.interval) {
                Some(next) => next,
                None => break,
            };
        }
        out.push(self.max_len);
        out
    }
}

/// The smallest candidate l with P_l·|C_d| ≥ 1, where P_l is the fraction of `lens` that are
/// ≤ l; `None` when no candidate qualifies or `lens` is empty.
///
/// Evaluated exactly in integers: count(len ≤ l)·min_correct ≥ lens.len(). `candidates` need
/// not be sorted; the smallest qualifying one is returned.
pub fn choose_target(lens: &[usize], min_correct: usize, candidates: &[usize]) -> Option<usize> {
    if lens.is_empty() {
        return None;
    }
    let mut sorted = lens.to_vec();
    sorted.sort_unstable();
    let n = sorted.len() as u128;
    candidates
        .iter()
        .copied()
        .filter(|&l| {
            let covered = sorted.partition_point(|&x| x <= l) as u128;
            covered * min_correct as u128 >= n
        })
        .min()
}

/// The monitor rollouts sorted into difficulty buckets: the lengths of every response of the
/// bucket's prompts, plus how many prompts each bucket has (for logging).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MonitorBuckets {
    pub easy: Vec<usize>,
    pub medium: Vec<usize>,
    pub hard: Vec<usize>,
    pub prompts: [usize; 3],
}

impl MonitorBuckets {
    pub fn lens(&self, d: Difficulty) -> &[usize] {
        match d {
            Difficulty::Easy => &self.easy,
            Difficulty::Medium => &self.medium,
            Difficulty::Hard => &self.hard,
        }
    }

    /// Number of monitor prompts in bucket `d`.
    pub fn prompt_count(&self, d: Difficulty) -> usize {
        self.prompts[d as usize]
    }
}

/// Buckets the monitor prompts (one `Vec` of K rollouts per prompt) by their accuracy with
/// [`Difficulty::from_counts`]. Prompts without rollouts are skipped.
///
/// Ours: the monitor uses the same thresholds as training (ALGORITHMS.md gives one rule). The
/// official code buckets monitor prompts with acc ≤ 1/3 hard, ≤ 2/3 medium, else easy
/// (`_count_accuracy_bands_metrics`), so a prompt at exactly 2/3 is medium there and easy here.
pub fn bucket_monitor(monitor: &[Vec<MonitorResponse>]) -> MonitorBuckets {
    let mut b = MonitorBuckets::default();
    for prompt in monitor.iter().filter(|p| !p.is_empty()) {
        let correct = prompt.iter().filter(|r| r.correct).count();
        let d = Difficulty::from_counts(correct, prompt.len());
        b.prompts[d as usize] += 1;
        let lens = match d {
            Difficulty::Easy => &mut b.easy,
            Difficulty::Medium => &mut b.medium,
            Difficulty::Hard => &mut b.hard,
        };
        lens.extend(prompt.iter().map(|r| r.len));
    }
    b
}

/// LASER-D's adaptive targets from one monitor round (ALGORITHMS.md; paper §5.2, Eq. 3).
///
/// `monitor` holds K rollouts per monitor prompt; K is taken as the largest number of rollouts
/// of any prompt (the monitor samples the same K for all). For each bucket d the target is the
/// smallest l in [`TargetSearch::candidates`] with P_{l,d}·|C_d| ≥ 1, where
/// - P_{l,d} = the fraction of **all** the bucket's responses (correct or not) with length ≤ l,
///   as ALGORITHMS.md and the official code (`coverage_{level}_accuracy/length_l`) define it;
///   the paper's prose reads as a coverage of correct responses — where they disagree we
///   follow ALGORITHMS.md;
/// - |C_d| = [`Difficulty::min_correct`]`(K)` = ceil(2K/3), ceil(K/3), 1 (ALGORITHMS.md and the
///   paper; the code's default floor rounding gives 5/2/1 at K = 8).
///
/// No qualifying candidate, or no prompt in the bucket → `search.max_len` (ALGORITHMS.md; the
/// code falls back to the longest response of the current batch instead). A caller that
/// prefers to keep the previous target for an empty bucket can check
/// [`MonitorBuckets::prompt_count`] from [`bucket_monitor`].
pub fn adapt_targets(monitor: &[Vec<MonitorResponse>], search: &TargetSearch) -> LaserTargets {
    let k = monitor.iter().map(Vec::len).max().unwrap_or(0);
    let buckets = bucket_monitor(monitor);
    let candidates = search.candidates();
    let mut t = LaserTargets::uniform(search.max_len);
    for d in Difficulty::ALL {
        if let Some(l) = choose_target(buckets.lens(d), d.min_correct(k), &candidates) {
            t.set(d, l);
        }
    }
    t
}

/// The repetition rule of LASER-DE (ours; ALGORITHMS.md asks for "a repeated n-gram detector,
/// n = 2–4" without fixing the rule).
///
/// A token sequence is repetitive when some block of p tokens (1 ≤ p ≤ `max_period`) is
/// repeated back to back so that the periodic stretch (every token equal to the one p before
/// it) covers at least `min_repeats` whole copies of the block **and** at least `min_run`
/// tokens. For p = 2–4 this is ALGORITHMS.md's repeated n-gram; longer periods catch the
/// sentence- and paragraph-level loops that degenerate rollouts usually fall into.
///
/// Why not the official detector by default ([`is_repetitive_ngram`], `laser.repetition =
/// "ngram"`): it flags a sequence when any 4-gram occurs 3 times with two occurrences closer
/// than a third of the length, which almost every long, healthy reasoning trace satisfies
/// ("Let me check …"). Here only back-to-back copies count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RepetitionConfig {
    /// Longest block length (period) considered. Default 256.
    pub max_period: usize,
    /// Fewest back-to-back copies of the block (values below 2 count as 2). Default 3.
    pub min_repeats: usize,
    /// Fewest tokens the repeated stretch must span. Default 32, so a 2-gram must repeat 16
    /// times and a single token 32 times.
    pub min_run: usize,
}

impl Default for RepetitionConfig {
    fn default() -> Self {
        RepetitionConfig { max_period: 256, min_repeats: 3, min_run: 32 }
    }
}

/// Whether `tokens` is repetitive under the default [`RepetitionConfig`].
pub fn is_repetitive(tokens: &[u32]) -> bool {
    is_repetitive_with(tokens, &RepetitionConfig::default())
}

/// Whether `tokens` is repetitive under `cfg`.
pub fn is_repetitive_with(tokens: &[u32], cfg: &RepetitionConfig) -> bool {
    scan_repetition(tokens, cfg, true).is_some()
}

/// Where the earliest repeated stretch starts (the index of its first token), or `None` when
/// the sequence is not repetitive under `cfg`. Useful for logging how much of an output is loop.
pub fn repetition_start(tokens: &[u32], cfg: &RepetitionConfig) -> Option<usize> {
    scan_repetition(tokens, cfg, false)
}

/// Which repetition rule LASER-DE applies (`laser.repetition` in the trainer's config).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RepetitionRule {
    /// Back-to-back copies of a block ([`is_repetitive`]; ours, the default).
    #[default]
    Runs,
    /// The n-gram detector of LASER's released code ([`is_repetitive_ngram`]), for runs that
    /// reproduce the paper.
    Ngram,
}

impl FromStr for RepetitionRule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "runs" => Ok(RepetitionRule::Runs),
            "ngram" => Ok(RepetitionRule::Ngram),
            other => Err(format!("{other:?}: expected runs (ours) or ngram (LASER's released detector)")),
        }
    }
}

impl RepetitionRule {
    /// Whether `tokens` (a response, without its stop token) is repetitive under this rule.
    pub fn is_repetitive(self, tokens: &[u32]) -> bool {
        match self {
            RepetitionRule::Runs => is_repetitive(tokens),
            RepetitionRule::Ngram => is_repetitive_ngram(tokens),
        }
    }
}

/// The rule of LASER's released code (`detect_token_ngram_repetition_optimized_reversed` in
/// `verl/utils/reward_score/compute_unique_tokens.py`, as its length penalty calls it), restated:
///
/// - responses of at most 12 tokens are never repetitive (the caller's n = 6, doubled);
/// - n-grams of n = 2 below 30 tokens, 3 below 100, else 4; an n-gram of one token repeated
///   (n > 2) is skipped;
/// - scanning start positions from the end, a response is repetitive as soon as some n-gram has
///   occurred at least 2 times (responses under 200 tokens) or 3 times, with two consecutive
///   occurrences less than ⌊len/3⌋ apart;
/// - failing that, when len ≥ 4n, it is repetitive if any 2n-gram occurs twice (anywhere).
///
/// It flags most long reasoning traces that revisit a phrase ("Let me check"), which is why it
/// is not the default ([`RepetitionRule`]).
pub fn is_repetitive_ngram(tokens: &[u32]) -> bool {
    use std::collections::{HashMap, HashSet};
    let len = tokens.len();
    if len <= 12 {
        return false;
    }
    let n = if len < 30 {
        2
    } else if len < 100 {
        3
    } else {
        4
    };
    let threshold = if len < 200 { 2 } else { 3 };
    let close = len / 3;
    let mut seen: HashMap<&[u32], Vec<usize>> = HashMap::new();
    for i in (0..=len - n).rev() {
        let gram = &tokens[i..i + n];
        if n > 2 && gram.iter().all(|&t| t == gram[0]) {
            continue;
        }
        let at = seen.entry(gram).or_default();
        // Scanned from the end, so positions arrive in decreasing order.
        at.push(i);
        if at.len() >= threshold && at.windows(2).any(|w| w[0] - w[1] < close) {
            return true;
        }
    }
    if len >= 4 * n {
        let mut patterns: HashSet<&[u32]> = HashSet::new();
        for i in (0..=len - 2 * n).rev() {
            if !patterns.insert(&tokens[i..i + 2 * n]) {
                return true;
            }
        }
    }
    false
}

/// O(len · max_period): for each period p, the length of the current run of positions i with
/// tokens[i] == tokens[i − p]; a run of r such positions is a periodic stretch of r + p tokens.
fn scan_repetition(tokens: &[u32], cfg: &RepetitionConfig, first_hit: bool) -> Option<usize> {
    let n = tokens.len();
    let min_repeats = cfg.min_repeats.max(2);
    let max_p = cfg.max_period.min(n / 2);
    let mut best: Option<usize> = None;
    for p in 1..=max_p {
        let need = p.saturating_mul(min_repeats).max(cfg.min_run);
        if need > n {
            continue;
        }
        let mut run = 0usize;
        for i in p..n {
            if tokens[i] == tokens[i - p] {
                run += 1;
                if run + p >= need {
                    let start = i + 1 - (run + p);
                    if first_hit {
                        return Some(start);
                    }
                    best = Some(best.map_or(start, |b| b.min(start)));
                    break;
                }
            } else {
                run = 0;
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: f32 = LASER_ALPHA;

    #[test]
    fn shaping_table() {
        use LengthShaping::*;
        use Outcome::*;
        // (mode, outcome, len, target, repetitive) → reward with LASER's base scale.
        let base = |o: Outcome| match o {
            Correct => 1.0,
            Incorrect => -0.5,
            BadFormat => -1.0,
        };
        let r = |m, o, len, rep| shaped_reward(base(o), o, len, 100, rep, A, m);
        for m in [Laser, LaserD] {
            assert_eq!(r(m, Correct, 50, false), 1.5);
            assert_eq!(r(m, Correct, 100, false), 1.5, "L == L_T earns the bonus");
            assert_eq!(r(m, Correct, 101, false), 1.0);
            assert_eq!(r(m, Incorrect, 50, false), -0.5);
            assert_eq!(r(m, Incorrect, 101, false), -0.5);
            assert_eq!(r(m, BadFormat, 50, false), -1.0);
        }
        assert_eq!(r(LaserDE, Correct, 100, false), 1.5);
        assert_eq!(r(LaserDE, Correct, 101, false), 1.0);
        assert_eq!(r(LaserDE, Incorrect, 100, false), -0.5, "L == L_A is not longer than the target");
        assert_eq!(r(LaserDE, Incorrect, 101, false), 0.0);
        assert_eq!(r(LaserDE, Incorrect, 101, true), -0.5);
        assert_eq!(r(LaserDE, BadFormat, 5000, false), -1.0);
        assert_eq!(r(LaserDE, BadFormat, 50, false), -1.0);
        for o in [Correct, Incorrect, BadFormat] {
            assert_eq!(r(None, o, 1, false), base(o));
        }
        assert_eq!(length_bonus(Correct, 0, 0, false, 0.25, Laser), 0.25);
    }

    #[test]
    fn shaping_names() {
        for m in [LengthShaping::None, LengthShaping::Laser, LengthShaping::LaserD, LengthShaping::LaserDE] {
            assert_eq!(m.to_string().parse::<LengthShaping>(), Ok(m));
        }
        assert_eq!("LASER_DE".parse(), Ok(LengthShaping::LaserDE));
        assert_eq!("laserd".parse(), Ok(LengthShaping::LaserD));
        assert!("laser-x".parse::<LengthShaping>().is_err());
        assert!("".parse::<LengthShaping>().is_err());
        assert_eq!(LengthShaping::default(), LengthShaping::None);
        assert!(LengthShaping::LaserD.is_adaptive() && !LengthShaping::Laser.is_adaptive());
        assert!(LengthShaping::LaserDE.needs_repetition_check() && !LengthShaping::LaserD.needs_repetition_check());
    }

    #[test]
    fn difficulty_from_accuracy_boundaries() {
        assert_eq!(Difficulty::from_accuracy(1.0), Difficulty::Easy);
        assert_eq!(Difficulty::from_accuracy(2.0 / 3.0), Difficulty::Easy);
        assert_eq!(Difficulty::from_accuracy(4.0 / 6.0), Difficulty::Easy);
        assert_eq!(Difficulty::from_accuracy((2.0f64 / 3.0) as f32), Difficulty::Easy);
        let six_ones: f32 = [1.0f32; 4].iter().sum::<f32>() / 6.0;
        assert_eq!(Difficulty::from_accuracy(six_ones), Difficulty::Easy);
        assert_eq!(Difficulty::from_accuracy(0.66), Difficulty::Medium);
        assert_eq!(Difficulty::from_accuracy(1.0 / 3.0), Difficulty::Medium);
        assert_eq!(Difficulty::from_accuracy(3.0 / 9.0), Difficulty::Medium);
        assert_eq!(Difficulty::from_accuracy(0.5), Difficulty::Medium);
        assert_eq!(Difficulty::from_accuracy(0.33), Difficulty::Hard);
        assert_eq!(Difficulty::from_accuracy(0.0), Difficulty::Hard);
        assert_eq!(Difficulty::from_accuracy(f32::NAN), Difficulty::Hard);
        // K = 8 counts: 6/8 easy, 5/8 medium, 3/8 medium, 2/8 hard.
        for (c, d) in [(8, Difficulty::Easy), (6, Difficulty::Easy), (5, Difficulty::Medium), (3, Difficulty::Medium)] {
            assert_eq!(Difficulty::from_accuracy(c as f32 / 8.0), d, "{c}/8");
        }
        assert_eq!(Difficulty::from_accuracy(2.0 / 8.0), Difficulty::Hard);
    }

    #[test]
    fn difficulty_from_counts() {
        assert_eq!(Difficulty::from_counts(2, 3), Difficulty::Easy);
        assert_eq!(Difficulty::from_counts(4, 6), Difficulty::Easy);
        assert_eq!(Difficulty::from_counts(1, 3), Difficulty::Medium);
        assert_eq!(Difficulty::from_counts(5, 8), Difficulty::Medium);
        assert_eq!(Difficulty::from_counts(3, 8), Difficulty::Medium);
        assert_eq!(Difficulty::from_counts(2, 8), Difficulty::Hard);
        assert_eq!(Difficulty::from_counts(0, 8), Difficulty::Hard);
        assert_eq!(Difficulty::from_counts(0, 0), Difficulty::Hard);
        assert_eq!(Difficulty::from_counts(9, 8), Difficulty::Easy);
        assert_eq!(Difficulty::from_counts(usize::MAX, usize::MAX), Difficulty::Easy);
        for k in 1..=40usize {
            for c in 0..=k {
                assert_eq!(Difficulty::from_counts(c, k), Difficulty::from_accuracy(c as f32 / k as f32), "{c}/{k}");
            }
        }
    }

    #[test]
    fn min_correct_sizes() {
        let sizes = |k| Difficulty::ALL.map(|d| d.min_correct(k));
        assert_eq!(sizes(8), [6, 3, 1]);
        assert_eq!(sizes(16), [11, 6, 1]);
        assert_eq!(sizes(3), [2, 1, 1]);
        assert_eq!(sizes(1), [1, 1, 1]);
        assert_eq!(sizes(0), [0, 0, 1]);
    }

    #[test]
    fn targets_struct() {
        let mut t = LaserTargets::uniform(4096);
        assert_eq!(Difficulty::ALL.map(|d| t.get(d)), [4096; 3]);
        t.set(Difficulty::Medium, 2048);
        assert_eq!(t, LaserTargets { easy: 4096, medium: 2048, hard: 4096 });
        assert_eq!(t.to_string(), "easy=4096 medium=2048 hard=4096");
        assert_eq!(Difficulty::Hard.to_string(), "hard");
    }

    #[test]
    fn candidate_grid() {
        assert_eq!(TargetSearch::new(1024, 4096).candidates(), vec![1024, 2048, 3072, 4096]);
        assert_eq!(TargetSearch::new(1000, 3500).candidates(), vec![1000, 2024, 3048, 3500]);
        assert_eq!(TargetSearch::new(4096, 4096).candidates(), vec![4096]);
        assert_eq!(TargetSearch::new(8192, 4096).candidates(), vec![4096]);
        assert_eq!(TargetSearch { lower: 10, interval: 0, max_len: 30 }.candidates(), vec![10, 30]);
        assert_eq!(TargetSearch { lower: usize::MAX - 1, interval: 5, max_len: usize::MAX }.candidates().len(), 2);
        assert_eq!(TargetSearch { lower: 0, interval: 0, max_len: 0 }.candidates(), vec![0]);
    }

    #[test]
    fn choose_target_counts() {
        let c = [100, 200, 300, 400];
        // 4 responses: lens ≤ 100: 1, ≤ 200: 2, ≤ 300: 3, ≤ 400: 4.
        let lens = [50, 150, 250, 350];
        assert_eq!(choose_target(&lens, 4, &c), Some(100)); // 1·4 ≥ 4
        assert_eq!(choose_target(&lens, 3, &c), Some(200)); // 1·3 < 4, 2·3 ≥ 4
        assert_eq!(choose_target(&lens, 2, &c), Some(200)); // 2·2 ≥ 4
        assert_eq!(choose_target(&lens, 1, &c), Some(400)); // needs all
        assert_eq!(choose_target(&[50, 150, 250, 401], 1, &c), None);
        assert_eq!(choose_target(&[], 1, &c), None);
        assert_eq!(choose_target(&lens, 0, &c), None);
        // Boundary: len == l counts as covered.
        assert_eq!(choose_target(&[200, 200], 1, &c), Some(200));
        // Unsorted candidates.
        assert_eq!(choose_target(&lens, 3, &[400, 200, 300]), Some(200));
    }

    fn prompt(lens_correct: &[(usize, bool)]) -> Vec<MonitorResponse> {
        lens_correct.iter().map(|&(len, correct)| MonitorResponse { len, correct }).collect()
    }

    #[test]
    fn adapt_targets_k3() {
        // K = 3: |C| = 2, 1, 1. Grid 100, 200, 300, 400 (max).
        let search = TargetSearch { lower: 100, interval: 100, max_len: 400 };
        let monitor = vec![
            // easy (2/3): lens 90, 150, 390 → P_100 = 1/3 (·2 < 1), P_200 = 2/3 (·2 ≥ 1) → 200.
            prompt(&[(90, true), (150, true), (390, false)]),
            // medium (1/3): needs P = 1 → all ≤ 300 → 300.
            prompt(&[(120, true), (300, false), (250, false)]),
            // hard (0/3): one response longer than max → no candidate → max.
            prompt(&[(100, false), (200, false), (500, false)]),
            vec![],
        ];
        let b = bucket_monitor(&monitor);
        assert_eq!(b.prompts, [1, 1, 1]);
        assert_eq!(b.prompt_count(Difficulty::Easy), 1);
        assert_eq!(b.lens(Difficulty::Medium), &[120, 300, 250]);
        assert_eq!(adapt_targets(&monitor, &search), LaserTargets { easy: 200, medium: 300, hard: 400 });
    }

    #[test]
    fn adapt_targets_k8_paper_sizes() {
        // K = 8: |C| = 6, 3, 1. Grid 1024..=4096.
        let search = TargetSearch::new(1024, 4096);
        // Easy prompt (6/8 correct): 2 of 8 responses ≤ 1024 → P = 0.25, 0.25·6 = 1.5 ≥ 1 → 1024.
        let easy = prompt(&[
            (500, true),
            (1000, true),
            (1500, true),
            (1600, true),
            (1700, true),
            (1800, true),
            (3000, false),
            (3000, false),
        ]);
        // Medium prompt (3/8): P_1024 = 2/8 → 0.75 < 1; P_2048 = 3/8 → 1.125 ≥ 1 → 2048.
        let medium = prompt(&[
            (100, true),
            (1024, true),
            (2048, true),
            (3000, false),
            (3000, false),
            (3000, false),
            (3000, false),
            (3000, false),
        ]);
        let hard = prompt(&[(100, false); 8]);
        let t = adapt_targets(&[easy.clone(), medium.clone(), hard], &search);
        assert_eq!(t, LaserTargets { easy: 1024, medium: 2048, hard: 1024 });
        // Exactly P·|C| = 1 qualifies: easy with 8 responses, P must be ≥ 1/6 → 2/8 ok, 1/8 not.
        let mut easy1 = easy.clone();
        easy1[1].len = 1500;
        let t = adapt_targets(&[easy1], &search);
        assert_eq!(t.easy, 2048);
        // Empty buckets fall back to max.
        assert_eq!(adapt_targets(&[], &search), LaserTargets::uniform(4096));
        assert_eq!(adapt_targets(&[medium], &search), LaserTargets { easy: 4096, medium: 2048, hard: 4096 });
    }

    fn lcg(n: usize, vocab: u32, mut seed: u64) -> Vec<u32> {
        (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((seed >> 33) % vocab as u64) as u32
            })
            .collect()
    }

    #[test]
    fn laser_released_ngram_rule() {
        // Distinct tokens, then a phrase revisited: flagged by the n-gram rule only.
        let distinct: Vec<u32> = (100..400).collect();
        let mut revisit = distinct.clone();
        for at in [10, 60, 110] {
            revisit[at..at + 4].copy_from_slice(&[1, 2, 3, 4]);
        }
        assert!(!is_repetitive_ngram(&distinct));
        assert!(is_repetitive_ngram(&revisit), "a 4-gram 3 times, 50 tokens apart, in 300 tokens");
        assert!(!is_repetitive(&revisit), "no back-to-back copies");
        // The same three occurrences 120 apart (⌊300/3⌋ = 100 is the limit), no 8-gram twice.
        let mut far = distinct.clone();
        for at in [0, 120, 240] {
            far[at..at + 4].copy_from_slice(&[1, 2, 3, 4]);
        }
        assert!(!is_repetitive_ngram(&far));
        // Under 200 tokens two occurrences suffice.
        let mut twice: Vec<u32> = (100..250).collect();
        for at in [20, 60] {
            twice[at..at + 4].copy_from_slice(&[1, 2, 3, 4]);
        }
        assert!(is_repetitive_ngram(&twice));
        // Up to 12 tokens nothing is repetitive; at 13 a bigram twice, 2 apart, is.
        assert!(!is_repetitive_ngram(&[1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2]));
        assert!(is_repetitive_ngram(&[1, 2, 1, 2, 5, 6, 7, 8, 9, 10, 11, 12, 13]));
        // One token repeated: its 3-grams are skipped, but its 6-grams repeat.
        assert!(is_repetitive_ngram(&[7; 60]));
        // A loop is repetitive under both rules.
        let looped: Vec<u32> = (0..120).map(|i| [5, 6, 7][i % 3]).collect();
        assert!(is_repetitive_ngram(&looped) && is_repetitive(&looped));
        assert_eq!("ngram".parse::<RepetitionRule>(), Ok(RepetitionRule::Ngram));
        assert!(RepetitionRule::Runs.is_repetitive(&looped) && !RepetitionRule::Runs.is_repetitive(&revisit));
        assert!("verl".parse::<RepetitionRule>().unwrap_err().contains("runs"));
    }

    #[test]
    fn repetition_short_and_empty() {
        assert!(!is_repetitive(&[]));
        assert!(!is_repetitive(&[7]));
        assert!(!is_repetitive(&[7, 7]));
        assert!(!is_repetitive(&[1, 2, 1, 2, 1, 2]));
    }

    #[test]
    fn repetition_min_run_boundary() {
        // One token repeated: 31 copies is below min_run = 32, 32 is a loop.
        assert!(!is_repetitive(&[5; 31]));
        assert!(is_repetitive(&[5; 32]));
        // A 2-gram needs 16 copies (32 tokens).
        let two = |k: usize| [3u32, 4].repeat(k);
        assert!(!is_repetitive(&two(15)));
        assert!(is_repetitive(&two(16)));
        // A 4-gram needs 8 copies.
        let four = |k: usize| [1u32, 2, 3, 4].repeat(k);
        assert!(!is_repetitive(&four(7)));
        assert!(is_repetitive(&four(8)));
    }

    #[test]
    fn repetition_long_period_loops() {
        let block = lcg(50, 1000, 1);
        let prefix = lcg(300, 1000, 2);
        let mut three = prefix.clone();
        three.extend(block.repeat(3));
        assert!(is_repetitive(&three));
        assert_eq!(repetition_start(&three, &RepetitionConfig::default()), Some(300));
        let mut two = prefix.clone();
        two.extend(block.repeat(2));
        assert!(!is_repetitive(&two), "2 copies of a sentence are not a loop by default");
        // Loop in the middle, followed by normal text, is still detected.
        let mut mid = prefix.clone();
        mid.extend([9u32, 8, 7].repeat(20));
        mid.extend(lcg(300, 1000, 3));
        assert!(is_repetitive(&mid));
        assert_eq!(repetition_start(&mid, &RepetitionConfig::default()), Some(300));
        // Period longer than max_period is not seen.
        let cfg = RepetitionConfig { max_period: 40, ..Default::default() };
        assert!(!is_repetitive_with(&three, &cfg));
    }

    #[test]
    fn repetition_normal_text_is_not_flagged() {
        for seed in 0..5 {
            assert!(!is_repetitive(&lcg(4000, 5000, seed)), "seed {seed}");
        }
        // "Natural" text: common phrases recur, but never back to back.
        let phrase = [11u32, 12, 13, 14, 15];
        let mut text = Vec::new();
        for (i, chunk) in lcg(2000, 3000, 9).chunks(17).enumerate() {
            text.extend_from_slice(chunk);
            if i % 2 == 0 {
                text.extend_from_slice(&phrase);
            }
        }
        assert!(!is_repetitive(&text));
    }

    #[test]
    fn repetition_config_edges() {
        let cfg = RepetitionConfig { max_period: 4, min_repeats: 0, min_run: 0 };
        // min_repeats < 2 acts as 2: one copy is never a repetition.
        assert!(!is_repetitive_with(&[1, 2, 3], &cfg));
        assert!(is_repetitive_with(&[1, 2, 1, 2], &cfg));
        assert!(is_repetitive_with(&[1, 1], &cfg));
        let none = RepetitionConfig { max_period: 0, min_repeats: 3, min_run: 1 };
        assert!(!is_repetitive_with(&[1; 100], &none));
        assert_eq!(repetition_start(&[1, 2, 3], &RepetitionConfig::default()), None);
    }
}
