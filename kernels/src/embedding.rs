//! Token embedding: gather rows of a `[V, H]` table by id, and its backward, a scatter-add of
//! the output gradient into the table gradient.
//!
//! - Forward: `out[.., :] = table[ids[..], :]`, `out` of shape `ids.shape ++ [H]` and the table's
//!   dtype (a copy: any float dtype; f32 and bf16 on CUDA too).
//! - Backward: `d_table[ids[t], :] += d_out[t, :]` (accumulated into the caller's f32 `d_table`,
//!   so tied-embedding gradients from the LM head can share the buffer). `d_out` f32 or bf16.
//!   CPU: deterministic — each table row is owned by one task, which adds its tokens in
//!   increasing token order. CUDA: `atomicAdd` per element, so the order in which repeated ids
//!   are added (and hence the last bits of the sum) is NOT deterministic.
//!
//! Ids are u32 or i32. Every id is checked against V before anything runs; an out-of-range id
//! is an error naming the id, its position and V. On CUDA this check copies the ids to the host
//! (N·4 bytes and a stream sync), which is what makes a readable error possible; callers whose
//! ids are on the host use [`embedding_from_host`] / [`embedding_backward_from_host`], which
//! check them there and only upload them.
//!
//! CUDA kernel versions (thread mappings in `embedding.cu`; pin one with
//! `crate::versions::force`): forward (op name `"embedding"`) v1/v2/v3 copy 2/4/16-byte units
//! on a grid-stride loop, v4 (the default) a 2-D grid (units × tokens) with the widest unit
//! that fits; backward (`"embedding_backward"`) v1 grid-stride, v2 (the default) 2-D grid, both
//! with atomics.

use rayon::prelude::*;
use smelt_engine::{bf16, f16, DType, Device, Error, Result, Tensor, WithDType};

crate::kernel_source!("embedding");

/// `table[ids]`: shape `ids.shape ++ [H]`, dtype of `table [V, H]`.
pub fn embedding(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
    let v = check_table(table)?;
    let idv = checked_ids("embedding", ids, v, table.device())?;
    gather(ids, &idv, table)
}

/// [`embedding`] of ids held on the host, `[N]`: checked there and uploaded once, so on CUDA
/// nothing is copied back (a device-side `ids` tensor has to be, for its check: a stream sync).
pub fn embedding_from_host(ids: &[u32], table: &Tensor) -> Result<Tensor> {
    let v = check_table(table)?;
    check_range("embedding", ids.iter().map(|&id| i64::from(id)), v, &[ids.len()])?;
    gather(&Tensor::from_slice(ids, &[ids.len()], table.device())?, ids, table)
}

/// [`embedding`] of ids already on the table's CUDA device, **not range-checked** (the check
/// would read them back, a wait a captured graph cannot hold). For ids the caller guarantees
/// are below V, e.g. tokens its own sampler drew from this vocabulary.
pub fn embedding_unchecked(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
    check_table(table)?;
    match table.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(ord) if ids.device() == table.device() && ids.dtype() == DType::U32 => {
            let h = table.dim(1);
            let mut shape = ids.shape().to_vec();
            shape.push(h);
            let out = Tensor::empty(&shape, table.dtype(), table.device())?;
            cuda::forward(ord, ids, table, &out, ids.elem_count())?;
            Ok(out)
        }
        _ => Err(Error::shape(
            "embedding_unchecked",
            format!(
                "u32 ids on the table's CUDA device, got {} on {} for a table on {}",
                ids.dtype(),
                ids.device(),
                table.device()
            ),
        )),
    }
}

/// V after checking that `table` is a 2-D float `[V, H]`.
fn check_table(table: &Tensor) -> Result<usize> {
    if table.rank() != 2 || !table.dtype().is_float() {
        return Err(Error::shape(
            "embedding",
            format!("table must be a 2-D float [V, H] tensor, got {:?} {}", table.shape(), table.dtype()),
        ));
    }
    Ok(table.dim(0))
}

/// The forward with checked ids: `ids` on the table's device and `idv`, the same ids on the host.
fn gather(ids: &Tensor, idv: &[u32], table: &Tensor) -> Result<Tensor> {
    let h = table.dim(1);
    let mut shape = ids.shape().to_vec();
    shape.push(h);
    let out = Tensor::empty(&shape, table.dtype(), table.device())?;
    match table.device() {
        Device::Cpu => {
            fn go<T: WithDType>(ids: &[u32], table: &Tensor, out: &Tensor) -> Result<()> {
                cpu::embedding(ids, &table.cpu_read::<T>()?, table.dim(1), &mut out.cpu_write::<T>()?);
                Ok(())
            }
            match table.dtype() {
                DType::F32 => go::<f32>(idv, table, &out)?,
                DType::BF16 => go::<bf16>(idv, table, &out)?,
                DType::F16 => go::<f16>(idv, table, &out)?,
                dtype => return Err(Error::UnsupportedDType { op: "embedding", dtype }),
            }
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ord) => cuda::forward(ord, ids, table, &out, idv.len())?,
        #[cfg(not(feature = "cuda"))]
        device => return Err(Error::UnsupportedDevice { op: "embedding", device }),
    }
    Ok(out)
}

/// `d_table[ids[t]] += d_out[t]` for every token t. `d_table [V, H]` f32; `d_out` has shape
/// `ids.shape ++ [H]`, f32 or bf16.
pub fn embedding_backward(ids: &Tensor, d_out: &Tensor, d_table: &Tensor) -> Result<()> {
    check_backward(ids.shape(), d_out, d_table)?;
    let idv = checked_ids("embedding_backward", ids, d_table.dim(0), d_table.device())?;
    scatter(ids, &idv, d_out, d_table)
}

/// The backward's shape, dtype and device checks (the ids' range is checked apart).
fn check_backward(ids_shape: &[usize], d_out: &Tensor, d_table: &Tensor) -> Result<()> {
    let op = "embedding_backward";
    if d_table.rank() != 2 || d_table.dtype() != DType::F32 {
        return Err(Error::shape(
            op,
            format!("d_table must be [V, H] f32, got {:?} {}", d_table.shape(), d_table.dtype()),
        ));
    }
    let mut want = ids_shape.to_vec();
    want.push(d_table.dim(1));
    if d_out.shape() != want.as_slice() || !matches!(d_out.dtype(), DType::F32 | DType::BF16) {
        return Err(Error::shape(
            op,
            format!(
                "d_out {:?} {} must be {want:?} f32/bf16 for ids {:?} and d_table {:?}",
                d_out.shape(),
                d_out.dtype(),
                ids_shape,
                d_table.shape()
            ),
        ));
    }
    if d_out.device() != d_table.device() {
        return Err(Error::DeviceMismatch { op, a: d_out.device(), b: d_table.device() });
    }
    Ok(())
}

/// [`embedding_backward`] of ids held on the host, like [`embedding_from_host`].
pub fn embedding_backward_from_host(ids: &[u32], d_out: &Tensor, d_table: &Tensor) -> Result<()> {
    check_backward(&[ids.len()], d_out, d_table)?;
    check_range("embedding_backward", ids.iter().map(|&id| i64::from(id)), d_table.dim(0), &[ids.len()])?;
    scatter(&Tensor::from_slice(ids, &[ids.len()], d_table.device())?, ids, d_out, d_table)
}

/// The backward with checked ids (as [`gather`]).
fn scatter(ids: &Tensor, idv: &[u32], d_out: &Tensor, d_table: &Tensor) -> Result<()> {
    let h = d_table.dim(1);
    match d_table.device() {
        Device::Cpu => {
            let mut dt = d_table.cpu_write::<f32>()?;
            match d_out.dtype() {
                DType::F32 => cpu::embedding_backward(idv, &d_out.cpu_read::<f32>()?, h, &mut dt),
                _ => cpu::embedding_backward(idv, &d_out.cpu_read::<bf16>()?, h, &mut dt),
            }
            Ok(())
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ord) => cuda::backward(ord, ids, d_out, d_table, idv.len()),
        #[cfg(not(feature = "cuda"))]
        device => {
            let _ = ids;
            Err(Error::UnsupportedDevice { op: "embedding_backward", device })
        }
    }
}

/// The ids as u32 on the host, after checking dtype, device and range.
fn checked_ids(op: &'static str, ids: &Tensor, vocab: usize, device: Device) -> Result<Vec<u32>> {
    if ids.device() != device {
        return Err(Error::DeviceMismatch { op, a: ids.device(), b: device });
    }
    let out: Vec<i64> = match ids.dtype() {
        DType::U32 => ids.to_vec::<u32>()?.into_iter().map(i64::from).collect(),
        DType::I32 => ids.to_vec::<i32>()?.into_iter().map(i64::from).collect(),
        got => return Err(Error::DType { op, expected: DType::U32, got }),
    };
    check_range(op, out.iter().copied(), vocab, ids.shape())?;
    Ok(out.into_iter().map(|id| id as u32).collect())
}

/// An error naming the first id outside `0..vocab`, its position and the ids' shape.
fn check_range(op: &str, ids: impl Iterator<Item = i64>, vocab: usize, shape: &[usize]) -> Result<()> {
    match ids.enumerate().find(|&(_, id)| id < 0 || id >= vocab as i64) {
        Some((pos, id)) => Err(Error::msg(format!(
            "{op}: token id {id} at position {pos} is out of range for vocab size V = {vocab} (ids {shape:?})"
        ))),
        None => Ok(()),
    }
}

/// Slice-level CPU implementations (the reference for the CUDA kernels). Ids must be < V.
pub mod cpu {
    use super::*;

    /// `out[t] = table[ids[t]]`, rows of length `h`.
    pub fn embedding<T: Copy + Send + Sync>(ids: &[u32], table: &[T], h: usize, out: &mut [T]) {
        if h == 0 {
            return;
        }
        smelt_engine::cpu::pool().install(|| {
            out.par_chunks_mut(h).zip(ids.par_iter()).with_min_len(64).for_each(|(o, &id)| {
                let r = id as usize * h;
                o.copy_from_slice(&table[r..r + h]);
            })
        })
    }

    /// `d_table[ids[t]] += d_out[t]`. Deterministic: tokens are bucketed by id (counting sort,
    /// stable), and each table row adds its tokens in increasing token order.
    pub fn embedding_backward<T: WithDType>(ids: &[u32], d_out: &[T], h: usize, d_table: &mut [f32]) {
        if h == 0 || ids.is_empty() {
            return;
        }
        let v = d_table.len() / h;
        // CSR of token indices per id.
        let mut start = vec![0u32; v + 1];
        for &id in ids {
            start[id as usize + 1] += 1;
        }
        for i in 0..v {
            start[i + 1] += start[i];
        }
        let mut fill = start.clone();
        let mut order = vec![0u32; ids.len()];
        for (t, &id) in ids.iter().enumerate() {
            order[fill[id as usize] as usize] = t as u32;
            fill[id as usize] += 1;
        }
        smelt_engine::cpu::pool().install(|| {
            d_table.par_chunks_mut(h).enumerate().with_min_len(256).for_each(|(id, row)| {
                for &t in &order[start[id] as usize..start[id + 1] as usize] {
                    let g = &d_out[t as usize * h..(t as usize + 1) * h];
                    for (r, &g) in row.iter_mut().zip(g) {
                        *r += g.to_f64() as f32;
                    }
                }
            })
        })
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::cuda::{launch, Arg, LaunchCfg};

    fn cfg(n: u64) -> LaunchCfg {
        let block = 256u32;
        let grid = n.div_ceil(block as u64).clamp(1, 132 * 16) as u32;
        LaunchCfg { grid: (grid, 1, 1), block: (block, 1, 1), smem: 0 }
    }

    /// The 2-D launch of forward v4 and backward v2: up to 256 threads a block, `cols` across
    /// x (over several blocks when wider), rows across y; rows beyond the grid's 65,535 blocks
    /// along y are looped over in the kernel.
    fn cfg_2d(cols: usize, rows: usize) -> LaunchCfg {
        let bx = cols.clamp(1, 256);
        let by = (256 / bx).max(1);
        let grid = (cols.div_ceil(bx) as u32, rows.div_ceil(by).clamp(1, max_grid_y()) as u32, 1);
        LaunchCfg { grid, block: (bx as u32, by as u32, 1), smem: 0 }
    }

    #[cfg(not(test))]
    fn max_grid_y() -> usize {
        65_535
    }
    /// Tests lower it to reach the token loop at emulator-sized shapes.
    #[cfg(test)]
    pub(super) static MAX_GRID_Y: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(65_535);
    #[cfg(test)]
    fn max_grid_y() -> usize {
        MAX_GRID_Y.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A row copy in the widest unit (16, 4 or 2 bytes) that divides the row and the alignment.
    /// Versions (embedding.cu): v1 2-byte, v2 4-byte, v3 16-byte units on a grid-stride loop;
    /// v4 the 2-D grid with the widest unit.
    pub fn forward(ord: usize, ids: &Tensor, table: &Tensor, out: &Tensor, n: usize) -> Result<()> {
        let row_bytes = (table.dim(1) * table.dtype().size_in_bytes()) as u64;
        if n == 0 || row_bytes == 0 {
            return Ok(());
        }
        let (pi, pt, po) = (ids.cuda_ptr()?, table.cuda_ptr()?, out.cuda_ptr()?);
        let fits = |u: u64| row_bytes % u == 0 && pt % u == 0 && po % u == 0;
        let unit = if fits(16) {
            16
        } else if fits(4) {
            4
        } else {
            2
        };
        let mut allowed = vec![1];
        if fits(4) {
            allowed.push(2);
        }
        if fits(16) {
            allowed.push(3);
        }
        if row_bytes / unit <= u32::MAX as u64 {
            allowed.push(4);
        }
        let version = crate::versions::pick("embedding", &allowed)?;
        if version == 4 {
            let units = (row_bytes / unit) as usize;
            let func = format!("embedding_fwd_2d_u{unit}");
            let args = [Arg::Ptr(po), Arg::Ptr(pt), Arg::Ptr(pi), Arg::U64(n as u64), Arg::U32(units as u32)];
            return launch(ord, &SRC, &func, cfg_2d(units, n), &args);
        }
        let (func, unit) = match version {
            3 => ("embedding_fwd_v16", 16),
            2 => ("embedding_fwd_v4", 4),
            _ => ("embedding_fwd_v2", 2),
        };
        let units = row_bytes / unit;
        let args = [Arg::Ptr(po), Arg::Ptr(pt), Arg::Ptr(pi), Arg::U64(n as u64), Arg::U64(units)];
        launch(ord, &SRC, func, cfg(n as u64 * units), &args)
    }

    /// Versions (embedding.cu, op name `embedding_backward`): v1 grid-stride, v2 2-D grid.
    pub fn backward(ord: usize, ids: &Tensor, d_out: &Tensor, d_table: &Tensor, n: usize) -> Result<()> {
        let h = d_table.dim(1);
        if n == 0 || h == 0 {
            return Ok(());
        }
        let allowed: &[u32] = if h <= u32::MAX as usize { &[1, 2] } else { &[1] };
        let version = crate::versions::pick("embedding_backward", allowed)?;
        let dt = if d_out.dtype() == DType::F32 { "f32" } else { "bf16" };
        let (pt, pd, pi) = (d_table.cuda_ptr()?, d_out.cuda_ptr()?, ids.cuda_ptr()?);
        if version == 2 {
            let args = [Arg::Ptr(pt), Arg::Ptr(pd), Arg::Ptr(pi), Arg::U64(n as u64), Arg::U32(h as u32)];
            return launch(ord, &SRC, &format!("embedding_bwd_2d_{dt}"), cfg_2d(h, n), &args);
        }
        let args = [Arg::Ptr(pt), Arg::Ptr(pd), Arg::Ptr(pi), Arg::U64(n as u64), Arg::U64(h as u64)];
        launch(ord, &SRC, &format!("embedding_bwd_{dt}"), cfg(n as u64 * h as u64), &args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use smelt_engine::Rng;

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, Device::Cpu).unwrap()
    }

    /// Host ids give what device ids give, with the same range check, and on a device nothing
    /// is copied back.
    fn check_from_host(dev: Device) {
        let mut rng = Rng::new(44);
        let (n, v, h) = (37usize, 11usize, 24usize);
        let table = t(&randn(&mut rng, v * h, 1.0), &[v, h]).to_device(dev).unwrap();
        let ids: Vec<u32> = (0..n).map(|_| rng.below(v as u64) as u32).collect();
        let ids_t = Tensor::from_slice(&ids, &[n], dev).unwrap();
        let want = embedding(&ids_t, &table).unwrap().to_vec::<f32>().unwrap();
        let d_out = t(&randn(&mut rng, n * h, 1.0), &[n, h]).to_device(dev).unwrap();
        let d_want = Tensor::zeros(&[v, h], DType::F32, dev).unwrap();
        embedding_backward(&ids_t, &d_out, &d_want).unwrap();
        let d_got = Tensor::zeros(&[v, h], DType::F32, dev).unwrap();
        #[cfg(feature = "cuda")]
        let record = |f: &mut dyn FnMut()| match dev {
            Device::Cuda(i) => {
                use smelt_engine::cuda::profile;
                let (_, rows) = profile::record(&smelt_engine::cuda::device(i).unwrap(), f).unwrap();
                let back: usize = rows.iter().filter(|r| r.name == "copy device→host").map(|r| r.calls).sum();
                assert_eq!(back, 0, "from_host copied back: {rows:?}");
            }
            _ => f(),
        };
        #[cfg(not(feature = "cuda"))]
        let record = |f: &mut dyn FnMut()| f();
        let mut got = None;
        record(&mut || {
            got = Some(embedding_from_host(&ids, &table).unwrap());
            embedding_backward_from_host(&ids, &d_out, &d_got).unwrap();
        });
        assert_eq!(got.unwrap().to_vec::<f32>().unwrap(), want, "{dev}: forward");
        // The device backward adds with atomics, in no fixed order.
        let (dg, dw) = (d_got.to_vec::<f32>().unwrap(), d_want.to_vec::<f32>().unwrap());
        assert_close(&dg, &to_f64(&dw), 1e-6, 1e-6, &format!("{dev}: backward"));
        let e = embedding_from_host(&[3, 11], &table).unwrap_err().to_string();
        assert!(e.contains("embedding: token id 11 at position 1 is out of range for vocab size V = 11"), "{e}");
        let e = embedding_backward_from_host(&[11], &d_out.narrow_rows(0, 1).unwrap(), &d_got).unwrap_err().to_string();
        assert!(e.contains("embedding_backward: token id 11 at position 0"), "{e}");
    }

    #[test]
    fn embedding_from_host_matches_device_ids() {
        check_from_host(Device::Cpu);
    }

    #[test]
    fn embedding_from_host_device_copies_nothing_back() {
        let Some(dev) = test_cuda_device() else { return };
        check_from_host(dev);
    }

    #[test]
    fn embedding_gathers_rows_on_odd_shapes() {
        let mut rng = Rng::new(41);
        for (n, v, h) in [(1usize, 1usize, 1usize), (7, 5, 37), (3000, 50, 3), (4, 151, 896)] {
            let table = randn(&mut rng, v * h, 1.0);
            let ids: Vec<u32> = (0..n).map(|_| rng.below(v as u64) as u32).collect();
            let want: Vec<f64> = ids
                .iter()
                .flat_map(|&id| table[id as usize * h..(id as usize + 1) * h].iter().map(|&x| x as f64))
                .collect();
            let tt = t(&table, &[v, h]);
            let got = embedding(&Tensor::from_slice(&ids, &[n], Device::Cpu).unwrap(), &tt).unwrap();
            assert_eq!(got.shape(), &[n, h]);
            assert_close(&got.to_vec::<f32>().unwrap(), &want, 0.0, 0.0, "embedding f32");
            // i32 ids and a 2-D ids tensor; bf16 table is an exact copy too.
            let ids_i: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
            let th = tt.to_dtype(DType::BF16).unwrap();
            let got = embedding(&Tensor::from_slice(&ids_i, &[1, n], Device::Cpu).unwrap(), &th).unwrap();
            assert_eq!(got.shape(), &[1, n, h]);
            let hv = th.to_vec::<bf16>().unwrap();
            let want: Vec<bf16> =
                ids.iter().flat_map(|&id| hv[id as usize * h..(id as usize + 1) * h].to_vec()).collect();
            assert_eq!(got.to_vec::<bf16>().unwrap(), want);
        }
    }

    #[test]
    fn embedding_out_of_range_names_the_id_and_vocab() {
        let table = Tensor::zeros(&[10, 4], DType::F32, Device::Cpu).unwrap();
        let ids = Tensor::from_slice(&[1u32, 10, 3], &[3], Device::Cpu).unwrap();
        let e = embedding(&ids, &table).unwrap_err().to_string();
        assert!(e.contains("embedding") && e.contains("id 10") && e.contains("V = 10"), "{e}");
        let ids = Tensor::from_slice(&[-1i32], &[1], Device::Cpu).unwrap();
        let e = embedding(&ids, &table).unwrap_err().to_string();
        assert!(e.contains("id -1") && e.contains("V = 10"), "{e}");
        let ids = Tensor::from_slice(&[12u32], &[1], Device::Cpu).unwrap();
        let d = Tensor::zeros(&[1, 4], DType::F32, Device::Cpu).unwrap();
        let e = embedding_backward(&ids, &d, &table).unwrap_err().to_string();
        assert!(e.contains("embedding_backward") && e.contains("id 12"), "{e}");
        let ids = Tensor::from_slice(&[1.0f32], &[1], Device::Cpu).unwrap();
        assert!(embedding(&ids, &table).unwrap_err().to_string().contains("u32"));
        let ids = Tensor::from_slice(&[1u32, 2], &[2], Device::Cpu).unwrap();
        let e = embedding_backward(&ids, &d, &table).unwrap_err().to_string();
        assert!(e.contains("embedding_backward") && e.contains("[1, 4]") && e.contains("[2, 4]"), "{e}");
    }

    #[test]
    fn embedding_backward_scatter_adds_in_f64_and_by_finite_differences() {
        let mut rng = Rng::new(42);
        // Many repeats of few ids: the accumulation path.
        for (n, v, h) in [(1usize, 1usize, 1usize), (500, 7, 37), (9, 3, 100)] {
            let ids: Vec<u32> = (0..n).map(|_| rng.below(v as u64) as u32).collect();
            let g = randn(&mut rng, n * h, 1.0);
            let init = randn(&mut rng, v * h, 1.0);
            let mut want = to_f64(&init);
            for (tk, &id) in ids.iter().enumerate() {
                for j in 0..h {
                    want[id as usize * h + j] += g[tk * h + j] as f64;
                }
            }
            let idt = Tensor::from_slice(&ids, &[n], Device::Cpu).unwrap();
            let dt = t(&init, &[v, h]);
            embedding_backward(&idt, &t(&g, &[n, h]), &dt).unwrap();
            assert_close(&dt.to_vec::<f32>().unwrap(), &want, 1e-5, 1e-5, &format!("d_table [{n},{v},{h}]"));
            // Same bits on a second run.
            let dt2 = t(&init, &[v, h]);
            embedding_backward(&idt, &t(&g, &[n, h]), &dt2).unwrap();
            assert_eq!(dt.to_bytes().unwrap(), dt2.to_bytes().unwrap());
            // bf16 d_out.
            let gh = t(&g, &[n, h]).to_dtype(DType::BF16).unwrap();
            let dt3 = Tensor::zeros(&[v, h], DType::F32, Device::Cpu).unwrap();
            embedding_backward(&idt, &gh, &dt3).unwrap();
            let gv = gh.to_vec_f32().unwrap();
            let mut want = vec![0f64; v * h];
            for (tk, &id) in ids.iter().enumerate() {
                for j in 0..h {
                    want[id as usize * h + j] += gv[tk * h + j] as f64;
                }
            }
            assert_close(&dt3.to_vec::<f32>().unwrap(), &want, 1e-5, 1e-5, "d_table from bf16 d_out");
        }
        // Finite differences of L = Σ g·table[ids] with respect to the table.
        let (n, v, h) = (6usize, 4usize, 3usize);
        let ids = [2u32, 0, 2, 3, 2, 0];
        let (table, g) = (randn(&mut rng, v * h, 1.0), randn(&mut rng, n * h, 1.0));
        let loss = |tb: &[f64]| -> f64 {
            (0..n)
                .flat_map(|tk| (0..h).map(move |j| (tk, j)))
                .map(|(tk, j)| g[tk * h + j] as f64 * tb[ids[tk] as usize * h + j])
                .sum()
        };
        let want = finite_diff(loss, &to_f64(&table), 1e-5);
        let dt = Tensor::zeros(&[v, h], DType::F32, Device::Cpu).unwrap();
        embedding_backward(&Tensor::from_slice(&ids, &[n], Device::Cpu).unwrap(), &t(&g, &[n, h]), &dt).unwrap();
        assert_close(&dt.to_vec::<f32>().unwrap(), &want, 1e-6, 1e-5, "d_table by finite differences");
    }

    /// Resets the test grid limit when a device test ends, even by a panic.
    #[cfg(feature = "cuda")]
    struct Restore;
    #[cfg(feature = "cuda")]
    impl Drop for Restore {
        fn drop(&mut self) {
            cuda::MAX_GRID_Y.store(65_535, std::sync::atomic::Ordering::Relaxed);
        }
    }

    #[test]
    fn embedding_device_matches_cpu() {
        let Some(dev) = test_cuda_device() else { return };
        #[cfg(feature = "cuda")]
        let _restore = Restore;
        let mut rng = Rng::new(43);
        // (n, v, h, most blocks along y for the 2-D kernels). Rows of 2, 4 and 16-byte units,
        // rows wider than one block (h 1100), and a grid of 3 rows of blocks that loops.
        let shapes = [
            (1usize, 1usize, 1usize, 65_535usize),
            (37, 11, 37, 65_535),
            (4096, 1000, 896, 65_535),
            (513, 7, 64, 65_535),
            (300, 50, 128, 65_535),
            (10, 5, 3, 65_535),
            (5, 3, 1100, 65_535),
            (2000, 30, 40, 3),
        ];
        for (n, v, h, max_grid_y) in shapes {
            #[cfg(feature = "cuda")]
            cuda::MAX_GRID_Y.store(max_grid_y, std::sync::atomic::Ordering::Relaxed);
            let _ = max_grid_y;
            for dt in [DType::F32, DType::BF16] {
                let table = t(&randn(&mut rng, v * h, 1.0), &[v, h]).to_dtype(dt).unwrap();
                let ids: Vec<u32> = (0..n).map(|_| rng.below(v as u64) as u32).collect();
                let idc = Tensor::from_slice(&ids, &[n], Device::Cpu).unwrap();
                let idg = idc.to_device(dev).unwrap();
                let idi =
                    Tensor::from_slice(&ids.iter().map(|&i| i as i32).collect::<Vec<_>>(), &[n], Device::Cpu).unwrap();
                let idig = idi.to_device(dev).unwrap();
                let tg = table.to_device(dev).unwrap();
                let want = embedding(&idc, &table).unwrap().to_bytes().unwrap();
                // Device buffers are 256-byte aligned, so the row length decides the units.
                let row_bytes = h * dt.size_in_bytes();
                for ver in [1u32, 2, 3, 4] {
                    let _v = crate::versions::scoped("embedding", ver);
                    let what = format!("v{ver} {dt} [{n},{v},{h}]");
                    let fits = match ver {
                        2 => row_bytes % 4 == 0,
                        3 => row_bytes % 16 == 0,
                        _ => true,
                    };
                    if !fits {
                        let e = embedding(&idg, &tg).unwrap_err().to_string();
                        assert!(e.contains("embedding") && e.contains(&format!("version {ver}")), "{what}: {e}");
                        continue;
                    }
                    drop(Tensor::full(f64::NAN, &[n, h], dt, dev).unwrap());
                    let got = embedding(&idg, &tg).unwrap();
                    assert_eq!(got.to_bytes().unwrap(), want, "embedding {what}");
                    drop(Tensor::full(f64::NAN, &[n, h], dt, dev).unwrap());
                    let got = embedding(&idig, &tg).unwrap();
                    assert_eq!(got.to_bytes().unwrap(), want, "embedding i32 {what}");
                }

                let g = t(&randn(&mut rng, n * h, 1.0), &[n, h]).to_dtype(dt).unwrap();
                let init = randn(&mut rng, v * h, 1.0);
                let dc = t(&init, &[v, h]);
                embedding_backward(&idc, &g, &dc).unwrap();
                let gg = g.to_device(dev).unwrap();
                for ver in [1u32, 2] {
                    let _v = crate::versions::scoped("embedding_backward", ver);
                    let dg = t(&init, &[v, h]).to_device(dev).unwrap();
                    embedding_backward(&idg, &gg, &dg).unwrap();
                    // atomicAdd order differs from the CPU's token order: f32 sums of up to n/v terms.
                    let tol = 1e-6 * (n as f64 / v as f64).max(1.0).sqrt() * 8.0;
                    assert_close(
                        &dg.to_vec_f32().unwrap(),
                        &to_f64(&dc.to_vec_f32().unwrap()),
                        tol,
                        1e-5,
                        &format!("d_table v{ver} {dt} [{n},{v},{h}]"),
                    );
                }
                // Out-of-range ids fail on CUDA too.
                let bad = Tensor::from_slice(&[v as u32], &[1], Device::Cpu).unwrap().to_device(dev).unwrap();
                assert!(embedding(&bad, &tg).is_err());
            }
        }
    }
}
