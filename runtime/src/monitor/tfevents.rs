//! TensorBoard event files, written by hand: the format is two small layers.
//!
//! Framing (TFRecord): each record is
//! `len: u64 LE | masked_crc32c(len bytes): u32 LE | data | masked_crc32c(data): u32 LE`,
//! with `masked(c) = ((c >> 15) | (c << 17)) + 0xa282_ead8` (wrapping).
//!
//! Payload: a serialized `tensorflow.Event` protobuf. The fields used here:
//! ```text
//! Event        { double wall_time = 1; int64 step = 2; string file_version = 3;
//!                Summary summary = 5; SessionLog session_log = 7; }
//! SessionLog   { SessionStatus status = 1; }            // START = 1
//! Summary      { repeated Value value = 1; }
//! Value        { string tag = 1; float simple_value = 2; TensorProto tensor = 8;
//!                SummaryMetadata metadata = 9; }
//! SummaryMetadata { PluginData plugin_data = 1; }  PluginData { string plugin_name = 1; }
//! TensorProto  { DataType dtype = 1; TensorShapeProto tensor_shape = 2; repeated bytes string_val = 8; }
//! ```
//! Protobuf wire format: a key is the varint `field << 3 | wire_type`, with wire types
//! 0 = varint, 1 = 8-byte little-endian, 2 = length-delimited (varint length, then bytes),
//! 5 = 4-byte little-endian.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), table driven.
pub(crate) fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { (c >> 1) ^ 0x82F6_3B78 } else { c >> 1 };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The CRC as TFRecord stores it: rotated and offset, so that a CRC over data that itself
/// contains CRCs does not degenerate.
pub(crate) fn masked_crc32c(data: &[u8]) -> u32 {
    let c = crc32c(data);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: length, its masked CRC, the data, the data's masked CRC.
pub(crate) fn frame_record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

// ---- protobuf encoding -------------------------------------------------------------------

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_key(out: &mut Vec<u8>, field: u32, wire_type: u8) {
    put_varint(out, ((field as u64) << 3) | wire_type as u64);
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_f64(out: &mut Vec<u8>, field: u32, v: f64) {
    put_key(out, field, 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_f32(out: &mut Vec<u8>, field: u32, v: f32) {
    put_key(out, field, 5);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_uint(out: &mut Vec<u8>, field: u32, v: u64) {
    put_key(out, field, 0);
    put_varint(out, v);
}

/// `Event { wall_time, step, ... }` with the given extra fields already encoded.
fn event(wall_time: f64, step: Option<u64>, rest: &[u8]) -> Vec<u8> {
    let mut ev = Vec::with_capacity(rest.len() + 20);
    put_f64(&mut ev, 1, wall_time);
    if let Some(step) = step {
        put_uint(&mut ev, 2, step);
    }
    ev.extend_from_slice(rest);
    ev
}

/// The first record of every event file: `Event { wall_time, file_version: "brain.Event:2" }`.
pub(crate) fn file_version_event(wall_time: f64) -> Vec<u8> {
    let mut rest = Vec::new();
    put_bytes(&mut rest, 3, b"brain.Event:2");
    event(wall_time, None, &rest)
}

/// `Event { wall_time, step, session_log: { status: START } }`. TensorBoard reads a START at
/// step `s` as "the run restarted here" and drops already-loaded points with step >= `s`.
pub(crate) fn session_start_event(wall_time: f64, step: u64) -> Vec<u8> {
    let mut log = Vec::new();
    put_uint(&mut log, 1, 1);
    let mut rest = Vec::new();
    put_bytes(&mut rest, 7, &log); // 6 is the deprecated log_message
    event(wall_time, Some(step), &rest)
}

/// `Event { wall_time, step, summary: { value: [{ tag, simple_value }, ...] } }`.
pub(crate) fn scalars_event(wall_time: f64, step: u64, scalars: &[(String, f64)]) -> Vec<u8> {
    let mut summary = Vec::new();
    for (tag, v) in scalars {
        let mut value = Vec::new();
        put_bytes(&mut value, 1, tag.as_bytes());
        put_f32(&mut value, 2, *v as f32);
        put_bytes(&mut summary, 1, &value);
    }
    let mut rest = Vec::new();
    put_bytes(&mut rest, 5, &summary);
    event(wall_time, Some(step), &rest)
}

/// A text summary as TensorBoard's text plugin reads it: a scalar `DT_STRING` tensor under
/// `plugin_name: "text"`.
pub(crate) fn text_event(wall_time: f64, step: u64, tag: &str, text: &str) -> Vec<u8> {
    const DT_STRING: u64 = 7;
    let mut plugin_data = Vec::new();
    put_bytes(&mut plugin_data, 1, b"text");
    let mut metadata = Vec::new();
    put_bytes(&mut metadata, 1, &plugin_data);
    let mut tensor = Vec::new();
    put_uint(&mut tensor, 1, DT_STRING);
    put_bytes(&mut tensor, 2, &[]); // empty shape: a scalar
    put_bytes(&mut tensor, 8, text.as_bytes());
    let mut value = Vec::new();
    put_bytes(&mut value, 1, tag.as_bytes());
    put_bytes(&mut value, 8, &tensor);
    put_bytes(&mut value, 9, &metadata);
    let mut summary = Vec::new();
    put_bytes(&mut summary, 1, &value);
    let mut rest = Vec::new();
    put_bytes(&mut rest, 5, &summary);
    event(wall_time, Some(step), &rest)
}

/// An open event file. Each record goes to the OS in one `write_all` on an unbuffered file,
/// so a crash loses at most the record being written, and readers see every finished one.
pub(crate) struct EventWriter {
    path: PathBuf,
    file: File,
}

impl EventWriter {
    /// Opens (appending, in case a name is reused within one second by one process)
    /// `dir/events.out.tfevents.<secs>.<host>.<pid>.temper` and writes the version record.
    pub(crate) fn create(dir: &Path, wall_time: f64) -> Result<EventWriter> {
        let name = format!(
            "events.out.tfevents.{}.{}.{}.temper",
            wall_time as u64,
            hostname(),
            std::process::id()
        );
        let path = dir.join(name);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let mut w = EventWriter { path, file };
        w.write_event(&file_version_event(wall_time))?;
        Ok(w)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn write_event(&mut self, event: &[u8]) -> Result<()> {
        self.file
            .write_all(&frame_record(event))
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Asks the OS to put the file on disk (called at `finish`, not per record: fsync per
    /// step would cost more than the step on small models).
    pub(crate) fn sync(&mut self) -> Result<()> {
        self.file.sync_data().map_err(|e| Error::io(&self.path, e))
    }
}

/// The host name for the file name, as TensorBoard's writers put it there; dots would be
/// harmless but are kept out so the name splits cleanly on '.'.
fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_default();
    let name: String = raw
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
        .collect();
    if name.is_empty() {
        "localhost".to_string()
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_published_check_value() {
        // The standard check: CRC-32C of ASCII "123456789" is 0xE3069283.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn varints_use_seven_bits_per_byte() {
        let mut out = Vec::new();
        put_varint(&mut out, 300);
        assert_eq!(out, [0xAC, 0x02]);
    }

    #[test]
    fn file_version_event_encodes_as_protobuf() {
        let ev = file_version_event(1.5);
        let mut want = vec![0x09];
        want.extend_from_slice(&1.5f64.to_le_bytes());
        want.push(0x1a);
        want.push(13);
        want.extend_from_slice(b"brain.Event:2");
        assert_eq!(ev, want);
    }

    #[test]
    fn session_start_is_event_field_seven_with_status_one() {
        let ev = session_start_event(0.0, 7);
        assert_eq!(&ev[9..], &[0x10, 7, 0x3a, 2, 0x08, 1]);
    }

    #[test]
    fn record_framing_carries_length_and_masked_crcs() {
        let rec = frame_record(b"abc");
        assert_eq!(rec.len(), 8 + 4 + 3 + 4);
        assert_eq!(&rec[..8], &3u64.to_le_bytes());
        assert_eq!(u32::from_le_bytes(rec[8..12].try_into().unwrap()), masked_crc32c(&rec[..8]));
        assert_eq!(&rec[12..15], b"abc");
        assert_eq!(u32::from_le_bytes(rec[15..19].try_into().unwrap()), masked_crc32c(b"abc"));
    }
}
