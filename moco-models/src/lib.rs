//! # moco-models
//!
//! The backbone zoo (ResNet family with torchvision names, small-image variants) and MoCo heads.
//!
//! **Not implemented yet**: this crate only holds its place in the workspace layout. See the
//! project README for what exists today.
