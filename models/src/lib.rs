//! smelt-models: Qwen2 / Qwen2.5 / Qwen3 as Hugging Face ships them.
//!
//! Loading a model directory:
//! - [`Config`] from `config.json` (both the old top-level `rope_theta` / `torch_dtype` style
//!   and the newer `rope_parameters` / `dtype` style), validated, with unsupported options
//!   refused by name;
//! - [`Weights`] from `model.safetensors` or `model.safetensors.index.json` shards, memory-mapped,
//!   every header checked and every tensor's name and shape checked against the config before
//!   anything is allocated, NaN/Inf reported by tensor name;
//! - [`Tokenizer`] over the `tokenizers` crate, [`ChatTemplate`] rendered with minijinja,
//!   [`GenerationConfig`] and [`stop_token_ids`];
//! - [`Checkpoint`] bundles all of the above for one directory.
//!
//! Every failure is an [`Error`] naming the file and the field, tensor or token involved.

mod chat;
mod checkpoint;
mod config;
#[cfg(feature = "cuda")]
mod decode_graph;
mod error;
mod generate;
mod generation_config;
mod json;
mod qwen;
pub mod safetensors;
pub mod testing;
mod tokenizer;
mod weights;

pub use chat::{ChatTemplate, Message, RenderOptions, CHATML_TEMPLATE};
pub use checkpoint::Checkpoint;
pub use config::{config_path, limits, Config, ModelType};
#[cfg(feature = "cuda")]
pub use decode_graph::DecodeGraphs;
pub use error::{Error, Result};
pub use generate::{
    cuda_graphs, generate, generate_pruned, generate_with_cache, set_cuda_graphs, GenerateOptions, Generation, Prune,
};
pub use generation_config::{stop_token_ids, GenerationConfig};
pub use qwen::{Activations, HeadOutputs, KvCache, Packed, Qwen};
pub use safetensors::save_safetensors;
pub use tokenizer::{Tokenizer, TokenizerConfig};
pub use weights::{LayerWeights, LoadOptions, Weights};
