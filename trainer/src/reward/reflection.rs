//! Reflection analysis ("From Thinking to Output", ALGORITHMS.md "Other seed methods"): how
//! often the thinking phase uses reflection phrases — "wait", "let me check", … — logged per
//! step as a behaviour signal, not a reward.

use super::answer::THINK_END;

/// The phrases counted (lower case; ours, after the paper's examples and the usual R1-style
/// self-correction markers).
pub const REFLECTION_PHRASES: &[&str] = &[
    "wait",
    "let me check",
    "let me verify",
    "let me re-check",
    "let me recheck",
    "double-check",
    "double check",
    "on second thought",
    "alternatively",
    "hmm",
    "re-examine",
    "i made a mistake",
];

/// Reflection phrases in the thinking phase of `text` (before the first `</think>`, or all of
/// it when there is none), case-insensitive, as whole words: "wait" in "awaited" does not count.
pub fn reflection_count(text: &str) -> usize {
    let think = text.split(THINK_END).next().unwrap_or("").to_lowercase();
    let bytes = think.as_bytes();
    let word = |i: usize| i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_');
    let mut n = 0;
    for p in REFLECTION_PHRASES {
        let mut from = 0;
        while let Some(off) = think[from..].find(p) {
            let (a, b) = (from + off, from + off + p.len());
            let inside_word = (a > 0 && word(a - 1)) || word(b);
            if !inside_word {
                n += 1;
            }
            from = b;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_whole_phrases_in_the_thinking_only() {
        assert_eq!(reflection_count("So 2+2=4. Wait, let me check: yes.</think>Wait, 4"), 2);
        assert_eq!(reflection_count("WAIT. Hmm... alternatively, double-check"), 4);
        assert_eq!(reflection_count("awaited waiting hmmm"), 0);
        assert_eq!(reflection_count("no reflection here"), 0);
        assert_eq!(reflection_count("</think>wait"), 0);
        assert_eq!(reflection_count(""), 0);
        assert_eq!(reflection_count("ünïcode wait ✓"), 1);
    }
}
