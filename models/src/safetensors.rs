//! Reading and writing safetensors files.
//!
//! The reader is our own (rather than the `safetensors` crate's) so that every structural
//! problem becomes an error naming the file and the tensor, duplicate tensor names are caught
//! (a JSON object parser keeps the last of two equal keys silently), and no allocation is ever
//! sized by a number from the file before it has been checked against the file's length.
//!
//! Layout: 8-byte little-endian header length N, N bytes of JSON header
//! (`{"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}`),
//! then the data section; offsets are relative to the data section. As in the reference
//! implementation, the tensors sorted by offset must tile the data section exactly: no
//! overlap, no hole, no trailing bytes.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::Value;
use smelt_engine::{DType, Device, Tensor};

use crate::{Error, Result};

/// Headers above this are refused before parsing (the reference implementation's limit).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor's entry in a safetensors header, validated against the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Byte range within the data section.
    pub begin: usize,
    pub end: usize,
}

impl TensorInfo {
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A memory-mapped safetensors file whose header has been fully validated.
pub struct SafetensorsFile {
    path: PathBuf,
    // Safety note: a memory map is only sound while no one truncates or rewrites the file;
    // like every mmap-based loader we accept that risk for checkpoints that are read once.
    mmap: memmap2::Mmap,
    data_start: usize,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    metadata: BTreeMap<String, String>,
}

impl fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SafetensorsFile({}, {} tensors)", self.path.display(), self.tensors.len())
    }
}

/// The validated header of a safetensors buffer.
#[derive(Clone, Debug, Default)]
pub struct Header {
    /// Tensors in header order.
    pub tensors: Vec<TensorInfo>,
    pub metadata: BTreeMap<String, String>,
    /// Offset of the data section from the start of the buffer.
    pub data_start: usize,
}

/// Header entries in file order, duplicates kept, so they can be detected.
struct Entries(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> std::result::Result<Entries, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = m.next_entry::<String, Value>()? {
                    out.push((k, v));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

fn parse_dtype(s: &str) -> std::result::Result<DType, String> {
    match s {
        "F32" => Ok(DType::F32),
        "BF16" => Ok(DType::BF16),
        "F16" => Ok(DType::F16),
        "I32" => Ok(DType::I32),
        "U32" => Ok(DType::U32),
        "F64" | "I64" | "U64" | "I16" | "U16" | "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" | "F4"
        | "F6_E2M3" | "F6_E3M2" | "C64" => {
            Err(format!("dtype {s} is not supported (smelt reads F32, BF16, F16, I32 and U32)"))
        }
        _ => Err(format!("unknown dtype {s:?}")),
    }
}

pub(crate) fn dtype_tag(d: DType) -> &'static str {
    match d {
        DType::F32 => "F32",
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        DType::I32 => "I32",
        DType::U32 => "U32",
    }
}

/// Validates a whole safetensors buffer's header; `path` only names the file in errors.
/// Never panics and allocates only in proportion to the header, which is checked to lie within
/// `bytes`.
pub fn parse_header(path: &Path, bytes: &[u8]) -> Result<Header> {
    let bad = |d: String| Error::safetensors(path, d);
    let file_len = bytes.len() as u64;
    if file_len < 8 {
        return Err(bad(format!(
            "the file is {file_len} bytes, shorter than the 8-byte header length (truncated download?)"
        )));
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&bytes[..8]);
    let n = u64::from_le_bytes(len_bytes);
    if n > file_len - 8 {
        return Err(bad(format!(
            "the header length is {n} bytes but the file has only {} bytes after it (truncated download?)",
            file_len - 8
        )));
    }
    if n > MAX_HEADER_BYTES {
        return Err(bad(format!("the header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")));
    }
    // n <= file_len - 8 <= usize::MAX since `bytes` exists.
    let data_start = 8 + n as usize;
    let data_len = bytes.len() - data_start;
    let header_bytes = &bytes[8..data_start];
    let entries: Entries = serde_json::from_slice(header_bytes).map_err(|e| {
        bad(format!("the header is not a valid JSON object (line {}, column {}): {e}", e.line(), e.column()))
    })?;

    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut tensors = Vec::new();
    let mut metadata = BTreeMap::new();
    for (i, (name, v)) in entries.0.iter().enumerate() {
        if let Some(first) = seen.insert(name.as_str(), i) {
            return Err(bad(format!("tensor name {name:?} appears twice in the header (entries {first} and {i})")));
        }
        if name == "__metadata__" {
            let obj = v.as_object().ok_or_else(|| bad("`__metadata__` is not a JSON object".into()))?;
            for (k, val) in obj {
                let s = val.as_str().ok_or_else(|| bad(format!("`__metadata__.{k}` is not a string")))?;
                metadata.insert(k.clone(), s.to_string());
            }
            continue;
        }
        tensors.push(parse_entry(name, v, data_len).map_err(|d| bad(format!("tensor `{name}`: {d}")))?);
    }

    // Tile check: sorted by offset, each tensor starts where the previous one ended.
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| (tensors[i].begin, tensors[i].end));
    let mut expected = 0usize;
    let mut prev: Option<&TensorInfo> = None;
    for &i in &order {
        let t = &tensors[i];
        if t.begin < expected {
            let p = prev.map(|p| p.name.as_str()).unwrap_or("");
            return Err(bad(format!(
                "tensor `{}` (bytes {}..{}) overlaps tensor `{p}` (ending at byte {expected})",
                t.name, t.begin, t.end
            )));
        }
        if t.begin > expected {
            return Err(bad(format!(
                "{} unused bytes before tensor `{}` (bytes {}..{}): offsets must tile the data section",
                t.begin - expected,
                t.name,
                t.begin,
                t.end
            )));
        }
        expected = t.end;
        prev = Some(t);
    }
    if expected != data_len {
        return Err(bad(format!(
            "the tensors cover {expected} bytes but the data section has {data_len} (trailing or missing bytes)"
        )));
    }
    Ok(Header { tensors, metadata, data_start })
}

fn parse_entry(name: &str, v: &Value, data_len: usize) -> std::result::Result<TensorInfo, String> {
    let obj = v.as_object().ok_or("the entry is not a JSON object")?;
    let dtype = obj.get("dtype").and_then(Value::as_str).ok_or("missing or non-string `dtype`")?;
    let dtype = parse_dtype(dtype)?;
    let shape_v = obj.get("shape").and_then(Value::as_array).ok_or("missing or non-array `shape`")?;
    let mut shape = Vec::with_capacity(shape_v.len().min(16));
    for d in shape_v {
        let d = d
            .as_u64()
            .and_then(|d| usize::try_from(d).ok())
            .ok_or(format!("shape {shape_v:?} is not a list of sizes"))?;
        shape.push(d);
    }
    let offs = obj.get("data_offsets").and_then(Value::as_array).ok_or("missing or non-array `data_offsets`")?;
    let off = |i: usize| offs.get(i).and_then(Value::as_u64).and_then(|x| usize::try_from(x).ok());
    let (begin, end) = match (offs.len(), off(0), off(1)) {
        (2, Some(b), Some(e)) => (b, e),
        _ => return Err(format!("`data_offsets` {offs:?} is not a pair of byte offsets")),
    };
    if begin > end {
        return Err(format!("data_offsets [{begin}, {end}] are out of order (begin > end)"));
    }
    if end > data_len {
        return Err(format!("data_offsets [{begin}, {end}] are out of range: the data section has {data_len} bytes"));
    }
    let nbytes = shape
        .iter()
        .try_fold(dtype.size_in_bytes(), |acc, &d| acc.checked_mul(d))
        .ok_or(format!("shape {shape:?} overflows"))?;
    if nbytes != end - begin {
        return Err(format!(
            "dtype {} × shape {shape:?} = {nbytes} bytes, but data_offsets [{begin}, {end}] span {} bytes",
            dtype_tag(dtype),
            end - begin
        ));
    }
    Ok(TensorInfo { name: name.to_string(), dtype, shape, begin, end })
}

impl SafetensorsFile {
    /// Memory-maps `path` and validates its header.
    pub fn open(path: impl AsRef<Path>) -> Result<SafetensorsFile> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, "cannot open", e))?;
        let len = file.metadata().map_err(|e| Error::io(path, "cannot stat", e))?.len();
        if len < 8 {
            // Checked before mapping: mapping an empty file fails on some platforms.
            return Err(Error::safetensors(
                path,
                format!("the file is {len} bytes, shorter than the 8-byte header length (truncated download?)"),
            ));
        }
        // SAFETY: see the field comment; the map is read-only.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, "cannot memory-map", e))?;
        let header = parse_header(path, &mmap)?;
        let by_name = header.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            mmap,
            data_start: header.data_start,
            tensors: header.tensors,
            by_name,
            metadata: header.metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Tensors in header order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The raw little-endian bytes of a tensor of this file.
    pub fn bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.mmap[self.data_start + info.begin..self.data_start + info.end]
    }

    /// Loads one tensor, converted to `dtype` (float ↔ float only; integers load as-is), on the
    /// CPU. With `check_finite`, NaN or ±Inf in a float tensor is an error naming it.
    pub fn load(&self, name: &str, dtype: Option<DType>, check_finite: bool) -> Result<Tensor> {
        let info = self
            .get(name)
            .ok_or_else(|| Error::safetensors(&self.path, format!("no tensor named `{name}` in this file")))?;
        self.load_info(info, dtype, check_finite)
    }

    pub(crate) fn load_info(&self, info: &TensorInfo, dtype: Option<DType>, check_finite: bool) -> Result<Tensor> {
        let to = dtype.unwrap_or(info.dtype);
        if info.dtype.is_float() != to.is_float() || (!to.is_float() && to != info.dtype) {
            return Err(Error::safetensors(
                &self.path,
                format!("tensor `{}` is {} and cannot be loaded as {to}", info.name, dtype_tag(info.dtype)),
            ));
        }
        let src = self.bytes(info);
        let t = Tensor::zeros(&info.shape, to, Device::Cpu)?;
        let mut bad = None;
        with_bytes_mut(&t, |dst| bad = convert_par(src, info.dtype, dst, to, check_finite && info.dtype.is_float()))?;
        if let Some(index) = bad {
            let fs = info.dtype.size_in_bytes();
            let value = read_f32(&src[index * fs..(index + 1) * fs], info.dtype);
            return Err(Error::NonFinite { path: self.path.clone(), tensor: info.name.clone(), index, value });
        }
        Ok(t)
    }

    /// Every tensor of the file, in header order, each converted to `dtype` if given.
    pub fn load_all(&self, dtype: Option<DType>, check_finite: bool) -> Result<Vec<(String, Tensor)>> {
        self.tensors.iter().map(|i| Ok((i.name.clone(), self.load_info(i, dtype, check_finite)?))).collect()
    }
}

fn read_f32(b: &[u8], dtype: DType) -> f32 {
    match dtype {
        DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        DType::BF16 => half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
        DType::F16 => half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
        DType::I32 | DType::U32 => f32::NAN,
    }
}

/// [`convert`] split over the CPU pool for large tensors: loading is memory-bound, and a
/// 0.5B-parameter checkpoint is a billion bytes or more.
fn convert_par(src: &[u8], from: DType, dst: &mut [u8], to: DType, check: bool) -> Option<usize> {
    let (fs, ts) = (from.size_in_bytes(), to.size_in_bytes());
    let n = src.len() / fs;
    let pool = smelt_engine::cpu::pool();
    let pieces = if n < (1 << 18) { 1 } else { pool.current_num_threads() * 4 };
    let per = n.div_ceil(pieces).max(1);
    let mut results = vec![None; n.div_ceil(per)];
    pool.scope(|scope| {
        for ((s, d), r) in src.chunks(per * fs).zip(dst.chunks_mut(per * ts)).zip(results.iter_mut()) {
            scope.spawn(move |_| *r = convert(s, from, d, to, check));
        }
    });
    results.iter().enumerate().find_map(|(k, r)| r.map(|i| k * per + i))
}

/// Converts a little-endian buffer between float dtypes (a copy when equal, integers only to
/// themselves), returning the index of the first NaN/±Inf source element when `check`.
/// Half → f32 is exact; f32 → half rounds to nearest even, as `Tensor::to_dtype` does.
/// Each (from, to) pair is its own monomorphised loop: a per-element indirect call made the
/// load of a 0.5B model several times slower.
fn convert(src: &[u8], from: DType, dst: &mut [u8], to: DType, check: bool) -> Option<usize> {
    use DType::*;
    let rd_f32 = |b: [u8; 4]| f32::from_le_bytes(b);
    let rd_bf16 = |b: [u8; 2]| f32::from_bits((u16::from_le_bytes(b) as u32) << 16);
    let rd_f16 = |b: [u8; 2]| half::f16::from_bits(u16::from_le_bytes(b)).to_f32();
    let wr_bf16 = |x: f32| half::bf16::from_f32(x).to_le_bytes();
    let wr_f16 = |x: f32| half::f16::from_f32(x).to_le_bytes();
    let nf_f32 = |b: [u8; 4]| u32::from_le_bytes(b) & 0x7f80_0000 == 0x7f80_0000;
    let nf_bf16 = |b: [u8; 2]| u16::from_le_bytes(b) & 0x7f80 == 0x7f80;
    let nf_f16 = |b: [u8; 2]| u16::from_le_bytes(b) & 0x7c00 == 0x7c00;
    match (from, to) {
        (F32, F32) => run::<4, 4>(src, dst, check, nf_f32, |b| b),
        (F32, BF16) => run::<4, 2>(src, dst, check, nf_f32, |b| wr_bf16(rd_f32(b))),
        (F32, F16) => run::<4, 2>(src, dst, check, nf_f32, |b| wr_f16(rd_f32(b))),
        (BF16, F32) => run::<2, 4>(src, dst, check, nf_bf16, |b| rd_bf16(b).to_le_bytes()),
        (BF16, BF16) => run::<2, 2>(src, dst, check, nf_bf16, |b| b),
        (BF16, F16) => run::<2, 2>(src, dst, check, nf_bf16, |b| wr_f16(rd_bf16(b))),
        (F16, F32) => run::<2, 4>(src, dst, check, nf_f16, |b| rd_f16(b).to_le_bytes()),
        (F16, BF16) => run::<2, 2>(src, dst, check, nf_f16, |b| wr_bf16(rd_f16(b))),
        (F16, F16) => run::<2, 2>(src, dst, check, nf_f16, |b| b),
        _ => {
            // Integers (to the same dtype only, checked by the caller): a plain copy.
            let k = src.len().min(dst.len());
            dst[..k].copy_from_slice(&src[..k]);
            None
        }
    }
}

#[inline(always)]
fn run<const FS: usize, const TS: usize>(
    src: &[u8],
    dst: &mut [u8],
    check: bool,
    non_finite: impl Fn([u8; FS]) -> bool,
    f: impl Fn([u8; FS]) -> [u8; TS],
) -> Option<usize> {
    let mut bad = None;
    for (i, (s, d)) in src.chunks_exact(FS).zip(dst.chunks_exact_mut(TS)).enumerate() {
        let b: [u8; FS] = std::array::from_fn(|k| s[k]);
        if check && bad.is_none() && non_finite(b) {
            bad = Some(i);
        }
        d.copy_from_slice(&f(b));
    }
    bad
}

/// Runs `f` over a CPU tensor's bytes.
fn with_bytes_mut(t: &Tensor, f: impl FnOnce(&mut [u8])) -> Result<()> {
    use smelt_engine::{bf16, f16};
    match t.dtype() {
        DType::F32 => f(bytemuck::cast_slice_mut(&mut t.cpu_write::<f32>()?[..])),
        DType::BF16 => f(bytemuck::cast_slice_mut(&mut t.cpu_write::<bf16>()?[..])),
        DType::F16 => f(bytemuck::cast_slice_mut(&mut t.cpu_write::<f16>()?[..])),
        DType::I32 => f(bytemuck::cast_slice_mut(&mut t.cpu_write::<i32>()?[..])),
        DType::U32 => f(bytemuck::cast_slice_mut(&mut t.cpu_write::<u32>()?[..])),
    }
    Ok(())
}

/// Writes `tensors` to `path` as safetensors with `{"format": "pt"}` metadata (what
/// transformers expects), atomically: a temporary file in the same directory is written,
/// fsynced and renamed over `path`, so a crash leaves either the old file or the new one.
/// Tensors keep their dtype and may live on any device. Names must be unique.
pub fn save_safetensors<S: AsRef<str>>(path: impl AsRef<Path>, tensors: &[(S, &Tensor)]) -> Result<()> {
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    save_safetensors_with_metadata(path, tensors, &meta)
}

/// [`save_safetensors`] with caller-chosen `__metadata__`.
pub fn save_safetensors_with_metadata<S: AsRef<str>>(
    path: impl AsRef<Path>,
    tensors: &[(S, &Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let path = path.as_ref();
    let entries: Vec<(String, DType, Vec<usize>)> =
        tensors.iter().map(|(n, t)| (n.as_ref().to_string(), t.dtype(), t.shape().to_vec())).collect();
    write_atomic(path, &entries, metadata, |i, w| {
        w.write_all(&tensors[i].1.to_bytes()?).map_err(|e| Error::io(path, "cannot write", e))
    })
}

/// Writes a safetensors file whose tensors are produced one at a time by `fill(i, writer)`,
/// so callers can stream data without holding it all in memory. `fill` must write exactly
/// the entry's byte count, which is checked.
pub(crate) fn write_atomic(
    path: &Path,
    entries: &[(String, DType, Vec<usize>)],
    metadata: &BTreeMap<String, String>,
    mut fill: impl FnMut(usize, &mut dyn Write) -> Result<()>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata).map_err(|e| Error::Msg(e.to_string()))?);
    }
    let mut offset = 0usize;
    let mut sizes = Vec::with_capacity(entries.len());
    for (name, dtype, shape) in entries {
        if name == "__metadata__" || header.contains_key(name) {
            return Err(Error::safetensors(
                path,
                format!("cannot write: tensor name {name:?} is reserved or repeated"),
            ));
        }
        let n = shape.iter().product::<usize>() * dtype.size_in_bytes();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype_tag(*dtype), "shape": shape, "data_offsets": [offset, offset + n]}),
        );
        sizes.push(n);
        offset += n;
    }
    let mut header = serde_json::to_vec(&Value::Object(header)).map_err(|e| Error::Msg(e.to_string()))?;
    // Pad with spaces so the data section starts 8-byte aligned, as the reference writer does.
    while header.len() % 8 != 0 {
        header.push(b' ');
    }

    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let io = |op: &'static str| move |e: std::io::Error| Error::io(path, op, e);
    let tmp = tempfile::Builder::new()
        .prefix(".smelt-tmp-")
        .suffix(".safetensors")
        .tempfile_in(&dir)
        .map_err(|e| Error::io(&dir, "cannot create a temporary file in", e))?;
    {
        let mut w = BufWriter::with_capacity(1 << 20, tmp.as_file());
        w.write_all(&(header.len() as u64).to_le_bytes()).map_err(io("cannot write"))?;
        w.write_all(&header).map_err(io("cannot write"))?;
        for (i, &n) in sizes.iter().enumerate() {
            let mut counted = Counting { inner: &mut w, n: 0 };
            fill(i, &mut counted)?;
            if counted.n != n {
                return Err(Error::safetensors(
                    path,
                    format!("internal: tensor `{}` wrote {} bytes, expected {n}", entries[i].0, counted.n),
                ));
            }
        }
        w.flush().map_err(io("cannot write"))?;
    }
    tmp.as_file().sync_all().map_err(io("cannot fsync"))?;
    #[cfg(unix)]
    {
        // tempfile creates 0600; a checkpoint should be readable like any file the user writes.
        use std::os::unix::fs::PermissionsExt;
        let _ = tmp.as_file().set_permissions(std::fs::Permissions::from_mode(0o644));
    }
    tmp.persist(path).map_err(|e| Error::io(path, "cannot rename the temporary file to", e.error))?;
    // Make the rename durable; not every platform or filesystem supports syncing a directory.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

struct Counting<'a, W: Write> {
    inner: &'a mut W,
    n: usize,
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k;
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
