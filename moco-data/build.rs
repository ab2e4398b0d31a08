//! With the `libjpeg` feature, compiles `csrc/jpeg_decode.c` and links libjpeg(-turbo): the
//! system's (Debian/Ubuntu `libjpeg-dev`), or the one under `LIBJPEG_ROOT` (`include/`, `lib/`).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc/jpeg_decode.c");
    println!("cargo:rerun-if-env-changed=LIBJPEG_ROOT");
    if std::env::var_os("CARGO_FEATURE_LIBJPEG").is_none() {
        return;
    }
    let mut build = cc::Build::new();
    build.opt_level(2).file("csrc/jpeg_decode.c");
    if let Some(root) = std::env::var_os("LIBJPEG_ROOT") {
        let root = std::path::PathBuf::from(root);
        build.include(root.join("include"));
        println!(
            "cargo:rustc-link-search=native={}",
            root.join("lib").display()
        );
    }
    if let Err(e) = build.try_compile("moco_jpeg_decode") {
        panic!(
            "moco-data, feature `libjpeg`: compiling csrc/jpeg_decode.c failed: {e}\n\
             It needs libjpeg(-turbo)'s headers and library: `apt-get install libjpeg-dev` \
             (Debian/Ubuntu), or LIBJPEG_ROOT=DIR with DIR/include and DIR/lib. Without it, \
             build without the feature (`cargo build -p moco-cli --no-default-features \
             --features onednn`): JPEGs are then decoded by the `image` crate."
        );
    }
    println!("cargo:rustc-link-lib=dylib=jpeg");
}
