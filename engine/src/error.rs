use crate::{DType, Device};

/// Errors of the tensor engine. Each variant names the operation and the shapes, dtypes or
/// devices involved, so a failure deep in a training step says what went wrong where.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op}: shape mismatch: {detail}")]
    Shape { op: &'static str, detail: String },

    #[error("{op}: expected dtype {expected}, got {got}")]
    DType { op: &'static str, expected: DType, got: DType },

    #[error("{op}: dtype {dtype} is not supported here")]
    UnsupportedDType { op: &'static str, dtype: DType },

    #[error("{op}: tensors on different devices ({a} and {b})")]
    DeviceMismatch { op: &'static str, a: Device, b: Device },

    #[error("{op}: not supported on {device}")]
    UnsupportedDevice { op: &'static str, device: Device },

    #[error("{op}: {len} elements do not fit shape {shape:?} ({expected} elements)")]
    ElementCount { op: &'static str, shape: Vec<usize>, len: usize, expected: usize },

    #[error("{op}: tensor storage is in use elsewhere (an input aliases an output?)")]
    Busy { op: &'static str },

    #[error("CUDA is not available: {0}")]
    CudaUnavailable(String),

    #[error("CUDA {op}: {detail}")]
    Cuda { op: &'static str, detail: String },

    #[error("out of GPU memory in {op}: requested {requested} bytes, {in_use} bytes in use on {device}")]
    OutOfMemory { op: &'static str, requested: usize, in_use: usize, device: Device },

    #[error("{0}")]
    Msg(String),
}

impl Error {
    pub fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        Error::Shape { op, detail: detail.into() }
    }
    pub fn msg(m: impl Into<String>) -> Self {
        Error::Msg(m.into())
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
