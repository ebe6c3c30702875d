//! What `score`, `generate` and `bench` share: opening a model directory on a device.

use std::path::Path;

use anyhow::{Context, Result};
use smelt_engine::{DType, Device};
use smelt_models::{Checkpoint, LoadOptions, Qwen};
use smelt_trainer::config::{compute_dtype, parse_device};

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
        parse_device(&self.device).context("--device")
    }

    /// The compute dtype, checked against the device (bf16 needs CUDA).
    pub fn dtype(&self) -> Result<DType> {
        compute_dtype(&self.dtype, self.device()?).map_err(|e| anyhow::anyhow!("--dtype {e:#}"))
    }

    pub fn open(&self) -> Result<Checkpoint> {
        open_checkpoint(&self.model)
    }

    /// Loads the weights onto the device and builds the model.
    pub fn load(&self, ckpt: &Checkpoint) -> Result<Qwen> {
        let (device, dtype) = (self.device()?, self.dtype()?);
        let opts = LoadOptions { dtype, device, check_finite: !self.no_check_weights };
        let weights = ckpt.load_weights(&opts)?;
        Ok(Qwen::new(ckpt.config.clone(), weights))
    }
}

pub fn open_checkpoint(dir: &Path) -> Result<Checkpoint> {
    Ok(Checkpoint::open(dir)?)
}
