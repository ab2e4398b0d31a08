//! `moco plot RUN_DIR`: the training curves of a run (`metrics.jsonl`) as PNG files.
//!
//! Four charts, each in its own file and together in `curves.png`: the loss and the positive's
//! top-1 accuracy per logged step, the learning rate per logged step, and the kNN top-1 per
//! evaluated epoch. Text is drawn with the DejaVu Sans font built into the binary, so plotting
//! needs no system fonts.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use plotters::prelude::*;

/// One chart: a title, axis names and the (x, y) points of one curve.
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    /// File stem (`loss` gives `loss.png`).
    pub name: &'static str,
    pub title: &'static str,
    pub x_label: &'static str,
    pub y_label: &'static str,
    pub points: Vec<(f64, f64)>,
}

/// The curves in the text of a `metrics.jsonl` (`path` names the file in errors). Training lines
/// (with `loss`) give loss, acc1 and lr against the step; evaluation lines (with `knn_top1`) give
/// the kNN top-1 against the epoch, counted from 1. A line left by a resumed run for a step
/// logged again replaces the earlier one.
pub fn curves(text: &str, path: &Path) -> Result<Vec<Curve>> {
    let mut train: Vec<(u64, f64, f64, f64)> = vec![];
    let mut knn: Vec<(u64, f64)> = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: serde_json::Value = serde_json::from_str(line).with_context(at)?;
        let num = |key: &str| v.get(key).and_then(|x| x.as_f64());
        let step = v
            .get("step")
            .and_then(|x| x.as_u64())
            .with_context(|| format!("{}: no `step`", at()))?;
        if let Some(top1) = num("knn_top1") {
            let epoch = v
                .get("epoch")
                .and_then(|x| x.as_u64())
                .with_context(|| format!("{}: a kNN line without `epoch`", at()))?;
            knn.retain(|&(e, _)| e != epoch + 1);
            knn.push((epoch + 1, top1));
        } else if let Some(loss) = num("loss") {
            let (acc1, lr) = (num("acc1"), num("lr"));
            let (Some(acc1), Some(lr)) = (acc1, lr) else {
                bail!("{}: a training line needs `acc1` and `lr`", at());
            };
            train.retain(|&(s, ..)| s != step);
            train.push((step, loss, acc1, lr));
        }
    }
    train.sort_by_key(|t| t.0);
    knn.sort_by_key(|t| t.0);
    let by_step = |f: fn(&(u64, f64, f64, f64)) -> f64| -> Vec<(f64, f64)> {
        train.iter().map(|t| (t.0 as f64, f(t))).collect()
    };
    Ok(vec![
        Curve {
            name: "loss",
            title: "Contrastive loss",
            x_label: "step",
            y_label: "loss",
            points: by_step(|t| t.1),
        },
        Curve {
            name: "acc1",
            title: "Positive-key top-1 (acc1)",
            x_label: "step",
            y_label: "acc1 (%)",
            points: by_step(|t| t.2),
        },
        Curve {
            name: "lr",
            title: "Learning rate",
            x_label: "step",
            y_label: "lr",
            points: by_step(|t| t.3),
        },
        Curve {
            name: "knn",
            title: "kNN top-1 (test set)",
            x_label: "epoch",
            y_label: "top-1 (%)",
            points: knn.iter().map(|&(e, a)| (e as f64, a)).collect(),
        },
    ])
}

const FONT: &str = "sans-serif";

fn register_font() -> Result<()> {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *ONCE.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok()
    });
    if !ok {
        bail!("the built-in DejaVu Sans font could not be loaded");
    }
    Ok(())
}

/// The axis range of `values`, padded by 5%. Values beyond +-1e300 are clipped (drawn at the
/// edge) so that the range and the tick arithmetic stay finite: a diverged run logs losses
/// near f64::MAX, and a range of twice that overflows.
fn range(values: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    const LIMIT: f64 = 1e300;
    let lo = values.clone().fold(f64::INFINITY, f64::min).max(-LIMIT);
    let hi = values.fold(f64::NEG_INFINITY, f64::max).min(LIMIT);
    // A flat curve (or a single point) gets a range around its value.
    let pad = if hi > lo {
        (hi - lo) * 0.05
    } else {
        (hi.abs() * 0.05).max(0.5)
    };
    (lo - pad, hi + pad)
}

fn draw<DB: DrawingBackend>(area: &DrawingArea<DB, plotters::coord::Shift>, c: &Curve) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err =
        |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow::anyhow!("drawing `{}`: {e:?}", c.name);
    area.fill(&WHITE).map_err(err)?;
    let (x0, x1) = range(c.points.iter().map(|p| p.0));
    let (y0, y1) = range(c.points.iter().map(|p| p.1));
    let mut chart = ChartBuilder::on(area)
        .caption(c.title, (FONT, 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(c.x_label)
        .y_desc(c.y_label)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .draw()
        .map_err(err)?;
    let color = RGBColor(31, 119, 180);
    chart
        .draw_series(LineSeries::new(
            c.points.iter().copied(),
            color.stroke_width(2),
        ))
        .map_err(err)?;
    if c.points.len() <= 50 {
        chart
            .draw_series(c.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(err)?;
    }
    Ok(())
}

fn save_png(path: &Path, buf: Vec<u8>, (w, h): (u32, u32)) -> Result<()> {
    let img = image::RgbImage::from_raw(w, h, buf).context("plot buffer size")?;
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, image::ImageFormat::Png)
        .with_context(|| format!("encoding {}", path.display()))?;
    moco_core::io::write_atomic(path, bytes.get_ref())?;
    Ok(())
}

/// Draws the curves of `run`'s `metrics.jsonl` into `out` (default: the run folder). Returns the
/// files written; a curve with no points (no kNN evaluation yet) is skipped.
pub fn run(run: &Path, out: Option<&Path>) -> Result<Vec<PathBuf>> {
    let metrics = run.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics)
        .with_context(|| format!("{}: no metrics to plot", metrics.display()))?;
    let curves = curves(&text, &metrics)?;
    let drawn: Vec<&Curve> = curves.iter().filter(|c| !c.points.is_empty()).collect();
    if drawn.is_empty() {
        bail!("{}: no training or kNN lines yet", metrics.display());
    }
    let out = out.unwrap_or(run);
    std::fs::create_dir_all(out).with_context(|| format!("--out {}", out.display()))?;
    register_font()?;
    let mut written = vec![];
    let size = (800u32, 500u32);
    for c in &drawn {
        let mut buf = vec![0u8; (size.0 * size.1 * 3) as usize];
        {
            let area = BitMapBackend::with_buffer(&mut buf, size).into_drawing_area();
            draw(&area, c)?;
            area.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        }
        let path = out.join(format!("{}.png", c.name));
        save_png(&path, buf, size)?;
        written.push(path);
    }
    // All of them on one page, two by two.
    let grid = (1600u32, 1000u32);
    let mut buf = vec![0u8; (grid.0 * grid.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, grid).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        for (area, c) in root.split_evenly((2, 2)).iter().zip(&drawn) {
            draw(area, c)?;
        }
        root.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    }
    let path = out.join("curves.png");
    save_png(&path, buf, grid)?;
    written.push(path);
    Ok(written)
}

/// Draw a run's training curves (loss, acc1, lr per step; kNN top-1 per epoch) into PNG files.
#[derive(Debug, clap::Args)]
pub struct PlotArgs {
    /// The run directory (holding metrics.jsonl).
    pub run: PathBuf,
    /// Where to write the PNG files (default: the run directory).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

impl PlotArgs {
    /// Writes the PNG files and prints their paths.
    pub fn run(&self) -> Result<()> {
        for f in run(&self.run, self.out.as_deref())? {
            println!("{}", f.display());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const METRICS: &str = r#"{"epoch":0,"step":10,"loss":7.1,"acc1":2.0,"acc5":9.0,"lr":0.06,"momentum":0.99,"images_per_s":40.0}
{"epoch":0,"step":20,"loss":6.5,"acc1":5.0,"acc5":15.0,"lr":0.05,"momentum":0.99,"images_per_s":41.0}
{"epoch":0,"step":20,"knn_top1":55.5,"knn_top5":90.0}
{"epoch":1,"step":30,"loss":6.0,"acc1":9.0,"acc5":20.0,"lr":0.03,"momentum":0.99,"images_per_s":42.0}
{"epoch":1,"step":40,"knn_top1":60.25,"knn_top5":93.0}
"#;

    #[test]
    fn curves_read_training_and_knn_lines() {
        let c = curves(METRICS, Path::new("m.jsonl")).unwrap();
        let get = |n: &str| c.iter().find(|c| c.name == n).unwrap().points.clone();
        assert_eq!(get("loss"), vec![(10.0, 7.1), (20.0, 6.5), (30.0, 6.0)]);
        assert_eq!(get("acc1"), vec![(10.0, 2.0), (20.0, 5.0), (30.0, 9.0)]);
        assert_eq!(get("lr"), vec![(10.0, 0.06), (20.0, 0.05), (30.0, 0.03)]);
        assert_eq!(get("knn"), vec![(1.0, 55.5), (2.0, 60.25)]);
    }

    #[test]
    fn a_relogged_step_replaces_the_old_line_and_bad_lines_name_the_file() {
        let text = format!(
            "{METRICS}{}\n",
            r#"{"epoch":0,"step":20,"loss":1.0,"acc1":50.0,"lr":0.05}"#
        );
        let c = curves(&text, Path::new("m.jsonl")).unwrap();
        assert_eq!(c[0].points, vec![(10.0, 7.1), (20.0, 1.0), (30.0, 6.0)]);
        let e = curves(
            "{\"step\": 1, \"loss\": 2.0}\nnot json",
            Path::new("run/m.jsonl"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("run/m.jsonl:1"), "{e}");
        let e = curves("not json", Path::new("run/m.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("run/m.jsonl:1"), "{e}");
    }

    #[test]
    fn run_writes_pngs_with_the_curves_drawn() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("metrics.jsonl"), METRICS).unwrap();
        let files = run(dir.path(), None).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            ["loss.png", "acc1.png", "lr.png", "knn.png", "curves.png"]
        );
        let img = image::open(&files[0]).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (800, 500));
        // The curve's colour is there, and so is dark text (title, ticks).
        let px: Vec<_> = img.pixels().collect();
        assert!(px.iter().any(|p| p.0 == [31, 119, 180]), "no curve drawn");
        assert!(
            px.iter().any(|p| p.0.iter().all(|&v| v < 60)),
            "no text drawn"
        );
        // Losses near f64::MAX (a diverged run) draw too, and do not hang the tick arithmetic.
        let huge = METRICS.replacen("\"loss\":", "\"loss\":1.7e308,\"was\":", 1);
        assert!(huge.contains("1.7e308"), "{huge}");
        std::fs::write(dir.path().join("metrics.jsonl"), huge).unwrap();
        assert_eq!(run(dir.path(), None).unwrap().len(), 5);
        assert!(run(&dir.path().join("missing"), None)
            .unwrap_err()
            .to_string()
            .contains("metrics.jsonl"));
    }
}
