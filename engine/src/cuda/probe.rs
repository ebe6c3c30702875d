//! Finding the CUDA libraries without panicking, and the report `smelt doctor` prints.
//!
//! cudarc (with `dynamic-loading`) opens each library on its first call and panics when the
//! library is missing, so every entry point here asks cudarc's `is_culib_present()` first and
//! turns absence into an error that says what is missing and how to provide it.

use std::fmt;
use std::sync::OnceLock;

use cudarc::driver::{result as drv, sys as drv_sys};

use crate::{Error, Result};

/// What the process knows about the NVIDIA driver (probed once).
pub(crate) struct DriverState {
    /// `cuDriverGetVersion`, e.g. 13000 for CUDA 13.0.
    pub version: i32,
    /// Device count after a successful `cuInit`, or why `cuInit` failed.
    pub devices: std::result::Result<usize, String>,
}

/// Formats a driver error as `CUDA_ERROR_NAME (description)`.
pub(crate) fn driver_err(e: drv::DriverError) -> String {
    match e.error_string() {
        Ok(s) => format!("{:?} ({})", e.0, s.to_string_lossy()),
        Err(_) => format!("{:?}", e.0),
    }
}

/// The driver library and `cuInit`, probed once per process.
pub(crate) fn driver_state() -> Result<&'static DriverState> {
    static STATE: OnceLock<std::result::Result<DriverState, String>> = OnceLock::new();
    STATE
        .get_or_init(|| {
            // SAFETY: only tries to dlopen the candidate names.
            if !unsafe { drv_sys::is_culib_present() } {
                return Err("the NVIDIA driver library (libcuda.so.1) was not found: install the NVIDIA \
                            driver, or add the folder holding libcuda.so.1 to LD_LIBRARY_PATH"
                    .into());
            }
            let mut version = 0;
            // SAFETY: the library is present; the out-pointer is valid.
            let _ = unsafe { drv_sys::cuDriverGetVersion(&mut version) };
            let devices = match drv::init() {
                Err(e) => Err(format!(
                    "the NVIDIA driver (CUDA {}) failed to initialise: cuInit: {}",
                    fmt_cuda_version(version),
                    driver_err(e)
                )),
                Ok(()) => match drv::device::get_count() {
                    Ok(n) => Ok(n.max(0) as usize),
                    Err(e) => Err(format!("cuDeviceGetCount: {}", driver_err(e))),
                },
            };
            Ok(DriverState { version, devices })
        })
        .as_ref()
        .map_err(|e| Error::CudaUnavailable(e.clone()))
}

/// Number of CUDA devices, or why there are none to use.
pub fn device_count() -> Result<usize> {
    let st = driver_state()?;
    match &st.devices {
        Ok(n) => Ok(*n),
        Err(e) => Err(Error::CudaUnavailable(e.clone())),
    }
}

/// `13000` → `"13.0"`.
pub(crate) fn fmt_cuda_version(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// Where a shared library was loaded from: the first mapping in `/proc/self/maps` whose file
/// name starts with `stem` (e.g. `libnvrtc.so`). Linux only; `None` elsewhere.
fn mapped_path(stem: &str) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().filter_map(|l| l.split_whitespace().nth(5)).find_map(|p| {
        let file = p.rsplit('/').next()?;
        file.starts_with(stem).then(|| p.to_string())
    })
}

/// One CUDA library: found or not, where, which version, or why it is missing.
#[derive(Clone, Debug)]
pub struct LibInfo {
    pub name: &'static str,
    pub found: bool,
    pub path: Option<String>,
    pub version: Option<String>,
    /// Why it is missing (or a note about it).
    pub detail: Option<String>,
}

impl LibInfo {
    fn missing(name: &'static str, detail: String) -> Self {
        LibInfo { name, found: false, path: None, version: None, detail: Some(detail) }
    }
    /// `Ok("libnvrtc 13.0 (/path/libnvrtc.so.13)")` or the reason it is missing.
    pub fn summary(&self) -> Result<String> {
        if self.found {
            let mut s = self.name.to_string();
            if let Some(v) = &self.version {
                s += &format!(" {v}");
            }
            if let Some(p) = &self.path {
                s += &format!(" ({p})");
            }
            Ok(s)
        } else {
            Err(Error::CudaUnavailable(self.detail.clone().unwrap_or_else(|| format!("{} not found", self.name))))
        }
    }
}

/// The driver library (libcuda).
pub fn driver_info() -> LibInfo {
    match driver_state() {
        Err(e) => LibInfo::missing("libcuda", e.to_string().trim_start_matches("CUDA is not available: ").into()),
        Ok(st) => LibInfo {
            name: "libcuda",
            found: true,
            path: mapped_path("libcuda.so"),
            version: Some(format!("CUDA {}", fmt_cuda_version(st.version))),
            detail: st.devices.as_ref().err().cloned(),
        },
    }
}

/// Whether libnvrtc can be loaded; cheap after the first call.
pub fn nvrtc_present() -> bool {
    static P: OnceLock<bool> = OnceLock::new();
    // SAFETY: only tries to dlopen the candidate names.
    *P.get_or_init(|| unsafe { cudarc::nvrtc::sys::is_culib_present() })
}

/// `(major, minor)` of the libnvrtc in use, or why there is none.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !nvrtc_present() {
        return Err(Error::CudaUnavailable(NVRTC_MISSING.into()));
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); out-pointers are valid.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::Cuda { op: "nvrtcVersion", detail: format!("{e:?}") })?;
    Ok((major, minor))
}

const NVRTC_MISSING: &str = "libnvrtc was not found on the loader path (looked for libnvrtc.so, libnvrtc.so.13, \
     libnvrtc.so.12, ...): install the CUDA toolkit or the `nvidia-cuda-nvrtc` wheel \
     (scripts/install-nvrtc prints its lib folder) and add that folder to LD_LIBRARY_PATH";

/// The NVRTC library.
pub fn nvrtc_info() -> LibInfo {
    match nvrtc_version() {
        Err(e) => LibInfo::missing("libnvrtc", e.to_string().trim_start_matches("CUDA is not available: ").into()),
        Ok((major, minor)) => LibInfo {
            name: "libnvrtc",
            found: true,
            path: mapped_path("libnvrtc.so"),
            version: Some(format!("{major}.{minor}")),
            detail: None,
        },
    }
}

/// Whether libcublas (and the libcublasLt it depends on) can be loaded.
pub fn cublas_present() -> bool {
    static P: OnceLock<bool> = OnceLock::new();
    // SAFETY: only tries to dlopen the candidate names.
    *P.get_or_init(|| unsafe { cudarc::cublas::sys::is_culib_present() })
}

pub(crate) const CUBLAS_MISSING: &str = "libcublas was not found or could not be loaded (it needs libcublasLt \
     next to it): install the CUDA toolkit or the `nvidia-cublas` wheel and add its lib folder to LD_LIBRARY_PATH";

/// The cuBLAS library.
pub fn cublas_info() -> LibInfo {
    if !cublas_present() {
        return LibInfo::missing("libcublas", CUBLAS_MISSING.into());
    }
    use cudarc::cublas::sys::{cublasGetProperty, libraryPropertyType};
    let mut v = [0i32; 3];
    let props =
        [libraryPropertyType::MAJOR_VERSION, libraryPropertyType::MINOR_VERSION, libraryPropertyType::PATCH_LEVEL];
    let mut ok = true;
    for (slot, p) in v.iter_mut().zip(props) {
        // SAFETY: the library is present; the out-pointer is valid.
        ok &= unsafe { cublasGetProperty(p, slot) }.result().is_ok();
    }
    LibInfo {
        name: "libcublas",
        found: true,
        path: mapped_path("libcublas.so"),
        version: ok.then(|| format!("{}.{}.{}", v[0], v[1], v[2])),
        detail: None,
    }
}

/// One GPU as the driver describes it.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_mem: usize,
    pub multiprocessors: i32,
}

/// Describes device `ordinal` without creating a context.
pub fn device_info(ordinal: usize) -> Result<DeviceInfo> {
    let n = device_count()?;
    if ordinal >= n {
        return Err(Error::CudaUnavailable(format!("cuda:{ordinal} requested but only {n} CUDA device(s) present")));
    }
    let e = |op: &'static str| move |err: drv::DriverError| Error::Cuda { op, detail: driver_err(err) };
    let dev = drv::device::get(ordinal as i32).map_err(e("cuDeviceGet"))?;
    let attr = |a| unsafe { drv::device::get_attribute(dev, a) }.map_err(e("cuDeviceGetAttribute"));
    use drv_sys::CUdevice_attribute as A;
    Ok(DeviceInfo {
        ordinal,
        name: drv::device::get_name(dev).map_err(e("cuDeviceGetName"))?,
        compute_capability: (
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        ),
        // SAFETY: `dev` is a valid device handle.
        total_mem: unsafe { drv::device::total_mem(dev) }.map_err(e("cuDeviceTotalMem"))?,
        multiprocessors: attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
    })
}

/// Everything `smelt doctor` reports about CUDA.
#[derive(Clone, Debug)]
pub struct Probe {
    pub driver: LibInfo,
    pub nvrtc: LibInfo,
    pub cublas: LibInfo,
    pub devices: Vec<DeviceInfo>,
    /// Why there is no usable device (no driver, no GPU, init failure), if so.
    pub no_device_reason: Option<String>,
}

/// Probes the driver, NVRTC, cuBLAS and every device. Never panics; creates no context.
pub fn probe() -> Probe {
    let driver = driver_info();
    let nvrtc = nvrtc_info();
    let cublas = cublas_info();
    let (devices, no_device_reason) = match device_count() {
        Err(e) => (vec![], Some(e.to_string())),
        Ok(0) => (vec![], Some("the driver reports no CUDA device".to_string())),
        Ok(n) => {
            let mut devs = vec![];
            let mut err = None;
            for i in 0..n {
                match device_info(i) {
                    Ok(d) => devs.push(d),
                    Err(e) => err = Some(format!("cuda:{i}: {e}")),
                }
            }
            (devs, err)
        }
    };
    Probe { driver, nvrtc, cublas, devices, no_device_reason }
}

impl fmt::Display for LibInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.found {
            write!(f, "found")?;
            if let Some(v) = &self.version {
                write!(f, ", {v}")?;
            }
            if let Some(p) = &self.path {
                write!(f, ", {p}")?;
            }
            Ok(())
        } else {
            write!(f, "NOT FOUND: {}", self.detail.as_deref().unwrap_or("unknown reason"))
        }
    }
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "CUDA driver:  {}", self.driver)?;
        writeln!(f, "NVRTC:        {}", self.nvrtc)?;
        writeln!(f, "cuBLAS:       {}", self.cublas)?;
        if self.devices.is_empty() {
            write!(f, "CUDA devices: no CUDA device ({})", self.no_device_reason.as_deref().unwrap_or("none found"))?;
        } else {
            write!(f, "CUDA devices: {}", self.devices.len())?;
            for d in &self.devices {
                write!(
                    f,
                    "\n  cuda:{}: {}, compute capability {}.{} (sm_{}{}), {} SMs, {:.1} GiB",
                    d.ordinal,
                    d.name,
                    d.compute_capability.0,
                    d.compute_capability.1,
                    d.compute_capability.0,
                    d.compute_capability.1,
                    d.multiprocessors,
                    d.total_mem as f64 / (1u64 << 30) as f64
                )?;
            }
            if let Some(r) = &self.no_device_reason {
                write!(f, "\n  (warning: {r})")?;
            }
        }
        Ok(())
    }
}
