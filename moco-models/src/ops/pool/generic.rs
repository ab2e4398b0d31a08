//! The stem's max pool with candle's generic ops, on any device and dtype.

use candle_core::{Result, Tensor};

/// torchvision's stem pooling, `MaxPool2d(3, stride=2, padding=1)`, on a post-ReLU input, with
/// candle's ops (other devices than the CPU, other dtypes; [`max_pool2d`] on the CPU).
///
/// Candle's `max_pool2d` has no padding and no backward for overlapping windows, so this is a
/// separable max (rows, then columns) over strided views, which autograd differentiates. Zero
/// padding gives the same maxima as PyTorch's -inf padding because the input is >= 0; a gradient
/// that reaches a tied zero is stopped by the ReLU before it, as in PyTorch.
pub(super) fn max_pool_3x3_s2_p1(x: &Tensor) -> Result<Tensor> {
    // Along `dim` of size n: out[i] = max(x[2i-1], x[2i], x[2i+1]), out size (n - 1) / 2 + 1.
    fn pool(x: &Tensor, dim: usize) -> Result<Tensor> {
        let n = x.dim(dim)?;
        let out = (n - 1) / 2 + 1;
        // Padded by 1 on the left and to 2 * (out + 1) positions, viewed as (out + 1, 2) pairs:
        // padded position 2i + k (original 2i + k - 1) is pair i, element k. The three taps are
        // views of the one padded copy, so the graph keeps that copy and the two maxima only.
        let xp = x.pad_with_zeros(dim, 1, 2 * out + 1 - n)?;
        let mut shape = xp.dims().to_vec();
        shape[dim] = out + 1;
        shape.insert(dim + 1, 2);
        let pairs = xp.reshape(shape)?;
        let tap = |start: usize, k: usize| -> Result<Tensor> {
            pairs
                .narrow(dim, start, out)?
                .narrow(dim + 1, k, 1)?
                .squeeze(dim + 1)
        };
        tap(0, 0)?.maximum(&tap(0, 1)?)?.maximum(&tap(1, 0)?)
    }
    pool(&pool(x, 2)?, 3)
}
