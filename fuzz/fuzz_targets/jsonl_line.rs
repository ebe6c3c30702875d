//! Lines of a `smelt score` input file: `parse_score_line` must return ids inside the
//! vocabulary and within max_position_embeddings, a blank, or an error naming the line.
//!
//! Input layout: byte 0 sets the vocabulary size, byte 1 the position limit, the rest is the
//! file. Text lines go through a stand-in tokenizer (one id per char, refusing U+007F) so the
//! out-of-vocabulary check for tokenizer output is reached too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smelt_trainer::jsonl::parse_score_line;

fuzz_target!(|data: &[u8]| {
    let [v, p, rest @ ..] = data else { return };
    let vocab = 1 + *v as usize * 4;
    let max_pos = 1 + *p as usize % 64;
    let Ok(text) = std::str::from_utf8(rest) else { return };
    for (i, line) in text.lines().enumerate() {
        let tokenize = |t: &str| {
            if t.contains('\u{7f}') {
                anyhow::bail!("the tokenizer refused the text");
            }
            Ok(t.chars().map(|c| c as u32).collect())
        };
        match parse_score_line(line, i + 1, vocab, max_pos, tokenize) {
            Ok(Some(ids)) => {
                assert!(!ids.is_empty() && ids.len() <= max_pos, "{} ids", ids.len());
                assert!(ids.iter().all(|&id| (id as usize) < vocab), "{ids:?} vs vocab {vocab}");
            }
            Ok(None) => assert!(line.trim().is_empty()),
            Err(e) => {
                assert_eq!(e.line, i + 1);
                assert!(e.to_string().starts_with(&format!("line {}: ", i + 1)));
            }
        }
    }
});
