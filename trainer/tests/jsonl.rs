//! `smelt score` input lines: every malformed line is an error naming the line, never a panic,
//! a truncated id or an unchecked allocation. Includes the inputs found by fuzzing
//! (fuzz/fuzz_targets/jsonl_line.rs).

use smelt_trainer::jsonl::{parse_score_line, LineError};

const VOCAB: usize = 400;
const MAX_POS: usize = 8;

fn chars(t: &str) -> anyhow::Result<Vec<u32>> {
    Ok(t.chars().map(|c| c as u32).collect())
}

fn parse(line: &str) -> Result<Option<Vec<u32>>, LineError> {
    parse_score_line(line, 7, VOCAB, MAX_POS, chars)
}

#[track_caller]
fn err(line: &str, needles: &[&str]) {
    let e = parse(line).unwrap_err();
    assert_eq!(e.line, 7);
    let s = e.to_string();
    assert!(s.starts_with("line 7: "), "{s}");
    for n in needles {
        assert!(s.contains(n), "{line:?}: {s:?} does not contain {n:?}");
    }
}

#[test]
fn good_lines() {
    assert_eq!(parse(r#"{"input_ids": [0, 399]}"#), Ok(Some(vec![0, 399])));
    assert_eq!(parse(r#"{"input_ids": [5], "text": "ignored"}"#), Ok(Some(vec![5])));
    assert_eq!(parse(r#"{"text": "hi"}"#), Ok(Some(vec![104, 105])));
    assert_eq!(parse("   "), Ok(None));
    assert_eq!(parse(""), Ok(None));
    // Exactly max_position_embeddings tokens is allowed.
    assert_eq!(parse(r#"{"input_ids": [1,1,1,1,1,1,1,1]}"#).unwrap().unwrap().len(), MAX_POS);
}

#[test]
fn messages_match_the_cli() {
    err(r#"{"input_ids": [1, 2"#, &["not valid JSON: ", "line 1 column"]);
    err(r#"{"input_ids": [1, 400]}"#, &["input_ids[1] = 400 is outside the vocabulary (vocab_size 400)"]);
    err(r#"{"input_ids": [1, -2]}"#, &["input_ids[1] = -2 is not a non-negative integer"]);
    err(r#"{"input_ids": []}"#, &["the input is empty (nothing to score)"]);
    err(r#"{"prompt": "x"}"#, &["expected an object with `input_ids` or `text`"]);
    err(r#"{"input_ids": "1 2"}"#, &["`input_ids` must be an array of integers"]);
    err(r#"{"text": 5}"#, &["`text` must be a string"]);
    err(r#"{"input_ids": [1,1,1,1,1,1,1,1,1]}"#, &["9 tokens exceed the model's max_position_embeddings = 8"]);
}

#[test]
fn ids_that_do_not_fit_are_not_truncated() {
    // 2^32 + 1 would become id 1 if cast to u32 before the vocabulary check.
    let huge = parse_score_line(r#"{"input_ids": [4294967297]}"#, 1, usize::MAX, MAX_POS, chars);
    assert!(huge.unwrap_err().detail.contains("4294967297 is outside the vocabulary"));
    err(&format!(r#"{{"input_ids": [{}]}}"#, u64::MAX), &["outside the vocabulary"]);
    err(r#"{"input_ids": [18446744073709551616]}"#, &["input_ids[0]", "not a non-negative integer"]);
    err(r#"{"input_ids": [1.0]}"#, &["input_ids[0] = 1.0 is not a non-negative integer"]);
    err(r#"{"input_ids": [1e400]}"#, &["not valid JSON"]);
    err(r#"{"input_ids": [true]}"#, &["not a non-negative integer"]);
    err(r#"{"input_ids": [null]}"#, &["not a non-negative integer"]);
}

#[test]
fn non_object_lines_and_odd_json() {
    for line in ["[1, 2]", "\"text\"", "null", "3", "true", "{}"] {
        err(line, &["expected an object with `input_ids` or `text`"]);
    }
    err("\u{feff}{\"input_ids\": [1]}", &["not valid JSON"]);
    err("{\"input_ids\": [1]} {\"input_ids\": [2]}", &["not valid JSON", "trailing characters"]);
    // A `null` field counts as present, as in the CLI before the move.
    err(r#"{"input_ids": null, "text": "x"}"#, &["`input_ids` must be an array"]);
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    let deep = format!("{{\"input_ids\": {}{}}}", "[".repeat(100_000), "]".repeat(100_000));
    err(&deep, &["not valid JSON", "recursion limit"]);
}

#[test]
fn tokenizer_errors_and_out_of_vocabulary_tokenizer_output() {
    let failing = |_: &str| -> anyhow::Result<Vec<u32>> {
        Err(anyhow::anyhow!("cannot encode").context("tokenizer.json: encoding failed"))
    };
    let e = parse_score_line(r#"{"text": "x"}"#, 3, VOCAB, MAX_POS, failing).unwrap_err();
    assert_eq!(e.to_string(), "line 3: tokenizer.json: encoding failed: cannot encode");
    // A tokenizer larger than the model must not hand ids past the embedding table to it.
    let e = parse_score_line(r#"{"text": "é"}"#, 2, 200, MAX_POS, chars).unwrap_err();
    assert!(e.to_string().contains("token 0 of the text has id 233, outside the vocabulary"), "{e}");
    let e = parse_score_line(r#"{"text": ""}"#, 2, 200, MAX_POS, chars).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
    // The tokenizer is not consulted for id lines.
    let never = |_: &str| -> anyhow::Result<Vec<u32>> { panic!("tokenizer called") };
    assert_eq!(parse_score_line(r#"{"input_ids": [3]}"#, 1, VOCAB, MAX_POS, never), Ok(Some(vec![3])));
}
