//! A Qwen checkpoint's parameters, loaded from safetensors into a struct that mirrors the
//! architecture, so the forward pass reads `layer.q_proj` rather than looking names up.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use smelt_engine::{DType, Device, Tensor};

use crate::json;
use crate::safetensors::{SafetensorsFile, TensorInfo};
use crate::{Config, Error, Result};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// How [`Weights::load`] materialises tensors.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Dtype of every loaded tensor (F32 for CPU compute; BF16 keeps bf16 files as they are).
    pub dtype: DType,
    pub device: Device,
    /// Scan every tensor for NaN/±Inf while loading (one pass over the data, which the copy
    /// makes anyway); the error names the tensor.
    pub check_finite: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { dtype: DType::F32, device: Device::Cpu, check_finite: true }
    }
}

/// One decoder layer. Linear weights are `[out_features, in_features]`, as HF stores them
/// (so `y = x · Wᵀ`); biases and norm weights are 1-D.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    /// `[hidden]`
    pub input_layernorm: Tensor,
    /// `[heads·head_dim, hidden]`
    pub q_proj: Tensor,
    /// `[kv_heads·head_dim, hidden]`
    pub k_proj: Tensor,
    /// `[kv_heads·head_dim, hidden]`
    pub v_proj: Tensor,
    /// `[hidden, heads·head_dim]`
    pub o_proj: Tensor,
    /// `[heads·head_dim]` (Qwen2, or Qwen3 with `attention_bias`)
    pub q_bias: Option<Tensor>,
    /// `[kv_heads·head_dim]`
    pub k_bias: Option<Tensor>,
    /// `[kv_heads·head_dim]`
    pub v_bias: Option<Tensor>,
    /// `[hidden]` (Qwen3 with `attention_bias` only)
    pub o_bias: Option<Tensor>,
    /// `[head_dim]`, applied to each query head (Qwen3)
    pub q_norm: Option<Tensor>,
    /// `[head_dim]`, applied to each key head (Qwen3)
    pub k_norm: Option<Tensor>,
    /// `[hidden]`
    pub post_attention_layernorm: Tensor,
    /// `[intermediate, hidden]`
    pub gate_proj: Tensor,
    /// `[intermediate, hidden]`
    pub up_proj: Tensor,
    /// `[hidden, intermediate]`
    pub down_proj: Tensor,
}

impl LayerWeights {
    /// `[q_proj; k_proj; v_proj]` as one `[(heads + 2·kv_heads)·head_dim, hidden]` weight when
    /// the three are consecutive rows of one buffer ([`Weights::fuse_projections`]), else `None`.
    pub fn qkv(&self) -> Option<Tensor> {
        Tensor::rows_view(&[&self.q_proj, &self.k_proj, &self.v_proj])
    }

    /// `[gate_proj; up_proj]` as one `[2·intermediate, hidden]` weight, like [`Self::qkv`].
    pub fn gate_up(&self) -> Option<Tensor> {
        Tensor::rows_view(&[&self.gate_proj, &self.up_proj])
    }

    /// Re-homes `parts` into one new buffer (row blocks in order) and returns the views that
    /// replace them. Nothing changes on error.
    fn fuse(parts: &[&Tensor]) -> Result<Vec<Tensor>> {
        let first = *parts.first().ok_or_else(|| Error::Msg("fuse_projections: no tensors".into()))?;
        let cols = first.rows_cols().1;
        if parts
            .iter()
            .any(|p| p.rank() != 2 || p.dim(1) != cols || p.dtype() != first.dtype() || p.device() != first.device())
        {
            let shapes: Vec<String> =
                parts.iter().map(|p| format!("{:?} {} {}", p.shape(), p.dtype(), p.device())).collect();
            return Err(Error::Msg(format!(
                "fuse_projections: weights {} are not [rows, {cols}] alike",
                shapes.join(", ")
            )));
        }
        let rows: usize = parts.iter().map(|p| p.dim(0)).sum();
        let fused = Tensor::empty(&[rows, cols], first.dtype(), first.device())?;
        let mut start = 0;
        let mut views = Vec::with_capacity(parts.len());
        for p in parts {
            let view = fused.narrow_rows(start, p.dim(0))?;
            smelt_kernels::cast::cast_into(p, &view)?;
            views.push(view);
            start += p.dim(0);
        }
        Ok(views)
    }
}

/// Every parameter of a Qwen2/Qwen3 causal LM.
///
/// The same struct holds anything parameter-shaped (gradients, AdamW moments): build one
/// with [`Weights::zeros`] or [`Weights::try_map`]. [`Weights::named_tensors`] yields the HF
/// names for saving and for optimizers.
#[derive(Clone, Debug)]
pub struct Weights {
    /// `[vocab, hidden]`
    pub embed_tokens: Tensor,
    pub layers: Vec<LayerWeights>,
    /// `[hidden]`
    pub norm: Tensor,
    /// `[vocab, hidden]`; `None` with tied embeddings (use [`Weights::lm_head`]).
    pub lm_head: Option<Tensor>,
}

/// Builds a [`Weights`] by asking `get` for each tensor of `config`, in
/// [`Config::expected_tensors`] order. The one place that maps HF names to struct fields.
fn assemble(config: &Config, mut get: impl FnMut(&str, &[usize]) -> Result<Tensor>) -> Result<Weights> {
    let expected = config.expected_tensors();
    let shapes: HashMap<&str, &[usize]> = expected.iter().map(|(n, s)| (n.as_str(), s.as_slice())).collect();
    let mut take = |name: String| -> Result<Tensor> {
        let shape =
            shapes.get(name.as_str()).copied().ok_or_else(|| Error::Msg(format!("internal: no shape for {name}")))?;
        get(&name, shape)
    };
    let embed_tokens = take("model.embed_tokens.weight".into())?;
    let mut layers = Vec::with_capacity(config.num_hidden_layers);
    for l in 0..config.num_hidden_layers {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        let input_layernorm = take(p("input_layernorm.weight"))?;
        let q_proj = take(p("self_attn.q_proj.weight"))?;
        let q_bias = config.qkv_bias.then(|| take(p("self_attn.q_proj.bias"))).transpose()?;
        let k_proj = take(p("self_attn.k_proj.weight"))?;
        let k_bias = config.qkv_bias.then(|| take(p("self_attn.k_proj.bias"))).transpose()?;
        let v_proj = take(p("self_attn.v_proj.weight"))?;
        let v_bias = config.qkv_bias.then(|| take(p("self_attn.v_proj.bias"))).transpose()?;
        let o_proj = take(p("self_attn.o_proj.weight"))?;
        let o_bias = config.o_bias.then(|| take(p("self_attn.o_proj.bias"))).transpose()?;
        let q_norm = config.qk_norm.then(|| take(p("self_attn.q_norm.weight"))).transpose()?;
        let k_norm = config.qk_norm.then(|| take(p("self_attn.k_norm.weight"))).transpose()?;
        let post_attention_layernorm = take(p("post_attention_layernorm.weight"))?;
        let gate_proj = take(p("mlp.gate_proj.weight"))?;
        let up_proj = take(p("mlp.up_proj.weight"))?;
        let down_proj = take(p("mlp.down_proj.weight"))?;
        layers.push(LayerWeights {
            input_layernorm,
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            q_bias,
            k_bias,
            v_bias,
            o_bias,
            q_norm,
            k_norm,
            post_attention_layernorm,
            gate_proj,
            up_proj,
            down_proj,
        });
    }
    let norm = take("model.norm.weight".into())?;
    let lm_head = (!config.tie_word_embeddings).then(|| take("lm_head.weight".into())).transpose()?;
    Ok(Weights { embed_tokens, layers, norm, lm_head })
}

impl Weights {
    /// Loads the checkpoint in `dir`: `model.safetensors.index.json` and its shards if the index
    /// exists, else `model.safetensors`.
    ///
    /// Every header is validated and every tensor's name and shape is checked against `config`
    /// before any tensor is allocated; all mismatches are reported in one
    /// [`Error::TensorMismatch`]. With tied embeddings a stored `lm_head.weight` (some exporters
    /// write one) is shape-checked and ignored, as transformers ignores it; non-persistent
    /// `rotary_emb.inv_freq` buffers found in old checkpoints are ignored too.
    pub fn load(dir: impl AsRef<Path>, config: &Config, opts: &LoadOptions) -> Result<Weights> {
        let dir = dir.as_ref();
        if !opts.dtype.is_float() {
            return Err(Error::Msg(format!("weights can only be loaded as a float dtype, not {}", opts.dtype)));
        }
        let source = Source::open(dir)?;
        source.check_against(dir, config)?;
        assemble(config, |name, _| {
            let (file, info) = source.find(name).ok_or_else(|| Error::Msg(format!("internal: `{name}` vanished")))?;
            let t = file.load_info(info, Some(opts.dtype), opts.check_finite)?;
            Ok(if opts.device.is_cpu() { t } else { t.to_device(opts.device)? })
        })
    }

    /// All-zero parameters of `config`'s shapes (gradient accumulators, optimizer moments).
    pub fn zeros(config: &Config, dtype: DType, device: Device) -> Result<Weights> {
        assemble(config, |_, shape| Ok(Tensor::zeros(shape, dtype, device)?))
    }

    /// [`Weights::zeros`] as views into one flat buffer, which is returned too: an op over the
    /// whole model (zeroing gradients, their global norm) is then one launch instead of one per
    /// tensor. Each view starts 256-byte aligned (the padding between views stays zero), so
    /// vectorised kernels and cuBLAS see aligned rows — except that a layer's q/k/v weights, and
    /// its q/k/v biases, follow each other without a gap (the group starts aligned): the fused
    /// projection's gradient is then one view of each ([`LayerWeights::qkv`] on the result).
    pub fn zeros_flat(config: &Config, dtype: DType, device: Device) -> Result<(Weights, Tensor)> {
        const ALIGN: usize = 256;
        let per = (ALIGN / dtype.size_in_bytes()).max(1);
        let expected = config.expected_tensors();
        let size: HashMap<&str, usize> = expected.iter().map(|(n, s)| (n.as_str(), s.iter().product())).collect();
        // Offsets in file order; q_proj's weight (or bias) places k's and v's right after it.
        let mut offset: HashMap<String, usize> = HashMap::new();
        let mut at = 0usize;
        for (name, _) in &expected {
            if offset.contains_key(name) {
                continue;
            }
            let group: Vec<String> = match name.split_once("self_attn.q_proj.") {
                Some((layer, kind)) => {
                    ["q", "k", "v"].iter().map(|p| format!("{layer}self_attn.{p}_proj.{kind}")).collect()
                }
                None => vec![name.clone()],
            };
            for member in group {
                let n = *size.get(member.as_str()).ok_or_else(|| Error::Msg(format!("internal: no {member}")))?;
                offset.insert(member, at);
                at += n;
            }
            at = at.div_ceil(per) * per;
        }
        let total = at;
        let flat = Tensor::zeros(&[total.max(1)], dtype, device)?;
        let weights = assemble(config, |name, shape| {
            let n: usize = shape.iter().product();
            match offset.get(name) {
                Some(&o) if o + n <= total => Ok(flat.narrow_rows(o, n)?.reshape(shape)?),
                _ => Err(Error::Msg(format!("internal: zeros_flat has no room for {name}"))),
            }
        })?;
        Ok((weights, flat))
    }

    /// Builds weights from named tensors (HF names), checking names and shapes against
    /// `config` like [`Weights::load`]. Tensor dtypes and devices are kept.
    pub fn from_named(config: &Config, tensors: Vec<(String, Tensor)>) -> Result<Weights> {
        let mut map: HashMap<String, Tensor> = HashMap::new();
        let mut problems = Vec::new();
        for (n, t) in tensors {
            if map.insert(n.clone(), t).is_some() {
                problems.push(format!("duplicate: {n}"));
            }
        }
        let found: BTreeMap<String, Vec<usize>> = map.iter().map(|(n, t)| (n.clone(), t.shape().to_vec())).collect();
        problems.extend(mismatches(config, &found, |_| String::new()));
        if !problems.is_empty() {
            return Err(Error::TensorMismatch { dir: PathBuf::from("<tensors>"), problems: summarise(problems) });
        }
        assemble(config, |name, _| map.remove(name).ok_or_else(|| Error::Msg(format!("internal: `{name}` missing"))))
    }

    /// A new `Weights` with `f(hf_name, tensor)` applied to every tensor.
    pub fn try_map(&self, mut f: impl FnMut(&str, &Tensor) -> Result<Tensor>) -> Result<Weights> {
        let mut out = self.clone();
        for (name, slot) in out.named_tensors_mut() {
            let new = f(&name, slot)?;
            *slot = new;
        }
        Ok(out)
    }

    /// The output projection: `lm_head` when untied, else the embedding matrix.
    pub fn lm_head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Stores each layer's q/k/v and gate/up projection weights as row blocks of one buffer per
    /// group, so inference runs one GEMM per group ([`LayerWeights::qkv`],
    /// [`LayerWeights::gate_up`]). The fields become views of those buffers with the same names,
    /// shapes and values: training, optimizers and checkpoints see no difference. Copies run on
    /// the weights' device; a group already fused is left alone, and an error leaves the group it
    /// happened in separate (its tensors untouched).
    pub fn fuse_projections(&mut self) -> Result<()> {
        for l in &mut self.layers {
            if l.qkv().is_none() {
                let v = LayerWeights::fuse(&[&l.q_proj, &l.k_proj, &l.v_proj])?;
                (l.q_proj, l.k_proj, l.v_proj) = (v[0].clone(), v[1].clone(), v[2].clone());
            }
            if l.gate_up().is_none() {
                let v = LayerWeights::fuse(&[&l.gate_proj, &l.up_proj])?;
                (l.gate_proj, l.up_proj) = (v[0].clone(), v[1].clone());
            }
        }
        Ok(())
    }

    /// Every tensor with its HF name, in [`Config::expected_tensors`] order. With tied
    /// embeddings `lm_head.weight` is absent (and stays absent when saved).
    pub fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), &self.embed_tokens)];
        for (l, layer) in self.layers.iter().enumerate() {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            out.push((p("input_layernorm.weight"), &layer.input_layernorm));
            out.push((p("self_attn.q_proj.weight"), &layer.q_proj));
            if let Some(b) = &layer.q_bias {
                out.push((p("self_attn.q_proj.bias"), b));
            }
            out.push((p("self_attn.k_proj.weight"), &layer.k_proj));
            if let Some(b) = &layer.k_bias {
                out.push((p("self_attn.k_proj.bias"), b));
            }
            out.push((p("self_attn.v_proj.weight"), &layer.v_proj));
            if let Some(b) = &layer.v_bias {
                out.push((p("self_attn.v_proj.bias"), b));
            }
            out.push((p("self_attn.o_proj.weight"), &layer.o_proj));
            if let Some(b) = &layer.o_bias {
                out.push((p("self_attn.o_proj.bias"), b));
            }
            if let Some(n) = &layer.q_norm {
                out.push((p("self_attn.q_norm.weight"), n));
            }
            if let Some(n) = &layer.k_norm {
                out.push((p("self_attn.k_norm.weight"), n));
            }
            out.push((p("post_attention_layernorm.weight"), &layer.post_attention_layernorm));
            out.push((p("mlp.gate_proj.weight"), &layer.gate_proj));
            out.push((p("mlp.up_proj.weight"), &layer.up_proj));
            out.push((p("mlp.down_proj.weight"), &layer.down_proj));
        }
        out.push(("model.norm.weight".to_string(), &self.norm));
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), h));
        }
        out
    }

    /// Mutable access to every tensor slot, with HF names, in the same order.
    pub fn named_tensors_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), &mut self.embed_tokens)];
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            out.push((p("input_layernorm.weight"), &mut layer.input_layernorm));
            out.push((p("self_attn.q_proj.weight"), &mut layer.q_proj));
            if let Some(b) = &mut layer.q_bias {
                out.push((p("self_attn.q_proj.bias"), b));
            }
            out.push((p("self_attn.k_proj.weight"), &mut layer.k_proj));
            if let Some(b) = &mut layer.k_bias {
                out.push((p("self_attn.k_proj.bias"), b));
            }
            out.push((p("self_attn.v_proj.weight"), &mut layer.v_proj));
            if let Some(b) = &mut layer.v_bias {
                out.push((p("self_attn.v_proj.bias"), b));
            }
            out.push((p("self_attn.o_proj.weight"), &mut layer.o_proj));
            if let Some(b) = &mut layer.o_bias {
                out.push((p("self_attn.o_proj.bias"), b));
            }
            if let Some(n) = &mut layer.q_norm {
                out.push((p("self_attn.q_norm.weight"), n));
            }
            if let Some(n) = &mut layer.k_norm {
                out.push((p("self_attn.k_norm.weight"), n));
            }
            out.push((p("post_attention_layernorm.weight"), &mut layer.post_attention_layernorm));
            out.push((p("mlp.gate_proj.weight"), &mut layer.gate_proj));
            out.push((p("mlp.up_proj.weight"), &mut layer.up_proj));
            out.push((p("mlp.down_proj.weight"), &mut layer.down_proj));
        }
        out.push(("model.norm.weight".to_string(), &mut self.norm));
        if let Some(h) = &mut self.lm_head {
            out.push(("lm_head.weight".to_string(), h));
        }
        out
    }

    /// Total number of parameters held.
    pub fn num_parameters(&self) -> usize {
        self.named_tensors().iter().map(|(_, t)| t.elem_count()).sum()
    }

    /// Writes every tensor to one `model.safetensors`-style file (atomically, with
    /// `{"format": "pt"}` metadata), in each tensor's current dtype.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        crate::safetensors::save_safetensors(path, &self.named_tensors())
    }
}

/// Where each tensor of a checkpoint lives.
struct Source {
    files: Vec<SafetensorsFile>,
    /// name → (file index, tensor index in that file)
    tensors: BTreeMap<String, (usize, usize)>,
}

impl Source {
    fn open(dir: &Path) -> Result<Source> {
        let index = dir.join(INDEX_FILE);
        let single = dir.join(SINGLE_FILE);
        if index.is_file() {
            Self::open_index(dir, &index)
        } else if single.is_file() {
            let file = SafetensorsFile::open(&single)?;
            let tensors = file.tensors().iter().enumerate().map(|(i, t)| (t.name.clone(), (0, i))).collect();
            Ok(Source { files: vec![file], tensors })
        } else if !dir.is_dir() {
            Err(Error::io(dir, "not a model directory", std::io::Error::from(std::io::ErrorKind::NotFound)))
        } else {
            Err(Error::Index {
                path: dir.to_path_buf(),
                detail: format!("neither {SINGLE_FILE} nor {INDEX_FILE} is present"),
            })
        }
    }

    fn open_index(dir: &Path, index: &Path) -> Result<Source> {
        let bad = |d: String| Error::Index { path: index.to_path_buf(), detail: d };
        let v = crate::error::parse_json(index, &crate::error::read_to_string(index)?)?;
        let top = json::as_object(index, &v, "<top level>")?;
        let map = json::get(top, "weight_map")
            .ok_or_else(|| Error::field(index, "weight_map", "required field is missing"))?;
        let map = json::as_object(index, map, "weight_map")?;
        let mut shard_names: BTreeSet<&str> = BTreeSet::new();
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| Error::field(index, format!("weight_map.{name}"), "expected a shard file name"))?;
            // Shards are plain file names next to the index; anything else could read outside it.
            if file.is_empty() || file.contains('/') || file.contains('\\') || file == "." || file == ".." {
                return Err(Error::field(
                    index,
                    format!("weight_map.{name}"),
                    format!("{file:?} is not a plain file name"),
                ));
            }
            shard_names.insert(file);
        }
        let mut files = Vec::new();
        let mut file_idx: HashMap<&str, usize> = HashMap::new();
        for shard in &shard_names {
            let p = dir.join(shard);
            if !p.is_file() {
                return Err(bad(format!("shard {shard} is named in the index but {} does not exist", p.display())));
            }
            file_idx.insert(shard, files.len());
            files.push(SafetensorsFile::open(&p)?);
        }
        let mut tensors = BTreeMap::new();
        for (name, file) in map {
            let fi = *file
                .as_str()
                .and_then(|f| file_idx.get(f))
                .ok_or_else(|| bad(format!("internal: shard of `{name}`")))?;
            let f = &files[fi];
            let ti = f.tensors().iter().position(|t| &t.name == name).ok_or_else(|| {
                bad(format!(
                    "tensor `{name}` is mapped to shard {} but that shard does not contain it",
                    f.path().display()
                ))
            })?;
            tensors.insert(name.clone(), (fi, ti));
        }
        for (fi, f) in files.iter().enumerate() {
            for t in f.tensors() {
                match tensors.get(&t.name) {
                    Some(&(owner, _)) if owner == fi => {}
                    Some(&(owner, _)) => {
                        return Err(bad(format!(
                            "tensor `{}` is stored in {} but the index maps it to {}",
                            t.name,
                            f.path().display(),
                            files[owner].path().display()
                        )))
                    }
                    None => {
                        return Err(bad(format!(
                            "tensor `{}` is stored in {} but not listed in the index",
                            t.name,
                            f.path().display()
                        )))
                    }
                }
            }
        }
        Ok(Source { files, tensors })
    }

    fn find(&self, name: &str) -> Option<(&SafetensorsFile, &TensorInfo)> {
        let &(fi, ti) = self.tensors.get(name)?;
        let f = &self.files[fi];
        Some((f, &f.tensors()[ti]))
    }

    fn file_name(&self, name: &str) -> String {
        match self.find(name) {
            Some((f, _)) => f.path().file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
            None => String::new(),
        }
    }

    fn check_against(&self, dir: &Path, config: &Config) -> Result<()> {
        let mut problems = Vec::new();
        let mut found = BTreeMap::new();
        for (name, &(fi, ti)) in &self.tensors {
            let info = &self.files[fi].tensors()[ti];
            if !info.dtype.is_float() {
                problems.push(format!(
                    "wrong dtype: {name} is {} in {}; weights must be F32, BF16 or F16",
                    info.dtype,
                    self.file_name(name)
                ));
            }
            found.insert(name.clone(), info.shape.clone());
        }
        problems.extend(mismatches(config, &found, |n| format!(" in {}", self.file_name(n))));
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::TensorMismatch { dir: dir.to_path_buf(), problems: summarise(problems) })
        }
    }
}

/// Missing, unexpected and mis-shaped tensors of `found` against `config`, one line each.
fn mismatches(config: &Config, found: &BTreeMap<String, Vec<usize>>, loc: impl Fn(&str) -> String) -> Vec<String> {
    let expected = config.expected_tensors();
    let mut problems = Vec::new();
    for (name, shape) in &expected {
        match found.get(name) {
            None => problems.push(format!("missing: {name} (expected shape {shape:?})")),
            Some(s) if s != shape => {
                problems.push(format!("mis-shaped: {name} is {s:?}{}, config.json implies {shape:?}", loc(name)))
            }
            Some(_) => {}
        }
    }
    let expected_names: HashMap<&str, &Vec<usize>> = expected.iter().map(|(n, s)| (n.as_str(), s)).collect();
    let (v, h) = (config.vocab_size, config.hidden_size);
    for (name, shape) in found {
        if expected_names.contains_key(name.as_str()) || name.ends_with(".rotary_emb.inv_freq") {
            continue;
        }
        if name == "lm_head.weight" && config.tie_word_embeddings {
            if shape != &[v, h] {
                problems.push(format!(
                    "mis-shaped: lm_head.weight is {shape:?}{}, config.json implies {:?} (ignored: embeddings are tied)",
                    loc(name),
                    [v, h]
                ));
            }
            continue;
        }
        problems.push(format!("unexpected: {name} {shape:?}{}", loc(name)));
    }
    problems
}

/// Keeps the report readable for a wholly wrong checkpoint: counts first, then at most 100
/// lines.
fn summarise(mut problems: Vec<String>) -> Vec<String> {
    const MAX: usize = 100;
    let count = |p: &str| problems.iter().filter(|s| s.starts_with(p)).count();
    let head = format!(
        "  ({} missing, {} unexpected, {} mis-shaped, {} other)",
        count("missing"),
        count("unexpected"),
        count("mis-shaped"),
        problems.len() - count("missing") - count("unexpected") - count("mis-shaped")
    );
    let total = problems.len();
    problems.truncate(MAX);
    let mut out = vec![head];
    out.extend(problems.into_iter().map(|p| format!("  {p}")));
    if total > MAX {
        out.push(format!("  … and {} more", total - MAX));
    }
    out
}
