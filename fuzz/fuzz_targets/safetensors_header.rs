//! Any bytes as a safetensors file: `parse_header` must return a header whose entries lie
//! inside the buffer and whose dtype × shape byte counts match their offsets, or an error;
//! a file it accepts must then open and load (as stored, as F32 and as BF16) without a panic.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use smelt_engine::DType;
use smelt_models::safetensors::{parse_header, SafetensorsFile};

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let Ok(header) = parse_header(Path::new("<fuzz>"), data) else { return };
    assert!(header.data_start >= 8 && header.data_start <= data.len());
    let data_len = data.len() - header.data_start;
    let mut covered = 0;
    for t in &header.tensors {
        assert!(t.begin <= t.end && t.end <= data_len, "{t:?} outside {data_len} data bytes");
        assert_eq!(t.elem_count() * t.dtype.size_in_bytes(), t.end - t.begin, "{t:?}");
        covered += t.end - t.begin;
    }
    assert_eq!(covered, data_len, "accepted offsets must tile the data section");

    // The same bytes through the memory-mapped file path.
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("temporary directory"));
    let path = dir.path().join("fuzz.safetensors");
    std::fs::write(&path, data).expect("write the input");
    let file = SafetensorsFile::open(&path).expect("open must accept what parse_header accepts");
    assert_eq!(file.tensors(), &header.tensors[..]);
    for dtype in [None, Some(DType::F32), Some(DType::BF16)] {
        if let Ok(all) = file.load_all(dtype, true) {
            for ((name, t), info) in all.iter().zip(file.tensors()) {
                assert_eq!(name, &info.name);
                assert_eq!(t.shape(), &info.shape[..]);
            }
        }
    }
});
