//! The CUDA emulator's kernel side (`SMELT_CUDA_EMULATOR=1`): each `kernels/cuda/<op>.cu` is
//! compiled by the host C++ compiler against `kernels/emu/cuda_emu.hpp` into a shared library
//! (cached on disk like the NVRTC images), loaded once, and its kernels launched with the same
//! grid, block and argument list the launcher would give the driver.
//!
//! The header's opening comment says what the emulator checks and what it cannot. In short: a
//! kernel that passes its device test here has the right indexing, synchronisation and
//! launcher/kernel signature; whether it is right on a GPU is still for the GPU to say.
//!
//! Build: `$CXX` (default `g++`), C++17, `-O2 -ffp-contract=off` (so no FMA contraction: the
//! CPU results do not depend on the compiler's choices), `-fvisibility=hidden` (only the launch
//! wrappers are exported), and either `-fsanitize=alignment` (a load or store through a pointer
//! misaligned for its type, e.g. a 16-byte vector load at an 8-byte offset, fails the launch as
//! it would fault on a GPU; the header implements the callback, libubsan is never linked) or,
//! with `SMELT_EMU_RACECHECK=1`, `-fsanitize=thread` (GCC's flags), whose callbacks are the
//! header's race detector (see [`racecheck`]).
//!
//! Besides what the header checks, each launch is checked here against the kernel's registers
//! and shared memory (from ptxas, through NVRTC) and, after it ran, for writes past the end of
//! the tensors it was given (the device side's canaries, `smelt_engine::cuda::emu`).

use std::collections::HashMap;
use std::ffi::c_char;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};

use crate::cuda::{cache_dir, compile_resources, fnv1a_128, Arg, KernelResources, LaunchCfg};
use crate::{Error, KernelSource, Result, COMMON_CUH};

/// The emulation header, prepended to every source.
pub const EMU_HPP: &str = include_str!("../emu/cuda_emu.hpp");

type LaunchFn = unsafe extern "C" fn(*const u64, *const u8, i32, *const u32, *const u32, *mut c_char, usize) -> i32;

struct Lib {
    lib: libloading::Library,
    path: PathBuf,
}

fn compiler() -> String {
    std::env::var("CXX").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "g++".into())
}

/// `SMELT_EMU_RACECHECK=1`: kernels are built with the race detector (see the header).
pub fn racecheck() -> bool {
    std::env::var("SMELT_EMU_RACECHECK").is_ok_and(|v| v == "1")
}

/// Compile flags: the race detector's build instruments every memory access with
/// `-fsanitize=thread`, whose callbacks the header defines, so the objects are compiled and then
/// linked without the sanitizer (libtsan is never linked or loaded).
fn flags() -> Vec<String> {
    let mut f: Vec<String> =
        ["-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off", "-fno-strict-aliasing", "-w"]
            .map(String::from)
            .to_vec();
    if racecheck() {
        f.extend(
            ["-fsanitize=thread", "--param", "tsan-instrument-func-entry-exit=0", "-DSMELT_EMU_RACECHECK"]
                .map(String::from),
        );
    } else {
        // Every load and store checks its pointer's alignment (the header's handler fails the
        // launch: on a GPU a misaligned vector access is a "misaligned address" fault). Not in
        // the race detector's build: there its checks keep the detector's own library calls
        // from being inlined, and those calls, instrumented, re-enter the detector.
        f.push("-fsanitize=alignment".into());
    }
    f
}

fn run(cmd: &mut Command, what: &str) -> Result<Vec<u8>> {
    let out = cmd.output().map_err(|e| {
        Error::CudaUnavailable(format!(
            "the CUDA emulator needs a C++17 compiler: running `{}`: {e} (set CXX)",
            compiler()
        ))
    })?;
    if !out.status.success() {
        let log = String::from_utf8_lossy(&out.stderr);
        let head: String = log.lines().take(40).collect::<Vec<_>>().join("\n");
        return Err(Error::Cuda { op: "emulator compile", detail: format!("{what}: {}\n{head}", out.status) });
    }
    Ok(out.stdout)
}

/// The `extern "C" __global__` kernels in `file` (expanded by the preprocessor, so the kernels
/// that macros declare are found too), each with its `__launch_bounds__` thread count as a C++
/// expression ("0" when it declares none).
fn kernel_names(file: &Path) -> Result<Vec<(String, String)>> {
    let pre = run(
        Command::new(compiler()).args(["-std=c++17", "-E", "-P", "-DSMELT_EMU_SCAN"]).arg(file),
        &format!("preprocessing {}", file.display()),
    )?;
    let text = String::from_utf8_lossy(&pre);
    let mut kernels: Vec<(String, String)> = Vec::new();
    for part in text.split("__smelt_kernel__").skip(1) {
        let mut rest = part.trim_start().strip_prefix("void").unwrap_or("").trim_start();
        let mut bounds = "0".to_string();
        if let Some(b) = rest.strip_prefix("__smelt_bounds__") {
            // `(max_threads[, min_blocks])`: keep the first argument, up to its top-level comma.
            let (mut depth, mut end, mut first_comma) = (0i32, b.len(), None);
            for (i, c) in b.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => {
                        depth -= 1;
                        if depth == 0 {
                            end = i;
                            break;
                        }
                    }
                    ',' if depth == 1 && first_comma.is_none() => first_comma = Some(i),
                    _ => {}
                }
            }
            let inner = b.get(1..first_comma.unwrap_or(end)).unwrap_or("0");
            bounds = format!("({})", inner.trim());
            rest = b.get(end + 1..).unwrap_or("").trim_start();
        }
        let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if !name.is_empty() && !kernels.iter().any(|(n, _)| *n == name) {
            kernels.push((name, bounds));
        }
    }
    Ok(kernels)
}

fn build(src: &KernelSource) -> Result<Lib> {
    let code = format!("{EMU_HPP}\n#line 1 \"common.cuh\"\n{COMMON_CUH}\n#line 1 \"{}.cu\"\n{}\n", src.name, src.src);
    let cxx = compiler();
    let fl = flags();
    let key = fnv1a_128(&[code.as_bytes(), cxx.as_bytes(), fl.join(" ").as_bytes(), b"exports-v2"]);
    let dir = cache_dir().unwrap_or_else(std::env::temp_dir).join("emu");
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::Cuda { op: "emulator compile", detail: format!("creating {}: {e}", dir.display()) })?;
    let path = dir.join(format!("{}-{key:032x}.so", src.name));
    if !path.is_file() {
        // A name no other process or thread uses, so concurrent builds never share files.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cpp = dir.join(format!(".{}-{key:032x}.{}.{seq}.cpp", src.name, std::process::id()));
        let write = |p: &Path, text: &str| {
            std::fs::write(p, text)
                .map_err(|e| Error::Cuda { op: "emulator compile", detail: format!("writing {}: {e}", p.display()) })
        };
        write(&cpp, &code)?;
        let names = kernel_names(&cpp);
        let result = names.and_then(|names| {
            let exports: String = names.iter().map(|(n, b)| format!("SMELT_EMU_EXPORT({n}, {b})\n")).collect();
            write(&cpp, &format!("{code}\n{exports}"))?;
            let (obj, tmp) = (cpp.with_extension("o"), cpp.with_extension("so"));
            let what = format!("{}.cu with {cxx}", src.name);
            let compiled = run(Command::new(&cxx).args(&fl).arg("-c").arg("-o").arg(&obj).arg(&cpp), &what)
                .and_then(|_| run(Command::new(&cxx).args(["-shared", "-o"]).arg(&tmp).arg(&obj), &what));
            let _ = std::fs::remove_file(&obj);
            compiled?;
            std::fs::rename(&tmp, &path).map_err(|e| Error::Cuda {
                op: "emulator compile",
                detail: format!("renaming {} to {}: {e}", tmp.display(), path.display()),
            })
        });
        let _ = std::fs::remove_file(&cpp);
        result?;
    }
    // SAFETY: the library is ours, just built from our sources; its initialisers only set up
    // inline variables.
    let lib = unsafe { libloading::Library::new(&path) }
        .map_err(|e| Error::Cuda { op: "emulator load", detail: format!("{}: {e}", path.display()) })?;
    Ok(Lib { lib, path })
}

/// What launching a source's kernels needs: its library, and its kernels' resources when known.
struct Prepared {
    lib: Lib,
}

/// Built once per source per process, on first launch.
fn prepared(src: &KernelSource) -> Result<Arc<Prepared>> {
    type Slot = Arc<OnceLock<std::result::Result<Arc<Prepared>, String>>>;
    static SOURCES: OnceLock<Mutex<HashMap<(&'static str, usize), Slot>>> = OnceLock::new();
    let slot = {
        let mut map = SOURCES.get_or_init(Default::default).lock().map_err(|_| Error::msg("emulator library lock"))?;
        map.entry((src.name, src.src.as_ptr() as usize)).or_default().clone()
    };
    slot.get_or_init(|| {
        let lib = build(src).map_err(|e| e.to_string())?;
        Ok(Arc::new(Prepared { lib }))
    })
    .clone()
    .map_err(|detail| Error::Cuda { op: "emulator compile", detail })
}

/// The GPUs whose limits every emulated launch is checked against.
const CHECKED_ARCHS: [&str; 2] = ["sm_80", "sm_90"];

/// Kernel name → its resources on each of [`CHECKED_ARCHS`].
type Resources = HashMap<String, Vec<(&'static str, KernelResources)>>;

/// Each kernel's registers and static shared memory on [`CHECKED_ARCHS`], from ptxas's report
/// through NVRTC (cached on disk, next to the emulator libraries), so every emulated launch is
/// also checked against the per-block limits a GPU enforces. `None`, said on stderr, when NVRTC
/// is unavailable or does not compile the source (the emulator's own tests use emulator-only
/// intrinsics).
fn resources(src: &KernelSource) -> Option<Resources> {
    match resource_rows(src) {
        Ok(rows) => {
            let mut table = Resources::new();
            for (arch, r) in rows {
                table.entry(r.kernel.clone()).or_default().push((arch, r));
            }
            Some(table)
        }
        Err(e) => {
            let first = e.lines().next().unwrap_or_default().to_string();
            eprintln!(
                "CUDA emulator: {}.cu launches are not checked against register and shared-memory limits: {first}",
                src.name
            );
            None
        }
    }
}

/// The disk cache holds one line per kernel and architecture:
/// `arch kernel registers smem stack_frame spill_stores spill_loads`.
fn resource_line(arch: &str, r: &KernelResources) -> String {
    format!("{arch} {} {} {} {} {} {}\n", r.kernel, r.registers, r.smem, r.stack_frame, r.spill_stores, r.spill_loads)
}

fn parse_resource_line(line: &str) -> Option<(&'static str, KernelResources)> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let [arch, kernel, regs, smem, stack, st, ld] = f[..] else { return None };
    let arch = *CHECKED_ARCHS.iter().find(|a| **a == arch)?;
    let n = |s: &str| s.parse::<u32>().ok();
    let r = KernelResources {
        kernel: kernel.to_string(),
        registers: n(regs)?,
        smem: n(smem)?,
        stack_frame: n(stack)?,
        spill_stores: n(st)?,
        spill_loads: n(ld)?,
    };
    Some((arch, r))
}

fn resource_rows(src: &KernelSource) -> std::result::Result<Vec<(&'static str, KernelResources)>, String> {
    let ver = smelt_engine::cuda::nvrtc_version().map_err(|e| e.to_string())?;
    let ver = format!("{}.{}", ver.0, ver.1);
    let key = fnv1a_128(&[COMMON_CUH.as_bytes(), src.src.as_bytes(), ver.as_bytes(), b"resources-v1"]);
    let path = cache_dir().map(|d| d.join("emu").join(format!("{}-{key:032x}.resources", src.name)));
    if let Some(text) = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
        if let Some(rows) = text.lines().map(parse_resource_line).collect::<Option<Vec<_>>>() {
            if !rows.is_empty() {
                return Ok(rows);
            }
        }
    }
    let mut rows = Vec::new();
    for arch in CHECKED_ARCHS {
        for r in compile_resources(src.name, src.src, arch).map_err(|e| e.to_string())? {
            rows.push((arch, r));
        }
    }
    if let Some(p) = path {
        let text: String = rows.iter().map(|(arch, r)| resource_line(arch, r)).collect();
        // Written under a private name and renamed, so a concurrent reader never sees half a file.
        let tmp = p.with_extension(format!("{}.tmp", std::process::id()));
        if std::fs::write(&tmp, &text).is_ok() && std::fs::rename(&tmp, &p).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(rows)
}

/// The kind code `cuda_emu.hpp` checks against each kernel parameter.
fn kind(a: &Arg) -> u8 {
    match a {
        Arg::Ptr(_) => 0,
        Arg::I32(_) => 1,
        Arg::U32(_) => 2,
        Arg::U64(_) => 3,
        Arg::I64(_) => 4,
        Arg::F32(_) => 5,
        Arg::F64(_) => 6,
    }
}

/// Runs `func` of `src` on the CPU with CUDA semantics; returns when it has finished.
pub fn launch(src: &KernelSource, func: &str, cfg: LaunchCfg, args: &[Arg]) -> Result<()> {
    let fail = |detail: String| Error::Cuda { op: "kernel launch (emulator)", detail };
    if cfg.smem > 0 {
        return Err(fail(format!("{}::{func}: dynamic shared memory ({} bytes) is not emulated", src.name, cfg.smem)));
    }
    let table = checked_resources(src, func, cfg)?;
    if smelt_engine::cuda::emu::dry() {
        let sm90 = table
            .as_ref()
            .and_then(|t| t.get(func))
            .and_then(|rows| rows.iter().find(|(arch, _)| *arch == "sm_90").map(|(_, r)| r.clone()));
        let mut log = DRY_LAUNCHES.lock().unwrap_or_else(|p| p.into_inner());
        log.push(DryLaunch { kernel: format!("{}::{func}", src.name), cfg, resources: sm90 });
        return Ok(());
    }
    let prep = prepared(src)?;
    let sym = format!("smelt_emu_launch_{func}");
    // SAFETY: every `smelt_emu_launch_*` symbol is an SMELT_EMU_EXPORT wrapper with this signature.
    let f: libloading::Symbol<LaunchFn> = unsafe { prep.lib.lib.get(sym.as_bytes()) }
        .map_err(|_| fail(format!("{}.cu has no kernel `{func}` ({})", src.name, prep.lib.path.display())))?;
    let bits: Vec<u64> = args.iter().map(|a| a.bits()).collect();
    let kinds: Vec<u8> = args.iter().map(kind).collect();
    let grid = [cfg.grid.0, cfg.grid.1, cfg.grid.2];
    let block = [cfg.block.0, cfg.block.1, cfg.block.2];
    let mut err = vec![0u8; 1024];
    // SAFETY: the wrapper checks the argument count and kinds against the kernel's parameters
    // before running it; the pointers inside `bits` are emulator (host) memory of the tensors
    // the launcher passes, alive for the call.
    let rc = unsafe {
        f(
            bits.as_ptr(),
            kinds.as_ptr(),
            bits.len() as i32,
            grid.as_ptr(),
            block.as_ptr(),
            err.as_mut_ptr().cast(),
            err.len(),
        )
    };
    if rc != 0 {
        let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
        return Err(fail(format!("{}::{}", src.name, String::from_utf8_lossy(&err[..end]))));
    }
    for (i, a) in args.iter().enumerate() {
        if let Arg::Ptr(p) = a {
            smelt_engine::cuda::emu::check_canary(*p)
                .map_err(|e| fail(format!("{}::{func} (argument {i}) {e}", src.name)))?;
        }
    }
    Ok(())
}

/// One launch of a dry run (`SMELT_EMU_DRY=1`, see `smelt_engine::cuda::emu::dry`).
#[derive(Clone, Debug)]
pub struct DryLaunch {
    /// `source::function`.
    pub kernel: String,
    pub cfg: LaunchCfg,
    /// ptxas's report for sm_90 (`None` without NVRTC).
    pub resources: Option<KernelResources>,
}

static DRY_LAUNCHES: Mutex<Vec<DryLaunch>> = Mutex::new(Vec::new());

/// The kernels' resources of `src` (once per source per process; `None` without NVRTC), after
/// checking this launch against them. A dry run needs only these, not the host library.
fn checked_resources(src: &KernelSource, func: &str, cfg: LaunchCfg) -> Result<Option<Arc<Resources>>> {
    type Tables = Mutex<HashMap<(&'static str, usize), Option<Arc<Resources>>>>;
    static TABLES: OnceLock<Tables> = OnceLock::new();
    let table = {
        let mut map = TABLES.get_or_init(Default::default).lock().map_err(|_| Error::msg("emulator resources lock"))?;
        map.entry((src.name, src.src.as_ptr() as usize)).or_insert_with(|| resources(src).map(Arc::new)).clone()
    };
    let threads = cfg.block.0 * cfg.block.1 * cfg.block.2;
    for (arch, r) in table.as_ref().and_then(|t| t.get(func)).into_iter().flatten() {
        r.check_launch(arch, threads, cfg.smem)
            .map_err(|e| Error::Cuda { op: "kernel launch (emulator)", detail: format!("{}::{e}", src.name) })?;
    }
    Ok(table)
}

/// The launches of the dry run since the last call, in launch order.
pub fn take_dry_launches() -> Vec<DryLaunch> {
    std::mem::take(&mut *DRY_LAUNCHES.lock().unwrap_or_else(|p| p.into_inner()))
}

/// How a kernel's launches would fill an H100 (132 SMs): resident blocks per SM from its
/// registers, shared memory and block size, and waves = blocks / (resident blocks · SMs). A
/// launch under one wave leaves SMs idle for its whole run; 1.1 waves runs a second, nearly empty
/// round.
#[derive(Clone, Debug, PartialEq)]
pub struct LaunchFill {
    pub kernel: String,
    pub launches: usize,
    pub threads: u32,
    pub registers: Option<u32>,
    pub blocks_per_sm: Option<u32>,
    pub blocks: (u64, u64),
    pub waves: Option<(f64, f64)>,
}

/// H100 SXM: the SM count of the GPU the figures are for.
pub const H100_SMS: u32 = 132;

/// Groups launches by kernel and block size, in first-launch order.
pub fn launch_fill(launches: &[DryLaunch]) -> Vec<LaunchFill> {
    let mut out: Vec<LaunchFill> = Vec::new();
    for l in launches {
        let (g, b) = (l.cfg.grid, l.cfg.block);
        let threads = b.0 * b.1 * b.2;
        let blocks = g.0 as u64 * g.1 as u64 * g.2 as u64;
        let per_sm = l.resources.as_ref().map(|r| r.blocks_per_sm("sm_90", threads, l.cfg.smem));
        let waves = per_sm.map(|p| blocks as f64 / (p.max(1) * H100_SMS) as f64);
        match out.iter_mut().find(|f| f.kernel == l.kernel && f.threads == threads) {
            Some(f) => {
                f.launches += 1;
                f.blocks = (f.blocks.0.min(blocks), f.blocks.1.max(blocks));
                f.waves = f.waves.zip(waves).map(|((lo, hi), w)| (lo.min(w), hi.max(w)));
            }
            None => out.push(LaunchFill {
                kernel: l.kernel.clone(),
                launches: 1,
                threads,
                registers: l.resources.as_ref().map(|r| r.registers),
                blocks_per_sm: per_sm,
                blocks: (blocks, blocks),
                waves: waves.map(|w| (w, w)),
            }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Launches group by kernel and block size; blocks and waves are reported as ranges.
    #[test]
    fn launch_fill_groups_launches_and_counts_waves() {
        let res = KernelResources {
            kernel: "k".into(),
            registers: 255,
            smem: 0,
            stack_frame: 0,
            spill_stores: 0,
            spill_loads: 0,
        };
        let launch = |kernel: &str, blocks: u32, threads: u32| DryLaunch {
            kernel: kernel.into(),
            cfg: LaunchCfg { grid: (blocks, 2, 1), block: (threads, 1, 1), smem: 0 },
            resources: Some(res.clone()),
        };
        let fill =
            launch_fill(&[launch("a", 66, 128), launch("b", 1, 128), launch("a", 264, 128), launch("a", 1, 256)]);
        assert_eq!(fill.len(), 3, "{fill:?}");
        let a = &fill[0];
        assert_eq!((a.kernel.as_str(), a.launches, a.threads, a.blocks), ("a", 2, 128, (132, 528)));
        // 2 resident blocks per SM (255 registers × 128 threads): 264 slots on 132 SMs.
        assert_eq!((a.blocks_per_sm, a.waves), (Some(2), Some((0.5, 2.0))));
        assert_eq!((fill[1].kernel.as_str(), fill[2].threads), ("b", 256));
    }
}
