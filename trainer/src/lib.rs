//! smelt-trainer: the GRPO-family RL loop and the `smelt` command-line tool.

pub mod jsonl;
pub mod step;
