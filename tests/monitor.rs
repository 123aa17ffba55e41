//! The training monitor's files, read back the way their consumers read them: metrics.jsonl
//! as JSON lines, the TensorBoard event file record by record (lengths, masked CRC-32Cs,
//! protobuf fields decoded here by hand), and loss.png's chunk structure. The PNG's pixels are
//! decoded in the runtime's own unit tests (`monitor::tests`), which have the `png` crate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use temper::monitor::{Monitor, MonitorOptions, Progress};

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-scratch").join(format!("monitor-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn quiet() -> MonitorOptions {
    MonitorOptions { progress: Progress::Off, resume_from_step: None }
}

fn rows(dir: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert!(text.ends_with('\n'), "every row ends its line");
    text.lines()
        .map(|l| match serde_json::from_str(l).unwrap() {
            serde_json::Value::Object(o) => o,
            other => panic!("row is not an object: {other}"),
        })
        .collect()
}

// ---- TensorBoard decoding ---------------------------------------------------------------

fn crc32c(data: &[u8]) -> u32 {
    // Bitwise, no table: a second, independent implementation of what the writer uses.
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}

fn masked(data: &[u8]) -> u32 {
    let c = crc32c(data);
    ((c >> 15) | (c << 17)).wrapping_add(0xa282_ead8)
}

/// TFRecord framing: each record's length and data with their masked CRCs checked.
fn records(bytes: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let len_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
        assert_eq!(len_crc, masked(len_bytes), "length CRC of record at byte {at}");
        let data = &bytes[at + 12..at + 12 + len];
        let data_crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
        assert_eq!(data_crc, masked(data), "data CRC of record at byte {at}");
        out.push(data);
        at += 16 + len;
    }
    assert_eq!(at, bytes.len(), "no torn record at the end");
    out
}

#[derive(Debug)]
enum Field<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(&'a [u8]),
    Fixed32([u8; 4]),
}

fn varint(b: &[u8], at: &mut usize) -> u64 {
    let (mut v, mut shift) = (0u64, 0);
    loop {
        let byte = b[*at];
        *at += 1;
        v |= ((byte & 0x7f) as u64) << shift;
        if byte < 0x80 {
            return v;
        }
        shift += 7;
    }
}

/// A protobuf message as (field number, value) pairs in wire order.
fn fields(b: &[u8]) -> Vec<(u64, Field<'_>)> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < b.len() {
        let key = varint(b, &mut at);
        let f = match key & 7 {
            0 => Field::Varint(varint(b, &mut at)),
            1 => {
                at += 8;
                Field::Fixed64(b[at - 8..at].try_into().unwrap())
            }
            2 => {
                let n = varint(b, &mut at) as usize;
                at += n;
                Field::Bytes(&b[at - n..at])
            }
            5 => {
                at += 4;
                Field::Fixed32(b[at - 4..at].try_into().unwrap())
            }
            w => panic!("unexpected wire type {w}"),
        };
        out.push((key >> 3, f));
    }
    out
}

fn bytes_of<'a>(msg: &[(u64, Field<'a>)], field: u64) -> Vec<&'a [u8]> {
    msg.iter().filter_map(|(n, f)| match f { Field::Bytes(b) if *n == field => Some(*b), _ => None }).collect()
}

#[derive(Default)]
struct Events {
    file_versions: Vec<String>,
    wall_times: Vec<f64>,
    scalars: BTreeMap<(String, u64), f32>,
    texts: Vec<(u64, String, String)>,
    session_starts: Vec<u64>,
}

fn read_events(dir: &Path) -> Events {
    let mut ev = Events::default();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_str().unwrap().starts_with("events.out.tfevents."))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no event file in {}", dir.display());
    for file in files {
        let name = file.file_name().unwrap().to_str().unwrap().to_string();
        assert!(name.ends_with(&format!(".{}.temper", std::process::id())), "{name}");
        let bytes = std::fs::read(&file).unwrap();
        for rec in records(&bytes) {
            let msg = fields(rec);
            let mut step = None;
            for (n, f) in &msg {
                match (n, f) {
                    (1, Field::Fixed64(b)) => ev.wall_times.push(f64::from_le_bytes(*b)),
                    (2, Field::Varint(s)) => step = Some(*s),
                    _ => {}
                }
            }
            for v in bytes_of(&msg, 3) {
                ev.file_versions.push(String::from_utf8(v.to_vec()).unwrap());
            }
            for log in bytes_of(&msg, 7) {
                assert!(matches!(fields(log)[..], [(1, Field::Varint(1))]), "session_log status START");
                ev.session_starts.push(step.unwrap());
            }
            for summary in bytes_of(&msg, 5) {
                for value in bytes_of(&fields(summary), 1) {
                    let value = fields(value);
                    let tag = String::from_utf8(bytes_of(&value, 1)[0].to_vec()).unwrap();
                    let simple = value.iter().find_map(|(n, f)| match f {
                        Field::Fixed32(b) if *n == 2 => Some(f32::from_le_bytes(*b)),
                        _ => None,
                    });
                    if let Some(v) = simple {
                        let prev = ev.scalars.insert((tag, step.unwrap()), v);
                        assert!(prev.is_none(), "a scalar logged twice in one file set");
                    } else {
                        let tensor = fields(bytes_of(&value, 8)[0]);
                        assert!(matches!(tensor[0], (1, Field::Varint(7))), "DT_STRING");
                        let text = String::from_utf8(bytes_of(&tensor, 8)[0].to_vec()).unwrap();
                        let meta = fields(bytes_of(&value, 9)[0]);
                        let plugin = fields(bytes_of(&meta, 1)[0]);
                        assert_eq!(bytes_of(&plugin, 1)[0], b"text");
                        ev.texts.push((step.unwrap(), tag, text));
                    }
                }
            }
        }
    }
    ev
}

// ---- PNG structure -----------------------------------------------------------------------

fn crc32_ieee(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// Checks the signature and every chunk's CRC; returns (width, height, bit depth, colour
/// type, total IDAT bytes).
fn png_header(path: &Path) -> (u32, u32, u8, u8, usize) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    let (mut at, mut ihdr, mut idat, mut ended) = (8, None, 0, false);
    while at < b.len() {
        let len = u32::from_be_bytes(b[at..at + 4].try_into().unwrap()) as usize;
        let kind = &b[at + 4..at + 8];
        let data = &b[at + 8..at + 8 + len];
        let crc = u32::from_be_bytes(b[at + 8 + len..at + 12 + len].try_into().unwrap());
        assert_eq!(crc, crc32_ieee(&b[at + 4..at + 8 + len]), "CRC of chunk {}", String::from_utf8_lossy(kind));
        match kind {
            b"IHDR" => {
                let w = u32::from_be_bytes(data[0..4].try_into().unwrap());
                let h = u32::from_be_bytes(data[4..8].try_into().unwrap());
                ihdr = Some((w, h, data[8], data[9]));
            }
            b"IDAT" => idat += len,
            b"IEND" => ended = true,
            _ => {}
        }
        at += 12 + len;
    }
    assert!(ended, "IEND chunk");
    let (w, h, depth, colour) = ihdr.expect("IHDR chunk");
    (w, h, depth, colour, idat)
}

// ---- a run -------------------------------------------------------------------------------

fn train_scalars(step: u64) -> Vec<(&'static str, f64)> {
    let kl = if step == 5 { f64::NAN } else { 0.01 * step as f64 };
    vec![
        ("loss", 3.0 / step as f64),
        ("lr", 2e-4 * (step as f64 / 20.0)),
        ("tokens_per_s", 1000.0 + step as f64),
        ("grad_norm", 0.5 + 0.1 * step as f64),
        ("kl", kl),
    ]
}

#[test]
fn a_twenty_step_run_writes_rows_tensorboard_scalars_and_a_plot() {
    let dir = scratch("run");
    let mut mon = Monitor::new(&dir, 20, quiet()).unwrap();
    for step in 1..=20 {
        mon.log_train(step, &train_scalars(step)).unwrap();
        if step % 10 == 0 {
            mon.log_eval(step, &[("loss", 1.0 / step as f64)]).unwrap();
        }
    }
    mon.log_text(10, "sample", "the quick brown fox").unwrap();
    let png = mon.finish().unwrap();

    // metrics.jsonl: 20 train rows and 2 eval rows, keys in the order given, NaN as null.
    let rows = rows(&dir);
    assert_eq!(rows.len(), 22);
    let train: Vec<_> = rows.iter().filter(|r| r.contains_key("loss")).collect();
    let eval: Vec<_> = rows.iter().filter(|r| r.contains_key("eval_loss")).collect();
    assert_eq!((train.len(), eval.len()), (20, 2));
    let keys: Vec<&str> = train[0].keys().map(|k| k.as_str()).collect();
    assert!(keys.contains(&"grad_norm") && keys.contains(&"kl") && keys.contains(&"tokens_per_s"));
    let first_line = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap().lines().next().unwrap().to_string();
    assert!(first_line.starts_with("{\"step\":1,\"loss\":3.0,\"lr\":"), "{first_line}");
    for (i, row) in train.iter().enumerate() {
        let step = i as u64 + 1;
        assert_eq!(row["step"].as_u64(), Some(step));
        for (k, v) in train_scalars(step) {
            if v.is_finite() {
                // The file holds the shortest round-tripping decimal (Python reads back exactly
                // `v`); serde_json's default parser may land one ulp away.
                let got = row[k].as_f64().unwrap();
                assert!((got - v).abs() <= 2.0 * f64::EPSILON * v.abs(), "{k} at step {step}: {got} vs {v}");
            } else {
                assert!(row[k].is_null(), "non-finite {k} at step {step} is null");
            }
        }
    }
    for (row, step) in eval.iter().zip([10u64, 20]) {
        assert_eq!(row["step"].as_u64(), Some(step));
        let loss = 1.0 / step as f64;
        assert!((row["eval_loss"].as_f64().unwrap() - loss).abs() < 1e-15);
        assert!((row["eval_ppl"].as_f64().unwrap() - loss.exp()).abs() < 1e-12);
    }

    // The event file: the version record, every scalar at its step, the text sample.
    let ev = read_events(&dir);
    assert_eq!(ev.file_versions, ["brain.Event:2"]);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(ev.wall_times.iter().all(|t| (now - t).abs() < 600.0), "wall times are seconds since the epoch");
    assert_eq!(ev.scalars.len(), 20 * 5 + 2 * 2);
    for step in 1..=20 {
        for (k, v) in train_scalars(step) {
            let got = ev.scalars[&(format!("train/{k}"), step)];
            assert!(got.to_bits() == (v as f32).to_bits() || (got.is_nan() && v.is_nan()), "train/{k} at {step}");
        }
    }
    assert_eq!(ev.scalars[&("eval/loss".to_string(), 10)], 0.1f32);
    assert_eq!(ev.scalars[&("eval/ppl".to_string(), 20)], (0.05f64.exp()) as f32);
    assert_eq!(ev.texts, [(10, "sample".to_string(), "the quick brown fox".to_string())]);
    assert!(ev.session_starts.is_empty());

    // loss.png: a well-formed RGB8 image of a sensible size with real content.
    assert_eq!(png, dir.join("loss.png"));
    let (w, h, depth, colour, idat) = png_header(&png);
    assert!((400..=4000).contains(&w) && (300..=4000).contains(&h), "{w}x{h}");
    assert_eq!((depth, colour), (8, 2), "8-bit RGB");
    assert!(idat > 2000, "a plot compresses to more than a blank page ({idat} bytes)");
    assert!(!dir.join("loss.png.tmp").exists());
}

#[test]
fn resuming_drops_rows_after_the_checkpoint_and_marks_the_restart_for_tensorboard() {
    let dir = scratch("resume");
    let mut first = Monitor::new(&dir, 10, quiet()).unwrap();
    for step in 1..=8 {
        first.log_train(step, &train_scalars(step)).unwrap();
    }
    first.log_eval(4, &[("loss", 0.9)]).unwrap();
    first.log_eval(8, &[("loss", 0.8)]).unwrap();
    drop(first);
    // A crash mid-row leaves a torn last line; resuming must drop it too.
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(dir.join("metrics.jsonl")).unwrap();
    f.write_all(b"{\"step\":9,\"lo").unwrap();
    drop(f);

    let opts = MonitorOptions { progress: Progress::Off, resume_from_step: Some(6) };
    let mut resumed = Monitor::new(&dir, 10, opts).unwrap();
    let kept: Vec<u64> = rows(&dir).iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(kept, [1, 2, 3, 4, 5, 6, 4], "rows up to step 6 kept, in their order");
    for step in 7..=10 {
        resumed.log_train(step, &train_scalars(step)).unwrap();
    }
    resumed.finish().unwrap();

    let rows = rows(&dir);
    let train_steps: Vec<u64> =
        rows.iter().filter(|r| r.contains_key("loss")).map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(train_steps, (1..=10).collect::<Vec<_>>(), "each step once");
    let eval_steps: Vec<u64> =
        rows.iter().filter(|r| r.contains_key("eval_loss")).map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(eval_steps, [4]);
    assert!(!dir.join("metrics.jsonl.tmp").exists());

    // TensorBoard gets a START marker at the first resumed step, so it drops the old 7 and 8.
    let ev = read_events_allowing_repeats(&dir);
    assert_eq!(ev.session_starts, [7]);
    assert_eq!(ev.file_versions.len(), 2, "one version record per monitor");
}

/// Like `read_events`, for a resumed run where steps 7 and 8 were logged by both monitors.
fn read_events_allowing_repeats(dir: &Path) -> Events {
    let mut ev = Events::default();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if !p.file_name().unwrap().to_str().unwrap().starts_with("events.out.tfevents.") {
            continue;
        }
        // Both monitors may share one file (same second, same process): records are
        // self-delimiting, so the second monitor's records simply follow the first's.
        let bytes = std::fs::read(&p).unwrap();
        for rec in records(&bytes) {
            let msg = fields(rec);
            for v in bytes_of(&msg, 3) {
                ev.file_versions.push(String::from_utf8(v.to_vec()).unwrap());
            }
            let step = msg.iter().find_map(|(n, f)| match f { Field::Varint(s) if *n == 2 => Some(*s), _ => None });
            if !bytes_of(&msg, 7).is_empty() {
                ev.session_starts.push(step.unwrap());
            }
        }
    }
    ev
}

#[test]
fn an_unwritable_output_dir_is_an_io_error_naming_the_path() {
    let dir = scratch("unwritable");
    // A regular file where a folder must go fails even for root, unlike permission bits.
    let blocker = dir.join("blocker");
    std::fs::write(&blocker, b"not a folder").unwrap();
    let out = blocker.join("run");
    let err = Monitor::new(&out, 10, quiet()).err().expect("cannot create a folder inside a file");
    assert!(matches!(&err, temper::Error::Io { path, .. } if path == &out), "{err:?}");
    assert!(err.to_string().contains(out.to_str().unwrap()), "{err}");

    // metrics.jsonl that cannot be opened as a file: the error names it.
    let out = dir.join("run2");
    std::fs::create_dir_all(out.join("metrics.jsonl")).unwrap();
    let err = Monitor::new(&out, 10, quiet()).err().expect("metrics.jsonl is a folder");
    assert!(err.to_string().contains("metrics.jsonl"), "{err}");
}

#[test]
fn a_train_step_without_loss_lr_or_tokens_per_s_is_refused() {
    let dir = scratch("missing");
    let mut mon = Monitor::new(&dir, 10, quiet()).unwrap();
    let err = mon.log_train(1, &[("loss", 1.0), ("lr", 1e-4)]).unwrap_err();
    assert!(err.to_string().contains("tokens_per_s"), "{err}");
    assert!(mon.log_eval(1, &[("ppl", 3.0)]).is_err());
    assert!(mon.log_train(1, &[("loss", 1.0), ("lr", 1e-4), ("tokens_per_s", 1.0), ("lr", 2.0)]).is_err());
    assert_eq!(std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap(), "", "refused rows are not written");
}
