//! Rubric rewards (RGR-GRPO's reward, arXiv 2511.12344; ALGORITHMS.md "Other seed methods").
//!
//! Each prompt carries weighted criteria c_k = (description, w_k, factual?). A judge says
//! whether a response passes each one (s_k ∈ {0, 1}), and the reward is
//!
//! ```text
//! R = Σ_k w_k s_k / Σ_k w_k,   r = 1 when every factual criterion passes, else R
//! ```
//!
//! The gate applies only to rubrics that have a factual criterion (ours: the paper's rubrics
//! always do, and without one "every factual criterion passes" would hold vacuously and give
//! every response 1).
//!
//! Judges are pluggable ([`Judge`]): the built-in [`ContainsJudge`] (a criterion with a
//! `pattern` passes when the response contains it; for tests and simple factual checks), and
//! [`CommandJudge`], an external process (an LLM judge, a script) speaking JSON lines on its
//! stdin / stdout:
//!
//! ```text
//! → {"id": 0, "prompt": "...", "response": "...", "answer": "...", "criteria": [{"criterion": "...", "weight": 1.0, "factual": true, "pattern": null}, ...]}
//! ← {"id": 0, "passed": [true, false, ...]}
//! ```
//!
//! one reply line per request line, in order, each written and flushed as soon as it is
//! ready (a Python judge: `print(json.dumps(reply), flush=True)`, or run it with `python3 -u`);
//! the reply's `id` may be left out, and is checked when given. The process is started once
//! and serves the whole run; each RL step sends all its rollouts' requests from a writer
//! thread while replies are read, so neither side can block the other on a full pipe. A reply
//! that is malformed, missing after `rubric.timeout_s`, or a judge that exits, ends the run
//! with an error naming the command and the reply (and the judge is killed).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

/// One weighted criterion of a prompt's rubric.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Criterion {
    /// What the judge checks, in words.
    pub criterion: String,
    /// w_k > 0.
    pub weight: f32,
    /// A factual criterion (intermediate or final results) gates the reward.
    pub factual: bool,
    /// For the built-in `contains` judge: the text a passing response contains.
    pub pattern: Option<String>,
}

impl Criterion {
    /// Parses one criterion from a dataset's `rubric` array; `at` names the place for errors.
    pub fn from_json(v: &serde_json::Value, at: &str) -> Result<Criterion> {
        let obj = v.as_object().with_context(|| format!("{at}: a rubric criterion must be a JSON object"))?;
        for key in obj.keys() {
            if !["criterion", "weight", "factual", "pattern"].contains(&key.as_str()) {
                bail!("{at}: unknown rubric key {key:?} (expected criterion, weight, factual, pattern)");
            }
        }
        let criterion = match obj.get("criterion") {
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => s.clone(),
            Some(_) => bail!("{at}: \"criterion\" must be a non-empty string"),
            None => bail!("{at}: a rubric criterion needs \"criterion\""),
        };
        let weight = match obj.get("weight") {
            None => 1.0,
            Some(w) => match w.as_f64() {
                Some(w) if w.is_finite() && w > 0.0 && w < f32::MAX as f64 => w as f32,
                _ => bail!("{at}: rubric \"weight\" must be a number > 0, got {w}"),
            },
        };
        let factual = match obj.get("factual") {
            None => false,
            Some(serde_json::Value::Bool(b)) => *b,
            Some(other) => bail!("{at}: rubric \"factual\" must be true or false, got {other}"),
        };
        let pattern = match obj.get("pattern") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(other) => bail!("{at}: rubric \"pattern\" must be a non-empty string, got {other}"),
        };
        Ok(Criterion { criterion, weight, factual, pattern })
    }
}

/// r = 1 when the rubric has factual criteria and all pass, else Σ w s / Σ w.
pub fn rubric_reward(criteria: &[Criterion], passed: &[bool]) -> f32 {
    assert_eq!(criteria.len(), passed.len(), "rubric_reward: one verdict per criterion");
    let has_factual = criteria.iter().any(|c| c.factual);
    if has_factual && criteria.iter().zip(passed).all(|(c, &p)| !c.factual || p) {
        return 1.0;
    }
    let total: f64 = criteria.iter().map(|c| c.weight as f64).sum();
    let got: f64 = criteria.iter().zip(passed).filter(|(_, &p)| p).map(|(c, _)| c.weight as f64).sum();
    if total > 0.0 {
        (got / total) as f32
    } else {
        0.0
    }
}

/// What a judge is asked about one response.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct JudgeRequest<'a> {
    pub prompt: &'a str,
    /// The completion as generated (thinking included).
    pub response: &'a str,
    /// The dataset's reference answer.
    pub answer: &'a str,
    pub criteria: &'a [Criterion],
}

/// Returns, for each request, one pass/fail per criterion.
pub trait Judge {
    fn judge(&mut self, requests: &[JudgeRequest]) -> Result<Vec<Vec<bool>>>;
}

/// The built-in judge: a criterion passes when the response contains its `pattern`.
pub struct ContainsJudge;

impl Judge for ContainsJudge {
    fn judge(&mut self, requests: &[JudgeRequest]) -> Result<Vec<Vec<bool>>> {
        requests
            .iter()
            .map(|r| {
                r.criteria
                    .iter()
                    .map(|c| match &c.pattern {
                        Some(p) => Ok(r.response.contains(p.as_str())),
                        None => bail!(
                            "rubric criterion {:?} has no \"pattern\", which the built-in contains judge needs \
                             (or set rubric.judge_command)",
                            c.criterion
                        ),
                    })
                    .collect()
            })
            .collect()
    }
}

/// An external judge process (see the module docs for the protocol).
pub struct CommandJudge {
    argv: Vec<String>,
    child: Child,
    stdin: Option<ChildStdin>,
    /// Lines of the judge's stdout, read by a thread for the judge's lifetime (so a reply can
    /// be waited for with a timeout); closed at EOF.
    replies: Receiver<std::io::Result<String>>,
    /// The longest wait for any one reply.
    timeout: Duration,
    /// Id of the next request.
    next_id: u64,
}

impl CommandJudge {
    /// Starts `argv[0] argv[1..]` with piped stdin/stdout (stderr passes through).
    pub fn spawn(argv: &[String], timeout: Duration) -> Result<CommandJudge> {
        let (program, args) = argv.split_first().context("rubric.judge_command is empty")?;
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting the rubric judge {argv:?}"))?;
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().context("rubric judge: no stdout pipe")?);
        let (tx, replies) = mpsc::channel();
        std::thread::spawn(move || loop {
            let mut line = String::new();
            match stdout.read_line(&mut line) {
                Ok(0) => return,
                Ok(_) => {
                    if tx.send(Ok(line)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        });
        Ok(CommandJudge { argv: argv.to_vec(), child, stdin, replies, timeout, next_id: 0 })
    }

    /// Ends the judge after a failure (a writer blocked on its full stdin gets a broken pipe)
    /// and says how it ended.
    fn kill(&mut self) -> String {
        let _ = self.child.kill();
        match self.child.wait() {
            Ok(s) => format!(" ({s})"),
            Err(_) => String::new(),
        }
    }
}

impl Judge for CommandJudge {
    fn judge(&mut self, requests: &[JudgeRequest]) -> Result<Vec<Vec<bool>>> {
        #[derive(Serialize)]
        struct Line<'a> {
            id: u64,
            #[serde(flatten)]
            request: &'a JudgeRequest<'a>,
        }
        let first = self.next_id;
        self.next_id += requests.len() as u64;
        let mut text = String::new();
        for (i, request) in requests.iter().enumerate() {
            text.push_str(&serde_json::to_string(&Line { id: first + i as u64, request })?);
            text.push('\n');
        }
        let mut stdin = self.stdin.take().with_context(|| format!("rubric judge {:?}: it has stopped", self.argv))?;
        let writer = std::thread::spawn(move || -> std::io::Result<ChildStdin> {
            stdin.write_all(text.as_bytes())?;
            stdin.flush()?;
            Ok(stdin)
        });
        let mut out = Vec::with_capacity(requests.len());
        let mut failure = None;
        for (i, r) in requests.iter().enumerate() {
            let line = match self.replies.recv_timeout(self.timeout) {
                Ok(Ok(line)) => line,
                Ok(Err(e)) => {
                    failure = Some(format!("reading reply {}: {e}", i + 1));
                    break;
                }
                Err(RecvTimeoutError::Timeout) => {
                    failure = Some(format!(
                        "no reply {} of {} within {:?} (rubric.timeout_s); a judge must write and flush one line \
                         per request line (python: print(..., flush=True) or python3 -u)",
                        i + 1,
                        requests.len(),
                        self.timeout
                    ));
                    break;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    failure = Some(format!("closed its output after {i} of {} replies", requests.len()));
                    break;
                }
            };
            match parse_reply(&line, r.criteria.len(), first + i as u64) {
                Ok(v) => out.push(v),
                Err(e) => {
                    failure = Some(format!("reply {} of {}: {e}: {:?}", i + 1, requests.len(), line.trim_end()));
                    break;
                }
            }
        }
        if let Some(f) = failure {
            let status = self.kill();
            let _ = writer.join();
            bail!("rubric judge {:?}{status}: {f}", self.argv);
        }
        match writer.join() {
            Ok(Ok(stdin)) => self.stdin = Some(stdin),
            Ok(Err(e)) => bail!("rubric judge {:?}: writing requests: {e}", self.argv),
            Err(_) => bail!("rubric judge {:?}: the writer thread panicked", self.argv),
        }
        Ok(out)
    }
}

impl Drop for CommandJudge {
    fn drop(&mut self) {
        // Closing stdin is the judge's signal to finish; a judge that lingers is killed.
        drop(self.stdin.take());
        for _ in 0..50 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `{"id": id, "passed": [bools]}` (the id optional; checked when given) or a bare array,
/// with exactly `n` verdicts.
fn parse_reply(line: &str, n: usize, id: u64) -> Result<Vec<bool>> {
    let v: serde_json::Value = serde_json::from_str(line).context("not JSON")?;
    let arr = match &v {
        serde_json::Value::Array(a) => a,
        serde_json::Value::Object(o) => {
            if let Some(got) = o.get("id") {
                if got.as_u64() != Some(id) {
                    bail!("answers id {got}, expected {id} (one reply per request, in order)");
                }
            }
            match o.get("passed") {
                Some(serde_json::Value::Array(a)) => a,
                _ => bail!("expected {{\"passed\": [true/false, ...]}}"),
            }
        }
        _ => bail!("expected {{\"passed\": [true/false, ...]}}"),
    };
    if arr.len() != n {
        bail!("{} verdicts for {n} criteria", arr.len());
    }
    arr.iter().map(|b| b.as_bool().context("verdicts must be true or false")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(weight: f32, factual: bool, pattern: &str) -> Criterion {
        Criterion { criterion: format!("has {pattern}"), weight, factual, pattern: Some(pattern.into()) }
    }

    #[test]
    fn reward_is_the_weighted_pass_rate_gated_by_factual_criteria() {
        let rubric = [c(2.0, true, "42"), c(1.0, false, "because"), c(1.0, false, "check")];
        assert_eq!(rubric_reward(&rubric, &[true, false, false]), 1.0, "every factual passes: 1");
        assert_eq!(rubric_reward(&rubric, &[false, true, true]), 0.5, "(1 + 1) / 4");
        assert_eq!(rubric_reward(&rubric, &[false, false, false]), 0.0);
        // Without factual criteria there is no gate: the weighted rate, never a free 1.
        let process = [c(3.0, false, "a"), c(1.0, false, "b")];
        assert_eq!(rubric_reward(&process, &[true, false]), 0.75);
        assert_eq!(rubric_reward(&process, &[true, true]), 1.0);
        // Two factual criteria: both must pass for the gate.
        let two = [c(1.0, true, "a"), c(1.0, true, "b"), c(2.0, false, "c")];
        assert_eq!(rubric_reward(&two, &[true, false, true]), 0.75);
    }

    #[test]
    fn criteria_parse_with_defaults_and_named_errors() {
        let v: serde_json::Value = serde_json::json!({"criterion": "states 42", "factual": true, "pattern": "42"});
        let p = Criterion::from_json(&v, "d.jsonl:3").unwrap();
        assert_eq!((p.weight, p.factual, p.pattern.as_deref()), (1.0, true, Some("42")));
        for (bad, want) in [
            (serde_json::json!("x"), "JSON object"),
            (serde_json::json!({"weight": 1}), "needs \"criterion\""),
            (serde_json::json!({"criterion": "a", "weight": 0}), "weight"),
            (serde_json::json!({"criterion": "a", "weight": "2"}), "weight"),
            (serde_json::json!({"criterion": "a", "factual": 1}), "factual"),
            (serde_json::json!({"criterion": "a", "pattern": ""}), "pattern"),
            (serde_json::json!({"criterion": "a", "wieght": 2}), "wieght"),
        ] {
            let e = format!("{:#}", Criterion::from_json(&bad, "d.jsonl:3").unwrap_err());
            assert!(e.contains("d.jsonl:3") && e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn contains_judge() {
        let rubric = [c(1.0, true, "42"), c(1.0, false, "check")];
        let req = |response| JudgeRequest { prompt: "q", response, answer: "42", criteria: &rubric };
        let v = ContainsJudge.judge(&[req("<think>6*7=42</think>42"), req("check: 41")]).unwrap();
        assert_eq!(v, vec![vec![true, false], vec![false, true]]);
        let bare = [Criterion { pattern: None, ..c(1.0, false, "x") }];
        let e = ContainsJudge.judge(&[JudgeRequest { criteria: &bare, ..req("x") }]).unwrap_err();
        assert!(format!("{e:#}").contains("pattern"), "{e:#}");
    }

    const SECOND: Duration = Duration::from_secs(1);

    fn sh(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    #[test]
    fn command_judge_speaks_json_lines_and_serves_many_batches() {
        // Passes the first criterion when the request mentions "42", fails the second; it
        // answers line by line, so a batch larger than a pipe buffer must not deadlock.
        let script = r#"while IFS= read -r l; do case "$l" in *'"response":"42'*) echo '{"passed": [true, false]}';; *) echo '[false, false]';; esac; done"#;
        let mut j = CommandJudge::spawn(&sh(script), SECOND).unwrap();
        let rubric = [c(1.0, true, "42"), c(1.0, false, "x")];
        let long = "y".repeat(2000);
        let mut reqs = Vec::new();
        for i in 0..200 {
            let response = if i % 3 == 0 { "42" } else { long.as_str() };
            reqs.push(JudgeRequest { prompt: "q", response, answer: "42", criteria: &rubric });
        }
        for _ in 0..2 {
            let v = j.judge(&reqs).unwrap();
            assert_eq!(v.len(), 200);
            for (i, p) in v.iter().enumerate() {
                assert_eq!(p, &vec![i % 3 == 0, false], "request {i}");
            }
        }
    }

    #[test]
    fn command_judge_errors_name_the_command_and_the_reply() {
        let rubric = [c(1.0, true, "42")];
        let reqs = [JudgeRequest { prompt: "q", response: "r", answer: "a", criteria: &rubric }; 3];
        let err = |script: &str| {
            let t0 = std::time::Instant::now();
            let e = format!("{:#}", CommandJudge::spawn(&sh(script), SECOND).unwrap().judge(&reqs).unwrap_err());
            assert!(t0.elapsed() < 10 * SECOND, "{script}: took {:?}", t0.elapsed());
            e
        };
        let e = err("read l; echo '[true]'; exit 3");
        assert!(e.contains("after 1 of 3") && e.contains("sh"), "{e}");
        let e = err("while read l; do echo '[true, true]'; done");
        assert!(e.contains("reply 1 of 3") && e.contains("2 verdicts for 1"), "{e}");
        let e = err("while read l; do echo 'yes'; done");
        assert!(e.contains("not JSON"), "{e}");
        let e = err(r#"while read l; do echo '{"id": 7, "passed": [true]}'; done"#);
        assert!(e.contains("answers id 7, expected 0"), "{e}");
        // A judge that never answers (or keeps its replies in a buffer) times out, named.
        let e = err("cat > /dev/null");
        assert!(e.contains("rubric.timeout_s") && e.contains("flush"), "{e}");
        let e = format!("{:#}", CommandJudge::spawn(&["/no/such/judge".into()], SECOND).err().unwrap());
        assert!(e.contains("/no/such/judge"), "{e}");
    }

    /// The reference judge in examples/ speaks the protocol (run when python3 is installed).
    #[test]
    fn example_python_judge() {
        if Command::new("python3").arg("--version").output().is_err() {
            eprintln!("skipping: no python3 on PATH to run examples/rubric_judge.py");
            return;
        }
        let script = smelt_kernels::testing::repo_path("examples/rubric_judge.py");
        // Without PYTHONUNBUFFERED (set on some machines), so the script's own flushing counts.
        let argv: Vec<String> = ["env", "-u", "PYTHONUNBUFFERED", "python3"]
            .into_iter()
            .map(String::from)
            .chain([script.to_string_lossy().into_owned()])
            .collect();
        let mut j = CommandJudge::spawn(&argv, 10 * SECOND).unwrap();
        let no_pattern = Criterion { pattern: None, ..c(1.0, false, "x") };
        let rubric = [c(2.0, true, "42"), Criterion { criterion: "shows the check".into(), ..no_pattern }];
        let req = |response| JudgeRequest { prompt: "q", response, answer: "42", criteria: &rubric };
        let reqs = [req("<think>41</think>42"), req("<think>42, check: it shows</think>41")];
        for _ in 0..2 {
            // Factual criteria read the answer after </think> only.
            assert_eq!(j.judge(&reqs).unwrap(), vec![vec![true, false], vec![false, true]]);
        }
    }

    /// A bad reply early in a batch far larger than the pipe buffers: the judge is killed and
    /// the error returned, instead of the writer waiting forever on a judge that waits on us.
    #[test]
    fn command_judge_fails_fast_on_a_bad_reply_in_a_large_batch() {
        let rubric = [c(1.0, true, "42")];
        let long = "y".repeat(2000);
        let reqs: Vec<JudgeRequest> =
            (0..2000).map(|_| JudgeRequest { prompt: "q", response: &long, answer: "a", criteria: &rubric }).collect();
        let banner = r#"echo 'loading judge...'; while read l; do echo '{"passed": [true]}'; done"#;
        let t0 = std::time::Instant::now();
        let e = format!("{:#}", CommandJudge::spawn(&sh(banner), 10 * SECOND).unwrap().judge(&reqs).unwrap_err());
        assert!(e.contains("reply 1 of 2000") && e.contains("not JSON"), "{e}");
        assert!(t0.elapsed() < 10 * SECOND, "took {:?}", t0.elapsed());
    }
}
