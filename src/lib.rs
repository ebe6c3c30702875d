//! smelt — a framework-free engine for reinforcement learning of reasoning LLMs.
//!
//! This crate is the one library a custom training loop links. It re-exports the four
//! layers, which depend on each other one way only: `engine` ← `kernels` ← `models` ← `trainer`.
//!
//! ```no_run
//! use smelt::engine::{Device, Tensor};
//! let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0], &[2, 2], Device::Cpu).unwrap();
//! assert_eq!(x.shape(), &[2, 2]);
//! ```
pub use smelt_engine as engine;
pub use smelt_kernels as kernels;
pub use smelt_models as models;
pub use smelt_trainer as trainer;
