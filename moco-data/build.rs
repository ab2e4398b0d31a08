//! With the `libjpeg` feature, compiles `csrc/jpeg_decode.c` and links libjpeg(-turbo): the
//! system's (Debian/Ubuntu `libjpeg-dev`), or the one under `LIBJPEG_ROOT` (`include/`, `lib/`).
//! When it is not found the build goes on without it (a cargo warning; cfg `moco_libjpeg`
//! unset, `MOCO_LIBJPEG_MISSING` says why).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc/jpeg_decode.c");
    println!("cargo:rerun-if-env-changed=LIBJPEG_ROOT");
    // `moco_libjpeg`: JPEGs are decoded by libjpeg (feature `libjpeg` and libjpeg found).
    println!("cargo::rustc-check-cfg=cfg(moco_libjpeg)");
    if std::env::var_os("CARGO_FEATURE_LIBJPEG").is_none() {
        return;
    }
    match libjpeg() {
        Ok(()) => println!("cargo:rustc-cfg=moco_libjpeg"),
        Err(why) => {
            // The build goes on with the `image` crate's decoder; the binary says so at start
            // (MOCO_LIBJPEG_MISSING, read by `moco_data::LIBJPEG_MISSING`).
            println!(
                "cargo:warning=moco-data: libjpeg not found ({why}); building without it: JPEGs are decoded by the `image` crate, within a few levels of PIL instead of bit for bit. For libjpeg: `apt-get install libjpeg-dev` (Debian/Ubuntu) or LIBJPEG_ROOT=DIR, then rebuild."
            );
            println!("cargo:rustc-env=MOCO_LIBJPEG_MISSING={why}");
        }
    }
}

/// Compiles the libjpeg shim; an error says why libjpeg is not usable (its headers missing).
fn libjpeg() -> Result<(), String> {
    let mut build = cc::Build::new();
    build
        .opt_level(2)
        .cargo_warnings(false)
        .file("csrc/jpeg_decode.c");
    if let Some(root) = std::env::var_os("LIBJPEG_ROOT") {
        // LIBJPEG_ROOT names the libjpeg to use: without its header there, none.
        let root = std::path::PathBuf::from(root);
        let header = root.join("include/jpeglib.h");
        if !header.is_file() {
            return Err(format!(
                "LIBJPEG_ROOT={}: no {}",
                root.display(),
                header.display()
            ));
        }
        build.include(root.join("include"));
        println!(
            "cargo:rustc-link-search=native={}",
            root.join("lib").display()
        );
    }
    if build.try_compile("moco_jpeg_decode").is_err() {
        return Err("compiling csrc/jpeg_decode.c against jpeglib.h failed".into());
    }
    println!("cargo:rustc-link-lib=dylib=jpeg");
    Ok(())
}
