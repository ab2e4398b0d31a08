//! Safetensors files written atomically and read with errors that name the file and the key.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// Named tensors plus the string metadata of a safetensors file.
#[derive(Debug, Default)]
pub struct TensorFile {
    /// Tensors by name.
    pub tensors: HashMap<String, Tensor>,
    /// The `__metadata__` table (empty when the file has none).
    pub metadata: HashMap<String, String>,
    /// Where the file was read from, for error messages.
    pub path: PathBuf,
}

impl TensorFile {
    /// Removes and returns tensor `key`, or an error naming the key and the file.
    pub fn take(&mut self, key: &str) -> Result<Tensor> {
        self.tensors
            .remove(key)
            .ok_or_else(|| Error::file(&self.path, format!("no tensor named `{key}` in this file")))
    }

    /// Metadata value `key`, or an error naming the key and the file.
    pub fn meta(&self, key: &str) -> Result<&str> {
        self.metadata
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| Error::file(&self.path, format!("no metadata key `{key}` in this file")))
    }
}

/// Writes `tensors` (and `metadata`) to `path` atomically: the bytes go to a temporary file in the
/// same folder, which is flushed to disk and then renamed over `path`. A reader (or a process
/// killed half-way) sees either the old file or the new one, never a truncated mix.
pub fn save_atomic(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), metadata)
        .map_err(|e| Error::file(path, format!("cannot serialize tensors: {e}")))?;
    write_atomic(path, &bytes)
}

/// What names a temporary file of [`write_atomic`]: `.NAME.tmp-PID` next to `NAME`.
const TEMP_MARK: &str = ".tmp-";

/// Whether `name` is that of a temporary file [`write_atomic`] writes (`.NAME.tmp-PID`): one
/// left behind by a process killed during a write. Only a process that owns the folder (a run's
/// lock) may remove them.
pub fn is_temp_file_name(name: &str) -> bool {
    name.starts_with('.')
        && name.rsplit_once(TEMP_MARK).is_some_and(|(stem, pid)| {
            stem.len() > 1 && !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit())
        })
}

/// The `__metadata__` table of a safetensors file, read from its header alone (the tensors are
/// not read). The error names the file: missing, empty, truncated or not a safetensors file.
pub fn read_metadata(path: &Path) -> Result<HashMap<String, String>> {
    use std::io::Read;
    let bad = |msg: String| Error::file(path, msg);
    let mut f = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| {
        bad(format!(
            "not a safetensors file: {size} bytes, shorter than its 8-byte header length"
        ))
    })?;
    let n = u64::from_le_bytes(n);
    if n > size.saturating_sub(8) || n > 100_000_000 {
        return Err(bad(format!(
            "not a safetensors file (or truncated): its header claims {n} bytes, the file has {size}"
        )));
    }
    let mut json = vec![0u8; n as usize];
    f.read_exact(&mut json)
        .map_err(|e| bad(format!("cannot read the header: {e}")))?;
    let header: serde_json::Value = serde_json::from_slice(&json).map_err(|e| {
        bad(format!(
            "not a safetensors file: its header is not JSON ({e})"
        ))
    })?;
    Ok(header["__metadata__"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default())
}

/// Writes `bytes` to `path` through a temporary file and a rename (see [`save_atomic`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::file(path, "not a file path"))?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}{TEMP_MARK}{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// Reads every tensor of a safetensors file onto `device`.
pub fn load(path: &Path, device: &Device) -> Result<TensorFile> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::file(path, format!("not a valid safetensors file: {e}")))?;
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        let t = view
            .load(device)
            .map_err(|e| Error::file(path, format!("cannot load tensor `{name}`: {e}")))?;
        tensors.insert(name, t);
    }
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::file(path, format!("not a valid safetensors file: {e}")))?;
    Ok(TensorFile {
        tensors,
        metadata: header.metadata().clone().unwrap_or_default(),
        path: path.to_path_buf(),
    })
}

/// The name of the first floating-point tensor of `tensors`, in the order given, that holds a
/// NaN or an infinity, or `None`. One read-back for all of them: `sum(t * 0)` is 0 for a finite
/// tensor and NaN otherwise.
pub fn first_non_finite<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a Tensor)>,
) -> Result<Option<String>> {
    let floats: Vec<(&str, &Tensor)> = tensors
        .into_iter()
        .filter(|(_, t)| t.dtype().is_float())
        .collect();
    if floats.is_empty() {
        return Ok(None);
    }
    let probes = floats
        .iter()
        .map(|(_, t)| Ok((*t * 0.0)?.sum_all()?.to_dtype(candle_core::DType::F32)?))
        .collect::<Result<Vec<_>>>()?;
    let sums = Tensor::stack(&probes, 0)?
        .to_device(&Device::Cpu)?
        .to_vec1::<f32>()?;
    Ok(floats
        .iter()
        .zip(sums)
        .find(|(_, s)| !s.is_finite())
        .map(|((name, _), _)| name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_file_names_are_those_write_atomic_writes() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(&dir.path().join("a.json"), b"{}").unwrap();
        let written = format!(".a.json{TEMP_MARK}{}", std::process::id());
        assert!(is_temp_file_name(&written));
        for name in [
            "a.json",
            ".a.json",
            ".tmp-12",
            ".a.json.tmp-",
            ".a.json.tmp-12x",
            "a.json.tmp-12",
        ] {
            assert!(!is_temp_file_name(name), "{name}");
        }
    }

    #[test]
    fn metadata_is_read_from_the_header_and_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ck.safetensors");
        let t = Tensor::zeros(3, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let meta = HashMap::from([("config".to_string(), "{\"a\":1}".to_string())]);
        save_atomic(
            &path,
            &BTreeMap::from([("w".to_string(), t)]),
            Some(meta.clone()),
        )
        .unwrap();
        assert_eq!(read_metadata(&path).unwrap(), meta);
        let whole = std::fs::read(&path).unwrap();
        for (bytes, says) in [
            (&b""[..], "shorter than its 8-byte header"),
            (&whole[..20], "truncated"),
            (&b"\x04\0\0\0\0\0\0\0nope"[..], "not JSON"),
        ] {
            std::fs::write(&path, bytes).unwrap();
            let e = read_metadata(&path).unwrap_err().to_string();
            assert!(e.contains("ck.safetensors") && e.contains(says), "{e}");
        }
        let e = read_metadata(&dir.path().join("missing")).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
