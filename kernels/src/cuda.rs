//! NVRTC build cache and kernel launching (being written: see the foundation issue).
//!
//! Interface used by every op's launcher:
//! `launch(ordinal, &SRC, "func_name", LaunchCfg { grid, block, smem }, &[Arg::Ptr(..), Arg::I32(..)])`.
//! Pointers are raw device addresses from `Tensor::cuda_ptr()`.
use crate::{Error, KernelSource, Result};

/// One kernel argument. Pointers travel as raw 64-bit device addresses.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    U32(u32),
    U64(u64),
    F32(f32),
}

#[derive(Clone, Copy, Debug)]
pub struct LaunchCfg {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    /// Dynamic shared memory in bytes.
    pub smem: u32,
}

/// Compiles (once per process, cached on disk) and launches `func` from `src` on device `ordinal`.
pub fn launch(_ordinal: usize, src: &KernelSource, func: &str, _cfg: LaunchCfg, _args: &[Arg]) -> Result<()> {
    Err(Error::CudaUnavailable(format!("launch {}::{func}: not yet implemented", src.name)))
}
