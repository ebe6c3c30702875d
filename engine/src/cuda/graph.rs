//! Stream capture into CUDA graphs: a stretch of work queued once and replayed with one launch,
//! for loops whose host cost per operation exceeds the GPU's (a decode step is ~250 small
//! launches; see `smelt_models::DecodeGraphs`).
//!
//! [`CudaDevice::capture`] runs a closure with the compute stream in capture mode: its kernel
//! launches, cuBLAS calls, device-to-device copies and fills become the graph's nodes, in order,
//! instead of running. What a graph cannot hold is an error, raised by the call, not at replay:
//! a copy to or from the host, or a synchronize (each would wait on work that has not run).
//! So a captured stretch takes its per-replay inputs from device buffers the caller fills
//! before each [`Graph::launch`], and its launch shapes must not depend on those inputs.
//!
//! Memory: the nodes keep the addresses they were captured with. Blocks freed during the
//! capture therefore stay out of the allocator's pool until the graph is dropped, and tensors
//! the capture allocated and the caller keeps (the outputs) must live as long as the graph.
//! Replays and all other work share the one compute stream, so returning the held blocks at
//! drop is ordered after the last replay (the allocator's usual reasoning).
//!
//! On the emulator a capture records each operation as a closure and a launch runs them in
//! order, with the same errors for what a graph cannot hold, so graph code is tested on CPU.

use std::sync::Arc;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaGraph;

use super::{probe::driver_err, Backend, CudaDevice};
use crate::{Error, Result};

/// An emulated operation recorded during a capture.
pub type EmuOp = Box<dyn Fn() -> Result<()> + Send + Sync>;

/// The state of a capture in progress.
#[derive(Default)]
pub(super) struct Capture {
    /// Blocks freed while capturing: (address, size class).
    held: Vec<(u64, usize)>,
    /// The emulator's operations, in queue order.
    ops: Vec<EmuOp>,
}

/// A captured stretch of device work. See the module docs.
pub struct Graph {
    device: Arc<CudaDevice>,
    exec: Exec,
    held: Vec<(u64, usize)>,
}

enum Exec {
    Driver(CudaGraph),
    Emulator(Vec<EmuOp>),
}

impl Graph {
    /// Queues one replay on the compute stream.
    pub fn launch(&self) -> Result<()> {
        match &self.exec {
            Exec::Driver(g) => {
                g.launch().map_err(|e| Error::Cuda { op: "cuGraphLaunch", detail: driver_err(e) })?;
                self.device.debug_sync("graph launch")
            }
            Exec::Emulator(ops) => ops.iter().try_for_each(|op| op()),
        }
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        let mut pool = self.device.pool.lock().unwrap_or_else(|p| p.into_inner());
        for (ptr, class) in self.held.drain(..) {
            pool.give_back(ptr, class);
        }
    }
}

impl CudaDevice {
    /// Runs `f` with this device's compute stream captured into a graph, and returns the graph
    /// with `f`'s result. Nothing `f` queues runs until [`Graph::launch`]. The device's one
    /// stream is captured as a whole: no other thread may queue work on this device meanwhile
    /// (its copies would be refused, its launches captured). Fails (and leaves
    /// the stream as it was) when `f` fails, when it queued what a graph cannot hold, while
    /// profiling, or when a capture is already in progress.
    pub fn capture<T>(self: &Arc<Self>, f: impl FnOnce() -> Result<T>) -> Result<(Graph, T)> {
        let fail = |detail: String| Error::Cuda { op: "graph capture", detail };
        if super::profile::enabled() {
            return Err(fail("not while profiling (its events cannot be captured)".into()));
        }
        {
            let mut cap = self.capture.lock().map_err(|_| fail("capture state poisoned".into()))?;
            if cap.is_some() {
                return Err(fail("a capture is already in progress on this device".into()));
            }
            *cap = Some(Capture::default());
        }
        if let Backend::Driver { stream, .. } = &self.backend {
            // Relaxed: the allocator may call cuMemAlloc (not a stream operation) mid-capture.
            if let Err(e) = stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED) {
                self.end_capture_state();
                return Err(fail(format!("cuStreamBeginCapture: {}", driver_err(e))));
            }
        }
        let result = f();
        let exec = match &self.backend {
            // Always ended, so the stream leaves capture mode even when `f` failed.
            Backend::Driver { stream, .. } => match stream.end_capture(CUgraphInstantiate_flags(0)) {
                Ok(Some(g)) => Ok(Exec::Driver(g)),
                Ok(None) => Err(fail("cuStreamEndCapture returned no graph".into())),
                Err(e) => Err(fail(format!("cuStreamEndCapture / cuGraphInstantiate: {}", driver_err(e)))),
            },
            Backend::Emulator => Ok(Exec::Emulator(Vec::new())),
        };
        let cap = self.end_capture_state();
        let graph = |exec| Graph { device: self.clone(), exec, held: cap.held };
        match (result, exec) {
            (Ok(t), Ok(Exec::Emulator(_))) => Ok((graph(Exec::Emulator(cap.ops)), t)),
            (Ok(t), Ok(exec)) => Ok((graph(exec), t)),
            // Dropping the half-built graph returns the held blocks.
            (Err(e), _) | (_, Err(e)) => {
                drop(graph(Exec::Emulator(Vec::new())));
                Err(e)
            }
        }
    }

    /// Whether a capture is in progress on this device.
    pub fn is_capturing(&self) -> bool {
        self.capture.lock().map(|c| c.is_some()).unwrap_or(false)
    }

    /// On the emulator while capturing, records `op` instead of running it and returns true.
    /// Emulated launchers call this before running an operation.
    pub fn emu_record(&self, op: impl FnOnce() -> EmuOp) -> bool {
        if !self.is_emulated() {
            return false;
        }
        let Ok(mut cap) = self.capture.lock() else { return false };
        match cap.as_mut() {
            Some(cap) => {
                cap.ops.push(op());
                true
            }
            None => false,
        }
    }

    /// The error for an operation a graph cannot hold, when capturing.
    pub(super) fn refuse_in_capture(&self, what: &str) -> Result<()> {
        if self.is_capturing() {
            return Err(Error::Cuda {
                op: "graph capture",
                detail: format!(
                    "{what} cannot be captured (it waits on work that has not run); capture only \
                     launches, matmuls and device-to-device copies"
                ),
            });
        }
        Ok(())
    }

    /// Keeps a block freed during a capture out of the pool; returns whether it was held.
    pub(super) fn hold_if_capturing(&self, ptr: u64, class: usize) -> bool {
        let Ok(mut cap) = self.capture.lock() else { return false };
        match cap.as_mut() {
            Some(c) => {
                c.held.push((ptr, class));
                true
            }
            None => false,
        }
    }

    fn end_capture_state(&self) -> Capture {
        self.capture.lock().map(|mut c| c.take().unwrap_or_default()).unwrap_or_default()
    }
}
