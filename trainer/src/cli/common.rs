//! What `score`, `generate` and `bench` share: opening a model directory on a device.

use std::path::Path;

use anyhow::{Context, Result};
use smelt_engine::{DType, Device};
use smelt_models::{Checkpoint, LoadOptions, Qwen};

/// Model-loading flags shared by the commands.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// A Hugging Face model directory (config.json, model.safetensors or shards, tokenizer.json…).
    #[arg(long)]
    pub model: std::path::PathBuf,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype of the weights: f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Skip the NaN/Inf scan of the weights at load time.
    #[arg(long)]
    pub no_check_weights: bool,
}

impl ModelArgs {
    /// Parses and checks the flags (before any file is read).
    pub fn device(&self) -> Result<Device> {
        let device: Device = self.device.parse().with_context(|| "--device")?;
        #[cfg(feature = "cuda")]
        if let Device::Cuda(i) = device {
            smelt_engine::cuda::device(i).context("--device")?;
        }
        #[cfg(not(feature = "cuda"))]
        if device.is_cuda() {
            anyhow::bail!("--device {device}: this smelt was built without CUDA support (--no-default-features)");
        }
        Ok(device)
    }

    pub fn dtype(&self) -> Result<DType> {
        match self.dtype.as_str() {
            "f32" | "float32" => Ok(DType::F32),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            other => anyhow::bail!("--dtype {other:?}: expected f32 or bf16"),
        }
    }

    pub fn open(&self) -> Result<Checkpoint> {
        open_checkpoint(&self.model)
    }

    /// Loads the weights onto the device and builds the model.
    pub fn load(&self, ckpt: &Checkpoint) -> Result<Qwen> {
        let device = self.device()?;
        let dtype = self.dtype()?;
        if device.is_cpu() && dtype != DType::F32 {
            anyhow::bail!("--dtype {}: the CPU path computes in f32 (use --dtype f32)", self.dtype);
        }
        let opts = LoadOptions { dtype, device, check_finite: !self.no_check_weights };
        let weights = ckpt.load_weights(&opts)?;
        Ok(Qwen::new(ckpt.config.clone(), weights))
    }
}

pub fn open_checkpoint(dir: &Path) -> Result<Checkpoint> {
    Ok(Checkpoint::open(dir)?)
}
