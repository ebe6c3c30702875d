//! The base correctness reward (ALGORITHMS.md, "Base correctness reward").
//!
//! An output is judged [`Outcome::Correct`], [`Outcome::Incorrect`] or [`Outcome::BadFormat`]
//! and scored on a configurable scale: LASER's +1 / −0.5 / −1 (the default; LASER §2 and its
//! `hf_math_verifier.py`), the binary {1, 0, 0} (PEAR's `score=1, format_score=0`), or DAPO's
//! ±1 (DAPO's rule reward).

use super::answer::{answers_match, extract_answer, has_think_end};

/// How an output fared against its reference answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    Correct,
    /// An answer was found and it is wrong.
    Incorrect,
    /// No usable answer: truncated at the length limit, `</think>` missing while thinking is
    /// required, or no extractable answer.
    BadFormat,
}

impl Outcome {
    pub fn is_correct(self) -> bool {
        self == Outcome::Correct
    }
}

/// The reward scale and the judging options.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CorrectnessConfig {
    pub correct: f32,
    pub incorrect: f32,
    pub bad_format: f32,
    /// An output without `</think>` is bad format (LASER's verifier also requires it; R1-style
    /// chat templates open `<think>` in the prompt, so only the closing tag is checked).
    pub require_think: bool,
    /// Relative tolerance for numeric answers (absolute when the reference is 0); see
    /// [`super::answer::numbers_close`]. 1e-6 by default; FinQA uses 0.02 (DRO §5.1).
    pub rel_tol: f64,
}

impl Default for CorrectnessConfig {
    /// LASER's scale: +1 correct, −0.5 incorrect, −1 bad format; thinking not required;
    /// relative tolerance 1e-6.
    fn default() -> Self {
        CorrectnessConfig { correct: 1.0, incorrect: -0.5, bad_format: -1.0, require_think: false, rel_tol: 1e-6 }
    }
}

impl CorrectnessConfig {
    /// LASER's +1 / −0.5 / −1 (same as [`Default`]).
    pub fn laser() -> Self {
        Self::default()
    }

    /// The binary scale {1, 0, 0}: 1 when correct, 0 otherwise (bad format included).
    pub fn binary() -> Self {
        CorrectnessConfig { correct: 1.0, incorrect: 0.0, bad_format: 0.0, ..Self::default() }
    }

    /// DAPO's rule reward: +1 when correct, −1 otherwise (reference/algorithms.md §4.7).
    pub fn dapo() -> Self {
        CorrectnessConfig { correct: 1.0, incorrect: -1.0, bad_format: -1.0, ..Self::default() }
    }

    pub fn with_require_think(self, require_think: bool) -> Self {
        CorrectnessConfig { require_think, ..self }
    }

    pub fn with_rel_tol(self, rel_tol: f64) -> Self {
        CorrectnessConfig { rel_tol, ..self }
    }

    /// The reward of an outcome on this scale.
    pub fn score(&self, o: Outcome) -> f32 {
        match o {
            Outcome::Correct => self.correct,
            Outcome::Incorrect => self.incorrect,
            Outcome::BadFormat => self.bad_format,
        }
    }

    /// [`judge`] and [`Self::score`] in one call.
    pub fn judge_and_score(&self, text: &str, reference: &str, truncated: bool) -> (Outcome, f32) {
        let o = judge(text, reference, truncated, self);
        (o, self.score(o))
    }
}

/// Judges one output `text` against the `reference` answer.
///
/// Bad format, checked in this order: the output was `truncated` at the maximum completion
/// length (its answer, if any, is not trusted); `</think>` is missing while
/// `cfg.require_think`; no answer can be extracted ([`extract_answer`]). Otherwise the answer
/// is compared with [`answers_match`] at `cfg.rel_tol`.
///
/// `reference` must be the final answer itself; for a full dataset solution (GSM8K `#### 72`,
/// MATH `\boxed{…}`) pass it through [`super::answer::reference_answer`] first.
pub fn judge(text: &str, reference: &str, truncated: bool, cfg: &CorrectnessConfig) -> Outcome {
    if truncated || (cfg.require_think && !has_think_end(text)) {
        return Outcome::BadFormat;
    }
    match extract_answer(text) {
        None => Outcome::BadFormat,
        Some(a) if answers_match(&a, reference, cfg.rel_tol) => Outcome::Correct,
        Some(_) => Outcome::Incorrect,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales() {
        let l = CorrectnessConfig::default();
        assert_eq!(l, CorrectnessConfig::laser());
        assert_eq!(
            (l.score(Outcome::Correct), l.score(Outcome::Incorrect), l.score(Outcome::BadFormat)),
            (1.0, -0.5, -1.0)
        );
        assert!(!l.require_think);
        assert_eq!(l.rel_tol, 1e-6);
        let b = CorrectnessConfig::binary();
        assert_eq!(
            (b.score(Outcome::Correct), b.score(Outcome::Incorrect), b.score(Outcome::BadFormat)),
            (1.0, 0.0, 0.0)
        );
        let d = CorrectnessConfig::dapo();
        assert_eq!(
            (d.score(Outcome::Correct), d.score(Outcome::Incorrect), d.score(Outcome::BadFormat)),
            (1.0, -1.0, -1.0)
        );
        let c = CorrectnessConfig::binary().with_require_think(true).with_rel_tol(0.02);
        assert!(c.require_think);
        assert_eq!(c.rel_tol, 0.02);
        assert_eq!(c.correct, 1.0);
    }

    #[test]
    fn judging() {
        let cfg = CorrectnessConfig::default();
        assert_eq!(judge("hmm</think>\\boxed{42}", "42", false, &cfg), Outcome::Correct);
        assert_eq!(judge("hmm</think>\\boxed{41}", "42", false, &cfg), Outcome::Incorrect);
        assert_eq!(judge("hmm</think>\\boxed{42}", "42", true, &cfg), Outcome::BadFormat);
        assert_eq!(judge("hmm 42</think>nothing", "42", false, &cfg), Outcome::BadFormat);
        assert_eq!(judge("", "42", false, &cfg), Outcome::BadFormat);
        // Without </think>: fine unless thinking is required.
        assert_eq!(judge("the answer is 42.", "42", false, &cfg), Outcome::Correct);
        let strict = cfg.with_require_think(true);
        assert_eq!(judge("the answer is 42.", "42", false, &strict), Outcome::BadFormat);
        assert!(judge("a</think>42", "42", false, &strict).is_correct());
        assert!(!Outcome::Incorrect.is_correct());
    }

    #[test]
    fn tolerance_is_used() {
        let cfg = CorrectnessConfig::default();
        assert_eq!(judge("</think>\\boxed{101}", "100", false, &cfg), Outcome::Incorrect);
        assert_eq!(judge("</think>\\boxed{101}", "100", false, &cfg.with_rel_tol(0.02)), Outcome::Correct);
    }

    #[test]
    fn judge_and_score_pairs() {
        let cfg = CorrectnessConfig::default();
        assert_eq!(cfg.judge_and_score("</think>#### 1,000", "1000", false), (Outcome::Correct, 1.0));
        assert_eq!(cfg.judge_and_score("</think>7", "1000", false), (Outcome::Incorrect, -0.5));
        assert_eq!(cfg.judge_and_score("</think>7", "1000", true), (Outcome::BadFormat, -1.0));
    }
}
