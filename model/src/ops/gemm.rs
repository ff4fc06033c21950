//! Strided f32 matrix products on the `gemm` crate (the kernels candle's CPU matmul uses), called
//! directly so that the fused ops can multiply views (one head of a `(B, N, heads * d)` tensor, a
//! transposed block) without copying them first, accumulate into their destination, and choose
//! their own threading.

use gemm::Parallelism;

/// A read-only strided matrix: element (i, j) lives at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
pub struct MatRef {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

/// A writable strided matrix, same addressing as [`MatRef`].
#[derive(Clone, Copy)]
pub struct MatMut {
    pub ptr: *mut f32,
    pub rs: isize,
    pub cs: isize,
}

// SAFETY: a MatRef is a read-only view into a buffer that outlives the parallel loop it is
// shared with; reading it from several threads is fine.
unsafe impl Send for MatRef {}
unsafe impl Sync for MatRef {}

impl MatRef {
    /// A row-major (contiguous rows) matrix starting at `data[offset]` with row stride `rs`.
    pub fn rows(data: &[f32], offset: usize, rs: usize) -> Self {
        Self {
            ptr: data[offset..].as_ptr(),
            rs: rs as isize,
            cs: 1,
        }
    }

    /// The transpose of [`MatRef::rows`]: element (i, j) is `data[offset + j * rs + i]`.
    pub fn rows_t(data: &[f32], offset: usize, rs: usize) -> Self {
        Self {
            ptr: data[offset..].as_ptr(),
            rs: 1,
            cs: rs as isize,
        }
    }

    pub fn t(self) -> Self {
        Self {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

impl MatMut {
    pub fn rows(data: &mut [f32], offset: usize, rs: usize) -> Self {
        Self {
            ptr: data[offset..].as_mut_ptr(),
            rs: rs as isize,
            cs: 1,
        }
    }

    pub fn as_ref(self) -> MatRef {
        MatRef {
            ptr: self.ptr,
            rs: self.rs,
            cs: self.cs,
        }
    }
}

/// Threads of the pool the fused ops run on (rayon's global pool, sized by `RAYON_NUM_THREADS`
/// like candle's own kernels).
pub fn num_threads() -> usize {
    rayon::current_num_threads()
}

/// Below this much work (multiply-adds or element visits, roughly) a call runs inline: a
/// fork-join on the pool costs tens of microseconds, more when a core is busy elsewhere.
pub const PARALLEL_MIN_WORK: usize = 1 << 17;

/// Runs `f(0..n)` on the pool, or inline when there is one thread, one task or too little
/// `work` in total (a hand-off to the pool and back adds up over hundreds of ops).
pub fn par_for(n: usize, work: usize, f: impl Fn(usize) + Sync + Send) {
    use rayon::prelude::*;
    if n <= 1 || work < PARALLEL_MIN_WORK || num_threads() <= 1 {
        (0..n).for_each(f)
    } else {
        (0..n).into_par_iter().for_each(f)
    }
}

/// `dst (m x n) = [dst +] scale * a (m x k) . b (k x n)` in f32, on the gemm crate.
///
/// `parallel` lets the product split itself over the thread pool; callers already inside a
/// parallel loop pass `false`. The fused ops call it through [`super::matmul::sgemm`], which
/// follows the matmul precision.
///
/// # Safety
/// Every element addressed through `dst`, `a` and `b` for these sizes must be in bounds, and
/// `dst` must not overlap `a` or `b` or be written by anyone else meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_f32(
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
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m as isize {
                for j in 0..n as isize {
                    // SAFETY: (i, j) is inside the m x n block the caller vouches for.
                    unsafe { *dst.ptr.offset(i * dst.rs + j * dst.cs) = 0.0 };
                }
            }
        }
        return;
    }
    let threads = num_threads();
    let parallelism = if parallel && threads > 1 && m * n * k >= 8 * PARALLEL_MIN_WORK {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the caller vouches that every element of the three m x k, k x n and m x n blocks
    // is in bounds and that `dst` overlaps neither input nor is written by anyone else.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            dst.cs,
            dst.rs,
            accumulate,
            a.ptr,
            a.cs,
            a.rs,
            b.ptr,
            b.cs,
            b.rs,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        )
    };
}

/// A raw pointer that parallel tasks may share because each writes a disjoint part.
#[derive(Clone, Copy)]
pub struct SharedMut(pub *mut f32);
// SAFETY: only used for buffers whose regions are partitioned between tasks by the callers.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    pub fn new(data: &mut [f32]) -> Self {
        Self(data.as_mut_ptr())
    }

    pub fn ptr(self) -> *mut f32 {
        self.0
    }

    /// # Safety
    /// `offset..offset + len` must be in bounds and written by this task alone.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, offset: usize, len: usize) -> &mut [f32] {
        // SAFETY: the caller vouches that the range is in bounds and this task's alone.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(offset), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strided_product_and_accumulate() {
        // a: 2x3, b: 3x2 stored transposed (b^T rows), dst 2x2 accumulated onto ones.
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let bt = [1.0, 0.0, -1.0, 2.0, 1.0, 0.0];
        let mut dst = [1.0f32; 4];
        unsafe {
            sgemm_f32(
                2,
                2,
                3,
                MatMut::rows(&mut dst, 0, 2),
                true,
                MatRef::rows(&a, 0, 3),
                MatRef::rows_t(&bt, 0, 3),
                2.0,
                false,
            );
        }
        // a . b = [[-2, 4], [-2, 13]]
        assert_eq!(dst, [1.0 - 4.0, 1.0 + 8.0, 1.0 - 4.0, 1.0 + 26.0]);
    }
}
