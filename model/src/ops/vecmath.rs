//! Element-wise math written so that LLVM vectorises it: 16-lane blocks, no branches, and
//! polynomial `exp`/`erf` instead of libm calls. Every kernel body is `#[inline(always)]` and
//! generic over [`MulAdd`], then instantiated twice by [`dispatch!`]: once inside an AVX-512
//! `#[target_feature]` function (fused multiply-adds, 512-bit vectors) and once plainly for any
//! other CPU.

pub const LANES: usize = 16;

/// How `a * b + c` is computed: fused where the CPU has FMA (inside the AVX-512 instantiation),
/// plain elsewhere (a software `fma` call would be slow).
pub trait MulAdd: Copy {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

#[derive(Clone, Copy)]
pub struct Fused;
#[derive(Clone, Copy)]
pub struct Plain;

impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl MulAdd for Plain {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// Whether the running CPU takes the AVX-512 instantiations (checked once).
pub fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static DETECTED: OnceLock<bool> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines `$name(args)` that runs `$body::<Fused>` compiled for AVX-512 when the CPU has it and
/// `$body::<Plain>` otherwise.
macro_rules! dispatch {
    ($vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:ident) => {
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn wide($($arg: $ty),*) $(-> $ret)? {
                    $body::<$crate::ops::vecmath::Fused>($($arg),*)
                }
                if $crate::ops::vecmath::has_avx512() {
                    // SAFETY: the CPU supports every feature `wide` is compiled for.
                    return unsafe { wide($($arg),*) };
                }
            }
            $body::<$crate::ops::vecmath::Plain>($($arg),*)
        }
    };
}
pub(crate) use dispatch;

/// e^x, about 1 ulp (Cephes' expf polynomial); flushes below -87.3 to ~0.
#[inline(always)]
pub fn exp<F: MulAdd>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that n * LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    // t = ROUND + n exactly, so n sits in t's low mantissa bits.
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = F::mul_add(n, -LN2_LO, F::mul_add(n, -LN2_HI, x));
    let mut p = 1.987_569_1e-4;
    p = F::mul_add(p, r, 1.398_199_9e-3);
    p = F::mul_add(p, r, 8.333_452e-3);
    p = F::mul_add(p, r, 4.166_579_6e-2);
    p = F::mul_add(p, r, 1.666_666_5e-1);
    p = F::mul_add(p, r, 0.5);
    let p = F::mul_add(p, r * r, r + 1.0);
    // 2^n from the bits of t with integer ops only (a float-to-int `as` cast saturates and
    // checks for NaN element by element, which stops vectorisation).
    const ROUND_BITS: u32 = 0x4B40_0000;
    let scale = f32::from_bits(t.to_bits().wrapping_sub(ROUND_BITS).wrapping_add(127) << 23);
    p * scale
}

/// erf(x), absolute error below 1.2e-7 (the erfc Chebyshev fit of Numerical Recipes).
#[inline(always)]
pub fn erf<F: MulAdd>(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / F::mul_add(0.5, z, 1.0);
    let mut p = 0.170_872_77;
    p = F::mul_add(p, t, -0.822_152_23);
    p = F::mul_add(p, t, 1.488_515_9);
    p = F::mul_add(p, t, -1.135_204);
    p = F::mul_add(p, t, 0.278_868_07);
    p = F::mul_add(p, t, -0.186_288_06);
    p = F::mul_add(p, t, 0.096_784_18);
    p = F::mul_add(p, t, 0.374_091_96);
    p = F::mul_add(p, t, 1.000_023_7);
    p = F::mul_add(p, t, -1.265_512_2);
    let erfc = t * exp::<F>(F::mul_add(-z, z, p));
    (1.0 - erfc).copysign(x)
}

#[inline(always)]
pub fn sigmoid<F: MulAdd>(x: f32) -> f32 {
    1.0 / (1.0 + exp::<F>(-x))
}

#[inline(always)]
pub fn silu<F: MulAdd>(x: f32) -> f32 {
    x * sigmoid::<F>(x)
}

/// d silu(x) / dx = s (1 + x (1 - s)), s = sigmoid(x).
#[inline(always)]
pub fn silu_grad<F: MulAdd>(x: f32) -> f32 {
    let s = sigmoid::<F>(x);
    s * F::mul_add(x, 1.0 - s, 1.0)
}

/// The exact (erf) GELU, as `torch.nn.functional.gelu` computes it by default.
#[inline(always)]
pub fn gelu<F: MulAdd>(x: f32) -> f32 {
    0.5 * x * (1.0 + erf::<F>(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// d gelu(x) / dx = Phi(x) + x phi(x).
#[inline(always)]
pub fn gelu_grad<F: MulAdd>(x: f32) -> f32 {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let cdf = 0.5 * (1.0 + erf::<F>(x * std::f32::consts::FRAC_1_SQRT_2));
    let pdf = INV_SQRT_2PI * exp::<F>(-0.5 * x * x);
    F::mul_add(x, pdf, cdf)
}

/// Sum of a slice in 16 independent lanes (vectorisable; also more accurate than one running sum).
#[inline(always)]
pub fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a += x;
        }
    }
    let tail: f32 = chunks.remainder().iter().sum();
    acc.iter().sum::<f32>() + tail
}

/// Sum of (x - mean)^2, in 16 lanes.
#[inline(always)]
pub fn sum_sq_dev(xs: &[f32], mean: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            let d = x - mean;
            *a += d * d;
        }
    }
    let tail: f32 = chunks
        .remainder()
        .iter()
        .map(|&x| (x - mean) * (x - mean))
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// Sum of a * b, in 16 lanes.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
pub fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a = a.max(x);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    acc.iter().fold(tail, |m, &x| m.max(x))
}

/// In place: row <- softmax(row). Returns nothing; rows of any length.
#[inline(always)]
pub fn softmax_row<F: MulAdd>(row: &mut [f32]) {
    let m = max(row);
    for x in row.iter_mut() {
        *x = exp::<F>(*x - m);
    }
    let inv = 1.0 / sum(row);
    for x in row.iter_mut() {
        *x *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_erf_gelu_silu_match_libm() {
        let mut worst = [0f64; 4];
        let mut x = -30.0f32;
        while x < 30.0 {
            let e = exp::<Plain>(x) as f64;
            let want = (x as f64).exp();
            worst[0] = worst[0].max((e - want).abs() / want);
            let erf_want = erf_f64(x as f64);
            worst[1] = worst[1].max((erf::<Plain>(x) as f64 - erf_want).abs());
            let g_want = 0.5 * x as f64 * (1.0 + erf_f64(x as f64 / 2f64.sqrt()));
            worst[2] =
                worst[2].max((gelu::<Plain>(x) as f64 - g_want).abs() / (1.0 + g_want.abs()));
            let s_want = x as f64 / (1.0 + (-x as f64).exp());
            worst[3] =
                worst[3].max((silu::<Plain>(x) as f64 - s_want).abs() / (1.0 + s_want.abs()));
            x += 0.013;
        }
        assert!(worst[0] < 4e-7, "exp {}", worst[0]);
        assert!(worst[1] < 3e-7, "erf {}", worst[1]);
        assert!(worst[2] < 3e-7, "gelu {}", worst[2]);
        assert!(worst[3] < 3e-7, "silu {}", worst[3]);
        assert_eq!(exp::<Plain>(-200.0), exp::<Plain>(-87.3));
    }

    #[test]
    fn derivatives_match_finite_differences() {
        for &x in &[-4.0f32, -1.3, -0.2, 0.0, 0.4, 1.7, 5.0] {
            let h = 1e-3f64;
            let xd = x as f64;
            let gelu64 = |v: f64| 0.5 * v * (1.0 + erf_f64(v / 2f64.sqrt()));
            let silu64 = |v: f64| v / (1.0 + (-v).exp());
            let dg = (gelu64(xd + h) - gelu64(xd - h)) / (2.0 * h);
            let ds = (silu64(xd + h) - silu64(xd - h)) / (2.0 * h);
            assert!(
                (gelu_grad::<Plain>(x) as f64 - dg).abs() < 1e-5,
                "gelu' at {x}"
            );
            assert!(
                (silu_grad::<Plain>(x) as f64 - ds).abs() < 1e-5,
                "silu' at {x}"
            );
        }
    }

    /// erf in f64 by its Taylor series (|x| < 3) or continued fraction, for the tests only.
    fn erf_f64(x: f64) -> f64 {
        let z = x.abs();
        let v = if z < 3.0 {
            let mut term = z;
            let mut total = z;
            let mut n = 0.0;
            loop {
                n += 1.0;
                term *= -z * z / n;
                let add = term / (2.0 * n + 1.0);
                total += add;
                if add.abs() < 1e-17 {
                    break;
                }
            }
            total * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc continued fraction (Lentz), plenty accurate for z >= 3.
            let mut f = 0.0;
            for k in (1..60).rev() {
                f = (k as f64 / 2.0) / (z + f);
            }
            1.0 - (-z * z).exp() / (std::f64::consts::PI.sqrt() * (z + f))
        };
        v.copysign(x)
    }

    #[test]
    fn reductions_and_softmax() {
        let xs: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let naive: f32 = xs.iter().sum();
        assert!((sum(&xs) - naive).abs() < 1e-5);
        assert_eq!(max(&xs), xs.iter().cloned().fold(f32::MIN, f32::max));
        let mut row = xs.clone();
        softmax_row::<Plain>(&mut row);
        let denom: f64 = xs.iter().map(|&x| (x as f64).exp()).sum();
        for (p, &x) in row.iter().zip(&xs) {
            assert!((*p as f64 - (x as f64).exp() / denom).abs() < 1e-7);
        }
    }
}
