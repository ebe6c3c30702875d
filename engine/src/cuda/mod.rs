//! The CUDA backend: device discovery that never panics, one compute stream per device, a
//! caching allocator, host↔device copies, and cuBLAS matmul.
//!
//! Libraries are loaded at run time (cudarc `dynamic-loading`), so a build needs no CUDA and a
//! machine without a GPU gets [`Error::CudaUnavailable`] with the reason, never a panic: the
//! driver, NVRTC and cuBLAS are each checked for with cudarc's `is_culib_present()` before
//! their first call.
//!
//! Ordering model: every kernel launch, copy and cuBLAS call of a device goes to its single
//! compute stream ([`CudaDevice::stream`]). That is what makes the allocator's immediate reuse
//! of freed blocks safe, and why cudarc's per-buffer event tracking is switched off before
//! anything is allocated. Code that adds a second stream must order it against this one itself.
//!
//! `SMELT_CUDA_SYNC=1` (or a debug build) synchronizes after each cuBLAS call and kernel
//! launch, so an asynchronous fault is reported by the call that caused it.

mod alloc;
pub mod emu;
mod gemm;
mod graph;
mod probe;
pub mod profile;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{result as drv, sys as drv_sys, CudaContext, CudaStream};

pub use alloc::{size_class, AllocStats};
pub use gemm::Gemm;
pub use graph::{EmuOp, Graph};
pub use probe::{
    cublas_info, cublas_present, device_count, device_info, driver_info, nvrtc_info, nvrtc_present, nvrtc_version,
    probe, DeviceInfo, LibInfo, Probe,
};

use crate::{Device, Error, Result};
use probe::driver_err;

/// One CUDA device: its context, its compute stream, its allocator and its cuBLAS handle.
/// Obtained with [`device`]; lives for the rest of the process.
pub struct CudaDevice {
    ordinal: usize,
    backend: Backend,
    pool: Mutex<alloc::Pool>,
    name: String,
    compute_capability: (i32, i32),
    total_mem: usize,
    /// The capture in progress, if any ([`CudaDevice::capture`]), and the operations in flight.
    stream: Mutex<graph::StreamState>,
    stream_cv: std::sync::Condvar,
}

/// Device memory from the caching allocator. Dropping it returns the block to the allocator.
pub struct CudaStorage {
    ptr: u64,
    len_bytes: usize,
    /// Size class actually reserved (0 for an empty allocation, which holds no block).
    class: usize,
    device: Arc<CudaDevice>,
}

impl CudaStorage {
    pub fn ordinal(&self) -> usize {
        self.device.ordinal
    }
    /// Bytes requested (the block may be larger).
    pub fn len_bytes(&self) -> usize {
        self.len_bytes
    }
    /// Raw device address of the first byte (0 for an empty allocation).
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }
}

impl Drop for CudaStorage {
    fn drop(&mut self) {
        if self.class > 0 {
            self.device.release(self.ptr, self.class);
        }
    }
}

impl std::fmt::Debug for CudaStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaStorage(cuda:{}, {:#x}, {} bytes)", self.device.ordinal, self.ptr, self.len_bytes)
    }
}

/// What runs a device's work: the NVIDIA driver, or the CPU emulator ([`emu`]).
enum Backend {
    Driver {
        ctx: Arc<CudaContext>,
        stream: Arc<CudaStream>,
        blas: OnceLock<std::result::Result<Mutex<CudaBlas>, String>>,
    },
    Emulator,
}

fn cuda_err(op: &'static str) -> impl Fn(drv::DriverError) -> Error {
    move |e| Error::Cuda { op, detail: driver_err(e) }
}

/// Whether to synchronize after every launch (debug builds, or `SMELT_CUDA_SYNC=1`).
pub fn sync_after_launch() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    *V.get_or_init(|| cfg!(debug_assertions) || std::env::var("SMELT_CUDA_SYNC").as_deref() == Ok("1"))
}

/// The device with this ordinal, created on first use (context, stream, allocator).
///
/// Fails with [`Error::CudaUnavailable`] saying why when there is no driver library, the driver
/// reports no device, or the ordinal is out of range.
///
/// With `SMELT_CUDA_EMULATOR=1`, `cuda:0` is the CPU emulator instead (see [`emu`]), whether or
/// not a GPU is present.
pub fn device(ordinal: usize) -> Result<Arc<CudaDevice>> {
    static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<CudaDevice>>>> = OnceLock::new();
    let n = if emu::requested() { 1 } else { device_count()? };
    if n == 0 {
        return Err(Error::CudaUnavailable("the NVIDIA driver is installed but reports no CUDA device".into()));
    }
    if ordinal >= n {
        return Err(Error::CudaUnavailable(format!(
            "cuda:{ordinal} requested but only {n} CUDA device(s) present (ordinals 0..{})",
            n - 1
        )));
    }
    let mut map =
        DEVICES.get_or_init(Default::default).lock().map_err(|_| Error::msg("CUDA device registry poisoned"))?;
    if let Some(d) = map.get(&ordinal) {
        return Ok(d.clone());
    }
    let d = Arc::new(if emu::requested() { CudaDevice::emulator() } else { CudaDevice::create(ordinal)? });
    map.insert(ordinal, d.clone());
    Ok(d)
}

impl CudaDevice {
    fn create(ordinal: usize) -> Result<CudaDevice> {
        let ctx = CudaContext::new(ordinal).map_err(|e| {
            Error::CudaUnavailable(format!("cuda:{ordinal}: creating the context failed: {}", driver_err(e)))
        })?;
        // Before any allocation: we order all work on one stream ourselves, and event tracking
        // would add driver calls to every launch once a second stream exists.
        // SAFETY: nothing has been allocated in this context through cudarc yet.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(cuda_err("cuStreamCreate"))?;
        let name = ctx.name().map_err(cuda_err("cuDeviceGetName"))?;
        let compute_capability = ctx.compute_capability().map_err(cuda_err("cuDeviceGetAttribute"))?;
        let total_mem = ctx.total_mem().map_err(cuda_err("cuDeviceTotalMem"))?;
        Ok(CudaDevice {
            ordinal,
            backend: Backend::Driver { ctx, stream, blas: OnceLock::new() },
            pool: Mutex::new(alloc::Pool::default()),
            name,
            compute_capability,
            total_mem,
            stream: Mutex::new(Default::default()),
            stream_cv: std::sync::Condvar::new(),
        })
    }

    /// The CPU emulator as `cuda:0`; it reports itself as an sm_90 device.
    fn emulator() -> CudaDevice {
        CudaDevice {
            ordinal: 0,
            backend: Backend::Emulator,
            pool: Mutex::new(alloc::Pool::default()),
            name: if emu::dry() {
                "smelt CUDA emulator, dry run (SMELT_EMU_DRY=1: no kernel runs, times are not measurements)".into()
            } else {
                "smelt CUDA emulator (CPU; SMELT_CUDA_EMULATOR=1)".into()
            },
            compute_capability: (9, 0),
            total_mem: emu::total_mem(),
            stream: Mutex::new(Default::default()),
            stream_cv: std::sync::Condvar::new(),
        }
    }

    /// Whether this device is the CPU emulator (kernels then run through `cuda_emu.hpp`).
    pub fn is_emulated(&self) -> bool {
        matches!(self.backend, Backend::Emulator)
    }

    fn driver(&self, what: &str) -> Result<(&Arc<CudaContext>, &Arc<CudaStream>)> {
        match &self.backend {
            Backend::Driver { ctx, stream, .. } => Ok((ctx, stream)),
            Backend::Emulator => {
                Err(Error::CudaUnavailable(format!("{what}: the CUDA emulator has no driver context or stream")))
            }
        }
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }
    pub fn as_device(&self) -> Device {
        Device::Cuda(self.ordinal)
    }
    pub fn name(&self) -> &str {
        &self.name
    }
    /// `(major, minor)`, e.g. `(9, 0)` for an H100.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }
    /// The NVRTC architecture of this device, e.g. `"sm_90"`.
    pub fn arch(&self) -> String {
        format!("sm_{}{}", self.compute_capability.0, self.compute_capability.1)
    }
    pub fn total_mem(&self) -> usize {
        self.total_mem
    }
    /// `(free, total)` device memory as the driver reports it.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        match &self.backend {
            Backend::Driver { ctx, .. } => ctx.mem_get_info().map_err(cuda_err("cuMemGetInfo")),
            Backend::Emulator => Ok((self.total_mem.saturating_sub(self.bytes_reserved()), self.total_mem)),
        }
    }

    /// The compute stream every op of this device runs on (for kernel launchers); the emulator
    /// has none.
    pub fn stream(&self) -> Result<&Arc<CudaStream>> {
        self.driver("stream").map(|(_, s)| s)
    }
    /// The cudarc context (for module loading and raw driver calls); the emulator has none.
    pub fn context(&self) -> Result<&Arc<CudaContext>> {
        self.driver("context").map(|(c, _)| c)
    }
    /// Makes this device's context current on the calling thread; raw driver calls need it.
    pub fn bind(&self) -> Result<()> {
        match &self.backend {
            Backend::Driver { ctx, .. } => ctx.bind_to_thread().map_err(cuda_err("cuCtxSetCurrent")),
            Backend::Emulator => Ok(()),
        }
    }

    /// Waits for all queued work, and reports any error an earlier asynchronous call left.
    /// (The emulator runs everything synchronously.)
    pub fn synchronize(&self) -> Result<()> {
        let _turn = self.stream_turn();
        self.refuse_in_capture("a synchronize")?;
        let Backend::Driver { ctx, stream, .. } = &self.backend else { return Ok(()) };
        stream.synchronize().map_err(cuda_err("cuStreamSynchronize"))?;
        ctx.check_err().map_err(cuda_err("deferred error"))
    }

    /// Synchronizes and names `op` on failure when [`sync_after_launch`] is on.
    pub fn debug_sync(&self, op: &str) -> Result<()> {
        let Backend::Driver { stream, .. } = &self.backend else { return Ok(()) };
        if sync_after_launch() && !self.is_capturing() {
            stream.synchronize().map_err(|e| Error::Cuda {
                op: "synchronize after launch",
                detail: format!("{op}: {}", driver_err(e)),
            })?;
        }
        Ok(())
    }

    /// The cuBLAS handle (created on first use, bound to the compute stream).
    pub fn blas(&self) -> Result<&Mutex<CudaBlas>> {
        let Backend::Driver { stream, blas, .. } = &self.backend else {
            return Err(Error::CudaUnavailable("the CUDA emulator has no cuBLAS (its matmul runs on the CPU)".into()));
        };
        blas.get_or_init(|| {
            if !cublas_present() {
                return Err(probe::CUBLAS_MISSING.to_string());
            }
            self.bind().map_err(|e| e.to_string())?;
            let blas = CudaBlas::new(stream.clone()).map_err(|e| format!("cublasCreate: {:?}", e.0))?;
            // A workspace of our own (cuBLAS's default size on sm_90), so that a GEMM queued
            // inside a graph capture never makes cuBLAS allocate one. Held for the process.
            const WORKSPACE: usize = 32 << 20;
            // SAFETY: a plain allocation in the bound context, never freed.
            let ws = unsafe { drv::malloc_sync(WORKSPACE) }
                .map_err(|e| format!("cuMemAlloc (cuBLAS workspace): {}", driver_err(e)))?;
            // SAFETY: the handle is live; the workspace is device memory of WORKSPACE bytes that
            // outlives it.
            let st = unsafe {
                cudarc::cublas::sys::cublasSetWorkspace_v2(*blas.handle(), ws as *mut std::ffi::c_void, WORKSPACE)
            };
            if st != cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(format!("cublasSetWorkspace: {st:?}"));
            }
            Ok(Mutex::new(blas))
        })
        .as_ref()
        .map_err(|e| Error::CudaUnavailable(format!("cuBLAS on cuda:{}: {e}", self.ordinal)))
    }

    // ---- memory -------------------------------------------------------------------------

    /// `bytes` of uninitialised device memory from the caching allocator.
    ///
    /// On `CUDA_ERROR_OUT_OF_MEMORY` the cache is emptied and the allocation retried once;
    /// then it fails with [`Error::OutOfMemory`]. Inside a graph capture the cache cannot be
    /// emptied (that waits for the stream): there it fails at once.
    pub fn alloc(self: &Arc<Self>, bytes: usize) -> Result<CudaStorage> {
        if bytes == 0 {
            return Ok(CudaStorage { ptr: 0, len_bytes: 0, class: 0, device: self.clone() });
        }
        let class = size_class(bytes);
        let storage = |ptr| {
            if self.is_emulated() {
                emu::track(ptr, bytes, class);
            }
            Ok(CudaStorage { ptr, len_bytes: bytes, class, device: self.clone() })
        };
        if let Some(ptr) = self.reuse_in_capture(class) {
            return storage(ptr);
        }
        let mut pool = self.lock_pool()?;
        if let Some(ptr) = pool.take(class) {
            return storage(ptr);
        }
        let oom = |in_use| Error::OutOfMemory { op: "alloc", requested: bytes, in_use, device: self.as_device() };
        if self.is_emulated() {
            // Held to the reported capacity, so out-of-memory paths can be tested.
            let fits = |p: &alloc::Pool| p.stats.in_use + p.stats.cached + class <= self.total_mem;
            if !fits(&pool) {
                drop(pool);
                pool = self.emptied_pool(&oom)?;
                if !fits(&pool) {
                    return Err(oom(pool.stats.in_use));
                }
            }
            let ptr = emu::malloc(class)?;
            pool.add_new(class);
            return storage(ptr);
        }
        self.bind()?;
        // SAFETY: plain allocation in the bound context.
        let first =
            profile::timed_host(|| "cuMemAlloc (allocator cache miss)".into(), || unsafe { drv::malloc_sync(class) });
        let ptr = match first {
            Ok(p) => p,
            Err(e) if e.0 == drv_sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
                drop(pool);
                pool = self.emptied_pool(&oom)?;
                // SAFETY: as above.
                match unsafe { drv::malloc_sync(class) } {
                    Ok(p) => p,
                    Err(e) if e.0 == drv_sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => return Err(oom(pool.stats.in_use)),
                    Err(e) => return Err(cuda_err("cuMemAlloc")(e)),
                }
            }
            Err(e) => return Err(cuda_err("cuMemAlloc")(e)),
        };
        pool.add_new(class);
        storage(ptr)
    }

    /// The pool, locked, after returning its cached blocks to the driver; inside a capture of
    /// this thread, where that is impossible, `oom(bytes in use)`. Waits while another thread
    /// captures (taking the stream's turn before the pool's lock, the order every path keeps).
    fn emptied_pool(&self, oom: &dyn Fn(usize) -> Error) -> Result<std::sync::MutexGuard<'_, alloc::Pool>> {
        if self.is_capturing() {
            return Err(oom(self.alloc_stats().in_use));
        }
        let _turn = self.stream_turn();
        let mut pool = self.lock_pool()?;
        self.free_cached(&mut pool)?;
        Ok(pool)
    }

    fn lock_pool(&self) -> Result<std::sync::MutexGuard<'_, alloc::Pool>> {
        self.pool.lock().map_err(|_| Error::msg("CUDA allocator lock poisoned"))
    }

    fn release(&self, ptr: u64, class: usize) {
        // A poisoned lock only means another thread panicked mid-update; keep the block anyway.
        if self.is_emulated() {
            emu::untrack(ptr);
        }
        if self.hold_if_capturing(ptr, class) {
            return;
        }
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.give_back(ptr, class);
    }

    fn free_cached(&self, pool: &mut alloc::Pool) -> Result<()> {
        let blocks = pool.drain();
        if blocks.is_empty() {
            return Ok(());
        }
        profile::timed_host(
            || "cuMemFree (allocator cache emptied)".into(),
            || {
                // Work queued on the stream may still use a cached block's previous contents.
                self.synchronize()?;
                self.bind()?;
                for (p, class) in blocks {
                    if self.is_emulated() {
                        // SAFETY: each block came from emu::malloc(class), is not in use, and is freed once.
                        unsafe { emu::free(p, class) };
                        continue;
                    }
                    // SAFETY: each block came from cuMemAlloc, is not in use, and is freed once.
                    unsafe { drv::free_sync(p) }.map_err(cuda_err("cuMemFree"))?;
                }
                Ok(())
            },
        )
    }

    /// Returns every cached (free) block to the driver.
    pub fn empty_cache(&self) -> Result<()> {
        let _turn = self.stream_turn();
        let mut pool = self.lock_pool()?;
        self.free_cached(&mut pool)
    }

    /// Allocator counters.
    pub fn alloc_stats(&self) -> AllocStats {
        self.pool.lock().map(|p| p.stats).unwrap_or_default()
    }
    /// Bytes (in size-class units) held by live tensors.
    pub fn bytes_in_use(&self) -> usize {
        self.alloc_stats().in_use
    }
    /// Highest [`Self::bytes_in_use`] since the device was created or [`Self::reset_peak`].
    pub fn peak_bytes(&self) -> usize {
        self.alloc_stats().peak
    }
    /// Bytes held by the allocator: in use plus cached.
    pub fn bytes_reserved(&self) -> usize {
        let s = self.alloc_stats();
        s.in_use + s.cached
    }
    pub fn reset_peak(&self) {
        if let Ok(mut p) = self.pool.lock() {
            p.reset_peak();
        }
    }

    fn check_range(&self, op: &'static str, dst: &CudaStorage, offset: usize, len: usize) -> Result<()> {
        if dst.device.ordinal != self.ordinal {
            return Err(Error::DeviceMismatch { op, a: self.as_device(), b: dst.device.as_device() });
        }
        if offset.checked_add(len).is_none_or(|end| end > dst.len_bytes) {
            return Err(Error::Cuda {
                op,
                detail: format!("bytes {offset}..{} out of range of a {}-byte buffer", offset + len, dst.len_bytes),
            });
        }
        Ok(())
    }

    /// Copies host bytes into `dst` at `offset` bytes. Returns when the copy is done.
    pub fn htod(&self, src: &[u8], dst: &CudaStorage, offset: usize) -> Result<()> {
        profile::timed(
            self,
            || "copy host→device".into(),
            || {
                let _turn = self.stream_turn();
                self.check_range("htod", dst, offset, src.len())?;
                self.refuse_in_capture("a copy host→device")?;
                if src.is_empty() {
                    return Ok(());
                }
                let Backend::Driver { stream, .. } = &self.backend else {
                    // SAFETY: range checked above.
                    unsafe { emu::copy(src.as_ptr() as u64, dst.ptr + offset as u64, src.len()) };
                    return Ok(());
                };
                self.bind()?;
                // SAFETY: range checked; `src` outlives the call, which waits for the copy below.
                unsafe { drv::memcpy_htod_async(dst.ptr + offset as u64, src, stream.cu_stream()) }
                    .map_err(cuda_err("cuMemcpyHtoDAsync"))?;
                // Synchronous for the caller: the host buffer may be freed as soon as we return.
                stream.synchronize().map_err(cuda_err("htod: cuStreamSynchronize"))
            },
        )
    }

    /// Copies `out.len()` bytes from `src` at `offset` bytes to the host, after all work queued
    /// before it on the compute stream.
    pub fn dtoh(&self, src: &CudaStorage, offset: usize, out: &mut [u8]) -> Result<()> {
        profile::timed(
            self,
            || "copy device→host".into(),
            || {
                let _turn = self.stream_turn();
                self.check_range("dtoh", src, offset, out.len())?;
                self.refuse_in_capture("a copy device→host")?;
                if out.is_empty() {
                    return Ok(());
                }
                let Backend::Driver { stream, .. } = &self.backend else {
                    // SAFETY: range checked above.
                    unsafe { emu::copy_to_host(src.ptr + offset as u64, out.as_mut_ptr() as u64, out.len()) };
                    return Ok(());
                };
                self.bind()?;
                // SAFETY: range checked; `out` stays borrowed until the stream is synchronized below.
                unsafe { drv::memcpy_dtoh_async(out, src.ptr + offset as u64, stream.cu_stream()) }
                    .map_err(cuda_err("cuMemcpyDtoHAsync"))?;
                stream.synchronize().map_err(cuda_err("dtoh: cuStreamSynchronize"))
            },
        )
    }

    /// Queues a device-to-device copy of `bytes` bytes between raw device addresses.
    pub fn dtod(&self, src: u64, dst: u64, bytes: usize) -> Result<()> {
        profile::timed(
            self,
            || "copy device→device".into(),
            || {
                let _turn = self.stream_turn();
                if bytes == 0 {
                    return Ok(());
                }
                let Backend::Driver { stream, .. } = &self.backend else {
                    // SAFETY: as below.
                    let copy = move || {
                        unsafe { emu::copy(src, dst, bytes) };
                        Ok(())
                    };
                    if self.emu_record(|| Box::new(copy)) {
                        return Ok(());
                    }
                    return copy();
                };
                self.bind()?;
                // SAFETY: the caller guarantees both ranges are valid device memory of this device.
                unsafe { drv::memcpy_dtod_async(dst, src, bytes, stream.cu_stream()) }
                    .map_err(cuda_err("cuMemcpyDtoDAsync"))
            },
        )
    }

    /// Queues a zero fill of `bytes` bytes at a raw device address.
    pub fn memset_zero(&self, ptr: u64, bytes: usize) -> Result<()> {
        profile::timed(
            self,
            || "memset".into(),
            || {
                let _turn = self.stream_turn();
                if bytes == 0 {
                    return Ok(());
                }
                let Backend::Driver { stream, .. } = &self.backend else {
                    // SAFETY: as below.
                    let fill = move || {
                        unsafe { emu::zero(ptr, bytes) };
                        Ok(())
                    };
                    if self.emu_record(|| Box::new(fill)) {
                        return Ok(());
                    }
                    return fill();
                };
                self.bind()?;
                // SAFETY: the caller guarantees the range is valid device memory of this device.
                unsafe { drv::memset_d8_async(ptr, 0, bytes, stream.cu_stream()) }.map_err(cuda_err("cuMemsetD8Async"))
            },
        )
    }
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaDevice(cuda:{}, {}, {})", self.ordinal, self.name, self.arch())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Device tests that count the allocator's blocks, or capture, take turns.
    pub(crate) fn device_tests_lock() -> std::sync::MutexGuard<'static, ()> {
        static LOCK: Mutex<()> = Mutex::new(());
        LOCK.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `cuda:0` (a GPU or the emulator), or `None` with a printed reason (a failure under
    /// `SMELT_REQUIRE_GPU=1`).
    pub(crate) fn test_device() -> Option<Arc<CudaDevice>> {
        match device(0) {
            Ok(d) => Some(d),
            Err(e) if std::env::var("SMELT_REQUIRE_GPU").as_deref() == Ok("1") => {
                panic!("SMELT_REQUIRE_GPU=1 but no CUDA device: {e}")
            }
            Err(e) => {
                eprintln!("skipping device test: {e}");
                None
            }
        }
    }

    /// On a machine without a GPU every entry point must return an error, not panic; on a GPU
    /// machine the same calls succeed.
    #[test]
    fn discovery_never_panics() {
        let p = probe();
        let text = p.to_string();
        assert!(text.contains("CUDA driver:") && text.contains("NVRTC:") && text.contains("cuBLAS:"), "{text}");
        match device(0) {
            Ok(d) => {
                assert!(!p.devices.is_empty(), "device(0) works but probe found no device:\n{text}");
                assert!(d.arch().starts_with("sm_"));
            }
            Err(e) => {
                assert!(matches!(e, Error::CudaUnavailable(_)), "{e}");
                assert!(text.contains("no CUDA device"), "{text}");
                eprintln!("no CUDA here (expected on CPU machines): {e}");
            }
        }
        let e = device(1 << 20).unwrap_err().to_string();
        assert!(e.contains("CUDA is not available"), "{e}");
    }

    /// `Tensor::copy_from` between tensors on one device copies device to device (no trip
    /// through the host), views' offsets included; overlapping ranges of one buffer still
    /// copy right (through the host).
    #[test]
    fn device_copy_from_stays_on_the_device() {
        use crate::{DType, Device, Tensor};
        let _turn = device_tests_lock();
        let Some(dev) = test_device() else { return };
        let on = Device::Cuda(0);
        let vals: Vec<f32> = (0..24).map(|i| i as f32).collect();
        let src = Tensor::from_slice(&vals, &[6, 4], Device::Cpu).unwrap().to_device(on).unwrap();
        let dst = Tensor::zeros(&[6, 4], DType::F32, on).unwrap();
        let (r, rows) = super::profile::record(&dev, || {
            dst.narrow_rows(1, 3)?.copy_from(&src.narrow_rows(2, 3)?)?;
            // One buffer, ranges apart.
            src.narrow_rows(0, 2)?.copy_from(&src.narrow_rows(4, 2)?)
        })
        .unwrap();
        r.unwrap();
        let host: usize = rows.iter().filter(|r| r.name.contains("host")).map(|r| r.calls).sum();
        assert_eq!(host, 0, "copies through the host: {rows:?}");
        let mut want = vec![0.0f32; 24];
        want[4..16].copy_from_slice(&vals[8..20]);
        assert_eq!(dst.to_vec::<f32>().unwrap(), want);
        let mut moved = vals.clone();
        moved.copy_within(16..24, 0);
        assert_eq!(src.to_vec::<f32>().unwrap(), moved);
        // Overlapping: rows 1..4 onto rows 0..3.
        src.narrow_rows(0, 3).unwrap().copy_from(&src.narrow_rows(1, 3).unwrap()).unwrap();
        moved.copy_within(4..16, 0);
        assert_eq!(src.to_vec::<f32>().unwrap(), moved);
    }

    /// A recording holds what its own thread queued while it ran, not what another thread
    /// queued meanwhile (tests record side by side on one device).
    #[test]
    fn device_profile_records_its_own_thread_only() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
        let _turn = device_tests_lock();
        let Some(dev) = test_device() else { return };
        let (stop, uploads) = (AtomicBool::new(false), AtomicUsize::new(0));
        let mine = dev.alloc(256).unwrap();
        std::thread::scope(|sc| {
            let other = sc.spawn(|| {
                let theirs = dev.alloc(256)?;
                while !stop.load(Relaxed) {
                    dev.htod(&[7u8; 256], &theirs, 0)?;
                    uploads.fetch_add(1, Relaxed);
                }
                Ok::<_, crate::Error>(())
            });
            // Waits for the other thread's uploads, failing the test (not hanging) if it stopped.
            let wait_for = |n: usize| {
                let t0 = std::time::Instant::now();
                while uploads.load(Relaxed) < n {
                    if other.is_finished() || t0.elapsed().as_secs() > 60 {
                        stop.store(true, Relaxed);
                        panic!("the uploading thread stopped or stalled");
                    }
                    std::thread::yield_now();
                }
            };
            wait_for(1);
            let (_, rows) = super::profile::record(&dev, || {
                let mut back = [0u8; 256];
                for _ in 0..20 {
                    dev.dtoh(&mine, 0, &mut back).unwrap();
                }
                // The other thread uploads while this one records.
                wait_for(uploads.load(Relaxed) + 5);
            })
            .unwrap();
            stop.store(true, Relaxed);
            other.join().unwrap().unwrap();
            let names: Vec<(&str, usize)> = rows.iter().map(|r| (r.name.as_str(), r.calls)).collect();
            assert_eq!(names, [("copy device→host", 20)]);
        });
    }

    #[test]
    fn device_smoke_alloc_copy_reuse_gemm() {
        let _turn = device_tests_lock();
        let Some(dev) = test_device() else { return };
        dev.synchronize().unwrap();
        let base = dev.bytes_in_use();
        let data: Vec<u8> = (0..10_007u32).map(|i| (i * 31 % 251) as u8).collect();
        let s = dev.alloc(data.len()).unwrap();
        dev.htod(&data, &s, 0).unwrap();
        let mut back = vec![0u8; data.len()];
        dev.dtoh(&s, 0, &mut back).unwrap();
        assert_eq!(back, data);
        let mut part = vec![0u8; 100];
        dev.dtoh(&s, 7, &mut part).unwrap();
        assert_eq!(part, data[7..107]);
        assert!(dev.dtoh(&s, 10_000, &mut part).is_err());
        let p0 = s.ptr();
        drop(s);
        assert_eq!(dev.bytes_in_use(), base);
        let allocs = dev.alloc_stats().device_allocs;
        for _ in 0..10 {
            let s = dev.alloc(data.len()).unwrap();
            drop(s);
        }
        assert_eq!(dev.alloc_stats().device_allocs, allocs, "same-size allocations must reuse the cached block");
        let again = dev.alloc(data.len()).unwrap();
        assert_eq!(again.ptr(), p0);
        drop(again);

        // 2x3 · 3x2 in f32 through cuBLAS.
        let a = [1f32, 2., 3., 4., 5., 6.];
        let b = [7f32, 8., 9., 10., 11., 12.];
        let to_dev = |v: &[f32]| {
            let s = dev.alloc(v.len() * 4).unwrap();
            dev.htod(bytemuck::cast_slice(v), &s, 0).unwrap();
            s
        };
        let (ad, bd, cd) = (to_dev(&a), to_dev(&b), to_dev(&[0.0; 4]));
        dev.gemm(&Gemm::new(2, 2, 3, crate::DType::F32, crate::DType::F32), ad.ptr(), bd.ptr(), cd.ptr()).unwrap();
        let mut out = [0u8; 16];
        dev.dtoh(&cd, 0, &mut out).unwrap();
        let c: &[f32] = bytemuck::cast_slice(&out);
        assert_eq!(c, &[58., 64., 139., 154.]);
        dev.empty_cache().unwrap();
    }
}
