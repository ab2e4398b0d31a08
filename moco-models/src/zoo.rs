//! The names of the architectures in the zoo, and the error for a name that is not one.

use crate::Error;

/// Every architecture name `--arch` accepts (besides the custom ViT names `vit-DxNhH` and
/// `vit-conv-DxNhH`).
pub const ARCH_NAMES: [&str; 13] = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnet18-small",
    "resnet34-small",
    "resnet50-small",
    "vit_tiny",
    "vit_small",
    "vit_base",
    "vit_conv_small",
    "vit_conv_base",
];

/// [`Error::UnknownArch`] for `name`, listing the zoo.
pub(crate) fn unknown_arch(name: &str) -> Error {
    Error::UnknownArch {
        name: name.to_string(),
        known: ARCH_NAMES.join(", "),
    }
}
