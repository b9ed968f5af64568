//! Frame decoders: one frame in, readings out, each a key (for the `{key}` in a port's topic)
//! and a payload. And the topic template that names them.
//!
//! - `raw`: the frame is the payload.
//! - `json`: an object. Split, each field is a reading (a string's payload is the string, any
//!   other value its JSON text); whole, the object is one reading.
//! - `kv`: `T=21.5,H=40` or `T:21.5 H:40`: pairs split by commas, semicolons or blanks, key
//!   from value by `=` or `:`.
//! - `csv`: fields by a delimiter, named by the configured columns; an empty field is no
//!   reading, a column named "" or "-" is skipped. No quoting: sensors do not quote.
//!
//! A frame that does not decode yields an error and no readings at all: half a frame is never
//! published.

use bytes::Bytes;
use thiserror::Error;

use crate::proto::topic;

/// How a port's frames become readings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoder {
    Raw,
    Json {
        split: bool,
    },
    Kv,
    Csv {
        columns: Vec<String>,
        delimiter: char,
    },
}

/// Why a frame did not decode.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("not UTF-8")]
    NotText,
    #[error("not a JSON object: {0}")]
    Json(String),
    #[error("`{0}` is not key=value or key:value")]
    NotPair(String),
    #[error("key `{0}` cannot be a topic level")]
    BadKey(String),
    #[error("{got} fields where {want} columns are configured")]
    Columns { got: usize, want: usize },
    #[error("the frame holds no readings")]
    Empty,
}

/// One value from a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    /// The field's name; `None` for a whole frame (`raw`, unsplit `json`).
    pub key: Option<String>,
    pub payload: Bytes,
}

impl Decoder {
    /// Whether readings carry keys (so the topic may, and should, use `{key}`).
    pub fn keyed(&self) -> bool {
        matches!(
            self,
            Decoder::Json { split: true } | Decoder::Kv | Decoder::Csv { .. }
        )
    }

    /// Decodes `frame`; on success `out` holds its readings (at least one).
    pub fn decode(&self, frame: &[u8], out: &mut Vec<Reading>) -> Result<(), DecodeError> {
        out.clear();
        let r = self.decode_into(frame, out);
        if r.is_err() {
            out.clear();
        } else if out.is_empty() {
            return Err(DecodeError::Empty);
        }
        r
    }

    fn decode_into(&self, frame: &[u8], out: &mut Vec<Reading>) -> Result<(), DecodeError> {
        if let Decoder::Raw = self {
            out.push(Reading {
                key: None,
                payload: Bytes::copy_from_slice(frame),
            });
            return Ok(());
        }
        let text = std::str::from_utf8(frame).map_err(|_| DecodeError::NotText)?;
        let text = text.trim();
        match self {
            Decoder::Raw => {}
            Decoder::Json { split } => {
                let v: serde_json::Value =
                    serde_json::from_str(text).map_err(|e| DecodeError::Json(e.to_string()))?;
                let serde_json::Value::Object(map) = v else {
                    return Err(DecodeError::Json("a value that is not an object".into()));
                };
                if !split {
                    out.push(Reading {
                        key: None,
                        payload: Bytes::copy_from_slice(text.as_bytes()),
                    });
                    return Ok(());
                }
                for (k, v) in map {
                    let payload = match v {
                        serde_json::Value::String(s) => s,
                        other => other.to_string(),
                    };
                    push(out, &k, payload.as_bytes())?;
                }
            }
            Decoder::Kv => {
                for pair in tighten(text).split(sep).filter(|p| !p.is_empty()) {
                    let Some((k, v)) = pair.split_once(['=', ':']) else {
                        return Err(DecodeError::NotPair(pair.to_owned()));
                    };
                    if v.is_empty() {
                        return Err(DecodeError::NotPair(pair.to_owned()));
                    }
                    push(out, k, v.as_bytes())?;
                }
            }
            Decoder::Csv { columns, delimiter } => {
                let fields: Vec<&str> = text.split(*delimiter).map(str::trim).collect();
                if fields.len() != columns.len() {
                    return Err(DecodeError::Columns {
                        got: fields.len(),
                        want: columns.len(),
                    });
                }
                for (col, f) in columns.iter().zip(fields) {
                    if col.is_empty() || col == "-" || f.is_empty() {
                        continue;
                    }
                    push(out, col, f.as_bytes())?;
                }
            }
        }
        Ok(())
    }
}

fn sep(c: char) -> bool {
    c == ',' || c == ';' || c.is_whitespace()
}

/// Drops the blanks around each `=` and `:`, so `T = 21.5` reads as `T=21.5`. Linear: a
/// run of blanks is held until the next character says whether it separates pairs.
fn tighten(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut blanks = String::new();
    for c in text.chars() {
        if c.is_whitespace() {
            blanks.push(c);
            continue;
        }
        let glued = c == '=' || c == ':' || out.ends_with(['=', ':']);
        if !glued {
            out.push_str(&blanks);
        }
        blanks.clear();
        out.push(c);
    }
    out
}

fn push(out: &mut Vec<Reading>, key: &str, payload: &[u8]) -> Result<(), DecodeError> {
    if key.is_empty() || key.contains(['/', '+', '#', '\0']) || key.len() > 256 {
        return Err(DecodeError::BadKey(key.to_owned()));
    }
    out.push(Reading {
        key: Some(key.to_owned()),
        payload: Bytes::copy_from_slice(payload),
    });
    Ok(())
}

/// A port's `topic`, with `{name}` and `{gateway_id}` filled in once and `{key}` per reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Key,
}

/// Why a topic template cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TemplateError {
    #[error("unknown placeholder `{{{0}}}`: use {{name}}, {{key}} or {{gateway_id}}")]
    Unknown(String),
    #[error("unclosed `{{`")]
    Unclosed,
    #[error("{0}")]
    Topic(#[from] topic::TopicError),
}

impl TopicTemplate {
    pub fn parse(template: &str, name: &str, gateway_id: &str) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            text.push_str(&rest[..open]);
            let Some(close) = rest[open..].find('}') else {
                return Err(TemplateError::Unclosed);
            };
            match &rest[open + 1..open + close] {
                "name" => text.push_str(name),
                "gateway_id" => text.push_str(gateway_id),
                "key" => {
                    parts.push(Part::Text(std::mem::take(&mut text)));
                    parts.push(Part::Key);
                }
                other => return Err(TemplateError::Unknown(other.to_owned())),
            }
            rest = &rest[open + close + 1..];
        }
        text.push_str(rest);
        parts.push(Part::Text(text));
        parts.retain(|p| *p != Part::Text(String::new()));
        let t = TopicTemplate { parts };
        // Check with a key that is a plain level: the rest must make a valid topic name.
        topic::validate_name(&t.render(Some("k")))?;
        Ok(t)
    }

    pub fn has_key(&self) -> bool {
        self.parts.contains(&Part::Key)
    }

    /// The topic for a reading. Keys are checked by the decoder (no `/`, `+`, `#`, U+0000),
    /// so the result is a valid topic name whenever the template is.
    pub fn render(&self, key: Option<&str>) -> String {
        let mut s = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => s.push_str(t),
                Part::Key => s.push_str(key.unwrap_or("value")),
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readings(d: &Decoder, frame: &str) -> Result<Vec<(Option<String>, String)>, DecodeError> {
        let mut out = Vec::new();
        d.decode(frame.as_bytes(), &mut out)?;
        Ok(out
            .into_iter()
            .map(|r| (r.key, String::from_utf8(r.payload.to_vec()).unwrap()))
            .collect())
    }

    fn kv(pairs: &[(&str, &str)]) -> Vec<(Option<String>, String)> {
        pairs
            .iter()
            .map(|(k, v)| (Some((*k).to_owned()), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn key_value_forms() {
        let d = Decoder::Kv;
        let want = kv(&[("T", "21.5"), ("H", "40")]);
        for frame in [
            "T=21.5,H=40",
            "T:21.5 H:40",
            "T=21.5; H=40",
            "  T = 21.5 , H = 40  ",
            "T:21.5\tH:40,",
        ] {
            assert_eq!(readings(&d, frame).unwrap(), want, "{frame}");
        }
        assert_eq!(
            readings(&d, "T=21.5,H"),
            Err(DecodeError::NotPair("H".into()))
        );
        assert_eq!(
            readings(&d, "T=,H=1"),
            Err(DecodeError::NotPair("T=".into()))
        );
        assert_eq!(
            readings(&d, "a/b=1"),
            Err(DecodeError::BadKey("a/b".into()))
        );
        assert_eq!(readings(&d, "  ,; "), Err(DecodeError::Empty));
        assert_eq!(
            readings(&Decoder::Kv, "\u{0}=1"),
            Err(DecodeError::BadKey("\u{0}".into()))
        );
    }

    #[test]
    fn json_split_and_whole() {
        let split = Decoder::Json { split: true };
        assert_eq!(
            readings(
                &split,
                r#"{"level": 1.25, "unit": "m", "ok": true, "n": {"a": 1}}"#
            )
            .unwrap(),
            kv(&[
                ("level", "1.25"),
                ("n", "{\"a\":1}"),
                ("ok", "true"),
                ("unit", "m")
            ])
        );
        assert!(matches!(
            readings(&split, "[1,2]"),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            readings(&split, "{\"a\":"),
            Err(DecodeError::Json(_))
        ));
        let whole = Decoder::Json { split: false };
        assert_eq!(
            readings(&whole, " {\"a\":1} ").unwrap(),
            vec![(None, "{\"a\":1}".to_owned())]
        );
    }

    #[test]
    fn csv_columns() {
        let d = Decoder::Csv {
            columns: vec!["t".into(), "-".into(), "h".into(), "p".into()],
            delimiter: ',',
        };
        assert_eq!(
            readings(&d, "21.5, 7, 40,").unwrap(),
            kv(&[("t", "21.5"), ("h", "40")])
        );
        assert_eq!(
            readings(&d, "1,2,3"),
            Err(DecodeError::Columns { got: 3, want: 4 })
        );
        let semi = Decoder::Csv {
            columns: vec!["a".into()],
            delimiter: ';',
        };
        assert_eq!(readings(&semi, "x").unwrap(), kv(&[("a", "x")]));
    }

    #[test]
    fn raw_and_not_text() {
        let mut out = Vec::new();
        Decoder::Raw.decode(b"\xff\x00", &mut out).unwrap();
        assert_eq!(&out[0].payload[..], b"\xff\x00");
        assert_eq!(
            Decoder::Kv.decode(b"\xff=1", &mut out),
            Err(DecodeError::NotText)
        );
        assert!(out.is_empty());
    }

    #[test]
    fn templates() {
        let t = TopicTemplate::parse("sensors/{name}/{key}", "ws1", "site7").unwrap();
        assert!(t.has_key());
        assert_eq!(t.render(Some("T")), "sensors/ws1/T");
        let t = TopicTemplate::parse("{gateway_id}/tank", "p", "site7").unwrap();
        assert!(!t.has_key());
        assert_eq!(t.render(None), "site7/tank");
        assert_eq!(
            TopicTemplate::parse("a/{nope}", "n", "g"),
            Err(TemplateError::Unknown("nope".into()))
        );
        assert_eq!(
            TopicTemplate::parse("a/{key", "n", "g"),
            Err(TemplateError::Unclosed)
        );
        assert!(TopicTemplate::parse("a/+/{key}", "n", "g").is_err());
        assert!(TopicTemplate::parse("", "n", "g").is_err());
    }
}
