//! Import of official MoCo checkpoints: `checkpoint_*.pth.tar` as facebookresearch/moco's
//! `main_moco.py` writes them (`state_dict` with `module.encoder_q.*`, `module.encoder_k.*`,
//! `module.queue`, `module.queue_ptr`, plus `optimizer`), in either `torch.save` serialization:
//! the zip archive (PyTorch >= 1.6) or the legacy stream of pickles that the 2020 released
//! checkpoints use.

use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::path::Path;

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};

use crate::head::HeadKind;
use crate::resnet::{Depth, ResNetConfig};
use crate::{EncoderSpec, Error, Result};

/// The tensors of an official checkpoint, split by role.
#[derive(Debug)]
pub struct OfficialCheckpoint {
    /// Query encoder (backbone + head), prefix stripped, `num_batches_tracked` dropped.
    pub encoder_q: HashMap<String, Tensor>,
    /// Key encoder, likewise.
    pub encoder_k: HashMap<String, Tensor>,
    /// The C x K queue, when present.
    pub queue: Option<Tensor>,
    /// The queue pointer, when present.
    pub queue_ptr: Option<usize>,
    /// The architecture and head read off the query encoder's keys and shapes.
    pub spec: EncoderSpec,
}

/// Reads the `state_dict` of a `.pth` / `.pth.tar` file (or the file itself when it is a bare
/// state dict), in either serialization, onto the CPU.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let io = |e: std::io::Error| Error::file(path, e.to_string());
    let mut head = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(io)?;
    if &head == b"PK\x03\x04" {
        let bad = |e: candle_core::Error| {
            Error::file(path, format!("cannot read the PyTorch zip archive: {e}"))
        };
        return match candle_core::pickle::read_all_with_key(path, Some("state_dict")) {
            Ok(t) => Ok(t),
            Err(e) if e.to_string().contains("not found") => {
                candle_core::pickle::read_all(path).map_err(bad)
            }
            Err(e) => Err(bad(e)),
        };
    }
    let bytes = std::fs::read(path).map_err(io)?;
    read_legacy(&bytes)
        .map_err(|msg| Error::file(path, format!("cannot read the legacy PyTorch file: {msg}")))
}

// The legacy format (torch.serialization._legacy_save): pickles of the magic number, the protocol
// version, system info, the object (storages as persistent ids), the sorted storage keys; then
// for each key an int64 element count followed by the raw little-endian data.
fn read_legacy(bytes: &[u8]) -> std::result::Result<Vec<(String, Tensor)>, String> {
    // Pickle protocol 2: PROTO 2, LONG1 of 10 bytes (0x1950a86a20f9469cfc6c), STOP.
    const MAGIC: [u8; 15] = [
        0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e,
    ];
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
        return Err(
            "not a PyTorch checkpoint (neither a zip archive nor the legacy magic number)".into(),
        );
    }
    let mut cur = Cursor::new(&bytes[MAGIC.len()..]);
    let mut next = |what: &str| -> std::result::Result<Object, String> {
        let mut stack = Stack::empty();
        stack
            .read_loop(&mut cur)
            .and_then(|_| stack.finalize())
            .map_err(|e| format!("{what}: {e}"))
    };
    let protocol = next("protocol version")?;
    if protocol != Object::Int(1001) {
        return Err(format!("unsupported legacy protocol version {protocol:?}"));
    }
    let sys_info = next("system info")?;
    if let Object::Dict(items) = &sys_info {
        let big_endian = items.iter().any(|(k, v)| {
            *k == Object::Unicode("little_endian".into()) && *v == Object::Bool(false)
        });
        if big_endian {
            return Err("big-endian checkpoints are not supported".into());
        }
    }
    let object = next("checkpoint object")?;
    let keys = match next("storage keys")? {
        Object::List(k) => k
            .into_iter()
            .map(|k| k.unicode().map_err(|o| format!("storage key {o:?}")))
            .collect::<std::result::Result<Vec<_>, _>>()?,
        other => return Err(format!("storage keys: expected a list, got {other:?}")),
    };
    let mut pos = MAGIC.len() + cur.position() as usize;
    // Raw storages in key order, each: int64 element count, then the data (element size from
    // the tensors that use it).
    let mut storages: HashMap<String, (usize, usize)> = HashMap::new(); // key -> (start, numel)
    let infos = state_dict_infos(object)?;
    let elem_size: HashMap<&str, usize> = infos
        .iter()
        .map(|(_, i)| (i.path.trim_start_matches('/'), i.dtype.size_in_bytes()))
        .collect();
    for key in &keys {
        let count = bytes
            .get(pos..pos + 8)
            .ok_or("truncated file: storage header missing")?;
        let numel = i64::from_le_bytes(count.try_into().map_err(|_| "bad header")?) as usize;
        let size = elem_size.get(key.as_str()).copied().unwrap_or(4);
        let start = pos + 8;
        pos = start + numel * size;
        if pos > bytes.len() {
            return Err(format!(
                "truncated file: storage `{key}` needs {} bytes",
                numel * size
            ));
        }
        storages.insert(key.clone(), (start, numel));
    }
    let mut out = vec![];
    for (name, info) in infos {
        let key = info.path.trim_start_matches('/');
        let (start, numel) = *storages
            .get(key)
            .ok_or_else(|| format!("tensor `{name}`: storage `{key}` missing"))?;
        let layout = &info.layout;
        if !layout.is_contiguous() {
            return Err(format!("tensor `{name}` is not contiguous"));
        }
        let es = info.dtype.size_in_bytes();
        let n = layout.shape().elem_count();
        let off = layout.start_offset(); // bytes
        if off / es + n > numel {
            return Err(format!("tensor `{name}` reaches past its storage"));
        }
        let data = &bytes[start + off..start + off + n * es];
        let t = Tensor::from_raw_buffer(data, info.dtype, layout.dims(), &Device::Cpu)
            .map_err(|e| format!("tensor `{name}`: {e}"))?;
        out.push((name, t));
    }
    Ok(out)
}

// The tensor entries of the checkpoint's `state_dict` (or of the object itself when it is the
// state dict).
fn state_dict_infos(
    object: Object,
) -> std::result::Result<Vec<(String, candle_core::pickle::TensorInfo)>, String> {
    let items = match object {
        Object::Dict(items) => items,
        other => {
            return Err(format!(
                "expected a dict at the top level, got {}",
                kind(&other)
            ))
        }
    };
    let state_key = Object::Unicode("state_dict".into());
    let items = match items.iter().position(|(k, _)| *k == state_key) {
        Some(i) => match items.into_iter().nth(i).map(|(_, v)| v) {
            Some(Object::Dict(sd)) => sd,
            // `collections.OrderedDict` with its items in a BUILD.
            Some(Object::Build { args, .. }) => match *args {
                Object::Dict(sd) => sd,
                other => return Err(format!("`state_dict` is a {}", kind(&other))),
            },
            Some(other) => return Err(format!("`state_dict` is a {}", kind(&other))),
            None => unreachable!("position found"),
        },
        None => items,
    };
    let mut out = vec![];
    for (k, v) in items {
        let name = match &k {
            Object::Unicode(s) => s.clone(),
            _ => continue,
        };
        match v.into_tensor_info(k, Path::new("")) {
            Ok(Some(info)) => out.push((name, info)),
            Ok(None) => {}
            Err(e) => return Err(format!("tensor `{name}`: {e}")),
        }
    }
    Ok(out)
}

fn kind(o: &Object) -> &'static str {
    match o {
        Object::Dict(_) => "dict",
        Object::List(_) => "list",
        Object::Tuple(_) => "tuple",
        Object::Reduce { .. } | Object::Build { .. } => "object",
        _ => "scalar",
    }
}

/// Splits an official checkpoint's state dict into encoders and queue, strips the `module.`
/// prefix (DistributedDataParallel / DataParallel) and detects the architecture.
pub fn import_official(path: &Path) -> Result<OfficialCheckpoint> {
    let tensors = read_state_dict(path)?;
    if tensors.is_empty() {
        return Err(Error::file(
            path,
            "no tensors found in the checkpoint's `state_dict`",
        ));
    }
    let mut encoder_q = HashMap::new();
    let mut encoder_k = HashMap::new();
    let (mut queue, mut queue_ptr) = (None, None);
    for (name, t) in tensors {
        let key = name.strip_prefix("module.").unwrap_or(&name);
        if key.ends_with("num_batches_tracked") {
            continue;
        }
        if let Some(k) = key.strip_prefix("encoder_q.") {
            encoder_q.insert(k.to_string(), t);
        } else if let Some(k) = key.strip_prefix("encoder_k.") {
            encoder_k.insert(k.to_string(), t);
        } else if key == "queue" {
            queue = Some(t);
        } else if key == "queue_ptr" {
            let v = t.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()?;
            queue_ptr = v.first().map(|&p| p.max(0) as usize);
        } else {
            return Err(Error::file(
                path,
                format!(
                    "unexpected key `{name}`: an official MoCo checkpoint holds `module.encoder_q.*`, \
                     `module.encoder_k.*`, `module.queue` and `module.queue_ptr`"
                ),
            ));
        }
    }
    if encoder_q.is_empty() {
        return Err(Error::file(
            path,
            "no `module.encoder_q.*` tensors: not a MoCo pretraining checkpoint",
        ));
    }
    let spec = detect_spec(&encoder_q).map_err(|msg| Error::file(path, msg))?;
    Ok(OfficialCheckpoint {
        encoder_q,
        encoder_k,
        queue,
        queue_ptr,
        spec,
    })
}

/// Reads the architecture and head off an encoder's tensor names and shapes: block type from
/// `layer1.0.conv3`, depth from the number of blocks per stage, stem from `conv1`'s kernel
/// (7: ImageNet, 3: small-image), width and input channels from `conv1`'s shape, head from `fc.*`.
pub fn detect_spec(t: &HashMap<String, Tensor>) -> std::result::Result<EncoderSpec, String> {
    let dims = |k: &str| -> std::result::Result<Vec<usize>, String> {
        t.get(k)
            .map(|x| x.dims().to_vec())
            .ok_or_else(|| format!("missing `{k}`: not a torchvision ResNet encoder"))
    };
    let conv1 = dims("conv1.weight")?;
    if conv1.len() != 4 {
        return Err(format!(
            "`conv1.weight` has shape {conv1:?}, expected a 4-d convolution kernel"
        ));
    }
    let (width, in_channels, k) = (conv1[0], conv1[1], conv1[2]);
    let small = match k {
        7 => false,
        3 => true,
        _ => return Err(format!("`conv1.weight` has a {k}x{k} kernel; expected 7x7 (ImageNet stem) or 3x3 (small-image stem)")),
    };
    let bottleneck = t.contains_key("layer1.0.conv3.weight");
    let blocks: Vec<usize> = (1..=4)
        .map(|l| {
            (0..)
                .take_while(|b| t.contains_key(&format!("layer{l}.{b}.conv1.weight")))
                .count()
        })
        .collect();
    let depth = match (bottleneck, blocks.as_slice()) {
        (false, [2, 2, 2, 2]) => Depth::R18,
        (false, [3, 4, 6, 3]) => Depth::R34,
        (true, [3, 4, 6, 3]) => Depth::R50,
        (true, [3, 4, 23, 3]) => Depth::R101,
        (true, [3, 8, 36, 3]) => Depth::R152,
        _ => {
            return Err(format!(
                "blocks per stage {blocks:?} ({} blocks) match no ResNet-18/34/50/101/152",
                if bottleneck { "bottleneck" } else { "basic" }
            ))
        }
    };
    let resnet = ResNetConfig {
        depth,
        small,
        in_channels,
        width,
        zero_init_residual: false,
        bn_splits: 1,
    };
    let feat = resnet.feature_dim();
    let head = if let Ok(fc) = dims("fc.weight") {
        HeadKind::Linear { dim: fc[0] }
    } else if let (Ok(a), Ok(b)) = (dims("fc.0.weight"), dims("fc.2.weight")) {
        if a != [feat, feat] {
            return Err(format!(
                "`fc.0.weight` has shape {a:?}, expected [{feat}, {feat}] for the MoCo v2 MLP head"
            ));
        }
        HeadKind::Mlp { dim: b[0] }
    } else if t.keys().any(|k| k.starts_with("fc.")) {
        let mut fc: Vec<&String> = t.keys().filter(|k| k.starts_with("fc.")).collect();
        fc.sort();
        return Err(format!(
            "unrecognised head {fc:?}: expected `fc.weight` (v1) or `fc.0.*` and `fc.2.*` (v2 MLP)"
        ));
    } else {
        HeadKind::None
    };
    Ok(EncoderSpec::resnet(resnet, head))
}
