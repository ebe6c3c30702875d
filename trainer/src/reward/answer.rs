//! Reading a final answer out of a model's text and comparing it with a reference answer.
//!
//! Contract (ALGORITHMS.md, "Base correctness reward"): the answer is read from the text after
//! `</think>` when the output has one; it is the last `\boxed{…}`, else a `#### x` line, else
//! the last number. Numeric answers compare with a relative tolerance (default 1e-6; FinQA-style
//! 2 % is `0.02`). LASER's verifier (`hf_math_verifier.py`) reads the last `\boxed{}` after
//! `</think>`; the `####` and last-number fall-backs follow PEAR's GSM8K extraction
//! (reference/algorithms.md §3.4).
//!
//! Everything here is total: text comes from a model (arbitrary UTF-8), so no function panics
//! and every slice is taken at a char boundary (all the delimiters searched for are ASCII).

/// The token text that closes the thinking phase in R1-style and Qwen3 chat formats.
pub const THINK_END: &str = "</think>";

/// The part of `text` that holds the final answer: the text after the first `</think>` when
/// there is one, else the whole text.
///
/// The region may be empty (`"…</think>"`); extraction then finds no answer.
pub fn answer_region(text: &str) -> &str {
    match text.find(THINK_END) {
        Some(i) => &text[i + THINK_END.len()..],
        None => text,
    }
}

/// Whether the text closes its thinking phase (contains `</think>`).
pub fn has_think_end(text: &str) -> bool {
    text.contains(THINK_END)
}

/// The final answer of a model output, or `None` when it has none.
///
/// Read from [`answer_region`], in this order (ALGORITHMS.md):
/// 1. the last non-empty, brace-balanced `\boxed{…}` (also `\boxed {…}` and `\fbox{…}`), see
///    [`last_boxed`];
/// 2. else the last `#### x` line whose value is a number, see [`hash_answer`];
/// 3. else the last number, see [`last_number`].
///
/// Only the answer region is searched: when `</think>` is present, numbers in the thinking do
/// not count, so a response that closes its thinking and then says nothing has no answer.
pub fn extract_answer(text: &str) -> Option<String> {
    let region = answer_region(text);
    last_boxed(region).or_else(|| hash_answer(region)).or_else(|| last_number(region))
}

/// The content (trimmed) of the last `\boxed{…}` or `\fbox{…}` in `text`.
///
/// "Last" means the one whose command starts last, so for nested boxes the innermost wins.
/// Braces nest; a backslash escapes the next character, so `\{` and `\}` inside the box do not
/// count and `\boxed{\{1,2\}}` gives `\{1,2\}`. Whitespace between the command and `{` is
/// allowed. A box that is never closed (a truncated output) or is empty is skipped, and an
/// earlier box is used instead. A command that continues with letters (`\boxedfoo`) is not a box.
pub fn last_boxed(text: &str) -> Option<String> {
    let b = text.as_bytes();
    // One pass pairs every brace, so a degenerate output with thousands of unclosed
    // `\boxed{` stays linear instead of rescanning the tail for each of them.
    let close_of = brace_pairs(b);
    let mut best: Option<(usize, &str)> = None;
    for kw in ["\\boxed", "\\fbox"] {
        for (pos, _) in text.match_indices(kw) {
            let mut i = pos + kw.len();
            if i < b.len() && b[i].is_ascii_alphabetic() {
                continue;
            }
            while i < b.len() && b[i].is_ascii_whitespace() {
                i += 1;
            }
            if i >= b.len() || b[i] != b'{' {
                continue;
            }
            let close = close_of[i];
            if close == usize::MAX {
                continue;
            }
            let inner = text[i + 1..close].trim();
            if !inner.is_empty() && best.is_none_or(|(p, _)| pos > p) {
                best = Some((pos, inner));
            }
        }
    }
    best.map(|(_, s)| s.to_string())
}

/// For each byte index holding an unescaped `{`, the index of its closing `}`; `usize::MAX`
/// elsewhere and for unclosed braces. Same rules as [`matching_brace`]; an unmatched `}` is
/// ignored.
fn brace_pairs(b: &[u8]) -> Vec<usize> {
    let mut close_of = vec![usize::MAX; b.len()];
    let mut stack = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 1,
            b'{' => stack.push(i),
            b'}' => {
                if let Some(open) = stack.pop() {
                    close_of[open] = i;
                }
            }
            _ => {}
        }
        i += 1;
    }
    close_of
}

/// Index of the `}` that closes the `{` at `open`, honouring nesting and backslash escapes.
fn matching_brace(b: &[u8], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = open;
    while i < b.len() {
        match b[i] {
            // Skips the escaped byte; if that is the lead byte of a multi-byte char, its
            // continuation bytes are >= 0x80 and can never be taken for a brace.
            b'\\' => i += 1,
            b'{' => depth += 1,
            b'}' => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// The value of the last `#### x` line of `text` (GSM8K's convention), when it is a number.
///
/// Leading spaces before `####` and extra `#` are allowed; the value is trimmed and a trailing
/// `.` dropped. Ours: a `####` line whose value does not parse as a number ([`parse_number`])
/// is ignored, because in free-form output `#### Step 2` is far more often a Markdown heading
/// than an answer; non-numeric answers are expected in `\boxed{}`.
pub fn hash_answer(text: &str) -> Option<String> {
    for line in text.lines().rev() {
        let Some(rest) = line.trim_start().strip_prefix("####") else { continue };
        let v = rest.trim_start_matches('#').trim();
        let v = v.strip_suffix('.').unwrap_or(v).trim_end();
        if !v.is_empty() && parse_number(v).is_some() {
            return Some(v.to_string());
        }
    }
    None
}

/// The last number in `text`, normalised: thousands commas removed, a leading sign kept as
/// `-` (a `+` is dropped), a trailing sentence period not included.
///
/// A number is: an optional sign, digits (a first group of 1–3 digits may be followed by
/// `,ddd` groups: `1,234,567`), an optional decimal part (`.5` and `3.14`; `42.` is `42`), and
/// an optional unsigned denominator (`3/4` stays `3/4`, which [`answers_match`] understands).
/// A comma that is not a thousands separator splits numbers (`1,2,3` → `3`; `1,2345` → `2345`).
///
/// Ours: `-` (or `+`, or U+2212 `−`) is a sign only when the character before it is not a
/// letter, digit or closing bracket, so `2-3` gives `3` and `x = -3` gives `-3`; scientific
/// notation is not recognised (`1e5` gives `5`).
pub fn last_number(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let n = b.len();
    let mut i = 0;
    let mut last = None;
    while i < n {
        let c = b[i];
        let starts = c.is_ascii_digit()
            || (c == b'.' && i + 1 < n && b[i + 1].is_ascii_digit() && !(i > 0 && b[i - 1].is_ascii_digit()));
        if !starts {
            i += 1;
            continue;
        }
        let (tok, end) = read_number(b, i);
        last = Some(tok);
        i = end.max(i + 1);
    }
    last
}

/// Reads the number starting at `start` (a digit or a `.` before a digit). Returns the
/// normalised text and the index just past it. All indices land on ASCII bytes.
fn read_number(b: &[u8], start: usize) -> (String, usize) {
    let n = b.len();
    let mut s = String::new();
    if sign_before(b, start) {
        s.push('-');
    }
    let mut j = start;
    while j < n && b[j].is_ascii_digit() {
        j += 1;
    }
    let int_digits = j - start;
    if int_digits == 0 {
        s.push('0');
    }
    push_ascii(&mut s, &b[start..j]);
    if (1..=3).contains(&int_digits) {
        while j + 3 < n
            && b[j] == b','
            && b[j + 1..=j + 3].iter().all(u8::is_ascii_digit)
            && !(j + 4 < n && b[j + 4].is_ascii_digit())
        {
            push_ascii(&mut s, &b[j + 1..=j + 3]);
            j += 4;
        }
    }
    if j + 1 < n && b[j] == b'.' && b[j + 1].is_ascii_digit() {
        let d0 = j + 1;
        j = d0;
        while j < n && b[j].is_ascii_digit() {
            j += 1;
        }
        s.push('.');
        push_ascii(&mut s, &b[d0..j]);
    }
    if j + 1 < n && b[j] == b'/' && b[j + 1].is_ascii_digit() {
        let d0 = j + 1;
        j = d0;
        while j < n && b[j].is_ascii_digit() {
            j += 1;
        }
        s.push('/');
        push_ascii(&mut s, &b[d0..j]);
    }
    (s, j)
}

fn push_ascii(s: &mut String, bytes: &[u8]) {
    s.extend(bytes.iter().map(|&c| c as char));
}

/// Whether the number starting at `start` is preceded by a minus sign that belongs to it.
fn sign_before(b: &[u8], start: usize) -> bool {
    let (is_minus, sign_at) = if start >= 1 && (b[start - 1] == b'-' || b[start - 1] == b'+') {
        (b[start - 1] == b'-', start - 1)
    } else if start >= 3 && b[start - 3..start] == [0xE2, 0x88, 0x92] {
        (true, start - 3)
    } else {
        return false;
    };
    if sign_at == 0 {
        return is_minus;
    }
    let p = b[sign_at - 1];
    let operand_before = p.is_ascii_alphanumeric() || matches!(p, b')' | b']' | b'}');
    is_minus && !operand_before
}

/// Parses an answer string as a number, or `None` when it is not one.
///
/// After [`normalize_answer`] (which strips `$…$`, `\text{…}` and friends), accepts:
/// - an optional sign (`-`, `+`, `−`), an optional leading currency `$` / `\$`, and optional
///   trailing `%` / `\%` / `^\circ` / `^{\circ}` / `°` (ours: the unit is dropped, so `50%`
///   equals `50`, not `0.5`);
/// - a plain decimal: digits with optional valid thousands commas (`1,234.5`), `.5`, `5.`,
///   and an optional exponent (`1e-3`);
/// - a fraction `a/b` or `\frac{a}{b}` (`\dfrac`, `\tfrac`) of plain decimals, b ≠ 0.
///
/// Non-finite results (`inf`, `NaN`, overflow) are rejected.
pub fn parse_number(s: &str) -> Option<f64> {
    let t = normalize_answer(s);
    let mut t = t.as_str();
    let mut neg = false;
    let mut signed = false;
    for _ in 0..2 {
        // Sign and currency in either order: `-$5` and `$-5`.
        if !signed {
            if let Some(r) = t.strip_prefix('-').or_else(|| t.strip_prefix('−')) {
                (neg, signed, t) = (true, true, r.trim_start());
            } else if let Some(r) = t.strip_prefix('+') {
                (signed, t) = (true, r.trim_start());
            }
        }
        t = t.strip_prefix("\\$").or_else(|| t.strip_prefix('$')).unwrap_or(t).trim_start();
    }
    for suffix in ["\\%", "%", "^\\circ", "^{\\circ}", "°"] {
        if let Some(r) = t.strip_suffix(suffix) {
            t = r.trim_end();
            break;
        }
    }
    let v = if let Some(rest) = t.strip_prefix("\\frac") {
        let b = rest.as_bytes();
        if b.first() != Some(&b'{') {
            return None;
        }
        let c1 = matching_brace(b, 0)?;
        if b.get(c1 + 1) != Some(&b'{') {
            return None;
        }
        let c2 = matching_brace(b, c1 + 1)?;
        if c2 + 1 != b.len() {
            return None;
        }
        divide(parse_signed_plain(&rest[1..c1])?, parse_signed_plain(&rest[c1 + 2..c2])?)?
    } else if let Some((a, b)) = t.split_once('/') {
        divide(parse_signed_plain(a)?, parse_signed_plain(b)?)?
    } else {
        parse_plain(t)?
    };
    let v = if neg { -v } else { v };
    v.is_finite().then_some(v)
}

fn divide(a: f64, b: f64) -> Option<f64> {
    (b != 0.0).then(|| a / b)
}

fn parse_signed_plain(s: &str) -> Option<f64> {
    let s = s.trim();
    if let Some(r) = s.strip_prefix('-').or_else(|| s.strip_prefix('−')) {
        parse_plain(r.trim_start()).map(|v| -v)
    } else {
        parse_plain(s.strip_prefix('+').unwrap_or(s).trim_start())
    }
}

/// An unsigned decimal: `digits[,ddd]*[.digits][e[+-]digits]`, `.digits`, or `digits.`.
fn parse_plain(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    let n = b.len();
    let mut j = 0;
    let mut clean = String::with_capacity(n);
    while j < n && b[j].is_ascii_digit() {
        j += 1;
    }
    let int_digits = j;
    push_ascii(&mut clean, &b[..j]);
    if (1..=3).contains(&int_digits) {
        while j < n && b[j] == b',' {
            let group = b.get(j + 1..j + 4)?;
            if !group.iter().all(u8::is_ascii_digit) || b.get(j + 4).is_some_and(u8::is_ascii_digit) {
                return None;
            }
            push_ascii(&mut clean, group);
            j += 4;
        }
    }
    let mut frac_digits = 0;
    if j < n && b[j] == b'.' {
        j += 1;
        let d0 = j;
        while j < n && b[j].is_ascii_digit() {
            j += 1;
        }
        frac_digits = j - d0;
        clean.push('.');
        push_ascii(&mut clean, &b[d0..j]);
    }
    if int_digits + frac_digits == 0 {
        return None;
    }
    if j < n && (b[j] == b'e' || b[j] == b'E') {
        let e0 = j;
        j += 1;
        if j < n && (b[j] == b'+' || b[j] == b'-') {
            j += 1;
        }
        let d0 = j;
        while j < n && b[j].is_ascii_digit() {
            j += 1;
        }
        if j == d0 {
            return None;
        }
        push_ascii(&mut clean, &b[e0..j]);
    }
    if j != n {
        return None;
    }
    if clean.ends_with('.') {
        clean.pop();
    }
    if clean.starts_with('.') {
        clean.insert(0, '0');
    }
    clean.parse::<f64>().ok().filter(|v| v.is_finite())
}

/// Whether two finite numbers agree within relative tolerance `rel_tol`.
///
/// |p − r| ≤ rel_tol·|r| for r ≠ 0. Ours: for r = 0 a relative tolerance means nothing, so the
/// test becomes absolute, |p| ≤ rel_tol. A negative or non-finite `rel_tol` means exact.
pub fn numbers_close(p: f64, r: f64, rel_tol: f64) -> bool {
    let tol = if rel_tol.is_finite() && rel_tol > 0.0 { rel_tol } else { 0.0 };
    if p == r {
        return true;
    }
    if !(p.is_finite() && r.is_finite()) {
        return false;
    }
    if r == 0.0 {
        p.abs() <= tol
    } else {
        (p - r).abs() <= tol * r.abs()
    }
}

/// Whether a predicted answer matches the reference.
///
/// When both parse as numbers ([`parse_number`]) they are compared with [`numbers_close`]
/// (`rel_tol` relative; absolute when the reference is 0). Otherwise the two
/// [`normalize_answer`] forms must be equal; the comparison is case-sensitive (ours: `A` and
/// `a` can be different answers in math). An empty answer never matches.
pub fn answers_match(pred: &str, reference: &str, rel_tol: f64) -> bool {
    if let (Some(p), Some(r)) = (parse_number(pred), parse_number(reference)) {
        return numbers_close(p, r, rel_tol);
    }
    let p = normalize_answer(pred);
    !p.is_empty() && p == normalize_answer(reference)
}

/// The canonical text form of an answer used for string comparison (ours):
/// trim; strip surrounding `$…$` (any number of `$`), `\(…\)`, `\[…\]`; unwrap a `\boxed{…}`,
/// `\text{…}`, `\textbf{…}`, `\mathrm{…}`, `\mathbf{…}` that spans the whole answer (repeatedly);
/// `\dfrac`/`\tfrac` → `\frac`; drop `\left`, `\right` and the spacing commands `\!`, `\,`, `\;`,
/// `\:`; collapse runs of whitespace to one space; drop one trailing `.`.
pub fn normalize_answer(s: &str) -> String {
    let mut t: String = s.trim().to_string();
    loop {
        let before = t.len();
        let u = t.trim();
        let u = u.strip_suffix('.').unwrap_or(u).trim_end();
        let u = u.trim_matches('$').trim();
        let u = strip_pair(u, "\\(", "\\)").or_else(|| strip_pair(u, "\\[", "\\]")).unwrap_or(u);
        let mut u = u.trim();
        for cmd in ["\\boxed", "\\text", "\\textbf", "\\mathrm", "\\mathbf"] {
            if let Some(inner) = unwrap_command(u, cmd) {
                u = inner.trim();
                break;
            }
        }
        t = u.to_string();
        if t.len() == before {
            break;
        }
    }
    let t = t.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac");
    let t = remove_command(&t, "\\left");
    let t = remove_command(&t, "\\right");
    let t = t.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\:", "");
    let t = t.split_whitespace().collect::<Vec<_>>().join(" ");
    match t.strip_suffix('.') {
        Some(r) => r.trim_end().to_string(),
        None => t,
    }
}

fn strip_pair<'a>(s: &'a str, open: &str, close: &str) -> Option<&'a str> {
    s.strip_prefix(open)?.strip_suffix(close)
}

/// `\cmd{X}` spanning all of `s` → `X`.
fn unwrap_command<'a>(s: &'a str, cmd: &str) -> Option<&'a str> {
    let rest = s.strip_prefix(cmd)?;
    let b = rest.as_bytes();
    if b.first() != Some(&b'{') {
        return None;
    }
    let close = matching_brace(b, 0)?;
    (close + 1 == b.len()).then(|| &rest[1..close])
}

/// Removes every `cmd` that is not followed by a letter (`\left(` loses `\left`; `\leftarrow`
/// is kept).
fn remove_command(s: &str, cmd: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(cmd) {
        let after = &rest[i + cmd.len()..];
        out.push_str(&rest[..i]);
        if after.as_bytes().first().is_some_and(u8::is_ascii_alphabetic) {
            out.push_str(cmd);
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// The final answer inside a dataset's reference field (ours, a convenience for the loop):
/// the value of the last `####` line (GSM8K solutions), else the last `\boxed{…}` (MATH
/// solutions), else the whole field, trimmed.
pub fn reference_answer(raw: &str) -> String {
    for line in raw.lines().rev() {
        if let Some(rest) = line.trim_start().strip_prefix("####") {
            let v = rest.trim_start_matches('#').trim();
            if !v.is_empty() {
                return v.to_string();
            }
        }
    }
    last_boxed(raw).unwrap_or_else(|| raw.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_after_first_think_end() {
        assert_eq!(answer_region("a</think>b</think>c"), "b</think>c");
        assert_eq!(answer_region("no think"), "no think");
        assert_eq!(answer_region("x</think>"), "");
        assert_eq!(answer_region(""), "");
        assert!(has_think_end("…</think>"));
        assert!(!has_think_end("</think"));
    }

    #[test]
    fn boxed_basic_and_last() {
        assert_eq!(last_boxed("\\boxed{1} then \\boxed{42}").as_deref(), Some("42"));
        assert_eq!(last_boxed("\\boxed { 7 }").as_deref(), Some("7"));
        assert_eq!(last_boxed("\\fbox{x}").as_deref(), Some("x"));
        assert_eq!(last_boxed("\\boxed{1} \\fbox{2}").as_deref(), Some("2"));
        assert_eq!(last_boxed("\\fbox{2} \\boxed{1}").as_deref(), Some("1"));
        assert_eq!(last_boxed("no box"), None);
        assert_eq!(last_boxed(""), None);
    }

    #[test]
    fn boxed_nested_braces_and_escapes() {
        assert_eq!(last_boxed("ans \\boxed{\\frac{1}{2}}.").as_deref(), Some("\\frac{1}{2}"));
        assert_eq!(last_boxed("\\boxed{\\{1,2\\}}").as_deref(), Some("\\{1,2\\}"));
        assert_eq!(last_boxed("\\boxed{a_{b_{c}}}").as_deref(), Some("a_{b_{c}}"));
        // Innermost of nested boxes (it starts last).
        assert_eq!(last_boxed("\\boxed{\\boxed{5}}").as_deref(), Some("5"));
        // `\\` line break before the closing brace.
        assert_eq!(last_boxed("\\boxed{a\\\\}").as_deref(), Some("a\\\\"));
    }

    #[test]
    fn boxed_unclosed_empty_or_not_a_box() {
        assert_eq!(last_boxed("\\boxed{3} and \\boxed{4"), Some("3".into()));
        assert_eq!(last_boxed("\\boxed{9} \\boxed{}"), Some("9".into()));
        assert_eq!(last_boxed("\\boxed{ }"), None);
        assert_eq!(last_boxed("\\boxedx{3}"), None);
        assert_eq!(last_boxed("\\boxed 3"), None);
        assert_eq!(last_boxed("\\boxed"), None);
        assert_eq!(last_boxed("\\boxed{\\}"), None);
    }

    #[test]
    fn boxed_unicode_content() {
        assert_eq!(last_boxed("é \\boxed{π²}").as_deref(), Some("π²"));
        assert_eq!(last_boxed("\\boxed{\\é}").as_deref(), Some("\\é"));
    }

    #[test]
    fn hash_lines() {
        assert_eq!(hash_answer("work\n#### 72").as_deref(), Some("72"));
        assert_eq!(hash_answer("#### 1\n  #### 1,234.\n").as_deref(), Some("1,234"));
        assert_eq!(hash_answer("#### -5"), Some("-5".into()));
        // A Markdown heading is not an answer; the earlier numeric line wins.
        assert_eq!(hash_answer("#### 3\n#### Final answer").as_deref(), Some("3"));
        assert_eq!(hash_answer("#### Step 2"), None);
        assert_eq!(hash_answer("####"), None);
        assert_eq!(hash_answer(""), None);
    }

    #[test]
    fn last_numbers() {
        assert_eq!(last_number("a 3 b 4.5 c").as_deref(), Some("4.5"));
        assert_eq!(last_number("total 1,234,567 apples").as_deref(), Some("1234567"));
        assert_eq!(last_number("it is 42.").as_deref(), Some("42"));
        assert_eq!(last_number("x = -3").as_deref(), Some("-3"));
        assert_eq!(last_number("x = −3").as_deref(), Some("-3"));
        assert_eq!(last_number("x = +3").as_deref(), Some("3"));
        assert_eq!(last_number("2-3").as_deref(), Some("3"));
        assert_eq!(last_number("(a)-3").as_deref(), Some("3"));
        assert_eq!(last_number("-7").as_deref(), Some("-7"));
        assert_eq!(last_number("1,2,3").as_deref(), Some("3"));
        assert_eq!(last_number("1,2345").as_deref(), Some("2345"));
        assert_eq!(last_number("12,345").as_deref(), Some("12345"));
        assert_eq!(last_number("1234,567").as_deref(), Some("567"));
        assert_eq!(last_number("p = .5").as_deref(), Some("0.5"));
        assert_eq!(last_number("ratio 3/4").as_deref(), Some("3/4"));
        assert_eq!(last_number("3.5/2").as_deref(), Some("3.5/2"));
        assert_eq!(last_number("on 12/25/2023").as_deref(), Some("2023"));
        assert_eq!(last_number("50%").as_deref(), Some("50"));
        assert_eq!(last_number("v1.2.3").as_deref(), Some("3"));
        assert_eq!(last_number("no digits"), None);
        assert_eq!(last_number(""), None);
        assert_eq!(last_number("-"), None);
        assert_eq!(last_number("ééé 5 ü").as_deref(), Some("5"));
    }

    #[test]
    fn extract_priority_and_region() {
        assert_eq!(extract_answer("think 99</think>so \\boxed{3}, not 5").as_deref(), Some("3"));
        assert_eq!(extract_answer("think \\boxed{9}</think>#### 4\nthen 7").as_deref(), Some("4"));
        assert_eq!(extract_answer("think \\boxed{9}</think>answer 7").as_deref(), Some("7"));
        // Numbers in the thinking do not count once </think> is present.
        assert_eq!(extract_answer("think 12</think>no answer"), None);
        assert_eq!(extract_answer("think 12</think>"), None);
        // No </think>: the whole text is the region.
        assert_eq!(extract_answer("so the answer is \\boxed{12}").as_deref(), Some("12"));
        assert_eq!(extract_answer("so the answer is 12.").as_deref(), Some("12"));
        assert_eq!(extract_answer(""), None);
    }

    #[test]
    fn parse_numbers() {
        assert_eq!(parse_number("42"), Some(42.0));
        assert_eq!(parse_number(" -3.5 "), Some(-3.5));
        assert_eq!(parse_number("+2"), Some(2.0));
        assert_eq!(parse_number("−2"), Some(-2.0));
        assert_eq!(parse_number("$1,234.50"), Some(1234.5));
        assert_eq!(parse_number("\\$5"), Some(5.0));
        assert_eq!(parse_number("-$5"), Some(-5.0));
        assert_eq!(parse_number("\\$-5"), Some(-5.0));
        assert_eq!(parse_number("50%"), Some(50.0));
        assert_eq!(parse_number("50\\%"), Some(50.0));
        assert_eq!(parse_number("90^\\circ"), Some(90.0));
        assert_eq!(parse_number("42."), Some(42.0));
        assert_eq!(parse_number(".5"), Some(0.5));
        assert_eq!(parse_number("1e-3"), Some(1e-3));
        assert_eq!(parse_number("3/4"), Some(0.75));
        assert_eq!(parse_number("-3/4"), Some(-0.75));
        assert_eq!(parse_number("\\frac{1}{2}"), Some(0.5));
        assert_eq!(parse_number("\\dfrac{3}{-4}"), Some(-0.75));
        assert_eq!(parse_number("-\\frac{1}{4}"), Some(-0.25));
        assert_eq!(parse_number("$\\frac{1}{8}$"), Some(0.125));
        assert_eq!(parse_number("\\text{12}"), Some(12.0));
        assert_eq!(parse_number("1/0"), None);
        assert_eq!(parse_number("\\frac{1}{2}x"), None);
        assert_eq!(parse_number("\\frac{1}"), None);
        assert_eq!(parse_number("1,2"), None);
        assert_eq!(parse_number("1,2345"), None);
        assert_eq!(parse_number("12,345"), Some(12345.0));
        assert_eq!(parse_number("1234,567"), None);
        assert_eq!(parse_number("inf"), None);
        assert_eq!(parse_number("NaN"), None);
        assert_eq!(parse_number("1e999"), None);
        assert_eq!(parse_number("."), None);
        assert_eq!(parse_number("1e"), None);
        assert_eq!(parse_number("x"), None);
        assert_eq!(parse_number(""), None);
        assert_eq!(parse_number("-"), None);
        assert_eq!(parse_number("1 2"), None);
    }

    #[test]
    fn numeric_tolerance() {
        assert!(numbers_close(1.0, 1.0, 0.0));
        assert!(numbers_close(100.0000001, 100.0, 1e-6));
        assert!(!numbers_close(100.001, 100.0, 1e-6));
        // FinQA-style 2 %: boundary included.
        assert!(numbers_close(102.0, 100.0, 0.02));
        assert!(!numbers_close(102.5, 100.0, 0.02));
        assert!(numbers_close(-98.0, -100.0, 0.02));
        // r = 0: absolute tolerance.
        assert!(numbers_close(5e-7, 0.0, 1e-6));
        assert!(!numbers_close(2e-6, 0.0, 1e-6));
        assert!(numbers_close(0.0, -0.0, 0.0));
        // Bad tolerance means exact.
        assert!(!numbers_close(1.0 + 1e-12, 1.0, -1.0));
        assert!(!numbers_close(1.0 + 1e-12, 1.0, f64::NAN));
    }

    #[test]
    fn matching() {
        assert!(answers_match("1,234", "1234", 1e-6));
        assert!(answers_match("$18", "18", 1e-6));
        assert!(answers_match("18.0", "18", 1e-6));
        assert!(answers_match("0.5", "\\frac{1}{2}", 1e-6));
        assert!(answers_match("1/2", "\\dfrac{1}{2}", 1e-6));
        assert!(answers_match("-7", "−7", 1e-6));
        assert!(!answers_match("7", "-7", 1e-6));
        assert!(!answers_match("0.333", "1/3", 1e-6));
        assert!(answers_match("0.333", "1/3", 0.02));
        assert!(answers_match("  x + 1 ", "$x  +  1$", 1e-6));
        assert!(answers_match("\\text{(A)}", "(A)", 1e-6));
        assert!(answers_match("\\left( 1, 2 \\right)", "( 1, 2 )", 1e-6));
        assert!(!answers_match("A", "a", 1e-6));
        assert!(!answers_match("", "", 1e-6));
        assert!(!answers_match("$$", "", 1e-6));
        assert!(!answers_match("x", "", 1e-6));
    }

    #[test]
    fn normalisation() {
        assert_eq!(normalize_answer("  $\\boxed{\\text{yes}}$. "), "yes");
        assert_eq!(normalize_answer("\\(x\\)"), "x");
        assert_eq!(normalize_answer("\\[ a \\, b \\]"), "a b");
        assert_eq!(normalize_answer("\\tfrac12"), "\\frac12");
        assert_eq!(normalize_answer("\\leftarrow"), "\\leftarrow");
        assert_eq!(normalize_answer("\\text{a} and \\text{b}"), "\\text{a} and \\text{b}");
        assert_eq!(normalize_answer(""), "");
        assert_eq!(normalize_answer("$"), "");
    }

    #[test]
    fn reference_field() {
        assert_eq!(reference_answer("She has 3.\n#### 72"), "72");
        assert_eq!(reference_answer("so \\boxed{\\frac{1}{2}}."), "\\frac{1}{2}");
        assert_eq!(reference_answer("  17 "), "17");
        assert_eq!(reference_answer(""), "");
    }

    #[test]
    fn degenerate_outputs_stay_fast() {
        let many_open = "\\boxed{".repeat(20_000);
        assert_eq!(last_boxed(&many_open), None);
        let nested = format!("{}7{}", "\\boxed{".repeat(5_000), "}".repeat(5_000));
        assert_eq!(extract_answer(&nested).as_deref(), Some("7"));
        let digits = "1,234,".repeat(20_000);
        assert_eq!(last_number(&digits).as_deref(), Some("1234"));
    }

    #[test]
    fn no_panic_on_random_text() {
        let alphabet: Vec<char> = "0123456789,.-+/ $%{}\\#\nboxedfracthink</>é−π".chars().collect();
        let mut seed = 7u64;
        for _ in 0..3000 {
            let len = (seed >> 60) as usize + 1;
            let s: String = (0..len * 3)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    alphabet[(seed >> 33) as usize % alphabet.len()]
                })
                .collect();
            let a = extract_answer(&s);
            if let Some(a) = &a {
                assert!(answers_match(a, a, 1e-6) || normalize_answer(a).is_empty(), "{s:?} -> {a:?}");
            }
            let _ = parse_number(&s);
            let _ = reference_answer(&s);
        }
    }

    #[test]
    fn no_panic_on_odd_inputs() {
        let odd = [
            "\\",
            "{",
            "}",
            "\\boxed{",
            "\\boxed{\\",
            "</think",
            "</think>\\boxed{",
            "é\\boxed{é",
            "####é",
            "1,",
            "1,23",
            "1,234,",
            "1.",
            "-.",
            "−",
            "\u{2212}5",
            "\\frac{",
            "\\frac{1}{",
            "/",
            "1/",
            "/2",
            "$",
            "$$$",
        ];
        for s in odd {
            let _ = extract_answer(s);
            let _ = parse_number(s);
            let _ = answers_match(s, s, 1e-6);
            let _ = normalize_answer(s);
            let _ = reference_answer(s);
        }
        // Every prefix of a mixed string, at char boundaries.
        let s = "é</think>x = −1,234.5 \\boxed{\\frac{1}{2}} #### 3 ü";
        for (i, _) in s.char_indices() {
            let _ = extract_answer(&s[..i]);
            let _ = extract_answer(&s[i..]);
            let _ = parse_number(&s[i..]);
        }
    }
}
