//! smelt-trainer: the GRPO-family RL loop and the `smelt` command-line tool.

pub mod advantage;
pub mod config;
pub mod data;
pub mod early_rejection;
pub mod jsonl;
pub mod memory;
pub mod reward;
pub mod step;
pub mod train;
