//! smelt-engine: the ground floor of smelt.
//!
//! - [`DType`] and [`Device`] name what a tensor holds and where.
//! - [`Tensor`] is shared storage + shape + dtype + device. No autograd: every op in
//!   `smelt-kernels` has an explicit backward, called in reverse by the model code.
//! - [`cpu`] holds the CPU backend (thread pool, `gemm`-backed matmul).
//! - `cuda` (feature `cuda`, on by default) holds the CUDA backend: device discovery that never
//!   panics, one compute stream per device, a caching allocator and cuBLAS. It loads the CUDA
//!   libraries at run time, so building needs no CUDA.
//! - [`Rng`] is our own seedable generator with a single `u64` of state, so a training run can
//!   save and resume it bit-exactly.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod device;
mod dtype;
mod error;
mod rng;
mod storage;
mod tensor;

pub use device::Device;
pub use dtype::{DType, WithDType};
pub use error::{Error, Result};
pub use rng::Rng;
pub use storage::{CpuStorage, Storage};
pub use tensor::{CpuMut, CpuRef, Tensor};

/// Half-precision types used throughout smelt (re-exported from `half`).
pub use half::{bf16, f16};
