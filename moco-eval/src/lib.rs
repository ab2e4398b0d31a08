//! # moco-eval
//!
//! Feature extraction, the weighted kNN monitor and the linear classification protocol.
//!
//! **Not implemented yet**: this crate only holds its place in the workspace layout. See the
//! project README for what exists today.
