//! A whole model directory: config.json, optionally model.safetensors.index.json, and one
//! safetensors file, then `Checkpoint::open` + `load_weights`. Loading must end in weights
//! matching config.json or an error.
//!
//! Input layout (see ../make_seeds.py): `mode: u8`, `config_len: u16 LE`, config.json;
//! if `mode & 1`: `index_len: u16 LE`, the index, and the rest is the shard `s.safetensors`;
//! otherwise the rest is `model.safetensors`.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use smelt_models::{Checkpoint, LoadOptions};

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

fn take<'a>(data: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (len, rest) = data.split_first_chunk::<2>()?;
    let len = u16::from_le_bytes(*len) as usize;
    let (part, rest) = (rest.get(..len)?, rest.get(len..)?);
    *data = rest;
    Some(part)
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else { return };
    let Some(config) = take(&mut rest) else { return };
    let index = if mode & 1 == 1 {
        match take(&mut rest) {
            Some(i) => Some(i),
            None => return,
        }
    } else {
        None
    };
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("temporary directory")).path();
    for f in ["config.json", "model.safetensors.index.json", "model.safetensors", "s.safetensors"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    std::fs::write(dir.join("config.json"), config).expect("write config.json");
    match index {
        Some(index) => {
            std::fs::write(dir.join("model.safetensors.index.json"), index).expect("write the index");
            std::fs::write(dir.join("s.safetensors"), rest).expect("write the shard");
        }
        None => std::fs::write(dir.join("model.safetensors"), rest).expect("write model.safetensors"),
    }
    let Ok(ckpt) = Checkpoint::open(dir) else { return };
    if let Ok(w) = ckpt.load_weights(&LoadOptions::default()) {
        assert_eq!(w.num_parameters(), ckpt.config.num_parameters());
        assert_eq!(w.layers.len(), ckpt.config.num_hidden_layers);
    }
});
