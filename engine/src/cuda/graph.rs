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
//! Threads: a capture takes the device's one stream as a whole. Every operation that queues
//! work ([`CudaDevice::stream_turn`]: launches, GEMMs, copies, fills, synchronizes, replays)
//! waits while another thread captures, and a capture starts only when no other thread's
//! operation is in flight, so no thread's work ends up in another's graph.
//!
//! On the emulator a capture records each operation as a closure and a launch runs them in
//! order, with the same errors for what a graph cannot hold, so graph code is tested on CPU.

use std::sync::{Arc, MutexGuard};
use std::thread::{self, ThreadId};

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaGraph;

use super::{probe::driver_err, Backend, CudaDevice};
use crate::{Error, Result};

/// An emulated operation recorded during a capture.
pub type EmuOp = Box<dyn Fn() -> Result<()> + Send + Sync>;

/// A capture in progress.
pub(super) struct Capture {
    /// The capturing thread.
    owner: ThreadId,
    /// Blocks freed while capturing, which the graph keeps: (address, size class). The
    /// capture's own later allocations reuse them (one stream: its nodes form a chain, so a
    /// later node runs after every earlier user of the block).
    held: Vec<(u64, usize)>,
    /// The emulator's operations, in queue order.
    ops: Vec<EmuOp>,
}

/// Who holds the device's stream: the capture in progress, and the other operations in flight.
#[derive(Default)]
pub(super) struct StreamState {
    capture: Option<Capture>,
    in_flight: usize,
}

/// A turn on the device's stream, from [`CudaDevice::stream_turn`]; ends when dropped.
pub struct StreamTurn<'a> {
    device: &'a CudaDevice,
    counted: bool,
}

impl Drop for StreamTurn<'_> {
    fn drop(&mut self) {
        if self.counted {
            let mut st = self.device.stream_state();
            st.in_flight -= 1;
            if st.in_flight == 0 {
                self.device.stream_cv.notify_all();
            }
        }
    }
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
        let _turn = self.device.stream_turn();
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
    /// with `f`'s result. Nothing `f` queues runs until [`Graph::launch`]. Other threads' work
    /// on this device waits until the capture ends (and the capture waits for the work they
    /// have in flight). Fails (and leaves the stream as it was) when `f` fails or panics, when
    /// it queued what a graph cannot hold, while profiling, or inside another capture.
    pub fn capture<T>(self: &Arc<Self>, f: impl FnOnce() -> Result<T>) -> Result<(Graph, T)> {
        let fail = |detail: String| Error::Cuda { op: "graph capture", detail };
        if super::profile::enabled() {
            return Err(fail("not while profiling (its events cannot be captured)".into()));
        }
        if let Backend::Driver { .. } = &self.backend {
            // cuBLAS's setup allocates; done first, so a first GEMM inside the capture does not.
            let _ = self.blas();
        }
        let me = thread::current().id();
        {
            let mut st = self.stream_state();
            loop {
                match &st.capture {
                    Some(c) if c.owner == me => {
                        return Err(fail("a capture is already in progress on this thread".into()))
                    }
                    Some(_) => {}
                    None if st.in_flight == 0 => break,
                    None => {}
                }
                st = self.stream_cv.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            st.capture = Some(Capture { owner: me, held: Vec::new(), ops: Vec::new() });
        }
        // Ends the capture however `f` leaves (a panic included), returning what it held.
        let mut ending = Ending { device: self, armed: true };
        if let Backend::Driver { stream, .. } = &self.backend {
            // Relaxed: the allocator may call cuMemAlloc (not a stream operation) mid-capture.
            if let Err(e) = stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED) {
                // `ending` clears the capture state (its end_capture fails harmlessly).
                return Err(fail(format!("cuStreamBeginCapture: {}", driver_err(e))));
            }
        }
        let result = f();
        ending.armed = false;
        let exec = match &self.backend {
            // Always ended, so the stream leaves capture mode even when `f` failed.
            Backend::Driver { stream, .. } => match stream.end_capture(CUgraphInstantiate_flags(0)) {
                Ok(Some(g)) => Ok(Exec::Driver(g)),
                Ok(None) => Err(fail("cuStreamEndCapture returned no graph".into())),
                Err(e) => Err(fail(format!("cuStreamEndCapture / cuGraphInstantiate: {}", driver_err(e)))),
            },
            Backend::Emulator => Ok(Exec::Emulator(Vec::new())),
        };
        let mut cap = self.end_capture_state();
        match (result, exec) {
            (Ok(t), Ok(Exec::Emulator(_))) => {
                let ops = std::mem::take(&mut cap.ops);
                Ok((self.graph(cap, Exec::Emulator(ops)), t))
            }
            (Ok(t), Ok(exec)) => Ok((self.graph(cap, exec), t)),
            // Dropping the half-built graph returns the held blocks.
            (Err(e), _) | (_, Err(e)) => {
                drop(self.graph(cap, Exec::Emulator(Vec::new())));
                Err(e)
            }
        }
    }

    fn graph(self: &Arc<Self>, cap: Capture, exec: Exec) -> Graph {
        Graph { device: self.clone(), exec, held: cap.held }
    }

    /// A turn on this device's stream, for an operation that queues work on it: waits while
    /// another thread captures. Held for the length of the operation; turns nest.
    pub fn stream_turn(&self) -> StreamTurn<'_> {
        let me = thread::current().id();
        let mut st = self.stream_state();
        loop {
            match &st.capture {
                Some(c) if c.owner == me => return StreamTurn { device: self, counted: false },
                Some(_) => st = self.stream_cv.wait(st).unwrap_or_else(|p| p.into_inner()),
                None => break,
            }
        }
        st.in_flight += 1;
        StreamTurn { device: self, counted: true }
    }

    /// The stream's state; a poisoned lock only means another thread panicked mid-update.
    pub(super) fn stream_state(&self) -> MutexGuard<'_, StreamState> {
        self.stream.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the calling thread is capturing on this device.
    pub fn is_capturing(&self) -> bool {
        let me = thread::current().id();
        self.stream_state().capture.as_ref().is_some_and(|c| c.owner == me)
    }

    /// On the emulator while capturing, records `op` instead of running it and returns true.
    /// Emulated launchers call this before running an operation.
    pub fn emu_record(&self, op: impl FnOnce() -> EmuOp) -> bool {
        if !self.is_emulated() {
            return false;
        }
        let me = thread::current().id();
        match self.stream_state().capture.as_mut() {
            Some(cap) if cap.owner == me => {
                cap.ops.push(op());
                true
            }
            _ => false,
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

    /// Keeps a block freed during a capture (by any thread) out of the pool; returns whether it
    /// was held.
    pub(super) fn hold_if_capturing(&self, ptr: u64, class: usize) -> bool {
        match self.stream_state().capture.as_mut() {
            Some(c) => {
                c.held.push((ptr, class));
                true
            }
            None => false,
        }
    }

    /// For the capturing thread: a block of size class `class` that the capture freed earlier.
    pub(super) fn reuse_in_capture(&self, class: usize) -> Option<u64> {
        let me = thread::current().id();
        let mut st = self.stream_state();
        let cap = st.capture.as_mut().filter(|c| c.owner == me)?;
        let i = cap.held.iter().position(|&(_, c)| c == class)?;
        Some(cap.held.swap_remove(i).0)
    }

    fn end_capture_state(&self) -> Capture {
        let mut st = self.stream_state();
        let cap = st.capture.take();
        self.stream_cv.notify_all();
        cap.unwrap_or(Capture { owner: thread::current().id(), held: Vec::new(), ops: Vec::new() })
    }
}

/// Ends a capture that did not reach its normal end (`f` panicked, or the stream never began
/// capturing): the stream leaves capture mode, and the blocks it held go back to the pool.
struct Ending<'a> {
    device: &'a Arc<CudaDevice>,
    armed: bool,
}

impl Drop for Ending<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Backend::Driver { stream, .. } = &self.device.backend {
            let _ = stream.end_capture(CUgraphInstantiate_flags(0));
        }
        drop(self.device.graph(self.device.end_capture_state(), Exec::Emulator(Vec::new())));
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{device_tests_lock, test_device};
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn read(dev: &CudaDevice, s: &super::super::CudaStorage) -> Vec<u8> {
        let mut out = vec![0u8; s.len_bytes()];
        dev.dtoh(s, 0, &mut out).unwrap();
        out
    }

    /// Another thread's work on the device during a capture waits for the capture to end: it
    /// is neither captured (a replay does not repeat it) nor refused.
    #[test]
    fn device_capture_makes_other_threads_wait() {
        let _turn = device_tests_lock();
        let Some(dev) = test_device() else { return };
        let buf = Arc::new(dev.alloc(4096).unwrap());
        dev.htod(&[1u8; 4096], &buf, 0).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let (graph, (worker, done_mid_capture)) = dev
            .capture(|| {
                let (dev, buf, flag) = (dev.clone(), buf.clone(), done.clone());
                let worker = thread::spawn(move || {
                    dev.memset_zero(buf.ptr(), 4096).unwrap();
                    dev.synchronize().unwrap();
                    flag.store(true, Ordering::SeqCst);
                });
                thread::sleep(std::time::Duration::from_millis(200));
                Ok((worker, done.load(Ordering::SeqCst)))
            })
            .unwrap();
        worker.join().unwrap();
        assert!(!done_mid_capture, "another thread's work ran during the capture");
        assert_eq!(read(&dev, &buf), vec![0u8; 4096], "the other thread's fill did not run after the capture");
        dev.htod(&[1u8; 4096], &buf, 0).unwrap();
        graph.launch().unwrap();
        assert_eq!(read(&dev, &buf), vec![1u8; 4096], "the other thread's fill was captured");
    }

    /// A capture that panics leaves the stream usable and returns the blocks it freed.
    #[test]
    fn device_capture_survives_a_panic() {
        let _turn = device_tests_lock();
        let Some(dev) = test_device() else { return };
        let in_use = dev.alloc_stats().in_use;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            dev.capture(|| -> Result<()> {
                let _scratch = dev.alloc(1000)?;
                panic!("boom")
            })
        }));
        assert!(r.is_err());
        assert!(!dev.is_capturing());
        let s = dev.alloc(16).unwrap();
        dev.htod(&[7u8; 16], &s, 0).unwrap();
        dev.synchronize().unwrap();
        assert_eq!(read(&dev, &s), vec![7u8; 16]);
        drop(s);
        assert_eq!(dev.alloc_stats().in_use, in_use, "the capture's block was not returned");
    }

    /// Within a capture, a freed block serves the capture's next allocation of its size; the
    /// graph keeps it from everything else until it is dropped.
    #[test]
    fn device_capture_reuses_its_own_blocks_and_holds_them() {
        let _turn = device_tests_lock();
        let Some(dev) = test_device() else { return };
        let n = 12_345;
        let (graph, (first, second)) = dev
            .capture(|| {
                let a = dev.alloc(n)?;
                let first = a.ptr();
                drop(a);
                let b = dev.alloc(n)?;
                Ok((first, b.ptr()))
            })
            .unwrap();
        assert_eq!(first, second, "the capture did not reuse its own freed block");
        let outside: Vec<_> = (0..4).map(|_| dev.alloc(n).unwrap()).collect();
        assert!(outside.iter().all(|s| s.ptr() != first), "a block the graph uses was handed out");
        let in_use = dev.alloc_stats().in_use;
        drop(graph);
        assert_eq!(
            dev.alloc_stats().in_use + super::super::size_class(n),
            in_use,
            "the graph's block was not returned"
        );
    }

    /// Out of memory inside a capture fails at once with `OutOfMemory`: emptying the cache
    /// would wait for the stream, which a capture cannot. The cache is kept.
    #[test]
    fn device_out_of_memory_inside_a_capture() {
        let _turn = device_tests_lock();
        let Some(dev) = test_device() else { return };
        drop(dev.alloc(1 << 20).unwrap());
        let cached = dev.alloc_stats().cached;
        assert!(cached > 0);
        let too_big = dev.total_mem() + (1 << 30);
        let e = dev.capture(|| dev.alloc(too_big).map(|_| ())).err().expect("an impossible allocation");
        assert!(matches!(e, Error::OutOfMemory { .. }), "{e}");
        assert_eq!(dev.alloc_stats().cached, cached, "the cache was lost");
        assert!(!dev.is_capturing());
    }
}
