//! What `smelt train` reads from the user: the TOML configuration with `--set` overrides, and
//! the JSONL dataset. Each must give a valid value or an error naming the file (or the
//! override), never a panic.
//!
//! Input layout: byte 0 picks the target (even: config, odd: dataset); for the config the
//! rest is split at the first 0x00 byte into the TOML file and newline-separated `--set`
//! strings.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smelt_trainer::config::{TrainConfig, MAX_COUNT};
use smelt_trainer::data;

fuzz_target!(|data: &[u8]| {
    let [mode, rest @ ..] = data else { return };
    let dir = tempfile::tempdir().unwrap();
    if mode % 2 == 0 {
        let (file, sets) = match rest.iter().position(|&b| b == 0) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &[][..]),
        };
        let path = dir.path().join("run.toml");
        std::fs::write(&path, file).unwrap();
        let sets: Vec<String> = String::from_utf8_lossy(sets).lines().map(str::to_string).collect();
        match TrainConfig::load(Some(&path), &sets) {
            Ok(c) => {
                // Accepted configurations hold the invariants the loop relies on.
                assert!(c.num_generations >= 2 && c.generation_batch_size % c.num_generations == 0);
                assert!(c.generation_batch_size <= MAX_COUNT && c.per_device_train_batch_size >= 1);
                assert!(c.temperature > 0.0 && c.top_p > 0.0 && c.top_p <= 1.0);
                assert!(c.adam_epsilon > 0.0 && c.learning_rate.is_finite());
                c.loss_config().unwrap();
                c.reward_kind().unwrap();
                let _ = c.lr_at(usize::MAX);
            }
            Err(e) => assert!(!format!("{e:#}").is_empty()),
        }
    } else {
        let path = dir.path().join("data.jsonl");
        std::fs::write(&path, rest).unwrap();
        match data::load_jsonl(&path) {
            Ok(examples) => {
                assert!(!examples.is_empty());
                assert!(examples.iter().all(|e| !e.prompt.trim().is_empty() && !e.answer.trim().is_empty()));
            }
            Err(e) => assert!(format!("{e:#}").contains("data.jsonl"), "{e:#}"),
        }
    }
});
