//! Helpers for the end-to-end tests in this folder (`cargo test -p moco-tests`).

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// A `Command` for the `moco` binary, built in release mode on first use (a no-op when it is up
/// to date).
pub fn moco() -> Command {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    let path = BIN.get_or_init(|| {
        escargot::CargoBuild::new()
            .package("moco-cli")
            .bin("moco")
            .release()
            .run()
            .unwrap_or_else(|e| panic!("building the moco binary failed: {e}"))
            .path()
            .to_path_buf()
    });
    Command::new(path)
}

/// `tests/reference/<name>`.
pub fn reference(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("reference")
        .join(name)
}
