use half::{bf16, f16};
use std::fmt;

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
    I32,
    U32,
}

impl DType {
    pub const fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::BF16 | DType::F16)
    }
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::I32 => "i32",
            DType::U32 => "u32",
        }
    }
    /// Machine epsilon of the storage type: the natural unit for comparison tolerances.
    pub fn epsilon(self) -> f64 {
        match self {
            DType::F32 => f32::EPSILON as f64,
            DType::BF16 => 0.0078125,
            DType::F16 => 0.0009765625,
            DType::I32 | DType::U32 => 0.0,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Host types that can be stored in a tensor.
pub trait WithDType: bytemuck::Pod + Copy + Send + Sync + fmt::Debug + 'static {
    const DTYPE: DType;
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
}

macro_rules! with_dtype {
    ($t:ty, $d:expr, |$a:ident| $to:expr, |$b:ident| $from:expr) => {
        impl WithDType for $t {
            const DTYPE: DType = $d;
            #[inline]
            fn to_f64(self) -> f64 {
                let $a = self;
                $to
            }
            #[inline]
            fn from_f64(v: f64) -> Self {
                let $b = v;
                $from
            }
        }
    };
}
with_dtype!(f32, DType::F32, |x| x as f64, |v| v as f32);
with_dtype!(bf16, DType::BF16, |x| x.to_f64(), |v| bf16::from_f64(v));
with_dtype!(f16, DType::F16, |x| x.to_f64(), |v| f16::from_f64(v));
with_dtype!(i32, DType::I32, |x| x as f64, |v| v as i32);
with_dtype!(u32, DType::U32, |x| x as f64, |v| v as u32);
