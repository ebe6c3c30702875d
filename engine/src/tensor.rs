use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use half::{bf16, f16};

use crate::storage::check_dtype;
use crate::{DType, Device, Error, Result, Storage, WithDType};

/// A dense, row-major tensor: shared storage, a shape, a dtype and a device.
///
/// Cloning a `Tensor` is cheap and shares storage. [`Tensor::reshape`] and [`Tensor::narrow_rows`]
/// return views of the same storage. Writes go through [`Tensor::cpu_write`] (CPU) or a kernel
/// launch (CUDA); there is no autograd tape.
#[derive(Clone)]
pub struct Tensor {
    storage: Arc<RwLock<Storage>>,
    shape: Vec<usize>,
    dtype: DType,
    device: Device,
    /// Offset of the first element, in elements, into `storage`.
    offset: usize,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor[{:?}, {}, {}]", self.shape, self.dtype, self.device)
    }
}

fn elem_count(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    fn from_storage(storage: Storage, shape: &[usize], dtype: DType) -> Tensor {
        let device = storage.device();
        Tensor { storage: Arc::new(RwLock::new(storage)), shape: shape.to_vec(), dtype, device, offset: 0 }
    }

    /// Copies `data` into a new tensor of `shape` on `device`.
    pub fn from_slice<T: WithDType>(data: &[T], shape: &[usize], device: Device) -> Result<Tensor> {
        let expected = elem_count(shape);
        if data.len() != expected {
            return Err(Error::ElementCount { op: "from_slice", shape: shape.to_vec(), len: data.len(), expected });
        }
        let storage = Storage::from_bytes(device, bytemuck::cast_slice(data))?;
        Ok(Self::from_storage(storage, shape, T::DTYPE))
    }

    /// A zero-filled tensor.
    pub fn zeros(shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        let bytes = elem_count(shape) * dtype.size_in_bytes();
        let storage = Storage::alloc(device, bytes)?;
        // CPU storage comes zeroed; device memory is filled on the stream (no host buffer, and
        // a graph capture can hold it).
        #[cfg(feature = "cuda")]
        if let Storage::Cuda(s) = &storage {
            s.device().memset_zero(s.ptr(), bytes)?;
        }
        Ok(Self::from_storage(storage, shape, dtype))
    }

    /// A tensor whose contents are unspecified (zero on CPU; whatever the allocator held on
    /// CUDA). For outputs a kernel overwrites completely.
    pub fn empty(shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        let bytes = elem_count(shape) * dtype.size_in_bytes();
        Ok(Self::from_storage(Storage::alloc(device, bytes)?, shape, dtype))
    }

    /// A tensor filled with `value` (converted to `dtype`). Tests use it to poison outputs.
    pub fn full(value: f64, shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        let n = elem_count(shape);
        let bytes: Vec<u8> = match dtype {
            DType::F32 => bytemuck::cast_slice(&vec![value as f32; n]).to_vec(),
            DType::BF16 => bytemuck::cast_slice(&vec![bf16::from_f64(value); n]).to_vec(),
            DType::F16 => bytemuck::cast_slice(&vec![f16::from_f64(value); n]).to_vec(),
            DType::I32 => bytemuck::cast_slice(&vec![value as i32; n]).to_vec(),
            DType::U32 => bytemuck::cast_slice(&vec![value as u32; n]).to_vec(),
        };
        Self::from_storage_bytes(&bytes, shape, dtype, device)
    }

    fn from_storage_bytes(bytes: &[u8], shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        Ok(Self::from_storage(Storage::from_bytes(device, bytes)?, shape, dtype))
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    /// Size of dimension `d`; negative-free: `dim(rank-1)` is the last.
    pub fn dim(&self, d: usize) -> usize {
        self.shape[d]
    }
    pub fn elem_count(&self) -> usize {
        elem_count(&self.shape)
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> Device {
        self.device
    }
    pub fn size_in_bytes(&self) -> usize {
        self.elem_count() * self.dtype.size_in_bytes()
    }
    /// `(rows, cols)` treating the last dimension as the row: the layout of every row op.
    pub fn rows_cols(&self) -> (usize, usize) {
        let cols = self.shape.last().copied().unwrap_or(1);
        let rows = self.elem_count().checked_div(cols).unwrap_or(0);
        (rows, cols)
    }
    /// True when `self` and `other` share storage.
    pub fn same_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage)
    }

    /// A view with a new shape and the same number of elements.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if elem_count(shape) != self.elem_count() {
            return Err(Error::shape("reshape", format!("{:?} -> {:?}", self.shape, shape)));
        }
        Ok(Tensor { shape: shape.to_vec(), ..self.clone() })
    }

    /// The same bytes read as `dtype`, which must be of the same size (u32 ↔ f32 ↔ i32,
    /// bf16 ↔ f16): a view, nothing is copied.
    pub fn bitcast(&self, dtype: DType) -> Result<Tensor> {
        if dtype.size_in_bytes() != self.dtype.size_in_bytes() {
            return Err(Error::msg(format!("bitcast: {} and {dtype} differ in size ({self:?})", self.dtype)));
        }
        Ok(Tensor { dtype, ..self.clone() })
    }

    /// A view of rows `start..start+len` along the first dimension.
    pub fn narrow_rows(&self, start: usize, len: usize) -> Result<Tensor> {
        let rows = *self.shape.first().ok_or_else(|| Error::shape("narrow_rows", "scalar tensor"))?;
        if start + len > rows {
            return Err(Error::shape("narrow_rows", format!("rows {start}..{} of {:?}", start + len, self.shape)));
        }
        let row = self.elem_count() / rows.max(1);
        let mut shape = self.shape.clone();
        shape[0] = len;
        Ok(Tensor { shape, offset: self.offset + start * row, ..self.clone() })
    }

    /// The view spanning `parts` when they are consecutive row views of one storage (each
    /// starting where the previous ends, with equal trailing dims and dtype), e.g. a fused
    /// `[q; k; v]` projection weight whose parts are `q_proj`, `k_proj` and `v_proj`; `None`
    /// otherwise (so callers can fall back to using the parts one by one).
    pub fn rows_view(parts: &[&Tensor]) -> Option<Tensor> {
        let first = *parts.first()?;
        let tail = first.shape.get(1..)?;
        let mut rows = 0;
        let mut next = first.offset;
        for p in parts {
            if !p.same_storage(first) || p.dtype != first.dtype || p.shape.get(1..) != Some(tail) || p.offset != next {
                return None;
            }
            rows += p.shape[0];
            next += p.elem_count();
        }
        let mut shape = first.shape.clone();
        shape[0] = rows;
        Some(Tensor { shape, ..first.clone() })
    }

    /// Read access to a CPU tensor's elements.
    pub fn cpu_read<T: WithDType>(&self) -> Result<CpuRef<'_, T>> {
        self.check_cpu::<T>("cpu_read")?;
        let guard = self.storage.try_read().map_err(|_| Error::Busy { op: "cpu_read" })?;
        Ok(CpuRef { guard, start: self.offset, len: self.elem_count(), _t: PhantomData })
    }

    /// Write access to a CPU tensor's elements. Fails with [`Error::Busy`] (instead of
    /// deadlocking) when the storage is being read, e.g. when an output aliases an input.
    pub fn cpu_write<T: WithDType>(&self) -> Result<CpuMut<'_, T>> {
        self.check_cpu::<T>("cpu_write")?;
        let guard = self.storage.try_write().map_err(|_| Error::Busy { op: "cpu_write" })?;
        Ok(CpuMut { guard, start: self.offset, len: self.elem_count(), _t: PhantomData })
    }

    fn check_cpu<T: WithDType>(&self, op: &'static str) -> Result<()> {
        if !self.device.is_cpu() {
            return Err(Error::UnsupportedDevice { op, device: self.device });
        }
        check_dtype::<T>(op, self.dtype)
    }

    /// Read access to the storage itself (for backends).
    pub fn storage(&self) -> Result<RwLockReadGuard<'_, Storage>> {
        self.storage.try_read().map_err(|_| Error::Busy { op: "storage" })
    }

    /// Offset of the first element, in elements, into the storage.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Raw device pointer of the first element of a CUDA tensor, for kernel launches.
    #[cfg(feature = "cuda")]
    pub fn cuda_ptr(&self) -> Result<u64> {
        match &*self.storage()? {
            Storage::Cuda(s) => Ok(s.ptr() + (self.offset * self.dtype.size_in_bytes()) as u64),
            Storage::Cpu(_) => Err(Error::UnsupportedDevice { op: "cuda_ptr", device: self.device }),
        }
    }

    /// The tensor's bytes, copied to the host.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.size_in_bytes()];
        self.storage()?.read_bytes(self.offset * self.dtype.size_in_bytes(), &mut out)?;
        Ok(out)
    }

    /// The elements, copied to a host `Vec<T>`; `T` must match the dtype.
    pub fn to_vec<T: WithDType>(&self) -> Result<Vec<T>> {
        check_dtype::<T>("to_vec", self.dtype)?;
        let bytes = self.to_bytes()?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// The elements as f32 on the host, converting from any dtype.
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        let bytes = self.to_bytes()?;
        Ok(bytes_to_f32(&bytes, self.dtype))
    }

    /// A copy on `device` (a clone sharing storage when already there).
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if device == self.device {
            return Ok(self.clone());
        }
        let bytes = self.to_bytes()?;
        self.with_bytes(&bytes, device)
    }

    fn with_bytes(&self, bytes: &[u8], device: Device) -> Result<Tensor> {
        Self::from_storage_bytes(bytes, &self.shape, self.dtype, device)
    }

    /// A copy converted to `dtype` (round-to-nearest-even for half types; NaN and ±Inf are
    /// preserved; float → int truncates toward zero and saturates).
    ///
    /// On CUDA this goes through the host; `smelt_kernels::cast` is the on-device fast path.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype {
            return Ok(self.clone());
        }
        let bytes = self.to_bytes()?;
        let out = convert_bytes(&bytes, self.dtype, dtype);
        Self::from_storage_bytes(&out, &self.shape, dtype, self.device)
    }

    /// Copies rows `from..from+count` (along the first dimension) onto rows `to..to+count` of
    /// the same tensor, on its device (a device-to-device copy on CUDA, queued on the stream).
    /// The two ranges must not overlap.
    pub fn copy_rows_within(&self, from: usize, to: usize, count: usize) -> Result<()> {
        let rows = *self.shape.first().ok_or_else(|| Error::shape("copy_rows_within", "scalar tensor"))?;
        if from.max(to) + count > rows || from.abs_diff(to) < count {
            return Err(Error::shape(
                "copy_rows_within",
                format!("rows {from}..{} onto {to}..{} of {:?}", from + count, to + count, self.shape),
            ));
        }
        let row = self.elem_count() / rows * self.dtype.size_in_bytes();
        let base = self.offset * self.dtype.size_in_bytes();
        self.copy_rows_within_bytes(base + from * row, base + to * row, count * row)
    }

    /// `bytes` bytes of this tensor's buffer from byte `src` onto byte `dst` (checked by the
    /// callers: in range, not overlapping).
    fn copy_rows_within_bytes(&self, src: usize, dst: usize, bytes: usize) -> Result<()> {
        let mut st = self.storage.try_write().map_err(|_| Error::Busy { op: "copy_rows_within" })?;
        match &mut *st {
            Storage::Cpu(s) => s.bytes_mut().copy_within(src..src + bytes, dst),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.device().dtod(s.ptr() + src as u64, s.ptr() + dst as u64, bytes)?,
        }
        Ok(())
    }

    /// Copies another tensor's contents into this one (same shape and dtype; any devices).
    /// Between two tensors on one CUDA device it is a device-to-device copy queued on the
    /// stream; otherwise the bytes go through the host.
    pub fn copy_from(&self, src: &Tensor) -> Result<()> {
        if src.shape != self.shape || src.dtype != self.dtype {
            return Err(Error::shape(
                "copy_from",
                format!("dst {:?} {} vs src {:?} {}", self.shape, self.dtype, src.shape, src.dtype),
            ));
        }
        let off = self.offset * self.dtype.size_in_bytes();
        #[cfg(feature = "cuda")]
        if self.device.is_cuda() && src.device == self.device {
            let (from, n) = (src.offset * self.dtype.size_in_bytes(), src.size_in_bytes());
            if self.same_storage(src) {
                // Overlapping ranges of one buffer go through the host below (a device copy
                // between overlapping ranges is undefined).
                if from.abs_diff(off) >= n {
                    return self.copy_rows_within_bytes(from, off, n);
                }
            } else {
                let read = src.storage()?;
                let mut st = self.storage.try_write().map_err(|_| Error::Busy { op: "copy_from" })?;
                if let (Storage::Cuda(a), Storage::Cuda(b)) = (&*read, &mut *st) {
                    return b.device().dtod(a.ptr() + from as u64, b.ptr() + off as u64, n);
                }
            }
        }
        let bytes = src.to_bytes()?;
        let mut st = self.storage.try_write().map_err(|_| Error::Busy { op: "copy_from" })?;
        match &mut *st {
            Storage::Cpu(s) => s.bytes_mut()[off..off + bytes.len()].copy_from_slice(&bytes),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.device().htod(&bytes, s, off)?,
        }
        Ok(())
    }
}

fn bytes_to_f32(bytes: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => bytemuck::pod_collect_to_vec(bytes),
        DType::BF16 => bytemuck::pod_collect_to_vec::<u8, bf16>(bytes).iter().map(|x| x.to_f32()).collect(),
        DType::F16 => bytemuck::pod_collect_to_vec::<u8, f16>(bytes).iter().map(|x| x.to_f32()).collect(),
        DType::I32 => bytemuck::pod_collect_to_vec::<u8, i32>(bytes).iter().map(|&x| x as f32).collect(),
        DType::U32 => bytemuck::pod_collect_to_vec::<u8, u32>(bytes).iter().map(|&x| x as f32).collect(),
    }
}

fn convert_bytes(bytes: &[u8], from: DType, to: DType) -> Vec<u8> {
    // Integers convert exactly through i64/f64; floats go through f32, which is exact for every
    // bf16/f16 value, and `half`'s from_f32 rounds to nearest even and keeps NaN/Inf.
    if !from.is_float() && !to.is_float() {
        let v: Vec<i64> = match from {
            DType::I32 => bytemuck::pod_collect_to_vec::<u8, i32>(bytes).iter().map(|&x| x as i64).collect(),
            _ => bytemuck::pod_collect_to_vec::<u8, u32>(bytes).iter().map(|&x| x as i64).collect(),
        };
        return match to {
            DType::I32 => bytemuck::cast_slice(&v.iter().map(|&x| x as i32).collect::<Vec<_>>()).to_vec(),
            _ => bytemuck::cast_slice(&v.iter().map(|&x| x as u32).collect::<Vec<_>>()).to_vec(),
        };
    }
    let f = bytes_to_f32(bytes, from);
    match to {
        DType::F32 => bytemuck::cast_slice(&f).to_vec(),
        DType::BF16 => bytemuck::cast_slice(&f.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>()).to_vec(),
        DType::F16 => bytemuck::cast_slice(&f.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>()).to_vec(),
        DType::I32 => bytemuck::cast_slice(&f.iter().map(|&x| x as i32).collect::<Vec<_>>()).to_vec(),
        DType::U32 => bytemuck::cast_slice(&f.iter().map(|&x| x as u32).collect::<Vec<_>>()).to_vec(),
    }
}

/// Read guard over a CPU tensor's elements.
pub struct CpuRef<'a, T> {
    guard: RwLockReadGuard<'a, Storage>,
    start: usize,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: WithDType> Deref for CpuRef<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &*self.guard {
            Storage::Cpu(s) => &s.as_slice::<T>()[self.start..self.start + self.len],
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => unreachable!("CpuRef is only built over CPU storage"),
        }
    }
}

/// Write guard over a CPU tensor's elements.
pub struct CpuMut<'a, T> {
    guard: RwLockWriteGuard<'a, Storage>,
    start: usize,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: WithDType> Deref for CpuMut<'_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &*self.guard {
            Storage::Cpu(s) => &s.as_slice::<T>()[self.start..self.start + self.len],
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => unreachable!("CpuMut is only built over CPU storage"),
        }
    }
}

impl<T: WithDType> DerefMut for CpuMut<'_, T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut *self.guard {
            Storage::Cpu(s) => &mut s.as_mut_slice::<T>()[self.start..self.start + self.len],
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => unreachable!("CpuMut is only built over CPU storage"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_view_spans_adjacent_views_only() {
        let t = Tensor::from_slice(&(0..24).map(|i| i as f32).collect::<Vec<_>>(), &[6, 4], Device::Cpu).unwrap();
        let (a, b, c) = (t.narrow_rows(0, 1).unwrap(), t.narrow_rows(1, 3).unwrap(), t.narrow_rows(4, 2).unwrap());
        let all = Tensor::rows_view(&[&a, &b, &c]).unwrap();
        assert_eq!(all.shape(), &[6, 4]);
        assert_eq!(all.to_vec::<f32>().unwrap(), t.to_vec::<f32>().unwrap());
        let bc = Tensor::rows_view(&[&b, &c]).unwrap();
        assert_eq!((bc.shape(), bc.offset()), (&[5usize, 4][..], 4));
        assert!(Tensor::rows_view(&[&a, &c]).is_none(), "a gap");
        assert!(Tensor::rows_view(&[&b, &a]).is_none(), "out of order");
        let other = Tensor::from_slice(&[0f32; 8], &[2, 4], Device::Cpu).unwrap();
        assert!(Tensor::rows_view(&[&c, &other]).is_none(), "another storage");
        assert!(Tensor::rows_view(&[&a.reshape(&[2, 2]).unwrap(), &b]).is_none(), "other row length");
        assert!(Tensor::rows_view(&[]).is_none());
    }

    /// Rows copied within one tensor (a view's rows count from the view's start), on every
    /// device the tests can reach; overlapping or out-of-range ranges are errors.
    #[test]
    fn copy_rows_within_copies_only_those_rows() {
        let data: Vec<f32> = (0..30).map(|i| i as f32).collect();
        #[cfg(feature = "cuda")]
        let gpu = crate::cuda::device(0).ok().map(|d| d.as_device());
        #[cfg(not(feature = "cuda"))]
        let gpu = None;
        for dev in std::iter::once(Device::Cpu).chain(gpu) {
            let t = Tensor::from_slice(&data, &[10, 3], Device::Cpu).unwrap().to_device(dev).unwrap();
            t.copy_rows_within(1, 6, 3).unwrap();
            let mut want = data.clone();
            want.copy_within(3..12, 18);
            assert_eq!(t.to_vec::<f32>().unwrap(), want, "{dev}");
            let view = t.narrow_rows(2, 8).unwrap().reshape(&[4, 6]).unwrap();
            view.copy_rows_within(3, 0, 1).unwrap();
            want.copy_within(24..30, 6);
            assert_eq!(t.to_vec::<f32>().unwrap(), want, "{dev}: view");
            let e = t.copy_rows_within(0, 2, 3).unwrap_err().to_string();
            assert!(e.contains("copy_rows_within") && e.contains("rows 0..3 onto 2..5"), "{e}");
            assert!(t.copy_rows_within(8, 0, 3).is_err(), "{dev}: past the end");
        }
    }

    #[test]
    fn roundtrip_reshape_narrow() {
        let data: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 2.0).collect();
        let t = Tensor::from_slice(&data, &[3, 4], Device::Cpu).unwrap();
        assert_eq!(t.to_vec::<f32>().unwrap(), data);
        assert_eq!(t.rows_cols(), (3, 4));
        let bits = t.narrow_rows(1, 1).unwrap().bitcast(DType::U32).unwrap().to_vec::<u32>().unwrap();
        assert_eq!(bits, data[4..8].iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        assert!(t.bitcast(DType::BF16).unwrap_err().to_string().contains("differ in size"));
        let r = t.reshape(&[2, 6]).unwrap();
        assert!(r.same_storage(&t));
        assert_eq!(r.shape(), &[2, 6]);
        let n = t.narrow_rows(1, 2).unwrap();
        assert_eq!(n.to_vec::<f32>().unwrap(), &data[4..12]);
        assert!(t.reshape(&[5, 2]).is_err());
        assert!(t.narrow_rows(2, 2).is_err());
        assert!(Tensor::from_slice(&data, &[5, 2], Device::Cpu).is_err());
        assert!(matches!(t.to_vec::<bf16>(), Err(Error::DType { .. })));
    }

    #[test]
    fn storage_is_64_byte_aligned() {
        for n in [1usize, 3, 17, 1000] {
            let t = Tensor::zeros(&[n], DType::BF16, Device::Cpu).unwrap();
            let r = t.cpu_read::<bf16>().unwrap();
            assert_eq!(r.as_ptr() as usize % 64, 0);
            assert_eq!(r.len(), n);
        }
    }

    #[test]
    fn write_while_reading_is_an_error_not_a_deadlock() {
        let t = Tensor::full(1.5, &[4], DType::F32, Device::Cpu).unwrap();
        let r = t.cpu_read::<f32>().unwrap();
        assert!(matches!(t.cpu_write::<f32>(), Err(Error::Busy { .. })));
        drop(r);
        t.cpu_write::<f32>().unwrap()[2] = 7.0;
        assert_eq!(t.to_vec::<f32>().unwrap(), vec![1.5, 1.5, 7.0, 1.5]);
    }

    #[test]
    fn casts_round_trip_and_keep_specials() {
        let vals = [0.0f32, -0.0, 1.0, -2.5, 3.140625, 1e-3, 65504.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN];
        let t = Tensor::from_slice(&vals, &[vals.len()], Device::Cpu).unwrap();
        for dt in [DType::BF16, DType::F16] {
            let back = t.to_dtype(dt).unwrap().to_dtype(DType::F32).unwrap().to_vec::<f32>().unwrap();
            for (a, b) in vals.iter().zip(&back) {
                if a.is_nan() {
                    assert!(b.is_nan(), "{dt}: NaN lost");
                } else if a.is_infinite() {
                    assert_eq!(a, b, "{dt}: inf changed");
                } else {
                    let tol = a.abs() as f64 * dt.epsilon();
                    assert!(((a - b).abs() as f64) <= tol, "{dt}: {a} -> {b}");
                }
            }
            // bf16/f16 -> f32 -> same half type is exact.
            let h = t.to_dtype(dt).unwrap();
            let again = h.to_dtype(DType::F32).unwrap().to_dtype(dt).unwrap();
            assert_eq!(h.to_bytes().unwrap(), again.to_bytes().unwrap());
        }
        // Round to nearest even: 1 + 2^-8 is a tie between bf16 1.0 and 1.0078125.
        let tie = Tensor::from_slice(&[1.0f32 + 1.0 / 256.0], &[1], Device::Cpu).unwrap();
        assert_eq!(tie.to_dtype(DType::BF16).unwrap().to_vec_f32().unwrap(), vec![1.0]);
        let ints = Tensor::from_slice(&[-3i32, 0, 7], &[3], Device::Cpu).unwrap();
        assert_eq!(ints.to_dtype(DType::F32).unwrap().to_vec::<f32>().unwrap(), vec![-3.0, 0.0, 7.0]);
        assert_eq!(
            ints.to_dtype(DType::U32).unwrap().to_dtype(DType::I32).unwrap().to_vec::<i32>().unwrap(),
            vec![-3, 0, 7]
        );
    }

    #[test]
    fn copy_from_and_full() {
        let a = Tensor::full(-1.0, &[2, 3], DType::F16, Device::Cpu).unwrap();
        let b = Tensor::from_slice(&[f16::from_f32(0.5); 6], &[2, 3], Device::Cpu).unwrap();
        a.copy_from(&b).unwrap();
        assert_eq!(a.to_vec_f32().unwrap(), vec![0.5; 6]);
        let wrong = Tensor::zeros(&[3, 2], DType::F16, Device::Cpu).unwrap();
        assert!(a.copy_from(&wrong).is_err());
    }
}
