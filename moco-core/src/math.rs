//! Float32 math that vectorises: functions written without calls or branches the compiler cannot
//! turn into SIMD lanes (the C library's `expf` is a call per element).

const EXP_LO: f32 = -87.336_55; // exp below this is under f32::MIN_POSITIVE: 0
const EXP_HI: f32 = 88.376_26;

/// `exp(x)` in float32 (Cephes' `expf`: x = n ln2 + r, a degree-7 polynomial in r, times 2^n),
/// written so that a loop of it vectorises; within 2 ulp of the exact value, NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // NaN stays NaN.
    let xc = x.clamp(EXP_LO, EXP_HI);
    // n = round(x / ln 2), by the float trick that needs no rounding instruction.
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    let n = (xc * std::f32::consts::LOG2_E + MAGIC) - MAGIC;
    let r = xc - n * 0.693_359_4;
    let r = r - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let y = p * (r * r) + r + 1.0;
    let pow2n = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < EXP_LO {
        0.0
    } else {
        y * pow2n
    }
}

/// `erf(x)` in float32 by Abramowitz and Stegun's formula 7.1.26 (PyTorch's vectorised CPU
/// `erf` uses the same): `1 - t (a1 + t (a2 + ...)) exp(-x^2)` with `t = 1 / (1 + p |x|)`, sign
/// restored; within 6e-7 of the exact value (the formula 1.5e-7, float32 rounding the rest;
/// measured 5.3e-7).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A1: f32 = 0.254_829_6;
    const A2: f32 = -0.284_496_74;
    const A3: f32 = 1.421_413_7;
    const A4: f32 = -1.453_152;
    const A5: f32 = 1.061_405_4;
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = ((((A5 * t + A4) * t + A3) * t + A2) * t + A1) * t;
    let y = 1.0 - poly * exp(-a * a);
    y.copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_and_keeps_nan() {
        let mut worst = 0f64;
        let mut x = -87.3f32;
        while x < 88.3 {
            let want = f64::from(x).exp();
            let got = f64::from(exp(x));
            worst = worst.max((got - want).abs() / want);
            x += 0.000_37;
        }
        // 2 ulp of float32 is 2.4e-7 relative.
        assert!(worst < 2.4e-7, "relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn erf_is_within_6e7_of_the_exact_value() {
        let mut worst = 0f64;
        let mut x = -6.0f32;
        while x < 6.0 {
            let want = libm_erf(f64::from(x));
            worst = worst.max((f64::from(erf(x)) - want).abs());
            x += 0.000_61;
        }
        assert!(worst < 6e-7, "absolute error {worst:e}");
        assert!(erf(0.0).abs() < 1e-7);
        assert_eq!(erf(10.0), 1.0);
        assert_eq!(erf(-10.0), -1.0);
        assert!(erf(f32::NAN).is_nan());
    }

    /// erf in float64 from its Taylor series (|x| < 3) and continued fraction (beyond).
    fn libm_erf(x: f64) -> f64 {
        let a = x.abs();
        let v = if a < 3.0 {
            let (mut term, mut sum, mut n) = (a, a, 0.0);
            while term.abs() > 1e-17 * sum.abs() {
                n += 1.0;
                term *= -a * a / n;
                sum += term / (2.0 * n + 1.0);
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc(a) = exp(-a^2)/sqrt(pi) * 1/(a + 1/2/(a + 1/(a + 3/2/(a + ...))))
            let mut f = a;
            for k in (1..60).rev() {
                f = a + (k as f64 / 2.0) / f;
            }
            1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / f
        };
        v.copysign(x)
    }
}
