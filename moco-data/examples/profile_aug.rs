//! Per-operation cost of the augmentations on a folder of photos (ms per image), to see where
//! `moco bench data` spends its time.
//! `cargo run --release -p moco-data --example profile_aug -- DIR` (DIR holds JPEG/PNG files).

use moco_data::augment::*;
use moco_data::Image;
use rand::SeedableRng;
use std::time::Instant;
#[allow(clippy::unwrap_used)]
fn main() {
    let dir = std::env::args().nth(1).expect("usage: profile_aug DIR");
    let files = moco_data::image_files(std::path::Path::new(&dir)).expect("a folder of images");
    let files = &files[..files.len().min(100)];
    let n = files.len() as f64;
    let t = Instant::now();
    let imgs: Vec<Image> = files.iter().map(|p| Image::open_rgb(p).unwrap()).collect();
    println!("decode  {:6.2} ms/img", t.elapsed().as_secs_f64() * 1e3 / n);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let t = Instant::now();
    let crops: Vec<Image> = imgs
        .iter()
        .map(|i| {
            Op::RandomResizedCrop {
                size: 224,
                scale: (0.2, 1.0),
                ratio: (0.75, 4.0 / 3.0),
            }
            .apply(i.clone(), &mut rng)
        })
        .collect();
    println!("rrc     {:6.2} ms/img", t.elapsed().as_secs_f64() * 1e3 / n);
    let t = Instant::now();
    for c in &crops {
        let _ = adjust_brightness(c, 1.2);
    }
    println!("bright  {:6.2} ms/img", t.elapsed().as_secs_f64() * 1e3 / n);
    let t = Instant::now();
    for c in &crops {
        let _ = adjust_contrast(c, 1.2);
    }
    println!("contr   {:6.2} ms/img", t.elapsed().as_secs_f64() * 1e3 / n);
    let t = Instant::now();
    for c in &crops {
        let _ = adjust_saturation(c, 1.2);
    }
    println!("sat     {:6.2} ms/img", t.elapsed().as_secs_f64() * 1e3 / n);
    let t = Instant::now();
    for c in &crops {
        let _ = adjust_hue(c, 0.05);
    }
    println!("hue     {:6.2} ms/img", t.elapsed().as_secs_f64() * 1e3 / n);
    let t = Instant::now();
    for c in &crops {
        let _ = gaussian_blur(c, 1.0);
    }
    println!("blur    {:6.2} ms/img", t.elapsed().as_secs_f64() * 1e3 / n);
    let t = Instant::now();
    let mut out = vec![];
    for c in &crops {
        out.clear();
        c.to_chw_normalized(&[0.5, 0.5, 0.5], &[0.2, 0.2, 0.2], &mut out);
    }
    println!("tensor  {:6.2} ms/img", t.elapsed().as_secs_f64() * 1e3 / n);
}
