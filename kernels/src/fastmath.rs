//! Vectorisable f32 math shared by the CPU row passes (logprob_entropy's head, attention's
//! online softmax).

/// Below this exp() underflows f32; clamping keeps the polynomial's 2^n in range.
pub const EXP_MIN: f32 = -87.0;

/// exp(x) for x ≤ ~0 (clamped below at −87, where it returns ~1.6e-38 instead of 0), to
/// ~2 ulp: Cephes' expf polynomial with round-to-nearest by the 1.5·2²³ trick, so no
/// float→int conversion or libm call stops vectorisation. NaN stays NaN.
#[inline(always)]
#[allow(clippy::excessive_precision)] // Cephes' published coefficients, kept verbatim
pub fn exp_neg(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const MAGIC: f32 = 12_582_912.0;
    const C1: f32 = 0.693_359_375;
    const C2: f32 = -2.121_944_4e-4;
    let x = if x < EXP_MIN { EXP_MIN } else { x };
    let v = x * LOG2E + MAGIC;
    let n = v - MAGIC;
    let r = x - n * C1 - n * C2;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let e = p * r * r + r + 1.0;
    // The low mantissa bits of v hold n (two's complement); 2^n as a float's exponent.
    let scale = f32::from_bits(v.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127) << 23);
    e * scale
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_neg_is_accurate() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0f32 * i as f32 / 200_000.0;
            let (got, want) = (super::exp_neg(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 4.0 * f32::EPSILON as f64, "max relative error {worst}");
        assert!(super::exp_neg(f32::NAN).is_nan());
        assert!(super::exp_neg(f32::NEG_INFINITY) < 1e-37);
        assert!((super::exp_neg(1e-6) as f64 - 1e-6f64.exp()).abs() < 1e-7);
    }
}
