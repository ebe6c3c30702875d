//! Which CUDA version of an op's kernel runs.
//!
//! Each launcher runs the latest version its shapes allow (the rules are in the op's `.cu`
//! header). [`force`] pins an op to one version for the rest of the process, or until it is
//! cleared with `force(op, None)`: `smelt bench kernels` uses it to time every version of an op
//! side by side in one run, and device tests use it to check old versions against the CPU.
//! A forced version that does not exist, or cannot take the shapes of a call, is an error
//! naming the op, never a silent fallback.

use std::sync::{Condvar, Mutex};

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

/// The version a launcher runs: the forced one if it is among `allowed` (the versions that can
/// take this call's shapes), else an error naming the op; without a forced version, the last
/// of `allowed` (launchers list them oldest first).
pub fn pick(op: &'static str, allowed: &[u32]) -> smelt_engine::Result<u32> {
    match forced(op) {
        Some(v) if allowed.contains(&v) => Ok(v),
        Some(v) => Err(smelt_engine::Error::shape(
            op,
            format!("kernel version {v} was forced, but this call can run only versions {allowed:?}"),
        )),
        None => {
            allowed.last().copied().ok_or_else(|| smelt_engine::Error::shape(op, "no kernel version fits this call"))
        }
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
