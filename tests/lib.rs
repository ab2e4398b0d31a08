//! End-to-end tests of the moco-rs workspace live in this folder as `[[test]]` targets
//! (`cargo test -p moco-tests`); this library is empty on purpose.
