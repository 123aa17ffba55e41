//! Reading records: JSON lines, a JSON array of records, or Parquet rows. Each record comes
//! with its `file:line` (Parquet: `file:row`, 1-based), which every later error names.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// One record and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// `file:line`.
    pub source: String,
    pub value: Value,
}

/// Every record of `path`, chosen by extension: `.parquet` → Parquet rows; otherwise JSON,
/// as an array of records when the file's first non-blank character is `[`, else one record
/// per non-blank line.
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    let is_parquet = path.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("parquet"));
    if is_parquet {
        return read_parquet(path);
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let first = bytes.iter().position(|b| !b.is_ascii_whitespace());
    match first {
        Some(i) if bytes[i] == b'[' => read_json_array(path, &bytes, i),
        _ => read_jsonl(path, &bytes),
    }
}

fn at(path: &Path, line: usize) -> String {
    format!("{}:{line}", path.display())
}

/// One record per non-blank line.
pub fn read_jsonl(path: &Path, bytes: &[u8]) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let value: Value = serde_json::from_slice(line)
            .map_err(|e| Error::Input(format!("{}: malformed JSON line: {e}", at(path, i + 1))))?;
        out.push(Record { source: at(path, i + 1), value });
    }
    Ok(out)
}

/// The elements of a top-level JSON array, each tagged with the line it starts on.
pub fn read_json_array(path: &Path, bytes: &[u8], open: usize) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    let mut pos = open + 1;
    // Lines are counted incrementally from the last position whose line is known.
    let (mut line, mut counted) = (1usize, 0usize);
    let mut line_at = |p: usize| {
        line += bytes[counted..p].iter().filter(|&&b| b == b'\n').count();
        counted = p;
        line
    };
    let skip_ws = |mut p: usize| {
        while p < bytes.len() && bytes[p].is_ascii_whitespace() {
            p += 1;
        }
        p
    };
    let mut expect_value = true;
    loop {
        pos = skip_ws(pos);
        let l = line_at(pos.min(bytes.len()));
        match bytes.get(pos) {
            None => return Err(Error::Input(format!("{}: JSON array is not closed", at(path, l)))),
            Some(b']') if out.is_empty() || !expect_value => break,
            Some(b',') if !expect_value => {
                pos += 1;
                expect_value = true;
            }
            Some(_) if expect_value => {
                let mut it = serde_json::Deserializer::from_slice(&bytes[pos..]).into_iter::<Value>();
                match it.next() {
                    Some(Ok(value)) => {
                        out.push(Record { source: at(path, l), value });
                        pos += it.byte_offset();
                        expect_value = false;
                    }
                    Some(Err(e)) => {
                        return Err(Error::Input(format!(
                            "{}: malformed JSON in array element {}: {e} (line relative to the element)",
                            at(path, l),
                            out.len()
                        )))
                    }
                    None => return Err(Error::Input(format!("{}: JSON array is not closed", at(path, l)))),
                }
            }
            Some(&c) => {
                return Err(Error::Input(format!("{}: expected `,` or `]` in the JSON array, found `{}`", at(path, l), c as char)))
            }
        }
    }
    let end = skip_ws(pos + 1);
    if end < bytes.len() {
        return Err(Error::Input(format!("{}: text after the JSON array", at(path, line_at(end)))));
    }
    Ok(out)
}

/// Every row of a Parquet file as a JSON object (strings, numbers, lists and structs map to
/// their JSON equivalents; binary columns to base64).
pub fn read_parquet(path: &Path) -> Result<Vec<Record>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let reader = SerializedFileReader::new(file).map_err(|e| Error::format(path, format!("not a readable Parquet file: {e}")))?;
    let rows = reader.get_row_iter(None).map_err(|e| Error::format(path, format!("cannot read Parquet rows: {e}")))?;
    let mut out = Vec::new();
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| Error::Input(format!("{}: cannot read Parquet row: {e}", at(path, i + 1))))?;
        out.push(Record { source: at(path, i + 1), value: row.to_json_value() });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_array_elements_carry_their_start_line() {
        let text = b"[\n {\"a\": 1},\n\n {\"a\":\n 2}\n]\n";
        let r = read_json_array(Path::new("d.json"), text, 0).unwrap();
        assert_eq!(r.iter().map(|r| r.source.as_str()).collect::<Vec<_>>(), ["d.json:2", "d.json:4"]);
        assert_eq!(r[1].value["a"], 2);
        assert!(read_json_array(Path::new("d.json"), b"[]", 0).unwrap().is_empty());
        let e = read_json_array(Path::new("d.json"), b"[{\"a\":1}\n {\"a\":2}]", 0).unwrap_err().to_string();
        assert!(e.starts_with("d.json:2: expected `,`"), "{e}");
        let e = read_json_array(Path::new("d.json"), b"[{\"a\":1},\n{\"a\" 2}]", 0).unwrap_err().to_string();
        assert!(e.starts_with("d.json:2: malformed JSON"), "{e}");
    }

    #[test]
    fn jsonl_skips_blank_lines_and_names_the_bad_line() {
        let r = read_jsonl(Path::new("d.jsonl"), b"{\"a\":1}\n\n{\"a\":2}\n").unwrap();
        assert_eq!(r[1].source, "d.jsonl:3");
        let e = read_jsonl(Path::new("d.jsonl"), b"{\"a\":1}\n{oops\n").unwrap_err().to_string();
        assert!(e.starts_with("d.jsonl:2: malformed JSON line"), "{e}");
    }
}
