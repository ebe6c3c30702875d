//! PEAR, the Phase Entropy Aware Reward (ALGORITHMS.md, "PEAR (phase entropy)"; paper
//! arXiv 2510.08026, Eqs. 5–7; reference/algorithms.md §3).
//!
//! The response is split at its first `</think>` token k. The reward of a correct output is
//! min(1, s − max(0, H̄_think − α·H̄_answer)) with s = 1, α = 1; an incorrect output gets the
//! format score (0). H_t is the full-distribution entropy (nats) under the sampling policy at
//! the rollout temperature; it carries no gradient. There is no lower clip.

/// Index of the first occurrence of token `id` in `tokens` (e.g. the `</think>` id: 151668 in
/// Qwen3, 151649 in R1-Distill-Qwen — read it from the tokenizer, do not hard-code it).
pub fn find_token(tokens: &[u32], id: u32) -> Option<usize> {
    tokens.iter().position(|&t| t == id)
}

/// (H̄_think, H̄_answer): the mean entropy of the thinking and answer phases (paper Eq. 6).
///
/// `entropy[t]` is H_t of response token t; `think_end` is the index k of the first
/// `</think>` token ([`find_token`]). H̄_think averages t < k and H̄_answer averages t > k; the
/// `</think>` token itself is in neither. `None`, or a k at or past the end of `entropy`,
/// means everything is thinking and H̄_answer = 0 (paper, confirmed in the OpenReview answer
/// "k = T and H_answer = 0"). An empty phase has mean 0.
///
/// Ours: non-finite entries are left out of the means (so one bad value cannot turn the reward
/// into NaN); sums are taken in f64.
pub fn phase_entropy(entropy: &[f32], think_end: Option<usize>) -> (f32, f32) {
    let k = think_end.unwrap_or(entropy.len()).min(entropy.len());
    let think = &entropy[..k];
    let answer = entropy.get(k + 1..).unwrap_or(&[]);
    (finite_mean(think), finite_mean(answer))
}

fn finite_mean(xs: &[f32]) -> f32 {
    let (sum, n) = xs.iter().filter(|x| x.is_finite()).fold((0.0f64, 0usize), |(s, n), &x| (s + x as f64, n + 1));
    if n == 0 {
        0.0
    } else {
        (sum / n as f64) as f32
    }
}

/// PEAR's reward (paper Eq. 7): for a correct output
/// min(1, s − max(0, h_think − alpha·h_answer)); otherwise `format_score`.
///
/// Incorrect outputs get no entropy penalty. With s = 1 the `min(1, ·)` is a no-op; the reward
/// can go below 0 when the penalty exceeds s (no lower clip, as ALGORITHMS.md says). A NaN
/// penalty counts as 0 (`f32::max` ignores NaN).
pub fn pear_reward(correct: bool, h_think: f32, h_answer: f32, s: f32, alpha: f32, format_score: f32) -> f32 {
    if !correct {
        return format_score;
    }
    let penalty = (h_think - alpha * h_answer).max(0.0);
    (s - penalty).min(1.0)
}

/// PEAR's constants, defaulting to the paper's s = 1, α = 1, format score 0.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PearConfig {
    pub s: f32,
    pub alpha: f32,
    pub format_score: f32,
}

impl Default for PearConfig {
    fn default() -> Self {
        PearConfig { s: 1.0, alpha: 1.0, format_score: 0.0 }
    }
}

impl PearConfig {
    /// The reward of one output from its per-token entropies and `</think>` position.
    pub fn reward(&self, correct: bool, entropy: &[f32], think_end: Option<usize>) -> f32 {
        let (h_think, h_answer) = phase_entropy(entropy, think_end);
        pear_reward(correct, h_think, h_answer, self.s, self.alpha, self.format_score)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_first_token() {
        assert_eq!(find_token(&[1, 2, 3, 2], 2), Some(1));
        assert_eq!(find_token(&[1, 2, 3], 9), None);
        assert_eq!(find_token(&[], 9), None);
        assert_eq!(find_token(&[9], 9), Some(0));
    }

    #[test]
    fn phases_split_and_exclude_marker() {
        // think: 1, 2, 3 (mean 2); </think> entropy 100 ignored; answer: 4, 6 (mean 5).
        let h = [1.0, 2.0, 3.0, 100.0, 4.0, 6.0];
        assert_eq!(phase_entropy(&h, Some(3)), (2.0, 5.0));
    }

    #[test]
    fn phases_edges() {
        let h = [1.0, 3.0];
        assert_eq!(phase_entropy(&h, None), (2.0, 0.0));
        assert_eq!(phase_entropy(&h, Some(2)), (2.0, 0.0));
        assert_eq!(phase_entropy(&h, Some(99)), (2.0, 0.0));
        // </think> first: empty thinking.
        assert_eq!(phase_entropy(&h, Some(0)), (0.0, 3.0));
        // </think> last: empty answer.
        assert_eq!(phase_entropy(&h, Some(1)), (1.0, 0.0));
        assert_eq!(phase_entropy(&[], None), (0.0, 0.0));
        assert_eq!(phase_entropy(&[], Some(0)), (0.0, 0.0));
        assert_eq!(phase_entropy(&[5.0], Some(0)), (0.0, 0.0));
        assert_eq!(phase_entropy(&[5.0], None), (5.0, 0.0));
        assert_eq!(phase_entropy(&[1.0, f32::NAN, 3.0, f32::INFINITY], None), (2.0, 0.0));
        assert_eq!(phase_entropy(&[f32::NAN], None), (0.0, 0.0));
    }

    #[test]
    fn reward_values() {
        // Penalty max(0, 2 − 1·0.5) = 1.5 → 1 − 1.5 = −0.5 (no lower clip).
        assert_eq!(pear_reward(true, 2.0, 0.5, 1.0, 1.0, 0.0), -0.5);
        // Answer entropy larger than thinking: no penalty → 1.
        assert_eq!(pear_reward(true, 0.3, 0.5, 1.0, 1.0, 0.0), 1.0);
        assert_eq!(pear_reward(true, 0.8, 0.5, 1.0, 1.0, 0.0), 0.7);
        // Exactly balanced: penalty 0.
        assert_eq!(pear_reward(true, 0.5, 0.5, 1.0, 1.0, 0.0), 1.0);
        // min(1, ·) caps s > 1.
        assert_eq!(pear_reward(true, 0.0, 0.0, 2.0, 1.0, 0.0), 1.0);
        // α = 0 penalises thinking entropy alone.
        assert_eq!(pear_reward(true, 0.25, 10.0, 1.0, 0.0, 0.0), 0.75);
        // Incorrect: the format score, whatever the entropies.
        assert_eq!(pear_reward(false, 9.0, 0.0, 1.0, 1.0, 0.0), 0.0);
        assert_eq!(pear_reward(false, 0.0, 0.0, 1.0, 1.0, -0.1), -0.1);
        assert_eq!(pear_reward(true, f32::NAN, 0.0, 1.0, 1.0, 0.0), 1.0);
    }

    #[test]
    fn config_reward() {
        let c = PearConfig::default();
        assert_eq!(c, PearConfig { s: 1.0, alpha: 1.0, format_score: 0.0 });
        // think mean 0.75, answer mean 0.25 → 1 − 0.5 = 0.5.
        assert_eq!(c.reward(true, &[0.5, 1.0, 9.0, 0.25], Some(2)), 0.5);
        assert_eq!(c.reward(false, &[0.5, 1.0, 9.0, 0.25], Some(2)), 0.0);
        // No </think>: everything is thinking, answer 0 → 1 − 0.75.
        assert_eq!(c.reward(true, &[0.5, 1.0], None), 0.25);
    }
}
