//! bf16 matrix products on Intel AMX (the tile unit of Sapphire Rapids and later Xeons), for the
//! `bf16` matmul precision ([`MatmulPrecision`]).
//!
//! Both inputs are rounded to bf16 (round to nearest even, the rounding torch's bf16 autocast
//! uses) and `TDPBF16PS` accumulates their products in f32: the same numerics as a GPU's bf16
//! tensor cores, at about fourteen times the f32 FMA rate of one core here. The f32 path stays
//! the default because it matches diffusers to f32 rounding; this one trades about three
//! significant digits per operand for speed, which inference tolerates (GPUs serve this model in
//! f16) and which the edit benchmark measures against the f32 path.
//!
//! Layout: `b` is packed once per call into the VNNI form the tile unit reads (pairs of
//! consecutive k interleaved: one u32 holds `(b[2p][j], b[2p+1][j])`), `a` per task into rows of
//! bf16. A task owns a block of [`MC`] rows by [`NC`] columns of the result; its inner kernel
//! keeps a 32x32 block of the result in four tile registers for the whole of k. Every element is
//! summed over k in the same order whatever the threading, so results do not depend on the
//! thread count.
//!
//! The instructions are issued with inline assembly (the AMX intrinsics are not stable Rust);
//! the compiler never allocates tile registers itself, so their state is this module's alone.
//! Linux hands the tile state to a process only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`),
//! which [`available`] makes once.

use std::arch::x86_64::*;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;
use std::thread::LocalKey;

use half::f16;
use half::slice::HalfFloatSliceExt;

use super::gemm::{num_threads, par_for, MatMut, MatRef, SharedMut, PARALLEL_MIN_WORK};

/// How the fused kernels' matrix products compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulPrecision {
    /// f32 inputs, f32 accumulation (the default): diffusers' numerics.
    F32,
    /// Inputs rounded to bf16, products accumulated in f32, on AMX where the CPU has it (f32
    /// elsewhere, with a warning).
    Bf16,
}

impl std::str::FromStr for MatmulPrecision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            other => Err(format!(
                "matmul precision must be f32 or bf16, got `{other}`"
            )),
        }
    }
}

/// The environment variable that sets the process's matmul precision at start-up
/// (`RL4PIX_MATMUL_PRECISION=bf16`); [`set_matmul_precision`] overrides it.
pub const PRECISION_ENV: &str = "RL4PIX_MATMUL_PRECISION";

const UNSET: u8 = 0;
const F32: u8 = 1;
const BF16: u8 = 2;
static PRECISION: AtomicU8 = AtomicU8::new(UNSET);

/// Sets the matmul precision for the whole process, like torch's
/// `set_float32_matmul_precision`. Returns the precision now in effect: `Bf16` asked of a CPU
/// without AMX gives `F32` (and a warning), never a slower emulation.
pub fn set_matmul_precision(precision: MatmulPrecision) -> MatmulPrecision {
    let effective = match precision {
        MatmulPrecision::Bf16 if !available() => {
            tracing::warn!("bf16 matmul precision needs AMX (amx-tile, amx-bf16); staying in f32");
            MatmulPrecision::F32
        }
        p => p,
    };
    let code = match effective {
        MatmulPrecision::F32 => F32,
        MatmulPrecision::Bf16 => BF16,
    };
    PRECISION.store(code, Ordering::Relaxed);
    effective
}

/// The matmul precision in effect (read from [`PRECISION_ENV`] on first use).
pub fn matmul_precision() -> MatmulPrecision {
    match PRECISION.load(Ordering::Relaxed) {
        F32 => MatmulPrecision::F32,
        BF16 => MatmulPrecision::Bf16,
        _ => {
            let value = std::env::var(PRECISION_ENV).unwrap_or_default();
            let asked = value.parse().unwrap_or_else(|e: String| {
                tracing::warn!("{PRECISION_ENV}: {e}; using f32");
                MatmulPrecision::F32
            });
            set_matmul_precision(asked)
        }
    }
}

/// Whether a product of this size goes to the tile unit: the bf16 precision is on and the
/// product fills at least one tile in each dimension (smaller ones are not worth the packing).
pub fn wanted(m: usize, n: usize, k: usize) -> bool {
    m >= 16 && n >= 16 && k >= 16 && matmul_precision() == MatmulPrecision::Bf16
}

/// Whether this CPU and OS run AMX bf16 tiles (checked, and the tile state requested, once).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    use std::arch::x86_64::__cpuid_count;
    // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE. AVX-512 (F, BW) for the packing.
    #[allow(unused_unsafe)]
    let leaf7 = unsafe { __cpuid_count(7, 0) };
    let cpu = leaf7.edx & (1 << 22) != 0
        && leaf7.edx & (1 << 24) != 0
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512bf16");
    if !cpu {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments; it only changes which XSAVE state
    // this process may use.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    rc == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// Rows of the result one task owns (its bf16 rows of `a`, `MC * k` values, stay in L2).
const MC: usize = 128;
/// Columns of the result one task owns.
const NC: usize = 256;
/// k steps of one chunk: a 32-column strip of b over a chunk is 16 KiB, kept in L1 while the
/// task's row blocks pass over it.
const KC_STEPS: usize = 8;
/// The inner kernel's block of the result: 2 x 2 tiles of 16 x 16 f32.
const BLOCK: usize = 32;
/// Rows (and f32 columns) of one tile.
const TILE: usize = 16;
/// bf16 values in one tile row (64 bytes): the k step of one `TDPBF16PS`.
const KSTEP: usize = 32;
/// Elements (u16 for `a`, u32 pairs for `b`) of one packed 1 KiB tile.
const A_TILE: usize = TILE * KSTEP;
const B_TILE: usize = TILE * TILE;

/// The upper 16 bits of the result are `x` rounded to bf16, to nearest even (NaN stays NaN).
#[inline(always)]
fn bf16_rounded(x: f32) -> u32 {
    let bits = x.to_bits();
    if x.is_nan() {
        return bits | 0x0040_0000;
    }
    bits.wrapping_add(0x7fff + ((bits >> 16) & 1))
}

/// A VNNI pair: bf16 `lo` in the low half, bf16 `hi` in the high half.
#[inline(always)]
fn bf16_pair(lo: f32, hi: f32) -> u32 {
    (bf16_rounded(lo) >> 16) | (bf16_rounded(hi) & 0xffff_0000)
}

thread_local! {
    /// Packing buffers, kept per thread between calls: the products run hundreds of times per
    /// step, and fresh buffers of megabytes each cost page faults and zeroing every time.
    static POOL_A: RefCell<Vec<Vec<u16>>> = const { RefCell::new(Vec::new()) };
    static POOL_B: RefCell<Vec<Vec<u32>>> = const { RefCell::new(Vec::new()) };
    static POOL_C: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
    static POOL_WIDE: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// Buffers a thread keeps for reuse, and the largest it keeps (bigger ones are rare: one per
/// layer call, where the allocation is small next to the product).
const POOL_SIZE: usize = 4;
const POOL_MAX_BYTES: usize = 8 << 20;

fn take<T: Copy + Default>(pool: &'static LocalKey<RefCell<Vec<Vec<T>>>>, len: usize) -> Vec<T> {
    let mut buf = pool.with(|p| p.borrow_mut().pop()).unwrap_or_default();
    // At least `len` elements, never shrunk (growing it back would clear it again); contents
    // are arbitrary: the packers write every element they use.
    if buf.len() < len {
        buf.resize(len, T::default());
    }
    buf
}

fn give<T>(pool: &'static LocalKey<RefCell<Vec<Vec<T>>>>, buf: Vec<T>) {
    // `try_with`: a buffer dropped while the thread's locals are being torn down is freed.
    let _ = pool.try_with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_SIZE && std::mem::size_of_val(&buf[..]) <= POOL_MAX_BYTES {
            p.push(buf);
        }
    });
}

/// Runs `fill(index, strip)` over `data` cut into strips of `strip_len`, on the thread pool when
/// `parallel` and the `work` is worth the hand-off (as [`par_for`] decides): each packed strip is
/// written by one task.
fn fill_strips<T: Send>(
    data: &mut [T],
    strip_len: usize,
    parallel: bool,
    work: usize,
    fill: impl Fn(usize, &mut [T]) + Sync,
) {
    if parallel && work >= PARALLEL_MIN_WORK && num_threads() > 1 {
        use rayon::prelude::*;
        data.par_chunks_mut(strip_len)
            .enumerate()
            .for_each(|(i, strip)| fill(i, strip));
    } else {
        data.chunks_mut(strip_len)
            .enumerate()
            .for_each(|(i, strip)| fill(i, strip));
    }
}

/// Rows `first..first + 16` of the row-major `rows x k` half-precision `src` (fewer at the end,
/// none in a strip of padding past `rows`), widened into a pooled buffer; and how many there are.
/// The caller [`give`]s the buffer back to `POOL_WIDE`.
fn widen_strip(src: &[f16], first: usize, rows: usize, k: usize) -> (Vec<f32>, usize) {
    let (first, count) = (first.min(rows), TILE.min(rows.saturating_sub(first)));
    let mut wide = take(&POOL_WIDE, count * k);
    src[first * k..(first + count) * k].convert_to_f32_slice(&mut wide[..count * k]);
    (wide, count)
}

/// The left operand `a (m x k)` of a product, rounded to bf16 and laid out as the tile unit
/// reads it: strips of 16 rows, each `k_pad / 32` contiguous 1 KiB tiles of 16 rows of 32 bf16
/// (row `r`, column `kk` at `((r / 16 * steps + kk / 32) * 16 + r % 16) * 32 + kk % 32`), zero
/// past m (to a multiple of 32) and past k. Pack a constant operand (a layer's weight) once and
/// multiply it by many right-hand sides.
pub struct PackedA {
    data: Vec<u16>,
    m: usize,
    k: usize,
    k_pad: usize,
}

impl PackedA {
    /// # Safety
    /// Every element of the `m x k` matrix `a` addresses must be in bounds. [`available`]
    /// must be true.
    pub unsafe fn pack(m: usize, k: usize, a: MatRef, parallel: bool) -> Self {
        Self::build(m, k, parallel, |r0, k_pad, out| {
            // SAFETY: the rows of a the strip reads are in bounds (caller).
            unsafe { pack_a_strip(r0, m, k, a, k_pad, out) }
        })
    }

    /// Packs a row-major `m x k` half-precision matrix (a layer weight kept as f16): each strip's
    /// 16 rows are widened into a small per-thread buffer, so no f32 copy of the whole matrix
    /// is made.
    ///
    /// # Safety
    /// [`available`] must be true.
    pub unsafe fn pack_f16_rows(m: usize, k: usize, a: &[f16], parallel: bool) -> Self {
        assert_eq!(
            a.len(),
            m * k,
            "pack_f16_rows: {} elements for {m} x {k}",
            a.len()
        );
        Self::build(m, k, parallel, |r0, k_pad, out| {
            let (wide, rows) = widen_strip(a, r0, m, k);
            // SAFETY: `wide` holds the strip's rows, row-major.
            unsafe { pack_a_strip(0, rows, k, MatRef::rows(&wide, 0, k), k_pad, out) };
            give(&POOL_WIDE, wide);
        })
    }

    /// Fills every 16-row strip with `fill(first_row, k_pad, strip)`, in parallel or not.
    fn build(
        m: usize,
        k: usize,
        parallel: bool,
        fill: impl Fn(usize, usize, &mut [u16]) + Sync,
    ) -> Self {
        let k_pad = k.next_multiple_of(KSTEP);
        let m_pad = m.next_multiple_of(BLOCK);
        let mut data = take(&POOL_A, m_pad * k_pad);
        let work = m_pad * k_pad * 16;
        fill_strips(
            &mut data[..m_pad * k_pad],
            TILE * k_pad,
            parallel,
            work,
            |strip, out| fill(strip * TILE, k_pad, out),
        );
        Self { data, m, k, k_pad }
    }
}

impl Drop for PackedA {
    fn drop(&mut self) {
        give(&POOL_A, std::mem::take(&mut self.data));
    }
}

/// The right operand `b (k x n)` of a product in the tile unit's VNNI layout: strips of 16
/// columns, each `k_pad / 32` contiguous 1 KiB tiles of 16 rows of bf16 pairs (one u32 holds
/// `b[2p][j]` low and `b[2p + 1][j]` high; pair `p`, column `j` at
/// `((j / 16 * steps + p / 16) * 16 + p % 16) * 16 + j % 16`), zero past k and n.
pub struct PackedB {
    data: Vec<u32>,
    n: usize,
    k: usize,
    k_pad: usize,
}

impl PackedB {
    /// # Safety
    /// Every element of the `k x n` matrix `b` addresses must be in bounds. [`available`]
    /// must be true.
    pub unsafe fn pack(k: usize, n: usize, b: MatRef, parallel: bool) -> Self {
        Self::build(k, n, parallel, |j0, k_pad, out| {
            // SAFETY: the elements of b the strip reads are in bounds (caller).
            unsafe { pack_b_strip(j0, n, k, b, k_pad, out) }
        })
    }

    /// Packs `b (k x n)` given as its half-precision transpose `b_t`, row-major `n x k` (a
    /// linear layer's f16 weight, `(out, in)`): each strip's 16 columns are widened into a small
    /// per-thread buffer, so no f32 copy of the whole matrix is made.
    ///
    /// # Safety
    /// [`available`] must be true.
    pub unsafe fn pack_f16_columns(k: usize, n: usize, b_t: &[f16], parallel: bool) -> Self {
        assert_eq!(
            b_t.len(),
            n * k,
            "pack_f16_columns: {} elements for {n} x {k}",
            b_t.len()
        );
        Self::build(k, n, parallel, |j0, k_pad, out| {
            let (wide, cols) = widen_strip(b_t, j0, n, k);
            // SAFETY: `wide` holds the strip's columns, each k contiguous elements.
            unsafe { pack_b_strip(0, cols, k, MatRef::rows_t(&wide, 0, k), k_pad, out) };
            give(&POOL_WIDE, wide);
        })
    }

    /// Packs `b (k x n)` made row by row: `row(kk, out)` writes all n elements of row kk. Two
    /// rows at a time are made in a small buffer and packed while still in L1, so the f32
    /// matrix never exists whole (a convolution's patches: 9 times its input for a 3x3 kernel).
    ///
    /// # Safety
    /// [`available`] must be true.
    pub unsafe fn pack_rows(k: usize, n: usize, mut row: impl FnMut(usize, &mut [f32])) -> Self {
        let k_pad = k.next_multiple_of(KSTEP);
        let n_pad = n.next_multiple_of(BLOCK);
        let mut data = take(&POOL_B, k_pad / 2 * n_pad);
        let mut pair = take(&POOL_WIDE, 2 * n_pad);
        let (lo, hi) = pair[..2 * n_pad].split_at_mut(n_pad);
        // Columns past n stay zero.
        lo[n..].fill(0.0);
        hi[n..].fill(0.0);
        for p in 0..k_pad / 2 {
            for (kk, half) in [(2 * p, &mut *lo), (2 * p + 1, &mut *hi)] {
                if kk < k {
                    row(kk, &mut half[..n]);
                } else {
                    half[..n].fill(0.0);
                }
            }
            // SAFETY: both rows hold n_pad elements; `data` holds every strip's pair p.
            unsafe { pack_pair(lo, hi, p, k_pad / 2 * TILE, &mut data) };
        }
        give(&POOL_WIDE, pair);
        Self { data, n, k, k_pad }
    }

    /// Fills every 16-column strip with `fill(first_column, k_pad, strip)`, in parallel or not.
    fn build(
        k: usize,
        n: usize,
        parallel: bool,
        fill: impl Fn(usize, usize, &mut [u32]) + Sync,
    ) -> Self {
        let k_pad = k.next_multiple_of(KSTEP);
        let n_pad = n.next_multiple_of(BLOCK);
        let mut data = take(&POOL_B, k_pad / 2 * n_pad);
        let (len, work) = (k_pad / 2 * n_pad, k_pad * n_pad * 16);
        fill_strips(
            &mut data[..len],
            k_pad / 2 * TILE,
            parallel,
            work,
            |strip, out| fill(strip * TILE, k_pad, out),
        );
        Self { data, n, k, k_pad }
    }
}

impl Drop for PackedB {
    fn drop(&mut self) {
        give(&POOL_B, std::mem::take(&mut self.data));
    }
}

/// `dst (m x n) = [dst +] scale * a (m x k) . b (k x n)` with bf16 inputs and f32 accumulation.
///
/// # Safety
/// As [`super::matmul::sgemm`]: every addressed element in bounds, `dst` overlapping neither input
/// nor written by anyone else meanwhile. [`available`] must be true.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_bf16(
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
    // SAFETY: the caller's guarantees, passed on.
    unsafe {
        let a = PackedA::pack(m, k, a, parallel);
        let b = PackedB::pack(k, n, b, parallel);
        gemm_packed(dst, accumulate, &a, 0..m, &b, 0..n, scale, parallel)
    }
}

/// `dst (rows x cols) = [dst +] scale * a[rows] . b[.., cols]`, for a block of rows of a
/// packed `a` and of columns of a packed `b` (each block starting at a multiple of 32).
///
/// # Safety
/// `dst` must address `rows.len() x cols.len()` elements in bounds, written by no one else
/// meanwhile. [`available`] must be true.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_packed(
    dst: MatMut,
    accumulate: bool,
    a: &PackedA,
    rows: std::ops::Range<usize>,
    b: &PackedB,
    cols: std::ops::Range<usize>,
    scale: f32,
    parallel: bool,
) {
    assert!(
        a.k == b.k && a.k_pad == b.k_pad,
        "packed operands disagree on k"
    );
    // Blocks start on the kernel's 32 x 32 grid, so its two-strip reads stay in the padding.
    assert!(
        rows.start.is_multiple_of(BLOCK) && rows.end <= a.m,
        "row block {rows:?} of {}",
        a.m
    );
    assert!(
        cols.start.is_multiple_of(BLOCK) && cols.end <= b.n,
        "column block {cols:?} of {}",
        b.n
    );
    let (m, n) = (rows.len(), cols.len());
    let (row_tasks, col_tasks) = (m.div_ceil(MC), n.div_ceil(NC));
    let dst_shared = SharedMut(dst.ptr);
    let task = |t: usize| {
        let (i0, j0) = (t / col_tasks * MC, t % col_tasks * NC);
        let dst = MatMut {
            // A method call, so the closure captures the (Sync) wrapper, not its raw pointer.
            ptr: dst_shared.ptr(),
            rs: dst.rs,
            cs: dst.cs,
        };
        let block = Block {
            a_row0: rows.start + i0,
            b_col0: cols.start + j0,
            i0,
            rows: MC.min(m - i0),
            j0,
            cols: NC.min(n - j0),
        };
        // SAFETY: this task alone writes its rows and columns of dst; the rest as above.
        unsafe { block_product(block, a, b, dst, accumulate, scale) };
    };
    let tasks = row_tasks * col_tasks;
    if parallel {
        par_for(tasks, m * n * a.k, task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// One task's part of the product: rows `i0..i0 + rows` (row `a_row0` of the packed `a` first)
/// by columns `j0..j0 + cols` (column `b_col0` of the packed `b` first).
#[derive(Clone, Copy)]
struct Block {
    a_row0: usize,
    b_col0: usize,
    i0: usize,
    rows: usize,
    j0: usize,
    cols: usize,
}

#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn block_product(
    blk: Block,
    a: &PackedA,
    b: &PackedB,
    dst: MatMut,
    accumulate: bool,
    scale: f32,
) {
    let steps = a.k_pad / KSTEP;
    // The task's result stays in an f32 buffer while k is walked in chunks: one chunk of a
    // 32-column strip of b (16 KiB) stays in L1 while the task's row blocks pass over it.
    let mut acc = take(&POOL_C, MC * NC);
    let _tiles = Tiles::configure();
    for k0 in (0..steps).step_by(KC_STEPS) {
        let chunk = KC_STEPS.min(steps - k0);
        for jb in (0..blk.cols).step_by(BLOCK) {
            let b_at = ((blk.b_col0 + jb) / TILE * steps + k0) * B_TILE;
            for ib in (0..blk.rows).step_by(BLOCK) {
                let a_at = ((blk.a_row0 + ib) / TILE * steps + k0) * A_TILE;
                // SAFETY: both packed buffers hold two whole tile strips at these offsets (m
                // and n are padded to multiples of 32, a_row0 is a multiple of 16 below m,
                // and a strip past m is zeros in the padding); acc holds the 32 x 32 block.
                unsafe {
                    kernel(
                        a.data.as_ptr().add(a_at),
                        b.data.as_ptr().add(b_at),
                        steps,
                        chunk,
                        acc.as_mut_ptr().add(ib * NC + jb),
                        k0 == 0,
                        blk.cols - jb <= TILE,
                    )
                };
            }
        }
    }
    drop(_tiles);
    for r in 0..blk.rows {
        let src = &acc[r * NC..r * NC + blk.cols];
        // SAFETY: (i0 + r, j0 + c) is inside this task's block of dst.
        let row = unsafe {
            dst.ptr
                .offset((blk.i0 + r) as isize * dst.rs + blk.j0 as isize * dst.cs)
        };
        if dst.cs == 1 {
            // SAFETY: as above, `cols` contiguous elements.
            let o = unsafe { std::slice::from_raw_parts_mut(row, blk.cols) };
            if accumulate {
                o.iter_mut().zip(src).for_each(|(o, &v)| *o += scale * v);
            } else {
                o.iter_mut().zip(src).for_each(|(o, &v)| *o = scale * v);
            }
        } else {
            for (c, &v) in src.iter().enumerate() {
                // SAFETY: as above.
                let o = unsafe { &mut *row.offset(c as isize * dst.cs) };
                *o = if accumulate {
                    *o + scale * v
                } else {
                    scale * v
                };
            }
        }
    }
    give(&POOL_C, acc);
}

/// Holds this thread's tile configuration for one task and releases the tile state after it
/// (an idle thread then carries no 8 KiB of tile registers through context switches).
struct Tiles;

#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

impl Tiles {
    fn configure() -> Self {
        let mut config = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            bytes_per_row: [0; 16],
            rows: [0; 16],
        };
        // Tiles 0-3: the f32 result block; 4-5: two 16-row slices of a; 6-7: two 16-column
        // slices of b. Every one 16 rows of 64 bytes.
        for t in 0..8 {
            config.bytes_per_row[t] = 64;
            config.rows[t] = TILE as u8;
        }
        // SAFETY: a valid palette-1 configuration; AMX is available (checked by the caller).
        unsafe {
            std::arch::asm!(
                "ldtilecfg [{}]",
                in(reg) &config as *const TileConfig,
                options(nostack, readonly)
            )
        };
        Tiles
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: releasing the tile state configured above.
        unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// `c (32 x 32) [+]= a (32 x 32 chunk) . b (32 chunk x 32)` over `chunk` k steps of 32: `a`
/// points at a tile of the first of two 16-row strips (`steps` tiles each), `b` likewise for
/// two 16-column strips; `c` is f32 with rows [`NC`] apart, zeroed first when `first`. Tiles
/// must be configured ([`Tiles`]).
#[inline(always)]
unsafe fn kernel(
    a: *const u16,
    b: *const u32,
    steps: usize,
    chunk: usize,
    c: *mut f32,
    first: bool,
    narrow: bool,
) {
    if narrow {
        // SAFETY: the caller's guarantees, for the block's first 16 columns.
        return unsafe { kernel_narrow(a, b, steps, chunk, c, first) };
    }
    use std::arch::asm;
    const ROW: usize = 64;
    let c_stride = NC * 4;
    // SAFETY (whole block): every load reads one packed 1 KiB tile inside the strips the
    // caller vouches for; the result tiles are 16 rows of 64 bytes inside the caller's `c`.
    unsafe {
        let (c0, c1, c2, c3) = (c, c.add(TILE), c.add(TILE * NC), c.add(TILE * NC + TILE));
        if first {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
        } else {
            asm!(
                "tileloadd tmm0, [{c0} + {s} * 1]",
                "tileloadd tmm1, [{c1} + {s} * 1]",
                "tileloadd tmm2, [{c2} + {s} * 1]",
                "tileloadd tmm3, [{c3} + {s} * 1]",
                c0 = in(reg) c0,
                c1 = in(reg) c1,
                c2 = in(reg) c2,
                c3 = in(reg) c3,
                s = in(reg) c_stride,
                options(nostack, readonly)
            );
        }
        let (mut a0, mut a1) = (a, a.add(steps * A_TILE));
        let (mut b0, mut b1) = (b, b.add(steps * B_TILE));
        for _ in 0..chunk {
            asm!(
                "tileloadd tmm4, [{a0} + {row} * 1]",
                "tileloadd tmm6, [{b0} + {row} * 1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {row} * 1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {row} * 1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0,
                a1 = in(reg) a1,
                b0 = in(reg) b0,
                b1 = in(reg) b1,
                row = in(reg) ROW,
                options(nostack, readonly)
            );
            a0 = a0.add(A_TILE);
            a1 = a1.add(A_TILE);
            b0 = b0.add(B_TILE);
            b1 = b1.add(B_TILE);
        }
        asm!(
            "tilestored [{c0} + {s} * 1], tmm0",
            "tilestored [{c1} + {s} * 1], tmm1",
            "tilestored [{c2} + {s} * 1], tmm2",
            "tilestored [{c3} + {s} * 1], tmm3",
            c0 = in(reg) c0,
            c1 = in(reg) c1,
            c2 = in(reg) c2,
            c3 = in(reg) c3,
            s = in(reg) c_stride,
            options(nostack)
        );
    }
}

/// [`kernel`] for a block whose last 16 columns are all padding (a product 40 or 16 wide, an
/// attention head's values): two result tiles instead of four, half the tile products.
#[inline]
unsafe fn kernel_narrow(
    a: *const u16,
    b: *const u32,
    steps: usize,
    chunk: usize,
    c: *mut f32,
    first: bool,
) {
    use std::arch::asm;
    const ROW: usize = 64;
    let c_stride = NC * 4;
    // SAFETY (whole block): as in `kernel`, for tiles 0 and 2 and the first strip of b.
    unsafe {
        let (c0, c2) = (c, c.add(TILE * NC));
        if first {
            asm!("tilezero tmm0", "tilezero tmm2", options(nostack, nomem));
        } else {
            asm!(
                "tileloadd tmm0, [{c0} + {s} * 1]",
                "tileloadd tmm2, [{c2} + {s} * 1]",
                c0 = in(reg) c0,
                c2 = in(reg) c2,
                s = in(reg) c_stride,
                options(nostack, readonly)
            );
        }
        let (mut a0, mut a1, mut b0) = (a, a.add(steps * A_TILE), b);
        for _ in 0..chunk {
            asm!(
                "tileloadd tmm4, [{a0} + {row} * 1]",
                "tileloadd tmm6, [{b0} + {row} * 1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm5, [{a1} + {row} * 1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                a0 = in(reg) a0,
                a1 = in(reg) a1,
                b0 = in(reg) b0,
                row = in(reg) ROW,
                options(nostack, readonly)
            );
            a0 = a0.add(A_TILE);
            a1 = a1.add(A_TILE);
            b0 = b0.add(B_TILE);
        }
        asm!(
            "tilestored [{c0} + {s} * 1], tmm0",
            "tilestored [{c2} + {s} * 1], tmm2",
            c0 = in(reg) c0,
            c2 = in(reg) c2,
            s = in(reg) c_stride,
            options(nostack)
        );
    }
}

/// 32 consecutive f32 from `ptr` (the first `len` of them; zeros after) rounded to bf16 in
/// order, as one vector: 16 VNNI pairs when the 32 run down k.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn bf16x32(ptr: *const f32, len: usize) -> __m512i {
    let load = |p: *const f32, n: usize| {
        if n >= 16 {
            // SAFETY: 16 elements readable (caller).
            unsafe { _mm512_loadu_ps(p) }
        } else {
            // SAFETY: masked-off lanes are not read.
            unsafe { _mm512_maskz_loadu_ps(((1u32 << n) - 1) as u16, p) }
        }
    };
    let lo = load(ptr, len.min(16));
    // SAFETY: past-the-end pointer arithmetic only; nothing is read when len <= 16.
    let hi = load(unsafe { ptr.add(16) }, len.saturating_sub(16));
    // VCVTNE2PS2BF16 rounds to nearest even, as `bf16_rounded`.
    // SAFETY: same size; any bits are a valid integer vector.
    unsafe { std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo)) }
}

/// Writes the 16-row strip of [`PackedA`] that starts at row `r0` (zeros past m and k).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_a_strip(r0: usize, m: usize, k: usize, a: MatRef, k_pad: usize, out: &mut [u16]) {
    let steps = k_pad / KSTEP;
    if a.rs == 1 && a.cs != 1 {
        // Columns of a run down the rows (a transposed weight in a backward pass): the strip's
        // 16 rows of one column are one vector; 32 columns are gathered and transposed into
        // the tile's rows.
        let rows = TILE.min(m.saturating_sub(r0));
        let mut columns = [[0u16; TILE]; KSTEP];
        for s in 0..steps {
            let (k0, len) = (s * KSTEP, KSTEP.min(k.saturating_sub(s * KSTEP)));
            for (c, column) in columns.iter_mut().enumerate() {
                let v = if c < len && rows > 0 {
                    // SAFETY: rows r0..r0 + rows of column k0 + c are contiguous elements of a
                    // (caller); masked-off lanes are not read.
                    let x = unsafe {
                        _mm512_maskz_loadu_ps(
                            ((1u32 << rows) - 1) as u16,
                            a.ptr.offset((k0 + c) as isize * a.cs + r0 as isize),
                        )
                    };
                    // SAFETY: same size; any bits are a valid integer vector.
                    unsafe { std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(x)) }
                } else {
                    _mm256_setzero_si256()
                };
                // SAFETY: 32 bytes.
                unsafe { _mm256_storeu_si256(column.as_mut_ptr() as *mut __m256i, v) };
            }
            let tile = &mut out[s * A_TILE..(s + 1) * A_TILE];
            for (r, row) in tile.chunks_exact_mut(KSTEP).enumerate() {
                for (c, o) in row.iter_mut().enumerate() {
                    *o = columns[c][r];
                }
            }
        }
        return;
    }
    let mut line = [0f32; KSTEP];
    for r in 0..TILE {
        let i = r0 + r;
        for s in 0..steps {
            let (k0, len) = (s * KSTEP, KSTEP.min(k.saturating_sub(s * KSTEP)));
            let at = (s * TILE + r) * KSTEP;
            let dst = out[at..at + KSTEP].as_mut_ptr() as *mut __m512i;
            if i >= m {
                // SAFETY: 64 bytes of `out`.
                unsafe { _mm512_storeu_si512(dst, _mm512_setzero_si512()) };
                continue;
            }
            let src = if a.cs == 1 {
                // SAFETY: (i, k0..k0 + len) are contiguous elements of a (caller).
                unsafe { a.ptr.offset(i as isize * a.rs + k0 as isize) }
            } else {
                for (c, v) in line[..len].iter_mut().enumerate() {
                    // SAFETY: (i, k0 + c) is an element of a (caller).
                    *v = unsafe { *a.ptr.offset(i as isize * a.rs + (k0 + c) as isize * a.cs) };
                }
                line.as_ptr()
            };
            // SAFETY: `len` readable elements at src; 64 bytes of `out`.
            unsafe { _mm512_storeu_si512(dst, bf16x32(src, len)) };
        }
    }
}

/// Writes the 16-column strip of [`PackedB`] that starts at column `j0` (zeros past n and k).
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_b_strip(j0: usize, n: usize, k: usize, b: MatRef, k_pad: usize, out: &mut [u32]) {
    let cols = TILE.min(n.saturating_sub(j0));
    let steps = k_pad / KSTEP;
    if b.rs == 1 && b.cs != 1 {
        // Columns of b run down k (a transposed weight, k^T): 32 of a column's k values make
        // its 16 pairs of one tile; 16 columns are gathered and transposed into tile rows.
        let mut columns = [[0u32; TILE]; TILE];
        for s in 0..steps {
            let (k0, len) = (s * KSTEP, KSTEP.min(k.saturating_sub(s * KSTEP)));
            for (c, column) in columns.iter_mut().enumerate() {
                let v = if c < cols {
                    // SAFETY: column j0 + c of b holds k contiguous elements (caller).
                    unsafe { bf16x32(b.ptr.offset((j0 + c) as isize * b.cs + k0 as isize), len) }
                } else {
                    _mm512_setzero_si512()
                };
                // SAFETY: 64 bytes.
                unsafe { _mm512_storeu_si512(column.as_mut_ptr() as *mut __m512i, v) };
            }
            let tile = &mut out[s * B_TILE..(s + 1) * B_TILE];
            for (p, row) in tile.chunks_exact_mut(TILE).enumerate() {
                for (c, o) in row.iter_mut().enumerate() {
                    *o = columns[c][p];
                }
            }
        }
        return;
    }
    if b.cs == 1 {
        // Rows of b are contiguous (im2col columns, activations): two rows of 16 give one tile
        // row of 16 pairs, converted together and interleaved by one permute.
        let mask = ((1u32 << cols) - 1) as u16;
        let load = |kk: usize| {
            if kk < k {
                // SAFETY: row kk of b holds `cols` contiguous elements from column j0
                // (caller); masked-off lanes are not read.
                unsafe {
                    _mm512_maskz_loadu_ps(mask, b.ptr.offset(kk as isize * b.rs + j0 as isize))
                }
            } else {
                _mm512_setzero_ps()
            }
        };
        for p in 0..k_pad / 2 {
            let row = vnni_pairs(load(2 * p), load(2 * p + 1));
            // SAFETY: 64 bytes of `out`.
            unsafe { _mm512_storeu_si512(out[p * TILE..].as_mut_ptr() as *mut __m512i, row) };
        }
        return;
    }
    // Any other strides: element by element.
    for p in 0..k_pad / 2 {
        for (c, o) in out[p * TILE..(p + 1) * TILE].iter_mut().enumerate() {
            let at = |kk: usize| -> f32 {
                if kk < k && c < cols {
                    // SAFETY: (kk, j0 + c) is an element of b (caller).
                    unsafe { *b.ptr.offset(kk as isize * b.rs + (j0 + c) as isize * b.cs) }
                } else {
                    0.0
                }
            };
            *o = bf16_pair(at(2 * p), at(2 * p + 1));
        }
    }
}

/// Writes pair `p` (rows `lo` and `hi` of b, n_pad elements each) into every 16-column strip of
/// a [`PackedB`] buffer whose strips are `strip_len` apart.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_pair(lo: &[f32], hi: &[f32], p: usize, strip_len: usize, out: &mut [u32]) {
    for (s, (l, h)) in lo.chunks_exact(TILE).zip(hi.chunks_exact(TILE)).enumerate() {
        // SAFETY: 16 elements each.
        let (l, h) = unsafe { (_mm512_loadu_ps(l.as_ptr()), _mm512_loadu_ps(h.as_ptr())) };
        let at = s * strip_len + p * TILE;
        let dst = out[at..at + TILE].as_mut_ptr() as *mut __m512i;
        // SAFETY: 64 bytes of `out`.
        unsafe { _mm512_storeu_si512(dst, vnni_pairs(l, h)) };
    }
}

/// Two rows of 16 (b's rows 2p and 2p+1) as one tile row of 16 VNNI pairs: bf16 `lo[j]` in the
/// low half of lane j, `hi[j]` in the high half.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
fn vnni_pairs(lo: __m512, hi: __m512) -> __m512i {
    // VCVTNE2PS2BF16 puts `lo` in the low 16 words and `hi` in the high ones; one permute
    // interleaves them.
    // SAFETY: same size; any bits are a valid integer vector.
    let both = unsafe { std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo)) };
    // SAFETY: the index vector is 64 bytes.
    let interleave = unsafe { _mm512_loadu_si512(INTERLEAVE_PAIRS.as_ptr() as *const _) };
    _mm512_permutexvar_epi16(interleave, both)
}

/// vpermw indices that interleave the low and high 16 words of a vector: 0, 16, 1, 17, ...
const INTERLEAVE_PAIRS: [u16; 32] = {
    let mut idx = [0u16; 32];
    let mut i = 0;
    while i < 16 {
        idx[2 * i] = i as u16;
        idx[2 * i + 1] = (i + 16) as u16;
        i += 1;
    }
    idx
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gemm::sgemm_f32;

    fn bf16(x: f32) -> f32 {
        f32::from_bits(bf16_rounded(x) & 0xffff_0000)
    }

    #[test]
    fn precision_names() {
        assert_eq!("bf16".parse(), Ok(MatmulPrecision::Bf16));
        assert_eq!(" F32 ".parse(), Ok(MatmulPrecision::F32));
        let err = "f16".parse::<MatmulPrecision>().unwrap_err();
        assert!(
            err.contains("f32 or bf16") && err.contains("`f16`"),
            "{err}"
        );
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        // 1 + 2^-8 is halfway between bf16 1 and 1 + 2^-7: ties go to the even (1).
        assert_eq!(bf16(1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(bf16(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2.0 * 2f32.powi(-7));
        assert_eq!(
            bf16(1.0 + 2f32.powi(-8) + 2f32.powi(-20)),
            1.0 + 2f32.powi(-7)
        );
        assert_eq!(bf16(-3.0), -3.0);
        assert!(bf16(f32::NAN).is_nan());
        assert_eq!(bf16(f32::INFINITY), f32::INFINITY);
        assert_eq!(half::bf16::from_f32(0.1234567).to_f32(), bf16(0.1234567));
    }

    fn lcg(state: &mut u64) -> f32 {
        *state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Every layout the fused ops pass (row- and column-major on both sides, odd sizes,
    /// accumulation and scale) against an f32 product of the bf16-rounded inputs: the products
    /// are exact in f32, so only the summation order differs.
    #[test]
    fn matches_f32_product_of_rounded_inputs() {
        if !available() {
            eprintln!("no AMX on this CPU: the bf16 tile kernel is not exercised");
            return;
        }
        let mut seed = 7;
        for &(m, n, k) in &[(16, 16, 16), (37, 53, 70), (130, 300, 100), (64, 40, 1000)] {
            for &(a_t, b_t, acc) in &[
                (false, false, false),
                (true, true, true),
                (false, true, true),
                (true, false, false),
            ] {
                let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
                let b: Vec<f32> = (0..k * n).map(|_| lcg(&mut seed)).collect();
                let a_view = if a_t {
                    MatRef::rows(&a, 0, m).t()
                } else {
                    MatRef::rows(&a, 0, k)
                };
                let b_view = if b_t {
                    MatRef::rows(&b, 0, k).t()
                } else {
                    MatRef::rows(&b, 0, n)
                };
                let (ar, br): (Vec<f32>, Vec<f32>) = (
                    a.iter().map(|&x| bf16(x)).collect(),
                    b.iter().map(|&x| bf16(x)).collect(),
                );
                let ar_view = MatRef {
                    ptr: ar.as_ptr(),
                    ..a_view
                };
                let br_view = MatRef {
                    ptr: br.as_ptr(),
                    ..b_view
                };
                let init: Vec<f32> = (0..m * n).map(|_| lcg(&mut seed)).collect();
                let (mut got, mut want) = (init.clone(), init.clone());
                unsafe {
                    gemm_bf16(
                        m,
                        n,
                        k,
                        MatMut::rows(&mut got, 0, n),
                        acc,
                        a_view,
                        b_view,
                        0.5,
                        true,
                    );
                    sgemm_f32(
                        m,
                        n,
                        k,
                        MatMut::rows(&mut want, 0, n),
                        acc,
                        ar_view,
                        br_view,
                        0.5,
                        false,
                    );
                }
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    // Sums of k products of values below 1 in magnitude, in another order.
                    assert!(
                        (g - w).abs() <= 1e-5 * (k as f32).sqrt() * 4.0,
                        "{m}x{n}x{k} a_t={a_t} b_t={b_t} acc={acc} [{i}]: {g} vs {w}"
                    );
                }
            }
        }
    }

    /// A block of rows and columns of operands packed once (how a layer's weight is reused).
    #[test]
    fn packed_blocks_match_the_whole_product() {
        if !available() {
            eprintln!("no AMX on this CPU: the bf16 tile kernel is not exercised");
            return;
        }
        let (m, n, k) = (96, 100, 70);
        let mut seed = 3;
        let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
        let b: Vec<f32> = (0..k * n).map(|_| lcg(&mut seed)).collect();
        let (a_view, b_view) = (MatRef::rows(&a, 0, k), MatRef::rows(&b, 0, n));
        let mut whole = vec![0f32; m * n];
        let mut block = vec![0f32; 64 * 68];
        unsafe {
            gemm_bf16(
                m,
                n,
                k,
                MatMut::rows(&mut whole, 0, n),
                false,
                a_view,
                b_view,
                1.0,
                false,
            );
            let (pa, pb) = (
                PackedA::pack(m, k, a_view, true),
                PackedB::pack(k, n, b_view, true),
            );
            gemm_packed(
                MatMut::rows(&mut block, 0, 68),
                false,
                &pa,
                32..96,
                &pb,
                32..100,
                1.0,
                true,
            );
        }
        for r in 0..64 {
            for c in 0..68 {
                assert_eq!(
                    block[r * 68 + c],
                    whole[(32 + r) * n + 32 + c],
                    "({r}, {c})"
                );
            }
        }
    }

    #[test]
    fn operands_made_row_by_row_or_from_f16_pack_like_f32_matrices() {
        if !available() {
            eprintln!("no AMX on this CPU: the packers are not exercised");
            return;
        }
        // Odd sizes: partial strips, k not a multiple of the tile's 32.
        let (m, n, k) = (37, 45, 71);
        let mut seed = 11;
        let half = |len: usize, seed: &mut u64| -> Vec<f16> {
            (0..len).map(|_| f16::from_f32(lcg(seed))).collect()
        };
        let (a16, bt16) = (half(m * k, &mut seed), half(n * k, &mut seed));
        let a: Vec<f32> = a16.iter().map(|v| v.to_f32()).collect();
        let bt: Vec<f32> = bt16.iter().map(|v| v.to_f32()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| bt[(i % n) * k + i / n]).collect();
        unsafe {
            let reference = PackedA::pack(m, k, MatRef::rows(&a, 0, k), false);
            let from_f16 = PackedA::pack_f16_rows(m, k, &a16, true);
            // Pooled buffers may be longer than the packing; compare what it wrote.
            let len = m.next_multiple_of(BLOCK) * k.next_multiple_of(KSTEP);
            assert!(
                reference.data[..len] == from_f16.data[..len],
                "f16 rows of a"
            );
            let reference = PackedB::pack(k, n, MatRef::rows(&b, 0, n), false);
            let from_f16 = PackedB::pack_f16_columns(k, n, &bt16, true);
            let len = n.next_multiple_of(BLOCK) * k.next_multiple_of(KSTEP) / 2;
            assert!(
                reference.data[..len] == from_f16.data[..len],
                "f16 columns of b"
            );
            let by_rows = PackedB::pack_rows(k, n, |kk, row| {
                row.copy_from_slice(&b[kk * n..(kk + 1) * n])
            });
            assert!(
                reference.data[..len] == by_rows.data[..len],
                "b made row by row"
            );
        }
    }
}
