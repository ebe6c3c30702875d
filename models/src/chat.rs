//! Chat templates: the Jinja template a checkpoint ships, rendered with minijinja the way
//! transformers' `apply_chat_template` renders it with Jinja2.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

use crate::{Error, Result, TokenizerConfig};

/// ChatML, used when a checkpoint has no template (what Qwen's templates produce, without
/// the default system prompt).
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + \
message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// One chat message. Templates may read more fields than these; pass any `Serialize` type
/// (e.g. `serde_json::Value`) to [`ChatTemplate::render`] for those.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Message {
        Message { role: role.into(), content: content.into() }
    }
    pub fn user(content: impl Into<String>) -> Message {
        Message::new("user", content)
    }
    pub fn system(content: impl Into<String>) -> Message {
        Message::new("system", content)
    }
    pub fn assistant(content: impl Into<String>) -> Message {
        Message::new("assistant", content)
    }
}

#[derive(Clone, Debug, Default)]
pub struct RenderOptions {
    /// Append the assistant turn's opening (`<|im_start|>assistant\n` for ChatML).
    pub add_generation_prompt: bool,
    /// Passed to the template as `enable_thinking` when set (Qwen3 templates read it); left
    /// undefined otherwise, so the template's own default applies.
    pub enable_thinking: Option<bool>,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    /// The file the template came from (for errors), or `<built-in ChatML>`.
    origin: PathBuf,
    fallback: bool,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChatTemplate({}, {} bytes)", self.origin.display(), self.source.len())
    }
}

const NAME: &str = "chat_template";

impl ChatTemplate {
    /// Compiles `source`; `origin` names the file in errors.
    pub fn new(source: &str, origin: impl Into<PathBuf>) -> Result<ChatTemplate> {
        let origin = origin.into();
        let mut env = Environment::new();
        // transformers renders with Jinja2's trim_blocks and lstrip_blocks on.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // Python string/dict/list methods (`.strip()`, `.startswith()`, `.items()`, …).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("the template raised an exception: {msg}")))
        });
        env.add_template_owned(NAME, source.to_string()).map_err(|e| Error::Template {
            path: origin.clone(),
            detail: format!("does not compile: {}", describe(&e)),
        })?;
        Ok(ChatTemplate { env, source: source.to_string(), origin, fallback: false, bos_token: None, eos_token: None })
    }

    /// The built-in ChatML template.
    pub fn chatml() -> ChatTemplate {
        let mut t = ChatTemplate::new(CHATML_TEMPLATE, "<built-in ChatML>").expect("the built-in template compiles");
        t.fallback = true;
        t
    }

    /// The template of a model directory: `chat_template.jinja` if present (newer
    /// transformers save it there), else `chat_template` from tokenizer_config.json, else
    /// ChatML. `bos_token` / `eos_token` come from `tok_config`.
    pub fn for_model(dir: impl AsRef<Path>, tok_config: &TokenizerConfig) -> Result<ChatTemplate> {
        let jinja = dir.as_ref().join("chat_template.jinja");
        let mut t = if jinja.is_file() {
            ChatTemplate::new(&crate::error::read_to_string(&jinja)?, jinja)?
        } else {
            Self::from_tokenizer_config(tok_config)?
        };
        t.bos_token = tok_config.bos_token.clone();
        t.eos_token = tok_config.eos_token.clone();
        Ok(t)
    }

    /// The template of a parsed tokenizer_config.json, or ChatML when it has none.
    pub fn from_tokenizer_config(tok_config: &TokenizerConfig) -> Result<ChatTemplate> {
        let mut t = match (&tok_config.chat_template, &tok_config.path) {
            (Some(src), path) => {
                ChatTemplate::new(src, path.clone().unwrap_or_else(|| PathBuf::from("tokenizer_config.json")))?
            }
            (None, _) => ChatTemplate::chatml(),
        };
        t.bos_token = tok_config.bos_token.clone();
        t.eos_token = tok_config.eos_token.clone();
        Ok(t)
    }

    pub fn source(&self) -> &str {
        &self.source
    }
    pub fn origin(&self) -> &Path {
        &self.origin
    }
    /// True when the checkpoint had no template and ChatML is used.
    pub fn is_fallback(&self) -> bool {
        self.fallback
    }

    /// Renders `messages` (any serialisable list of `{role, content, …}` objects).
    pub fn render<M: Serialize>(&self, messages: &[M], opts: &RenderOptions) -> Result<String> {
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert("add_generation_prompt", Value::from(opts.add_generation_prompt));
        if let Some(b) = &self.bos_token {
            ctx.insert("bos_token", Value::from(b.as_str()));
        }
        if let Some(e) = &self.eos_token {
            ctx.insert("eos_token", Value::from(e.as_str()));
        }
        if let Some(t) = opts.enable_thinking {
            ctx.insert("enable_thinking", Value::from(t));
        }
        let tmpl = self.env.get_template(NAME).map_err(|e| self.err("is not loaded", &e))?;
        tmpl.render(ctx).map_err(|e| self.err("failed to render", &e))
    }

    fn err(&self, what: &str, e: &minijinja::Error) -> Error {
        Error::Template { path: self.origin.clone(), detail: format!("{what}: {}", describe(e)) }
    }
}

/// A minijinja error with its chain of causes on one line.
fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        s.push_str(&format!(": {c}"));
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pycompat_methods_and_raise_exception() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% if m.role not in ['user','system'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}\
             [{{ m.content.strip().upper() }}|{{ m.content.startswith(' a') }}|{{ m | tojson }}]{% endfor %}",
            "t.json",
        )
        .unwrap();
        let out = t.render(&[Message::user(" ab ")], &RenderOptions::default()).unwrap();
        // Python's spelling of booleans; tojson keeps key order (transformers' own tojson does).
        assert_eq!(out, r#"[AB|True|{"role":"user","content":" ab "}]"#);
        let e = t.render(&[Message::assistant("x")], &RenderOptions::default()).unwrap_err().to_string();
        assert!(e.contains("t.json") && e.contains("bad role assistant"), "{e}");
    }

    #[test]
    fn chatml_fallback_and_thinking_flag() {
        let t = ChatTemplate::chatml();
        let out = t
            .render(
                &[Message::system("s"), Message::user("u")],
                &RenderOptions { add_generation_prompt: true, ..Default::default() },
            )
            .unwrap();
        assert_eq!(out, "<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\n");
        let q3 = ChatTemplate::new(
            "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}ok",
            "x",
        )
        .unwrap();
        let off = RenderOptions { enable_thinking: Some(false), ..Default::default() };
        assert_eq!(q3.render::<Message>(&[], &off).unwrap(), "<think>\n\n</think>\n\nok");
        assert_eq!(q3.render::<Message>(&[], &RenderOptions::default()).unwrap(), "ok");
        let e = ChatTemplate::new("{% for %}", "tokenizer_config.json").unwrap_err().to_string();
        assert!(e.contains("tokenizer_config.json") && e.contains("does not compile"), "{e}");
    }
}
