//! The window geometry both max-pool kernels check.

use candle_core::{Result, Tensor};

/// The checks both kernels make: an (N, C, H, W) input that a `kernel` window with `stride`
/// and `padding` (at most half the kernel, as in PyTorch) fits. `who` names the op in errors.
pub(super) fn check_window(
    x: &Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
    who: &str,
) -> Result<()> {
    let (_, _, h, w) = x.dims4()?;
    if kernel == 0
        || stride == 0
        || padding > kernel / 2
        || h + 2 * padding < kernel
        || w + 2 * padding < kernel
    {
        candle_core::bail!(
            "{who}: kernel {kernel}, stride {stride}, padding {padding} do not fit an input of {h}x{w}"
        )
    }
    Ok(())
}
