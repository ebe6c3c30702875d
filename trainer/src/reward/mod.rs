//! Reward math of the trainer: pure CPU functions over text, token ids and small per-token
//! arrays, with no model code (ALGORITHMS.md is the contract; reference/algorithms.md has the
//! sources).
//!
//! - [`answer`]: reading and comparing final answers.
//! - [`correctness`]: the base correctness reward (+1 / −0.5 / −1, or {1, 0}).
//! - [`laser`]: LASER / LASER-D / LASER-DE length shaping and the repetition detector.
//! - [`pear`]: PEAR's phase-entropy reward.
//! - [`dro`]: DRO's R3 reward, length term and data filter.
//! - [`rubric`]: rubric rewards (weighted criteria, a pluggable judge).
//! - [`overlong_penalty`]: DAPO's soft overlong punishment (here).
//!
//! Group-relative advantages live in [`crate::advantage`].

pub mod answer;
pub mod correctness;
pub mod dro;
pub mod laser;
pub mod pear;
pub mod reflection;
pub mod rubric;

pub use answer::{answer_region, answers_match, extract_answer};
pub use correctness::{judge, CorrectnessConfig, Outcome};
pub use dro::{dro_reward, length_term, r3_rewards, rank_filter_keep, sigma_filter, R3Group, R3Weighting};
pub use laser::{
    adapt_targets, is_repetitive, shaped_reward, Difficulty, LaserTargets, LengthShaping, MonitorResponse, TargetSearch,
};
pub use pear::{pear_reward, phase_entropy};

/// DAPO's soft overlong punishment (DAPO Eq. 13; ALGORITHMS.md, "DAPO extras"), added to the
/// reward: min(0, −(len − (max_len − buffer)) / buffer).
///
/// - 0 while `len ≤ max_len − buffer`;
/// - falls linearly to −1 at `len = max_len`;
/// - −1 beyond `max_len` (the paper's third case; verl's formula keeps falling, but a
///   generation cannot exceed `max_len` there).
///
/// `buffer = 0` means no shaping (0). A `buffer` larger than `max_len` starts the ramp at 0.
/// verl's `penalty_factor` is a multiplication the caller can do.
pub fn overlong_penalty(len: usize, max_len: usize, buffer: usize) -> f32 {
    if buffer == 0 {
        return 0.0;
    }
    let start = max_len.saturating_sub(buffer);
    if len <= start {
        return 0.0;
    }
    (-((len - start) as f64 / buffer as f64)).max(-1.0) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlong_ramp() {
        // DAPO's setting: L_max 20480, buffer 4096 → ramp from 16384.
        assert_eq!(overlong_penalty(0, 20480, 4096), 0.0);
        assert_eq!(overlong_penalty(16384, 20480, 4096), 0.0);
        assert_eq!(overlong_penalty(16385, 20480, 4096), -1.0 / 4096.0);
        assert_eq!(overlong_penalty(18432, 20480, 4096), -0.5);
        assert_eq!(overlong_penalty(20480, 20480, 4096), -1.0);
        assert_eq!(overlong_penalty(30000, 20480, 4096), -1.0);
        // Small numbers.
        assert_eq!(overlong_penalty(9, 10, 4), -0.75);
        assert_eq!(overlong_penalty(6, 10, 4), 0.0);
    }

    #[test]
    fn overlong_edges() {
        assert_eq!(overlong_penalty(100, 10, 0), 0.0);
        // Buffer larger than max_len: ramp from 0 over `buffer` tokens.
        assert_eq!(overlong_penalty(5, 10, 20), -0.25);
        assert_eq!(overlong_penalty(0, 10, 20), 0.0);
        assert_eq!(overlong_penalty(0, 0, 1), 0.0);
        assert_eq!(overlong_penalty(usize::MAX, usize::MAX, 1), -1.0);
    }

    #[test]
    fn end_to_end_laser_de() {
        // A correct short answer, judged and shaped with the re-exported API.
        let cfg = CorrectnessConfig::default();
        let o = judge("x</think>\\boxed{12}", "12", false, &cfg);
        let r = shaped_reward(
            cfg.score(o),
            o,
            900,
            LaserTargets::uniform(1024).get(Difficulty::Easy),
            false,
            0.5,
            LengthShaping::LaserDE,
        );
        assert_eq!(r, 1.5);
    }
}
