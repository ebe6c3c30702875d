//! Typed field access on parsed JSON objects, with errors that name the file and the field.
//!
//! Config files are read as `serde_json::Value` first (not derived structs) so that a wrong
//! type, a missing field or an absurd value each get their own message naming the field,
//! and so unknown fields (HF configs carry dozens) are ignored without listing them.

use std::path::Path;

use serde_json::{Map, Value};

use crate::{Error, Result};

pub(crate) type Obj = Map<String, Value>;

pub(crate) fn as_object<'a>(path: &Path, v: &'a Value, what: &str) -> Result<&'a Obj> {
    v.as_object().ok_or_else(|| Error::field(path, what, format!("expected a JSON object, got {}", kind(v))))
}

pub(crate) fn kind(v: &Value) -> String {
    match v {
        Value::Null => "null".to_string(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) if s.chars().count() > 40 => format!("string {:?}…", s.chars().take(40).collect::<String>()),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(a) => format!("an array of {} element(s)", a.len()),
        Value::Object(_) => "an object".to_string(),
    }
}

/// The field's value, treating JSON `null` like an absent field (HF writes `null` for unset).
pub(crate) fn get<'a>(obj: &'a Obj, field: &str) -> Option<&'a Value> {
    obj.get(field).filter(|v| !v.is_null())
}

pub(crate) fn opt_u64(path: &Path, obj: &Obj, field: &str) -> Result<Option<u64>> {
    match get(obj, field) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) => Ok(Some(n)),
            // 64.0 is accepted: some exporters write integers as floats.
            None => match v.as_f64() {
                Some(f) if f >= 0.0 && f.fract() == 0.0 && f < 1e18 => Ok(Some(f as u64)),
                _ => Err(Error::field(path, field, format!("expected a non-negative integer, got {}", kind(v)))),
            },
        },
    }
}

/// A required size field in `1..=max`.
pub(crate) fn req_size(path: &Path, obj: &Obj, field: &str, max: u64) -> Result<usize> {
    let n = opt_u64(path, obj, field)?.ok_or_else(|| Error::field(path, field, "required field is missing"))?;
    check_size(path, field, n, max)
}

pub(crate) fn opt_size(path: &Path, obj: &Obj, field: &str, max: u64) -> Result<Option<usize>> {
    opt_u64(path, obj, field)?.map(|n| check_size(path, field, n, max)).transpose()
}

fn check_size(path: &Path, field: &str, n: u64, max: u64) -> Result<usize> {
    if n == 0 {
        return Err(Error::field(path, field, "must be positive, got 0"));
    }
    if n > max {
        return Err(Error::field(path, field, format!("{n} is implausibly large (limit {max})")));
    }
    usize::try_from(n).map_err(|_| Error::field(path, field, format!("{n} does not fit in memory indices")))
}

pub(crate) fn opt_f64(path: &Path, obj: &Obj, field: &str) -> Result<Option<f64>> {
    match get(obj, field) {
        None => Ok(None),
        Some(v) => {
            v.as_f64().map(Some).ok_or_else(|| Error::field(path, field, format!("expected a number, got {}", kind(v))))
        }
    }
}

pub(crate) fn opt_bool(path: &Path, obj: &Obj, field: &str) -> Result<Option<bool>> {
    match get(obj, field) {
        None => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| Error::field(path, field, format!("expected true or false, got {}", kind(v)))),
    }
}

pub(crate) fn opt_str<'a>(path: &Path, obj: &'a Obj, field: &str) -> Result<Option<&'a str>> {
    match get(obj, field) {
        None => Ok(None),
        Some(v) => {
            v.as_str().map(Some).ok_or_else(|| Error::field(path, field, format!("expected a string, got {}", kind(v))))
        }
    }
}

/// A token id that must fit in u32.
pub(crate) fn opt_token_id(path: &Path, obj: &Obj, field: &str) -> Result<Option<u32>> {
    match opt_u64(path, obj, field)? {
        None => Ok(None),
        Some(n) => {
            u32::try_from(n).map(Some).map_err(|_| Error::field(path, field, format!("token id {n} is too large")))
        }
    }
}

/// A token id or a list of them (`eos_token_id` is either in HF files).
pub(crate) fn token_ids(path: &Path, obj: &Obj, field: &str) -> Result<Vec<u32>> {
    match get(obj, field) {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| {
                    Error::field(path, format!("{field}[{i}]"), format!("expected a token id, got {}", kind(v)))
                })
            })
            .collect(),
        Some(_) => Ok(opt_token_id(path, obj, field)?.into_iter().collect()),
    }
}
