//! Import of official MoCo checkpoints.
