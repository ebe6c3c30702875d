//! smelt-kernels: every op smelt runs — its public function, CPU implementation, backward,
//! and the launcher for its CUDA source in `kernels/cuda/<op>.cu`.
//!
//! One op, one home: `src/<op>.rs` holds all of it, with its tests. Tensor-level functions
//! dispatch on the device; the `cpu` functions inside each module work on slices and are the
//! references the CUDA versions are tested against.

pub use smelt_engine::{Error, Result};

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod emu;
pub mod testing;
pub mod versions;

pub mod adamw;
pub mod add;
pub mod attention;
pub mod attention_inputs;
pub mod cast;
pub mod embedding;
pub(crate) mod fastmath;
pub mod global_norm;
pub mod grpo_loss;
pub mod logprob_entropy;
pub mod matmul;
pub mod rmsnorm;
pub mod rope;
pub mod sample;
pub mod swiglu;

/// A CUDA C source file of ours, embedded in the binary. The build prepends
/// `cuda/common.cuh` (bf16 conversions, warp reductions) so sources include no headers.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    /// File stem, e.g. `"rmsnorm"` for `kernels/cuda/rmsnorm.cu`.
    pub name: &'static str,
    pub src: &'static str,
}

/// The shared prelude prepended to every kernel source.
pub const COMMON_CUH: &str = include_str!("../cuda/common.cuh");

/// Declares `const SRC: KernelSource` for `kernels/cuda/<name>.cu`.
#[macro_export]
macro_rules! kernel_source {
    ($name:literal) => {
        #[allow(dead_code)]
        pub(crate) const SRC: $crate::KernelSource =
            $crate::KernelSource { name: $name, src: include_str!(concat!("../cuda/", $name, ".cu")) };
    };
}

/// Fails with a shape error naming `op` unless `cond` holds.
#[macro_export]
macro_rules! ensure_shape {
    ($cond:expr, $op:literal, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::Error::shape($op, format!($($fmt)+)));
        }
    };
}
