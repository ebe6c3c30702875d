//! The JSONL input of `smelt score`: one object per line with `input_ids` (an array of token
//! ids) or `text` (tokenized by the caller).
//!
//! Kept apart from the command so it can be fuzzed and tested without a model: it must turn
//! every possible line into ids or an error naming the line, never panic, and never trust a
//! number from the line before checking it against the vocabulary.

use std::fmt;

use serde_json::Value;

/// A bad input line. Displays as `line N: what is wrong`; the caller prefixes the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    /// 1-based line number.
    pub line: usize,
    pub detail: String,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.detail)
    }
}

impl std::error::Error for LineError {}

/// Parses line `line_no` (1-based) of a score input file into token ids.
///
/// Returns `Ok(None)` for a blank line. Ids must be below `vocab`, and the sequence must be
/// non-empty and at most `max_pos` tokens long. `tokenize` is called only for a `text` line;
/// its error (shown with its whole cause chain) becomes this line's error.
pub fn parse_score_line(
    line: &str,
    line_no: usize,
    vocab: usize,
    max_pos: usize,
    tokenize: impl FnOnce(&str) -> anyhow::Result<Vec<u32>>,
) -> Result<Option<Vec<u32>>, LineError> {
    let err = |detail: String| LineError { line: line_no, detail };
    if line.trim().is_empty() {
        return Ok(None);
    }
    let v: Value = serde_json::from_str(line).map_err(|e| err(format!("not valid JSON: {e}")))?;
    let ids = match (v.get("input_ids"), v.get("text")) {
        (Some(ids), _) => {
            let arr = ids.as_array().ok_or_else(|| err("`input_ids` must be an array of integers".into()))?;
            let mut out = Vec::with_capacity(arr.len());
            for (j, x) in arr.iter().enumerate() {
                match x.as_u64() {
                    Some(id) => match (usize::try_from(id), u32::try_from(id)) {
                        (Ok(i), Ok(id32)) if i < vocab => out.push(id32),
                        _ => {
                            return Err(err(format!(
                                "input_ids[{j}] = {id} is outside the vocabulary (vocab_size {vocab})"
                            )))
                        }
                    },
                    None => return Err(err(format!("input_ids[{j}] = {x} is not a non-negative integer"))),
                }
            }
            out
        }
        (None, Some(Value::String(text))) => tokenize(text).map_err(|e| err(format!("{e:#}")))?,
        (None, Some(_)) => return Err(err("`text` must be a string".into())),
        (None, None) => return Err(err("expected an object with `input_ids` or `text`".into())),
    };
    if ids.is_empty() {
        return Err(err("the input is empty (nothing to score)".into()));
    }
    if ids.len() > max_pos {
        return Err(err(format!("{} tokens exceed the model's max_position_embeddings = {max_pos}", ids.len())));
    }
    // A tokenizer may return ids the model does not have; the model would index past its
    // embedding table.
    if let Some((j, &id)) = ids.iter().enumerate().find(|&(_, &id)| id as usize >= vocab) {
        return Err(err(format!("token {j} of the text has id {id}, outside the vocabulary (vocab_size {vocab})")));
    }
    Ok(Some(ids))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_tok(_: &str) -> anyhow::Result<Vec<u32>> {
        anyhow::bail!("no tokenizer")
    }

    #[test]
    fn ids_blank_and_text() {
        assert_eq!(parse_score_line("{\"input_ids\": [1, 2]}", 1, 10, 8, no_tok), Ok(Some(vec![1, 2])));
        assert_eq!(parse_score_line("  \t", 1, 10, 8, no_tok), Ok(None));
        let tok = |t: &str| Ok(t.bytes().map(u32::from).collect());
        assert_eq!(parse_score_line("{\"text\": \"ab\"}", 1, 200, 8, tok), Ok(Some(vec![97, 98])));
        let e = parse_score_line("{\"text\": \"ab\"}", 4, 10, 8, no_tok).unwrap_err();
        assert_eq!(e.to_string(), "line 4: no tokenizer");
    }
}
