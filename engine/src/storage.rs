use crate::{DType, Device, Error, Result, WithDType};

/// One 64-byte, 64-byte-aligned block: the unit of CPU storage, so every CPU buffer starts on a
/// cache line and SIMD loads of any element type are aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Block([u8; 64]);
// SAFETY: plain bytes, size == align == 64, no padding.
unsafe impl bytemuck::Zeroable for Block {}
unsafe impl bytemuck::Pod for Block {}

/// 64-byte-aligned host memory.
#[derive(Clone)]
pub struct CpuStorage {
    blocks: Vec<Block>,
    len_bytes: usize,
}

impl CpuStorage {
    /// Zero-filled storage of `len_bytes` bytes.
    pub fn zeroed(len_bytes: usize) -> Self {
        // alloc_zeroed: the OS hands out zero pages lazily, so large loads do not pay for a fill.
        CpuStorage { blocks: bytemuck::zeroed_vec(len_bytes.div_ceil(64)), len_bytes }
    }
    pub fn from_slice<T: WithDType>(data: &[T]) -> Self {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let mut s = Self::zeroed(bytes.len());
        s.bytes_mut().copy_from_slice(bytes);
        s
    }
    pub fn len_bytes(&self) -> usize {
        self.len_bytes
    }
    pub fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice::<Block, u8>(&self.blocks)[..self.len_bytes]
    }
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut::<Block, u8>(&mut self.blocks)[..self.len_bytes]
    }
    pub fn as_slice<T: WithDType>(&self) -> &[T] {
        bytemuck::cast_slice(self.bytes())
    }
    pub fn as_mut_slice<T: WithDType>(&mut self) -> &mut [T] {
        bytemuck::cast_slice_mut(self.bytes_mut())
    }
}

/// The memory behind a tensor.
pub enum Storage {
    Cpu(CpuStorage),
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CudaStorage),
}

impl Storage {
    pub fn device(&self) -> Device {
        match self {
            Storage::Cpu(_) => Device::Cpu,
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => Device::Cuda(s.ordinal()),
        }
    }
    pub fn len_bytes(&self) -> usize {
        match self {
            Storage::Cpu(s) => s.len_bytes(),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.len_bytes(),
        }
    }

    /// Allocates `len_bytes` on `device`. CPU memory is zeroed; CUDA memory is not initialised.
    pub fn alloc(device: Device, len_bytes: usize) -> Result<Storage> {
        match device {
            Device::Cpu => Ok(Storage::Cpu(CpuStorage::zeroed(len_bytes))),
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => Ok(Storage::Cuda(crate::cuda::device(i)?.alloc(len_bytes)?)),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(no_cuda_build()),
        }
    }

    /// Copies host bytes into new storage on `device`.
    pub fn from_bytes(device: Device, bytes: &[u8]) -> Result<Storage> {
        match device {
            Device::Cpu => {
                let mut s = CpuStorage::zeroed(bytes.len());
                s.bytes_mut().copy_from_slice(bytes);
                Ok(Storage::Cpu(s))
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => {
                let dev = crate::cuda::device(i)?;
                let s = dev.alloc(bytes.len())?;
                dev.htod(bytes, &s, 0)?;
                Ok(Storage::Cuda(s))
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(no_cuda_build()),
        }
    }

    /// Copies `out.len()` bytes starting at `offset_bytes` to the host.
    pub fn read_bytes(&self, offset_bytes: usize, out: &mut [u8]) -> Result<()> {
        match self {
            Storage::Cpu(s) => {
                out.copy_from_slice(&s.bytes()[offset_bytes..offset_bytes + out.len()]);
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.device().dtoh(s, offset_bytes, out),
        }
    }
}

#[cfg(not(feature = "cuda"))]
pub(crate) fn no_cuda_build() -> Error {
    Error::CudaUnavailable("this smelt was built without the `cuda` feature (rebuild with default features)".into())
}

pub(crate) fn check_dtype<T: WithDType>(op: &'static str, got: DType) -> Result<()> {
    if T::DTYPE == got {
        Ok(())
    } else {
        Err(Error::DType { op, expected: T::DTYPE, got })
    }
}
