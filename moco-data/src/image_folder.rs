//! `ImageFolder`: a folder of class folders of image files (the ImageNet layout of
//! `main_lincls.py`), indexed as torchvision's `datasets.ImageFolder` does, with the checks it
//! lacks: every real folder is read once (a symbolic link to a folder already read is not
//! followed again, a link to one of its own parents is an error), class folders whose names are
//! not UTF-8 are read under their real names, and [`ImageFolder::check_headers`] finds an
//! unreadable image before any work.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::datasets::Dataset;
use crate::image::Image;
use crate::{Error, Result};

/// What to do with an image file that cannot be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadFiles {
    /// Stop with an error naming the file.
    Fail,
    /// Leave the file out (checked when the folder is indexed) and count it.
    Skip,
}

/// `ImageFolder` as torchvision reads it: `root/CLASS/**/image`, classes sorted by name,
/// files sorted within a class, images converted to RGB.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    name: String,
    files: Vec<(PathBuf, u32)>,
    classes: Vec<String>,
    /// Files left out because they could not be decoded (with `BadFiles::Skip`).
    pub skipped: Vec<PathBuf>,
}

/// The real path of `path` (links resolved), with the error naming `path`.
fn real_path(path: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(path).map_err(|e| Error::file(path, format!("cannot resolve: {e}")))
}

/// The folders read so far (by real path) and the real paths of the folders above the one
/// being read.
struct Walk {
    read: HashSet<PathBuf>,
    above: Vec<PathBuf>,
}

impl Walk {
    /// Appends the image files under `dir` (real path `real`) to `out`, sorted by path within
    /// each folder, subfolders in name order.
    fn folder(&mut self, dir: &Path, real: PathBuf, out: &mut Vec<PathBuf>) -> Result<()> {
        if !self.read.insert(real.clone()) {
            return Ok(());
        }
        let listing = std::fs::read_dir(dir)
            .map_err(|e| Error::file(dir, format!("cannot list folder: {e}")))?;
        let mut entries = vec![];
        for e in listing {
            let e = e.map_err(|e| Error::file(dir, format!("cannot list folder: {e}")))?;
            entries.push(e.path());
        }
        entries.sort();
        self.above.push(real);
        for p in entries {
            // `is_dir` follows links; a dangling link is neither a folder nor an image.
            if p.is_dir() {
                let real = real_path(&p)?;
                if let Some(parent) = self.above.iter().find(|a| **a == real) {
                    return Err(Error::file(
                        &p,
                        format!(
                            "a link to {}, a folder that contains it (a cycle): the images would be counted again and again; remove the link",
                            parent.display()
                        ),
                    ));
                }
                self.folder(&p, real, out)?;
            } else if crate::is_image_file(&p) && p.is_file() {
                out.push(p);
            }
        }
        self.above.pop();
        Ok(())
    }
}

impl ImageFolder {
    /// Indexes `root`. An empty class folder is an error naming it, as is a symbolic link to
    /// a folder above it. A folder reached twice (through links) is read once. With
    /// `BadFiles::Skip` every file is decoded once here and the undecodable ones are left out
    /// (see `skipped`).
    pub fn new(root: &Path, bad: BadFiles) -> Result<Self> {
        if !root.is_dir() {
            return Err(Error::file(root, "not a folder"));
        }
        let mut classes: Vec<(String, PathBuf)> = std::fs::read_dir(root)
            .map_err(|e| Error::file(root, format!("cannot list folder: {e}")))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .collect();
        classes.sort();
        if classes.is_empty() {
            return Err(Error::file(
                root,
                "no class folders (expected ROOT/CLASS/image files)",
            ));
        }
        let mut walk = Walk {
            read: HashSet::new(),
            above: vec![real_path(root)?],
        };
        let mut files = vec![];
        for (label, (_, dir)) in classes.iter().enumerate() {
            let mut found = vec![];
            walk.folder(dir, real_path(dir)?, &mut found)?;
            if found.is_empty() {
                return Err(Error::file(
                    dir,
                    "class folder holds no image files (or only folders already read through another link)",
                ));
            }
            found.sort();
            files.extend(found.into_iter().map(|p| (p, label as u32)));
        }
        let mut skipped = vec![];
        if bad == BadFiles::Skip {
            files.retain(|(p, _)| {
                let ok = Image::open_rgb(p).is_ok();
                if !ok {
                    skipped.push(p.clone());
                }
                ok
            });
        }
        Ok(Self {
            name: root.display().to_string(),
            files,
            classes: classes.into_iter().map(|(name, _)| name).collect(),
            skipped,
        })
    }

    /// The file of sample `i`.
    pub fn path(&self, i: usize) -> &Path {
        &self.files[i].0
    }

    /// Reads the header of every file (format and size, not the pixels): the first file that
    /// is not an image of a known format, or has no pixels, is an error naming it. Cheap next
    /// to decoding; used on evaluation sets before any training.
    pub fn check_headers(&self) -> Result<()> {
        for (p, _) in &self.files {
            let (w, h) = image::ImageReader::open(p)
                .map_err(|e| Error::file(p, format!("cannot open: {e}")))?
                .with_guessed_format()
                .map_err(|e| Error::file(p, format!("cannot read: {e}")))?
                .into_dimensions()
                .map_err(|e| Error::file(p, format!("not a readable image: {e}")))?;
            if w == 0 || h == 0 {
                return Err(Error::file(p, format!("image of {w}x{h} pixels")));
            }
        }
        Ok(())
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }
    fn get(&self, i: usize) -> Result<(Image, u32)> {
        let (p, l) = &self.files[i];
        Ok((Image::open_rgb(p)?, *l))
    }
    fn label(&self, i: usize) -> u32 {
        self.files[i].1
    }
    fn classes(&self) -> &[String] {
        &self.classes
    }
    fn channels(&self) -> usize {
        3
    }
    fn describe(&self) -> String {
        format!(
            "folder {} ({} images, {} classes)",
            self.name,
            self.len(),
            self.classes.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(path: &Path, v: u8) {
        image::RgbImage::from_pixel(4, 3, image::Rgb([v, 0, 0]))
            .save(path)
            .unwrap();
    }

    #[test]
    fn sorts_classes_and_reports_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (class, n) in [("b_cat", 2), ("a_dog", 1)] {
            std::fs::create_dir(root.join(class)).unwrap();
            for i in 0..n {
                png(&root.join(class).join(format!("{i}.png")), i as u8);
            }
        }
        let ds = ImageFolder::new(root, BadFiles::Fail).unwrap();
        assert_eq!(ds.classes(), ["a_dog", "b_cat"]);
        assert_eq!((ds.len(), ds.label(0), ds.label(2)), (3, 0, 1));
        ds.check_headers().unwrap();
        std::fs::write(root.join("b_cat").join("broken.jpg"), b"not a jpeg").unwrap();
        let ds = ImageFolder::new(root, BadFiles::Fail).unwrap();
        let err = (0..ds.len())
            .find_map(|i| ds.get(i).err())
            .unwrap()
            .to_string();
        assert!(err.contains("broken.jpg"), "{err}");
        let err = ds.check_headers().unwrap_err().to_string();
        assert!(err.contains("broken.jpg"), "{err}");
        let ds = ImageFolder::new(root, BadFiles::Skip).unwrap();
        assert_eq!((ds.len(), ds.skipped.len()), (3, 1));
        std::fs::create_dir(root.join("c_empty")).unwrap();
        let err = ImageFolder::new(root, BadFiles::Fail)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("c_empty") && err.contains("no image files"),
            "{err}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn links_are_followed_once_and_cycles_are_errors() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("train");
        let shared = dir.path().join("shared");
        std::fs::create_dir_all(root.join("a/sub")).unwrap();
        std::fs::create_dir_all(root.join("b")).unwrap();
        std::fs::create_dir_all(&shared).unwrap();
        png(&root.join("a/sub/0.png"), 0);
        png(&root.join("b/0.png"), 1);
        png(&shared.join("s.png"), 2);
        // One folder linked from two places inside a class: read once.
        symlink(&shared, root.join("a/link1")).unwrap();
        symlink(&shared, root.join("a/link2")).unwrap();
        let ds = ImageFolder::new(&root, BadFiles::Fail).unwrap();
        assert_eq!(ds.len(), 3, "{:?}", ds.files);
        assert!(ds.path(0).ends_with("a/link1/s.png"), "{:?}", ds.files);
        // A link to a folder above it: an error naming the link.
        symlink(&root, root.join("b/loop")).unwrap();
        let err = ImageFolder::new(&root, BadFiles::Fail)
            .unwrap_err()
            .to_string();
        assert!(err.contains("b/loop") && err.contains("cycle"), "{err}");
        std::fs::remove_file(root.join("b/loop")).unwrap();
        symlink(root.join("a"), root.join("a/sub/up")).unwrap();
        let err = ImageFolder::new(&root, BadFiles::Fail)
            .unwrap_err()
            .to_string();
        assert!(err.contains("sub/up") && err.contains("cycle"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn a_class_folder_whose_name_is_not_utf8_is_read() {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let class = dir.path().join(OsStr::from_bytes(b"caf\xe9"));
        std::fs::create_dir(&class).unwrap();
        png(&class.join("0.png"), 0);
        let ds = ImageFolder::new(dir.path(), BadFiles::Fail).unwrap();
        assert_eq!(
            (ds.len(), ds.classes()),
            (1, &["caf\u{fffd}".to_string()][..])
        );
        ds.get(0).unwrap();
    }
}
