//! Reading preference files for `prefsd import`: CSV with a header row
//! (`customer,service,channel,status[,reason]`) or NDJSON (one object per
//! line with the same keys). Rows are read in chunks, each row keeping its
//! line number so rejections can name it.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{BufRead, Read};
use std::rc::Rc;

use serde::Deserialize;

/// One row, ready to send, with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// 1-based line number in the file.
    pub line: u64,
    /// The item as `POST /v1/preferences/import` takes it.
    pub item: serde_json::Value,
}

/// A row that could not even be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// 1-based line number.
    pub line: u64,
    /// Why.
    pub message: String,
}

/// The file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Comma-separated with a header.
    Csv,
    /// One JSON object per line.
    Ndjson,
}

impl Format {
    /// Guesses from a file name: `.ndjson` and `.jsonl` are NDJSON, the rest CSV.
    pub fn from_path(path: &str) -> Format {
        if path.ends_with(".ndjson") || path.ends_with(".jsonl") || path.ends_with(".json") {
            Format::Ndjson
        } else {
            Format::Csv
        }
    }
}

/// A reader that notes the byte offset of every newline it passes on, so
/// rows can be numbered by the lines before them.
struct LineCounter<R> {
    inner: R,
    pos: u64,
    newlines: Rc<RefCell<VecDeque<u64>>>,
}

impl<R: Read> Read for LineCounter<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut queue = self.newlines.borrow_mut();
        for (i, _) in buf[..n].iter().enumerate().filter(|(_, b)| **b == b'\n') {
            queue.push_back(self.pos + i as u64);
        }
        self.pos += n as u64;
        Ok(n)
    }
}

#[derive(Deserialize)]
struct CsvRow {
    customer: String,
    service: String,
    channel: String,
    status: String,
    #[serde(default)]
    reason: Option<String>,
}

/// Reads rows from `input`, calling `chunk` with up to `size` rows at a
/// time along with the rejections and the bytes consumed so far.
pub fn read<R: Read>(
    input: R,
    format: Format,
    size: usize,
    mut chunk: impl FnMut(Vec<Row>, Vec<Rejected>, u64) -> Result<(), String>,
) -> Result<(), String> {
    let mut rows = Vec::with_capacity(size);
    let mut rejected = Vec::new();
    match format {
        Format::Csv => {
            let newlines = Rc::new(RefCell::new(VecDeque::new()));
            let counted = LineCounter { inner: input, pos: 0, newlines: newlines.clone() };
            let mut passed = 0u64;
            let mut reader =
                csv::ReaderBuilder::new().trim(csv::Trim::All).flexible(true).from_reader(counted);
            let headers = reader.headers().map_err(|e| format!("cannot read the CSV header: {e}"))?.clone();
            for required in ["customer", "service", "channel", "status"] {
                if !headers.iter().any(|h| h == required) {
                    return Err(format!(
                        "the CSV header has no {required:?} column (it needs customer,service,channel,status[,reason])"
                    ));
                }
            }
            let mut record = csv::StringRecord::new();
            loop {
                let read = reader.read_record(&mut record);
                // The csv reader's own line numbers miss the blank lines it
                // skips, so rows are numbered from the newlines before their
                // end: all of them, less the row's terminator and any
                // newlines inside its quoted fields.
                let end = reader.position().byte();
                let mut queue = newlines.borrow_mut();
                let mut terminated = false;
                while let Some(&nl) = queue.front().filter(|&&nl| nl < end) {
                    queue.pop_front();
                    passed += 1;
                    terminated = nl + 1 == end;
                }
                drop(queue);
                let inside = record.iter().map(|f| f.matches('\n').count() as u64).sum::<u64>();
                let line = (passed + 1).saturating_sub(u64::from(terminated) + inside);
                match read {
                    Ok(false) => break,
                    Ok(true) => match record.deserialize::<CsvRow>(Some(&headers)) {
                        Ok(r) => rows.push(Row {
                            line,
                            item: serde_json::json!({
                                "customer": r.customer, "service": r.service, "channel": r.channel,
                                "status": r.status, "reason": r.reason.filter(|s| !s.is_empty()),
                            }),
                        }),
                        Err(e) => rejected.push(Rejected { line, message: e.to_string() }),
                    },
                    Err(e) => rejected.push(Rejected { line, message: e.to_string() }),
                }
                if rows.len() >= size {
                    let pos = reader.position().byte();
                    chunk(std::mem::take(&mut rows), std::mem::take(&mut rejected), pos)?;
                }
            }
            let pos = reader.position().byte();
            chunk(rows, rejected, pos)
        }
        Format::Ndjson => {
            let reader = std::io::BufReader::new(input);
            let mut pos = 0u64;
            for (i, line) in reader.split(b'\n').enumerate() {
                let line_no = i as u64 + 1;
                let bytes = line.map_err(|e| format!("reading line {line_no}: {e}"))?;
                pos += bytes.len() as u64 + 1;
                if bytes.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                match serde_json::from_slice::<serde_json::Value>(&bytes) {
                    Ok(v) if v.is_object() => rows.push(Row { line: line_no, item: v }),
                    Ok(_) => rejected.push(Rejected { line: line_no, message: "not a JSON object".into() }),
                    Err(e) => {
                        rejected.push(Rejected { line: line_no, message: format!("not valid JSON: {e}") })
                    }
                }
                if rows.len() >= size {
                    chunk(std::mem::take(&mut rows), std::mem::take(&mut rejected), pos)?;
                }
            }
            chunk(rows, rejected, pos)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(text: &str, format: Format) -> (Vec<Row>, Vec<Rejected>) {
        let (mut rows, mut rejected) = (Vec::new(), Vec::new());
        read(text.as_bytes(), format, 2, |r, j, _| {
            rows.extend(r);
            rejected.extend(j);
            Ok(())
        })
        .unwrap();
        (rows, rejected)
    }

    #[test]
    fn csv_rows_keep_their_line_numbers() {
        let (rows, rejected) = all(
            "customer,service,channel,status,reason\n1,rating,email,opted_out,too many\n2,*,*,opted_in\n3,rating\n4,rating,sms,opted_out,\n",
            Format::Csv,
        );
        assert_eq!(rows.iter().map(|r| r.line).collect::<Vec<_>>(), [2, 3, 5]);
        assert_eq!(rows[0].item["reason"], "too many");
        assert_eq!(rows[1].item["reason"], serde_json::Value::Null);
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert_eq!(rejected[0].line, 4);
    }

    #[test]
    fn ndjson_rejects_non_objects_by_line() {
        let (rows, rejected) = all("{\"customer\":1}\n\n[1]\n{oops\n{\"customer\":2}\n", Format::Ndjson);
        assert_eq!(rows.iter().map(|r| r.line).collect::<Vec<_>>(), [1, 5]);
        assert_eq!(rejected.iter().map(|r| r.line).collect::<Vec<_>>(), [3, 4]);
    }

    #[test]
    fn a_csv_without_required_columns_is_refused() {
        let err = read("customer,service\n1,a\n".as_bytes(), Format::Csv, 10, |_, _, _| Ok(())).unwrap_err();
        assert!(err.contains("channel"), "{err}");
    }
}
