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

/// Checks that `acc`, named `name` in `op`'s errors, is an f32 `[d]` gradient on `device`: the
/// accumulator of the ops that add a reduction into a gradient in place.
pub(crate) fn check_accumulator(
    op: &'static str,
    name: &str,
    acc: &smelt_engine::Tensor,
    d: usize,
    device: smelt_engine::Device,
) -> Result<()> {
    if acc.shape() != [d] || acc.dtype() != smelt_engine::DType::F32 || acc.device() != device {
        return Err(Error::shape(
            op,
            format!("{name} {:?} {} on {} must be [{d}] f32 on {device}", acc.shape(), acc.dtype(), acc.device()),
        ));
    }
    Ok(())
}

/// A u32 index list a launcher takes (positions, cache slots, cache lengths): values on the
/// host, checked and uploaded, or a device tensor the kernel reads at run time. The latter is
/// what a captured graph needs (its inputs change between replays, its arguments do not); its
/// values are not checked, since reading them would wait for the device, and launch shapes that
/// depend on them are sized for the worst case (see each op).
#[derive(Clone, Copy, Debug)]
pub enum Indices<'a> {
    Host(&'a [u32]),
    Device(&'a smelt_engine::Tensor),
}

impl<'a> Indices<'a> {
    pub fn len(&self) -> usize {
        match self {
            Indices::Host(v) => v.len(),
            Indices::Device(t) => t.elem_count(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The host values, when these are host values.
    pub fn host(&self) -> Option<&'a [u32]> {
        match self {
            Indices::Host(v) => Some(v),
            Indices::Device(_) => None,
        }
    }
    /// The values on the host (a device tensor is read back: CPU paths only).
    pub fn values(&self) -> Result<std::borrow::Cow<'a, [u32]>> {
        match self {
            Indices::Host(v) => Ok(std::borrow::Cow::Borrowed(v)),
            Indices::Device(t) => Ok(std::borrow::Cow::Owned(t.to_vec::<u32>()?)),
        }
    }
    /// The values as a tensor on device `ord`: the device tensor, or the host values uploaded
    /// (through the upload memo). A device tensor must be u32 on that device.
    #[cfg(feature = "cuda")]
    pub(crate) fn on_device(&self, op: &'static str, ord: usize) -> Result<smelt_engine::Tensor> {
        match self {
            Indices::Host(v) => cuda::upload(ord, v),
            Indices::Device(t) => {
                if t.dtype() != smelt_engine::DType::U32 || t.device() != smelt_engine::Device::Cuda(ord) {
                    return Err(Error::shape(
                        op,
                        format!("an index list must be u32 on cuda:{ord}, got {} on {}", t.dtype(), t.device()),
                    ));
                }
                Ok((*t).clone())
            }
        }
    }
}

impl<'a> From<&'a [u32]> for Indices<'a> {
    fn from(v: &'a [u32]) -> Self {
        Indices::Host(v)
    }
}

impl<'a> From<&'a Vec<u32>> for Indices<'a> {
    fn from(v: &'a Vec<u32>) -> Self {
        Indices::Host(v)
    }
}

impl<'a, const N: usize> From<&'a [u32; N]> for Indices<'a> {
    fn from(v: &'a [u32; N]) -> Self {
        Indices::Host(v)
    }
}

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

#[cfg(test)]
mod indices_tests {
    use super::Indices;

    #[test]
    fn host_and_device_lists_give_their_values() {
        let v = vec![3u32, 1, 4];
        let host: Indices = (&v).into();
        assert_eq!((host.len(), host.host(), host.values().unwrap().as_ref()), (3, Some(&v[..]), &v[..]));
        let t = smelt_engine::Tensor::from_slice(&v, &[3], smelt_engine::Device::Cpu).unwrap();
        let dev = Indices::Device(&t);
        assert_eq!((dev.len(), dev.host(), dev.values().unwrap().into_owned()), (3, None, v));
        assert!(Indices::from(&[0u32; 0]).is_empty());
    }
}
