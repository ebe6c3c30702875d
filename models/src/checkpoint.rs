//! A Hugging Face model directory, opened as a whole.

use std::path::{Path, PathBuf};

use crate::{
    ChatTemplate, Config, Error, GenerationConfig, LoadOptions, Message, RenderOptions, Result, Tokenizer,
    TokenizerConfig, Weights,
};

/// Everything in a model directory but the weights (which [`Checkpoint::load_weights`] loads
/// on request): config.json, tokenizer.json (optional), tokenizer_config.json and
/// generation_config.json (optional; defaults when absent), and the chat template.
#[derive(Debug)]
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: Config,
    /// `None` when the directory has no tokenizer.json (token ids can still be scored).
    pub tokenizer: Option<Tokenizer>,
    pub tokenizer_config: TokenizerConfig,
    pub chat_template: ChatTemplate,
    pub generation_config: GenerationConfig,
}

impl Checkpoint {
    pub fn open(dir: impl AsRef<Path>) -> Result<Checkpoint> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::io(dir, "not a model directory", std::io::Error::from(std::io::ErrorKind::NotFound)));
        }
        let config = Config::from_file(dir.join("config.json"))?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = if tok_path.exists() {
            Some(Tokenizer::from_file(&tok_path)?.with_model_vocab(config.vocab_size)?)
        } else {
            None
        };
        let tokenizer_config = TokenizerConfig::from_dir(dir)?;
        let chat_template = ChatTemplate::for_model(dir, &tokenizer_config)?;
        let generation_config = GenerationConfig::from_dir(dir)?;
        Ok(Checkpoint { dir: dir.to_path_buf(), config, tokenizer, tokenizer_config, chat_template, generation_config })
    }

    pub fn load_weights(&self, opts: &LoadOptions) -> Result<Weights> {
        Weights::load(&self.dir, &self.config, opts)
    }

    /// The tokenizer, or an error saying the directory has none.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| Error::Tokenizer {
            path: self.dir.join("tokenizer.json"),
            detail: "the model directory has no tokenizer.json (needed for text input and output)".into(),
        })
    }

    /// Stop ids from generation_config.json, config.json and the tokenizer's eos token.
    /// An `eos_token` named in tokenizer_config.json but absent from the tokenizer is an error.
    pub fn stop_token_ids(&self) -> Result<Vec<u32>> {
        let tok_eos = match (&self.tokenizer_config.eos_token, &self.tokenizer) {
            (Some(t), Some(tok)) => Some(tok.token_id(t).map_err(|e| match e {
                Error::SpecialToken { token, detail } => Error::SpecialToken {
                    token,
                    detail: format!("{detail}; tokenizer_config.json names it as eos_token"),
                },
                other => other,
            })?),
            _ => None,
        };
        Ok(crate::stop_token_ids(&self.generation_config, &self.config, tok_eos))
    }

    /// Renders a conversation with the chat template. With the ChatML fallback the tokenizer
    /// must know `<|im_start|>` and `<|im_end|>`, or the prompt would silently be plain text.
    pub fn render_chat(&self, messages: &[Message], opts: &RenderOptions) -> Result<String> {
        if self.chat_template.is_fallback() {
            let tok = self.tokenizer()?;
            for t in ["<|im_start|>", "<|im_end|>"] {
                tok.token_id(t).map_err(|_| Error::SpecialToken {
                    token: t.into(),
                    detail: format!(
                        "{} has no chat template and the ChatML fallback needs this token, which {} lacks",
                        self.dir.display(),
                        tok.path().display()
                    ),
                })?;
            }
        }
        self.chat_template.render(messages, opts)
    }
}
