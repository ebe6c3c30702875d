//! Run-time kernel build (NVRTC → cubin, cached per process and on disk) and kernel launching.
//!
//! Interface used by every op's launcher:
//! `launch(ordinal, &SRC, "func_name", LaunchCfg { grid, block, smem }, &[Arg::Ptr(..), Arg::I32(..)])`.
//! Pointers are raw device addresses from `Tensor::cuda_ptr()`; work goes on the device's one
//! compute stream.
//!
//! Build: `common.cuh` is prepended to the source (followed by a `#line 1 "<name>.cu"` so NVRTC's
//! messages point into the `.cu` file), and NVRTC compiles it for the device's own architecture
//! (`sm_XY`) to a **cubin**: PTX from an NVRTC newer than the driver would not load. Only if
//! this NVRTC cannot target `sm_XY`, or the driver rejects the cubin, is PTX (`compute_XY`)
//! used instead, for the driver to JIT.
//!
//! Caches: per process, one module per (device, source); on disk, one image per
//! (source + prelude + options, arch, NVRTC version) in `$SMELT_KERNEL_CACHE`, else
//! `$XDG_CACHE_HOME/smelt/kernels`, else `~/.cache/smelt/kernels` (`SMELT_KERNEL_CACHE=off`
//! disables it). Entries are written atomically and checksummed; a bad entry is recompiled.
//!
//! Errors: a compile error names the source and carries NVRTC's full log; a failed launch names
//! the kernel. In debug builds, or with `SMELT_CUDA_SYNC=1`, every launch is followed by a
//! synchronize so an asynchronous fault is reported by the kernel that caused it.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use cudarc::driver::{result as drv, sys as drv_sys};
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};
use smelt_engine::cuda::{device, nvrtc_info, nvrtc_present, nvrtc_version, CudaDevice};

use crate::{Error, KernelSource, Result, COMMON_CUH};

/// One kernel argument. Pointers travel as raw 64-bit device addresses.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    U32(u32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
}

impl Arg {
    /// The value's bytes in the low end of a u64 (kernel parameters are read little-endian
    /// from their address, `size_of` the parameter's type).
    pub(crate) fn bits(self) -> u64 {
        match self {
            Arg::Ptr(p) | Arg::U64(p) => p,
            Arg::I32(v) => v as u32 as u64,
            Arg::U32(v) => v as u64,
            Arg::I64(v) => v as u64,
            Arg::F32(v) => v.to_bits() as u64,
            Arg::F64(v) => v.to_bits(),
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct LaunchCfg {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    /// Dynamic shared memory in bytes (above 48 KiB the launcher raises the kernel's limit).
    pub smem: u32,
}

impl LaunchCfg {
    /// A 1-D launch covering `n` items with `block` threads per block, one item per thread.
    pub fn for_items(n: usize, block: u32) -> Self {
        let grid = n.div_ceil(block.max(1) as usize).clamp(1, u32::MAX as usize) as u32;
        LaunchCfg { grid: (grid, 1, 1), block: (block, 1, 1), smem: 0 }
    }
}

/// NVRTC options used for every kernel (they are part of the disk-cache key).
/// `SMELT_KERNEL_LINEINFO=1` adds `-lineinfo`, so compute-sanitizer and Nsight Compute can map
/// SASS back to `.cu` lines (it triples the cubin size, so it is off by default).
fn options() -> &'static [&'static str] {
    static O: OnceLock<Vec<&'static str>> = OnceLock::new();
    O.get_or_init(|| {
        let mut o = vec!["--std=c++17", "-default-device", "--fmad=true"];
        if std::env::var("SMELT_KERNEL_LINEINFO").as_deref() == Ok("1") {
            o.push("-lineinfo");
        }
        o
    })
}

/// What a compile produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    /// Machine code for one real architecture (`sm_XY`).
    Cubin,
    /// PTX for the driver to JIT (`compute_XY`), NUL-terminated.
    Ptx,
}

/// A compiled kernel image.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub image: Vec<u8>,
    pub kind: ImageKind,
    /// NVRTC's log (warnings), possibly empty.
    pub log: String,
}

/// The NVRTC in use (`"libnvrtc 13.0 (/path/libnvrtc.so.13)"`), or why there is none.
pub fn nvrtc_status() -> Result<String> {
    nvrtc_info().summary()
}

struct CompileFailure {
    code: nvrtc_sys::nvrtcResult,
    detail: String,
}

fn c_chars_to_string(v: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = v.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).trim_end().to_string()
}

/// The text NVRTC compiles for `name`: the prelude, then the source with its own line numbers.
fn full_source(name: &str, code: &str) -> String {
    format!("{COMMON_CUH}\n#line 1 \"{name}.cu\"\n{code}\n")
}

fn nvrtc_compile(name: &str, code: &str, arch: &str, extra: &[&str]) -> std::result::Result<Compiled, CompileFailure> {
    let fail = |code, detail: String| CompileFailure { code, detail };
    let bad = nvrtc_sys::nvrtcResult::NVRTC_ERROR_INVALID_INPUT;
    let src = CString::new(full_source(name, code)).map_err(|_| fail(bad, "source contains a NUL byte".into()))?;
    let prog_name = CString::new(format!("{name}.cu")).map_err(|_| fail(bad, "name contains a NUL byte".into()))?;
    let prog =
        nvrtc::create_program(&src, Some(&prog_name)).map_err(|e| fail(e.0, format!("nvrtcCreateProgram: {e:?}")))?;
    let mut opts: Vec<String> = vec![format!("--gpu-architecture={arch}")];
    opts.extend(options().iter().chain(extra).map(|s| s.to_string()));
    // SAFETY: `prog` is a live program; it is destroyed exactly once below.
    let out = unsafe {
        let compiled = nvrtc::compile_program(prog, &opts);
        let log = nvrtc::get_program_log(prog).map(|l| c_chars_to_string(&l)).unwrap_or_default();
        let result = match compiled {
            Err(e) => Err(fail(e.0, format!("{:?} (options: {})\n{log}", e.0, opts.join(" ")))),
            Ok(()) if arch.starts_with("sm_") => {
                let mut size = 0usize;
                nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .map_err(|e| fail(e.0, "nvrtcGetCUBINSize".into()))?;
                let mut image = vec![0u8; size];
                nvrtc_sys::nvrtcGetCUBIN(prog, image.as_mut_ptr().cast())
                    .result()
                    .map_err(|e| fail(e.0, "nvrtcGetCUBIN".into()))?;
                if image.is_empty() {
                    Err(fail(nvrtc_sys::nvrtcResult::NVRTC_ERROR_INTERNAL_ERROR, "empty cubin".into()))
                } else {
                    Ok(Compiled { image, kind: ImageKind::Cubin, log })
                }
            }
            Ok(()) => match nvrtc::get_ptx(prog) {
                Ok(p) => {
                    let mut image: Vec<u8> = p.iter().map(|&c| c as u8).collect();
                    if image.last() != Some(&0) {
                        image.push(0);
                    }
                    Ok(Compiled { image, kind: ImageKind::Ptx, log })
                }
                Err(e) => Err(fail(e.0, "nvrtcGetPTX".into())),
            },
        };
        let _ = nvrtc::destroy_program(prog);
        result
    };
    out
}

fn compile_error(name: &str, arch: &str, f: CompileFailure) -> Error {
    Error::Cuda { op: "nvrtc compile", detail: format!("{name}.cu for {arch}: {}", f.detail) }
}

/// Compiles a named CUDA source (the prelude is prepended) for `arch`: `sm_XY` gives a cubin,
/// `compute_XY` gives PTX. For the compile test and tools; kernels go through [`launch`].
pub fn compile_source(name: &str, code: &str, arch: &str) -> Result<Compiled> {
    if !nvrtc_present() {
        return Err(Error::CudaUnavailable(nvrtc_status().err().map(|e| e.to_string()).unwrap_or_default()));
    }
    nvrtc_compile(name, code, arch, &[]).map_err(|f| compile_error(name, arch, f))
}

/// Compiles `src` for `arch` and returns the image (cubin for `sm_XY`, PTX for `compute_XY`).
pub fn compile(src: &KernelSource, arch: &str) -> Result<Vec<u8>> {
    compile_source(src.name, src.src, arch).map(|c| c.image)
}

// ---- resources --------------------------------------------------------------------------

/// What ptxas reports for one kernel of a cubin (`-Xptxas -v`): the numbers that decide whether
/// a launch of a given block size fits an SM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelResources {
    pub kernel: String,
    pub registers: u32,
    /// Static shared memory in bytes.
    pub smem: u32,
    pub stack_frame: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
}

/// Registers per block (sm_80 and sm_90 alike), and the allocation granularities behind it.
const REGS_PER_BLOCK: u32 = 65_536;
const REG_ALLOC_PER_WARP: u32 = 256;
/// Shared memory a block gets without opting in, and the opt-in ceiling per architecture.
const SMEM_DEFAULT: u32 = 48 * 1024;

fn smem_opt_in_max(arch: &str) -> u32 {
    match arch {
        "sm_80" => 163 * 1024,
        "sm_86" | "sm_89" => 99 * 1024,
        _ => 227 * 1024,
    }
}

/// Compiles a named CUDA source for `sm_XY` with ptxas's verbose report and returns each
/// kernel's registers, static shared memory and spills. Needs NVRTC, not a GPU.
pub fn compile_resources(name: &str, code: &str, arch: &str) -> Result<Vec<KernelResources>> {
    if !nvrtc_present() {
        return Err(Error::CudaUnavailable(nvrtc_status().err().map(|e| e.to_string()).unwrap_or_default()));
    }
    let c = nvrtc_compile(name, code, arch, &["-Xptxas=-v"]).map_err(|f| compile_error(name, arch, f))?;
    parse_ptxas_report(&c.log)
        .map_err(|detail| Error::Cuda { op: "nvrtc compile", detail: format!("{name}.cu for {arch}: {detail}") })
}

/// Reads ptxas's `-v` lines, which come per kernel as
/// `Compiling entry function 'k' for 'sm_90'`, `N bytes stack frame, N bytes spill stores, N bytes
/// spill loads` and `Used N registers, ... N bytes smem, ...`.
fn parse_ptxas_report(log: &str) -> std::result::Result<Vec<KernelResources>, String> {
    fn number_before(line: &str, unit: &str) -> Option<u32> {
        let end = line.find(unit)?;
        line[..end].split_whitespace().last()?.parse().ok()
    }
    let mut out: Vec<KernelResources> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let kernel = rest.split('\'').next().unwrap_or_default().to_string();
            out.push(KernelResources {
                kernel,
                registers: 0,
                smem: 0,
                stack_frame: 0,
                spill_stores: 0,
                spill_loads: 0,
            });
            continue;
        }
        let Some(k) = out.last_mut() else { continue };
        if line.contains("bytes stack frame") {
            k.stack_frame = number_before(line, " bytes stack frame").unwrap_or(0);
            k.spill_stores = number_before(line, " bytes spill stores").unwrap_or(0);
            k.spill_loads = number_before(line, " bytes spill loads").unwrap_or(0);
        } else if let Some(r) = number_before(line, " registers") {
            k.registers = r;
            k.smem = number_before(line, " bytes smem").unwrap_or(0);
        }
    }
    if out.is_empty() || out.iter().any(|k| k.registers == 0) {
        return Err(format!("no usable ptxas -v report in the NVRTC log:\n{log}"));
    }
    Ok(out)
}

impl KernelResources {
    /// Blocks of `threads` threads (with `dyn_smem` bytes of dynamic shared memory) that one SM
    /// of `arch` holds at once: the least of the thread, block, register and shared-memory
    /// limits (sm_80/sm_90 figures; 1 KiB of shared memory per block is the system's).
    pub fn blocks_per_sm(&self, arch: &str, threads: u32, dyn_smem: u32) -> u32 {
        let (max_threads, max_blocks, smem_sm) = match arch {
            "sm_80" => (2048, 32, 164 * 1024),
            _ => (2048, 32, 228 * 1024),
        };
        let warps = threads.div_ceil(32).max(1);
        let per_warp = (self.registers.max(1) * 32).div_ceil(REG_ALLOC_PER_WARP) * REG_ALLOC_PER_WARP;
        let by_threads = max_threads / (warps * 32);
        let by_regs = REGS_PER_BLOCK / (warps * per_warp);
        let by_smem = smem_sm / (self.smem + dyn_smem + 1024);
        by_threads.min(max_blocks).min(by_regs).min(by_smem)
    }

    /// Whether a block of `threads` threads with `dyn_smem` bytes of dynamic shared memory fits
    /// one SM of `arch`; the error says what the driver would refuse and why.
    pub fn check_launch(&self, arch: &str, threads: u32, dyn_smem: u32) -> std::result::Result<(), String> {
        let warps = threads.div_ceil(32);
        let per_warp = (self.registers * 32).div_ceil(REG_ALLOC_PER_WARP) * REG_ALLOC_PER_WARP;
        if warps * per_warp > REGS_PER_BLOCK {
            return Err(format!(
                "{}: a block of {threads} threads at {} registers each ({arch}) needs {} registers, more than the \
                 {REGS_PER_BLOCK} a block can have: the driver refuses this launch \
                 (CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES); use fewer threads or add __launch_bounds__({threads})",
                self.kernel,
                self.registers,
                warps * per_warp
            ));
        }
        let smem = self.smem + dyn_smem;
        let limit = if dyn_smem > 0 { smem_opt_in_max(arch) } else { SMEM_DEFAULT };
        if smem > limit {
            return Err(format!(
                "{}: {} bytes of static + {dyn_smem} of dynamic shared memory exceed the {limit} a block can have on {arch}",
                self.kernel, self.smem
            ));
        }
        Ok(())
    }
}

// ---- disk cache ---------------------------------------------------------------------------

/// The kernel cache folder, or `None` when disabled (`SMELT_KERNEL_CACHE=off`) or no home.
pub fn cache_dir() -> Option<PathBuf> {
    let env = |k| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(d) = env("SMELT_KERNEL_CACHE") {
        let s = d.to_string_lossy();
        if s == "off" || s == "0" {
            return None;
        }
        return Some(PathBuf::from(d));
    }
    if let Some(x) = env("XDG_CACHE_HOME") {
        return Some(PathBuf::from(x).join("smelt").join("kernels"));
    }
    env("HOME").map(|h| PathBuf::from(h).join(".cache").join("smelt").join("kernels"))
}

pub(crate) fn fnv1a_128(parts: &[&[u8]]) -> u128 {
    const PRIME: u128 = 0x0000000001000000000000000000013B;
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for p in parts {
        for &b in p.iter().chain(&[0xffu8]) {
            h ^= b as u128;
            h = h.wrapping_mul(PRIME);
        }
    }
    h
}

fn fnv1a_64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

const MAGIC: &[u8; 8] = b"SMELTKC1";

fn cache_path(name: &str, code: &str, arch: &str, nvrtc: (i32, i32)) -> Option<PathBuf> {
    let ver = format!("{}.{}", nvrtc.0, nvrtc.1);
    let opts = options().join(" ");
    let key = fnv1a_128(&[COMMON_CUH.as_bytes(), code.as_bytes(), arch.as_bytes(), ver.as_bytes(), opts.as_bytes()]);
    Some(cache_dir()?.join(format!("{name}-{arch}-{key:032x}.bin")))
}

/// Reads a cache entry; `None` when absent or damaged (wrong magic, length or checksum).
fn cache_read(path: &PathBuf) -> Option<(ImageKind, Vec<u8>)> {
    let data = std::fs::read(path).ok()?;
    if data.len() < 25 || &data[..8] != MAGIC {
        return None;
    }
    let kind = match data[8] {
        0 => ImageKind::Cubin,
        1 => ImageKind::Ptx,
        _ => return None,
    };
    let len = u64::from_le_bytes(data[9..17].try_into().ok()?) as usize;
    let sum = u64::from_le_bytes(data[17..25].try_into().ok()?);
    let payload = &data[25..];
    (payload.len() == len && fnv1a_64(payload) == sum && len > 0).then(|| (kind, payload.to_vec()))
}

/// Writes a cache entry atomically (temp file + rename); failures only cost a recompile later.
fn cache_write(path: &PathBuf, kind: ImageKind, image: &[u8]) {
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let mut data = Vec::with_capacity(image.len() + 25);
    data.extend_from_slice(MAGIC);
    data.push(if kind == ImageKind::Cubin { 0 } else { 1 });
    data.extend_from_slice(&(image.len() as u64).to_le_bytes());
    data.extend_from_slice(&fnv1a_64(image).to_le_bytes());
    data.extend_from_slice(image);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let tmp = dir.join(format!(
        ".{}.{}.{nanos}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    if std::fs::write(&tmp, &data).is_ok() && std::fs::rename(&tmp, path).is_ok() {
        return;
    }
    let _ = std::fs::remove_file(&tmp);
}

// ---- modules ------------------------------------------------------------------------------

/// A kernel function handle with the dynamic shared memory limit already raised for it.
struct FuncEntry {
    func: drv_sys::CUfunction,
    max_smem: u32,
}

/// A loaded module of one source on one device. Handles stay valid for the process's life
/// (modules are never unloaded).
struct Module {
    module: drv_sys::CUmodule,
    funcs: Mutex<HashMap<String, FuncEntry>>,
    kind: ImageKind,
    arch: String,
    /// Where the image came from: "compiled in N ms" or "disk cache".
    origin: String,
    image_bytes: usize,
}

// SAFETY: CUmodule/CUfunction handles are context-wide driver objects usable from any thread
// (with the context bound); the function map is behind a Mutex.
unsafe impl Send for Module {}
unsafe impl Sync for Module {}

type Slot = Arc<OnceLock<std::result::Result<Arc<Module>, String>>>;
/// (device ordinal, source name, source address): a module per source per device.
type ModuleKey = (usize, &'static str, usize);

fn load_image(
    dev: &CudaDevice,
    kind: ImageKind,
    image: &[u8],
) -> std::result::Result<drv_sys::CUmodule, drv::DriverError> {
    dev.bind().map_err(|_| drv::DriverError(drv_sys::CUresult::CUDA_ERROR_INVALID_CONTEXT))?;
    debug_assert!(kind == ImageKind::Cubin || image.last() == Some(&0));
    // SAFETY: `image` is a complete cubin, or NUL-terminated PTX; the driver copies it.
    unsafe { drv::module::load_data(image.as_ptr() as *const c_void) }
}

fn drv_msg(e: drv::DriverError) -> String {
    match e.error_string() {
        Ok(s) => format!("{:?} ({})", e.0, s.to_string_lossy()),
        Err(_) => format!("{:?}", e.0),
    }
}

/// Builds (or fetches from disk) and loads `src` for `dev`.
fn build_module(dev: &CudaDevice, src: &KernelSource) -> std::result::Result<Module, String> {
    let arch = dev.arch();
    let ver = nvrtc_version().map_err(|e| format!("{}.cu: {e}", src.name))?;
    let path = cache_path(src.name, src.src, &arch, ver);
    let module = |m, kind, origin: String, len| Module {
        module: m,
        funcs: Mutex::new(HashMap::new()),
        kind,
        arch: arch.clone(),
        origin,
        image_bytes: len,
    };

    if let Some((kind, image)) = path.as_ref().and_then(cache_read) {
        match load_image(dev, kind, &image) {
            Ok(m) => return Ok(module(m, kind, "disk cache".into(), image.len())),
            // A damaged or stale entry: drop it and compile afresh.
            Err(_) => {
                let _ = path.as_ref().map(std::fs::remove_file);
            }
        }
    }

    let t0 = Instant::now();
    let cubin_err = match nvrtc_compile(src.name, src.src, &arch, &[]) {
        Ok(c) => match load_image(dev, ImageKind::Cubin, &c.image) {
            Ok(m) => {
                if let Some(p) = &path {
                    cache_write(p, ImageKind::Cubin, &c.image);
                }
                let origin = format!("compiled in {} ms", t0.elapsed().as_millis());
                return Ok(module(m, ImageKind::Cubin, origin, c.image.len()));
            }
            Err(e) => format!("the driver rejected the {arch} cubin: {}", drv_msg(e)),
        },
        // A real compile error: PTX would fail the same way.
        Err(f) if f.code == nvrtc_sys::nvrtcResult::NVRTC_ERROR_COMPILATION => {
            return Err(compile_error(src.name, &arch, f).to_string());
        }
        Err(f) => format!("NVRTC {}.{} cannot build a {arch} cubin: {}", ver.0, ver.1, f.detail),
    };

    // Fallback: PTX for the driver to JIT.
    let virt = arch.replacen("sm_", "compute_", 1);
    let c = nvrtc_compile(src.name, src.src, &virt, &[])
        .map_err(|f| format!("{cubin_err}; PTX fallback failed too: {}", compile_error(src.name, &virt, f)))?;
    let m = load_image(dev, ImageKind::Ptx, &c.image).map_err(|e| {
        format!(
            "{cubin_err}; the driver also rejected the {virt} PTX: {} (PTX from an NVRTC newer than the \
             driver cannot load: use the NVRTC of the driver's CUDA version)",
            drv_msg(e)
        )
    })?;
    let origin = format!("compiled to PTX in {} ms after: {cubin_err}", t0.elapsed().as_millis());
    Ok(module(m, ImageKind::Ptx, origin, c.image.len()))
}

fn module(dev: &CudaDevice, src: &KernelSource) -> Result<Arc<Module>> {
    static MODULES: OnceLock<Mutex<HashMap<ModuleKey, Slot>>> = OnceLock::new();
    let key = (dev.ordinal(), src.name, src.src.as_ptr() as usize);
    let slot: Slot = {
        let mut map =
            MODULES.get_or_init(Default::default).lock().map_err(|_| Error::msg("kernel cache lock poisoned"))?;
        map.entry(key).or_default().clone()
    };
    // Other threads wanting the same module wait here while one compiles it.
    slot.get_or_init(|| build_module(dev, src).map(Arc::new))
        .clone()
        .map_err(|detail| Error::Cuda { op: "kernel build", detail })
}

impl Module {
    fn function(&self, src: &KernelSource, name: &str, smem: u32) -> Result<drv_sys::CUfunction> {
        let mut funcs = self.funcs.lock().map_err(|_| Error::msg("kernel function cache poisoned"))?;
        if !funcs.contains_key(name) {
            let cname = CString::new(name).map_err(|_| Error::msg(format!("kernel name {name:?} contains NUL")))?;
            // SAFETY: the module is loaded and never unloaded.
            let func = unsafe { drv::module::get_function(self.module, cname) }.map_err(|e| Error::Cuda {
                op: "kernel lookup",
                detail: format!("{}::{name} not found in the {} module: {}", src.name, self.arch, drv_msg(e)),
            })?;
            funcs.insert(name.to_string(), FuncEntry { func, max_smem: 48 * 1024 });
        }
        let entry = funcs.get_mut(name).ok_or_else(|| Error::msg("kernel function cache"))?;
        if smem > entry.max_smem {
            // Dynamic shared memory above 48 KiB must be opted into per kernel.
            // SAFETY: `func` is a valid handle.
            unsafe {
                drv::function::set_function_attribute(
                    entry.func,
                    drv_sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem as i32,
                )
            }
            .map_err(|e| Error::Cuda {
                op: "kernel launch",
                detail: format!(
                    "{}::{name}: cannot raise dynamic shared memory to {smem} bytes: {}",
                    src.name,
                    drv_msg(e)
                ),
            })?;
            entry.max_smem = smem;
        }
        Ok(entry.func)
    }
}

/// Compiles (once per process, cached on disk) and launches `func` from `src` on device
/// `ordinal`, on its compute stream.
/// A host index list as a device tensor. An upload waits for the stream (`htod` is
/// synchronous), and a step's layers all pass the same lists (attention's cu_seqlens and tiles, the decode lengths), so the last
/// few lists are kept and reused when the same list comes again (content-compared; the kernels
/// only read them): one drain of the GPU per list per step instead of one per layer.
pub(crate) fn upload(ord: usize, v: &[u32]) -> Result<smelt_engine::Tensor> {
    const KEEP: usize = 8;
    if device(ord)?.is_capturing() {
        // Even a memo hit would bake this step's values into the graph.
        return Err(Error::Cuda {
            op: "graph capture",
            detail: format!("a host index list ({} values) cannot be captured: pass it as a device tensor", v.len()),
        });
    }
    static RECENT: Mutex<Vec<(usize, Vec<u32>, smelt_engine::Tensor)>> = Mutex::new(Vec::new());
    let mut recent = RECENT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(i) = recent.iter().position(|(o, list, _)| *o == ord && list == v) {
        let hit = recent.remove(i);
        let t = hit.2.clone();
        recent.push(hit);
        return Ok(t);
    }
    let t = smelt_engine::Tensor::from_slice(v, &[v.len()], smelt_engine::Device::Cuda(ord))?;
    if recent.len() == KEEP {
        recent.remove(0);
    }
    recent.push((ord, v.to_vec(), t.clone()));
    Ok(t)
}

pub fn launch(ordinal: usize, src: &'static KernelSource, func: &str, cfg: LaunchCfg, args: &[Arg]) -> Result<()> {
    let dev = device(ordinal)?;
    smelt_engine::cuda::profile::timed(
        &dev,
        || format!("{}::{func}", src.name),
        || launch_on(&dev, src, func, cfg, args),
    )
}

fn launch_on(
    dev: &Arc<CudaDevice>,
    src: &'static KernelSource,
    func: &str,
    cfg: LaunchCfg,
    args: &[Arg],
) -> Result<()> {
    let _turn = dev.stream_turn();
    if dev.is_emulated() {
        let (f, a) = (func.to_string(), args.to_vec());
        if dev.emu_record(|| Box::new(move || crate::emu::launch(src, &f, cfg, &a))) {
            return Ok(());
        }
        return crate::emu::launch(src, func, cfg, args);
    }
    let module = module(dev, src)?;
    let f = module.function(src, func, cfg.smem)?;
    let (g, b) = (cfg.grid, cfg.block);
    let threads = b.0 as u64 * b.1 as u64 * b.2 as u64;
    if g.0 == 0 || g.1 == 0 || g.2 == 0 || threads == 0 || threads > 1024 {
        return Err(Error::Cuda {
            op: "kernel launch",
            detail: format!("{}::{func}: invalid launch shape grid {g:?} block {b:?}", src.name),
        });
    }
    let mut values: Vec<u64> = args.iter().map(|a| a.bits()).collect();
    let mut params: Vec<*mut c_void> = values.iter_mut().map(|v| v as *mut u64 as *mut c_void).collect();
    dev.bind()?;
    // SAFETY: `f` is a loaded kernel; `params` points at one value per argument, alive for the
    // call (the driver copies them). The caller passes arguments matching the kernel signature.
    unsafe { drv::launch_kernel(f, g, b, cfg.smem, dev.stream()?.cu_stream(), &mut params) }.map_err(|e| {
        Error::Cuda {
            op: "kernel launch",
            detail: format!("{}::{func} grid {g:?} block {b:?} smem {}: {}", src.name, cfg.smem, drv_msg(e)),
        }
    })?;
    if smelt_engine::cuda::sync_after_launch() && !dev.is_capturing() {
        dev.stream()?.synchronize().map_err(|e| Error::Cuda {
            op: "kernel",
            detail: format!("{}::{func} grid {g:?} block {b:?} failed: {}", src.name, drv_msg(e)),
        })?;
    }
    Ok(())
}

/// How the module of `src` was built for device `ordinal` (building it if needed), e.g.
/// `"sm_90 cubin, 5120 bytes, compiled in 180 ms"`.
pub fn module_info(ordinal: usize, src: &KernelSource) -> Result<String> {
    let dev = device(ordinal)?;
    let m = module(&dev, src)?;
    let kind = if m.kind == ImageKind::Cubin { "cubin" } else { "PTX" };
    Ok(format!("{} {kind}, {} bytes, {}", m.arch, m.image_bytes, m.origin))
}

const SELF_TEST: KernelSource = KernelSource {
    name: "self_test",
    src: r#"
// self_test — out[i] = a·in[i] + i + 1.5, the 1.5 through a bf16 round trip and the i through
// a warp sum, so the common.cuh prelude is exercised. Launched with whole warps (every lane
// reaches the shuffle; only the store is guarded).
extern "C" __global__ void smelt_self_test(float* out, const float* in, float a, u32 n) {
    u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    float lane_i = warp_sum((threadIdx.x & 31) == 0 ? (float)i : 0.0f);
    if (i < n) out[i] = a * in[i] + lane_i + (float)(threadIdx.x & 31) + bf16_to_f32(f32_to_bf16(1.5f));
}
"#,
};

/// Compiles and runs one tiny kernel on device `ordinal` and checks every output (for
/// `smelt doctor`). Returns a one-line description of what ran.
pub fn self_test(ordinal: usize) -> Result<String> {
    let dev = device(ordinal)?;
    let n = 1000usize;
    let input: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
    let din = dev.alloc(n * 4)?;
    let dout = dev.alloc(n * 4)?;
    dev.htod(bytemuck::cast_slice(&input), &din, 0)?;
    dev.htod(bytemuck::cast_slice(&vec![f32::NAN; n]), &dout, 0)?;
    let cfg = LaunchCfg::for_items(n, 128);
    let t0 = Instant::now();
    launch(
        ordinal,
        &SELF_TEST,
        "smelt_self_test",
        cfg,
        &[Arg::Ptr(dout.ptr()), Arg::Ptr(din.ptr()), Arg::F32(2.0), Arg::U32(n as u32)],
    )?;
    let mut out = vec![0u8; n * 4];
    dev.dtoh(&dout, 0, &mut out)?;
    let elapsed = t0.elapsed().as_millis();
    let out: &[f32] = bytemuck::cast_slice(&out);
    let bad = (0..n).filter(|&i| out[i] != 2.0 * i as f32 + 1.5).count();
    let info = module_info(ordinal, &SELF_TEST)?;
    if bad > 0 {
        let i = (0..n).find(|&i| out[i] != 2.0 * i as f32 + 1.5).unwrap_or(0);
        return Err(Error::Cuda {
            op: "self test",
            detail: format!(
                "{bad}/{n} outputs wrong (first: out[{i}] = {}, want {}); module: {info}",
                out[i],
                2.0 * i as f32 + 1.5
            ),
        });
    }
    Ok(format!("cuda:{ordinal} {}: self-test kernel ({info}) ran, {n}/{n} outputs correct, {elapsed} ms", dev.name()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVRTC 13.0's `-Xptxas=-v` log for two kernels (abridged from a real one), and the launch
    /// check on the numbers read from it.
    #[test]
    fn ptxas_report_is_read_and_launches_checked() {
        let log = "ptxas info    : 0 bytes gmem\n\
            ptxas info    : Compiling entry function 'attn_bwd_dkdv_f32_d128' for 'sm_80'\n\
            ptxas info    : Function properties for attn_bwd_dkdv_f32_d128\n\
            \x20   8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n\
            ptxas info    : Used 133 registers, used 1 barriers, 43328 bytes smem, 420 bytes cmem[0]\n\
            ptxas info    : Compiling entry function 'add_f32' for 'sm_80'\n\
            ptxas info    : Function properties for add_f32\n\
            \x20   0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
            ptxas info    : Used 10 registers, used 0 barriers, 384 bytes cmem[0]\n";
        let r = parse_ptxas_report(log).unwrap();
        assert_eq!(r.len(), 2);
        let (a, b) = (&r[0], &r[1]);
        assert_eq!((a.kernel.as_str(), a.registers, a.smem, a.stack_frame), ("attn_bwd_dkdv_f32_d128", 133, 43328, 8));
        assert_eq!((a.spill_stores, a.spill_loads), (4, 4));
        assert_eq!((b.kernel.as_str(), b.registers, b.smem), ("add_f32", 10, 0));
        // 133 registers round up to 136 per thread: 128 threads fit, 512 (69,632 registers) do not.
        a.check_launch("sm_80", 128, 0).unwrap();
        let e = a.check_launch("sm_80", 512, 0).unwrap_err();
        assert!(e.contains("69632 registers") && e.contains("LAUNCH_OUT_OF_RESOURCES"), "{e}");
        // Shared memory: 48 KiB without opting in, the architecture's ceiling with dynamic memory.
        a.check_launch("sm_80", 128, 8 * 1024).unwrap();
        assert!(a.check_launch("sm_80", 128, 130 * 1024).is_err());
        assert!(a.check_launch("sm_90", 128, 130 * 1024).is_ok());
        b.check_launch("sm_90", 1024, 0).unwrap();
        assert!(parse_ptxas_report("nvrtc: no report").is_err());
    }

    /// Resident blocks per SM: each of the thread, block, register and shared-memory limits
    /// binds in turn.
    #[test]
    fn blocks_per_sm_takes_the_tightest_limit() {
        let k = |registers, smem| KernelResources {
            kernel: "k".into(),
            registers,
            smem,
            stack_frame: 0,
            spill_stores: 0,
            spill_loads: 0,
        };
        // Registers: 255 round up to 256 per thread, 4 warps take 32,768 of 65,536.
        assert_eq!(k(255, 0).blocks_per_sm("sm_90", 128, 0), 2);
        // Threads: 2048 per SM.
        assert_eq!(k(16, 0).blocks_per_sm("sm_90", 1024, 0), 2);
        // Blocks: at most 32.
        assert_eq!(k(16, 0).blocks_per_sm("sm_90", 32, 0), 32);
        // Shared memory (+1 KiB per block): 228 KiB on sm_90, 164 KiB on sm_80.
        assert_eq!(k(16, 48 * 1024).blocks_per_sm("sm_90", 128, 0), 4);
        assert_eq!(k(16, 48 * 1024).blocks_per_sm("sm_80", 128, 0), 3);
        assert_eq!(k(16, 16 * 1024).blocks_per_sm("sm_90", 128, 40 * 1024), 4);
    }

    #[test]
    fn arg_bits_are_little_endian_values() {
        assert_eq!(Arg::I32(-1).bits(), 0xffff_ffff);
        assert_eq!(Arg::F32(1.0).bits(), 0x3f80_0000);
        assert_eq!(Arg::Ptr(0x1234_5678_9abc).bits(), 0x1234_5678_9abc);
        assert_eq!(Arg::F64(1.0).bits(), 1.0f64.to_bits());
    }

    #[test]
    fn cache_entries_round_trip_and_reject_damage() {
        let dir = std::env::temp_dir().join(format!("smelt-kc-test-{}", std::process::id()));
        let path = dir.join("x.bin");
        cache_write(&path, ImageKind::Cubin, b"\x7fELF some cubin bytes");
        assert_eq!(cache_read(&path), Some((ImageKind::Cubin, b"\x7fELF some cubin bytes".to_vec())));
        let mut data = std::fs::read(&path).unwrap();
        let last = data.len() - 1;
        data[last] ^= 1;
        std::fs::write(&path, &data).unwrap();
        assert_eq!(cache_read(&path), None, "a flipped byte must be detected");
        std::fs::write(&path, b"SMELTKC1").unwrap();
        assert_eq!(cache_read(&path), None, "a truncated entry must be detected");
        let _ = std::fs::remove_dir_all(&dir);
        // The key depends on source, arch and NVRTC version.
        let a = cache_path("k", "src", "sm_90", (13, 0));
        assert_ne!(a, cache_path("k", "src2", "sm_90", (13, 0)));
        assert_ne!(a, cache_path("k", "src", "sm_80", (13, 0)));
        assert_ne!(a, cache_path("k", "src", "sm_90", (12, 9)));
    }

    #[test]
    fn compile_reports_errors_with_name_and_log() {
        match nvrtc_status() {
            Err(e) => {
                eprintln!("skipping NVRTC test: {e}");
                assert!(compile(&SELF_TEST, "sm_90").is_err());
            }
            Ok(s) => {
                eprintln!("using {s}");
                let cubin = compile(&SELF_TEST, "sm_90").unwrap();
                assert_eq!(&cubin[..4], b"\x7fELF");
                let ptx = compile_source("self_test", SELF_TEST.src, "compute_80").unwrap();
                assert_eq!(ptx.kind, ImageKind::Ptx);
                assert!(String::from_utf8_lossy(&ptx.image).contains(".entry smelt_self_test"));
                let e = compile_source("broken", "extern \"C\" __global__ void f() { undefined_thing(); }", "sm_80")
                    .unwrap_err()
                    .to_string();
                assert!(e.contains("broken.cu") && e.contains("undefined_thing"), "{e}");
                assert!(e.contains("broken.cu(1)"), "line numbers must point into the .cu file: {e}");
            }
        }
    }
}
