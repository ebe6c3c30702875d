//! Peak memory of a run: the process's peak RSS on CPU, the caching allocator's peak on CUDA.

use smelt_engine::Device;

/// Process memory from /proc/self/status (bytes): (VmRSS, VmHWM).
pub fn proc_mem() -> (Option<u64>, Option<u64>) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Starts peak tracking: resets the process's VmHWM (Linux: `5` > /proc/self/clear_refs) or the
/// CUDA allocator's peak.
pub fn reset_peak(device: Device) {
    match device {
        Device::Cpu => {
            let _ = std::fs::write("/proc/self/clear_refs", "5");
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => {
            if let Ok(d) = smelt_engine::cuda::device(i) {
                d.reset_peak();
            }
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => {}
    }
}

/// (peak bytes, what it measures) since [`reset_peak`].
pub fn peak_bytes(device: Device) -> (Option<u64>, &'static str) {
    match device {
        Device::Cpu => (proc_mem().1, "process peak RSS (VmHWM, reset after setup)"),
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => (
            smelt_engine::cuda::device(i).ok().map(|d| d.peak_bytes() as u64),
            "CUDA caching allocator peak bytes in use",
        ),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => (None, "unavailable"),
    }
}
