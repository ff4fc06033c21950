//! `a + b` for the residual connections, on the same thread pool as the other fused ops.
//!
//! candle runs large element-wise ops on its own spinning, core-pinned barrier pool; next to
//! rayon's workers (which the matrix products use) that makes two pools compete for the same
//! cores, and on a busy machine the spinning side waits out whole scheduler slices. Keeping the
//! forward pass's big additions on rayon avoids that. Gradients pass through unchanged.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::gemm::{num_threads, par_for, SharedMut};
use super::{cpu_storage_slice, uninit_vec};

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

struct Add;

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "rl4pix-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("add: shapes {:?} and {:?}", l1.shape(), l2.shape());
        }
        let (a, b) = (cpu_storage_slice(s1, l1)?, cpu_storage_slice(s2, l2)?);
        let mut out = uninit_vec(a.len());
        let shared = SharedMut::new(&mut out);
        let len = a.len();
        let tasks = len.div_ceil(CHUNK).max(1);
        // Enough tasks for balance, few enough to keep each one a long straight loop.
        let per_task = len.div_ceil(tasks.min(4 * num_threads())).max(1);
        par_for(len.div_ceil(per_task), len, |t| {
            let lo = t * per_task;
            let hi = len.min(lo + per_task);
            // SAFETY: task t owns lo..hi of the output.
            let dst = unsafe { shared.slice(lo, hi - lo) };
            for ((d, &x), &y) in dst.iter_mut().zip(&a[lo..hi]).zip(&b[lo..hi]) {
                *d = x + y;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let pass = |t: &Tensor| t.track_op().then(|| grad.clone());
        Ok((pass(a), pass(b)))
    }
}

/// `a + b` for two tensors of the same shape (CPU f32; see [`super::fast_path`]).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.contiguous()?.apply_op2(&b.contiguous()?, Add)
}

/// `a + b`: the fused addition on the fast path, candle's otherwise.
pub fn residual(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if super::fast_path(a) && a.shape() == b.shape() {
        add(a, b)
    } else {
        a + b
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{max_abs_diff, var};

    #[test]
    fn adds_and_passes_gradients_to_tracked_inputs_only() {
        let a = var(&[3, 70_000]);
        let b = var(&[3, 70_000]).as_tensor().detach();
        let sum = add(&a, &b).unwrap();
        let want = (a.as_tensor() + &b).unwrap();
        assert_eq!(max_abs_diff(&sum, &want), 0.0);
        let grads = (&sum * 2.0).unwrap().sum_all().unwrap().backward().unwrap();
        let ga = grads.get(&a).unwrap();
        assert_eq!(ga.min_all().unwrap().to_scalar::<f32>().unwrap(), 2.0);
        assert!(grads.get(&b).is_none());
    }
}
