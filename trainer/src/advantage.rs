//! Group-relative advantages (ALGORITHMS.md, "GRPO family"; reference/algorithms.md §4.1).
//!
//! Rewards arrive flat, prompt-major: the G outputs of prompt 0, then of prompt 1, and so on.
//! A_i = (R_i − mean of its group) / (std + 1e-6):
//! - `group` (GRPO, the default): std over the output's group;
//! - `batch`: std over the whole batch, centring still per group (TRL's
//!   `scale_rewards="batch"`: `rewards.std()` over all rewards, `rewards - mean_grouped`);
//! - `none`: centring only (Dr. GRPO).
//!
//! The std is the **sample** std (Bessel's n − 1) by default, as in both TRL
//! (`rewards.view(-1, G).std(dim=1)`, `rewards.std()`) and verl (`torch.std`); ALGORITHMS.md
//! does not name the estimator. [`StdEstimator::Population`] is available. The ε is 1e-6 as in
//! ALGORITHMS.md and verl (TRL uses 1e-4). Groups of size 1 get A = 0 (ALGORITHMS.md).
//! Non-finite rewards propagate; the loop should not feed them.

use std::fmt;
use std::str::FromStr;

/// ε added to the std (ALGORITHMS.md, verl).
pub const ADV_EPS: f32 = 1e-6;

/// How centred rewards are scaled (TRL's `scale_rewards`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ScaleRewards {
    /// Divide by the group's std + ε (GRPO).
    #[default]
    Group,
    /// Divide by the whole batch's std + ε.
    Batch,
    /// Do not divide (Dr. GRPO).
    None,
}

impl ScaleRewards {
    pub fn as_str(self) -> &'static str {
        match self {
            ScaleRewards::Group => "group",
            ScaleRewards::Batch => "batch",
            ScaleRewards::None => "none",
        }
    }
}

impl fmt::Display for ScaleRewards {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ScaleRewards {
    type Err = String;

    /// `group`, `batch` or `none` (case-insensitive).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "group" => Ok(ScaleRewards::Group),
            "batch" => Ok(ScaleRewards::Batch),
            "none" => Ok(ScaleRewards::None),
            _ => Err(format!("unknown scale_rewards `{s}` (expected group, batch or none)")),
        }
    }
}

/// Which standard deviation divides the centred rewards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum StdEstimator {
    /// sqrt(Σ(x − x̄)² / (n − 1)), as TRL and verl (`torch.std`). The default.
    #[default]
    Sample,
    /// sqrt(Σ(x − x̄)² / n).
    Population,
}

/// Why advantages could not be computed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AdvantageError {
    #[error("advantages: group size is 0")]
    ZeroGroupSize,
    #[error("advantages: {len} rewards is not a multiple of the group size {group_size}")]
    NotMultiple { len: usize, group_size: usize },
}

impl From<AdvantageError> for smelt_models::Error {
    fn from(e: AdvantageError) -> Self {
        smelt_models::Error::Msg(e.to_string())
    }
}

fn check(len: usize, group_size: usize) -> Result<(), AdvantageError> {
    if group_size == 0 {
        return Err(AdvantageError::ZeroGroupSize);
    }
    if len % group_size != 0 {
        return Err(AdvantageError::NotMultiple { len, group_size });
    }
    Ok(())
}

fn mean(xs: &[f32]) -> f64 {
    xs.iter().map(|&x| x as f64).sum::<f64>() / xs.len() as f64
}

/// The std of `xs` under `est`; 0 for fewer than two values.
fn std_of(xs: &[f32], est: StdEstimator) -> f64 {
    let n = xs.len();
    if n < 2 {
        return 0.0;
    }
    let m = mean(xs);
    let ss: f64 = xs.iter().map(|&x| (x as f64 - m).powi(2)).sum();
    let d = match est {
        StdEstimator::Sample => (n - 1) as f64,
        StdEstimator::Population => n as f64,
    };
    (ss / d).sqrt()
}

/// Advantages with ALGORITHMS.md's defaults: sample std, ε = [`ADV_EPS`].
///
/// `rewards.len()` must be a multiple of `group_size` (> 0). An empty batch gives an empty
/// result.
pub fn advantages(rewards: &[f32], group_size: usize, scale: ScaleRewards) -> Result<Vec<f32>, AdvantageError> {
    advantages_with(rewards, group_size, scale, StdEstimator::Sample, ADV_EPS)
}

/// Advantages with an explicit std estimator and ε.
pub fn advantages_with(
    rewards: &[f32],
    group_size: usize,
    scale: ScaleRewards,
    std: StdEstimator,
    eps: f32,
) -> Result<Vec<f32>, AdvantageError> {
    check(rewards.len(), group_size)?;
    if group_size == 1 {
        return Ok(vec![0.0; rewards.len()]);
    }
    let batch_std = std_of(rewards, std);
    let mut out = Vec::with_capacity(rewards.len());
    for g in rewards.chunks(group_size) {
        let m = mean(g);
        let denom = match scale {
            ScaleRewards::Group => std_of(g, std) + eps as f64,
            ScaleRewards::Batch => batch_std + eps as f64,
            ScaleRewards::None => 1.0,
        };
        out.extend(g.iter().map(|&r| ((r as f64 - m) / denom) as f32));
    }
    Ok(out)
}

/// Relative spread below which a group's rewards count as all equal (ours).
pub const SIGNAL_TOL: f32 = 1e-6;

/// Per group: whether its rewards differ, i.e. it carries a learning signal (DAPO's dynamic
/// sampling keeps only such groups; 0 < #correct < G when the reward is correctness).
///
/// Ours: "equal" means max − min ≤ [`SIGNAL_TOL`]·max(1, |max|, |min|), so float noise in
/// model-based rewards does not count as signal (TRL's `is_std_zero` is likewise an
/// `isclose`); a group holding a non-finite reward has no signal. A trailing partial group is
/// judged like the others; `group_size` 0 gives an empty result. Groups of one have no signal.
pub fn groups_with_signal(rewards: &[f32], group_size: usize) -> Vec<bool> {
    if group_size == 0 {
        return Vec::new();
    }
    rewards
        .chunks(group_size)
        .map(|g| {
            if g.iter().any(|x| !x.is_finite()) {
                return false;
            }
            let lo = g.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = g.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            hi - lo > SIGNAL_TOL * 1f32.max(hi.abs()).max(lo.abs())
        })
        .collect()
}

/// Sets the advantages of every group whose `keep` entry is false to 0 (DRO's no-signal groups,
/// or any group the loop wants to mute). Groups past the end of `keep` are left alone;
/// `group_size` 0 does nothing.
pub fn zero_groups(adv: &mut [f32], group_size: usize, keep: &[bool]) {
    if group_size == 0 {
        return;
    }
    for (g, &k) in adv.chunks_mut(group_size).zip(keep) {
        if !k {
            g.fill(0.0);
        }
    }
}

/// Summary of a set of rewards for logging: mean, population std, min, max, count.
/// All zero for an empty set. Non-finite values are counted in `count` but left out of the
/// statistics (ours, so one NaN does not hide the rest of the log line); `non_finite` says how
/// many there were.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RewardStats {
    pub mean: f32,
    pub std: f32,
    pub min: f32,
    pub max: f32,
    pub count: usize,
    pub non_finite: usize,
}

impl RewardStats {
    pub fn of(xs: &[f32]) -> Self {
        let finite: Vec<f32> = xs.iter().copied().filter(|x| x.is_finite()).collect();
        let mut s = RewardStats { count: xs.len(), non_finite: xs.len() - finite.len(), ..Default::default() };
        if finite.is_empty() {
            return s;
        }
        s.mean = mean(&finite) as f32;
        s.std = std_of(&finite, StdEstimator::Population) as f32;
        s.min = finite.iter().copied().fold(f32::INFINITY, f32::min);
        s.max = finite.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(&x, &y)| (x - y).abs() <= 1e-5 * (1.0 + y.abs()))
    }

    #[test]
    fn scale_names() {
        for s in [ScaleRewards::Group, ScaleRewards::Batch, ScaleRewards::None] {
            assert_eq!(s.to_string().parse::<ScaleRewards>(), Ok(s));
        }
        assert_eq!(" Batch ".parse(), Ok(ScaleRewards::Batch));
        assert!("groups".parse::<ScaleRewards>().is_err());
        assert_eq!(ScaleRewards::default(), ScaleRewards::Group);
        assert_eq!(StdEstimator::default(), StdEstimator::Sample);
    }

    #[test]
    fn group_scaling_sample_std() {
        // Group {1, 0}: mean 0.5, sample std sqrt(0.5) = 0.70711 → ±0.70711.
        // Group {1, 1}: A = 0.
        let a = advantages(&[1.0, 0.0, 1.0, 1.0], 2, ScaleRewards::Group).unwrap();
        let s = 0.5f64 / (0.5f64.sqrt() + 1e-6);
        assert!(close(&a, &[s as f32, -s as f32, 0.0, 0.0]), "{a:?}");
        // LASER scale, G = 4: {1, -0.5, -0.5, -1}: mean -0.25, ss = 1.5625+0.0625+0.0625+0.5625 = 2.25,
        // sample std = sqrt(0.75) = 0.866025.
        let a = advantages(&[1.0, -0.5, -0.5, -1.0], 4, ScaleRewards::Group).unwrap();
        let sd = 0.75f64.sqrt() + 1e-6;
        let want: Vec<f32> = [1.25, -0.25, -0.25, -0.75].iter().map(|x| (x / sd) as f32).collect();
        assert!(close(&a, &want), "{a:?}");
    }

    #[test]
    fn group_scaling_population_std() {
        // {1, 0}: population std 0.5 → ±1 (up to ε).
        let a = advantages_with(&[1.0, 0.0], 2, ScaleRewards::Group, StdEstimator::Population, 0.0).unwrap();
        assert_eq!(a, vec![1.0, -1.0]);
        let a = advantages_with(&[1.0, 0.0], 2, ScaleRewards::Group, StdEstimator::Population, ADV_EPS).unwrap();
        assert!(close(&a, &[0.999998, -0.999998]));
    }

    #[test]
    fn batch_scaling_centres_per_group() {
        // Batch [1, 0, 3, 3]: batch mean 1.75, ss = 0.5625+3.0625+1.5625+1.5625 = 6.75,
        // sample std = sqrt(2.25) = 1.5. Centred per group: [0.5, -0.5, 0, 0].
        let a = advantages(&[1.0, 0.0, 3.0, 3.0], 2, ScaleRewards::Batch).unwrap();
        let d = 1.5f64 + 1e-6;
        assert!(close(&a, &[(0.5 / d) as f32, (-0.5 / d) as f32, 0.0, 0.0]), "{a:?}");
    }

    #[test]
    fn no_scaling_only_centres() {
        let a = advantages(&[1.0, 0.0, 2.0, -0.5, -0.5, -0.5], 3, ScaleRewards::None).unwrap();
        assert!(close(&a, &[0.0, -1.0, 1.0, 0.0, 0.0, 0.0]), "{a:?}");
    }

    #[test]
    fn equal_rewards_and_single_groups() {
        for s in [ScaleRewards::Group, ScaleRewards::Batch, ScaleRewards::None] {
            assert_eq!(advantages(&[0.7, 0.7, 0.7], 3, s).unwrap(), vec![0.0; 3]);
            // Groups of size 1 get 0, whatever the scaling.
            assert_eq!(advantages(&[1.0, -3.0, 2.0], 1, s).unwrap(), vec![0.0; 3]);
            assert_eq!(advantages(&[], 4, s).unwrap(), Vec::<f32>::new());
        }
    }

    #[test]
    fn errors() {
        assert_eq!(
            advantages(&[1.0, 2.0, 3.0], 2, ScaleRewards::Group),
            Err(AdvantageError::NotMultiple { len: 3, group_size: 2 })
        );
        assert_eq!(advantages(&[1.0], 0, ScaleRewards::Group), Err(AdvantageError::ZeroGroupSize));
        assert_eq!(advantages(&[], 0, ScaleRewards::Group), Err(AdvantageError::ZeroGroupSize));
        let e: smelt_models::Error = AdvantageError::NotMultiple { len: 3, group_size: 2 }.into();
        assert_eq!(e.to_string(), "advantages: 3 rewards is not a multiple of the group size 2");
    }

    #[test]
    fn signal_detection() {
        assert_eq!(groups_with_signal(&[1.0, 1.0, 0.0, 1.0, -0.5, -0.5], 2), vec![false, true, false]);
        // Float noise below the tolerance is no signal; a real difference is.
        assert_eq!(groups_with_signal(&[-2.0, -2.0 + 1e-7, -2.0, -2.1], 2), vec![false, true]);
        assert_eq!(groups_with_signal(&[1.0, f32::NAN], 2), vec![false]);
        assert_eq!(groups_with_signal(&[1.0, 2.0, 3.0], 2), vec![true, false]);
        assert_eq!(groups_with_signal(&[5.0], 1), vec![false]);
        assert!(groups_with_signal(&[], 2).is_empty());
        assert!(groups_with_signal(&[1.0, 2.0], 0).is_empty());
    }

    #[test]
    fn zeroing_groups() {
        let mut a = vec![1.0, -1.0, 0.5, -0.5, 2.0, -2.0];
        zero_groups(&mut a, 2, &[true, false]);
        assert_eq!(a, vec![1.0, -1.0, 0.0, 0.0, 2.0, -2.0]);
        zero_groups(&mut a, 0, &[false]);
        assert_eq!(a[0], 1.0);
    }

    #[test]
    fn stats() {
        let s = RewardStats::of(&[1.0, -0.5, -0.5, -1.0]);
        assert_eq!((s.mean, s.min, s.max, s.count, s.non_finite), (-0.25, -1.0, 1.0, 4, 0));
        assert!((s.std - 0.75).abs() < 1e-6, "population std of the LASER example is 0.75");
        assert_eq!(RewardStats::of(&[]), RewardStats::default());
        let s = RewardStats::of(&[2.0, f32::NAN]);
        assert_eq!((s.mean, s.std, s.min, s.max, s.count, s.non_finite), (2.0, 0.0, 2.0, 2.0, 2, 1));
    }
}
