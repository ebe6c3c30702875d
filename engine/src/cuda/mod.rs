//! CUDA backend (placeholder being filled in: see the foundation issue).
use std::sync::Arc;

use crate::{Error, Result};

pub struct CudaDevice {
    ordinal: usize,
}

pub struct CudaStorage {
    ptr: u64,
    len_bytes: usize,
    device: Arc<CudaDevice>,
}

impl CudaStorage {
    pub fn ordinal(&self) -> usize {
        self.device.ordinal
    }
    pub fn len_bytes(&self) -> usize {
        self.len_bytes
    }
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }
}

impl CudaDevice {
    pub fn alloc(self: &Arc<Self>, _bytes: usize) -> Result<CudaStorage> {
        Err(Error::CudaUnavailable("not yet implemented".into()))
    }
    pub fn htod(&self, _src: &[u8], _dst: &CudaStorage, _offset: usize) -> Result<()> {
        Err(Error::CudaUnavailable("not yet implemented".into()))
    }
    pub fn dtoh(&self, _src: &CudaStorage, _offset: usize, _out: &mut [u8]) -> Result<()> {
        Err(Error::CudaUnavailable("not yet implemented".into()))
    }
}

pub fn device(_ordinal: usize) -> Result<Arc<CudaDevice>> {
    Err(Error::CudaUnavailable("not yet implemented".into()))
}
