//! Early rejection of rollouts (after arXiv 2508.01969's partial-reward idea; ALGORITHMS.md
//! "Other seed methods"): every sample of a group is generated for only τ tokens, the prefixes
//! are scored, and only the `keep` best of each group are generated to the end and trained
//! on (`smelt_models::generate_pruned`: the same generation goes on with the survivors, each in
//! its own cache slot). The rest stop at τ tokens, which is where the saving is when
//! completions are long.
//!
//! The paper prunes beams with a process reward model's score of a partial step. smelt runs
//! no PRM, so the prefix score is the policy's own mean token log-prob over the prefix (ours:
//! free, recorded while sampling; a confident prefix is the cheap proxy). Groups shrink to
//! `keep` members and the advantage statistics use the survivors only, as the notes advise.

/// The built-in prefix score: mean log-prob of the prefix's tokens (−∞ for an empty prefix,
/// which cannot happen with τ ≥ 1).
pub fn prefix_score(logp: &[f32]) -> f32 {
    if logp.is_empty() {
        return f32::NEG_INFINITY;
    }
    (logp.iter().map(|&x| x as f64).sum::<f64>() / logp.len() as f64) as f32
}

/// For groups of `g` consecutive scores, the indices (into `scores`) of each group's `keep`
/// highest, in their original order; ties go to the earlier sample, and NaN ranks lowest.
pub fn survivors(scores: &[f32], g: usize, keep: usize) -> Vec<usize> {
    assert!(g > 0 && keep <= g && scores.len() % g == 0, "survivors: {} scores, g {g}, keep {keep}", scores.len());
    let mut out = Vec::with_capacity(scores.len() / g * keep);
    for base in (0..scores.len()).step_by(g) {
        let key = |i: usize| if scores[i].is_nan() { f32::NEG_INFINITY } else { scores[i] };
        let mut idx: Vec<usize> = (base..base + g).collect();
        idx.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
        idx.truncate(keep);
        idx.sort_unstable();
        out.extend(idx);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_each_groups_best_in_order() {
        let s = [-1.0, -0.2, -3.0, -0.5, /* group 2 */ -2.0, f32::NAN, -2.0, -9.0];
        assert_eq!(survivors(&s, 4, 2), vec![1, 3, 4, 6], "ties to the earlier sample, NaN last");
        assert_eq!(survivors(&s, 4, 4), (0..8).collect::<Vec<_>>());
        assert_eq!(survivors(&s, 4, 1), vec![1, 4]);
        assert_eq!(survivors(&[], 4, 2), Vec::<usize>::new());
    }

    #[test]
    fn prefix_score_is_the_mean_logp() {
        assert_eq!(prefix_score(&[-1.0, -2.0, -3.0]), -2.0);
        assert_eq!(prefix_score(&[]), f32::NEG_INFINITY);
    }
}
