//! With the `onednn` feature, compiles `csrc/onednn_conv.cpp` (the oneDNN convolution behind
//! `ops/conv/onednn.rs`) and links oneDNN: the system's (Debian/Ubuntu `libdnnl-dev`), or the one under
//! `ONEDNN_ROOT` (`include/`, `lib/`).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc/onednn_conv.cpp");
    println!("cargo:rerun-if-env-changed=ONEDNN_ROOT");
    if std::env::var_os("CARGO_FEATURE_ONEDNN").is_none() {
        return;
    }
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .flag_if_supported("-fopenmp")
        .file("csrc/onednn_conv.cpp");
    if let Some(root) = std::env::var_os("ONEDNN_ROOT") {
        let root = std::path::PathBuf::from(root);
        build.include(root.join("include"));
        println!(
            "cargo:rustc-link-search=native={}",
            root.join("lib").display()
        );
    }
    if let Err(e) = build.try_compile("moco_onednn_conv") {
        panic!(
            "moco-models, feature `onednn`: compiling csrc/onednn_conv.cpp failed: {e}\n\
             It needs oneDNN's headers and library: `apt-get install libdnnl-dev` \
             (Debian/Ubuntu), or ONEDNN_ROOT=DIR with DIR/include and DIR/lib. Without oneDNN, \
             build without the feature (`cargo build -p moco-cli --no-default-features`)."
        );
    }
    println!("cargo:rustc-link-lib=dylib=dnnl");
    // The shim calls omp_set_num_threads with oneDNN's OpenMP runtime (GNU's on Linux).
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-link-lib=dylib=gomp");
    }
}
