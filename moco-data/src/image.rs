//! 8-bit images and the pixel operations torchvision runs on PIL images: decoding as
//! `Image.convert("RGB")`, PIL's bilinear (antialiased) resampling, cropping, flipping, and the
//! conversion to a normalised float tensor.

use std::borrow::Cow;
use std::path::Path;

use crate::{Error, Result};

/// An 8-bit image, height x width x channels, row-major (PIL's layout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// 1 (grayscale) or 3 (RGB).
    pub channels: usize,
    /// `height * width * channels` bytes.
    pub data: Vec<u8>,
}

impl Image {
    /// An image of this one's size and channels holding `data` (no copy of this one's pixels,
    /// which `Image { data, ..img.clone() }` would make and throw away).
    pub(crate) fn with_data(&self, data: Vec<u8>) -> Image {
        Image {
            width: self.width,
            height: self.height,
            channels: self.channels,
            data,
        }
    }

    /// An image from raw bytes; errors when the length does not match.
    pub fn new(width: usize, height: usize, channels: usize, data: Vec<u8>) -> Result<Self> {
        if data.len() != width * height * channels || width == 0 || height == 0 {
            return Err(Error::config(
                "image",
                format!(
                    "{width}x{height}x{channels} image needs {} bytes, got {}",
                    width * height * channels,
                    data.len()
                ),
            ));
        }
        Ok(Self {
            width,
            height,
            channels,
            data,
        })
    }

    /// Decodes an image file (JPEG, PNG, BMP, GIF, WebP, TIFF) into RGB as PIL's
    /// `Image.open(path).convert("RGB")` does: grayscale replicated, alpha dropped, palettes
    /// expanded. The error names the file.
    pub fn open_rgb(path: &Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).map_err(|e| Error::file(path, format!("cannot open: {e}")))?;
        Self::decode_rgb(&bytes, path)
    }

    /// Decodes image bytes (see [`open_rgb`](Self::open_rgb)); `name` is used in errors. With
    /// the `libjpeg` feature, JPEGs are decoded by libjpeg(-turbo), as PIL decodes them.
    pub fn decode_rgb(bytes: &[u8], name: &Path) -> Result<Self> {
        if crate::jpeg::is_jpeg(bytes) {
            if let Some((width, height, rgb)) = crate::jpeg::decode_rgb(bytes, name)? {
                return Image::new(width, height, 3, rgb);
            }
        }
        let img = image::load_from_memory(bytes)
            .map_err(|e| Error::file(name, format!("cannot decode image: {e}")))?;
        let rgb = img.into_rgb8();
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        Self::new(w, h, 3, rgb.into_raw())
    }

    /// The region `[left, left + width) x [top, top + height)`; parts outside the image are
    /// filled with 0 (torchvision pads when a crop is larger than the image).
    pub fn crop(&self, left: i64, top: i64, width: usize, height: usize) -> Image {
        let c = self.channels;
        let inside = left >= 0
            && top >= 0
            && left as usize + width <= self.width
            && top as usize + height <= self.height;
        if inside {
            // Whole rows of the region, one copy each.
            let (l, t, row) = (left as usize * c, top as usize, self.width * c);
            let mut data = Vec::with_capacity(width * height * c);
            for y in t..t + height {
                data.extend_from_slice(&self.data[y * row + l..y * row + l + width * c]);
            }
            return Image {
                width,
                height,
                channels: c,
                data,
            };
        }
        let mut data = vec![0u8; width * height * c];
        for y in 0..height {
            let sy = top + y as i64;
            if sy < 0 || sy >= self.height as i64 {
                continue;
            }
            for x in 0..width {
                let sx = left + x as i64;
                if sx < 0 || sx >= self.width as i64 {
                    continue;
                }
                let src = (sy as usize * self.width + sx as usize) * c;
                data[(y * width + x) * c..(y * width + x + 1) * c]
                    .copy_from_slice(&self.data[src..src + c]);
            }
        }
        Image {
            width,
            height,
            channels: c,
            data,
        }
    }

    /// Mirror left-right.
    pub fn hflip(&self) -> Image {
        let c = self.channels;
        let mut data = Vec::with_capacity(self.data.len());
        for y in 0..self.height {
            for x in (0..self.width).rev() {
                let s = (y * self.width + x) * c;
                data.extend_from_slice(&self.data[s..s + c]);
            }
        }
        Image { data, ..*self }
    }

    /// Resizes to `width x height` with PIL's `Image.resize(..., BILINEAR)` (see [`resample`]).
    pub fn resize(&self, width: usize, height: usize) -> Image {
        resample(
            self,
            (0.0, 0.0, self.width as f64, self.height as f64),
            width,
            height,
        )
    }

    /// CHW float values `(pixel / 255 - mean[c]) / std[c]` (`ToTensor` then `Normalize`),
    /// appended to `out`.
    pub fn to_chw_normalized(&self, mean: &[f32], std: &[f32], out: &mut Vec<f32>) {
        let start = out.len();
        out.resize(start + self.width * self.height * self.channels, 0.0);
        self.write_chw_normalized(mean, std, &mut out[start..]);
    }

    /// Like [`to_chw_normalized`](Self::to_chw_normalized), into a slice of exactly
    /// `channels * height * width` values.
    pub fn write_chw_normalized(&self, mean: &[f32], std: &[f32], out: &mut [f32]) {
        let c = self.channels;
        let plane = self.width * self.height;
        // Each channel's 256 possible values, computed as torchvision does (x = p / 255, then
        // (x - m) / s), then looked up per pixel.
        let table = |ch: usize| -> [f32; 256] {
            let (m, s) = (mean[ch % mean.len()], std[ch % std.len()]);
            std::array::from_fn(|p| (p as f32 / 255.0 - m) / s)
        };
        if c == 3 {
            let (t0, t1, t2) = (table(0), table(1), table(2));
            let (r, rest) = out[..3 * plane].split_at_mut(plane);
            let (g, b) = rest.split_at_mut(plane);
            let planes = r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut());
            for (((r, g), b), px) in planes.zip(self.data.chunks_exact(3)) {
                *r = t0[px[0] as usize];
                *g = t1[px[1] as usize];
                *b = t2[px[2] as usize];
            }
            return;
        }
        for (ch, dst) in out.chunks_exact_mut(plane).enumerate().take(c) {
            let t = table(ch);
            for (d, &p) in dst.iter_mut().zip(self.data.iter().skip(ch).step_by(c)) {
                *d = t[p as usize];
            }
        }
    }
}

// Pillow's fixed-point precision for 8-bit resampling (Resample.c: PRECISION_BITS = 32 - 8 - 2).
const PRECISION_BITS: u32 = 22;

/// Pillow's bilinear filter coefficients for one axis (Resample.c `precompute_coeffs`):
/// for each output index, the first input index and the fixed-point weights.
fn coefficients(in_size: usize, in0: f64, in1: f64, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = (in1 - in0) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 1.0 * filterscale; // bilinear support is 1
    let mut out = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = in0 + (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut k: Vec<f64> = (0..n)
            .map(|x| {
                let t = ((x + xmin) as f64 - center + 0.5) * ss;
                let t = t.abs();
                if t < 1.0 {
                    1.0 - t
                } else {
                    0.0
                }
            })
            .collect();
        let ww: f64 = k.iter().sum();
        if ww != 0.0 {
            k.iter_mut().for_each(|w| *w /= ww);
        }
        let one = (1u64 << PRECISION_BITS) as f64;
        let ki = k
            .iter()
            .map(|&w| {
                if w < 0.0 {
                    (-0.5 + w * one) as i32
                } else {
                    (0.5 + w * one) as i32
                }
            })
            .collect();
        out.push((xmin, ki));
    }
    out
}

#[inline]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// The `(x0, y0, w, h)` region of an image `width` pixels wide with `c` bytes per pixel,
/// transposed: `w` rows of `h` pixels (row x holds the region's column x). Lets the horizontal
/// passes of the blur and the resize run as vertical ones, over contiguous lanes.
pub(crate) fn transpose(
    data: &[u8],
    width: usize,
    c: usize,
    (x0, y0, w, h): (usize, usize, usize, usize),
) -> Vec<u8> {
    // Pixels of 1 to 4 bytes are copied as arrays (a slice copy of a few bytes is a memcpy call).
    fn run<const C: usize>(
        data: &[u8],
        width: usize,
        (x0, y0, w, h): (usize, usize, usize, usize),
    ) -> Vec<u8> {
        let mut out = vec![0u8; w * h * C];
        for y in 0..h {
            let row = &data[((y0 + y) * width + x0) * C..][..w * C];
            for (x, px) in row.chunks_exact(C).enumerate() {
                let px: [u8; C] = px.try_into().unwrap_or([0; C]);
                out[(x * h + y) * C..][..C].copy_from_slice(&px);
            }
        }
        out
    }
    let region = (x0, y0, w, h);
    match c {
        1 => run::<1>(data, width, region),
        2 => run::<2>(data, width, region),
        3 => run::<3>(data, width, region),
        4 => run::<4>(data, width, region),
        _ => {
            let mut out = vec![0u8; w * h * c];
            for y in 0..h {
                let row = &data[((y0 + y) * width + x0) * c..][..w * c];
                for (x, px) in row.chunks_exact(c).enumerate() {
                    out[(x * h + y) * c..][..c].copy_from_slice(px);
                }
            }
            out
        }
    }
}

/// One output line of a resampling pass over lines of `lane` bytes: `out = clip8(half + sum_i
/// w_i * src[first + i])`, all bytes of a line at once (Pillow's 32-bit accumulators).
#[inline(always)]
fn resample_line(
    src: &[u8],
    lane: usize,
    first: usize,
    k: &[i32],
    acc: &mut [i32],
    out: &mut [u8],
) {
    acc.fill(1i32 << (PRECISION_BITS - 1));
    for (i, &w) in k.iter().enumerate() {
        let line = &src[(first + i) * lane..][..lane];
        for (a, &p) in acc.iter_mut().zip(line) {
            *a += p as i32 * w;
        }
    }
    for (o, &a) in out.iter_mut().zip(acc.iter()) {
        *o = clip8(a);
    }
}

/// PIL's `Image.resize((width, height), BILINEAR, box)`: a separable triangle filter whose
/// support grows with the downscale factor (antialiasing), weights in 22-bit fixed point,
/// horizontal pass first with 8-bit rounding between the passes, exactly as Pillow's
/// `ImagingResample` does for 8-bit images (including its 32-bit integer accumulators).
pub fn resample(img: &Image, bbox: (f64, f64, f64, f64), width: usize, height: usize) -> Image {
    resample_window(img, bbox, width, height, (0, 0, width, height))
}

/// The `(left, top, w, h)` window of [`resample`]'s `width x height` output, computing only
/// that window's pixels (and the intermediate rows they read): equal to resampling, then
/// cropping, since every output pixel has its own coefficients.
#[multiversion::multiversion(targets("x86_64+avx2", "x86_64+sse4.1"))]
pub fn resample_window(
    img: &Image,
    bbox: (f64, f64, f64, f64),
    width: usize,
    height: usize,
    window: (usize, usize, usize, usize),
) -> Image {
    let c = img.channels;
    let (x0, y0, x1, y1) = bbox;
    let (left, top, ww, wh) = window;
    assert!(
        left + ww <= width && top + wh <= height,
        "resample window {window:?} outside a {width}x{height} output"
    );
    let need_h = width != img.width || x0 != 0.0 || x1 != width as f64;
    let need_v = height != img.height || y0 != 0.0 || y1 != height as f64;
    let mut vk = coefficients(img.height, y0, y1, height);
    vk.truncate(top + wh);
    vk.drain(..top);
    // Rows the vertical pass reads.
    let (ybox_first, ybox_last) = if need_v {
        let first = vk.first().map(|k| k.0).unwrap_or(0);
        let last = vk.last().map(|k| k.0 + k.1.len()).unwrap_or(img.height);
        (first, last)
    } else {
        (0, img.height)
    };
    // Without a horizontal pass the vertical one reads the input itself (no copy).
    let tmp = if need_h {
        let mut hk = coefficients(img.width, x0, x1, width);
        hk.truncate(left + ww);
        hk.drain(..left);
        let (rows, y_off) = if need_v {
            (ybox_last - ybox_first, ybox_first)
        } else {
            (img.height, 0)
        };
        // The columns the pass reads, transposed into lines of `rows` pixels; the output comes
        // out transposed too and is turned back.
        let x_first = hk.first().map(|k| k.0).unwrap_or(0);
        let x_last = hk.iter().map(|k| k.0 + k.1.len()).max().unwrap_or(x_first);
        let cols = transpose(
            &img.data,
            img.width,
            c,
            (x_first, y_off, x_last - x_first, rows),
        );
        let lane = rows * c;
        let mut out = vec![0u8; ww * lane];
        let mut acc = vec![0i32; lane];
        for ((xmin, k), line) in hk.iter().zip(out.chunks_exact_mut(lane)) {
            resample_line(&cols, lane, xmin - x_first, k, &mut acc, line);
        }
        Cow::Owned(Image {
            width: ww,
            height: rows,
            channels: c,
            data: transpose(&out, rows, c, (0, 0, rows, ww)),
        })
    } else {
        Cow::Borrowed(img)
    };
    // A dimension that is not resampled is cropped to the window instead.
    let (crop_x, crop_y) = (if need_h { 0 } else { left }, if need_v { 0 } else { top });
    if !need_v {
        return tmp.crop(crop_x as i64, crop_y as i64, ww, wh);
    }
    let shift = if need_h { ybox_first } else { 0 };
    let lane = tmp.width * c;
    let mut data = vec![0u8; wh * lane];
    let mut acc = vec![0i32; lane];
    for ((ymin, k), line) in vk.iter().zip(data.chunks_exact_mut(lane)) {
        resample_line(&tmp.data, lane, ymin - shift, k, &mut acc, line);
    }
    let out = Image {
        width: tmp.width,
        height: wh,
        channels: c,
        data,
    };
    match need_h {
        true => out,
        false => out.crop(crop_x as i64, 0, ww, wh),
    }
}

/// torchvision `Resize(size)` with an int: the shorter side becomes `size`, the longer one
/// `int(size * long / short)` (truncated), aspect kept.
pub fn resize_shorter(img: &Image, size: usize) -> Image {
    let (w, h) = (img.width, img.height);
    let (ow, oh) = if w <= h {
        (size, (size as f64 * h as f64 / w as f64) as usize)
    } else {
        ((size as f64 * w as f64 / h as f64) as usize, size)
    };
    if (ow, oh) == (w, h) {
        return img.clone();
    }
    img.resize(ow, oh)
}

/// torchvision `Resize(size)` then `CenterCrop(crop)`: when the crop lies inside the resized
/// image, only the crop's pixels are resampled ([`resample_window`]); the same bytes as the two
/// steps one after the other.
pub fn resize_shorter_center_crop(img: &Image, size: usize, crop: usize) -> Image {
    let (w, h) = (img.width, img.height);
    let (ow, oh) = if w <= h {
        (size, (size as f64 * h as f64 / w as f64) as usize)
    } else {
        ((size as f64 * w as f64 / h as f64) as usize, size)
    };
    if (ow, oh) == (w, h) || crop > ow || crop > oh {
        return center_crop(&resize_shorter(img, size), crop, crop);
    }
    let top = round_half_even((oh - crop) as f64 / 2.0) as usize;
    let left = round_half_even((ow - crop) as f64 / 2.0) as usize;
    let bbox = (0.0, 0.0, w as f64, h as f64);
    resample_window(img, bbox, ow, oh, (left, top, crop, crop))
}

/// torchvision `CenterCrop((height, width))`: zero-pads when the crop is larger, then crops at
/// `top = round((h - th) / 2)`, `left = round((w - tw) / 2)`.
pub fn center_crop(img: &Image, height: usize, width: usize) -> Image {
    let (w, h) = (img.width as i64, img.height as i64);
    let (tw, th) = (width as i64, height as i64);
    // torchvision pads (left, top, right, bottom) = ((tw - w) // 2, (th - h) // 2, (tw - w + 1) // 2, (th - h + 1) // 2)
    let pad_l = if tw > w { (tw - w) / 2 } else { 0 };
    let pad_t = if th > h { (th - h) / 2 } else { 0 };
    let pw = w + if tw > w { tw - w } else { 0 };
    let ph = h + if th > h { th - h } else { 0 };
    let top = round_half_even((ph - th) as f64 / 2.0);
    let left = round_half_even((pw - tw) as f64 / 2.0);
    img.crop(left - pad_l, top - pad_t, width, height)
}

/// Python 3's `round()` (half to even), used by torchvision's crop parameters.
pub(crate) fn round_half_even(x: f64) -> i64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && (r as i64) % 2 != 0 {
        (r - x.signum()) as i64
    } else {
        r as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resize then center crop, done as one windowed resample, equals the two steps byte for
    /// byte: landscape, portrait and square images, up- and downscaling, 1, 3 and 4 channels,
    /// a crop as large as the shorter side, crops larger than the image (padding: the two-step
    /// fallback), an image already at the resize's size; and any window of a resample equals
    /// the crop of the whole.
    #[test]
    fn windowed_resample_equals_resample_then_crop() {
        let noise = |w: usize, h: usize, c: usize| {
            let data = (0..w * h * c)
                .map(|i| ((i * 2654435761usize) >> 7) as u8)
                .collect();
            Image::new(w, h, c, data).unwrap()
        };
        for (w, h, c) in [
            (500, 375, 3),
            (375, 500, 3),
            (97, 61, 1),
            (64, 64, 4),
            (30, 41, 3),
        ] {
            let img = noise(w, h, c);
            for (size, crop) in [
                (256, 224),
                (73, 64),
                (32, 32),
                (41, 30),
                (64, 80),
                (300, 256),
            ] {
                let two = center_crop(&resize_shorter(&img, size), crop, crop);
                let one = resize_shorter_center_crop(&img, size, crop);
                assert_eq!((one.width, one.height), (crop, crop));
                assert!(
                    one.data == two.data,
                    "{w}x{h}x{c} resize {size} crop {crop}"
                );
            }
            let windows = [
                (40, 50, (3, 7, 20, 30)),
                (w, h, (1, 2, 5, 6)),
                (w, 33, (0, 4, w, 9)),
                (40, h, (2, 1, 30, h - 3)),
            ];
            for (ow, oh, win) in windows {
                let bbox = (0.0, 0.0, w as f64, h as f64);
                let whole = resample(&img, bbox, ow, oh);
                let part = resample_window(&img, bbox, ow, oh, win);
                let (l, t, ww, wh) = win;
                assert!(
                    part.data == whole.crop(l as i64, t as i64, ww, wh).data,
                    "{w}x{h}x{c} to {ow}x{oh}, window {win:?}"
                );
            }
        }
    }

    /// The looked-up values are torchvision's expression, bit for bit, for every byte value in
    /// every channel, with 3 channels and with 1 (mean/std cycled over the channels).
    #[test]
    fn normalization_table_equals_the_formula() {
        let (mean, std) = ([0.485f32, 0.456, 0.406], [0.229f32, 0.224, 0.225]);
        for c in [3usize, 1] {
            // 256 pixels: every byte value in every channel (rotated per channel).
            let data: Vec<u8> = (0..256 * c)
                .map(|i| ((i / c + 85 * (i % c)) % 256) as u8)
                .collect();
            let img = Image::new(16, 16, c, data.clone()).unwrap();
            let mut out = vec![];
            img.to_chw_normalized(&mean, &std, &mut out);
            for ch in 0..c {
                for i in 0..256 {
                    let p = data[i * c + ch];
                    let want = (p as f32 / 255.0 - mean[ch]) / std[ch];
                    assert_eq!(
                        out[ch * 256 + i].to_bits(),
                        want.to_bits(),
                        "c{c} ch{ch} {p}"
                    );
                }
            }
        }
    }

    #[test]
    fn python_round_is_half_to_even() {
        assert_eq!(round_half_even(0.5), 0);
        assert_eq!(round_half_even(1.5), 2);
        assert_eq!(round_half_even(2.5), 2);
        assert_eq!(round_half_even(3.0), 3);
        assert_eq!(round_half_even(3.7), 4);
    }

    #[test]
    fn same_size_resize_is_identity_and_constant_stays_constant() {
        let img = Image::new(5, 4, 3, (0..60).map(|i| (i * 4) as u8).collect()).unwrap();
        assert_eq!(img.resize(5, 4), img);
        let flat = Image::new(9, 7, 1, vec![77; 63]).unwrap();
        let r = flat.resize(4, 3);
        assert!(r.data.iter().all(|&p| p == 77), "{:?}", r.data);
    }

    /// Pillow's ImagingResample pixel by pixel (each output value a dot product over its input
    /// window, horizontal pass over every row, then the vertical pass): the reference for the
    /// transposed, line-at-a-time passes of [`resample`].
    fn resample_reference(img: &Image, bbox: (f64, f64, f64, f64), w: usize, h: usize) -> Image {
        let c = img.channels;
        let (x0, y0, x1, y1) = bbox;
        let half = 1i32 << (PRECISION_BITS - 1);
        let mut cur = img.clone();
        if w != img.width || x0 != 0.0 || x1 != w as f64 {
            let hk = coefficients(img.width, x0, x1, w);
            let mut data = vec![0u8; cur.height * w * c];
            for y in 0..cur.height {
                for (x, (xmin, k)) in hk.iter().enumerate() {
                    for ch in 0..c {
                        let mut ss = half;
                        for (i, &wt) in k.iter().enumerate() {
                            ss += cur.data[(y * cur.width + xmin + i) * c + ch] as i32 * wt;
                        }
                        data[(y * w + x) * c + ch] = clip8(ss);
                    }
                }
            }
            cur = Image::new(w, cur.height, c, data).unwrap();
        }
        if h != img.height || y0 != 0.0 || y1 != h as f64 {
            let vk = coefficients(img.height, y0, y1, h);
            let mut data = vec![0u8; h * cur.width * c];
            for (y, (ymin, k)) in vk.iter().enumerate() {
                for x in 0..cur.width * c {
                    let mut ss = half;
                    for (i, &wt) in k.iter().enumerate() {
                        ss += cur.data[(ymin + i) * cur.width * c + x] as i32 * wt;
                    }
                    data[y * cur.width * c + x] = clip8(ss);
                }
            }
            cur = Image::new(cur.width, h, c, data).unwrap();
        }
        cur
    }

    /// Down- and upscaling, fractional boxes, one axis only, 1 to 5 channels.
    #[test]
    fn resample_equals_the_pixel_by_pixel_reference() {
        for c in 1..=5usize {
            let (w, h) = (37, 23);
            let data = (0..w * h * c)
                .map(|i| ((i * 7919 + i / 3) % 256) as u8)
                .collect();
            let img = Image::new(w, h, c, data).unwrap();
            for &(bbox, ow, oh) in &[
                ((0.0, 0.0, 37.0, 23.0), 11, 7),
                ((0.0, 0.0, 37.0, 23.0), 64, 50),
                ((3.0, 2.0, 30.0, 20.0), 9, 9),
                ((2.5, 1.25, 19.75, 22.0), 24, 24),
                ((0.0, 0.0, 37.0, 23.0), 37, 10),
                ((0.0, 0.0, 37.0, 23.0), 15, 23),
                ((4.0, 0.0, 12.0, 23.0), 8, 23),
                ((0.0, 0.0, 37.0, 23.0), 37, 23),
            ] {
                assert_eq!(
                    resample(&img, bbox, ow, oh),
                    resample_reference(&img, bbox, ow, oh),
                    "{c} channel(s), box {bbox:?} -> {ow}x{oh}"
                );
            }
        }
    }

    /// Crops inside (whole-row copies) and across the edges (zero padding) against a
    /// pixel-by-pixel reference.
    #[test]
    fn crop_equals_the_pixel_by_pixel_region() {
        for c in [1usize, 3] {
            let (w, h) = (7usize, 5usize);
            let img = Image::new(w, h, c, (0..w * h * c).map(|v| v as u8).collect()).unwrap();
            for (l, t, cw, ch) in [
                (0, 0, 7, 5),
                (1, 2, 3, 2),
                (6, 4, 1, 1),
                (-1, 0, 4, 3),
                (5, 3, 4, 4),
            ] {
                let got = img.crop(l, t, cw, ch);
                let mut want = vec![0u8; cw * ch * c];
                for y in 0..ch as i64 {
                    for x in 0..cw as i64 {
                        let (sx, sy) = (l + x, t + y);
                        if (0..w as i64).contains(&sx) && (0..h as i64).contains(&sy) {
                            for k in 0..c {
                                want[((y as usize) * cw + x as usize) * c + k] =
                                    img.data[(sy as usize * w + sx as usize) * c + k];
                            }
                        }
                    }
                }
                assert_eq!(
                    (got.width, got.height, &got.data),
                    (cw, ch, &want),
                    "c{c} {l},{t} {cw}x{ch}"
                );
            }
        }
    }

    #[test]
    fn crop_pads_with_zeros_outside() {
        let img = Image::new(2, 2, 1, vec![1, 2, 3, 4]).unwrap();
        assert_eq!(
            center_crop(&img, 4, 4).data,
            [0, 0, 0, 0, 0, 1, 2, 0, 0, 3, 4, 0, 0, 0, 0, 0]
        );
        assert_eq!(img.hflip().data, [2, 1, 4, 3]);
    }

    #[test]
    fn bad_bytes_name_the_source() {
        let err = Image::decode_rgb(b"nope", Path::new("x.jpg"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("x.jpg"), "{err}");
    }

    /// Through `Image::decode_rgb`, libjpeg's error for a truncated file names it.
    #[cfg(moco_libjpeg)]
    #[test]
    fn a_truncated_jpeg_is_an_error_naming_the_file() {
        let pixels: Vec<u8> = (0..64 * 48 * 3).map(|i| (i * 31 % 256) as u8).collect();
        let mut bytes = vec![];
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90)
            .encode(&pixels, 64, 48, image::ExtendedColorType::Rgb8)
            .unwrap();
        let err = Image::decode_rgb(&bytes[..bytes.len() / 2], Path::new("via_image.jpg"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("via_image.jpg"), "{err}");
    }
}
