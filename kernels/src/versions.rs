//! Which CUDA version of an op's kernel runs.
//!
//! Each launcher runs the latest version its shapes allow (the rules are in the op's `.cu`
//! header). [`force`] pins an op to one version for the rest of the process, or until it is
//! cleared with `force(op, None)`: `smelt bench kernels` uses it to time every version of an op
//! side by side in one run, and device tests use it to check old versions against the CPU.
//! A forced version that does not exist, or cannot take the shapes of a call, is an error
//! naming the op, never a silent fallback.
//!
//! Without code, `SMELT_KERNEL_VERSIONS="sample=1,rmsnorm=2"` caps ops at a version: each call
//! runs the newest version it can take that is not above the cap — the way back to an older
//! kernel if a newer one misbehaves on some GPU, and the way to run a version newer than the
//! default of an op whose launcher holds new versions back until they are measured
//! ([`pick_up_to`]; e.g. `attention_decode=3`). Op names: [`OPS`]. A malformed value or an
//! unknown op name makes every launch of a versioned op fail with an error that quotes the variable.

use std::sync::{Condvar, Mutex, OnceLock};

/// The ops whose launchers pick their version here.
pub const OPS: [&str; 12] = [
    "adamw",
    "attention_backward",
    "attention_decode",
    "attention_forward",
    "attention_inputs",
    "embedding",
    "embedding_backward",
    "logprob_entropy",
    "matmul",
    "rmsnorm",
    "rope",
    "sample",
];

static FORCED: Mutex<Vec<(&'static str, u32)>> = Mutex::new(Vec::new());
/// Ops held by a live [`Scoped`], and the signal that one was let go.
static HELD: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
static FREED: Condvar = Condvar::new();

/// Pins `op` (the name its launcher uses, e.g. `"rope"`) to `version`; `None` restores the default.
pub fn force(op: &'static str, version: Option<u32>) {
    let mut f = FORCED.lock().unwrap_or_else(|e| e.into_inner());
    f.retain(|(o, _)| *o != op);
    if let Some(v) = version {
        f.push((op, v));
    }
}

/// The version `op` is pinned to, if any.
pub fn forced(op: &str) -> Option<u32> {
    FORCED.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|(o, _)| *o == op).map(|&(_, v)| v)
}

/// [`force`] for a scope: waits until no other [`Scoped`] holds `op`, pins it to `version`, and
/// restores the previous pin when dropped, also when a panic unwinds. Tests running in parallel
/// in one process use it so that none sees another's version.
#[must_use = "the version is pinned only while the guard lives"]
pub struct Scoped {
    op: &'static str,
    prev: Option<u32>,
}

pub fn scoped(op: &'static str, version: u32) -> Scoped {
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    while held.contains(&op) {
        held = FREED.wait(held).unwrap_or_else(|e| e.into_inner());
    }
    held.push(op);
    drop(held);
    let prev = forced(op);
    force(op, Some(version));
    Scoped { op, prev }
}

impl Drop for Scoped {
    fn drop(&mut self) {
        force(self.op, self.prev);
        HELD.lock().unwrap_or_else(|e| e.into_inner()).retain(|o| *o != self.op);
        FREED.notify_all();
    }
}

/// Parses `SMELT_KERNEL_VERSIONS` (`op=version` pairs, comma-separated; empty: no caps).
pub fn parse_caps(s: &str) -> Result<Vec<(String, u32)>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(|e| {
            let bad = |why: &str| format!("SMELT_KERNEL_VERSIONS={s:?}: `{e}` {why}");
            let (op, v) = e.split_once('=').ok_or_else(|| bad("is not op=version"))?;
            let op = op.trim();
            if !OPS.contains(&op) {
                return Err(bad(&format!("names no versioned op (ops: {})", OPS.join(", "))));
            }
            let v = v.trim().parse::<u32>().map_err(|_| bad("has a version that is not a number"))?;
            Ok((op.to_string(), v))
        })
        .collect()
}

fn env_caps() -> &'static Result<Vec<(String, u32)>, String> {
    static CAPS: OnceLock<Result<Vec<(String, u32)>, String>> = OnceLock::new();
    CAPS.get_or_init(|| parse_caps(&std::env::var("SMELT_KERNEL_VERSIONS").unwrap_or_default()))
}

/// The version a launcher runs: the forced one if it is among `allowed` (the versions that can
/// take this call's shapes), else an error naming the op; without a forced version, the newest
/// of `allowed` (launchers list them oldest first) not above the op's `SMELT_KERNEL_VERSIONS` cap.
pub fn pick(op: &'static str, allowed: &[u32]) -> smelt_engine::Result<u32> {
    pick_up_to(op, allowed, u32::MAX)
}

/// [`pick`] for a call where versions newer than `best` measured slower or are not measured yet
/// (the launcher says which): the newest of `allowed` not above `best`, unless a version is
/// forced or `SMELT_KERNEL_VERSIONS` names the op. Both may pick any of `allowed`: benchmarks
/// time every version, and a setting above `best` (`attention_decode=3`) tries a newer kernel
/// in a whole run without code.
pub fn pick_up_to(op: &'static str, allowed: &[u32], best: u32) -> smelt_engine::Result<u32> {
    choose(op, allowed, best, forced(op), env_cap(op)?)
}

/// The version a call without a forced version runs: [`pick_up_to`] as if nothing were forced
/// (the `SMELT_KERNEL_VERSIONS` cap still counts). Benchmarks, which pin every version in
/// turn, mark with it the row that a training or generation run gets.
pub fn unforced(op: &'static str, allowed: &[u32], best: u32) -> smelt_engine::Result<u32> {
    choose(op, allowed, best, None, env_cap(op)?)
}

/// `op`'s `SMELT_KERNEL_VERSIONS` cap, if it has one.
fn env_cap(op: &str) -> smelt_engine::Result<Option<u32>> {
    let caps = env_caps().as_ref().map_err(|m| smelt_engine::Error::msg(format!("{op}: {m}")))?;
    Ok(caps.iter().find(|(o, _)| o == op).map(|&(_, v)| v))
}

fn choose(
    op: &'static str,
    allowed: &[u32],
    best: u32,
    forced: Option<u32>,
    cap: Option<u32>,
) -> smelt_engine::Result<u32> {
    let below_best: Vec<u32> = allowed.iter().copied().filter(|&v| v <= best).collect();
    let choices = if forced.is_some() || cap.is_some() || below_best.is_empty() { allowed } else { &below_best };
    pick_from(op, choices, forced, cap)
}

fn pick_from(op: &'static str, allowed: &[u32], forced: Option<u32>, cap: Option<u32>) -> smelt_engine::Result<u32> {
    let err = |m: String| smelt_engine::Error::shape(op, m);
    match (forced, cap) {
        (Some(v), _) if allowed.contains(&v) => Ok(v),
        (Some(v), _) => {
            Err(err(format!("kernel version {v} was forced, but this call can run only versions {allowed:?}")))
        }
        (None, Some(c)) => allowed.iter().rev().find(|&&v| v <= c).copied().ok_or_else(|| {
            err(format!(
                "SMELT_KERNEL_VERSIONS caps it at version {c}, but this call can run only versions {allowed:?}"
            ))
        }),
        (None, None) => allowed.last().copied().ok_or_else(|| err("no kernel version fits this call".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forcing_picks_and_clears_and_rejects_unfit_versions() {
        // An op name no launcher uses, so parallel tests are not affected.
        assert_eq!(pick("versions_test_op", &[1, 2, 3]).unwrap(), 3);
        force("versions_test_op", Some(2));
        assert_eq!(forced("versions_test_op"), Some(2));
        assert_eq!(pick("versions_test_op", &[1, 2, 3]).unwrap(), 2);
        let e = pick("versions_test_op", &[1, 3]).unwrap_err().to_string();
        assert!(e.contains("versions_test_op") && e.contains("version 2") && e.contains("[1, 3]"), "{e}");
        force("versions_test_op", None);
        assert_eq!(forced("versions_test_op"), None);
        assert_eq!(pick("versions_test_op", &[1]).unwrap(), 1);
        assert!(pick("versions_test_op", &[]).is_err());
        // Up to the best measured version, unless forced.
        assert_eq!(pick_up_to("versions_test_op", &[1, 2, 3], 2).unwrap(), 2);
        assert_eq!(pick_up_to("versions_test_op", &[3], 2).unwrap(), 3);
        force("versions_test_op", Some(3));
        assert_eq!(pick_up_to("versions_test_op", &[1, 2, 3], 2).unwrap(), 3);
        // What an unforced call would run, whatever is pinned now.
        assert_eq!(unforced("versions_test_op", &[1, 2, 3], 2).unwrap(), 2);
        assert_eq!(unforced("versions_test_op", &[1, 2, 3], u32::MAX).unwrap(), 3);
        force("versions_test_op", None);
    }

    #[test]
    fn env_caps_parse_and_cap() {
        assert_eq!(parse_caps("").unwrap(), vec![]);
        assert_eq!(
            parse_caps(" sample=1, rmsnorm = 2 ,").unwrap(),
            vec![("sample".to_string(), 1), ("rmsnorm".to_string(), 2)]
        );
        let e = parse_caps("sample").unwrap_err();
        assert!(e.contains("SMELT_KERNEL_VERSIONS") && e.contains("`sample` is not op=version"), "{e}");
        let e = parse_caps("smaple=1").unwrap_err();
        assert!(e.contains("`smaple=1` names no versioned op") && e.contains("rmsnorm"), "{e}");
        assert!(parse_caps("rope=two").unwrap_err().contains("not a number"));
        // A cap runs the newest fitting version not above it; a forced version wins over a cap.
        assert_eq!(pick_from("op", &[1, 2, 3], None, Some(2)).unwrap(), 2);
        assert_eq!(pick_from("op", &[1, 3], None, Some(2)).unwrap(), 1);
        assert_eq!(pick_from("op", &[1, 3], None, Some(9)).unwrap(), 3);
        assert_eq!(pick_from("op", &[1, 2, 3], Some(3), Some(1)).unwrap(), 3);
        let e = pick_from("op", &[2, 3], None, Some(1)).unwrap_err().to_string();
        assert!(e.contains("caps it at version 1") && e.contains("[2, 3]"), "{e}");
        // Past a launcher's best version only when the variable asks (or a version is forced).
        assert_eq!(choose("op", &[1, 2, 3, 4], 2, None, None).unwrap(), 2);
        assert_eq!(choose("op", &[1, 2, 3, 4], 2, None, Some(3)).unwrap(), 3);
        assert_eq!(choose("op", &[1, 2, 3, 4], 2, None, Some(9)).unwrap(), 4);
        assert_eq!(choose("op", &[1, 2, 3, 4], 2, None, Some(1)).unwrap(), 1);
    }

    #[test]
    fn scoped_pins_restores_and_serialises() {
        let op = "versions_scoped_test_op";
        {
            let _a = scoped(op, 2);
            assert_eq!(forced(op), Some(2));
            // A second scope on the same op waits until the first is dropped.
            let t = std::thread::spawn(move || {
                let _b = scoped(op, 3);
                forced(op)
            });
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert_eq!(forced(op), Some(2), "the waiting scope must not pin yet");
            drop(_a);
            assert_eq!(t.join().unwrap(), Some(3));
        }
        assert_eq!(forced(op), None);
        // Restored on unwind too.
        let r = std::panic::catch_unwind(|| {
            let _c = scoped(op, 4);
            panic!("inside");
        });
        assert!(r.is_err());
        assert_eq!(forced(op), None);
        let _d = scoped(op, 1);
        assert_eq!(forced(op), Some(1));
    }
}
