//! MoCo's augmentations with torchvision's semantics on PIL images, down to Pillow's integer
//! arithmetic: RandomResizedCrop, ColorJitter (brightness, contrast, saturation, hue in a random
//! order), RandomGrayscale, the official MoCo GaussianBlur (PIL's box-blur approximation, radius
//! = sigma), horizontal flip, Solarize; ToTensor and Normalize; the presets `v1`, `v2`, `cifar`
//! and `v3`, and the two-crop transform.
//!
//! Randomness comes from the `StdRng` handed to [`Pipeline::apply`]; the loader seeds one per
//! sample from (seed, epoch, index), so results do not depend on the number of threads.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use crate::image::{resample, round_half_even, transpose, Image};

/// `PIL.Image.convert("L")` luma of one RGB pixel (ITU-R 601-2 in 16-bit fixed point).
#[inline]
pub fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
}

/// `convert("L")`: a one-channel image (a copy when already grayscale).
pub fn to_luma(img: &Image) -> Image {
    if img.channels == 1 {
        return img.clone();
    }
    let data = img
        .data
        .chunks_exact(3)
        .map(|p| luma(p[0], p[1], p[2]))
        .collect();
    Image {
        data,
        channels: 1,
        ..*img
    }
}

/// torchvision `to_grayscale(img, num_output_channels=channels)`.
pub fn grayscale(img: &Image) -> Image {
    let l = to_luma(img);
    if img.channels == 1 {
        return l;
    }
    let mut data = vec![0u8; l.data.len() * 3];
    for (o, &v) in data.chunks_exact_mut(3).zip(&l.data) {
        o.fill(v);
    }
    Image {
        data,
        channels: 3,
        ..*img
    }
}

/// `Image.blend(degenerate, img, alpha)` (Pillow Blend.c): float32 arithmetic, truncation to
/// uint8, clipping only when extrapolating (alpha outside [0, 1]). `degenerate` yields the
/// other image's bytes (a constant, or a grey image's), so that none is materialised.
fn blend(degenerate: impl Iterator<Item = u8>, img: &Image, alpha: f64) -> Image {
    let a = alpha as f32;
    if a == 0.0 {
        return img.with_data(degenerate.take(img.data.len()).collect());
    }
    if a == 1.0 {
        return img.clone();
    }
    let mix = |d: u8, p: u8| d as i32 as f32 + a * (p as i32 - d as i32) as f32;
    let mut data = vec![0u8; img.data.len()];
    // `as u8` truncates and saturates (0 below 0, 255 above 255): the C code's truncation when
    // interpolating and its clip when extrapolating.
    for (o, (d, &p)) in data.iter_mut().zip(degenerate.zip(&img.data)) {
        *o = mix(d, p) as u8;
    }
    img.with_data(data)
}

/// [`blend`] against a constant image of value `d`: each output byte depends on the input byte
/// alone, so the 256 results are computed with blend's expression and looked up.
fn blend_constant(d: u8, img: &Image, alpha: f64) -> Image {
    let a = alpha as f32;
    if a == 0.0 || a == 1.0 {
        return blend(std::iter::repeat(d), img, alpha);
    }
    let table: [u8; 256] =
        std::array::from_fn(|p| (d as i32 as f32 + a * (p as i32 - d as i32) as f32) as u8);
    img.with_data(img.data.iter().map(|&p| table[p as usize]).collect())
}

/// `ImageEnhance.Brightness(img).enhance(f)`: blend with black.
pub fn adjust_brightness(img: &Image, f: f64) -> Image {
    blend_constant(0, img, f)
}

/// `ImageEnhance.Contrast(img).enhance(f)`: blend with a flat image at the rounded mean luma.
pub fn adjust_contrast(img: &Image, f: f64) -> Image {
    // The mean of `convert("L")`, without building the grey image.
    let sum: u64 = if img.channels == 1 {
        img.data.iter().map(|&v| v as u64).sum()
    } else {
        img.data
            .chunks_exact(3)
            .map(|p| luma(p[0], p[1], p[2]) as u64)
            .sum()
    };
    let mean = (sum as f64 / (img.width * img.height) as f64 + 0.5) as u8;
    blend_constant(mean, img, f)
}

/// `ImageEnhance.Color(img).enhance(f)`: blend with the grayscale image (no-op on grayscale).
#[multiversion::multiversion(targets("x86_64+avx2", "x86_64+sse4.1"))]
pub fn adjust_saturation(img: &Image, f: f64) -> Image {
    if img.channels == 1 {
        return img.clone();
    }
    let a = f as f32;
    if a == 0.0 || a == 1.0 {
        return blend(grayscale(img).data.into_iter(), img, f);
    }
    // blend's expression against each pixel's luma, without building the grey image.
    let mix = |d: u8, p: u8| (d as i32 as f32 + a * (p as i32 - d as i32) as f32) as u8;
    let mut data = vec![0u8; img.data.len()];
    for (o, p) in data.chunks_exact_mut(3).zip(img.data.chunks_exact(3)) {
        let l = luma(p[0], p[1], p[2]);
        o[0] = mix(l, p[0]);
        o[1] = mix(l, p[1]);
        o[2] = mix(l, p[2]);
    }
    img.with_data(data)
}

// Pillow Convert.c rgb2hsv_row, with its mix of float and double arithmetic: the reference that
// [`HueTables`] is filled from (and tested against on every RGB value).
fn pillow_rgb_to_hsv(r: u8, g: u8, b: u8) -> (u8, u8, u8) {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    if minc == maxc {
        return (0, 0, maxc);
    }
    let div = |a: u8, d: u8| a as f32 / d as f32;
    let cr = maxc - minc;
    let s = div(cr, maxc);
    let rc = div(maxc - r, cr);
    let gc = div(maxc - g, cr);
    let bc = div(maxc - b, cr);
    let h: f32 = if r == maxc {
        bc - gc
    } else if g == maxc {
        (2.0 + rc as f64 - bc as f64) as f32
    } else {
        (4.0 + gc as f64 - rc as f64) as f32
    };
    // fmod(x, 1.0) for 0 <= x < 2 is x - trunc(x), exactly.
    let x = h as f64 / 6.0 + 1.0;
    let h = (x - x.trunc()) as f32;
    let clip = |v: i32| v.clamp(0, 255) as u8;
    (
        clip((h as f64 * 255.0) as i32),
        clip((s as f64 * 255.0) as i32),
        maxc,
    )
}

/// C's round() (half away from zero) of a value in [0, 256), exactly: x - trunc(x) is exact.
#[inline(always)]
fn round_c(x: f64) -> i32 {
    let t = x as i32;
    t + (x - t as f64 >= 0.5) as i32
}

// Pillow Convert.c hsv2rgb: the reference for [`HueTables`]' H- and S-only parts and for
// [`HueTables::hsv_to_rgb`] (tested on every HSV value).
fn pillow_hsv_to_rgb(h: u8, s: u8, v: u8) -> (u8, u8, u8) {
    if s == 0 {
        return (v, v, v);
    }
    let hd = h as f32 as f64 * 6.0 / 255.0;
    let i = hd.floor() as i32;
    let f = (hd - i as f32 as f64) as f32;
    let fs = (s as f32 as f64 / 255.0) as f32;
    let vf = v as f32 as f64;
    let clip = |x: i32| x.clamp(0, 255) as u8;
    let p = clip(round_c(vf * (1.0 - fs as f64)));
    let q = clip(round_c(vf * (1.0 - (fs * f) as f64)));
    let t = clip(round_c(vf * (1.0 - fs as f64 * (1.0 - f as f64))));
    match i % 6 {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

/// Pillow's RGB <-> HSV with everything that depends on at most two bytes looked up, no
/// division and no data-dependent branch per pixel; each table is filled from the reference
/// functions above, so the results are theirs (the tests compare every RGB and HSV value).
///
/// rgb2hsv: with `cr = max - min` and `num = max - median`, each of its six branches (which
/// channel is the maximum, which the minimum) gives an H that depends on `(cr, num)` alone (the
/// other two quotients are 0 and 1), and S depends on `(cr, max)`. hsv2rgb: one output is V,
/// one is `p` (a function of S and V), the third `q` or `t` by the sector of H, computed in
/// Pillow's float and double arithmetic from looked-up factors.
struct HueTables {
    /// H at `case << 16 | cr << 8 | num`, `case` in 0..6 ([`HueTables::rgb_to_hsv`]).
    hue: Vec<u8>,
    /// S at `cr << 8 | max`.
    sat: Vec<u8>,
    /// `p = round(v * (1 - s / 255))` at `s << 8 | v`.
    low: Vec<u8>,
    /// `(float)s / 255`, as the double it is used as.
    fs: [f64; 256],
    /// Per H: the factor of `fs` in `q` (`f`, odd sectors) or `t` (`1 - f`, even sectors).
    weight: [f64; 256],
    /// Per H: the sector `i % 6`.
    sector: [u8; 256],
}

/// Per sector, where V, p and the third value (`q` or `t`) go in the RGB output.
const HSV_ORDER: [[usize; 3]; 6] = [
    [0, 2, 1],
    [2, 0, 1],
    [1, 0, 2],
    [1, 2, 0],
    [2, 1, 0],
    [0, 1, 2],
];

impl HueTables {
    fn get() -> &'static HueTables {
        static TABLES: std::sync::OnceLock<HueTables> = std::sync::OnceLock::new();
        TABLES.get_or_init(|| {
            let mut t = HueTables {
                hue: vec![0; 6 << 16],
                sat: vec![0; 1 << 16],
                low: vec![0; 1 << 16],
                fs: [0.0; 256],
                weight: [0.0; 256],
                sector: [0; 256],
            };
            for case in 0..6usize {
                for cr in 1..=255u8 {
                    for num in 0..=cr {
                        let other = cr - num;
                        // A pixel of this case with max = cr, min = 0 and median = cr - num.
                        let (r, g, b) = match case {
                            0 => (cr, other, 0),
                            1 => (cr, 0, other),
                            2 => (other, cr, 0),
                            3 => (0, cr, other),
                            4 => (0, other, cr),
                            _ => (other, 0, cr),
                        };
                        t.hue[case << 16 | (cr as usize) << 8 | num as usize] =
                            pillow_rgb_to_hsv(r, g, b).0;
                    }
                }
            }
            for cr in 0..=255u8 {
                for max in cr..=255u8 {
                    t.sat[(cr as usize) << 8 | max as usize] =
                        pillow_rgb_to_hsv(max, max - cr, max).1;
                }
            }
            for x in 0..256usize {
                let fs = (x as f32 as f64 / 255.0) as f32;
                t.fs[x] = fs as f64;
                let hd = x as f32 as f64 * 6.0 / 255.0;
                let i = hd as i32; // floor of a non-negative value
                let f = (hd - i as f32 as f64) as f32;
                t.sector[x] = (i % 6) as u8;
                t.weight[x] = if i % 2 == 1 { f as f64 } else { 1.0 - f as f64 };
                for v in 0..256usize {
                    t.low[x << 8 | v] = pillow_hsv_to_rgb(0, x as u8, v as u8).2;
                }
            }
            t
        })
    }

    #[inline(always)]
    fn rgb_to_hsv(&self, r: u8, g: u8, b: u8) -> (u8, u8, u8) {
        let max = r.max(g).max(b);
        let min = r.min(g).min(b);
        let cr = (max - min) as usize;
        let median = r as usize + g as usize + b as usize - max as usize - min as usize;
        let num = max as usize - median;
        // Pillow's branches: R is the maximum, else G, else B; then which other one is the
        // minimum (B for the first two, R for the third).
        let r_max = r == max;
        let g_max = !r_max & (g == max);
        let case = if r_max {
            (b != min) as usize
        } else if g_max {
            2 + (b != min) as usize
        } else {
            4 + (r != min) as usize
        };
        (
            self.hue[case << 16 | cr << 8 | num],
            self.sat[cr << 8 | max as usize],
            max,
        )
    }

    #[inline(always)]
    fn hsv_to_rgb(&self, h: u8, s: u8, v: u8) -> [u8; 3] {
        let (h, s) = (h as usize, s as usize);
        let sector = self.sector[h] as usize;
        let m = self.fs[s] * self.weight[h];
        // q multiplies in float (`fs * f`), t in double: the product of two floats is exact
        // in double, so rounding it to float gives the float product.
        let m = if sector & 1 == 1 { m as f32 as f64 } else { m };
        let third = round_c(v as f64 * (1.0 - m)).clamp(0, 255) as u8;
        let values = [v, self.low[s << 8 | v as usize], third];
        let order = &HSV_ORDER[sector];
        [values[order[0]], values[order[1]], values[order[2]]]
    }
}

/// torchvision `adjust_hue` on a PIL image: to HSV, shift H by `int32(f * 255)` wrapping modulo
/// 256, back to RGB. No-op on grayscale images.
pub fn adjust_hue(img: &Image, f: f64) -> Image {
    if img.channels == 1 {
        return img.clone();
    }
    let shift = (f * 255.0) as i32 as u8;
    let t = HueTables::get();
    let mut data = vec![0u8; img.data.len()];
    for (p, d) in img.data.chunks_exact(3).zip(data.chunks_exact_mut(3)) {
        let (h, s, v) = t.rgb_to_hsv(p[0], p[1], p[2]);
        d.copy_from_slice(&t.hsv_to_rgb(h.wrapping_add(shift), s, v));
    }
    img.with_data(data)
}

/// `ImageOps.solarize(img, threshold)`: values >= threshold are inverted.
pub fn solarize(img: &Image, threshold: u8) -> Image {
    let data = img
        .data
        .iter()
        .map(|&v| if v >= threshold { 255 - v } else { v })
        .collect();
    img.with_data(data)
}

// Pillow BoxBlur.c `_gaussian_blur_radius` (float arithmetic, sqrt and floor in double).
fn box_radius(sigma: f32, passes: i32) -> f32 {
    let sigma2 = sigma * sigma / passes as f32;
    let big_l = ((12.0 * sigma2 as f64 + 1.0).sqrt()) as f32;
    let l = ((big_l as f64 - 1.0) / 2.0).floor() as f32;
    let mut a = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2);
    a /= 6.0 * (sigma2 - (l + 1.0) * (l + 1.0));
    l + a
}

// The positions of Pillow BoxBlur.c ImagingLineBoxBlur8/32 on a line of `n` values, in its
// order and three regions: `step(state, x, sub, add, left, right)` computes output `x`, where
// value `add` enters the window, `sub` leaves it and `left`/`right` are its fractional ends.
#[inline(always)]
fn box_blur_positions<S>(
    state: &mut S,
    n: usize,
    radius: usize,
    step: impl Fn(&mut S, usize, usize, usize, usize, usize),
) {
    let last = n - 1;
    let edge_a = (radius + 1).min(n);
    let edge_b = n.saturating_sub(radius + 1);
    if edge_a <= edge_b {
        for x in 0..edge_a {
            step(state, x, 0, x + radius, 0, x + radius + 1);
        }
        for x in edge_a..edge_b {
            step(
                state,
                x,
                x - radius - 1,
                x + radius,
                x - radius - 1,
                x + radius + 1,
            );
        }
        for x in edge_b..=last {
            step(state, x, x - radius - 1, last, x - radius - 1, last);
        }
    } else {
        for x in 0..edge_b {
            step(state, x, 0, x + radius, 0, x + radius + 1);
        }
        for x in edge_b..edge_a {
            step(state, x, 0, last, 0, last);
        }
        for x in edge_a..=last {
            step(state, x, x - radius - 1, last, x - radius - 1, last);
        }
    }
}

/// The window sum Pillow starts a line with: `first * (radius + 1) + values[0 .. edge - 1] +
/// last * (radius - edge + 1)`, edge = min(radius + 1, n), per lane (u32, wrapping).
#[inline(always)]
fn box_blur_start(acc: &mut [u32], n: usize, radius: usize, value: impl Fn(usize, usize) -> u8) {
    let edge_a = (radius + 1).min(n);
    for (l, a) in acc.iter_mut().enumerate() {
        let mut v = (value(0, l) as u32).wrapping_mul(radius as u32 + 1);
        for x in 0..edge_a.saturating_sub(1) {
            v = v.wrapping_add(value(x, l) as u32);
        }
        *a = v.wrapping_add((value(n - 1, l) as u32).wrapping_mul((radius - edge_a + 1) as u32));
    }
}

/// One output value from the window sum `a` (Pillow's 24-bit fixed point, u32 wrapping as the
/// C code's UINT32 arithmetic).
#[inline(always)]
fn box_blur_value(a: &mut u32, add: u8, sub: u8, left: u8, right: u8, ww: u32, fw: u32) -> u8 {
    *a = a.wrapping_add(add as u32).wrapping_sub(sub as u32);
    let bulk = a
        .wrapping_mul(ww)
        .wrapping_add((left as u32 + right as u32).wrapping_mul(fw));
    (bulk.wrapping_add(1 << 23) >> 24) as u8
}

// Pillow's horizontal box blur of one line of one channel, written as the C code runs it: the
// reference that the lanes kernel below is tested against.
#[cfg(test)]
fn box_blur_line(line: &[u8], out: &mut [u8], radius: usize, ww: u32, fw: u32) {
    let n = line.len();
    let mut state = ([0u32; 1], out);
    box_blur_start(&mut state.0, n, radius, |i, _| line[i]);
    let step = |(acc, out): &mut ([u32; 1], &mut [u8]), x: usize, sub, add, left, right| {
        out[x] = box_blur_value(
            &mut acc[0],
            line[add],
            line[sub],
            line[left],
            line[right],
            ww,
            fw,
        );
    };
    box_blur_positions(&mut state, n, radius, step);
}

// The same down a column of rows: every byte of a row is a lane, all blurred at once, with
// the arithmetic per value of the line blur (and vectorised across the lanes).
#[inline(always)]
fn box_blur_rows_as_lanes(
    data: &[u8],
    out: &mut [u8],
    row_len: usize,
    (radius, ww, fw): (usize, u32, u32),
    acc: &mut [u32],
) {
    let n = data.len() / row_len;
    let row = |i: usize| &data[i * row_len..(i + 1) * row_len];
    box_blur_start(acc, n, radius, |i, l| data[i * row_len + l]);
    let step = |(acc, out): &mut (&mut [u32], &mut [u8]), x: usize, sub, add, left, right| {
        let o = &mut out[x * row_len..(x + 1) * row_len];
        let ins = (row(sub).iter().zip(row(add))).zip(row(left).iter().zip(row(right)));
        for ((o, a), ((&s, &ad), (&l, &r))) in o.iter_mut().zip(acc.iter_mut()).zip(ins) {
            *o = box_blur_value(a, ad, s, l, r, ww, fw);
        }
    };
    box_blur_positions(&mut (acc, out), n, radius, step);
}

/// Pillow's box weights for radius `r`: (integer radius, weight of a whole pixel, weight of
/// each fractional end), 24-bit fixed point.
fn box_weights(r: f32) -> (usize, u32, u32) {
    let radius = r as usize;
    let ww = (16_777_216.0f32 / (r * 2.0 + 1.0)) as u32;
    let fw = (16_777_216u32.wrapping_sub((radius as u32 * 2 + 1).wrapping_mul(ww))) / 2;
    (radius, ww, fw)
}

// `passes` vertical box-blur passes over an image whose rows are `row_len` bytes: all columns
// of a row at once. Compiled for AVX2 and SSE4.1 as well (chosen at run time), where the u32
// multiplications vectorise.
#[multiversion::multiversion(targets("x86_64+avx2", "x86_64+sse4.1"))]
fn box_blur_columns(data: &mut Vec<u8>, row_len: usize, r: f32, passes: usize) {
    let (radius, ww, fw) = box_weights(r);
    let mut tmp = vec![0u8; data.len()];
    let mut acc = vec![0u32; row_len];
    for _ in 0..passes {
        box_blur_rows_as_lanes(data, &mut tmp, row_len, (radius, ww, fw), &mut acc);
        std::mem::swap(data, &mut tmp);
    }
}

/// `img.filter(ImageFilter.GaussianBlur(radius=sigma))`: Pillow's three passes of an extended
/// box blur per axis (BoxBlur.c), bit for bit.
pub fn gaussian_blur(img: &Image, sigma: f64) -> Image {
    let sigma = sigma as f32;
    if sigma == 0.0 {
        return img.clone();
    }
    box_blur(img, box_radius(sigma, 3))
}

/// Pillow's `ImagingBoxBlur(img, r, 3)`: three passes of the extended box blur of radius `r`
/// over the rows, then three over the columns.
fn box_blur(img: &Image, r: f32) -> Image {
    if r == 0.0 {
        return img.clone();
    }
    // Pillow blurs the rows, then transposes, blurs the rows and transposes back; here the rows
    // are blurred as the columns of the transpose, and both axes take the lanes kernel.
    let (w, h, c) = (img.width, img.height, img.channels);
    let mut t = transpose(&img.data, w, c, (0, 0, w, h));
    box_blur_columns(&mut t, h * c, r, 3);
    let mut data = transpose(&t, h, c, (0, 0, h, w));
    box_blur_columns(&mut data, w * c, r, 3);
    img.with_data(data)
}

/// torchvision `RandomResizedCrop.get_params`: (top, left, height, width).
pub fn resized_crop_params(
    width: usize,
    height: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut StdRng,
) -> (usize, usize, usize, usize) {
    let area = (width * height) as f64;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale.0..=scale.1);
        let aspect = rng.random_range(lr0..=lr1).exp();
        let w = round_half_even((target * aspect).sqrt());
        let h = round_half_even((target / aspect).sqrt());
        if 0 < w && w as usize <= width && 0 < h && h as usize <= height {
            let (w, h) = (w as usize, h as usize);
            let i = rng.random_range(0..=height - h);
            let j = rng.random_range(0..=width - w);
            return (i, j, h, w);
        }
    }
    // Fallback: central crop at the nearest allowed ratio.
    let in_ratio = width as f64 / height as f64;
    let (lo, hi) = (ratio.0.min(ratio.1), ratio.0.max(ratio.1));
    let (w, h) = if in_ratio < lo {
        (width, round_half_even(width as f64 / lo) as usize)
    } else if in_ratio > hi {
        (round_half_even(height as f64 * hi) as usize, height)
    } else {
        (width, height)
    };
    ((height - h) / 2, (width - w) / 2, h, w)
}

/// torchvision `resized_crop` on PIL: crop (top, left, height, width), then resize to size x size.
pub fn resized_crop(
    img: &Image,
    top: usize,
    left: usize,
    height: usize,
    width: usize,
    size: usize,
) -> Image {
    let crop = img.crop(left as i64, top as i64, width, height);
    resample(&crop, (0.0, 0.0, width as f64, height as f64), size, size)
}

/// One augmentation step.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// `RandomResizedCrop(size, scale, ratio)`, bilinear with antialiasing.
    RandomResizedCrop {
        /// Output side.
        size: usize,
        /// Range of the crop's area, as a fraction of the image's.
        scale: (f64, f64),
        /// Range of the crop's aspect ratio.
        ratio: (f64, f64),
    },
    /// `ColorJitter(brightness, contrast, saturation, hue)` in a random order.
    ColorJitter {
        /// Brightness factor drawn from [1 - b, 1 + b].
        brightness: f64,
        /// Contrast factor drawn from [1 - c, 1 + c].
        contrast: f64,
        /// Saturation factor drawn from [1 - s, 1 + s].
        saturation: f64,
        /// Hue shift drawn from [-h, h].
        hue: f64,
    },
    /// `RandomGrayscale(p)`.
    RandomGrayscale {
        /// Probability.
        p: f64,
    },
    /// The official MoCo `GaussianBlur`: sigma ~ U[lo, hi], PIL radius = sigma.
    GaussianBlur {
        /// (lo, hi).
        sigma: (f64, f64),
    },
    /// `RandomHorizontalFlip(p)`.
    HorizontalFlip {
        /// Probability.
        p: f64,
    },
    /// MoCo v3's `Solarize`: `ImageOps.solarize` at 128.
    Solarize,
    /// `RandomApply(ops, p)`.
    RandomApply {
        /// Probability.
        p: f64,
        /// The steps applied together.
        ops: Vec<Op>,
    },
    /// `Resize(size)`: shorter side to `size` (deterministic, for evaluation).
    Resize {
        /// The shorter side's new length.
        size: usize,
    },
    /// `CenterCrop(size)` (deterministic, for evaluation).
    CenterCrop {
        /// Output side.
        size: usize,
    },
}

impl Op {
    /// Applies the step, drawing its random parameters from `rng`.
    pub fn apply(&self, img: Image, rng: &mut StdRng) -> Image {
        match self {
            Op::RandomResizedCrop { size, scale, ratio } => {
                let (i, j, h, w) = resized_crop_params(img.width, img.height, *scale, *ratio, rng);
                resized_crop(&img, i, j, h, w, *size)
            }
            Op::ColorJitter {
                brightness,
                contrast,
                saturation,
                hue,
            } => {
                let mut order = [0usize, 1, 2, 3];
                order.shuffle(rng);
                let factor = |rng: &mut StdRng, v: f64| {
                    if v > 0.0 {
                        Some(rng.random_range((1.0 - v).max(0.0)..=1.0 + v))
                    } else {
                        None
                    }
                };
                let b = factor(rng, *brightness);
                let c = factor(rng, *contrast);
                let s = factor(rng, *saturation);
                let h = if *hue > 0.0 {
                    Some(rng.random_range(-hue..=*hue))
                } else {
                    None
                };
                let mut img = img;
                for k in order {
                    img = match (k, b, c, s, h) {
                        (0, Some(f), ..) => adjust_brightness(&img, f),
                        (1, _, Some(f), ..) => adjust_contrast(&img, f),
                        (2, _, _, Some(f), _) => adjust_saturation(&img, f),
                        (3, _, _, _, Some(f)) => adjust_hue(&img, f),
                        _ => img,
                    };
                }
                img
            }
            Op::RandomGrayscale { p } => {
                if rng.random::<f64>() < *p {
                    grayscale(&img)
                } else {
                    img
                }
            }
            Op::GaussianBlur { sigma } => {
                let s = rng.random_range(sigma.0..=sigma.1);
                gaussian_blur(&img, s)
            }
            Op::HorizontalFlip { p } => {
                if rng.random::<f64>() < *p {
                    img.hflip()
                } else {
                    img
                }
            }
            Op::Solarize => solarize(&img, 128),
            Op::RandomApply { p, ops } => {
                if rng.random::<f64>() < *p {
                    ops.iter().fold(img, |im, op| op.apply(im, rng))
                } else {
                    img
                }
            }
            Op::Resize { size } => crate::image::resize_shorter(&img, *size),
            Op::CenterCrop { size } => crate::image::center_crop(&img, *size, *size),
        }
    }
}

/// Per-channel statistics used by `Normalize`.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalize {
    /// Means.
    pub mean: Vec<f32>,
    /// Standard deviations.
    pub std: Vec<f32>,
}

impl Normalize {
    /// ImageNet's statistics (the official MoCo scripts).
    pub fn imagenet() -> Self {
        Self {
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
        }
    }
    /// The official CIFAR demo's statistics.
    pub fn cifar() -> Self {
        Self {
            mean: vec![0.4914, 0.4822, 0.4465],
            std: vec![0.2023, 0.1994, 0.2010],
        }
    }
    /// Fashion-MNIST's training-set statistics (grayscale).
    pub fn fashion_mnist() -> Self {
        Self {
            mean: vec![0.2860],
            std: vec![0.3530],
        }
    }
    /// MNIST's training-set statistics (grayscale).
    pub fn mnist() -> Self {
        Self {
            mean: vec![0.1307],
            std: vec![0.3081],
        }
    }
}

/// A sequence of steps followed by `ToTensor` and `Normalize`.
#[derive(Debug, Clone, PartialEq)]
pub struct Pipeline {
    /// The steps, in order.
    pub ops: Vec<Op>,
    /// The final normalisation.
    pub normalize: Normalize,
    /// Output side length (every preset ends at size x size).
    pub size: usize,
}

impl Pipeline {
    /// Runs the steps on `img` and appends the normalised CHW floats to `out`.
    pub fn apply(&self, img: Image, rng: &mut StdRng, out: &mut Vec<f32>) {
        let img = self.ops.iter().fold(img, |im, op| op.apply(im, rng));
        img.to_chw_normalized(&self.normalize.mean, &self.normalize.std, out);
    }

    /// Runs the steps on a borrowed image (the first step reads it without a copy when it is a
    /// crop or resize) and writes the normalised CHW floats into `out`
    /// (`channels * size * size` values).
    pub fn apply_into(&self, img: &Image, rng: &mut StdRng, out: &mut [f32]) {
        let (first, rest) = match self.ops.as_slice() {
            [Op::RandomResizedCrop { size, scale, ratio }, rest @ ..] => {
                let (i, j, h, w) = resized_crop_params(img.width, img.height, *scale, *ratio, rng);
                (resized_crop(img, i, j, h, w, *size), rest)
            }
            // The evaluation transform: only the center crop's pixels are resampled.
            [Op::Resize { size }, Op::CenterCrop { size: crop }, rest @ ..] => (
                crate::image::resize_shorter_center_crop(img, *size, *crop),
                rest,
            ),
            [Op::Resize { size }, rest @ ..] => (crate::image::resize_shorter(img, *size), rest),
            [op, rest @ ..] => (op.apply(img.clone(), rng), rest),
            [] => (img.clone(), &[][..]),
        };
        let img = rest.iter().fold(first, |im, op| op.apply(im, rng));
        img.write_chw_normalized(&self.normalize.mean, &self.normalize.std, out);
    }
}

fn jitter(b: f64, c: f64, s: f64, h: f64) -> Op {
    Op::ColorJitter {
        brightness: b,
        contrast: c,
        saturation: s,
        hue: h,
    }
}

const RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);

/// MoCo v1 (`main_moco.py` without `--aug-plus`): RandomResizedCrop(scale 0.2-1), grayscale 0.2,
/// jitter 0.4 (hue 0.4), flip.
pub fn v1(size: usize, normalize: Normalize) -> Pipeline {
    let ops = vec![
        Op::RandomResizedCrop {
            size,
            scale: (0.2, 1.0),
            ratio: RATIO,
        },
        Op::RandomGrayscale { p: 0.2 },
        jitter(0.4, 0.4, 0.4, 0.4),
        Op::HorizontalFlip { p: 0.5 },
    ];
    Pipeline {
        ops,
        normalize,
        size,
    }
}

/// MoCo v2 (`--aug-plus`): RandomResizedCrop(scale 0.2-1), jitter (0.4, 0.4, 0.4, 0.1) with p 0.8,
/// grayscale 0.2, blur sigma 0.1-2 with p 0.5, flip.
pub fn v2(size: usize, normalize: Normalize) -> Pipeline {
    let ops = vec![
        Op::RandomResizedCrop {
            size,
            scale: (0.2, 1.0),
            ratio: RATIO,
        },
        Op::RandomApply {
            p: 0.8,
            ops: vec![jitter(0.4, 0.4, 0.4, 0.1)],
        },
        Op::RandomGrayscale { p: 0.2 },
        Op::RandomApply {
            p: 0.5,
            ops: vec![Op::GaussianBlur { sigma: (0.1, 2.0) }],
        },
        Op::HorizontalFlip { p: 0.5 },
    ];
    Pipeline {
        ops,
        normalize,
        size,
    }
}

/// The official CIFAR demo: RandomResizedCrop (scale 0.08-1), flip, jitter (0.4, 0.4, 0.4, 0.1)
/// with p 0.8, grayscale 0.2.
pub fn cifar(size: usize, normalize: Normalize) -> Pipeline {
    let ops = vec![
        Op::RandomResizedCrop {
            size,
            scale: (0.08, 1.0),
            ratio: RATIO,
        },
        Op::HorizontalFlip { p: 0.5 },
        Op::RandomApply {
            p: 0.8,
            ops: vec![jitter(0.4, 0.4, 0.4, 0.1)],
        },
        Op::RandomGrayscale { p: 0.2 },
    ];
    Pipeline {
        ops,
        normalize,
        size,
    }
}

/// MoCo v3's two asymmetric pipelines: crop (scale 0.08-1), jitter (0.4, 0.4, 0.2, 0.1) with
/// p 0.8, grayscale 0.2, then blur always (first) or with p 0.1 and solarize with p 0.2 (second),
/// flip.
pub fn v3(size: usize, normalize: Normalize) -> (Pipeline, Pipeline) {
    let head = || {
        vec![
            Op::RandomResizedCrop {
                size,
                scale: (0.08, 1.0),
                ratio: RATIO,
            },
            Op::RandomApply {
                p: 0.8,
                ops: vec![jitter(0.4, 0.4, 0.2, 0.1)],
            },
            Op::RandomGrayscale { p: 0.2 },
        ]
    };
    let mut a = head();
    a.push(Op::RandomApply {
        p: 1.0,
        ops: vec![Op::GaussianBlur { sigma: (0.1, 2.0) }],
    });
    a.push(Op::HorizontalFlip { p: 0.5 });
    let mut b = head();
    b.push(Op::RandomApply {
        p: 0.1,
        ops: vec![Op::GaussianBlur { sigma: (0.1, 2.0) }],
    });
    b.push(Op::RandomApply {
        p: 0.2,
        ops: vec![Op::Solarize],
    });
    b.push(Op::HorizontalFlip { p: 0.5 });
    (
        Pipeline {
            ops: a,
            normalize: normalize.clone(),
            size,
        },
        Pipeline {
            ops: b,
            normalize,
            size,
        },
    )
}

/// The evaluation pipeline: `Resize(size * 256 / 224)`, `CenterCrop(size)` (as `moco extract`
/// and `main_lincls.py`), or nothing but normalisation at the dataset's native size.
pub fn eval(size: Option<usize>, native: usize, normalize: Normalize) -> Pipeline {
    match size {
        Some(s) => Pipeline {
            ops: vec![
                Op::Resize {
                    size: s * 256 / 224,
                },
                Op::CenterCrop { size: s },
            ],
            normalize,
            size: s,
        },
        None => Pipeline {
            ops: vec![],
            normalize,
            size: native,
        },
    }
}

/// The linear protocol's training augmentation: `RandomResizedCrop(size)` (scale 0.08-1),
/// `RandomHorizontalFlip`.
pub fn linear_train(size: usize, normalize: Normalize) -> Pipeline {
    let ops = vec![
        Op::RandomResizedCrop {
            size,
            scale: (0.08, 1.0),
            ratio: RATIO,
        },
        Op::HorizontalFlip { p: 0.5 },
    ];
    Pipeline {
        ops,
        normalize,
        size,
    }
}

/// The query/key pair of MoCo: two pipelines (the same one twice except for v3).
#[derive(Debug, Clone, PartialEq)]
pub struct TwoCrop {
    /// The query's augmentation.
    pub query: Pipeline,
    /// The key's augmentation.
    pub key: Pipeline,
}

impl TwoCrop {
    /// A preset by name (`v1`, `v2`, `cifar`, `v3`) at `size` with `normalize`.
    pub fn preset(name: &str, size: usize, normalize: Normalize) -> crate::Result<Self> {
        let same = |p: Pipeline| TwoCrop {
            query: p.clone(),
            key: p,
        };
        Ok(match name {
            "v1" => same(v1(size, normalize)),
            "v2" => same(v2(size, normalize)),
            "cifar" => same(cifar(size, normalize)),
            "v3" => {
                let (query, key) = v3(size, normalize);
                TwoCrop { query, key }
            }
            other => {
                return Err(crate::Error::config(
                    "augmentation",
                    format!("unknown preset `{other}` (expected v1, v2, cifar or v3)"),
                ))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// Saturation without the grey image equals the blend with it (photo-like random pixels).
    #[test]
    fn saturation_equals_the_blend_with_the_grey_image() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let data: Vec<u8> = (0..3 * 4096).map(|_| rng.random()).collect();
        let img = Image::new(64, 64, 3, data).unwrap();
        for alpha in [0.0, 0.2, 0.6, 1.0, 1.4, 1.99] {
            assert_eq!(
                adjust_saturation(&img, alpha).data,
                blend(grayscale(&img).data.into_iter(), &img, alpha).data,
                "alpha {alpha}"
            );
        }
    }

    /// The table of [`blend_constant`] equals [`blend`] on every byte value, interpolating and
    /// extrapolating, for several constants.
    #[test]
    fn blend_against_a_constant_equals_the_general_blend() {
        let img = Image::new(16, 16, 1, (0..=255).collect()).unwrap();
        for d in [0u8, 1, 77, 128, 254, 255] {
            for alpha in [0.0, 0.1, 0.5, 0.6001, 0.999, 1.0, 1.3, 1.9999] {
                assert_eq!(
                    blend_constant(d, &img, alpha).data,
                    blend(std::iter::repeat(d), &img, alpha).data,
                    "d {d} alpha {alpha}"
                );
            }
        }
    }

    fn img() -> Image {
        let data = (0..32 * 24 * 3).map(|i| ((i * 37) % 251) as u8).collect();
        Image::new(32, 24, 3, data).unwrap()
    }

    fn rate(op: &Op, n: usize, changed: impl Fn(&Image, &Image) -> bool) -> f64 {
        let mut rng = StdRng::seed_from_u64(5);
        let base = img();
        (0..n)
            .filter(|_| changed(&base, &op.apply(base.clone(), &mut rng)))
            .count() as f64
            / n as f64
    }

    fn close(p: f64, want: f64, n: usize) -> bool {
        (p - want).abs() < 4.0 * (want * (1.0 - want) / n as f64).sqrt()
    }

    #[test]
    fn hue_tables_give_pillows_hsv_for_every_rgb_value() {
        let t = HueTables::get();
        for r in 0..=255u8 {
            for g in 0..=255u8 {
                for b in 0..=255u8 {
                    assert_eq!(
                        t.rgb_to_hsv(r, g, b),
                        pillow_rgb_to_hsv(r, g, b),
                        "rgb {r} {g} {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn hue_tables_give_pillows_rgb_for_every_hsv_value() {
        let t = HueTables::get();
        for h in 0..=255u8 {
            for s in 0..=255u8 {
                for v in 0..=255u8 {
                    let (r, g, b) = pillow_hsv_to_rgb(h, s, v);
                    assert_eq!(t.hsv_to_rgb(h, s, v), [r, g, b], "hsv {h} {s} {v}");
                }
            }
        }
    }

    #[test]
    fn blur_of_each_axis_equals_the_line_blur_of_each_channel() {
        // Pillow blurs every line of every channel (rows, then the columns as rows of the
        // transpose); `gaussian_blur` runs both axes through the lanes kernel. Every region of
        // a line is covered (short lines too: radius beyond half the length).
        let mut rng = StdRng::seed_from_u64(3);
        for &(w, h, c) in &[
            (7usize, 5usize, 3usize),
            (16, 40, 1),
            (9, 3, 3),
            (30, 11, 4),
            (12, 9, 2),
            (5, 13, 5),
        ] {
            let data: Vec<u8> = (0..w * h * c).map(|_| rng.random()).collect();
            let at = |x: usize, y: usize, ch: usize| (y * w + x) * c + ch;
            for r in [0.4f32, 1.0, 1.7, 2.5, 6.3] {
                let (radius, ww, fw) = box_weights(r);
                // The reference: three line passes over each row, then over each column.
                let mut want = data.clone();
                let lines = (0..h)
                    .flat_map(|y| (0..c).map(move |ch| (0..w).map(move |x| at(x, y, ch))))
                    .map(|l| l.collect::<Vec<_>>())
                    .chain(
                        (0..w)
                            .flat_map(|x| (0..c).map(move |ch| (0..h).map(move |y| at(x, y, ch))))
                            .map(|l| l.collect::<Vec<_>>()),
                    )
                    .collect::<Vec<_>>();
                // (rows first: the column passes start from the row-blurred image)
                for idx in &lines {
                    let mut line: Vec<u8> = idx.iter().map(|&i| want[i]).collect();
                    let mut out = vec![0u8; line.len()];
                    for _ in 0..3 {
                        box_blur_line(&line, &mut out, radius, ww, fw);
                        line.copy_from_slice(&out);
                    }
                    for (&i, &v) in idx.iter().zip(&line) {
                        want[i] = v;
                    }
                }
                let got = box_blur(&Image::new(w, h, c, data.clone()).unwrap(), r);
                assert_eq!(got.data, want, "{w}x{h}x{c} radius {r}");
            }
        }
    }

    #[test]
    fn apply_probabilities() {
        let n = 4000;
        let ne = |a: &Image, b: &Image| a != b;
        let p = rate(&Op::HorizontalFlip { p: 0.5 }, n, ne);
        assert!(close(p, 0.5, n), "flip {p}");
        let p = rate(&Op::RandomGrayscale { p: 0.2 }, n, ne);
        assert!(close(p, 0.2, n), "grayscale {p}");
        let p = rate(
            &Op::RandomApply {
                p: 0.8,
                ops: vec![Op::Solarize],
            },
            n,
            ne,
        );
        assert!(close(p, 0.8, n), "apply {p}");
    }

    #[test]
    fn jitter_factors_stay_in_their_ranges() {
        // Brightness alone at 0.4: factor in [0.6, 1.4]; the mean pixel scales with it.
        let op = jitter(0.4, 0.0, 0.0, 0.0);
        let base = Image::new(4, 4, 1, vec![100; 16]).unwrap();
        let mut rng = StdRng::seed_from_u64(0);
        let vals: Vec<u8> = (0..2000)
            .map(|_| op.apply(base.clone(), &mut rng).data[0])
            .collect();
        assert!(
            vals.iter().all(|&v| (59..=140).contains(&v)),
            "{:?}",
            vals.iter().minmax()
        );
        assert!(*vals.iter().min().unwrap() < 62 && *vals.iter().max().unwrap() > 137);
    }

    trait MinMax {
        fn minmax(self) -> (u8, u8);
    }
    impl<'a, I: Iterator<Item = &'a u8>> MinMax for I {
        fn minmax(self) -> (u8, u8) {
            self.fold((255, 0), |(lo, hi), &v| (lo.min(v), hi.max(v)))
        }
    }

    #[test]
    fn presets_produce_their_size_and_normalised_values() {
        for name in ["v1", "v2", "cifar", "v3"] {
            let t = TwoCrop::preset(name, 16, Normalize::imagenet()).unwrap();
            let mut out = vec![];
            t.query
                .apply(img(), &mut StdRng::seed_from_u64(1), &mut out);
            t.key.apply(img(), &mut StdRng::seed_from_u64(2), &mut out);
            assert_eq!(out.len(), 2 * 3 * 16 * 16, "{name}");
            assert!(out.iter().all(|v| v.is_finite() && v.abs() < 3.0), "{name}");
        }
        assert!(TwoCrop::preset("v9", 16, Normalize::imagenet())
            .unwrap_err()
            .to_string()
            .contains("v9"));
        let v3 = TwoCrop::preset("v3", 16, Normalize::imagenet()).unwrap();
        assert_ne!(v3.query, v3.key, "v3 is asymmetric");
    }

    #[test]
    fn apply_into_equals_apply_for_every_preset() {
        let mut pipes: Vec<Pipeline> = vec![
            eval(Some(12), 32, Normalize::imagenet()),
            linear_train(12, Normalize::imagenet()),
        ];
        for name in ["v1", "v2", "cifar", "v3"] {
            let t = TwoCrop::preset(name, 12, Normalize::imagenet()).unwrap();
            pipes.push(t.query);
            pipes.push(t.key);
        }
        for (k, p) in pipes.iter().enumerate() {
            for seed in 0..5 {
                let mut a = vec![];
                p.apply(img(), &mut StdRng::seed_from_u64(seed), &mut a);
                let mut b = vec![0f32; a.len()];
                p.apply_into(&img(), &mut StdRng::seed_from_u64(seed), &mut b);
                assert_eq!(a, b, "pipeline {k}, seed {seed}");
            }
        }
    }

    #[test]
    fn crop_fallback_is_central_at_the_nearest_ratio() {
        // A 100x10 strip: no crop within the ratio range fits, so the fallback runs.
        let mut rng = StdRng::seed_from_u64(0);
        let (i, j, h, w) = resized_crop_params(100, 10, (0.9, 1.0), (0.75, 4.0 / 3.0), &mut rng);
        assert_eq!((i, h), (0, 10));
        assert_eq!(w, 13); // round(10 * 4/3)
        assert_eq!(j, (100 - 13) / 2);
    }
}
