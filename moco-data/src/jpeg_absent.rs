//! The stand-in for `jpeg.rs` in builds without the `libjpeg` feature: no file takes the
//! libjpeg path, so the `image` crate decodes every JPEG (within a few levels of PIL).

use std::path::Path;

use crate::Result;

/// Never: this build decodes JPEGs with the `image` crate.
pub(crate) fn is_jpeg(_bytes: &[u8]) -> bool {
    false
}

/// Never called (see [`is_jpeg`]): `Ok(None)`, the `image` crate decodes.
pub(crate) fn decode_rgb(_bytes: &[u8], _name: &Path) -> Result<Option<(usize, usize, Vec<u8>)>> {
    Ok(None)
}
