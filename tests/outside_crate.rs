//! A crate outside this workspace builds against moco-core with crates.io's candle-core, without
//! the workspace's vendored candle-core (`[patch.crates-io]` applies to this workspace only):
//! its `src/main.rs` is `moco-core/examples/outside_encoder.rs`, an encoder of its own around
//! `Moco`. Type-checked (`cargo check`) in `target/outside-crate`, kept between runs.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::path::PathBuf;
use std::process::Command;

#[test]
fn an_outside_crate_builds_against_moco_core_and_crates_io_candle() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let root = root.canonicalize().unwrap();
    let krate = root.join("target/outside-crate");
    std::fs::create_dir_all(krate.join("src")).unwrap();
    let manifest = format!(
        r#"[package]
name = "moco-outside-user"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
moco-core = {{ path = "{}" }}
candle-core = "0.11.1"
candle-nn = "0.11.1"

# Not a member of the moco-rs workspace: its patch of candle-core does not apply.
[workspace]
"#,
        root.join("moco-core").display()
    );
    std::fs::write(krate.join("Cargo.toml"), manifest).unwrap();
    std::fs::copy(
        root.join("moco-core/examples/outside_encoder.rs"),
        krate.join("src/main.rs"),
    )
    .unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["check", "--quiet", "--manifest-path"])
        .arg(krate.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", krate.join("target"))
        .env_remove("RUSTFLAGS")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo check of the outside crate failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The candle-core it built against is crates.io's, not the vendored copy.
    let lock = std::fs::read_to_string(krate.join("Cargo.lock")).unwrap();
    let entry = lock
        .split("[[package]]")
        .find(|p| p.contains("name = \"candle-core\""))
        .unwrap();
    assert!(
        entry.contains("source = \"registry+"),
        "candle-core does not come from crates.io:\n{entry}"
    );
}
