use std::path::{Path, PathBuf};

/// Errors of the model crate. Every variant names the file and, where there is one, the field,
/// tensor or token involved, so a user pointing smelt at a bad checkpoint learns what is wrong
/// and where without a backtrace.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {op}: {source}", path.display())]
    Io { path: PathBuf, op: &'static str, source: std::io::Error },

    #[error("{}: not valid JSON (line {line}, column {column}): {detail}", path.display())]
    Json { path: PathBuf, line: usize, column: usize, detail: String },

    /// A config-like JSON file (config.json, generation_config.json, tokenizer_config.json)
    /// whose field is missing, of the wrong type, out of range or not supported.
    #[error("{}: field `{field}`: {detail}", path.display())]
    Field { path: PathBuf, field: String, detail: String },

    /// A structurally invalid safetensors file (header, offsets, dtypes).
    #[error("{}: invalid safetensors file: {detail}", path.display())]
    Safetensors { path: PathBuf, detail: String },

    /// Problems with `model.safetensors.index.json` or the shards it names.
    #[error("{}: {detail}", path.display())]
    Index { path: PathBuf, detail: String },

    /// The checkpoint's tensors do not match config.json: every missing, unexpected and
    /// mis-shaped tensor is listed, one per line.
    #[error("{}: the tensors do not match config.json:\n{}", dir.display(), problems.join("\n"))]
    TensorMismatch { dir: PathBuf, problems: Vec<String> },

    #[error("{}: tensor `{tensor}` holds a non-finite value ({value}) at flat index {index}", path.display())]
    NonFinite { path: PathBuf, tensor: String, index: usize, value: f32 },

    #[error("{}: {detail}", path.display())]
    Tokenizer { path: PathBuf, detail: String },

    #[error("special token {token:?} is not in the tokenizer ({detail})")]
    SpecialToken { token: String, detail: String },

    #[error("{}: chat template: {detail}", path.display())]
    Template { path: PathBuf, detail: String },

    #[error("{0}")]
    Msg(String),

    #[error(transparent)]
    Engine(#[from] smelt_engine::Error),
}

impl Error {
    pub(crate) fn io(path: &Path, op: &'static str, source: std::io::Error) -> Self {
        Error::Io { path: path.to_path_buf(), op, source }
    }
    pub(crate) fn json(path: &Path, e: &serde_json::Error) -> Self {
        // serde_json appends " at line L column C"; the variant prints the position itself.
        let msg = e.to_string();
        let detail = msg.rsplit_once(" at line ").map_or(msg.as_str(), |(d, _)| d).to_string();
        Error::Json { path: path.to_path_buf(), line: e.line(), column: e.column(), detail }
    }
    pub(crate) fn field(path: &Path, field: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Field { path: path.to_path_buf(), field: field.into(), detail: detail.into() }
    }
    pub(crate) fn safetensors(path: &Path, detail: impl Into<String>) -> Self {
        Error::Safetensors { path: path.to_path_buf(), detail: detail.into() }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Reads a whole file, naming it in the error.
pub(crate) fn read_to_string(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, "cannot read", e))
}

/// Parses a JSON document, naming the file and position on failure.
pub(crate) fn parse_json(path: &Path, text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text).map_err(|e| Error::json(path, &e))
}
