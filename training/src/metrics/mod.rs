//! MagicBrush's metrics (L1, L2 = MSE, PSNR, SSIM, CLIP-T) and two of ours (edit-region L1,
//! preservation L1), per image; `crate::eval` averages them. All pixel metrics work on RGB in [0, 1].

pub mod clip_t;
pub mod pixel;
pub mod region;
pub mod resize;
pub mod ssim;

pub use clip_t::ClipScorer;
pub use pixel::{l1, mse, psnr};
pub use region::{edit_region_l1, preservation_l1};
pub use resize::{resize_bicubic, resize_mask};
pub use ssim::ssim;

#[derive(Debug, thiserror::Error)]
pub enum MetricError {
    #[error("{what}: sizes differ ({a_width}x{a_height} vs {b_width}x{b_height})")]
    SizeMismatch {
        what: &'static str,
        a_width: u32,
        a_height: u32,
        b_width: u32,
        b_height: u32,
    },
    #[error("SSIM needs images of at least {min}x{min} pixels (its Gaussian window), got {width}x{height}")]
    TooSmall { min: usize, width: u32, height: u32 },
    #[error("CLIP-T: {0}")]
    Clip(rl4pix_model::ModelError),
}

// By hand rather than `#[from]`, which would also make the model error the `source()` and print
// it twice in an error chain.
impl From<rl4pix_model::ModelError> for MetricError {
    fn from(error: rl4pix_model::ModelError) -> Self {
        Self::Clip(error)
    }
}

pub type Result<T> = std::result::Result<T, MetricError>;

pub(crate) fn check_same_size(what: &'static str, a: (u32, u32), b: (u32, u32)) -> Result<()> {
    if a != b {
        return Err(MetricError::SizeMismatch {
            what,
            a_width: a.0,
            a_height: a.1,
            b_width: b.0,
            b_height: b.1,
        });
    }
    Ok(())
}
