//! Three native parts:
//!
//! - always: `kernels/host_check.cpp`, the CUDA kernels' arithmetic (the `kernels/*.cuh`
//!   headers) compiled as host C++, which the tests drive on the CPU (`ops/cuda_host.rs`) and
//!   the CUDA launches use to size their grids;
//! - feature `cuda`: `kernels/*.cu` compiled to PTX with nvcc (`NVCC`, else `nvcc` on `PATH`,
//!   else `$CUDA_HOME/bin/nvcc`) for `CUDA_COMPUTE_CAP` (default 90: H100/H200), and to a
//!   cubin whose ptxas report (`OUT_DIR/<kernel>.ptxas.txt`) must show no local-memory spill
//!   and at most [`REGISTER_BUDGET`] registers per thread, else the build fails;
//! - feature `onednn`: `csrc/onednn_conv.cpp` (the oneDNN convolution behind
//!   `ops/conv/onednn.rs`) linked with oneDNN: the system's (Debian/Ubuntu `libdnnl-dev`), or
//!   the one under `ONEDNN_ROOT` (`include/`, `lib/`). When it is not found the build goes on
//!   without it (a cargo warning; cfg `moco_onednn` unset, `MOCO_ONEDNN_MISSING` says why).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The CUDA kernel sources, each compiled to `OUT_DIR/<name>.ptx`.
const CUDA_KERNELS: [&str; 2] = ["batch_norm", "max_pool"];
/// The headers they and host_check.cpp share.
const HEADERS: [&str; 3] = ["common.cuh", "batch_norm.cuh", "max_pool.cuh"];
/// Registers per thread a kernel may use: 256-thread blocks, at least 4 per SM (64K registers).
const REGISTER_BUDGET: u32 = 64;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc/onednn_conv.cpp");
    println!("cargo:rerun-if-changed=kernels/host_check.cpp");
    for h in HEADERS {
        println!("cargo:rerun-if-changed=kernels/{h}");
    }
    println!("cargo:rerun-if-env-changed=ONEDNN_ROOT");
    // `moco_onednn`: the oneDNN engine is built in (feature `onednn` and oneDNN found).
    println!("cargo::rustc-check-cfg=cfg(moco_onednn)");
    host_check();
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        cuda_kernels();
    }
    if std::env::var_os("CARGO_FEATURE_ONEDNN").is_some() {
        match onednn() {
            Ok(()) => println!("cargo:rustc-cfg=moco_onednn"),
            Err(why) => {
                // The build goes on with the gemm engine; the binary says so at start
                // (MOCO_ONEDNN_MISSING, read by `ops::settings::ONEDNN_MISSING`).
                println!(
                    "cargo:warning=moco-models: oneDNN not found ({why}); building without it: the CPU convolutions run on the gemm crate (about 1.35x fewer training images/s). For oneDNN: `apt-get install libdnnl-dev` (Debian/Ubuntu) or ONEDNN_ROOT=DIR, then rebuild."
                );
                println!("cargo:rustc-env=MOCO_ONEDNN_MISSING={why}");
            }
        }
    }
}

/// The kernels' arithmetic as host C++, contraction off (as nvcc's `--fmad=false`).
fn host_check() {
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .flag_if_supported("-ffp-contract=off")
        .file("kernels/host_check.cpp");
    if let Err(e) = build.try_compile("moco_kernels_host") {
        panic!("moco-models: compiling kernels/host_check.cpp failed: {e}");
    }
}

/// nvcc from `NVCC`, `PATH` or `CUDA_HOME`.
fn nvcc() -> PathBuf {
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if let Some(p) = std::env::var_os("NVCC") {
        return PathBuf::from(p);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("nvcc"))
            .find(|p| p.is_file())
    });
    if let Some(p) = on_path {
        return p;
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        return Path::new(&home).join("bin/nvcc");
    }
    panic!(
        "moco-models, feature `cuda`: nvcc not found (set NVCC, put nvcc on PATH or set \
         CUDA_HOME; scripts/build-cuda.sh installs one under target/cuda-toolkit)"
    )
}

/// PTX for the loader and a cubin for the resource check, per kernel file.
fn cuda_kernels() {
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = nvcc();
    for name in CUDA_KERNELS {
        let src = format!("kernels/{name}.cu");
        println!("cargo:rerun-if-changed={src}");
        let common = |cmd: &mut Command| {
            cmd.arg(format!("--gpu-architecture=sm_{cap}"))
                .args(["-std=c++17", "-O3", "--fmad=false", "-Ikernels"])
                .arg(&src);
        };
        let ptx = out.join(format!("{name}.ptx"));
        let mut cmd = Command::new(&nvcc);
        cmd.arg("--ptx").arg("-o").arg(&ptx);
        common(&mut cmd);
        run(&mut cmd, &src);
        let mut cmd = Command::new(&nvcc);
        cmd.args(["--cubin", "-Xptxas", "-v", "-o"])
            .arg(out.join(format!("{name}.cubin")));
        common(&mut cmd);
        let report = run(&mut cmd, &src);
        std::fs::write(out.join(format!("{name}.ptxas.txt")), &report)
            .expect("writing the ptxas report into OUT_DIR");
        check_resources(&src, &report);
    }
}

/// Runs `cmd`; its stderr (ptxas's report), or a panic naming `src` with nvcc's output.
fn run(cmd: &mut Command, src: &str) -> String {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("moco-models: running {cmd:?} for {src}: {e}"));
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if !output.status.success() {
        panic!(
            "moco-models: nvcc failed on {src}:\n{}{stderr}",
            String::from_utf8_lossy(&output.stdout)
        );
    }
    stderr
}

/// Fails the build on a spill or a register count above the budget in ptxas's `-v` report.
fn check_resources(src: &str, report: &str) {
    let mut function = String::new();
    let mut seen = 0;
    for line in report.lines() {
        if let Some(at) = line.find("Compiling entry function '") {
            let rest = &line[at + "Compiling entry function '".len()..];
            function = rest.split('\'').next().unwrap_or_default().to_string();
        }
        let number_before = |unit: &str| -> Option<u32> {
            let at = line.find(unit)?;
            line[..at].split_whitespace().last()?.parse().ok()
        };
        for what in ["bytes spill stores", "bytes spill loads"] {
            if let Some(n) = number_before(what) {
                if n > 0 {
                    panic!("moco-models: {src}: {function} has {n} {what} (ptxas):\n{report}");
                }
            }
        }
        if let Some(n) = number_before("registers") {
            seen += 1;
            if n > REGISTER_BUDGET {
                panic!(
                    "moco-models: {src}: {function} uses {n} registers, above the budget of \
                     {REGISTER_BUDGET} (ptxas):\n{report}"
                );
            }
        }
    }
    if seen == 0 {
        panic!("moco-models: {src}: no register report from ptxas -v:\n{report}");
    }
}

/// Compiles the oneDNN shim; an error says why oneDNN is not usable (its headers missing).
fn onednn() -> Result<(), String> {
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .opt_level(2)
        .flag_if_supported("-fopenmp")
        // A missing header is reported once, by the caller, not as the compiler's lines.
        .cargo_warnings(false)
        .file("csrc/onednn_conv.cpp");
    if let Some(root) = std::env::var_os("ONEDNN_ROOT") {
        // ONEDNN_ROOT names the oneDNN to use: without its headers there, none (the system's
        // is not taken instead; this is also how a build without oneDNN is tried).
        let root = std::path::PathBuf::from(root);
        let header = root.join("include/oneapi/dnnl/dnnl.hpp");
        if !header.is_file() {
            return Err(format!(
                "ONEDNN_ROOT={}: no {}",
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
    if build.try_compile("moco_onednn_conv").is_err() {
        return Err("compiling csrc/onednn_conv.cpp against oneapi/dnnl/dnnl.hpp failed".into());
    }
    println!("cargo:rustc-link-lib=dylib=dnnl");
    // The shim calls omp_set_num_threads with oneDNN's OpenMP runtime (GNU's on Linux).
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-link-lib=dylib=gomp");
    }
    Ok(())
}
