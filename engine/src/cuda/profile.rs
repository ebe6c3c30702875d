//! Per-operation timing of what smelt queues on a device, to find where a step's time goes
//! without an external tracer (the GPU machine has Nsight Compute, which times one kernel at a
//! time, but no Nsight Systems). Off unless switched on with [`enable`]; every span is kept (two
//! CUDA events each) until [`take`], so profile a bounded stretch of work, then take.
//!
//! While on, every kernel launch, cuBLAS call, copy, memset, driver allocation and free is a
//! [`Span`]: two CUDA events around it on the compute stream (GPU time; not for allocations and
//! frees, which queue nothing on it) and the host time spent in the call (for a copy to or from
//! the host that includes waiting for the stream, which is exactly what makes such a copy
//! expensive). [`take`] waits for the stream and sums the spans
//! per name. Creating and recording two events costs the host a few microseconds per
//! operation, so a profiled step runs a little slower than an unprofiled one. Where the GPU has
//! caught up with the host, an operation's GPU time also holds the wait for its own launch, so a
//! host-bound stretch shows as many short operations whose GPU times barely exceed their host
//! times.
//!
//! [`record`] profiles what one thread queues, and only that: tests that record run beside
//! others on one device, and a global switch would mix their operations into each other's
//! profiles (and one test's "off" would end another's recording).
//!
//! On the CUDA emulator there are no events: spans record host time only, which there is also
//! the time the (synchronous) operation took.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::thread::{self, ThreadId};
use std::time::Instant;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaStream};

use super::CudaDevice;
use crate::{Error, Result};

static ON: AtomicBool = AtomicBool::new(false);
static SPANS: Mutex<Vec<Finished>> = Mutex::new(Vec::new());

thread_local! {
    /// This thread is inside [`record`].
    static RECORDING: Cell<bool> = const { Cell::new(false) };
}

struct Finished {
    name: String,
    events: Option<(CudaEvent, CudaEvent)>,
    host_s: f64,
    thread: ThreadId,
}

/// Switches profiling on or off for the whole process (all devices). Spans already finished
/// are kept until [`take`].
pub fn enable(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

/// Whether operations this thread queues are being profiled.
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed) || RECORDING.with(Cell::get)
}

/// One operation being timed; [`Span::finish`] after queueing it.
pub struct Span {
    name: String,
    t0: Instant,
    start: Option<(CudaEvent, std::sync::Arc<CudaStream>)>,
}

/// Starts a span for an operation about to be queued on `dev`, or `None` when profiling is off.
/// `name` is only evaluated when it is on.
pub fn span(dev: &CudaDevice, name: impl FnOnce() -> String) -> Option<Span> {
    if !enabled() {
        return None;
    }
    // An event that cannot be created or recorded costs this span its GPU time, not the op.
    let start = match (dev.context(), dev.stream()) {
        (Ok(ctx), Ok(stream)) => ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .ok()
            .filter(|e| e.record(stream).is_ok())
            .map(|e| (e, stream.clone())),
        _ => None,
    };
    Some(Span { name: name(), t0: Instant::now(), start })
}

impl Span {
    /// Ends the span: records the end event after the operation and keeps the span for [`take`].
    pub fn finish(self) {
        let host_s = self.t0.elapsed().as_secs_f64();
        let events = self.start.and_then(|(start, stream)| {
            let end = stream.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).ok()?;
            end.record(&stream).ok()?;
            Some((start, end))
        });
        let mut spans = SPANS.lock().unwrap_or_else(|p| p.into_inner());
        spans.push(Finished { name: self.name, events, host_s, thread: thread::current().id() });
    }
}

/// Runs `f`, the queueing of one operation on `dev`, inside a span named `name` (just `f()`
/// when profiling is off).
pub fn timed<T>(dev: &CudaDevice, name: impl FnOnce() -> String, f: impl FnOnce() -> T) -> T {
    if !enabled() {
        return f();
    }
    // A turn on the stream from the start event to the end event: a capture on another thread
    // cannot begin between them and take this span's events into its graph.
    let _turn = dev.stream_turn();
    let span = span(dev, name);
    let r = f();
    if let Some(s) = span {
        s.finish();
    }
    r
}

/// [`timed`] for a driver call that queues nothing on the stream (an allocation or a free, made
/// under the allocator's lock): host time only, with no events and so no turn on the stream,
/// which could wait for another thread's capture while that capture waits for the allocator.
pub fn timed_host<T>(name: impl FnOnce() -> String, f: impl FnOnce() -> T) -> T {
    if !enabled() {
        return f();
    }
    let span = Span { name: name(), t0: Instant::now(), start: None };
    let r = f();
    span.finish();
    r
}

/// Runs `f` with profiling on for this thread and returns its result with the operations this
/// thread queued on `dev` meanwhile; other threads' operations are neither recorded nor taken.
pub fn record<T>(dev: &CudaDevice, f: impl FnOnce() -> T) -> Result<(T, Vec<ProfileRow>)> {
    let me = thread::current().id();
    // Spans this thread finished before (with profiling switched on globally) are not f's.
    drop(spans_where(|s| s.thread == me)?);
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            RECORDING.set(self.0);
        }
    }
    // Restored also when `f` panics, so the thread does not go on profiling.
    let restore = Restore(RECORDING.replace(true));
    let r = f();
    drop(restore);
    dev.synchronize()?;
    Ok((r, summed(spans_where(|s| s.thread == me)?)?))
}

/// Removes and returns the finished spans that `keep` selects.
fn spans_where(keep: impl Fn(&Finished) -> bool) -> Result<Vec<Finished>> {
    let mut all = SPANS.lock().map_err(|_| Error::msg("profile: span list poisoned"))?;
    let (taken, left) = std::mem::take(&mut *all).into_iter().partition(keep);
    *all = left;
    Ok(taken)
}

/// One operation name's totals.
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileRow {
    /// e.g. `attention::attn_bwd_dkdv_bf16_d64`, `cublas gemm bf16 NT`, `copy host→device`.
    pub name: String,
    pub calls: usize,
    /// Sum of event-to-event times; `None` when no span of this name had events (emulator).
    pub gpu_ms: Option<f64>,
    /// Sum of the host time spent in the calls.
    pub host_ms: f64,
}

/// Waits for `dev`'s stream, then returns and forgets every finished span, summed per name,
/// most GPU time first (host time where there is none).
pub fn take(dev: &CudaDevice) -> Result<Vec<ProfileRow>> {
    dev.synchronize()?;
    summed(spans_where(|_| true)?)
}

/// Finished spans summed per name, most GPU time first (host time where there is none).
fn summed(spans: Vec<Finished>) -> Result<Vec<ProfileRow>> {
    let mut rows: HashMap<String, ProfileRow> = HashMap::new();
    for s in spans {
        let ms = match &s.events {
            Some((a, b)) => Some(
                a.elapsed_ms(b)
                    .map_err(|e| Error::Cuda { op: "profile", detail: format!("cuEventElapsedTime: {e:?}") })?
                    as f64,
            ),
            None => None,
        };
        let r = rows.entry(s.name.clone()).or_insert(ProfileRow { name: s.name, calls: 0, gpu_ms: None, host_ms: 0.0 });
        r.calls += 1;
        r.host_ms += s.host_s * 1e3;
        if let Some(ms) = ms {
            r.gpu_ms = Some(r.gpu_ms.unwrap_or(0.0) + ms);
        }
    }
    let mut rows: Vec<ProfileRow> = rows.into_values().collect();
    let key = |r: &ProfileRow| r.gpu_ms.unwrap_or(r.host_ms);
    rows.sort_by(|a, b| key(b).total_cmp(&key(a)).then_with(|| a.name.cmp(&b.name)));
    Ok(rows)
}
