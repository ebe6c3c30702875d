//! `smelt bench`: kernel microbenchmarks against measured ceilings, the full training step, and
//! generation — each printing its physical unit next to the ceiling, and writing a JSON report
//! (`--json`) that `benches/compare/compare.py` puts side by side with PyTorch.
//!
//! Timing: warm-up, then the median of many runs. On CUDA each run sits between two CUDA
//! events on the compute stream; on CPU each run is wall-clock timed (every CPU op is
//! synchronous). Memory-bound kernels get the caches emptied before each run, by reading a
//! buffer larger than them (the default) or by writing one (`--flush write`, which leaves
//! dirty lines for the timed kernel to write back: see [`Flush`]).
//!
//! Ceilings are measured by the same command at start: on CPU a large parallel memcpy (GB/s,
//! bytes read + written) and the `gemm` crate's f32 matmul (TFLOP/s); on CUDA a large
//! device-to-device copy and a large bf16 cuBLAS matmul.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde_json::{json, Value};
use smelt_engine::{bf16, DType, Device, Rng, Tensor};
use smelt_kernels::{
    adamw, add, attention, attention_inputs, cast, embedding, global_norm, grpo_loss, logprob_entropy as head, matmul,
    rmsnorm, rope, sample, swiglu, versions,
};
use smelt_models::{Config, Packed, Qwen, Weights};
use smelt_trainer::memory::{peak_bytes, proc_mem, reset_peak};
use smelt_trainer::step::{synchronize, train_step_flops, PolicyStep, StepBatch, StepConfig};

use super::common::open_checkpoint;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub command: BenchCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Time every kernel at Qwen shapes against the measured copy and matmul ceilings.
    Kernels(KernelsArgs),
    /// Time full GRPO training steps on random weights and tokens.
    Step(StepArgs),
    /// Time batched greedy generation: prefill and decode tokens/s.
    Generate(GenerateArgs),
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.command {
        BenchCommand::Kernels(a) => kernels(a),
        BenchCommand::Step(a) => step(a),
        BenchCommand::Generate(a) => generate(a),
    }
}

// ---- shared -----------------------------------------------------------------------------

fn parse_device(s: &str) -> Result<Device> {
    smelt_trainer::config::parse_device(s).context("--device")
}

/// `--dtype`, defaulting to f32 on the CPU and bf16 on CUDA.
fn parse_dtype(s: Option<&str>, device: Device) -> Result<DType> {
    match s {
        None if device.is_cpu() => Ok(DType::F32),
        None => Ok(DType::BF16),
        Some(name) => smelt_trainer::config::compute_dtype(name, device).map_err(|e| anyhow::anyhow!("--dtype {e:#}")),
    }
}

/// UTC date and time from the system clock, without a date crate: (YYYY-MM-DD, RFC 3339).
fn utc_now() -> (String, String) {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let date = format!("{y:04}-{m:02}-{d:02}");
    let time = format!("{date}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60);
    (date, time)
}

fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}

fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => cpu_model(),
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => {
            smelt_engine::cuda::device(i).map(|d| d.name().to_string()).unwrap_or_else(|e| e.to_string())
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => "unavailable".to_string(),
    }
}

/// Machine, device, build and time: the header of every report.
fn report_header(kind: &str, device: Device) -> Value {
    let (date, time) = utc_now();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default();
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
    let mut machine = json!({
        "hostname": host,
        "cpu_model": cpu_model(),
        "cpu_cores_available": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "threads": smelt_engine::cpu::num_threads(),
        "device": device.to_string(),
        "device_name": device_name(device),
    });
    #[cfg(feature = "cuda")]
    if let Device::Cuda(i) = device {
        if let Ok(d) = smelt_engine::cuda::device(i) {
            machine["compute_capability"] = json!(d.arch());
            machine["device_total_mem_bytes"] = json!(d.total_mem());
        }
    }
    json!({
        "kind": kind,
        "smelt_version": env!("CARGO_PKG_VERSION"),
        "git_commit": git_commit(),
        "date": date,
        "time": time,
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "machine": machine,
    })
}

fn write_json(path: &Option<PathBuf>, v: &Value) -> Result<()> {
    if let Some(p) = path {
        let text = serde_json::to_string_pretty(v)?;
        std::fs::write(p, text + "\n").with_context(|| format!("{}: cannot write", p.display()))?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

/// `n` uniform values in [center − half_width, center + half_width], filled in parallel with one
/// generator per 64K-element chunk (seeded by chunk index), so the result depends only on `seed`.
fn rand_vec(n: usize, center: f32, half_width: f32, seed: u64) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let mut v = vec![0f32; n];
    smelt_engine::cpu::pool().install(|| {
        v.par_chunks_mut(CHUNK).enumerate().for_each(|(c, chunk)| {
            let mut rng = Rng::new(seed ^ (c as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            for x in chunk.iter_mut() {
                *x = center + half_width * (2.0 * rng.next_f32() - 1.0);
            }
        })
    });
    v
}

fn tensor_from_f32(v: &[f32], shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
    Ok(match dtype {
        DType::F32 => Tensor::from_slice(v, shape, device)?,
        DType::BF16 => {
            let h: Vec<bf16> = smelt_engine::cpu::pool().install(|| v.par_iter().map(|&x| bf16::from_f32(x)).collect());
            Tensor::from_slice(&h, shape, device)?
        }
        other => bail!("random tensors in {other} are not supported"),
    })
}

/// A tensor of uniform values with standard deviation `std` around `center` (never zeros:
/// timing on zeros flatters some hardware).
fn rand_tensor(shape: &[usize], dtype: DType, device: Device, center: f32, std: f32, seed: u64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    tensor_from_f32(&rand_vec(n, center, std * 3f32.sqrt(), seed), shape, dtype, device)
}

fn rand_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.below(vocab as u64) as u32).collect()
}

fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

fn gib(b: f64) -> String {
    format!("{:.2} GiB", b / (1u64 << 30) as f64)
}

/// How caches are emptied before a run of a memory-bound kernel (`--flush`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Flush {
    /// Read a buffer twice the size of the largest L2 (CUDA: a column sum over 128 MiB, writing
    /// only 2 MiB of partial sums; CPU: a sum over 64 MiB). The caches end up holding clean
    /// lines, so the timed kernel's loads evict nothing that must be written back.
    Read,
    /// Write a 64 MiB buffer (CUDA: a memset), as every report through the 2026-11-28 GPU visit
    /// did. The caches then hold dirty lines, and the timed kernel pays for writing them back to
    /// memory as its own loads evict them: up to ~50 MB of extra writes, as much as a 4k-token
    /// kernel moves.
    Write,
}

impl Flush {
    fn name(self) -> &'static str {
        match self {
            Flush::Read => "read",
            Flush::Write => "write",
        }
    }
}

/// Times runs of a closure on one device: CUDA events around each run on the compute stream,
/// or the wall clock on CPU; optionally evicting caches first.
struct Timer {
    device: Device,
    /// CPU: a 64 MiB buffer written or read before memory-bound runs (allocated at the first flush).
    flush_cpu: Vec<u64>,
    #[cfg(feature = "cuda")]
    cuda: Option<std::sync::Arc<smelt_engine::cuda::CudaDevice>>,
    /// CUDA flush buffers, allocated at the first flush (ceilings never flush).
    #[cfg(feature = "cuda")]
    cuda_flush: Option<CudaFlush>,
}

/// CUDA flush buffers: `write` (64 MiB) for memsets, `read` (128 MiB f32, `[8192, 4096]`)
/// whose column sums accumulate into `sums` (`[4096]` f32).
#[cfg(feature = "cuda")]
struct CudaFlush {
    write: Tensor,
    read: Tensor,
    sums: Tensor,
}

const FLUSH_BYTES: usize = 64 << 20;

impl Timer {
    fn new(device: Device) -> Result<Timer> {
        Ok(Timer {
            device,
            flush_cpu: Vec::new(),
            #[cfg(feature = "cuda")]
            cuda: match device {
                Device::Cuda(i) => Some(smelt_engine::cuda::device(i)?),
                Device::Cpu => None,
            },
            #[cfg(feature = "cuda")]
            cuda_flush: None,
        })
    }

    fn flush(&mut self, how: Flush, k: u8) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(dev) = &self.cuda {
            // The emulator would interpret 32 M additions: it has no cache to empty.
            if how == Flush::Read && dev.is_emulated() {
                return Ok(());
            }
            let c = match &mut self.cuda_flush {
                Some(c) => c,
                none => none.insert(CudaFlush {
                    write: Tensor::empty(&[FLUSH_BYTES / 4], DType::U32, self.device)?,
                    read: Tensor::zeros(&[8192, 4096], DType::F32, self.device)?,
                    sums: Tensor::zeros(&[4096], DType::F32, self.device)?,
                }),
            };
            match how {
                Flush::Write => dev.memset_zero(c.write.cuda_ptr()?, FLUSH_BYTES)?,
                Flush::Read => add::bias_grad_into(&c.read, &c.sums)?,
            }
            return Ok(());
        }
        if self.flush_cpu.is_empty() {
            // Written once: a fresh zeroed allocation maps the kernel's one zero page, and
            // reading it would flush nothing.
            self.flush_cpu = vec![1u64; FLUSH_BYTES / 8];
        }
        match how {
            Flush::Write => self.flush_cpu.fill(u64::from(k)),
            Flush::Read => {
                let sum = self.flush_cpu.iter().fold(0u64, |a, &x| a.wrapping_add(x));
                std::hint::black_box(sum);
            }
        }
        std::hint::black_box(&self.flush_cpu);
        Ok(())
    }

    /// Seconds one run of `f` takes, after emptying the caches if `flush` says how.
    fn time(&mut self, f: &mut dyn FnMut() -> Result<()>, flush: Option<Flush>, k: u8) -> Result<f64> {
        if let Some(how) = flush {
            self.flush(how, k)?;
        }
        #[cfg(feature = "cuda")]
        // (The CUDA emulator has no events; it runs synchronously and is timed by the host clock.)
        if let Some(d) = self.cuda.as_ref().filter(|d| !d.is_emulated()) {
            use cudarc::driver::sys::CUevent_flags;
            let (ctx, stream) = (d.context()?, d.stream()?);
            let ev = |what: &str| {
                ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(|e| anyhow::anyhow!("cuEventCreate ({what}): {e:?}"))
            };
            let (start, end) = (ev("start")?, ev("end")?);
            start.record(stream).map_err(|e| anyhow::anyhow!("cuEventRecord: {e:?}"))?;
            f()?;
            end.record(stream).map_err(|e| anyhow::anyhow!("cuEventRecord: {e:?}"))?;
            let ms = start.elapsed_ms(&end).map_err(|e| anyhow::anyhow!("cuEventElapsedTime: {e:?}"))?;
            d.synchronize()?;
            return Ok(ms as f64 / 1e3);
        }
        let t0 = Instant::now();
        f()?;
        synchronize(self.device)?;
        Ok(t0.elapsed().as_secs_f64())
    }
}

/// How many runs to time.
#[derive(Clone, Copy, Debug)]
struct Budget {
    warmup_s: f64,
    min_runs: usize,
    max_runs: usize,
    seconds: f64,
}

#[derive(Clone, Debug)]
struct Timing {
    median_s: f64,
    min_s: f64,
    runs: usize,
}

fn measure(timer: &mut Timer, f: &mut dyn FnMut() -> Result<()>, flush: Option<Flush>, b: Budget) -> Result<Timing> {
    // Warm-up: at least one run (compiles CUDA modules, fills allocator caches).
    let t0 = Instant::now();
    let mut k = 1u8;
    loop {
        timer.time(f, flush, k)?;
        k = k.wrapping_add(1);
        if t0.elapsed().as_secs_f64() >= b.warmup_s || k > 3 {
            break;
        }
    }
    let mut times = Vec::new();
    let t0 = Instant::now();
    while times.len() < b.min_runs || (times.len() < b.max_runs && t0.elapsed().as_secs_f64() < b.seconds) {
        times.push(timer.time(f, flush, k)?);
        k = k.wrapping_add(1);
    }
    Ok(Timing {
        median_s: median(&times),
        min_s: times.iter().copied().fold(f64::INFINITY, f64::min),
        runs: times.len(),
    })
}

// ---- kernels ----------------------------------------------------------------------------

#[derive(clap::Args, Debug)]
pub struct KernelsArgs {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Only ops whose name is NAME or starts with NAME_ (e.g. `rmsnorm`, `attention_fwd`);
    /// several names, comma-separated, select each one's ops.
    #[arg(long, value_delimiter = ',')]
    pub op: Vec<String>,
    /// Only this kernel version, numbered as in the op's `.cu` header (on CUDA every version of an
    /// op is timed, each pinned with `versions::scoped`; CPU rows and single-version ops are 1).
    #[arg(long)]
    pub version: Option<u32>,
    /// Only this model shape: qwen2.5-0.5b, qwen2.5-1.5b or qwen2.5-7b.
    #[arg(long)]
    pub shape: Option<String>,
    /// Token counts (comma-separated). Default: CUDA 1024,4096,16384; CPU 1024 (256 with --quick).
    #[arg(long, value_delimiter = ',')]
    pub tokens: Option<Vec<usize>>,
    /// Write all rows, the ceilings and the machine to this JSON file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Fewer shapes, tokens and runs (about a minute on 2 CPU cores).
    #[arg(long)]
    pub quick: bool,
    /// How caches are emptied before each run of a memory-bound kernel; several (`read,write`)
    /// time each such kernel once per way, in that order.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "read")]
    pub flush: Vec<Flush>,
}

/// Attention/MLP/vocab dimensions of one model, for the kernel shapes.
#[derive(Clone, Copy, Debug)]
struct KShape {
    name: &'static str,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    inter: usize,
    vocab: usize,
}

const KSHAPES: [KShape; 3] = [
    KShape { name: "qwen2.5-0.5b", hidden: 896, heads: 14, kv_heads: 2, head_dim: 64, inter: 4864, vocab: 151_936 },
    KShape { name: "qwen2.5-1.5b", hidden: 1536, heads: 12, kv_heads: 2, head_dim: 128, inter: 8960, vocab: 151_936 },
    KShape { name: "qwen2.5-7b", hidden: 3584, heads: 28, kv_heads: 4, head_dim: 128, inter: 18_944, vocab: 152_064 },
];

const OPS: [&str; 22] = [
    "matmul",
    "matmul_decode",
    "add",
    "rmsnorm_fwd",
    "rmsnorm_bwd",
    "rmsnorm_add_fwd",
    "rope",
    "attention_inputs",
    "swiglu",
    "embedding",
    "cast",
    "adamw",
    "global_norm",
    "attention_fwd",
    "attention_bwd",
    "attention_decode",
    "logprob_entropy_fused_fwd",
    "logprob_entropy_fused_bwd",
    "logprob_entropy_logits_fwd",
    "logprob_entropy_logits_bwd",
    "grpo_loss",
    "sample",
];

/// Whether `op` is NAME or starts with NAME_ for a NAME of `names` (no names: every op).
fn op_selected(op: &str, names: &[String]) -> bool {
    names.is_empty() || names.iter().any(|f| op == f || op.strip_prefix(f.as_str()).is_some_and(|r| r.starts_with('_')))
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Bound {
    Memory,
    Compute,
}

/// One benchmark: what it moves and computes, and the closure that runs it once.
struct Case {
    op: &'static str,
    shape: String,
    version: u32,
    dtype: DType,
    bytes: f64,
    flops: f64,
    bound: Bound,
    run: Box<dyn FnMut() -> Result<()>>,
    /// What a call without a forced version runs (see [`mark_defaults`]).
    default: bool,
}

struct Ceilings {
    copy_gb_s: f64,
    copy_desc: String,
    matmul_tflop_s: f64,
    matmul_desc: String,
}

/// The copy ceiling: a large parallel memcpy on CPU, a device-to-device copy on CUDA (GB/s,
/// bytes read + written), and how it was measured.
fn copy_ceiling(device: Device, quick: bool) -> Result<(f64, String)> {
    let mut timer = Timer::new(device)?;
    match device {
        Device::Cpu => {
            let bytes = if quick { 128 << 20 } else { 512 << 20 };
            let src: Vec<u8> = (0..bytes).map(|i| (i * 7 + 3) as u8).collect();
            let mut dst = vec![0u8; bytes];
            let threads = smelt_engine::cpu::num_threads();
            let chunk = bytes.div_ceil(threads * 4).max(1 << 16);
            let budget = Budget { warmup_s: 0.0, min_runs: 5, max_runs: 10, seconds: 0.5 };
            let t = measure(
                &mut timer,
                &mut || {
                    smelt_engine::cpu::pool().install(|| {
                        dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s))
                    });
                    std::hint::black_box(&dst);
                    Ok(())
                },
                None,
                budget,
            )?;
            Ok((
                2.0 * bytes as f64 / t.median_s / 1e9,
                format!("parallel memcpy of {} (read + write counted)", gib(bytes as f64)),
            ))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => {
            let d = smelt_engine::cuda::device(i)?;
            let budget = Budget { warmup_s: 0.05, min_runs: 10, max_runs: 50, seconds: 0.5 };
            let bytes: usize = if quick { 256 << 20 } else { 1 << 30 };
            // Random contents: never time on zeros.
            let src = rand_tensor(&[bytes / 2], DType::BF16, device, 0.0, 1.0, 3)?;
            let dst = Tensor::empty(&[bytes / 2], DType::BF16, device)?;
            let (sp, dp) = (src.cuda_ptr()?, dst.cuda_ptr()?);
            let t = measure(&mut timer, &mut || Ok(d.dtod(sp, dp, bytes)?), None, budget)?;
            let desc = format!("device-to-device copy of {} (read + write counted)", gib(bytes as f64));
            Ok((2.0 * bytes as f64 / t.median_s / 1e9, desc))
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => bail!("built without CUDA"),
    }
}

/// The matmul ceiling: the gemm crate's f32 matmul on CPU, a bf16 cuBLAS matmul on CUDA
/// (TFLOP/s), and how it was measured.
fn matmul_ceiling(device: Device, quick: bool) -> Result<(f64, String)> {
    let mut timer = Timer::new(device)?;
    match device {
        Device::Cpu => {
            let budget = Budget { warmup_s: 0.0, min_runs: 5, max_runs: 10, seconds: 0.5 };
            let n = if quick { 1024 } else { 2048 };
            let a = rand_vec(n * n, 0.0, 1.0, 1);
            let b = rand_vec(n * n, 0.0, 1.0, 2);
            let mut c = vec![0f32; n * n];
            let t = measure(
                &mut timer,
                &mut || Ok(smelt_engine::cpu::matmul_f32(&a, &b, &mut c, n, n, n, false, false, false)?),
                None,
                budget,
            )?;
            let threads = smelt_engine::cpu::num_threads();
            Ok((
                2.0 * (n as f64).powi(3) / t.median_s / 1e12,
                format!("gemm crate f32 matmul {n}x{n}x{n}, {threads} threads"),
            ))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(i) => {
            use smelt_engine::cuda::Gemm;
            let d = smelt_engine::cuda::device(i)?;
            let budget = Budget { warmup_s: 0.05, min_runs: 10, max_runs: 50, seconds: 0.5 };
            let n = if quick { 4096 } else { 8192 };
            let a = rand_tensor(&[n, n], DType::BF16, device, 0.0, 1.0, 4)?;
            let b = rand_tensor(&[n, n], DType::BF16, device, 0.0, 1.0, 5)?;
            let c = Tensor::empty(&[n, n], DType::BF16, device)?;
            let g = Gemm::new(n, n, n, DType::BF16, DType::BF16).trans(false, true);
            let (ap, bp, cp) = (a.cuda_ptr()?, b.cuda_ptr()?, c.cuda_ptr()?);
            let t = measure(&mut timer, &mut || Ok(d.gemm(&g, ap, bp, cp)?), None, budget)?;
            Ok((
                2.0 * (n as f64).powi(3) / t.median_s / 1e12,
                format!("cuBLAS bf16 matmul {n}x{n}x{n} (x·Wᵀ), fp32 accumulation"),
            ))
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => bail!("built without CUDA"),
    }
}

fn ceilings(device: Device, quick: bool) -> Result<Ceilings> {
    let (copy_gb_s, copy_desc) = copy_ceiling(device, quick)?;
    let (matmul_tflop_s, matmul_desc) = matmul_ceiling(device, quick)?;
    Ok(Ceilings { copy_gb_s, copy_desc, matmul_tflop_s, matmul_desc })
}

/// Sequence lengths of a packed batch of `t` tokens: sequences of up to 4096 tokens (the
/// length of a long reasoning completion).
fn seq_lens(t: usize) -> Vec<u32> {
    let s = t.clamp(1, 4096);
    let mut cu = vec![0u32];
    let mut left = t;
    while left > 0 {
        let l = left.min(s);
        cu.push(cu.last().copied().unwrap_or(0) + l as u32);
        left -= l;
    }
    cu
}

fn causal_pairs(cu: &[u32]) -> f64 {
    cu.windows(2).map(|w| (w[1] - w[0]) as f64).map(|s| s * (s + 1.0) / 2.0).sum()
}

/// Head row tile whose f32 logits chunk (× the default 4096 columns) fits a quarter of an
/// H100's L2 (see the fused head's cases).
const L2_ROW_TILE: usize = 1024;
/// Marks the shape of the fused head's L2 row-tile variant (not what a call runs by default).
const ROW_TILE_TAG: &str = " row tile ";

/// Builds the benchmark for one op at one model shape and token count.
fn build_cases(op: &'static str, ks: &KShape, t: usize, device: Device, quick: bool, exact: bool) -> Result<Vec<Case>> {
    let dt = if device.is_cpu() { DType::F32 } else { DType::BF16 };
    let es = dt.size_in_bytes() as f64;
    let (h, tf) = (ks.hidden, t as f64);
    let seed = t as u64 * 31 + ks.hidden as u64;
    let rt = |shape: &[usize], s: u64| rand_tensor(shape, dt, device, 0.0, 1.0, seed ^ s);
    let shape_name = |extra: String| format!("{} T={t} {extra}", ks.name);
    // The fused head and the logits variants scale with the vocabulary: on CPU they run on a
    // slice of the tokens so the sweep stays within minutes (unless --tokens asked for `t`).
    let head_rows = if device.is_cpu() && !exact { (t / if quick { 16 } else { 8 }).max(16) } else { t };
    let decode_batch = if device.is_cpu() { 8 } else { 32 };
    let mut cases = Vec::new();
    let mut push =
        |shape: String, version: u32, bytes: f64, flops: f64, bound: Bound, run: Box<dyn FnMut() -> Result<()>>| {
            cases.push(Case { op, shape, version, dtype: dt, bytes, flops, bound, run, default: false })
        };
    match op {
        "matmul" => {
            let x = rt(&[t, h], 1)?;
            let w = rand_tensor(&[ks.inter, h], dt, device, 0.0, 0.05, seed ^ 2)?;
            let (i, hf) = (ks.inter as f64, h as f64);
            push(
                shape_name(format!("x[{t},{h}]·W[{},{h}]ᵀ (mlp up)", ks.inter)),
                1,
                (tf * hf + i * hf + tf * i) * es,
                2.0 * tf * hf * i,
                Bound::Compute,
                Box::new(move || {
                    matmul::matmul(&x, &w, false, true)?;
                    Ok(())
                }),
            );
        }
        "matmul_decode" => {
            // A decode step's projections at an RL batch of rows: each weight is read once for
            // few rows, so these are bound by reading the weights (GB/s; L2 flushed, as a step
            // streams ~1 GB of weights through it) unless the GEMM leaves SMs idle.
            let (q, kv) = (ks.heads * ks.head_dim, ks.kv_heads * ks.head_dim);
            // gate|up as the model runs it: the product and its SwiGLU (`linear_swiglu`: v1 a
            // cuBLAS GEMM then the swiglu kernel, v2 the SwiGLU in the kernel's epilogue).
            let weights = [
                ("q|k|v", q + 2 * kv, h, false),
                ("o", h, q, false),
                ("gate|up + swiglu", 2 * ks.inter, h, true),
                ("down", h, ks.inter, false),
                ("lm_head", ks.vocab, h, false),
            ];
            // CUDA: v1 cuBLAS, v2 matmul.cu's few-rows kernel (held back until measured).
            let b = decode_batch;
            for (i, (name, n, k, glu)) in weights.into_iter().enumerate() {
                let x = rt(&[b, k], 10 + i as u64)?;
                let w = rand_tensor(&[n, k], dt, device, 0.0, 0.05, seed ^ (20 + i as u64))?;
                let out_cols = if glu { n / 2 } else { n };
                for &ver in versions_on(device, &[1, 2]) {
                    let (x, w) = (x.clone(), w.clone());
                    push(
                        format!("{} x[{b},{k}]·W[{n},{k}]ᵀ ({name})", ks.name),
                        ver,
                        ((n * k) + b * k + b * out_cols) as f64 * es,
                        2.0 * (b * n * k) as f64,
                        Bound::Memory,
                        Box::new(move || {
                            pinned("matmul", ver, || match glu {
                                true => matmul::linear_swiglu(&x, &w),
                                false => matmul::matmul(&x, &w, false, true),
                            })
                        }),
                    );
                }
            }
        }
        "add" => {
            let (a, b) = (rt(&[t, h], 1)?, rt(&[t, h], 2)?);
            push(
                shape_name(format!("[{t},{h}]")),
                1,
                3.0 * tf * h as f64 * es,
                tf * h as f64,
                Bound::Memory,
                Box::new(move || {
                    add::add(&a, &b)?;
                    Ok(())
                }),
            );
        }
        "rmsnorm_fwd" | "rmsnorm_bwd" => {
            let x = rt(&[t, h], 1)?;
            let w = rand_tensor(&[h], dt, device, 1.0, 0.1, seed ^ 2)?;
            let hf = h as f64;
            // Every CUDA version (rmsnorm.cu), each pinned only while it runs (CPU ignores it).
            let vers = versions_on(device, &[1, 2, 3]);
            if op == "rmsnorm_fwd" {
                for &ver in vers {
                    let (x, w) = (x.clone(), w.clone());
                    push(
                        shape_name(format!("[{t},{h}]")),
                        ver,
                        2.0 * tf * hf * es + hf * es + tf * 4.0,
                        4.0 * tf * hf,
                        Bound::Memory,
                        Box::new(move || pinned("rmsnorm", ver, || rmsnorm::rmsnorm(&x, &w, 1e-6))),
                    );
                }
            } else {
                let (_, rstd) = rmsnorm::rmsnorm(&x, &w, 1e-6)?;
                let dy = rt(&[t, h], 3)?;
                for &ver in vers {
                    let (x, w, rstd, dy) = (x.clone(), w.clone(), rstd.clone(), dy.clone());
                    push(
                        shape_name(format!("[{t},{h}]")),
                        ver,
                        3.0 * tf * hf * es + hf * (es + 4.0) + tf * 4.0,
                        8.0 * tf * hf,
                        Bound::Memory,
                        Box::new(move || pinned("rmsnorm", ver, || rmsnorm::rmsnorm_backward(&x, &w, &rstd, &dy))),
                    );
                }
            }
        }
        "rmsnorm_add_fwd" => {
            let (x, r) = (rt(&[t, h], 1)?, rt(&[t, h], 2)?);
            let w = rand_tensor(&[h], dt, device, 1.0, 0.1, seed ^ 3)?;
            let hf = h as f64;
            for &ver in versions_on(device, &[1, 2, 3]) {
                let (x, r, w) = (x.clone(), r.clone(), w.clone());
                push(
                    shape_name(format!("[{t},{h}]")),
                    ver,
                    4.0 * tf * hf * es + hf * es + tf * 4.0,
                    5.0 * tf * hf,
                    Bound::Memory,
                    Box::new(move || pinned("rmsnorm", ver, || rmsnorm::add_rmsnorm(&x, &r, &w, 1e-6))),
                );
            }
        }
        "attention_inputs" => {
            // A prefill of t tokens with Qwen2's biases, into the KV cache.
            let (qd, kvd) = (ks.heads * ks.head_dim, ks.kv_heads * ks.head_dim);
            // The fused [q | k | v] projection's output, as the model runs it.
            let qkv = rt(&[t, qd + 2 * kvd], 1)?;
            let (n_heads, n_kv) = (ks.heads, ks.kv_heads);
            let (bq, bk, bv) = (rt(&[qd], 4)?, rt(&[kvd], 5)?, rt(&[kvd], 6)?);
            // Sequences of 4,096 tokens (the last one shorter), one cache slot each.
            let cache = || Tensor::zeros(&[t.div_ceil(4096), 4096, ks.kv_heads, ks.head_dim], dt, device);
            let (kc, vc) = (cache()?, cache()?);
            let table = rope::RopeTable::new(ks.head_dim, 1e6, device)?;
            let slots: Vec<u32> = (0..t as u32).map(|i| i / 4096).collect();
            let pos: Vec<u32> = (0..t as u32).map(|i| i % 4096).collect();
            let n = tf * (qd + 2 * kvd) as f64;
            for &ver in versions_on(device, &[1, 2]) {
                let (qkv, bq, bk, bv, kc, vc, table, slots, pos) = (
                    qkv.clone(),
                    bq.clone(),
                    bk.clone(),
                    bv.clone(),
                    kc.clone(),
                    vc.clone(),
                    table.clone(),
                    slots.clone(),
                    pos.clone(),
                );
                push(
                    shape_name(format!("qkv[{t},{}] + bias, rope, cache", qd + 2 * kvd)),
                    ver,
                    2.0 * n * es + 2.0 * tf * kvd as f64 * es + (qd + 2 * kvd) as f64 * es + tf * 8.0,
                    4.0 * n,
                    Bound::Memory,
                    Box::new(move || {
                        let extras = attention_inputs::Extras {
                            q_bias: Some(&bq),
                            k_bias: Some(&bk),
                            v_bias: Some(&bv),
                            ..Default::default()
                        };
                        let to_cache =
                            attention_inputs::CacheAppend { k_cache: &kc, v_cache: &vc, slots: (&slots).into() };
                        let packed = attention_inputs::Qkv::Packed { qkv: &qkv, n_heads, n_kv };
                        pinned("attention_inputs", ver, || {
                            attention_inputs::attention_inputs(packed, &extras, &table, &pos, Some(to_cache))
                        })
                    }),
                );
            }
        }
        "rope" => {
            let x = rt(&[t, ks.heads, ks.head_dim], 1)?;
            let pos: Vec<u32> = (0..t as u32).map(|p| p % 4096).collect();
            let pos = Tensor::from_slice(&pos, &[t], device)?;
            // Built once, as the model keeps it: `rope::rope` builds and uploads one per call, a
            // stream sync that would be timed with the kernel.
            let table = rope::RopeTable::new(ks.head_dim, 1e6, device)?;
            let n = tf * (ks.heads * ks.head_dim) as f64;
            // Every CUDA version (rope.cu), each pinned only while it runs (CPU ignores it).
            let vers = versions_on(device, &[1, 2, 3]);
            for &ver in vers {
                let (x, pos, table) = (x.clone(), pos.clone(), table.clone());
                push(
                    shape_name(format!("q[{t},{},{}]", ks.heads, ks.head_dim)),
                    ver,
                    2.0 * n * es + tf * 4.0,
                    3.0 * n,
                    Bound::Memory,
                    Box::new(move || pinned("rope", ver, || table.forward(&x, &pos))),
                );
            }
        }
        "swiglu" => {
            let (g, u) = (rt(&[t, ks.inter], 1)?, rt(&[t, ks.inter], 2)?);
            let n = tf * ks.inter as f64;
            push(
                shape_name(format!("[{t},{}]", ks.inter)),
                1,
                3.0 * n * es,
                6.0 * n,
                Bound::Memory,
                Box::new(move || {
                    swiglu::swiglu(&g, &u)?;
                    Ok(())
                }),
            );
        }
        "embedding" => {
            let table = rand_tensor(&[ks.vocab, h], dt, device, 0.0, 0.05, seed ^ 1)?;
            let ids = Tensor::from_slice(&rand_ids(t, ks.vocab, seed), &[t], device)?;
            // Every CUDA forward version (embedding.cu: v1-v3 grid-stride with 2/4/16-byte
            // units, v4 2-D), each pinned only while it runs (CPU ignores it). The kernel alone:
            // `embedding` would read device ids back for its range check (a stream sync timed
            // with the kernel); the model checks its ids on the host (`embedding_from_host`).
            let vers = versions_on(device, &[1, 2, 3, 4]);
            for &ver in vers {
                let (ids, table) = (ids.clone(), table.clone());
                push(
                    shape_name(format!("ids[{t}] table[{},{h}]", ks.vocab)),
                    ver,
                    2.0 * tf * h as f64 * es + tf * 4.0,
                    0.0,
                    Bound::Memory,
                    Box::new(move || {
                        pinned("embedding", ver, || match device {
                            Device::Cpu => embedding::embedding(&ids, &table),
                            Device::Cuda(_) => embedding::embedding_unchecked(&ids, &table),
                        })
                    }),
                );
            }
        }
        "cast" => {
            let x = rand_tensor(&[t, h], DType::F32, device, 0.0, 1.0, seed)?;
            push(
                shape_name(format!("[{t},{h}] f32->bf16")),
                1,
                tf * h as f64 * 6.0,
                0.0,
                Bound::Memory,
                Box::new(move || {
                    cast::cast(&x, DType::BF16)?;
                    Ok(())
                }),
            );
        }
        "adamw" | "global_norm" => {
            // One layer's MLP weights: large enough to stream from memory, small enough for CPU.
            let n = 3 * h * ks.inter;
            let g = rand_tensor(&[n], DType::F32, device, 0.0, 1e-3, seed ^ 1)?;
            let nf = n as f64;
            let shape = format!("{} n={n} (one layer's MLP) f32", ks.name);
            if op == "global_norm" {
                push(
                    shape,
                    1,
                    nf * 4.0,
                    2.0 * nf,
                    Bound::Memory,
                    Box::new(move || {
                        global_norm::global_norm(&[&g])?;
                        Ok(())
                    }),
                );
            } else {
                let p = rand_tensor(&[n], DType::F32, device, 0.0, 0.05, seed ^ 2)?;
                let m = rand_tensor(&[n], DType::F32, device, 0.0, 1e-4, seed ^ 3)?;
                let v = rand_tensor(&[n], DType::F32, device, 1e-6, 1e-7, seed ^ 4)?;
                // On CUDA the model is bf16, so the update also writes its bf16 copy.
                let out16 = if device.is_cpu() { None } else { Some(Tensor::empty(&[n], DType::BF16, device)?) };
                let cfg = adamw::AdamW { lr: 1e-6, ..Default::default() };
                let extra = if out16.is_some() { 2.0 } else { 0.0 };
                let mut stepn = 0u64;
                push(
                    format!("{shape}{}", if out16.is_some() { " +bf16 out" } else { "" }),
                    1,
                    nf * (7.0 * 4.0 + extra),
                    12.0 * nf,
                    Bound::Memory,
                    Box::new(move || {
                        stepn += 1;
                        adamw::adamw_step(&p, &g, &m, &v, stepn, &cfg, 0.01, 1.0, out16.as_ref())?;
                        Ok(())
                    }),
                );
                if !device.is_cpu() {
                    // A training step's optimizer: every tensor of 2 layers (weights, biases,
                    // norms), a launch per tensor (v1) against one launch for all (v2, AdamwGroup).
                    let group = std::rc::Rc::new(layer_adamw_group(ks, 2, device, seed)?);
                    let total: usize = group.tensors().iter().map(|t| t.param.elem_count()).sum();
                    let shape =
                        format!("{} 2 layers, {} tensors, n={total} f32 +bf16 out", ks.name, group.tensors().len());
                    let tn = total as f64;
                    for ver in [1u32, 2] {
                        let group = group.clone();
                        let mut stepn = 0u64;
                        push(
                            shape.clone(),
                            ver,
                            tn * (7.0 * 4.0 + 2.0),
                            12.0 * tn,
                            Bound::Memory,
                            Box::new(move || {
                                stepn += 1;
                                pinned("adamw", ver, || group.step(stepn, &cfg, 1.0))
                            }),
                        );
                    }
                }
            }
        }
        "attention_fwd" | "attention_bwd" => {
            let cu = seq_lens(t);
            let (nh, nkv, d) = (ks.heads, ks.kv_heads, ks.head_dim);
            let q = rt(&[t, nh, d], 1)?;
            let k = rt(&[t, nkv, d], 2)?;
            let v = rt(&[t, nkv, d], 3)?;
            let fwd_flops = 4.0 * (nh * d) as f64 * causal_pairs(&cu);
            let io = (2.0 * tf * (nh * d) as f64 + 2.0 * tf * (nkv * d) as f64) * es;
            let seqs = cu.len() - 1;
            let desc = format!("{seqs}x{} causal, heads {nh}/{nkv}, d {d}", t / seqs.max(1));
            if op == "attention_fwd" {
                // v4 exists at head dim 64 only (v3's kernel at 128).
                let all: &[u32] = if d == 64 { &[1, 2, 3, 4] } else { &[1, 2, 3] };
                for &ver in versions_on(device, all) {
                    let (q, k, v, cu) = (q.clone(), k.clone(), v.clone(), cu.clone());
                    push(
                        shape_name(desc.clone()),
                        ver,
                        io,
                        fwd_flops,
                        Bound::Compute,
                        Box::new(move || {
                            pinned("attention_forward", ver, || attention::attention_forward(&q, &k, &v, &cu, None))
                        }),
                    );
                }
            } else {
                let (o, lse) = attention::attention_forward(&q, &k, &v, &cu, None)?;
                let d_o = rt(&[t, nh, d], 4)?;
                for &ver in versions_on(device, &[1, 2, 3, 4]) {
                    let (q, k, v, o, lse, d_o, cu) =
                        (q.clone(), k.clone(), v.clone(), o.clone(), lse.clone(), d_o.clone(), cu.clone());
                    push(
                        shape_name(desc.clone()),
                        ver,
                        2.0 * io + tf * nh as f64 * 4.0,
                        2.5 * fwd_flops,
                        Bound::Compute,
                        Box::new(move || {
                            pinned("attention_backward", ver, || {
                                attention::attention_backward(&q, &k, &v, &o, &lse, &d_o, &cu, None)
                            })
                        }),
                    );
                }
            }
        }
        "attention_decode" => {
            let (b, nh, nkv, d) = (decode_batch, ks.heads, ks.kv_heads, ks.head_dim);
            let q = rt(&[b, nh, d], 1)?;
            let kc = rt(&[b, t, nkv, d], 2)?;
            let vc = rt(&[b, t, nkv, d], 3)?;
            let lens = vec![t as u32; b];
            let kv_bytes = 2.0 * (b * t * nkv * d) as f64 * es;
            // v3 is bf16 only.
            let vers = versions_on(device, if dt == DType::BF16 { &[1, 2, 3] } else { &[1, 2] });
            for &ver in vers {
                let (q, kc, vc, lens) = (q.clone(), kc.clone(), vc.clone(), lens.clone());
                push(
                    format!("{} B={b} ctx={t} heads {nh}/{nkv}, d {d}", ks.name),
                    ver,
                    kv_bytes + 2.0 * (b * nh * d) as f64 * es,
                    4.0 * (b * nh * d) as f64 * tf,
                    Bound::Memory,
                    Box::new(move || {
                        pinned("attention_decode", ver, || attention::attention_decode(&q, &kc, &vc, &lens, None, None))
                    }),
                );
            }
        }
        "logprob_entropy_fused_fwd" | "logprob_entropy_fused_bwd" => {
            let n = head_rows;
            let hid = rt(&[n, h], 1)?;
            let w = rand_tensor(&[ks.vocab, h], dt, device, 0.0, 2.0 / (h as f64).sqrt() as f32, seed ^ 2)?;
            let tg = Tensor::from_slice(&rand_ids(n, ks.vocab, seed), &[n], device)?;
            let nvh = (n * ks.vocab * h) as f64;
            let io = ((n * h + ks.vocab * h) as f64) * es;
            let desc = format!("{} N={n} h[{n},{h}] W[{},{h}]", ks.name, ks.vocab);
            let opts = head::LogprobEntropyOpts::default();
            // On CUDA the head runs all rows as one tile by default, so a chunk's f32 logits
            // (N × 4096 × 4 B: 134 MB at N = 8192) go to HBM and back. The second case tiles
            // the rows so that a tile's logits (1024 × 4096 × 4 B = 16 MiB) can stay in an
            // H100's 50 MB L2 between the GEMM that writes them and the scan that reads them,
            // at 8× the launches: which wins is for the GPU to say.
            let l2_tile = head::LogprobEntropyOpts { row_tile: Some(L2_ROW_TILE), ..opts };
            let tilings: Vec<(head::LogprobEntropyOpts, String)> = if device.is_cpu() || n <= L2_ROW_TILE {
                vec![(opts, desc.clone())]
            } else {
                vec![(opts, desc.clone()), (l2_tile, format!("{desc}{ROW_TILE_TAG}{L2_ROW_TILE}"))]
            };
            if op == "logprob_entropy_fused_fwd" {
                // The forward scan's versions (logprob_entropy.cu: v3 per element, v4 grouped).
                let vers = versions_on(device, &[3, 4]);
                for (opts, desc) in &tilings {
                    for &ver in vers {
                        let (hid, w, tg, opts) = (hid.clone(), w.clone(), tg.clone(), *opts);
                        push(
                            desc.clone(),
                            ver,
                            io,
                            2.0 * nvh,
                            Bound::Compute,
                            Box::new(move || {
                                pinned("logprob_entropy", ver, || head::logprob_entropy(&hid, &w, &tg, 1.0, &opts))
                            }),
                        );
                    }
                }
            } else {
                let f = head::logprob_entropy(&hid, &w, &tg, 1.0, &opts)?;
                let gl = rand_tensor(&[n], DType::F32, device, 0.0, 0.01, seed ^ 3)?;
                let ge = rand_tensor(&[n], DType::F32, device, 0.0, 0.01, seed ^ 4)?;
                let dw = Tensor::zeros(&[ks.vocab, h], DType::F32, device)?;
                for (opts, desc) in tilings {
                    let (hid, w, tg, f_lse, f_ent, gl, ge, dw) = (
                        hid.clone(),
                        w.clone(),
                        tg.clone(),
                        f.lse.clone(),
                        f.entropy.clone(),
                        gl.clone(),
                        ge.clone(),
                        dw.clone(),
                    );
                    push(
                        desc,
                        1,
                        io + (n * h + ks.vocab * h) as f64 * 4.0 * 2.0,
                        // Recomputing the logits (2NVH) plus dh and dW (4NVH).
                        6.0 * nvh,
                        Bound::Compute,
                        Box::new(move || {
                            head::logprob_entropy_backward_acc(
                                &hid, &w, &tg, 1.0, &f_lse, &f_ent, &gl, &ge, &dw, &opts,
                            )?;
                            Ok(())
                        }),
                    );
                }
            }
        }
        "logprob_entropy_logits_fwd" | "logprob_entropy_logits_bwd" => {
            let n = head_rows;
            let logits = rand_tensor(&[n, ks.vocab], dt, device, 0.0, 2.0, seed ^ 1)?;
            let tg = Tensor::from_slice(&rand_ids(n, ks.vocab, seed), &[n], device)?;
            let nv = (n * ks.vocab) as f64;
            let desc = format!("{} logits[{n},{}]", ks.name, ks.vocab);
            let opts = head::LogprobEntropyOpts::default();
            if op == "logprob_entropy_logits_fwd" {
                let vers = versions_on(device, &[3, 4]);
                for &ver in vers {
                    let (logits, tg) = (logits.clone(), tg.clone());
                    push(
                        desc.clone(),
                        ver,
                        nv * es,
                        5.0 * nv,
                        Bound::Memory,
                        Box::new(move || {
                            pinned("logprob_entropy", ver, || {
                                head::logprob_entropy_from_logits(&logits, &tg, 1.0, &opts)
                            })
                        }),
                    );
                }
            } else {
                let f = head::logprob_entropy_from_logits(&logits, &tg, 1.0, &opts)?;
                let gl = rand_tensor(&[n], DType::F32, device, 0.0, 0.01, seed ^ 3)?;
                let ge = rand_tensor(&[n], DType::F32, device, 0.0, 0.01, seed ^ 4)?;
                push(
                    desc,
                    1,
                    2.0 * nv * es,
                    6.0 * nv,
                    Bound::Memory,
                    Box::new(move || {
                        head::logprob_entropy_from_logits_backward(&logits, &tg, 1.0, &f.lse, &f.entropy, &gl, &ge)?;
                        Ok(())
                    }),
                );
            }
        }
        "grpo_loss" => {
            let f = |c: f32, s: f32, k: u64| rand_tensor(&[t], DType::F32, device, c, s, seed ^ k);
            let (lp, old, adv, ent) = (f(-2.0, 0.5, 1)?, f(-2.0, 0.5, 2)?, f(0.0, 1.0, 3)?, f(2.0, 0.5, 4)?);
            let mask = Tensor::full(1.0, &[t], DType::F32, device)?;
            let w = Tensor::full(1.0 / t as f64, &[t], DType::F32, device)?;
            let cfg = grpo_loss::GrpoLossConfig::default();
            push(
                shape_name(String::new()),
                1,
                tf * 4.0 * 8.0,
                20.0 * tf,
                Bound::Memory,
                Box::new(move || {
                    let x = grpo_loss::GrpoLossInputs {
                        logp: &lp,
                        logp_old: &old,
                        logp_ref: None,
                        advantages: &adv,
                        mask: &mask,
                        weights: &w,
                        entropy: Some(&ent),
                    };
                    grpo_loss::grpo_loss(&x, &cfg)?;
                    Ok(())
                }),
            );
        }
        "sample" => {
            let b = decode_batch;
            let logits = rand_tensor(&[b, ks.vocab], dt, device, 0.0, 2.0, seed ^ 1)?;
            // Nucleus sampling, and plain temperature sampling (TRL's rollout default).
            let configs = [(1.0, 0.95, "T=1 top_p=0.95"), (1.0, 1.0, "T=1")];
            let vers = versions_on(device, &[1, 2]);
            for &(temperature, top_p, label) in &configs {
                for &ver in vers {
                    let cfg = sample::SamplingConfig { temperature, top_p, top_k: None };
                    let logits = logits.clone();
                    let mut stepn = 0u64;
                    push(
                        format!("{} logits[{b},{}] {label}", ks.name, ks.vocab),
                        ver,
                        (b * ks.vocab) as f64 * es,
                        5.0 * (b * ks.vocab) as f64,
                        Bound::Memory,
                        Box::new(move || {
                            stepn += 1;
                            pinned("sample", ver, || sample::sample(&logits, &cfg, 7, stepn))
                        }),
                    );
                }
            }
        }
        other => bail!("internal: no benchmark for op {other}"),
    }
    mark_defaults(&mut cases, ks.head_dim, device);
    Ok(cases)
}

/// Marks the rows an unforced call runs, so reports compare those with peers: per shape, what
/// the op's launcher picks without a pinned version (`versions::unforced`: the newest version,
/// on CUDA the attention forward and decode up to their measured limits, and under a
/// `SMELT_KERNEL_VERSIONS` cap the newest version not above it), at the op's own tiling (not
/// the fused head's L2 row-tile variant).
fn mark_defaults(cases: &mut [Case], head_dim: usize, device: Device) {
    let Some(op) = cases.first().map(|c| c.op) else { return };
    let best = match op {
        "attention_fwd" if !device.is_cpu() => attention::forward_version_limit(head_dim),
        "attention_decode" if !device.is_cpu() => attention::DECODE_VERSION_LIMIT,
        "matmul_decode" if !device.is_cpu() => matmul::VERSION_LIMIT,
        _ => u32::MAX,
    };
    let kernel = versioned_op(op).filter(|_| !device.is_cpu());
    let runs: Vec<Option<u32>> = cases
        .iter()
        .map(|c| {
            let mut same: Vec<u32> = cases.iter().filter(|o| o.shape == c.shape).map(|o| o.version).collect();
            same.sort_unstable();
            same.dedup();
            match kernel {
                Some(k) => versions::unforced(k, &same, best).ok(),
                None => same.last().copied(),
            }
        })
        .collect();
    for (c, runs) in cases.iter_mut().zip(runs) {
        c.default = Some(c.version) == runs && !c.shape.contains(ROW_TILE_TAG);
    }
}

/// The `versions` op whose kernel a benchmark times (the name its cases pin), if it has versions.
fn versioned_op(op: &str) -> Option<&'static str> {
    Some(match op {
        "rmsnorm_fwd" | "rmsnorm_bwd" | "rmsnorm_add_fwd" => "rmsnorm",
        "attention_fwd" => "attention_forward",
        "attention_bwd" => "attention_backward",
        "matmul_decode" => "matmul",
        "logprob_entropy_fused_fwd" | "logprob_entropy_logits_fwd" => "logprob_entropy",
        other => return versions::OPS.iter().copied().find(|&o| o == other),
    })
}

/// Ops that do not depend on the token count run once per model shape.
/// The versions a benchmark times: every listed CUDA version, or the CPU's one (numbered 1).
/// AdamW state (random) for every tensor of `layers` decoder layers of shape `ks`, with a bf16
/// copy of each weight, as a training step on CUDA updates them.
fn layer_adamw_group(ks: &KShape, layers: usize, device: Device, seed: u64) -> Result<adamw::AdamwGroup> {
    let (h, q, kv) = (ks.hidden, ks.heads * ks.head_dim, ks.kv_heads * ks.head_dim);
    let one: [(&[usize], bool); 12] = [
        (&[h], false),
        (&[q, h], true),
        (&[q], false),
        (&[kv, h], true),
        (&[kv], false),
        (&[kv, h], true),
        (&[kv], false),
        (&[h, q], true),
        (&[h], false),
        (&[ks.inter, h], true),
        (&[ks.inter, h], true),
        (&[h, ks.inter], true),
    ];
    let mut tensors = Vec::new();
    for (i, (shape, decay)) in one.iter().cycle().take(12 * layers).enumerate() {
        let s = seed ^ (i as u64 * 16);
        tensors.push(adamw::AdamwTensor {
            param: rand_tensor(shape, DType::F32, device, 0.0, 0.05, s ^ 1)?,
            grad: rand_tensor(shape, DType::F32, device, 0.0, 1e-3, s ^ 2)?,
            m: rand_tensor(shape, DType::F32, device, 0.0, 1e-4, s ^ 3)?,
            v: rand_tensor(shape, DType::F32, device, 1e-6, 1e-7, s ^ 4)?,
            bf16_out: Some(Tensor::empty(shape, DType::BF16, device)?),
            decay: *decay,
        });
    }
    Ok(adamw::AdamwGroup::new(tensors)?)
}

fn versions_on(device: Device, cuda: &'static [u32]) -> &'static [u32] {
    if device.is_cpu() {
        &[1]
    } else {
        cuda
    }
}

/// Runs `f` with `op`'s kernel pinned to version `ver` (CPU launchers ignore the pin).
fn pinned<T>(op: &'static str, ver: u32, f: impl FnOnce() -> smelt_engine::Result<T>) -> Result<()> {
    let _pin = versions::scoped(op, ver);
    f()?;
    Ok(())
}

fn token_independent(op: &str) -> bool {
    matches!(op, "adamw" | "global_norm" | "sample" | "matmul_decode")
}

fn kernels(args: KernelsArgs) -> Result<()> {
    if let Some(f) = args.op.iter().find(|f| !OPS.iter().any(|op| op_selected(op, std::slice::from_ref(f)))) {
        bail!("--op {f:?}: no such op; ops are {}", OPS.join(", "));
    }
    let shapes: Vec<KShape> = match &args.shape {
        None => KSHAPES.to_vec(),
        Some(s) => match KSHAPES.iter().find(|k| k.name == s) {
            Some(k) => vec![*k],
            None => {
                bail!(
                    "--shape {s:?}: expected one of {}",
                    KSHAPES.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
                )
            }
        },
    };
    if let Some(ts) = &args.tokens {
        if ts.is_empty() || ts.contains(&0) {
            bail!("--tokens must be positive");
        }
    }
    let device = parse_device(&args.device)?;
    // CPU: the small end only unless asked (the 7B shapes take minutes per op on 2 cores).
    let shapes: Vec<KShape> =
        if device.is_cpu() && args.shape.is_none() { shapes.into_iter().take(1).collect() } else { shapes };
    let tokens: Vec<usize> = match &args.tokens {
        Some(t) => t.clone(),
        None if device.is_cpu() => vec![if args.quick { 256 } else { 1024 }],
        None if args.quick => vec![4096],
        None => vec![1024, 4096, 16_384],
    };
    let budget = match (device.is_cpu(), args.quick) {
        (true, true) => Budget { warmup_s: 0.0, min_runs: 3, max_runs: 20, seconds: 0.25 },
        (true, false) => Budget { warmup_s: 0.1, min_runs: 5, max_runs: 50, seconds: 1.0 },
        (false, true) => Budget { warmup_s: 0.05, min_runs: 10, max_runs: 50, seconds: 0.2 },
        (false, false) => Budget { warmup_s: 0.1, min_runs: 20, max_runs: 200, seconds: 0.5 },
    };

    let header = report_header("smelt-bench-kernels", device);
    println!(
        "smelt bench kernels on {} ({}), {} CPU threads, commit {}",
        device,
        header["machine"]["device_name"].as_str().unwrap_or("?"),
        smelt_engine::cpu::num_threads(),
        header["git_commit"].as_str().unwrap_or("?")
    );
    let ceil = ceilings(device, args.quick)?;
    println!("ceiling copy:   {:>9.1} GB/s     ({})", ceil.copy_gb_s, ceil.copy_desc);
    println!("ceiling matmul: {:>9.3} TFLOP/s  ({})", ceil.matmul_tflop_s, ceil.matmul_desc);
    println!(
        "{:<27} {:<58} {:>3} {:>5} {:>11} {:>10} {:>9} {:>7}",
        "op", "shape", "ver", "flush", "median ms", "GB/s", "TFLOP/s", "%ceil"
    );
    let mut timer = Timer::new(device)?;
    let mut rows = Vec::new();
    for op in OPS.iter().copied().filter(|op| op_selected(op, &args.op)) {
        for ks in &shapes {
            let toks: &[usize] = if token_independent(op) { &tokens[..1] } else { &tokens };
            for &t in toks {
                let cases = build_cases(op, ks, t, device, args.quick, args.tokens.is_some())
                    .with_context(|| format!("setting up {op} at {} T={t}", ks.name))?;
                for mut c in cases {
                    if args.version.is_some_and(|v| v != c.version) {
                        continue;
                    }
                    let flushes: Vec<Option<Flush>> = if c.bound == Bound::Memory {
                        args.flush.iter().copied().map(Some).collect()
                    } else {
                        vec![None]
                    };
                    for flush in flushes {
                        let timing = measure(&mut timer, &mut *c.run, flush, budget)
                            .with_context(|| format!("{} at {}", c.op, c.shape))?;
                        rows.push(kernel_row(&c, ks, t, flush, &timing, &ceil));
                    }
                }
            }
        }
    }
    let mut report = header;
    report["device"] = json!(device.to_string());
    report["ceilings"] = json!({
        "copy_gb_s": ceil.copy_gb_s,
        "copy": ceil.copy_desc,
        "matmul_tflop_s": ceil.matmul_tflop_s,
        "matmul": ceil.matmul_desc,
    });
    report["timing"] = json!(format!(
        "{}, median; before each run of a memory-bound kernel, caches emptied as its row's `flush` says ({})",
        if device.is_cpu() { "wall clock per run" } else { "CUDA events around each run" },
        if device.is_cpu() {
            "read: a sum over 64 MiB; write: 64 MiB written"
        } else {
            "read: column sums over 128 MiB; write: a 64 MiB memset"
        }
    ));
    report["rows"] = Value::Array(rows);
    write_json(&args.json, &report)
}

/// Prints one timed case and returns its JSON row.
fn kernel_row(c: &Case, ks: &KShape, t: usize, flush: Option<Flush>, timing: &Timing, ceil: &Ceilings) -> Value {
    let s = timing.median_s;
    let gb_s = c.bytes / s / 1e9;
    let tflop_s = c.flops / s / 1e12;
    let pct = match c.bound {
        Bound::Memory => 100.0 * gb_s / ceil.copy_gb_s,
        Bound::Compute => 100.0 * tflop_s / ceil.matmul_tflop_s,
    };
    let flush_name = flush.map_or("none", Flush::name);
    println!(
        "{:<27} {:<58} {:>3} {:>5} {:>11.4} {:>10.1} {:>9.3} {:>6.1}%",
        c.op,
        c.shape,
        c.version,
        flush_name,
        s * 1e3,
        gb_s,
        tflop_s,
        pct
    );
    json!({
        "op": c.op,
        "shape": c.shape,
        "model_shape": ks.name,
        "tokens": t,
        "version": c.version,
        "default": c.default,
        "dtype": c.dtype.name(),
        "bound": if c.bound == Bound::Memory { "memory" } else { "compute" },
        "median_ms": s * 1e3,
        "min_ms": timing.min_s * 1e3,
        "runs": timing.runs,
        "bytes": c.bytes,
        "flops": c.flops,
        "gb_s": gb_s,
        "tflop_s": tflop_s,
        "pct_of_ceiling": pct,
        "l2_flushed": flush.is_some(),
        "flush": flush_name,
    })
}

// ---- step and generate: model shapes ------------------------------------------------------

/// Named model shapes for `--shape` (random weights, no files).
pub fn shape_config(name: &str) -> Option<Config> {
    let base = smelt_models::testing::qwen2_5_0_5b_config();
    let c = match name {
        // For tests: every piece runs, in milliseconds.
        "tiny" => Config {
            hidden_size: 128,
            intermediate_size: 256,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            vocab_size: 4096,
            max_position_embeddings: 4096,
            eos_token_ids: vec![0],
            ..base
        },
        // The CPU comparison target of issue #7: a small Qwen2 with the real vocabulary.
        "small-cpu" => Config {
            hidden_size: 256,
            intermediate_size: 1408,
            num_hidden_layers: 4,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            ..base
        },
        "qwen2.5-0.5b" => base,
        "qwen2.5-1.5b" => Config {
            hidden_size: 1536,
            intermediate_size: 8960,
            num_hidden_layers: 28,
            num_attention_heads: 12,
            num_key_value_heads: 2,
            head_dim: 128,
            ..base
        },
        "qwen2.5-7b" => Config {
            hidden_size: 3584,
            intermediate_size: 18_944,
            num_hidden_layers: 28,
            num_attention_heads: 28,
            num_key_value_heads: 4,
            head_dim: 128,
            vocab_size: 152_064,
            tie_word_embeddings: false,
            ..base
        },
        _ => return None,
    };
    Some(c)
}

const SHAPE_NAMES: &str = "tiny, small-cpu, qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b";

/// Random weights in memory with the scales of `smelt_models::testing`: norms 1 ± 0.2, biases
/// std 0.1, linear weights std 1/√fan_in, embeddings std 2/√hidden.
fn random_model(config: &Config, dtype: DType, device: Device, seed: u64) -> Result<Qwen> {
    let named = config
        .expected_tensors()
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let (center, std) = if name.ends_with("norm.weight") {
                (1.0, 0.2 / 3f32.sqrt())
            } else if name.ends_with(".bias") {
                (0.0, 0.1)
            } else if name == "model.embed_tokens.weight" || name == "lm_head.weight" {
                (0.0, 2.0 / (config.hidden_size as f32).sqrt())
            } else {
                (0.0, 1.0 / (shape[1] as f32).sqrt())
            };
            let t = rand_tensor(&shape, dtype, device, center, std, seed ^ (i as u64 * 0x9E37_79B9))?;
            Ok((name, t))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Qwen::new(config.clone(), Weights::from_named(config, named)?))
}

/// The model for `--model DIR` (its weights) or `--shape NAME` (random weights).
fn bench_model(
    model: &Option<PathBuf>,
    shape: &Option<String>,
    dtype: DType,
    device: Device,
) -> Result<(Qwen, String)> {
    match (model, shape) {
        (Some(_), Some(_)) => bail!("give --model or --shape, not both"),
        (Some(dir), None) => {
            let ckpt = open_checkpoint(dir)?;
            let opts = smelt_models::LoadOptions { dtype, device, check_finite: false };
            let weights = ckpt.load_weights(&opts)?;
            Ok((Qwen::new(ckpt.config.clone(), weights), dir.display().to_string()))
        }
        (None, s) => {
            let name = s.as_deref().unwrap_or("small-cpu");
            let config =
                shape_config(name).with_context(|| format!("--shape {name:?}: expected one of {SHAPE_NAMES}"))?;
            Ok((random_model(&config, dtype, device, 42)?, name.to_string()))
        }
    }
}

fn config_json(c: &Config) -> Value {
    json!({
        "model_type": c.model_type.name(),
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.qkv_bias,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings,
        "num_parameters": c.num_parameters(),
    })
}

/// Dense bf16 peak of known GPUs (TFLOP/s), for MFU.
fn nominal_bf16_peak(device: Device) -> Option<(f64, String)> {
    let name = device_name(device);
    if name.contains("H100") || name.contains("H200") || name.contains("GH200") {
        Some((989.0, format!("{name}: 989 TFLOP/s dense bf16 (SXM datasheet)")))
    } else if name.contains("A100") {
        Some((312.0, format!("{name}: 312 TFLOP/s dense bf16 (datasheet)")))
    } else {
        None
    }
}

// ---- step -------------------------------------------------------------------------------

#[derive(clap::Args, Debug)]
pub struct StepArgs {
    /// A Hugging Face model directory (its real weights).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A named shape with random weights: tiny, small-cpu (default), qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b.
    #[arg(long)]
    pub shape: Option<String>,
    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    pub seq: usize,
    /// The first this many tokens of each sequence are its prompt: no loss tokens, so the head
    /// skips them (as in RL, where only completions are trained on).
    #[arg(long, default_value_t = 0)]
    pub prompt_len: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute dtype: f32 (CPU default) or bf16 (CUDA default).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Timed steps.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Synchronize after each phase on CUDA so the phase times are exact.
    #[arg(long)]
    pub phases: bool,
    /// After the timed steps, run one more with every kernel launch, cuBLAS call, copy and
    /// driver allocation timed by CUDA events, and print (and write to the JSON) the time per
    /// operation (CUDA only).
    #[arg(long)]
    pub profile: bool,
    /// Dense bf16 peak for MFU in TFLOP/s (default: the datasheet value of a known GPU).
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

fn step(args: StepArgs) -> Result<()> {
    if args.batch == 0 || args.seq < 2 {
        bail!("--batch must be >= 1 and --seq >= 2 (got {} and {})", args.batch, args.seq);
    }
    if args.prompt_len + 1 >= args.seq {
        bail!("--prompt-len {} leaves no completion in --seq {}", args.prompt_len, args.seq);
    }
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if let Some(p) = args.peak_tflops {
        if !(p.is_finite() && p > 0.0) {
            bail!("--peak-tflops {p} must be positive");
        }
    }
    let device = parse_device(&args.device)?;
    if args.profile && device.is_cpu() {
        bail!("--profile times CUDA operations: it needs --device cuda");
    }
    let dtype = parse_dtype(args.dtype.as_deref(), device)?;
    let (model, label) = bench_model(&args.model, &args.shape, dtype, device)?;
    let c = model.config.clone();
    if args.seq > c.max_position_embeddings {
        bail!("--seq {} exceeds max_position_embeddings = {}", args.seq, c.max_position_embeddings);
    }
    let (b, t) = (args.batch, args.seq);
    let mut rng = Rng::new(args.seed ^ 0x5EED);
    let seqs: Vec<Vec<u32>> = (0..b).map(|i| rand_ids(t, c.vocab_size, args.seed * 1000 + i as u64)).collect();
    let mut advantages = Vec::with_capacity(b * t);
    for _ in 0..b {
        advantages.extend(std::iter::repeat_n(rng.normal() as f32, t));
    }
    // Entry j predicts token j+1: the completion's tokens are predicted from entry p-1 on.
    let p = args.prompt_len;
    let mask: Vec<f32> = (0..b * t).map(|i| if (i % t) + 1 >= p { 1.0 } else { 0.0 }).collect();
    let batch =
        StepBatch { packed: Packed::new(&seqs), advantages, mask, logp_old: None, logp_ref: None, supervised: false };
    let cfg = StepConfig { sync_phases: device.is_cpu() || args.phases, ..StepConfig::default() };
    let mut policy = PolicyStep::new(&model, cfg)?;
    let model_bytes: usize = model.weights.named_tensors().iter().map(|(_, t)| t.size_in_bytes()).sum();
    synchronize(device)?;
    let rss_before = proc_mem().0;
    reset_peak(device);

    eprintln!(
        "bench step: {label} ({} params, {dtype}) on {device}, batch {b} × seq {t}, {} warm-up + {} timed steps",
        c.num_parameters(),
        args.warmup,
        args.steps
    );
    for _ in 0..args.warmup {
        policy.step(&model, &batch)?;
    }
    let mut times = Vec::new();
    let mut phases: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut last = None;
    for _ in 0..args.steps {
        let t0 = Instant::now();
        let s = policy.step(&model, &batch)?;
        synchronize(device)?;
        times.push(t0.elapsed().as_secs_f64());
        for (k, v) in s.phases.named() {
            phases.entry(k).or_default().push(v);
        }
        last = Some(s);
    }
    let (peak, peak_src) = peak_bytes(device);
    let s = last.context("no step ran")?;
    let profile = if args.profile {
        Some(profile_run(device, "one step", || Ok(policy.step(&model, &batch).map(|_| ())?))?)
    } else {
        None
    };
    let med = median(&times);
    let tokens = (b * t) as f64;
    let flops = train_step_flops(&c, &vec![t; b]);
    let tflop_s = flops / med / 1e12;
    let peak_flops = if device.is_cpu() {
        None
    } else {
        args.peak_tflops.map(|p| (p, "--peak-tflops".to_string())).or_else(|| nominal_bf16_peak(device))
    };
    let mfu = peak_flops.as_ref().map(|(p, _)| tflop_s / p);
    let phases_ms: BTreeMap<&str, f64> = phases.iter().map(|(k, v)| (*k, median(v) * 1e3)).collect();

    let prompt = if p > 0 { format!(" (prompt {p})") } else { String::new() };
    println!(
        "{label}: batch {b} × seq {t}{prompt} on {device} ({dtype}), {} threads",
        smelt_engine::cpu::num_threads()
    );
    println!(
        "  ms/step     {:>10.1}   (median of {}; all: {:?})",
        med * 1e3,
        times.len(),
        times.iter().map(|x| (x * 1e4).round() / 10.0).collect::<Vec<_>>()
    );
    println!("  tokens/s    {:>10.1}", tokens / med);
    println!("  TFLOP/s     {:>10.3}   ({:.3e} FLOP/step: 6·params·tokens + causal attention)", tflop_s, flops);
    match (&mfu, &peak_flops) {
        (Some(m), Some((_, src))) => println!("  MFU         {:>9.1}%   vs {src}", m * 100.0),
        _ => println!("  MFU         n/a (CPU, or unknown GPU: pass --peak-tflops)"),
    }
    println!("  peak memory {:>10}   ({peak_src})", peak.map(|p| gib(p as f64)).unwrap_or_else(|| "n/a".into()));
    let ph: Vec<String> = phases_ms.iter().map(|(k, v)| format!("{k} {v:.1}")).collect();
    println!(
        "  phases ms   {}{}",
        ph.join(", "),
        if device.is_cpu() || args.phases { "" } else { " (asynchronous: pass --phases)" }
    );
    println!("  loss {:.5}, grad norm {:.4}, entropy {:.3}", s.loss, s.grad_norm, s.mean_entropy);

    let mut report = report_header("smelt-bench-step", device);
    report["model"] = json!(label);
    report["config"] = config_json(&c);
    report["device"] = json!(device.to_string());
    report["dtype"] = json!(dtype.name());
    report["batch"] = json!(b);
    report["seq"] = json!(t);
    report["prompt_len"] = json!(p);
    report["tokens_per_step"] = json!(b * t);
    report["steps"] = json!(args.steps);
    report["warmup"] = json!(args.warmup);
    report["threads"] = json!(smelt_engine::cpu::num_threads());
    report["ms_per_step"] = json!(med * 1e3);
    report["ms_per_step_all"] = json!(times.iter().map(|x| x * 1e3).collect::<Vec<_>>());
    report["tokens_per_s"] = json!(tokens / med);
    report["flops_per_step"] = json!(flops);
    report["tflop_s"] = json!(tflop_s);
    report["mfu"] = json!(mfu);
    report["mfu_peak_tflops"] = json!(peak_flops.as_ref().map(|p| p.0));
    report["mfu_peak_source"] = json!(peak_flops.as_ref().map(|p| p.1.clone()));
    report["peak_bytes"] = json!(peak);
    report["peak_bytes_source"] = json!(peak_src);
    report["rss_before_bytes"] = json!(rss_before);
    report["model_bytes"] = json!(model_bytes);
    report["optimizer_state_bytes"] = json!(policy.state_bytes());
    report["phases_ms"] = json!(phases_ms);
    report["phases_synchronized"] = json!(device.is_cpu() || args.phases);
    report["profile"] = json!(profile);
    report["loss"] = json!(s.loss);
    report["grad_norm"] = json!(s.grad_norm);
    report["step_definition"] = json!(
        "forward, fused logprob+entropy head, GRPO loss (dapo aggregation, eps 0.2/0.28, on-policy), backward, \
         global grad norm clip 1.0, AdamW (lr 1e-6, wd 0.01 except norms and biases) over all parameters; the \
         head runs on loss tokens only (not a sequence's last token, nor its first prompt_len - 1); \
         FLOPs count every token (6·params·tokens + attention) whatever the head skips"
    );
    write_json(&args.json, &report)
}

/// Runs `work` once more with every device operation timed (`smelt_engine::cuda::profile`):
/// prints the operations taking the most GPU time and returns all of them as JSON, with the
/// wall time, so the gap between the wall time and the summed GPU time (the GPU waiting for the
/// host) shows too. `what` names the work in the printout ("one step", "one decode step").
#[cfg(feature = "cuda")]
fn profile_run(device: Device, what: &str, work: impl FnOnce() -> Result<()>) -> Result<Value> {
    use smelt_engine::cuda::profile;
    let Device::Cuda(i) = device else { bail!("--profile needs a CUDA device (got {device})") };
    let dev = smelt_engine::cuda::device(i)?;
    smelt_kernels::emu::take_dry_launches();
    let ((run, wall_ms), rows) = profile::record(&dev, || {
        let t0 = Instant::now();
        let run = work().and_then(|_| Ok(synchronize(device)?));
        (run, t0.elapsed().as_secs_f64() * 1e3)
    })?;
    run?;
    let gpu_ms: f64 = rows.iter().filter_map(|r| r.gpu_ms).sum();
    let host_ms: f64 = rows.iter().map(|r| r.host_ms).sum();
    let calls: usize = rows.iter().map(|r| r.calls).sum();
    let timed = rows.iter().any(|r| r.gpu_ms.is_some());
    let gpu = if timed { format!("{gpu_ms:.1} ms GPU") } else { "no GPU times (the emulator has no events)".into() };
    println!(
        "  profile     {what}: {wall_ms:.1} ms wall, {gpu} over {calls} operations, {host_ms:.1} ms host in the calls"
    );
    println!("  {:<58} {:>6} {:>10} {:>6} {:>10}", "operation", "calls", "GPU ms", "%GPU", "host ms");
    for r in rows.iter().take(30) {
        let g = r.gpu_ms.map(|g| format!("{g:10.2}")).unwrap_or_else(|| format!("{:>10}", "-"));
        let pct = r.gpu_ms.map(|g| format!("{:5.1}%", 100.0 * g / gpu_ms.max(1e-9))).unwrap_or_default();
        println!("  {:<58} {:>6} {g} {pct:>6} {:>10.2}", r.name, r.calls, r.host_ms);
    }
    if rows.len() > 30 {
        println!("  … {} more operations in the JSON report", rows.len() - 30);
    }
    let rows: Vec<Value> = rows
        .iter()
        .map(|r| json!({"name": r.name, "calls": r.calls, "gpu_ms": r.gpu_ms, "host_ms": r.host_ms}))
        .collect();
    let gpu_ms = timed.then_some(gpu_ms);
    let mut report = json!({"what": what, "wall_ms": wall_ms, "gpu_ms": gpu_ms, "host_ms": host_ms, "calls": calls, "operations": rows});
    if smelt_engine::cuda::emu::dry() {
        report["launch_fill"] =
            print_launch_fill(&smelt_kernels::emu::launch_fill(&smelt_kernels::emu::take_dry_launches()));
    }
    Ok(report)
}

/// Prints a dry run's launches per kernel (`SMELT_EMU_DRY=1`): how they would fill an H100.
#[cfg(feature = "cuda")]
fn print_launch_fill(fill: &[smelt_kernels::emu::LaunchFill]) -> Value {
    let sms = smelt_kernels::emu::H100_SMS;
    println!("  launch fill (dry run; waves = blocks / (resident blocks per SM × {sms} SMs), sm_90 resources)");
    println!(
        "  {:<52} {:>6} {:>7} {:>5} {:>6} {:>17} {:>15}",
        "kernel", "calls", "threads", "regs", "blk/SM", "blocks", "waves"
    );
    let opt = |v: Option<u32>| v.map_or("-".into(), |v| v.to_string());
    let range = |(lo, hi): (f64, f64)| if lo == hi { format!("{lo:.2}") } else { format!("{lo:.2}–{hi:.2}") };
    for f in fill {
        let blocks =
            if f.blocks.0 == f.blocks.1 { f.blocks.0.to_string() } else { format!("{}–{}", f.blocks.0, f.blocks.1) };
        let waves = f.waves.map_or("-".into(), range);
        println!(
            "  {:<52} {:>6} {:>7} {:>5} {:>6} {blocks:>17} {waves:>15}",
            f.kernel,
            f.launches,
            f.threads,
            opt(f.registers),
            opt(f.blocks_per_sm)
        );
    }
    json!(fill
        .iter()
        .map(|f| json!({"kernel": f.kernel, "launches": f.launches, "threads": f.threads, "registers": f.registers,
            "blocks_per_sm": f.blocks_per_sm, "blocks": [f.blocks.0, f.blocks.1], "waves": f.waves.map(|w| [w.0, w.1])}))
        .collect::<Vec<_>>())
}

#[cfg(not(feature = "cuda"))]
fn profile_run(device: Device, _: &str, _: impl FnOnce() -> Result<()>) -> Result<Value> {
    bail!("--profile needs a CUDA device and a build with the `cuda` feature (got {device})")
}

// ---- generate ---------------------------------------------------------------------------

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// A named shape with random weights (see `smelt bench step --help`).
    #[arg(long)]
    pub shape: Option<String>,
    /// Prompts decoded together.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value_t = 64)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 32)]
    pub new_tokens: usize,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long)]
    pub dtype: Option<String>,
    /// Timed runs (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Untimed runs of every timed mode first, on the same lengths (the first is reported on its
    /// own: it meets every batch size first)
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Completions per prompt: the batch is --batch prompts × --samples sequences, and each
    /// prompt is prefilled once for all its samples (what `generate` does); the prefill of every
    /// sample's own copy is timed beside it
    #[arg(long, default_value_t = 1)]
    pub samples: usize,
    /// Sequence i of B ends after ceil(n·(i+1)/B) new tokens (n = --new-tokens): lengths spread
    /// evenly, as RL rollouts end at different lengths. Reports the new tokens per second with
    /// finished sequences leaving the batch (what `generate` does) and, side by side, with every
    /// sequence decoded until the longest ends
    #[arg(long)]
    pub spread: bool,
    /// Also time the same generations decoding through CUDA graphs (`smelt_models::DecodeGraphs`,
    /// experimental; each generation captures its own), side by side with eager decoding (CUDA only)
    #[arg(long)]
    pub graphs: bool,
    /// After the timed runs, prefill once more and time every kernel launch, cuBLAS call, copy and
    /// driver allocation of one decode iteration (logits, sample, token download, decode step) by
    /// CUDA events, and print (and write to the JSON) the time per operation (CUDA only)
    #[arg(long)]
    pub profile: bool,
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One greedy generation as `smelt_models::generate` runs it (prefill, then per token: logits →
/// sample → decode step) of `samples` sequences per prompt (`lengths.len()` in all, sharing
/// their prompt's prefill), sequence b ending after `lengths[b]` new tokens instead of on stop
/// tokens. With `drop_finished` a finished sequence leaves the decode batch (as in `generate`);
/// without, every row is decoded until the longest sequence ends. With `graphs`, decode steps
/// after the first run through CUDA graphs (captured by this generation), as `generate` does
/// with graphs on. Returns (time to first token, total) s.
/// Bytes a generation's decode steps must read at least: every weight once per step (the
/// lm_head is the embedding table when tied; a separate table is read only by its rows, not
/// counted), and each active row's K/V cache including the position it appends. Row i (of
/// `lengths[i]` new tokens, the first from the prefill) decodes its steps 1..lengths[i], at
/// step s with `prompt + s` cached positions.
fn decode_bytes(c: &Config, dtype_bytes: usize, prompt: usize, lengths: &[usize]) -> f64 {
    let untied_table = if c.tie_word_embeddings { 0 } else { c.vocab_size * c.hidden_size };
    let weights = (c.num_parameters() - untied_table) as f64;
    let steps = lengths.iter().max().map_or(0, |l| l.saturating_sub(1)) as f64;
    let kv_per_position = (2 * c.kv_dim() * c.num_hidden_layers) as f64;
    let positions: f64 = lengths.iter().map(|&l| (1..l).map(|s| (prompt + s) as f64).sum::<f64>()).sum();
    (weights * steps + kv_per_position * positions) * dtype_bytes as f64
}

fn timed_generation(
    model: &Qwen,
    prompts: &[Vec<u32>],
    samples: usize,
    lengths: &[usize],
    drop_finished: bool,
    graphs: bool,
) -> Result<(f64, f64)> {
    let dev = model.device();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let new_tokens = lengths.iter().copied().max().unwrap_or(0);
    let mut cache = model.new_kv_cache(lengths.len(), longest + new_tokens)?;
    let greedy = sample::SamplingConfig::greedy();
    synchronize(dev)?;
    let t0 = Instant::now();
    let mut hidden = model.prefill_samples(prompts, samples, &mut cache)?;
    let mut first = 0.0;
    let mut active: Vec<u32> = (0..lengths.len() as u32).collect();
    #[cfg(feature = "cuda")]
    let mut graphs = graphs.then(|| smelt_models::DecodeGraphs::new(&greedy, 0));
    #[cfg(not(feature = "cuda"))]
    if graphs {
        bail!("--graphs needs a build with the `cuda` feature");
    }
    let mut drawn: Option<Vec<u32>> = None;
    for step in 0..new_tokens {
        let tokens = match drawn.take() {
            Some(t) => t,
            None => {
                let logits = model.logits(&hidden)?;
                sample::sample(&logits, &greedy, 0, step as u64)?.tokens.to_vec::<u32>()?
            }
        };
        if step == 0 {
            first = t0.elapsed().as_secs_f64();
        }
        if step + 1 == new_tokens {
            break;
        }
        let (slots, next): (Vec<u32>, Vec<u32>) = active
            .iter()
            .zip(&tokens)
            .filter(|&(&b, _)| !drop_finished || lengths[b as usize] > step + 1)
            .map(|(&b, &t)| (b, t))
            .unzip();
        #[cfg(feature = "cuda")]
        if let Some(g) = graphs.as_mut().filter(|_| step > 0) {
            let spare: Vec<u32> = (0..lengths.len() as u32).filter(|b| !slots.contains(b)).collect();
            drawn = Some(g.decode_sample(model, &mut cache, &slots, &slots, &next, &spare, step as u64 + 1)?.0);
            active = slots;
            continue;
        }
        hidden = model.decode_slots(&slots, &next, &mut cache)?;
        active = slots;
    }
    synchronize(dev)?;
    Ok((first, t0.elapsed().as_secs_f64()))
}

fn generate(args: GenerateArgs) -> Result<()> {
    if args.batch == 0 || args.samples == 0 || args.prompt_len == 0 || args.new_tokens < 2 || args.runs == 0 {
        bail!("--batch, --samples, --prompt-len and --runs must be >= 1 and --new-tokens >= 2");
    }
    let device = parse_device(&args.device)?;
    let dtype = parse_dtype(args.dtype.as_deref(), device)?;
    let (model, label) = bench_model(&args.model, &args.shape, dtype, device)?;
    let c = model.config.clone();
    if args.prompt_len + args.new_tokens > c.max_position_embeddings {
        bail!(
            "--prompt-len {} + --new-tokens {} exceed max_position_embeddings = {}",
            args.prompt_len,
            args.new_tokens,
            c.max_position_embeddings
        );
    }
    if (args.profile || args.graphs) && device.is_cpu() {
        bail!("--profile and --graphs are about CUDA: they need --device cuda");
    }
    let (np, ns, p, n) = (args.batch, args.samples, args.prompt_len, args.new_tokens);
    let b = np * ns;
    let prompts: Vec<Vec<u32>> = (0..np).map(|i| rand_ids(p, c.vocab_size, args.seed * 1000 + i as u64)).collect();
    let lengths: Vec<usize> = (0..b).map(|i| if args.spread { (n * (i + 1)).div_ceil(b) } else { n }).collect();
    reset_peak(device);
    // Every mode timed below is first run untimed on the same lengths: the first run to meet a
    // batch size pays for its allocator size classes, cuBLAS's choice of kernels and the kernel
    // modules, and with --spread every step has a batch size of its own. The first of these
    // runs is reported on its own (`first_run_total_ms`).
    let mut first_run_ms = None;
    for _ in 0..args.warmup {
        let t = timed_generation(&model, &prompts, ns, &lengths, true, false)?.1;
        first_run_ms.get_or_insert(t * 1e3);
        if args.spread {
            timed_generation(&model, &prompts, ns, &lengths, false, false)?;
        }
        // A failing graph path is reported by the timed run below.
        if args.graphs {
            timed_generation(&model, &prompts, ns, &lengths, true, true).ok();
        }
    }
    let timed_as = |drop_finished: bool, graphs: bool| -> Result<(f64, f64)> {
        let (mut ttft, mut total) = (Vec::new(), Vec::new());
        for _ in 0..args.runs {
            let (f, t) = timed_generation(&model, &prompts, ns, &lengths, drop_finished, graphs)?;
            ttft.push(f);
            total.push(t);
        }
        Ok((median(&ttft), median(&total)))
    };
    let timed = |drop_finished: bool| timed_as(drop_finished, false);
    let (f, t) = timed(true)?;
    // A failing graph path (experimental) is reported beside the eager figures, not fatal.
    let (graphs, graphs_error) = match args.graphs.then(|| timed_as(true, true)) {
        Some(Ok(g)) => (Some(g), None),
        Some(Err(e)) => {
            eprintln!("bench generate: decoding with CUDA graphs failed: {e:#}");
            (None, Some(format!("{e:#}")))
        }
        None => (None, None),
    };
    // The same lengths with no row ever leaving the batch: what dropping finished rows saves.
    let full_batch_ms = if args.spread { Some(timed(false)?.1 * 1e3) } else { None };
    // Every sample's copy of its prompt prefilled on its own: what sharing the prefill saves.
    let unshared_prefill_ms = if ns > 1 {
        let expanded: Vec<Vec<u32>> = prompts.iter().flat_map(|q| vec![q.clone(); ns]).collect();
        let mut ms = Vec::new();
        for _ in 0..args.runs {
            let mut cache = model.new_kv_cache(b, p)?;
            synchronize(device)?;
            let t0 = Instant::now();
            model.prefill(&expanded, &mut cache)?;
            synchronize(device)?;
            ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        Some(median(&ms))
    } else {
        None
    };
    let (peak, peak_src) = peak_bytes(device);
    let profile = if args.profile {
        let mut cache = model.new_kv_cache(b, p + 2)?;
        let hidden = model.prefill_samples(&prompts, ns, &mut cache)?;
        Some(profile_run(device, "one decode iteration", || {
            let logits = model.logits(&hidden)?;
            let s = sample::sample(&logits, &sample::SamplingConfig::greedy(), 0, 0)?;
            model.decode_step(&s.tokens.to_vec::<u32>()?, &mut cache)?;
            Ok(())
        })?)
    } else {
        None
    };
    // The decode's physical bound: the bytes its steps must read, at the copy bandwidth measured
    // here (after the timed runs, so they ran on a device nothing else had touched).
    let (copy_gb_s, copy_desc) = copy_ceiling(device, true)?;
    let bound_bytes = decode_bytes(&c, dtype.size_in_bytes(), p, &lengths);
    let bound_ms = bound_bytes / copy_gb_s / 1e6;
    let new_total: usize = lengths.iter().sum();
    let prefill_tps = (np * p) as f64 / f;
    let decode_tps = (new_total - b) as f64 / (t - f);
    let tps = new_total as f64 / t;
    let spread = if args.spread { format!(", lengths {}..={n} (--spread)", lengths[0]) } else { String::new() };
    let batch = if ns > 1 { format!("{np} prompts × {ns} samples") } else { format!("batch {b}") };
    println!("{label}: {batch}, prompt {p}, {n} new tokens{spread} on {device} ({dtype}), greedy");
    println!("  prefill  {:>10.1} tokens/s   (time to first token {:.1} ms)", prefill_tps, f * 1e3);
    if let Some(ms) = unshared_prefill_ms {
        println!("  prefill of each sample's own copy of its prompt: {ms:.1} ms (shared: once per prompt, then cache copies)");
    }
    println!(
        "  decode   {:>10.1} tokens/s   ({:.2} ms per step of up to {b} tokens)",
        decode_tps,
        (t - f) / (n - 1) as f64 * 1e3
    );
    println!("  overall  {:>10.1} new tokens/s ({:.1} ms total)", tps, t * 1e3);
    let graphs_decode_tps = graphs.map(|(gf, gt)| (new_total - b) as f64 / (gt - gf));
    if let (Some((gf, gt)), Some(gtps)) = (graphs, graphs_decode_tps) {
        println!(
            "  with CUDA graphs: decode {gtps:>10.1} tokens/s ({:.2} ms per step, {:.1} ms total): {:.2}× eager decoding",
            (gt - gf) / (n - 1) as f64 * 1e3,
            gt * 1e3,
            gtps / decode_tps
        );
    }
    let pct_of_bound = |decode_s: f64| 100.0 * bound_ms / (decode_s * 1e3);
    let graphs_pct = graphs.map(|(gf, gt)| pct_of_bound(gt - gf));
    println!(
        "  decode bound: {} of weights and K/V read over the {} decode steps, {bound_ms:.2} ms at the copy \
         ceiling {copy_gb_s:.1} GB/s ({copy_desc}): eager at {:.1} %{}",
        gib(bound_bytes),
        lengths.iter().max().map_or(0, |l| l - 1),
        pct_of_bound(t - f),
        graphs_pct.map(|g| format!(", graphs at {g:.1} %")).unwrap_or_default()
    );
    if let Some(full) = full_batch_ms {
        println!(
            "  every row decoded to the end: {full:.1} ms total ({:.1} new tokens/s); dropping finished rows: {:.2}× faster",
            new_total as f64 / full * 1e3,
            full / (t * 1e3)
        );
    }
    if let Some(ms) = first_run_ms {
        println!("  first (untimed) run {ms:.1} ms: {:.2}× the median run's time", ms / (t * 1e3));
    }
    println!("  peak memory {} ({peak_src})", peak.map(|p| gib(p as f64)).unwrap_or_else(|| "n/a".into()));
    let mut report = report_header("smelt-bench-generate", device);
    report["model"] = json!(label);
    report["config"] = config_json(&c);
    report["device"] = json!(device.to_string());
    report["dtype"] = json!(dtype.name());
    report["batch"] = json!(b);
    report["prompt_len"] = json!(p);
    report["new_tokens"] = json!(n);
    report["samples"] = json!(ns);
    report["unshared_prefill_ms"] = json!(unshared_prefill_ms);
    report["spread"] = json!(args.spread);
    report["new_tokens_total"] = json!(new_total);
    report["full_batch_total_ms"] = json!(full_batch_ms);
    report["first_run_total_ms"] = json!(first_run_ms);
    report["warmup"] = json!(args.warmup);
    report["graphs_total_ms"] = json!(graphs.map(|g| g.1 * 1e3));
    report["graphs_decode_tokens_per_s"] = json!(graphs_decode_tps);
    report["graphs_error"] = json!(graphs_error);
    report["runs"] = json!(args.runs);
    report["threads"] = json!(smelt_engine::cpu::num_threads());
    report["ttft_ms"] = json!(f * 1e3);
    report["total_ms"] = json!(t * 1e3);
    report["prefill_tokens_per_s"] = json!(prefill_tps);
    report["decode_tokens_per_s"] = json!(decode_tps);
    report["tokens_per_s"] = json!(tps);
    report["decode_bound_bytes"] = json!(bound_bytes);
    report["copy_gb_s"] = json!(copy_gb_s);
    report["decode_bound_ms"] = json!(bound_ms);
    report["decode_pct_of_bound"] = json!(pct_of_bound(t - f));
    report["graphs_decode_pct_of_bound"] = json!(graphs_pct);
    report["peak_bytes"] = json!(peak);
    report["peak_bytes_source"] = json!(peak_src);
    report["profile"] = json!(profile);
    report["definition"] = json!(
        "greedy, no stop tokens (with spread, sequence i of B ends after ceil(new_tokens·(i+1)/B) \
         tokens and leaves the batch); prefill = time to first token (prefill + lm_head + sample); \
         decode = the remaining new tokens over the remaining time; tokens_per_s = all new tokens \
         over the total time; full_batch_total_ms = the same lengths with every row decoded to the end; \
         every mode is run `warmup` times untimed first, and first_run_total_ms is the first of \
         them (eager, rows leaving): the run that meets each batch size first; \
         batch = prompts × samples sequences; prefill tokens/s counts each prompt once (its samples \
         share it); unshared_prefill_ms = prefill alone of every sample's own copy of its prompt; \
         graphs_* = the same generations with decode steps after the first replayed from CUDA graphs \
         (captures included), graphs_error when that path failed; decode_bound_bytes = what the \
         decode steps must read at least (every weight once per step, the lm_head included and a \
         separate embedding table's rows not counted, plus each active row's K/V cache), \
         decode_bound_ms = that over copy_gb_s (a device copy measured in the same run), \
         decode_pct_of_bound = decode_bound_ms over the decode time (eager; graphs_ for graphs)"
    );
    write_json(&args.json, &report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The decode bound counts every weight once per step (a tied table once, as the lm_head; an
    /// untied table's rows not at all) and each row's cache positions at each of its steps.
    #[test]
    fn decode_bytes_counts_weights_per_step_and_each_rows_cache() {
        let mut c = shape_config("tiny").expect("tiny");
        assert!(c.tie_word_embeddings);
        let kv = (2 * c.kv_dim() * c.num_hidden_layers) as f64;
        // Two rows of 3 and 1 new tokens after a 5-token prompt: 2 decode steps, row 0 at 6 and
        // 7 cached positions, row 1 none (its only token came from the prefill).
        let want = (2.0 * c.num_parameters() as f64 + kv * 13.0) * 2.0;
        assert_eq!(decode_bytes(&c, 2, 5, &[3, 1]), want);
        let tied = decode_bytes(&c, 4, 5, &[3, 3]);
        c.tie_word_embeddings = false;
        // Untied: the lm_head is its own tensor, the table's rows are not counted: the same bytes.
        assert_eq!(decode_bytes(&c, 4, 5, &[3, 3]), tied);
        assert_eq!(decode_bytes(&c, 4, 5, &[1]), 0.0);
    }

    /// The rows marked default are what an unforced call runs: per shape the newest version,
    /// the attention forward at d 64 on CUDA its v2, never the head's row-tile variant.
    #[test]
    fn defaults_are_what_unforced_calls_run() {
        let case = |op: &'static str, shape: &str, version: u32| Case {
            op,
            shape: shape.into(),
            version,
            dtype: DType::BF16,
            bytes: 0.0,
            flops: 0.0,
            bound: Bound::Compute,
            run: Box::new(|| Ok(())),
            default: false,
        };
        let marked = |mut cases: Vec<Case>, d: usize, device: Device| {
            mark_defaults(&mut cases, d, device);
            cases.iter().map(|c| c.default).collect::<Vec<_>>()
        };
        let attn = || (1..=3).map(|v| case("attention_fwd", "x", v)).collect::<Vec<_>>();
        assert_eq!(marked(attn(), 64, Device::Cuda(0)), [false, true, false]);
        assert_eq!(marked(attn(), 128, Device::Cuda(0)), [false, false, true]);
        let head = vec![case("h", "a", 3), case("h", "a", 4), case("h", "a row tile 1024", 4)];
        assert_eq!(marked(head, 64, Device::Cuda(0)), [false, true, false]);
        let adamw = vec![case("adamw", "one", 1), case("adamw", "group", 1), case("adamw", "group", 2)];
        assert_eq!(marked(adamw, 64, Device::Cpu), [true, false, true]);
        let decode = (1..=3).map(|v| case("attention_decode", "x", v)).collect::<Vec<_>>();
        let want: Vec<bool> = (1..=3).map(|v| v == attention::DECODE_VERSION_LIMIT).collect();
        assert_eq!(marked(decode, 64, Device::Cuda(0)), want);
        // A pinned version (as while a case runs) does not move the mark.
        let _pin = versions::scoped("rmsnorm", 1);
        let norm = (1..=3).map(|v| case("rmsnorm_bwd", "x", v)).collect::<Vec<_>>();
        assert_eq!(marked(norm, 64, Device::Cuda(0)), [false, false, true]);
    }
}
