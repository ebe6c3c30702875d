//! `tokenizer.json` through the `tokenizers` crate, and the parts of `tokenizer_config.json`
//! smelt uses.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::json::{self, Obj};
use crate::{Error, Result};

/// A Hugging Face tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    /// One past the largest id the tokenizer can produce.
    size: usize,
    /// The model's embedding rows, once checked with [`Tokenizer::with_model_vocab`].
    model_vocab: Option<usize>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer({}, {} tokens)", self.path.display(), self.size)
    }
}

impl Tokenizer {
    /// Reads `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Tokenizer> {
        let path = path.as_ref();
        let text = crate::error::read_to_string(path)?;
        Self::from_json_str(path, &text)
    }

    /// Parses tokenizer JSON; `path` names the file in errors.
    pub fn from_json_str(path: &Path, text: &str) -> Result<Tokenizer> {
        // Parsing as plain JSON first separates "not JSON at all" (truncated download) from
        // "JSON the tokenizers crate does not understand" (usually a newer format).
        let v: Value = crate::error::parse_json(path, text)?;
        let inner: tokenizers::Tokenizer = text.parse().map_err(|e| {
            let version = v.get("version").map(|x| x.to_string()).unwrap_or_else(|| "absent".into());
            Error::Tokenizer {
                path: path.to_path_buf(),
                detail: format!(
                    "the tokenizers library cannot read this tokenizer.json ({e}); its \"version\" field is {version}; \
                     the file may come from a newer tokenizers version than the one smelt is built with"
                ),
            }
        })?;
        let vocab = inner.get_vocab(true);
        let size = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
        if size == 0 {
            return Err(Error::Tokenizer { path: path.to_path_buf(), detail: "the vocabulary is empty".into() });
        }
        Ok(Tokenizer { inner, path: path.to_path_buf(), size, model_vocab: None })
    }

    /// Checks that every id the tokenizer produces has a row in the model's embedding table
    /// (`vocab_size` from config.json); the model may have more rows (Qwen pads its table).
    pub fn with_model_vocab(mut self, vocab_size: usize) -> Result<Tokenizer> {
        if self.size > vocab_size {
            return Err(Error::Tokenizer {
                path: self.path.clone(),
                detail: format!(
                    "the tokenizer has {} token ids but the model's vocab_size (config.json) is {vocab_size}: \
                     tokenizer and weights do not belong together",
                    self.size
                ),
            });
        }
        self.model_vocab = Some(vocab_size);
        Ok(self)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    /// One past the largest token id the tokenizer knows (special tokens included).
    pub fn size(&self) -> usize {
        self.size
    }
    /// The wrapped `tokenizers` tokenizer, for anything not exposed here.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| Error::Tokenizer {
            path: self.path.clone(),
            detail: format!("cannot encode {} bytes of text: {e}", text.len()),
        })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text. Ids the tokenizer does not know but the model can produce (Qwen's
    /// padding rows, `size() <= id < vocab_size`) decode to nothing, as in transformers; ids
    /// beyond the model's vocabulary (when known) are an error.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        if let Some(v) = self.model_vocab {
            if let Some((i, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= v) {
                return Err(Error::Tokenizer {
                    path: self.path.clone(),
                    detail: format!("cannot decode id {id} at position {i}: the model's vocab_size is {v}"),
                });
            }
        }
        self.inner.decode(ids, skip_special_tokens).map_err(|e| Error::Tokenizer {
            path: self.path.clone(),
            detail: format!("cannot decode {} ids: {e}", ids.len()),
        })
    }

    /// The id of a token given by its text, e.g. `"<|im_end|>"`.
    pub fn token_id(&self, token: &str) -> Result<u32> {
        self.inner.token_to_id(token).ok_or_else(|| Error::SpecialToken {
            token: token.to_string(),
            detail: format!("{} has no such token", self.path.display()),
        })
    }

    /// The text of a token id, if the tokenizer has one.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

/// The fields of `tokenizer_config.json` smelt uses.
#[derive(Clone, Debug, Default)]
pub struct TokenizerConfig {
    /// The file read (None for [`TokenizerConfig::default`], i.e. no file).
    pub path: Option<PathBuf>,
    /// The template source: `chat_template` as a string, or the entry named "default" of a
    /// list of `{name, template}`; `None` when absent.
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub add_bos_token: bool,
}

impl TokenizerConfig {
    pub fn from_file(path: impl AsRef<Path>) -> Result<TokenizerConfig> {
        let path = path.as_ref();
        Self::from_json_str(path, &crate::error::read_to_string(path)?)
    }

    /// Reads `dir/tokenizer_config.json`, or returns the default (no template, no special
    /// tokens) when the file does not exist.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<TokenizerConfig> {
        let p = dir.as_ref().join("tokenizer_config.json");
        if p.exists() {
            Self::from_file(p)
        } else {
            Ok(TokenizerConfig::default())
        }
    }

    pub fn from_json_str(path: &Path, text: &str) -> Result<TokenizerConfig> {
        let v = crate::error::parse_json(path, text)?;
        let o = json::as_object(path, &v, "<top level>")?;
        let chat_template = match json::get(o, "chat_template") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => Some(pick_default_template(path, list)?),
            Some(other) => {
                return Err(Error::field(
                    path,
                    "chat_template",
                    format!("expected a string or a list of {{name, template}}, got {}", json::kind(other)),
                ))
            }
        };
        Ok(TokenizerConfig {
            path: Some(path.to_path_buf()),
            chat_template,
            bos_token: special_token(path, o, "bos_token")?,
            eos_token: special_token(path, o, "eos_token")?,
            pad_token: special_token(path, o, "pad_token")?,
            add_bos_token: json::opt_bool(path, o, "add_bos_token")?.unwrap_or(false),
        })
    }
}

fn pick_default_template(path: &Path, list: &[Value]) -> Result<String> {
    let mut names = Vec::new();
    for (i, item) in list.iter().enumerate() {
        let field = format!("chat_template[{i}]");
        let o = json::as_object(path, item, &field)?;
        let name = json::opt_str(path, o, "name")?.unwrap_or("");
        if name == "default" {
            return json::opt_str(path, o, "template")?
                .map(str::to_string)
                .ok_or_else(|| Error::field(path, format!("{field}.template"), "missing"));
        }
        names.push(name.to_string());
    }
    Err(Error::field(
        path,
        "chat_template",
        format!("a list of templates without one named \"default\" (has {names:?})"),
    ))
}

/// A special token given as a string or as an AddedToken object `{"content": ...}`.
fn special_token(path: &Path, o: &Obj, field: &str) -> Result<Option<String>> {
    match json::get(o, field) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(t)) => match json::get(t, "content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(Error::field(path, format!("{field}.content"), "expected the token's text")),
        },
        Some(other) => Err(Error::field(path, field, format!("expected a token string, got {}", json::kind(other)))),
    }
}
