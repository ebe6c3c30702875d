//! Training data: prompts with reference answers, from a JSONL file or a built-in task.
//!
//! A JSONL line is an object with the prompt under `prompt` (or `question` / `problem`), the
//! reference answer under `answer` (a string or a number), optionally `solution`: a full
//! completion used by the supervised warm-up (`sft_steps`) and AHPO, and optionally `rubric`:
//! an array of criteria `{"criterion": …, "weight": 1, "factual": false, "pattern": …}` for
//! `reward = "rubric"`. GSM8K-style answers that carry
//! their working ("… #### 72") are reduced to the final answer with the same extractor the
//! reward uses. Every error names the file and line.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use smelt_engine::Rng;

use crate::reward::rubric::Criterion;

/// One training or evaluation example.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// The user message.
    pub prompt: String,
    /// The reference answer (the outcome y DRO teacher-forces; what accuracy compares with).
    pub answer: String,
    /// A reference completion (thinking and answer) for supervised warm-up and AHPO.
    pub solution: Option<String>,
    /// Weighted criteria for `reward = "rubric"`.
    pub rubric: Option<Vec<Criterion>>,
}

impl Example {
    /// The start of the prompt, for error messages (examples are shuffled, so an index alone
    /// would not find the line).
    pub fn label(&self) -> String {
        let mut short: String = self.prompt.chars().take(40).collect();
        if short.len() < self.prompt.len() {
            short.push('…');
        }
        format!("{short:?}")
    }
}

/// The built-in task: single-digit addition, in the thinking format the rewards read.
pub const BUILTIN_ADD: &str = "builtin:add";

/// Loads `spec`: a JSONL path or `builtin:add`.
pub fn load(spec: &str) -> Result<Vec<Example>> {
    if let Some(name) = spec.strip_prefix("builtin:") {
        return match name {
            "add" => Ok(builtin_add()),
            other => bail!("dataset = {spec:?}: unknown built-in task {other:?} (available: add)"),
        };
    }
    load_jsonl(Path::new(spec))
}

/// Every a + b with a, b in 0..=9, as "What is a+b?", answer "c", solution
/// "<think>a+b=c</think>c". Small enough for a tiny model to learn in seconds on CPU, which
/// is what the end-to-end test needs; real runs bring a dataset.
pub fn builtin_add() -> Vec<Example> {
    let mut out = Vec::with_capacity(100);
    for a in 0..10 {
        for b in 0..10 {
            let c = a + b;
            out.push(Example {
                prompt: format!("What is {a}+{b}?"),
                answer: c.to_string(),
                solution: Some(format!("<think>{a}+{b}={c}</think>{c}")),
                rubric: None,
            });
        }
    }
    out
}

pub fn load_jsonl(path: &Path) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading dataset {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        let at = || format!("{}:{lineno}", path.display());
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).map_err(|e| anyhow::anyhow!("{}: not valid JSON: {e}", at()))?;
        let obj = value.as_object().with_context(|| format!("{}: expected a JSON object", at()))?;
        let prompt = ["prompt", "question", "problem"]
            .iter()
            .find_map(|k| obj.get(*k))
            .with_context(|| format!("{}: missing \"prompt\" (or \"question\" / \"problem\")", at()))?;
        let prompt = prompt.as_str().with_context(|| format!("{}: \"prompt\" must be a string", at()))?;
        if prompt.trim().is_empty() {
            bail!("{}: \"prompt\" is empty", at());
        }
        let answer = match obj.get("answer") {
            Some(Value::String(s)) => crate::reward::answer::reference_answer(s),
            Some(Value::Number(n)) => n.to_string(),
            Some(_) => bail!("{}: \"answer\" must be a string or a number", at()),
            None => bail!("{}: missing \"answer\"", at()),
        };
        if answer.trim().is_empty() {
            bail!("{}: \"answer\" is empty", at());
        }
        let solution = match obj.get("solution") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => bail!("{}: \"solution\" must be a string", at()),
        };
        let rubric = match obj.get("rubric") {
            None | Some(Value::Null) => None,
            Some(Value::Array(items)) if !items.is_empty() => {
                Some(items.iter().map(|c| Criterion::from_json(c, &at())).collect::<Result<Vec<_>>>()?)
            }
            Some(_) => bail!("{}: \"rubric\" must be a non-empty array of criteria", at()),
        };
        out.push(Example { prompt: prompt.to_string(), answer, solution, rubric });
    }
    if out.is_empty() {
        bail!("{}: no examples", path.display());
    }
    Ok(out)
}

/// Splits off a held-out set: `eval` given → loaded from it; else the last `eval_size` of a
/// seeded shuffle of `train` (at most half of it).
pub fn split(mut train: Vec<Example>, eval: Option<&str>, eval_size: usize, seed: u64) -> Result<Split> {
    let mut rng = Rng::new(seed ^ 0x5eed_da7a);
    shuffle(&mut train, &mut rng);
    let eval = match eval {
        Some(spec) => load(spec).with_context(|| "eval_dataset")?,
        None => {
            let k = eval_size.min(train.len() / 2);
            train.split_off(train.len() - k)
        }
    };
    if train.is_empty() {
        bail!("the training set is empty");
    }
    Ok(Split { train, eval })
}

pub struct Split {
    pub train: Vec<Example>,
    pub eval: Vec<Example>,
}

pub fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
}

/// Cycles through the training set in seeded shuffled epochs; its position is saved in the
/// trainer state so a resumed run continues where it stopped.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampler {
    pub order: Vec<usize>,
    pub pos: usize,
    pub epoch: u64,
    pub seed: u64,
}

impl Sampler {
    pub fn new(n: usize, seed: u64) -> Sampler {
        let mut s = Sampler { order: (0..n).collect(), pos: 0, epoch: 0, seed };
        s.reshuffle();
        s
    }

    fn reshuffle(&mut self) {
        self.order.sort_unstable();
        shuffle(&mut self.order, &mut Rng::new(self.seed.wrapping_add(self.epoch.wrapping_mul(0x9e37_79b9))));
    }

    /// The next `k` example indices.
    pub fn take(&mut self, k: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(k.min(self.order.len()));
        while out.len() < k && !self.order.is_empty() {
            if self.pos == self.order.len() {
                self.pos = 0;
                self.epoch += 1;
                self.reshuffle();
            }
            out.push(self.order[self.pos]);
            self.pos += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_add_is_complete_and_consistent() {
        let d = load("builtin:add").unwrap();
        assert_eq!(d.len(), 100);
        assert_eq!(d[37].prompt, "What is 3+7?");
        assert_eq!(d[37].answer, "10");
        assert_eq!(d[37].solution.as_deref(), Some("<think>3+7=10</think>10"));
        assert!(format!("{:#}", load("builtin:mul").unwrap_err()).contains("builtin:mul"));
    }

    #[test]
    fn jsonl_fields_and_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(
            &p,
            "{\"prompt\": \"2+2?\", \"answer\": 4}\n\n{\"question\": \"q\", \"answer\": \"work...\\n#### 1,234\", \"solution\": \"s\"}\n",
        )
        .unwrap();
        let d = load(p.to_str().unwrap()).unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!((d[0].prompt.as_str(), d[0].answer.as_str()), ("2+2?", "4"));
        assert_eq!(d[1].answer, "1,234", "GSM8K answers reduce to the final number");
        assert_eq!(d[1].solution.as_deref(), Some("s"));
        std::fs::write(
            &p,
            "{\"prompt\": \"a\", \"answer\": 1, \"rubric\": [{\"criterion\": \"c\", \"pattern\": \"1\"}]}\n",
        )
        .unwrap();
        let r = load(p.to_str().unwrap()).unwrap().remove(0).rubric.unwrap();
        assert_eq!((r[0].criterion.as_str(), r[0].pattern.as_deref(), r[0].weight), ("c", Some("1"), 1.0));

        for (text, want) in [
            ("{\"prompt\": \"a\"}\n", ":1: missing \"answer\""),
            ("{\"prompt\": \"a\", \"answer\": 1}\n{\"answer\": 1}\n", ":2: missing \"prompt\""),
            ("{\"prompt\": 3, \"answer\": 1}\n", "must be a string"),
            ("{\"prompt\": \"a\", \"answer\": [1]}\n", "string or a number"),
            ("[1]\n", "expected a JSON object"),
            ("{\"prompt\": \"a\", \"answer\": 1\n", ":1"),
            ("\n", "no examples"),
            ("{\"prompt\": \"a\", \"answer\": 1, \"rubric\": []}\n", "non-empty array"),
            ("{\"prompt\": \"a\", \"answer\": 1, \"rubric\": [{\"weight\": 2}]}\n", ":1: a rubric criterion needs"),
        ] {
            std::fs::write(&p, text).unwrap();
            let e = format!("{:#}", load(p.to_str().unwrap()).unwrap_err());
            assert!(e.contains("d.jsonl") && e.contains(want), "{text:?}: {e}");
        }
        let e = format!("{:#}", load(dir.path().join("none.jsonl").to_str().unwrap()).unwrap_err());
        assert!(e.contains("none.jsonl"), "{e}");
    }

    #[test]
    fn split_and_sampler_are_seeded_and_cover_everything() {
        let s = split(builtin_add(), None, 32, 1).unwrap();
        assert_eq!((s.train.len(), s.eval.len()), (68, 32));
        let again = split(builtin_add(), None, 32, 1).unwrap();
        assert_eq!(s.eval, again.eval);
        let mut all: Vec<String> = s.train.iter().chain(&s.eval).map(|e| e.prompt.clone()).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 100);

        let mut sm = Sampler::new(5, 3);
        let first: Vec<usize> = sm.take(5);
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2, 3, 4], "one epoch visits each example once");
        let next = sm.take(7);
        assert_eq!(next.len(), 7);
        assert_eq!(sm.epoch, 2);
        let mut resumed = Sampler { ..sm.clone() };
        assert_eq!(resumed.take(4), sm.take(4));
    }
}
