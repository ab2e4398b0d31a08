//! The geometry of a 2-D convolution (shapes, stride, padding, groups) and its three passes,
//! shared by the CPU kernels and the oneDNN engine.

use candle_core::Result;

/// Geometry of one convolution: input (N, C, H, W), weight (O, C/groups, KH, KW).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Geometry {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub o: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
    pub groups: usize,
    pub ho: usize,
    pub wo: usize,
}

impl Geometry {
    pub fn new(
        x: &[usize],
        w: &[usize],
        stride: usize,
        padding: usize,
        groups: usize,
    ) -> Result<Self> {
        let (&[n, c, h, wd], &[o, cg, kh, kw]) = (x, w) else {
            candle_core::bail!("conv2d: expected 4-D input and weight, got {x:?} and {w:?}")
        };
        if groups == 0 || c % groups != 0 || o % groups != 0 || cg * groups != c {
            candle_core::bail!("conv2d: input {x:?}, weight {w:?} and groups {groups} disagree")
        }
        if stride == 0 || h + 2 * padding < kh || wd + 2 * padding < kw {
            candle_core::bail!("conv2d: kernel {kh}x{kw} larger than the padded input {h}x{wd}")
        }
        Ok(Self {
            n,
            c,
            h,
            w: wd,
            o,
            kh,
            kw,
            stride,
            padding,
            groups,
            ho: (h + 2 * padding - kh) / stride + 1,
            wo: (wd + 2 * padding - kw) / stride + 1,
        })
    }
    /// Input channels per group.
    pub fn cg(&self) -> usize {
        self.c / self.groups
    }
    /// Output channels per group.
    pub fn og(&self) -> usize {
        self.o / self.groups
    }
    /// Rows of the im2col matrix: C/groups x KH x KW.
    pub fn k(&self) -> usize {
        self.cg() * self.kh * self.kw
    }
    pub fn in_plane(&self) -> usize {
        self.h * self.w
    }
    pub fn out_plane(&self) -> usize {
        self.ho * self.wo
    }
    /// (N, C, H, W, O, KH, KW, stride, padding, groups), what the oneDNN engine takes.
    pub fn as_array(&self) -> [usize; 10] {
        [
            self.n,
            self.c,
            self.h,
            self.w,
            self.o,
            self.kh,
            self.kw,
            self.stride,
            self.padding,
            self.groups,
        ]
    }
    /// Whether the `onednn` engine asks for Winograd kernels: 3x3, stride 1, no groups, and 32
    /// or more input and output channels, multiples of 16 (oneDNN's blocks). Measured on the
    /// small ResNet's layers (2 threads, batch 64): about 2x faster from 32 channels up, slower
    /// at 8 and 16.
    pub fn winograd_pays(&self) -> bool {
        (self.kh, self.kw, self.stride, self.groups) == (3, 3, 1, 1)
            && self.c >= 32
            && self.o >= 32
            && self.c % 16 == 0
            && self.o % 16 == 0
    }
    /// An error unless `a` and `b` have the sizes of `pass`'s operands; the result's size.
    pub fn check_operands(&self, pass: Pass, a: &[f32], b: &[f32]) -> Result<usize> {
        let [a_len, b_len, out_len] = self.lens(pass);
        if a.len() != a_len || b.len() != b_len {
            candle_core::bail!(
                "conv2d {pass:?}: operands of {} and {} floats, expected {a_len} and {b_len}",
                a.len(),
                b.len()
            )
        }
        Ok(out_len)
    }
    /// Element counts of (a, b, result) of `pass` (operand order as in [`Pass`]).
    pub fn lens(&self, pass: Pass) -> [usize; 3] {
        let (x, w, y) = (
            self.n * self.c * self.in_plane(),
            self.o * self.k(),
            self.n * self.o * self.out_plane(),
        );
        match pass {
            Pass::Forward => [x, w, y],
            Pass::GradInput => [y, w, x],
            Pass::GradWeight => [x, y, w],
        }
    }
}

/// One of the three passes of a convolution, by its operands `(a, b) -> result`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub(crate) enum Pass {
    /// `y` from `(x, w)`.
    Forward = 0,
    /// `gx` from `(gy, w)`.
    GradInput = 1,
    /// `gw` from `(x, gy)`.
    GradWeight = 2,
}
