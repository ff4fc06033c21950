//! Register-bound throughput of one core's f32 FMA against the bf16 dot product (`VDPBF16PS`,
//! pairs of bf16 products accumulated in f32): the number that decides whether a bf16 GEMM could
//! beat the f32 one on this CPU. 12 independent accumulators hide each instruction's latency.

/// (f32 FMA GFLOP/s, bf16 dot GFLOP/s), or None where the CPU lacks AVX-512 BF16.
pub fn measure(iters: usize) -> Option<(f64, f64)> {
    #[cfg(target_arch = "x86_64")]
    {
        if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")) {
            return None;
        }
        // GFLOP/s of one run of `kernel`, which does `flops_per_iter` per iteration.
        let rate = |kernel: unsafe fn(usize) -> f32, flops_per_iter: f64| {
            let t = std::time::Instant::now();
            // SAFETY: both kernels need only the features detected above.
            std::hint::black_box(unsafe { kernel(iters) });
            flops_per_iter * iters as f64 / t.elapsed().as_secs_f64() / 1e9
        };
        let (mut best_fma, mut best_bf16) = (0f64, 0f64);
        // Alternate the two and keep each one's best: the machine is shared.
        for _ in 0..3 {
            best_fma = best_fma.max(rate(x86::fma, x86::FMA_FLOPS));
            best_bf16 = best_bf16.max(rate(x86::bf16_dot, x86::DOT_FLOPS));
        }
        Some((best_fma, best_bf16))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = iters;
        None
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    const CHAINS: usize = 12;
    /// Per iteration: 12 instructions x 16 lanes x (multiply + add).
    pub const FMA_FLOPS: f64 = (CHAINS * 16 * 2) as f64;
    /// Per iteration: 12 instructions x 16 lanes x 2 products x (multiply + add).
    pub const DOT_FLOPS: f64 = (CHAINS * 16 * 2 * 2) as f64;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma(iters: usize) -> f32 {
        let b = _mm512_set1_ps(std::hint::black_box(1.0001));
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..iters {
            for r in acc.iter_mut() {
                *r = _mm512_fmadd_ps(b, b, *r);
            }
        }
        acc.iter().fold(0.0, |s, r| s + _mm512_reduce_add_ps(*r))
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn bf16_dot(iters: usize) -> f32 {
        // Every bf16 lane is 1.0.
        // SAFETY: both are 512-bit vectors; every bit pattern is a valid bf16 vector.
        let ones: __m512bh =
            unsafe { std::mem::transmute(_mm512_set1_epi32(std::hint::black_box(0x3f80_3f80))) };
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..iters {
            for r in acc.iter_mut() {
                *r = _mm512_dpbf16_ps(*r, ones, ones);
            }
        }
        acc.iter().fold(0.0, |s, r| s + _mm512_reduce_add_ps(*r))
    }
}
