//! The fused ops' one entry point for a strided matrix product: f32 on the gemm crate
//! ([`super::gemm`]), or bf16 on the AMX tile unit ([`super::amx`]) under the `bf16` matmul
//! precision.

use super::amx;
use super::gemm::{sgemm_f32, MatMut, MatRef};

/// `dst (m x n) = [dst +] scale * a (m x k) . b (k x n)`.
///
/// `parallel` lets the product split itself over the thread pool; callers already inside a
/// parallel loop pass `false`. Under the `bf16` matmul precision ([`amx::MatmulPrecision`])
/// products big enough to fill the tile unit's tiles run there, inputs rounded to bf16.
///
/// # Safety
/// Every element addressed through `dst`, `a` and `b` for these sizes must be in bounds, and
/// `dst` must not overlap `a` or `b` or be written by anyone else meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: MatMut,
    accumulate: bool,
    a: MatRef,
    b: MatRef,
    scale: f32,
    parallel: bool,
) {
    if amx::wanted(m, n, k) {
        // SAFETY: the caller's guarantees, passed on; `wanted` implies AMX is available.
        return unsafe { amx::gemm_bf16(m, n, k, dst, accumulate, a, b, scale, parallel) };
    }
    // SAFETY: as above.
    unsafe { sgemm_f32(m, n, k, dst, accumulate, a, b, scale, parallel) }
}
