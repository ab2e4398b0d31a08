//! # moco-data
//!
//! Datasets (idx/MNIST-style, CIFAR binary, STL-10, ImageFolder) and MoCo's augmentation pipeline.
//!
//! **Not implemented yet**: this crate only holds its place in the workspace layout. See the
//! project README for what exists today.
