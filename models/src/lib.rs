//! smelt-models: Qwen2 / Qwen2.5 / Qwen3 as Hugging Face ships them.
