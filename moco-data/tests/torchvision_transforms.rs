//! moco-data's image operations against torchvision on PIL images. Golden values:
//! `tests/reference/transforms_golden.py`, on small real photos in `tests/reference/images/`.
//!
//! Tolerances: PNG decoding, Resize and CenterCrop are bit-exact (Pillow's fixed-point
//! resampling is reproduced); the eval transform's floats within 1e-6. JPEG decoding goes through
//! another decoder than PIL's libjpeg: pixels may differ by a few levels (bound checked below).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use candle_core::{Device, Tensor};
use moco_data::image::{center_crop, resize_shorter};
use moco_data::{image_files, EvalTransform, Image};
use moco_testing::{golden, max_abs_diff, reference};

// moco-data does not depend on moco-core: read the safetensors file with candle directly.
fn pixels(t: &Tensor) -> (usize, usize, Vec<u8>) {
    let (h, w, _) = t.dims3().unwrap();
    (w, h, t.flatten_all().unwrap().to_vec1::<u8>().unwrap())
}

fn assert_same_image(what: &str, img: &Image, want: &Tensor) {
    let (w, h, data) = pixels(want);
    assert_eq!((img.width, img.height), (w, h), "{what}: size");
    let diff = img.data.iter().zip(&data).filter(|(a, b)| a != b).count();
    assert_eq!(diff, 0, "{what}: {diff} of {} bytes differ", data.len());
}

#[test]
fn decode_resize_and_crop_match_pil_bit_for_bit() {
    let gold = golden("transforms_golden.safetensors");
    let files = image_files(&reference("images")).unwrap();
    assert_eq!(files.len(), 4);
    for path in files.iter().filter(|p| p.extension().unwrap() == "png") {
        let tag = path.file_stem().unwrap().to_str().unwrap();
        let img = Image::open_rgb(path).unwrap();
        assert_same_image(&format!("{tag}.rgb"), &img, &gold[&format!("{tag}.rgb")]);
        for s in [36, 50, 73, 160] {
            let key = format!("{tag}.resize_{s}");
            assert_same_image(&key, &resize_shorter(&img, s), &gold[&key]);
        }
        for s in [32, 64, 120] {
            let key = format!("{tag}.crop_{s}");
            assert_same_image(&key, &center_crop(&img, s, s), &gold[&key]);
        }
    }
}

#[test]
fn eval_transform_matches_torchvision() {
    let gold = golden("transforms_golden.safetensors");
    for path in image_files(&reference("images")).unwrap() {
        let tag = path.file_stem().unwrap().to_str().unwrap().to_string();
        let is_png = path.extension().unwrap() == "png";
        // For the JPEG, start from PIL's decoded pixels so that only the transform is compared.
        let img = if is_png {
            Image::open_rgb(&path).unwrap()
        } else {
            let (w, h, data) = pixels(&gold[&format!("{tag}.rgb")]);
            Image::new(w, h, 3, data).unwrap()
        };
        for s in [32, 64] {
            let t = EvalTransform::imagenet(s)
                .batch(std::slice::from_ref(&img), &Device::Cpu)
                .unwrap();
            let want = gold[&format!("{tag}.eval_{s}")].unsqueeze(0).unwrap();
            let err = max_abs_diff(&t, &want);
            assert!(err <= 1e-6, "{tag}.eval_{s}: max error {err}");
        }
    }
}

#[test]
fn jpeg_decoding_matches_pil() {
    let gold = golden("transforms_golden.safetensors");
    let img = Image::open_rgb(&reference("images/rocket.jpg")).unwrap();
    let (w, h, want) = pixels(&gold["rocket.rgb"]);
    assert_eq!((img.width, img.height), (w, h));
    let max = img
        .data
        .iter()
        .zip(&want)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    let mean = img
        .data
        .iter()
        .zip(&want)
        .map(|(a, b)| a.abs_diff(*b) as f64)
        .sum::<f64>()
        / want.len() as f64;
    eprintln!("JPEG vs PIL: max {max} levels, mean {mean:.3}");
    // libjpeg(-turbo) is PIL's decoder: the same bytes. The `image` crate's decoder rounds its
    // inverse DCT and upsampling differently.
    let (max_levels, max_mean) = if cfg!(moco_libjpeg) {
        (0, 0.0)
    } else {
        (4, 0.5)
    };
    assert!(
        max <= max_levels && mean <= max_mean,
        "JPEG decoding differs from PIL: max {max}, mean {mean}"
    );
}

fn image_of(t: &Tensor) -> Image {
    let dims = t.dims().to_vec();
    let (h, w, c) = match dims.as_slice() {
        [h, w] => (*h, *w, 1),
        [h, w, c] => (*h, *w, *c),
        _ => panic!("bad dims {dims:?}"),
    };
    Image::new(w, h, c, t.flatten_all().unwrap().to_vec1::<u8>().unwrap()).unwrap()
}

#[test]
fn augmentations_with_fixed_parameters_match_pil_bit_for_bit() {
    use moco_data::augment::*;
    let gold = golden("transforms_golden.safetensors");
    let mut checked = 0;
    for tag in ["astronaut_rgba", "chelsea_gray", "coffee", "fmnist"] {
        let img = image_of(&gold[&format!("{tag}.aug.input")]);
        let (w, h) = (img.width, img.height);
        let mut ops: Vec<(String, Image)> = vec![
            (
                "crop".into(),
                resized_crop(&img, h / 5, w / 7, h / 2, (2 * w) / 3, 24),
            ),
            ("crop_up".into(), resized_crop(&img, 1, 2, 9, 13, 20)),
            ("gray".into(), grayscale(&img)),
            ("flip".into(), img.hflip()),
            ("solarize".into(), solarize(&img, 128)),
        ];
        for (f, name) in [(0.0, "0.0"), (0.6, "0.6"), (1.0, "1.0"), (1.37, "1.37")] {
            ops.push((format!("brightness_{name}"), adjust_brightness(&img, f)));
            ops.push((format!("contrast_{name}"), adjust_contrast(&img, f)));
            ops.push((format!("saturation_{name}"), adjust_saturation(&img, f)));
        }
        for (f, name) in [
            (-0.4, "-0.4"),
            (-0.1, "-0.1"),
            (0.07, "0.07"),
            (0.33, "0.33"),
        ] {
            ops.push((format!("hue_{name}"), adjust_hue(&img, f)));
        }
        for (s, name) in [(0.1, "0.1"), (0.5, "0.5"), (1.3, "1.3"), (2.0, "2.0")] {
            ops.push((format!("blur_{name}"), gaussian_blur(&img, s)));
        }
        for (op, got) in ops {
            let key = format!("{tag}.aug.{op}");
            let want = image_of(&gold[&key]);
            assert_eq!(
                (got.width, got.height, got.channels),
                (want.width, want.height, want.channels),
                "{key}: shape"
            );
            let diff = got
                .data
                .iter()
                .zip(&want.data)
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(diff, 0, "{key}: {diff} of {} bytes differ", want.data.len());
            checked += 1;
        }
    }
    assert_eq!(checked, 4 * 25);
}

#[test]
fn random_resized_crop_parameters_follow_torchvision_statistics() {
    use moco_data::augment::resized_crop_params;
    use rand::SeedableRng;
    let gold = golden("transforms_golden.safetensors");
    for (w, h, s0, key) in [
        (100, 80, 0.2, "rrc.100_80_0.2"),
        (32, 32, 0.08, "rrc.32_32_0.08"),
        (28, 28, 0.2, "rrc.28_28_0.2"),
    ] {
        let want = gold[key].to_vec1::<f64>().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let n = 20000;
        let (mut area, mut logar, mut cx, mut full) = (vec![], vec![], vec![], 0usize);
        for _ in 0..n {
            let (i, j, ch, cw) = resized_crop_params(w, h, (s0, 1.0), (0.75, 4.0 / 3.0), &mut rng);
            assert!(i + ch <= h && j + cw <= w && ch > 0 && cw > 0);
            area.push((ch * cw) as f64 / (w * h) as f64);
            logar.push((cw as f64 / ch as f64).ln());
            cx.push((j as f64 + cw as f64 / 2.0) / w as f64);
            full += (ch == h && cw == w) as usize;
        }
        let stats = |v: &[f64]| {
            let m = v.iter().sum::<f64>() / v.len() as f64;
            let sd =
                (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (v.len() - 1) as f64).sqrt();
            (m, sd)
        };
        // Means agree within 4 standard errors of the difference of two 20000-draw means;
        // standard deviations within 5%.
        for (name, (m, sd), (wm, wsd)) in [
            ("area", stats(&area), (want[0], want[1])),
            ("log aspect", stats(&logar), (want[2], want[3])),
            ("centre x", stats(&cx), (want[4], want[5])),
        ] {
            let se = (sd * sd / n as f64 + wsd * wsd / n as f64).sqrt();
            assert!(
                (m - wm).abs() < 4.0 * se,
                "{key} {name}: mean {m:.4} vs torchvision {wm:.4} (se {se:.4})"
            );
            assert!(
                (sd - wsd).abs() < 0.05 * wsd,
                "{key} {name}: std {sd:.4} vs torchvision {wsd:.4}"
            );
        }
        let pf = full as f64 / n as f64;
        let se = (want[6] * (1.0 - want[6]) / n as f64 * 2.0)
            .sqrt()
            .max(1e-4);
        assert!(
            (pf - want[6]).abs() < 4.0 * se + 1e-4,
            "{key}: full-image crops {pf:.4} vs {:.4}",
            want[6]
        );
    }
}
