//! Import of official MoCo checkpoints: `checkpoint_*.pth.tar` as facebookresearch/moco's
//! `main_moco.py` writes them (`state_dict` with `module.encoder_q.*`, `module.encoder_k.*`,
//! `module.queue`, `module.queue_ptr`, plus `optimizer`), and as facebookresearch/moco-v3's
//! does (`module.base_encoder.*`, `module.momentum_encoder.*`, `module.predictor.*`, for
//! ResNets and ViTs), in either `torch.save` serialization: the zip archive (PyTorch >= 1.6) or
//! the legacy stream of pickles that the 2020 released checkpoints use.

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
    /// MoCo v3's predictor (after the query encoder only), prefix stripped; empty for v1/v2.
    pub predictor: HashMap<String, Tensor>,
    /// The architecture and head read off the query encoder's keys and shapes.
    pub spec: EncoderSpec,
}

/// Reads the `state_dict` of a `.pth` / `.pth.tar` file (or the file itself when it is a bare
/// state dict), in either serialization, onto the CPU.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let io = |e: std::io::Error| Error::file(path, e.to_string());
    let mut head = [0u8; 4];
    let mut file = std::fs::File::open(path).map_err(io)?;
    if file.read_exact(&mut head).is_err() {
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        return Err(Error::file(
            path,
            format!("not a PyTorch checkpoint: {size} bytes (empty or cut short by an interrupted download or copy)"),
        ));
    }
    if &head == b"PK\x03\x04" {
        let bad = |e: candle_core::Error| {
            Error::file(path, format!("cannot read the PyTorch zip archive: {e}"))
        };
        let read = |p: &Path| match candle_core::pickle::read_all_with_key(p, Some("state_dict")) {
            Ok(t) => Ok(t),
            Err(e) if e.to_string().contains("not found") => candle_core::pickle::read_all(p),
            Err(e) => Err(e),
        };
        return match read(path) {
            Ok(t) => Ok(t),
            // The zip crate's archive-offset detection rejects some valid torch.save archives
            // ("Invalid Central Directory header"); they read with the offset fixed at 0. Copy
            // the entries (uncompressed, byte for byte) into a fresh archive and read that.
            Err(e) if e.to_string().contains("Zip archive") => {
                let copy = repack_zip(path)?;
                read(copy.path()).map_err(bad)
            }
            Err(e) => Err(bad(e)),
        };
    }
    let bytes = std::fs::read(path).map_err(io)?;
    read_legacy(&bytes)
        .map_err(|msg| Error::file(path, format!("cannot read the legacy PyTorch file: {msg}")))
}

/// `path`'s zip entries, read with the archive starting at byte 0, copied into a temporary zip.
fn repack_zip(path: &Path) -> Result<tempfile::NamedTempFile> {
    let fail = |e: String| Error::file(path, format!("cannot read the PyTorch zip archive: {e}"));
    let file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    let config = zip::read::Config {
        archive_offset: zip::read::ArchiveOffset::Known(0),
    };
    let mut archive =
        zip::ZipArchive::with_config(config, file).map_err(|e| fail(e.to_string()))?;
    let out = tempfile::NamedTempFile::new().map_err(|e| fail(e.to_string()))?;
    let mut writer = zip::ZipWriter::new(out.reopen().map_err(|e| fail(e.to_string()))?);
    for i in 0..archive.len() {
        let entry = archive.by_index_raw(i).map_err(|e| fail(e.to_string()))?;
        writer
            .raw_copy_file(entry)
            .map_err(|e| fail(e.to_string()))?;
    }
    writer.finish().map_err(|e| fail(e.to_string()))?;
    Ok(out)
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
    import_official_as(path, None)
}

/// [`import_official`], with the architecture named (`vit-DxNhH` gives the number of heads of
/// a ViT whose width is not a standard one); the error says when the weights are of another.
pub fn import_official_as(path: &Path, arch: Option<&str>) -> Result<OfficialCheckpoint> {
    let named = arch.map(crate::BackboneConfig::from_arch).transpose()?;
    let tensors = read_state_dict(path)?;
    if tensors.is_empty() {
        return Err(Error::file(
            path,
            "no tensors found in the checkpoint's `state_dict`",
        ));
    }
    let mut encoder_q = HashMap::new();
    let mut encoder_k = HashMap::new();
    let mut predictor = HashMap::new();
    let (mut queue, mut queue_ptr) = (None, None);
    for (name, t) in tensors {
        let key = name.strip_prefix("module.").unwrap_or(&name);
        if key.ends_with("num_batches_tracked") {
            continue;
        }
        if let Some(k) = key
            .strip_prefix("encoder_q.")
            .or_else(|| key.strip_prefix("base_encoder."))
        {
            encoder_q.insert(k.to_string(), t);
        } else if let Some(k) = key
            .strip_prefix("encoder_k.")
            .or_else(|| key.strip_prefix("momentum_encoder."))
        {
            encoder_k.insert(k.to_string(), t);
        } else if let Some(k) = key.strip_prefix("predictor.") {
            predictor.insert(k.to_string(), t);
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
                     `module.encoder_k.*`, `module.queue` and `module.queue_ptr` (v1, v2), or \
                     `module.base_encoder.*`, `module.momentum_encoder.*` and `module.predictor.*` (v3)"
                ),
            ));
        }
    }
    if encoder_q.is_empty() {
        return Err(Error::file(
            path,
            "no `module.encoder_q.*` (v1, v2) or `module.base_encoder.*` (v3) tensors: not a MoCo pretraining checkpoint",
        ));
    }
    let heads = match named {
        Some(crate::BackboneConfig::Vit(v)) => Some(v.num_heads),
        _ => None,
    };
    let spec = if encoder_q.keys().any(|k| k.starts_with("patch_embed.")) {
        detect_vit(&encoder_q, heads)
    } else {
        detect_spec(&encoder_q)
    }
    .map_err(|msg| Error::file(path, msg))?;
    if let Some(want) = named {
        let same = match (want, spec.backbone) {
            (crate::BackboneConfig::ResNet(a), crate::BackboneConfig::ResNet(b)) => {
                (a.depth, a.small) == (b.depth, b.small)
            }
            (crate::BackboneConfig::Vit(a), crate::BackboneConfig::Vit(b)) => {
                (a.embed_dim, a.depth) == (b.embed_dim, b.depth)
            }
            _ => false,
        };
        if !same {
            return Err(Error::file(
                path,
                format!(
                    "holds a {}, not a {}",
                    spec.backbone.arch(),
                    arch.unwrap_or_default()
                ),
            ));
        }
    }
    Ok(OfficialCheckpoint {
        encoder_q,
        encoder_k,
        queue,
        queue_ptr,
        predictor,
        spec,
    })
}

/// Reads the architecture and head off an encoder's tensor names and shapes. A ResNet: block
/// type from `layer1.0.conv3`, depth from the number of blocks per stage, stem from `conv1`'s
/// kernel (7: ImageNet, 3: small-image), width and input channels from `conv1`'s shape, head
/// from `fc.*` (v1 linear, v2 MLP, v3 projector). A ViT (`patch_embed.proj.weight`): see
/// [`detect_vit`].
pub fn detect_spec(t: &HashMap<String, Tensor>) -> std::result::Result<EncoderSpec, String> {
    if t.keys().any(|k| k.starts_with("patch_embed.")) {
        return detect_vit(t, None);
    }
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
    } else if let (Ok(a), Ok(b), true) = (
        dims("fc.0.weight"),
        dims("fc.3.weight"),
        t.contains_key("fc.4.running_mean"),
    ) {
        // MoCo v3's projector: Linear, BN, ReLU, Linear, BN without affine.
        HeadKind::V3 {
            hidden: a[0],
            dim: b[0],
        }
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
            "unrecognised head {fc:?}: expected `fc.weight` (v1), `fc.0.*` and `fc.2.*` (v2 MLP) or `fc.0.*`, `fc.3.*`, `fc.4.*` (v3 projector)"
        ));
    } else {
        HeadKind::None
    };
    Ok(EncoderSpec::resnet(resnet, head))
}

/// Reads a ViT's configuration and head off its tensors: width, input channels and patch size
/// from `patch_embed.proj.weight` (or, for MoCo v3's convolutional stem, from its layers
/// `patch_embed.proj.{0,3,6,...}.weight`: one halving per 3x3 layer, a 1x1 layer last), the
/// input size from `pos_embed` (1 x (1 + grid^2) x width),
/// depth from the blocks, MLP ratio from `blocks.0.mlp.fc1`, head from `head.*` (MoCo v3's
/// 3-layer projector, a linear classifier, or none). The weights do not record the number of
/// heads: `heads` when given, else MoCo v3's for the standard widths (192: 3, 384 and 768: 12,
/// 1024 and 1280: 16).
pub fn detect_vit(
    t: &HashMap<String, Tensor>,
    heads: Option<usize>,
) -> std::result::Result<EncoderSpec, String> {
    let dims = |k: &str| -> std::result::Result<Vec<usize>, String> {
        t.get(k)
            .map(|x| x.dims().to_vec())
            .ok_or_else(|| format!("missing `{k}`: not a timm VisionTransformer encoder"))
    };
    let conv_stem = t.contains_key("patch_embed.proj.0.weight");
    let (d, c, p) = if conv_stem {
        // 3x3 layers at 0, 3, 6, ... (convolution, BatchNorm, ReLU), then the 1x1 projection.
        let mut layers = 0;
        while dims(&format!("patch_embed.proj.{}.weight", 3 * layers))
            .is_ok_and(|s| s.len() == 4 && s[2..] == [3, 3])
        {
            layers += 1;
        }
        let last = format!("patch_embed.proj.{}.weight", 3 * layers);
        let lw = dims(&last)?;
        let first = dims("patch_embed.proj.0.weight")?;
        if layers == 0 || lw.len() != 4 || lw[2..] != [1, 1] || lw[0] != lw[1] {
            return Err(format!(
                "`{last}` has shape {lw:?}: expected MoCo v3's convolutional stem (3x3 layers at `patch_embed.proj.0`, `.3`, ..., then a square 1x1 projection)"
            ));
        }
        (lw[0], first[1], 1usize << layers)
    } else {
        let pw = dims("patch_embed.proj.weight")?;
        let [d, c, p, p2] = pw[..] else {
            return Err(format!(
                "`patch_embed.proj.weight` has shape {pw:?}, expected a 4-d convolution kernel"
            ));
        };
        if p != p2 {
            return Err(format!("non-square {p}x{p2} patches are not supported"));
        }
        (d, c, p)
    };
    let pe = dims("pos_embed")?;
    let tokens = pe.get(1).copied().unwrap_or(0);
    let grid = (1..=tokens).find(|g| 1 + g * g >= tokens).unwrap_or(0);
    if pe.len() != 3 || 1 + grid * grid != tokens || pe[2] != d {
        return Err(format!(
            "`pos_embed` has shape {pe:?}: expected [1, 1 + grid^2, {d}] (a class token and a square grid)"
        ));
    }
    let depth = (0..)
        .take_while(|b| t.contains_key(&format!("blocks.{b}.norm1.weight")))
        .count();
    let fc1 = dims("blocks.0.mlp.fc1.weight")?;
    let num_heads = match (heads, d) {
        (Some(h), _) => h,
        (None, 192) => 3,
        (None, 384 | 768) => 12,
        (None, 1024 | 1280) => 16,
        _ => {
            return Err(format!(
                "the weights do not say how many heads a width-{d} ViT has (known widths: 192, 384, 768, 1024, 1280): name the architecture, vit-{d}x{depth}hH"
            ))
        }
    };
    let vit = crate::vit::VitConfig {
        image_size: grid * p,
        patch_size: p,
        in_channels: c,
        embed_dim: d,
        depth,
        num_heads,
        mlp_ratio: fc1[0] / d,
        stop_grad_patch_embed: false,
        conv_stem,
    };
    vit.validate().map_err(|e| e.to_string())?;
    let head = if let (Ok(a), Ok(b), true) = (
        dims("head.0.weight"),
        dims("head.6.weight"),
        t.contains_key("head.7.running_mean"),
    ) {
        HeadKind::V3 {
            hidden: a[0],
            dim: b[0],
        }
    } else if let Ok(h) = dims("head.weight") {
        HeadKind::Linear { dim: h[0] }
    } else if t.keys().any(|k| k.starts_with("head.")) {
        let mut h: Vec<&String> = t.keys().filter(|k| k.starts_with("head.")).collect();
        h.sort();
        return Err(format!(
            "unrecognised head {h:?}: expected `head.weight` (linear) or `head.0.*` ... `head.7.*` (MoCo v3 projector)"
        ));
    } else {
        HeadKind::None
    };
    Ok(EncoderSpec {
        backbone: crate::BackboneConfig::Vit(vit),
        head,
    })
}
