//! The Qwen2 / Qwen2.5 / Qwen3 decoder: forward over packed variable-length batches, explicit
//! backward layer by layer in reverse, and the fused RL head on top.
//!
//! A layer, as Hugging Face's `Qwen2DecoderLayer` / `Qwen3DecoderLayer` compute it:
//!
//! ```text
//! h  = rmsnorm(x, input_layernorm)
//! q  = h·Wqᵀ (+bq)   k = h·Wkᵀ (+bk)   v = h·Wvᵀ (+bv)        // bias: Qwen2
//! q  = rmsnorm_per_head(q, q_norm)   k = rmsnorm_per_head(k, k_norm)   // Qwen3
//! q, k = rope(q, pos), rope(k, pos)
//! x  = x + attention(q, k, v)·Woᵀ
//! h  = rmsnorm(x, post_attention_layernorm)
//! x  = x + (silu(h·Wgᵀ) ∘ h·Wuᵀ)·Wdᵀ
//! ```
//!
//! All compute is in the weights' dtype (f32 on CPU) with f32 accumulation inside the kernels.
//!
//! Fewer, larger launches where the math allows (decoding a token is hundreds of small launches,
//! so their count sets its speed): each residual add is done by the next RMSNorm
//! (`add_rmsnorm`); q/k/v and gate/up are one GEMM each when [`Qwen::new`] has fused their
//! weights (gate/up in training too); and inference (prefill, decode) turns the q/k/v projection
//! into attention's inputs and the KV-cache rows with one `attention_inputs` kernel. Training
//! does the same for models without head norms (Qwen2/2.5); with them (Qwen3) it keeps the
//! separate bias, head-norm and RoPE ops, whose intermediates its backward needs.

use std::borrow::Cow;
use std::sync::OnceLock;

use smelt_engine::{DType, Device, Tensor};
use smelt_kernels::attention_inputs::{attention_inputs, attention_inputs_backward, CacheAppend, Extras, Qkv};
use smelt_kernels::rope::RopeTable;
use smelt_kernels::{add, attention, cast, embedding, logprob_entropy as head, matmul, rmsnorm, swiglu, Indices};

use crate::{Config, Error, LayerWeights, Result, Weights};

/// A packed batch: sequences laid end to end, no padding.
#[derive(Clone, Debug)]
pub struct Packed {
    /// Token ids of all sequences, concatenated.
    pub ids: Vec<u32>,
    /// Cumulative offsets, length B+1: sequence b is `ids[cu[b]..cu[b+1]]`.
    pub cu_seqlens: Vec<u32>,
}

impl Packed {
    pub fn new(seqs: &[Vec<u32>]) -> Packed {
        let mut ids = Vec::with_capacity(seqs.iter().map(Vec::len).sum());
        let mut cu = vec![0u32];
        for s in seqs {
            ids.extend_from_slice(s);
            cu.push(ids.len() as u32);
        }
        Packed { ids, cu_seqlens: cu }
    }
    pub fn num_tokens(&self) -> usize {
        self.ids.len()
    }
    pub fn num_seqs(&self) -> usize {
        self.cu_seqlens.len() - 1
    }
    /// Position of each token within its own sequence (packed sequences restart at 0).
    pub fn positions(&self) -> Vec<u32> {
        let mut pos = Vec::with_capacity(self.ids.len());
        for w in self.cu_seqlens.windows(2) {
            pos.extend(0..w[1] - w[0]);
        }
        pos
    }
    /// Next-token targets: `ids[t+1]` within the same sequence, `IGNORE` on each sequence's last token.
    pub fn next_token_targets(&self) -> Vec<u32> {
        let mut t = Vec::with_capacity(self.ids.len());
        for w in self.cu_seqlens.windows(2) {
            let (a, b) = (w[0] as usize, w[1] as usize);
            t.extend_from_slice(&self.ids[(a + 1).min(b)..b]);
            if b > a {
                t.push(head::IGNORE);
            }
        }
        t
    }
}

/// The residual stream entering a norm: the stream itself, or the previous layer's `x_mid` and
/// MLP output, which the norm sums on the way ([`rmsnorm::add_rmsnorm`]: one launch and one
/// pass for the residual add and the next layer's input norm).
#[derive(Clone, Copy)]
enum Stream<'a> {
    Sum(&'a Tensor),
    Parts(&'a Tensor, &'a Tensor),
}

impl<'a> Stream<'a> {
    /// The stream after the embedding and the layers run so far (their last `(x_mid, MLP
    /// output)`, none before the first layer).
    fn after(embedded: &'a Tensor, parts: &'a Option<(Tensor, Tensor)>) -> Stream<'a> {
        parts.as_ref().map_or(Stream::Sum(embedded), |(a, b)| Stream::Parts(a, b))
    }

    /// `(x, rmsnorm(x, w), rstd)` with x the stream's sum.
    fn norm(self, w: &Tensor, eps: f32) -> Result<(Tensor, Tensor, Tensor)> {
        Ok(match self {
            Stream::Sum(x) => {
                let (y, rstd) = rmsnorm::rmsnorm(x, w, eps)?;
                (x.clone(), y, rstd)
            }
            Stream::Parts(a, b) => rmsnorm::add_rmsnorm(a, b, w, eps)?,
        })
    }
}

/// What one layer's backward needs from its forward.
struct LayerActs {
    x: Tensor,
    h1: Tensor,
    rstd1: Tensor,
    /// q and k before the per-head norm (Qwen3) — what the norm's backward reads; without head
    /// norms, only their shapes are read (then they are q and k, reshaped).
    q_raw: Tensor,
    k_raw: Tensor,
    rstd_q: Option<Tensor>,
    rstd_k: Option<Tensor>,
    /// q and k after rope, v: the attention inputs.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn: Tensor,
    lse: Tensor,
    x_mid: Tensor,
    h2: Tensor,
    rstd2: Tensor,
    /// The MLP's gate and up projections: one `[T, 2·I]` output (gate | up) when the weights
    /// are fused, else two `[T, I]`.
    gate_up: MlpIn,
    act: Tensor,
}

enum MlpIn {
    Fused(Tensor),
    Separate(Tensor, Tensor),
}

/// Activations kept by [`Qwen::forward`] for [`Qwen::backward`].
pub struct Activations {
    batch: Packed,
    positions: Tensor,
    /// Per layer: everything (no recomputation) or only the layer input (recompute in backward).
    layers: Vec<Stored>,
    x_final: Tensor,
    rstd_final: Tensor,
    /// Final hidden states after `model.norm`, `[T, H]`: the RL head's input.
    pub hidden: Tensor,
}

enum Stored {
    Full(Box<LayerActs>),
    Input(Tensor),
}

/// Per-token outputs of the RL head, one entry per row it ran on.
pub struct HeadOutputs {
    pub logp: Tensor,
    pub entropy: Tensor,
    pub lse: Tensor,
    pub targets: Tensor,
    /// From [`Qwen::head_at`]: the hidden-state rows the head ran on, and those rows gathered
    /// (its input, which the backward needs). `None`: every row, in order.
    rows: Option<(Vec<u32>, Tensor)>,
}

/// A Qwen model with its weights on one device.
pub struct Qwen {
    pub config: Config,
    pub weights: Weights,
    /// Recompute each layer's activations in backward instead of keeping them.
    pub recompute: bool,
    /// RoPE's inv_freq on the weights' device, uploaded once (an upload drains the stream, and
    /// every layer of every pass and decode step rotates q and k).
    rope: OnceLock<RopeTable>,
}

fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = matmul::matmul(x, w, false, true)?;
    if let Some(b) = b {
        add::add_bias_(&y, b)?;
    }
    Ok(y)
}

/// Backward of y = x·Wᵀ (+b): returns dx; adds dW (and db) into the gradient tensors.
fn linear_backward(x: &Tensor, w: &Tensor, dy: &Tensor, dw: &Tensor, db: Option<&Tensor>) -> Result<Tensor> {
    let dx = matmul::matmul(dy, w, false, false)?;
    // dW += dyᵀ·x straight into the (f32) gradient: cuBLAS accumulates with beta = 1.
    matmul::matmul_backward_into(x, w, dy, true, None, Some(dw), true)?;
    if let Some(db) = db {
        add::bias_grad_into(dy, db)?;
    }
    Ok(dx)
}

/// [`linear_backward`] that adds dx into `dx_sum` inside the GEMM (beta = 1) instead of
/// returning it: the k and v projections' share of dh1 costs no separate add.
fn linear_backward_add(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    dw: &Tensor,
    db: Option<&Tensor>,
    dx_sum: &Tensor,
) -> Result<()> {
    matmul::matmul_backward_into(x, w, dy, true, Some(dx_sum), Some(dw), true)?;
    if let Some(db) = db {
        add::bias_grad_into(dy, db)?;
    }
    Ok(())
}

/// Backward of a fused projection `y = x·wᵀ (+ b)` whose weight (and bias) are the row blocks
/// of several layer weights: returns dx; adds dW (and db) into those weights' gradients `dws`
/// (`dbs`). One GEMM (and one column sum) straight into the gradients when they sit back to back
/// (PolicyStep's flat buffer, [`Weights::zeros_flat`]), else through a scratch split into them.
fn fused_linear_backward(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    dws: &[&Tensor],
    dbs: Option<&[&Tensor]>,
) -> Result<Tensor> {
    match (Tensor::rows_view(dws), dbs.map(Tensor::rows_view)) {
        (Some(dw), None) => return linear_backward(x, w, dy, &dw, None),
        (Some(dw), Some(Some(db))) => return linear_backward(x, w, dy, &dw, Some(&db)),
        _ => {}
    }
    let dx = matmul::matmul(dy, w, false, false)?;
    let dw = Tensor::empty(w.shape(), dws[0].dtype(), x.device())?;
    matmul::matmul_backward_into(x, w, dy, true, None, Some(&dw), false)?;
    let db = match dbs {
        Some(dbs) => {
            let db = Tensor::zeros(&[w.dim(0)], dbs[0].dtype(), x.device())?;
            add::bias_grad_into(dy, &db)?;
            Some((db, dbs))
        }
        None => None,
    };
    let mut row = 0;
    for (i, g) in dws.iter().enumerate() {
        let rows = g.dim(0);
        accumulate(g, &dw.narrow_rows(row, rows)?)?;
        if let Some((db, dbs)) = &db {
            accumulate(dbs[i], &db.narrow_rows(row, rows)?)?;
        }
        row += rows;
    }
    Ok(dx)
}

/// The fused q/k/v weight of a layer without head norms: the layers that train through
/// `attention_inputs` (forward) and `attention_inputs_backward`.
fn qkv_without_head_norms(w: &LayerWeights) -> Option<Tensor> {
    if w.q_norm.is_some() || w.k_norm.is_some() {
        return None;
    }
    w.qkv()
}

/// `dst += src`, `src` cast on its device to `dst`'s dtype (f32 gradients of bf16 weights).
fn accumulate(dst: &Tensor, src: &Tensor) -> Result<()> {
    Ok(add::add_scaled_(dst, 1.0, &cast::cast(src, dst.dtype())?)?)
}

/// The MLP up to `down_proj`'s input: `(gate and up projections, silu(gate)·up)`, with one
/// GEMM for gate | up when the layer's weights are fused.
fn mlp_in(w: &LayerWeights, h2: &Tensor) -> Result<(MlpIn, Tensor)> {
    Ok(match w.gate_up() {
        Some(w_gate_up) => {
            let gate_up = linear(h2, &w_gate_up, None)?;
            let act = swiglu::swiglu_fused(&gate_up)?;
            (MlpIn::Fused(gate_up), act)
        }
        None => {
            let (gate, up) = (linear(h2, &w.gate_proj, None)?, linear(h2, &w.up_proj, None)?);
            let act = swiglu::swiglu(&gate, &up)?;
            (MlpIn::Separate(gate, up), act)
        }
    })
}

/// Backward of [`mlp_in`] from `d_act`: returns dh2; adds dW into the gate and up gradients.
fn mlp_in_backward(w: &LayerWeights, g: &LayerWeights, h2: &Tensor, gate_up: &MlpIn, d_act: &Tensor) -> Result<Tensor> {
    match gate_up {
        MlpIn::Fused(gate_up) => {
            let d_gate_up = swiglu::swiglu_fused_backward(gate_up, d_act)?;
            let w_gate_up =
                w.gate_up().ok_or_else(|| Error::Msg("gate/up weights unfused after a fused forward".into()))?;
            fused_linear_backward(h2, &w_gate_up, &d_gate_up, &[&g.gate_proj, &g.up_proj], None)
        }
        MlpIn::Separate(gate, up) => {
            let (d_gate, d_up) = swiglu::swiglu_backward(gate, up, d_act)?;
            Ok(add::add(
                &linear_backward(h2, &w.gate_proj, &d_gate, &g.gate_proj, None)?,
                &linear_backward(h2, &w.up_proj, &d_up, &g.up_proj, None)?,
            )?)
        }
    }
}

impl Qwen {
    /// The model, with each layer's q/k/v and gate/up weights fused into one buffer per group
    /// ([`Weights::fuse_projections`]) so inference runs one GEMM per group. If that fails
    /// (out of memory), the layers it could not fuse keep separate weights and a warning is
    /// logged; the model works either way. Fusing copies those five tensors per layer into new
    /// buffers: a clone of `weights` the caller kept no longer shares them with the model.
    pub fn new(config: Config, mut weights: Weights) -> Qwen {
        if let Err(e) = weights.fuse_projections() {
            tracing::warn!("keeping separate q/k/v and gate/up weights (fusing them failed: {e})");
        }
        Qwen { config, weights, recompute: false, rope: OnceLock::new() }
    }

    pub fn device(&self) -> Device {
        self.weights.embed_tokens.device()
    }

    /// The RoPE table for the weights' device (a fresh one if the weights have moved since it
    /// was built).
    pub(crate) fn rope(&self) -> Result<Cow<'_, RopeTable>> {
        let dev = self.device();
        let build = || RopeTable::new(self.config.head_dim, self.config.rope_theta as f32, dev);
        if let Some(t) = self.rope.get() {
            return Ok(if t.inv_freq().device() == dev { Cow::Borrowed(t) } else { Cow::Owned(build()?) });
        }
        let t = build()?;
        Ok(Cow::Borrowed(self.rope.get_or_init(|| t)))
    }

    fn check_batch(&self, batch: &Packed) -> Result<()> {
        let cu = &batch.cu_seqlens;
        let bad = |m: String| Err(Error::Msg(m));
        if cu.first() != Some(&0)
            || cu.last().copied() != Some(batch.ids.len() as u32)
            || cu.windows(2).any(|w| w[0] > w[1])
        {
            return bad(format!("cu_seqlens {cu:?} do not describe {} tokens", batch.ids.len()));
        }
        let max_len = cu.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0);
        if max_len > self.config.max_position_embeddings {
            return bad(format!(
                "a sequence of {max_len} tokens is longer than max_position_embeddings = {}",
                self.config.max_position_embeddings
            ));
        }
        if let Some((i, id)) = batch.ids.iter().enumerate().find(|(_, &id)| id as usize >= self.config.vocab_size) {
            return bad(format!(
                "token id {id} at position {i} is outside the vocabulary (vocab_size {})",
                self.config.vocab_size
            ));
        }
        Ok(())
    }

    /// Forward over a packed batch. Returns the activations (with the final hidden states).
    pub fn forward(&self, batch: &Packed) -> Result<Activations> {
        self.check_batch(batch)?;
        let dev = self.device();
        let positions = Tensor::from_slice(&batch.positions(), &[batch.ids.len()], dev)?;
        let embedded = embedding::embedding_from_host(&batch.ids, &self.weights.embed_tokens)?;
        let mut layers = Vec::with_capacity(self.weights.layers.len());
        // The previous layer's (x_mid, MLP output), summed by the next norm.
        let mut parts: Option<(Tensor, Tensor)> = None;
        for l in 0..self.weights.layers.len() {
            let input = Stream::after(&embedded, &parts);
            let acts = self.layer_forward(l, input, &positions, &batch.cu_seqlens)?;
            let mlp = self.mlp_out(l, &acts)?;
            let x_mid = acts.x_mid.clone();
            layers.push(if self.recompute { Stored::Input(acts.x.clone()) } else { Stored::Full(Box::new(acts)) });
            parts = Some((x_mid, mlp));
        }
        let input = Stream::after(&embedded, &parts);
        let (x_final, hidden, rstd_final) = input.norm(&self.weights.norm, self.config.rms_norm_eps as f32)?;
        Ok(Activations { batch: batch.clone(), positions, layers, x_final, rstd_final, hidden })
    }

    /// The attention half of layer `l` and the MLP's inputs; the MLP output is [`Self::mlp_out`].
    fn layer_forward(&self, l: usize, input: Stream, positions: &Tensor, cu: &[u32]) -> Result<LayerActs> {
        let (c, w) = (&self.config, &self.weights.layers[l]);
        let eps = c.rms_norm_eps as f32;
        let (x, h1, rstd1) = input.norm(&w.input_layernorm, eps)?;
        let t = x.dim(0);
        let rope = self.rope()?;
        let (q_raw, k_raw, rstd_q, rstd_k, q, k, v) = match qkv_without_head_norms(w) {
            // Without head norms the backward needs nothing between the projections and the
            // rotation, so training runs what inference runs: one GEMM for q, k and v, and one
            // kernel for the biases and the rotation. q_raw and k_raw are then q and k (their
            // shapes are all the backward reads of them).
            Some(w_qkv) => {
                let qkv = linear(&h1, &w_qkv, None)?;
                let extras = Extras {
                    q_bias: w.q_bias.as_ref(),
                    k_bias: w.k_bias.as_ref(),
                    v_bias: w.v_bias.as_ref(),
                    eps,
                    ..Default::default()
                };
                let packed = Qkv::Packed { qkv: &qkv, n_heads: c.num_attention_heads, n_kv: c.num_key_value_heads };
                let (q, k, v) = attention_inputs(packed, &extras, &rope, Indices::Device(positions), None)?;
                (q.reshape(&[t, c.q_dim()])?, k.reshape(&[t, c.kv_dim()])?, None, None, q, k, v)
            }
            None => {
                let q_raw = linear(&h1, &w.q_proj, w.q_bias.as_ref())?;
                let k_raw = linear(&h1, &w.k_proj, w.k_bias.as_ref())?;
                let v = linear(&h1, &w.v_proj, w.v_bias.as_ref())?.reshape(&[t, c.num_key_value_heads, c.head_dim])?;
                let (q_n, rstd_q) = self.head_norm(&q_raw, w.q_norm.as_ref(), c.num_attention_heads)?;
                let (k_n, rstd_k) = self.head_norm(&k_raw, w.k_norm.as_ref(), c.num_key_value_heads)?;
                let q = rope.forward(&q_n, positions)?;
                let k = rope.forward(&k_n, positions)?;
                (q_raw, k_raw, rstd_q, rstd_k, q, k, v)
            }
        };
        let (attn, lse) = attention::attention_forward(&q, &k, &v, cu, None)?;
        let attn = attn.reshape(&[t, c.q_dim()])?;
        let o = linear(&attn, &w.o_proj, w.o_bias.as_ref())?;
        let (x_mid, h2, rstd2) = rmsnorm::add_rmsnorm(&x, &o, &w.post_attention_layernorm, eps)?;
        let (gate_up, act) = mlp_in(w, &h2)?;
        Ok(LayerActs { x, h1, rstd1, q_raw, k_raw, rstd_q, rstd_k, q, k, v, attn, lse, x_mid, h2, rstd2, gate_up, act })
    }

    fn mlp_out(&self, l: usize, a: &LayerActs) -> Result<Tensor> {
        linear(&a.act, &self.weights.layers[l].down_proj, None)
    }

    /// One layer for inference (prefill and decode): nothing is kept for a backward, and the
    /// fused `attention_inputs` op turns the projections into attention's q/k/v and writes k/v
    /// into the cache in one launch. `attend(q, k, v)` is the attention itself (causal over the
    /// packed prompts, or decode against the cache). Returns the layer's `x_mid` and MLP output,
    /// whose sum (the layer's output) the next norm forms.
    fn layer_infer(
        &self,
        l: usize,
        input: Stream,
        positions: Indices,
        to_cache: CacheAppend,
        attend: impl FnOnce(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let (c, w) = (&self.config, &self.weights.layers[l]);
        let eps = c.rms_norm_eps as f32;
        let (x, h1, _) = input.norm(&w.input_layernorm, eps)?;
        let extras = Extras {
            q_bias: w.q_bias.as_ref(),
            k_bias: w.k_bias.as_ref(),
            v_bias: w.v_bias.as_ref(),
            q_norm: w.q_norm.as_ref(),
            k_norm: w.k_norm.as_ref(),
            eps,
        };
        let rope = self.rope()?;
        let to_attention = |qkv: Qkv| attention_inputs(qkv, &extras, &rope, positions, Some(to_cache));
        // One GEMM for q, k and v, and one for gate and up, when the weights are fused.
        let (q, k, v) = match w.qkv() {
            Some(w_qkv) => {
                let qkv = linear(&h1, &w_qkv, None)?;
                to_attention(Qkv::Packed { qkv: &qkv, n_heads: c.num_attention_heads, n_kv: c.num_key_value_heads })?
            }
            None => {
                let (q, k, v) =
                    (linear(&h1, &w.q_proj, None)?, linear(&h1, &w.k_proj, None)?, linear(&h1, &w.v_proj, None)?);
                to_attention(Qkv::Separate(&q, &k, &v))?
            }
        };
        let o = attend(&q, &k, &v)?.reshape(&[x.dim(0), c.q_dim()])?;
        let o = linear(&o, &w.o_proj, w.o_bias.as_ref())?;
        let (x_mid, h2, _) = rmsnorm::add_rmsnorm(&x, &o, &w.post_attention_layernorm, eps)?;
        // Nothing is kept for a backward: with fused weights, silu(gate)·up comes from one call
        // (on CUDA at decode batch sizes, possibly the GEMM's epilogue; see matmul::linear_swiglu).
        let act = match w.gate_up() {
            Some(w_gate_up) => matmul::linear_swiglu(&h2, &w_gate_up)?,
            None => mlp_in(w, &h2)?.1,
        };
        Ok((x_mid, linear(&act, &w.down_proj, None)?))
    }

    /// Qwen3's per-head RMSNorm over head_dim (identity without a norm weight). Returns the
    /// result as `[T, heads, head_dim]` and the per-row rstd.
    fn head_norm(&self, x: &Tensor, w: Option<&Tensor>, heads: usize) -> Result<(Tensor, Option<Tensor>)> {
        let (t, d) = (x.dim(0), self.config.head_dim);
        match w {
            None => Ok((x.reshape(&[t, heads, d])?, None)),
            Some(w) => {
                let (y, rstd) = rmsnorm::rmsnorm(&x.reshape(&[t * heads, d])?, w, self.config.rms_norm_eps as f32)?;
                Ok((y.reshape(&[t, heads, d])?, Some(rstd)))
            }
        }
    }

    /// The fused RL head on the final hidden states: per-token log-prob of `targets` and entropy.
    pub fn head(&self, hidden: &Tensor, targets: &[u32], temperature: f32) -> Result<HeadOutputs> {
        let targets = Tensor::from_slice(targets, &[targets.len()], hidden.device())?;
        let out = head::logprob_entropy(hidden, self.weights.lm_head(), &targets, temperature, &Default::default())?;
        Ok(HeadOutputs { logp: out.logp, entropy: out.entropy, lse: out.lse, targets, rows: None })
    }

    /// [`Self::head`] on rows `rows` of `hidden` only (distinct, each below its row count), with
    /// `targets[i]` the target of row `rows[i]`; [`Self::backward`] then gives the other rows no
    /// gradient. For loss tokens that are a part of the batch (RL's completions, not its prompts):
    /// the vocabulary projection, forward and backward, is skipped for the rest.
    pub fn head_at(&self, hidden: &Tensor, rows: &[u32], targets: &[u32], temperature: f32) -> Result<HeadOutputs> {
        let n = hidden.dim(0);
        let mut seen = vec![false; n];
        for &r in rows {
            match seen.get_mut(r as usize) {
                Some(s) if !*s => *s = true,
                _ => {
                    return Err(Error::Msg(format!(
                        "head_at: row {r} is repeated or outside the {n} rows of hidden {:?}",
                        hidden.shape()
                    )))
                }
            }
        }
        let picked = embedding::embedding_from_host(rows, hidden)?;
        let out = self.head(&picked, targets, temperature)?;
        Ok(HeadOutputs { rows: Some((rows.to_vec(), picked)), ..out })
    }

    /// The fused head with the kernel's options (e.g. each target's rank, for DRO's data
    /// filter), for scoring without a backward.
    pub fn head_with(
        &self,
        hidden: &Tensor,
        targets: &[u32],
        temperature: f32,
        opts: &head::LogprobEntropyOpts,
    ) -> Result<head::LogprobEntropy> {
        let targets = Tensor::from_slice(targets, &[targets.len()], hidden.device())?;
        Ok(head::logprob_entropy(hidden, self.weights.lm_head(), &targets, temperature, opts)?)
    }

    /// Backward from per-token gradients of the head's outputs to every parameter.
    /// Gradients are added into `grads` (f32, same structure as the weights).
    pub fn backward(
        &self,
        acts: &Activations,
        head_out: &HeadOutputs,
        temperature: f32,
        g_logp: &Tensor,
        g_entropy: &Tensor,
        grads: &Weights,
    ) -> Result<()> {
        let d_lm_head = grads.lm_head.as_ref().unwrap_or(&grads.embed_tokens);
        let head_in = head_out.rows.as_ref().map_or(&acts.hidden, |(_, picked)| picked);
        let dh = head::logprob_entropy_backward_acc(
            head_in,
            self.weights.lm_head(),
            &head_out.targets,
            temperature,
            &head_out.lse,
            &head_out.entropy,
            g_logp,
            g_entropy,
            d_lm_head,
            &Default::default(),
        )?;
        let dh = match &head_out.rows {
            None => dh,
            Some((rows, _)) => {
                let full = Tensor::zeros(acts.hidden.shape(), DType::F32, acts.hidden.device())?;
                embedding::embedding_backward_from_host(rows, &dh, &full)?;
                full
            }
        };
        let dh = cast::cast(&dh, acts.hidden.dtype())?;
        let mut dx =
            rmsnorm::rmsnorm_backward_into(&acts.x_final, &self.weights.norm, &acts.rstd_final, &dh, &grads.norm)?;
        for l in (0..self.weights.layers.len()).rev() {
            let recomputed;
            let a: &LayerActs = match &acts.layers[l] {
                Stored::Full(a) => a,
                Stored::Input(x) => {
                    recomputed = self.layer_forward(l, Stream::Sum(x), &acts.positions, &acts.batch.cu_seqlens)?;
                    &recomputed
                }
            };
            dx = self.layer_backward(l, a, &acts.positions, &acts.batch.cu_seqlens, &dx, grads)?;
        }
        embedding::embedding_backward_from_host(&acts.batch.ids, &cast::cast(&dx, DType::F32)?, &grads.embed_tokens)?;
        Ok(())
    }

    /// One layer in reverse. `dy` is the gradient at the layer's output; returns it at the input.
    fn layer_backward(
        &self,
        l: usize,
        a: &LayerActs,
        positions: &Tensor,
        cu: &[u32],
        dy: &Tensor,
        grads: &Weights,
    ) -> Result<Tensor> {
        let (c, w, g) = (&self.config, &self.weights.layers[l], &grads.layers[l]);
        let t = a.x.dim(0);
        // MLP: x_out = x_mid + down(swiglu(gate(h2), up(h2)))
        let d_act = linear_backward(&a.act, &w.down_proj, dy, &g.down_proj, None)?;
        let dh2 = mlp_in_backward(w, g, &a.h2, &a.gate_up, &d_act)?;
        // The residual stream's gradient is added by the norm's dx kernel.
        let dx_mid = rmsnorm::rmsnorm_backward_add_into(
            &a.x_mid,
            &w.post_attention_layernorm,
            &a.rstd2,
            &dh2,
            &g.post_attention_layernorm,
            dy,
        )?;
        // Attention: x_mid = x + o_proj(attn(rope(norm(q)), rope(norm(k)), v))
        let d_attn = linear_backward(&a.attn, &w.o_proj, &dx_mid, &g.o_proj, g.o_bias.as_ref())?;
        let d_attn = d_attn.reshape(&[t, c.num_attention_heads, c.head_dim])?;
        let o = a.attn.reshape(&[t, c.num_attention_heads, c.head_dim])?;
        let (dq, dk, dv) = attention::attention_backward(&a.q, &a.k, &a.v, &o, &a.lse, &d_attn, cu, None)?;
        let rope = self.rope()?;
        let dh1 = match qkv_without_head_norms(w) {
            // As the forward: without head norms, one kernel turns dq, dk, dv into the fused
            // projection's gradient, and one GEMM per gradient takes it from there.
            Some(w_qkv) => {
                let d_qkv = attention_inputs_backward(&dq, &dk, &dv, &rope, Indices::Device(positions))?;
                let biases = match (&g.q_bias, &g.k_bias, &g.v_bias) {
                    (Some(q), Some(k), Some(v)) => Some([q, k, v]),
                    _ => None,
                };
                let dws = [&g.q_proj, &g.k_proj, &g.v_proj];
                fused_linear_backward(&a.h1, &w_qkv, &d_qkv, &dws, biases.as_ref().map(|b| &b[..]))?
            }
            None => {
                let dq = self.head_norm_backward(
                    &a.q_raw,
                    w.q_norm.as_ref(),
                    a.rstd_q.as_ref(),
                    &rope.backward(&dq, positions)?,
                    g.q_norm.as_ref(),
                )?;
                let dk = self.head_norm_backward(
                    &a.k_raw,
                    w.k_norm.as_ref(),
                    a.rstd_k.as_ref(),
                    &rope.backward(&dk, positions)?,
                    g.k_norm.as_ref(),
                )?;
                let dv = dv.reshape(&[t, c.kv_dim()])?;
                let dh1 = linear_backward(&a.h1, &w.q_proj, &dq, &g.q_proj, g.q_bias.as_ref())?;
                linear_backward_add(&a.h1, &w.k_proj, &dk, &g.k_proj, g.k_bias.as_ref(), &dh1)?;
                linear_backward_add(&a.h1, &w.v_proj, &dv, &g.v_proj, g.v_bias.as_ref(), &dh1)?;
                dh1
            }
        };
        Ok(rmsnorm::rmsnorm_backward_add_into(&a.x, &w.input_layernorm, &a.rstd1, &dh1, &g.input_layernorm, &dx_mid)?)
    }

    /// Backward of [`Self::head_norm`]: `dy` is `[T, heads, head_dim]`; returns `[T, heads·head_dim]`.
    fn head_norm_backward(
        &self,
        x_raw: &Tensor,
        w: Option<&Tensor>,
        rstd: Option<&Tensor>,
        dy: &Tensor,
        dw: Option<&Tensor>,
    ) -> Result<Tensor> {
        let t = x_raw.dim(0);
        let cols = x_raw.dim(1);
        match (w, rstd, dw) {
            (Some(w), Some(rstd), Some(dw)) => {
                let d = self.config.head_dim;
                let rows = t * cols / d;
                let dx =
                    rmsnorm::rmsnorm_backward_into(&x_raw.reshape(&[rows, d])?, w, rstd, &dy.reshape(&[rows, d])?, dw)?;
                Ok(dx.reshape(&[t, cols])?)
            }
            _ => Ok(dy.reshape(&[t, cols])?),
        }
    }

    /// A KV cache for `n_slots` sequences of up to `max_len` tokens each.
    pub fn new_kv_cache(&self, n_slots: usize, max_len: usize) -> Result<KvCache> {
        let c = &self.config;
        if max_len > c.max_position_embeddings {
            return Err(Error::Msg(format!(
                "KV cache of {max_len} positions exceeds max_position_embeddings = {}",
                c.max_position_embeddings
            )));
        }
        let shape = [n_slots, max_len, c.num_key_value_heads, c.head_dim];
        let dt = self.weights.embed_tokens.dtype();
        let mut k = Vec::new();
        let mut v = Vec::new();
        for _ in 0..c.num_hidden_layers {
            k.push(Tensor::zeros(&shape, dt, self.device())?);
            v.push(Tensor::zeros(&shape, dt, self.device())?);
        }
        Ok(KvCache { k, v, lens: vec![0; n_slots], max_len })
    }

    /// Runs the prompts (prompt b into slot b, which must be empty), fills the cache and returns
    /// the final hidden state of each prompt's last token, `[B, H]`.
    pub fn prefill(&self, prompts: &[Vec<u32>], cache: &mut KvCache) -> Result<Tensor> {
        let slots: Vec<u32> = (0..prompts.len() as u32).collect();
        self.prefill_slots(&slots, prompts, cache)
    }

    /// [`Qwen::prefill`] into chosen slots: prompt i goes into slot `slots[i]` (distinct, empty).
    pub fn prefill_slots(&self, slots: &[u32], prompts: &[Vec<u32>], cache: &mut KvCache) -> Result<Tensor> {
        let n_slots = cache.lens.len();
        let slots_ok = cache.distinct_slots(slots, |len| len == 0);
        if !slots_ok || slots.len() != prompts.len() || prompts.iter().any(|p| p.is_empty() || p.len() > cache.max_len)
        {
            return Err(Error::Msg(format!(
                "prefill: {} prompts (lengths {:?}) into slots {slots:?} do not fit a cache of {n_slots} slots × {} \
                 positions (prompts must be non-empty, one distinct empty slot each)",
                prompts.len(),
                prompts.iter().map(Vec::len).collect::<Vec<_>>(),
                cache.max_len
            )));
        }
        let batch = Packed::new(prompts);
        self.check_batch(&batch)?;
        let pos = batch.positions();
        let token_slots: Vec<u32> = batch
            .cu_seqlens
            .windows(2)
            .zip(slots)
            .flat_map(|(w, &s)| std::iter::repeat_n(s, (w[1] - w[0]) as usize))
            .collect();
        let embedded = embedding::embedding_from_host(&batch.ids, &self.weights.embed_tokens)?;
        let mut parts: Option<(Tensor, Tensor)> = None;
        for l in 0..self.weights.layers.len() {
            let to_cache = CacheAppend { k_cache: &cache.k[l], v_cache: &cache.v[l], slots: (&token_slots).into() };
            let input = Stream::after(&embedded, &parts);
            parts = Some(self.layer_infer(l, input, (&pos).into(), to_cache, |q, k, v| {
                Ok(attention::attention_forward(q, k, v, &batch.cu_seqlens, None)?.0)
            })?);
        }
        for (&s, p) in slots.iter().zip(prompts) {
            cache.lens[s as usize] = p.len() as u32;
        }
        // Only each prompt's last token goes through the final norm.
        let last: Vec<u32> = batch.cu_seqlens[1..].iter().map(|&e| e - 1).collect();
        let rows = |x: &Tensor| embedding::embedding_from_host(&last, x);
        let parts = parts.map(|(a, b)| Ok::<_, Error>((rows(&a)?, rows(&b)?))).transpose()?;
        let embedded = if parts.is_none() { rows(&embedded)? } else { embedded };
        Ok(Stream::after(&embedded, &parts).norm(&self.weights.norm, self.config.rms_norm_eps as f32)?.1)
    }

    /// Prefill for `n` samples of each prompt: each prompt runs once, into the slot of its first
    /// sample, and the prompt's other samples get copies of that slot's cache. Sample s of
    /// prompt p is slot `p·n + s`; returns every slot's last hidden state, `[prompts · n, H]`.
    pub fn prefill_samples(&self, prompts: &[Vec<u32>], n: usize, cache: &mut KvCache) -> Result<Tensor> {
        match n {
            0 => return Err(Error::Msg("prefill_samples: 0 samples per prompt".into())),
            1 => return self.prefill(prompts, cache),
            _ => {}
        }
        let first: Vec<u32> = (0..prompts.len()).map(|p| (p * n) as u32).collect();
        let hidden = self.prefill_slots(&first, prompts, cache)?;
        for &f in &first {
            let rest: Vec<u32> = (f + 1..f + n as u32).collect();
            cache.copy_slot(f as usize, &rest)?;
        }
        let rows: Vec<u32> = (0..prompts.len() as u32).flat_map(|p| std::iter::repeat_n(p, n)).collect();
        Ok(embedding::embedding_from_host(&rows, &hidden)?)
    }

    /// One decode step: `tokens[b]` is appended to slot b; returns the final hidden states `[B, H]`.
    pub fn decode_step(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let slots: Vec<u32> = (0..tokens.len() as u32).collect();
        self.decode_slots(&slots, tokens, cache)
    }

    /// One decode step over some of the cache's slots: the same number n of new tokens for
    /// each slot (`tokens` slot-major: `tokens[i·n..(i+1)·n]` are appended to slot `slots[i]`;
    /// distinct slots, any order). Returns the final hidden states `[slots.len() · n, H]` in that
    /// order. Slots left out (finished sequences) cost nothing and keep their cache. n > 1
    /// teacher-forces a few tokens after a cached prefix (causal among the new tokens).
    pub fn decode_slots(&self, slots: &[u32], tokens: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let c = &self.config;
        let n_slots = cache.lens.len();
        let n_new = if slots.is_empty() { 0 } else { tokens.len() / slots.len() };
        let room = cache.max_len;
        let slots_ok = cache.distinct_slots(slots, |len| len + n_new <= room);
        if !slots_ok || n_new * slots.len() != tokens.len() || (n_new == 0 && !slots.is_empty()) {
            return Err(Error::Msg(format!(
                "decode: {} tokens for slots {slots:?} of a cache of {n_slots} slots, lengths {:?}, max {} \
                 (the same number of tokens per slot, distinct slots with room for them)",
                tokens.len(),
                cache.lens,
                cache.max_len
            )));
        }
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= c.vocab_size) {
            return Err(Error::Msg(format!("token id {id} is outside the vocabulary (vocab_size {})", c.vocab_size)));
        }
        let lens_before: Vec<u32> = slots.iter().map(|&s| cache.lens[s as usize]).collect();
        let lens_after: Vec<u32> = lens_before.iter().map(|l| l + n_new as u32).collect();
        let pos: Vec<u32> = lens_before.iter().flat_map(|&l| l..l + n_new as u32).collect();
        let token_slots: Vec<u32> = slots.iter().flat_map(|&s| std::iter::repeat_n(s, n_new)).collect();
        let embedded = embedding::embedding_from_host(tokens, &self.weights.embed_tokens)?;
        let lists = [(&pos).into(), (&token_slots).into(), (&lens_after).into(), slots.into()];
        let hidden = self.decode_layers(&embedded, n_new, lists, cache)?;
        for (&s, &l) in slots.iter().zip(&lens_after) {
            cache.lens[s as usize] = l;
        }
        Ok(hidden)
    }

    /// The layers and final norm of a decode step of `n_new` tokens per row, from their
    /// embeddings: each token's position and cache slot, each row's cache length after the step
    /// and its slot.
    fn decode_layers(
        &self,
        embedded: &Tensor,
        n_new: usize,
        [positions, token_slots, lens, slots]: [Indices; 4],
        cache: &KvCache,
    ) -> Result<Tensor> {
        let mut parts: Option<(Tensor, Tensor)> = None;
        for l in 0..self.weights.layers.len() {
            let (k_cache, v_cache) = (&cache.k[l], &cache.v[l]);
            let input = Stream::after(embedded, &parts);
            parts = Some(self.layer_infer(
                l,
                input,
                positions,
                CacheAppend { k_cache, v_cache, slots: token_slots },
                |q, _, _| {
                    let q = q.reshape(&[slots.len(), n_new, q.dim(1), q.dim(2)])?;
                    Ok(attention::attention_decode(&q, k_cache, v_cache, lens, Some(slots), None)?)
                },
            )?);
        }
        let input = Stream::after(embedded, &parts);
        Ok(input.norm(&self.weights.norm, self.config.rms_norm_eps as f32)?.1)
    }

    /// One decode step whose inputs are device tensors read when the kernels run (one new token
    /// per row): `ids` (not range-checked: tokens this model's sampler drew), `slots`,
    /// `positions` (each slot's length before the step) and `lens` (after it), all u32 `[B]`.
    /// Returns the final hidden states `[B, hidden]`. The cache's host lengths are the caller's
    /// to update. What [`crate::DecodeGraphs`] captures.
    #[cfg(feature = "cuda")]
    pub(crate) fn decode_step_device(
        &self,
        [ids, slots, positions, lens]: [&Tensor; 4],
        cache: &KvCache,
    ) -> Result<Tensor> {
        let embedded = embedding::embedding_unchecked(ids, &self.weights.embed_tokens)?;
        let lists = [positions, slots, lens, slots].map(Indices::Device);
        self.decode_layers(&embedded, 1, lists, cache)
    }

    /// Full logits `[B, V]` for a few rows of hidden states (decoding; training never needs them).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(matmul::matmul(hidden, self.weights.lm_head(), false, true)?)
    }
}

/// Per-layer K and V caches `[n_slots, max_len, n_kv_heads, head_dim]` and each slot's length.
pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Valid positions per slot.
    pub lens: Vec<u32>,
    pub max_len: usize,
}

impl KvCache {
    /// Every layer's key and value buffers.
    #[cfg(feature = "cuda")]
    pub(crate) fn buffers(&self) -> impl Iterator<Item = &Tensor> {
        self.k.iter().chain(&self.v)
    }

    /// Whether `slots` are distinct slots of this cache, each with a length that passes `ok`.
    pub(crate) fn distinct_slots(&self, slots: &[u32], ok: impl Fn(usize) -> bool) -> bool {
        let mut seen = vec![false; self.lens.len()];
        slots.iter().all(|&s| {
            let s = s as usize;
            s < seen.len() && !std::mem::replace(&mut seen[s], true) && ok(self.lens[s] as usize)
        })
    }

    /// Forgets slot `slot`'s positions from `len` on (a later decode overwrites them).
    pub fn truncate(&mut self, slot: usize, len: usize) -> Result<()> {
        match self.lens.get_mut(slot) {
            Some(l) if len <= *l as usize => {
                *l = len as u32;
                Ok(())
            }
            _ => Err(Error::Msg(format!("KV cache: truncating slot {slot} to {len} positions ({:?} held)", self.lens))),
        }
    }

    /// Gives each slot of `dst` (distinct, empty, not `src`) a copy of slot `src`'s cache: the
    /// samples of one prompt share its prefill this way. Device-side copies, 2 per layer and slot.
    pub fn copy_slot(&mut self, src: usize, dst: &[u32]) -> Result<()> {
        let n = self.lens.len();
        if src >= n || dst.contains(&(src as u32)) || !self.distinct_slots(dst, |len| len == 0) {
            return Err(Error::Msg(format!(
                "KV cache copy: slot {src} to slots {dst:?} of {n} (targets distinct, empty and not the source)"
            )));
        }
        let len = self.lens[src] as usize;
        for t in self.k.iter().chain(&self.v) {
            let rows = position_rows(t)?;
            for &d in dst {
                rows.copy_rows_within(src * self.max_len, d as usize * self.max_len, len)?;
            }
        }
        for &d in dst {
            self.lens[d as usize] = len as u32;
        }
        Ok(())
    }

    /// A new cache of `slots.len()` slots with room for `max_len` positions each, whose slot j
    /// holds a copy of this cache's slot `slots[j]` (distinct slots, each holding at most
    /// `max_len` positions). Early rejection moves its survivors into one: the rejected samples'
    /// slots never take a full-length share of memory. Device-side copies, 2 per layer and slot.
    pub fn gather(&self, slots: &[u32], max_len: usize) -> Result<KvCache> {
        let n = self.lens.len();
        if !self.distinct_slots(slots, |len| len <= max_len) {
            return Err(Error::Msg(format!(
                "KV cache gather: slots {slots:?} of {n} (lengths {:?}) into slots of {max_len} positions \
                 (distinct, each holding at most that many)",
                self.lens
            )));
        }
        let copy = |t: &Tensor| -> Result<Tensor> {
            let mut shape = t.shape().to_vec();
            shape[0] = slots.len();
            shape[1] = max_len;
            let out = Tensor::zeros(&shape, t.dtype(), t.device())?;
            let (src, dst) = (position_rows(t)?, position_rows(&out)?);
            for (j, &s) in slots.iter().enumerate() {
                let len = self.lens[s as usize] as usize;
                let from = src.narrow_rows(s as usize * self.max_len, len)?;
                dst.narrow_rows(j * max_len, len)?.copy_from(&from)?;
            }
            Ok(out)
        };
        Ok(KvCache {
            k: self.k.iter().map(copy).collect::<Result<_>>()?,
            v: self.v.iter().map(copy).collect::<Result<_>>()?,
            lens: slots.iter().map(|&s| self.lens[s as usize]).collect(),
            max_len,
        })
    }
}

/// A layer's `[slots, positions, n_kv_heads, head_dim]` cache buffer as
/// `[slots · positions, n_kv_heads · head_dim]`: a slot's positions are consecutive rows.
fn position_rows(t: &Tensor) -> Result<Tensor> {
    let positions = t.shape()[..2].iter().product::<usize>();
    Ok(t.reshape(&[positions, t.shape()[2..].iter().product()])?)
}
