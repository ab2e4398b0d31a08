//! TensorBoard event files: [`EventLog`] writes the scalars of a run's records into
//! `events.out.tfevents.*` files of a folder, which `tensorboard --logdir` reads.
//!
//! The format is TensorFlow's record file: each record is the little-endian `u64` length of
//! its data, the masked CRC-32C of those 8 bytes, the data, and the masked CRC-32C of the data;
//! the data is a serialized `tensorflow.Event` protocol buffer (`event.proto`, `summary.proto`):
//! the first of a file names the format (`file_version: "brain.Event:2"`), the others hold a
//! `Summary` of `simple_value` scalars at a step. Only those fields are written (and read
//! back); the messages below give them their proto field numbers.
//!
//! A resumed run continues at its checkpoint's step, which may be earlier than the last
//! events a killed process wrote: [`EventLog::open`] first drops the events past that step
//! from the folder's files (as `metrics.jsonl` drops its lines), so a curve never holds two
//! values for one step.

use std::io::Write;
use std::path::{Path, PathBuf};

use prost::Message;

use crate::error::{Error, Result};

/// `tensorflow.Event`, the fields this writer uses.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    /// Seconds since the Unix epoch.
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    /// The training step.
    #[prost(int64, tag = "2")]
    pub step: i64,
    /// `"brain.Event:2"` in a file's first event (a member of the `what` oneof).
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    /// The scalars (a member of the `what` oneof).
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Summary {
    /// The values.
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value` with a `simple_value`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SummaryValue {
    /// The curve's name.
    #[prost(string, tag = "1")]
    pub tag: String,
    /// The value (a member of the `value` oneof).
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

/// The version string of a file's first event, as TensorFlow and PyTorch write it.
const FILE_VERSION: &str = "brain.Event:2";

/// What names an event file (`tensorboard` reads the files whose names contain it).
const FILE_MARK: &str = "tfevents";

/// TensorFlow's masked CRC-32C of `bytes`.
fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c::crc32c(bytes);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// `event` as one record of the file format.
fn record(event: &Event) -> Vec<u8> {
    let data = event.encode_to_vec();
    let len = (data.len() as u64).to_le_bytes();
    let mut r = Vec::with_capacity(data.len() + 16);
    r.extend_from_slice(&len);
    r.extend_from_slice(&masked_crc(&len).to_le_bytes());
    r.extend_from_slice(&data);
    r.extend_from_slice(&masked_crc(&data).to_le_bytes());
    r
}

/// The events of a file's bytes, in order, with the length of the bytes they span: reading
/// stops at a record cut short by a kill (the rest is not an event), and a record whose
/// checksums do not match is an error naming `path`.
pub fn read_events(path: &Path, bytes: &[u8]) -> Result<(Vec<Event>, usize)> {
    let bad = |at: usize, what: &str| Error::File {
        path: path.to_path_buf(),
        msg: format!("TensorBoard record at byte {at}: {what}"),
    };
    let (mut events, mut at) = (vec![], 0);
    while bytes.len() - at >= 12 {
        let len_bytes = &bytes[at..at + 8];
        let crc =
            u32::from_le_bytes([bytes[at + 8], bytes[at + 9], bytes[at + 10], bytes[at + 11]]);
        if masked_crc(len_bytes) != crc {
            return Err(bad(at, "the length's checksum does not match"));
        }
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap_or([0; 8])) as usize;
        let end = match (at + 12).checked_add(len).and_then(|e| e.checked_add(4)) {
            Some(end) if end <= bytes.len() => end,
            _ => break, // cut short
        };
        let data = &bytes[at + 12..end - 4];
        let crc = u32::from_le_bytes([
            bytes[end - 4],
            bytes[end - 3],
            bytes[end - 2],
            bytes[end - 1],
        ]);
        if masked_crc(data) != crc {
            return Err(bad(at, "the data's checksum does not match"));
        }
        let event = Event::decode(data).map_err(|e| bad(at, &format!("not an Event: {e}")))?;
        events.push(event);
        at = end;
    }
    Ok((events, at))
}

/// The event files of `dir`, sorted by name (their names begin with the time they were made).
pub fn event_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let listing = match std::fs::read_dir(dir) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut files: Vec<PathBuf> = listing
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("events.out.") && n.contains(FILE_MARK))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// A folder of TensorBoard event files, open for appending scalars.
#[derive(Debug)]
pub struct EventLog {
    file: std::fs::File,
    path: PathBuf,
}

impl EventLog {
    /// Opens `dir` (made if missing) for a run that continues after step `step`: events past
    /// it are removed from the files already there (each rewritten atomically; a record cut
    /// short by a kill goes too), then a new file is started for this process.
    pub fn open(dir: &Path, step: u64) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        for f in event_files(dir)? {
            let bytes = std::fs::read(&f).map_err(|e| Error::io(&f, e))?;
            let (events, used) = read_events(&f, &bytes)?;
            let keep: Vec<&Event> = events
                .iter()
                .filter(|e| e.summary.is_none() || e.step <= step as i64)
                .collect();
            if keep.len() < events.len() || used < bytes.len() {
                let body: Vec<u8> = keep.into_iter().flat_map(record).collect();
                moco_core::io::write_atomic(&f, &body)?;
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        // The time first, as TensorFlow's names (the files sort by it), to the nanosecond;
        // then the process.
        let name = format!(
            "events.out.{FILE_MARK}.{:010}.{:09}.moco-rs.{}",
            now.as_secs(),
            now.subsec_nanos(),
            std::process::id()
        );
        let path = dir.join(name);
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let mut log = Self { file, path };
        log.write(&Event {
            wall_time: now.as_secs_f64(),
            step: step as i64,
            file_version: Some(FILE_VERSION.into()),
            summary: None,
        })?;
        Ok(log)
    }

    /// The file this process writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, event: &Event) -> Result<()> {
        self.file
            .write_all(&record(event))
            .and_then(|_| self.file.flush())
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Writes `scalars` (tag, value) at `step`, now; nothing when there are none.
    pub fn scalars(&mut self, step: u64, scalars: &[(&str, f64)]) -> Result<()> {
        if scalars.is_empty() {
            return Ok(());
        }
        let wall_time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        self.write(&Event {
            wall_time,
            step: step as i64,
            file_version: None,
            summary: Some(Summary {
                value: scalars
                    .iter()
                    .map(|(tag, v)| SummaryValue {
                        tag: tag.to_string(),
                        simple_value: Some(*v as f32),
                    })
                    .collect(),
            }),
        })
    }

    /// Writes the numbers of a metrics record (a JSON object with `step`) as scalars at its
    /// step, named by their keys; `epoch` and `step` themselves are the axes, not curves, and
    /// records of an `event` (such as `collapse`) are not curves either.
    pub fn record(&mut self, record: &serde_json::Value) -> Result<()> {
        let (Some(obj), Some(step)) = (record.as_object(), record["step"].as_u64()) else {
            return Ok(());
        };
        if obj.contains_key("event") {
            return Ok(());
        }
        let scalars: Vec<(&str, f64)> = obj
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "epoch" | "step"))
            .filter_map(|(k, v)| Some((k.as_str(), v.as_f64()?)))
            .collect();
        self.scalars(step, &scalars)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every scalar of the folder's files: (tag, step, value), in file and record order.
    fn scalars_in(dir: &Path) -> Vec<(String, i64, f32)> {
        let mut out = vec![];
        for f in event_files(dir).unwrap() {
            let bytes = std::fs::read(&f).unwrap();
            let (events, used) = read_events(&f, &bytes).unwrap();
            assert_eq!(used, bytes.len(), "{}: a partial record", f.display());
            assert_eq!(events[0].file_version.as_deref(), Some(FILE_VERSION));
            for e in &events {
                for v in e.summary.iter().flat_map(|s| &s.value) {
                    out.push((v.tag.clone(), e.step, v.simple_value.unwrap()));
                }
            }
        }
        out
    }

    #[test]
    fn the_masked_crc_is_tensorflows() {
        // CRC-32C("123456789") = 0xE3069283 (the standard check value), then TensorFlow's
        // mask: rotate right by 15, add 0xa282ead8.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        let masked = 0xe306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8);
        assert_eq!(masked_crc(b"123456789"), masked);
    }

    #[test]
    fn records_read_back_and_a_resume_drops_the_events_past_its_step() {
        let dir = tempfile::tempdir().unwrap();
        let tb = dir.path().join("tb");
        let mut log = EventLog::open(&tb, 0).unwrap();
        for step in 1..=5u64 {
            log.record(
                &serde_json::json!({"epoch": 0, "step": step, "loss": step as f64, "lr": 0.5}),
            )
            .unwrap();
        }
        log.record(&serde_json::json!({"step": 5, "event": "collapse", "records_in_a_row": 3}))
            .unwrap();
        log.record(&serde_json::json!({"epoch": 0, "step": 5, "knn_top1": 61.5}))
            .unwrap();
        let first = log.path().to_path_buf();
        drop(log);
        let got = scalars_in(&tb);
        assert_eq!(got.len(), 11, "{got:?}");
        assert!(got.contains(&("knn_top1".into(), 5, 61.5)));
        assert!(!got
            .iter()
            .any(|(t, _, _)| t == "epoch" || t == "step" || t == "records_in_a_row"));

        // A kill in the middle of a write leaves part of a record: it is dropped with the
        // events past the checkpoint's step when the run resumes at step 3.
        let mut bytes = std::fs::read(&first).unwrap();
        bytes.extend_from_slice(
            &record(&Event {
                wall_time: 0.0,
                step: 6,
                file_version: None,
                summary: None,
            })[..9],
        );
        std::fs::write(&first, &bytes).unwrap();
        let mut log = EventLog::open(&tb, 3).unwrap();
        log.record(&serde_json::json!({"step": 4, "loss": 40.0}))
            .unwrap();
        let got = scalars_in(&tb);
        let loss: Vec<(i64, f32)> = got
            .iter()
            .filter(|(t, _, _)| t == "loss")
            .map(|(_, s, v)| (*s, *v))
            .collect();
        assert_eq!(loss, [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]);
        assert!(!got.iter().any(|(t, _, _)| t == "knn_top1"));
    }

    #[test]
    fn a_corrupt_record_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path(), 0).unwrap();
        let path = log.path().to_path_buf();
        drop(log);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let e = EventLog::open(dir.path(), 0).unwrap_err().to_string();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("checksum"),
            "{e}"
        );
    }
}
