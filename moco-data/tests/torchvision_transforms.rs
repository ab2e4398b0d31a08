//! moco-data's image operations against torchvision on PIL images. Golden values:
//! `tests/reference/transforms_golden.py`, on small real photos in `tests/reference/images/`.
//!
//! Tolerances: PNG decoding, Resize and CenterCrop are bit-exact (Pillow's fixed-point
//! resampling is reproduced); the eval transform's floats within 1e-6. JPEG decoding goes through
//! another decoder than PIL's libjpeg: pixels may differ by a few levels (bound checked below).

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use moco_data::image::{center_crop, resize_shorter};
use moco_data::{image_files, EvalTransform, Image};

fn reference() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/reference")
}

fn golden() -> HashMap<String, Tensor> {
    moco_core_free_load(&reference().join("transforms_golden.safetensors"))
}

// moco-data does not depend on moco-core: read the safetensors file with candle directly.
fn moco_core_free_load(path: &std::path::Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

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
    let gold = golden();
    let files = image_files(&reference().join("images")).unwrap();
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
    let gold = golden();
    for path in image_files(&reference().join("images")).unwrap() {
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
            let err = (t - want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(err <= 1e-6, "{tag}.eval_{s}: max error {err}");
        }
    }
}

#[test]
fn jpeg_decoding_is_within_a_few_levels_of_libjpeg() {
    let gold = golden();
    let img = Image::open_rgb(&reference().join("images/rocket.jpg")).unwrap();
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
    assert!(
        max <= 4 && mean < 0.5,
        "JPEG decoding differs from PIL: max {max}, mean {mean}"
    );
}
