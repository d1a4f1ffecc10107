//! Event bodies at rest in `store.db`: zstd-compressed JSON.
//!
//! A stored body is a BLOB whose first byte names its encoding, then the
//! encoding's bytes; bodies written before compression are TEXT (the
//! JSON itself) and read as they are, so an older data directory needs no
//! rewrite. The only encoding so far, [`ZSTD_SEGMENT_V1`], is a zstd
//! frame compressed with a dictionary of Segment-spec event shapes that
//! ships with Kindred (`segment.dict`, written from the spec's examples:
//! it holds no customer data, so deleting a person leaves nothing of
//! theirs in it). The dictionary and its byte are fixed for good: a new
//! dictionary gets a new byte, and readers keep the old ones.
//!
//! On the reference workload (Segment events of ~540 bytes) a body takes
//! ~210 bytes instead of ~540.

use std::cell::RefCell;
use std::sync::OnceLock;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ValueRef};
use zstd::dict::{DecoderDictionary, EncoderDictionary};

/// The first byte of a body compressed with the built-in dictionary.
const ZSTD_SEGMENT_V1: u8 = 1;
const DICTIONARY: &[u8] = include_bytes!("segment.dict");
/// zstd's level 3: most of level 6's size at about half the time.
const LEVEL: i32 = 3;
/// A body larger than this when decoded is refused (the Tracking API
/// accepts at most 32 KB an event; this leaves room for what Kindred adds).
const MAX_DECODED: usize = 1 << 20;

fn encoder_dictionary() -> &'static EncoderDictionary<'static> {
    static DICT: OnceLock<EncoderDictionary<'static>> = OnceLock::new();
    DICT.get_or_init(|| EncoderDictionary::copy(DICTIONARY, LEVEL))
}

fn decoder_dictionary() -> &'static DecoderDictionary<'static> {
    static DICT: OnceLock<DecoderDictionary<'static>> = OnceLock::new();
    DICT.get_or_init(|| DecoderDictionary::copy(DICTIONARY))
}

thread_local! {
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// The stored form of an event's JSON body.
pub(crate) fn encode(json: &str) -> kindred_store::Result<Vec<u8>> {
    COMPRESSOR
        .with(|cell| {
            let mut cell = cell.borrow_mut();
            let compressor = match cell.as_mut() {
                Some(c) => c,
                None => cell.insert(zstd::bulk::Compressor::with_prepared_dictionary(
                    encoder_dictionary(),
                )?),
            };
            let mut out = Vec::with_capacity(json.len() / 2 + 16);
            out.push(ZSTD_SEGMENT_V1);
            out.extend_from_slice(&compressor.compress(json.as_bytes())?);
            Ok(out)
        })
        .map_err(|e: std::io::Error| {
            kindred_store::StoreError::Internal(format!("compressing a body: {e}"))
        })
}

/// The JSON of a stored body.
pub(crate) fn decode(stored: &[u8]) -> Result<String, String> {
    let Some((&ZSTD_SEGMENT_V1, frame)) = stored.split_first() else {
        return Err(format!(
            "a stored body in an unknown encoding ({:?}): written by a newer Kindred?",
            stored.first()
        ));
    };
    // The frame records its decoded size (the compressor always knows
    // it): the buffer is allocated to that, not to the bound.
    let size = match zstd::zstd_safe::get_frame_content_size(frame) {
        Ok(Some(size)) if size <= MAX_DECODED as u64 => size as usize,
        Ok(Some(size)) => return Err(format!("a stored body of {size} bytes is over the bound")),
        _ => return Err("a stored body without its size".into()),
    };
    let bytes = DECOMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        let decompressor = match cell.as_mut() {
            Some(d) => d,
            None => cell.insert(zstd::bulk::Decompressor::with_prepared_dictionary(
                decoder_dictionary(),
            )?),
        };
        decompressor.decompress(frame, size)
    });
    let bytes = bytes.map_err(|e| format!("decompressing a stored body: {e}"))?;
    String::from_utf8(bytes).map_err(|e| format!("a stored body is not UTF-8: {e}"))
}

/// A stored body's `receivedAt`, if it is an object that has one.
pub(crate) fn received_at(json: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Received {
        #[serde(rename = "receivedAt")]
        received_at: Option<String>,
    }
    serde_json::from_str::<Received>(json).ok()?.received_at
}

/// An event body read from `store.db`, in either of its stored forms.
pub(crate) struct StoredBody(pub String);

impl FromSql for StoredBody {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        match value {
            ValueRef::Text(text) => std::str::from_utf8(text)
                .map(|s| StoredBody(s.to_owned()))
                .map_err(|e| FromSqlError::Other(Box::new(e))),
            ValueRef::Blob(blob) => decode(blob)
                .map(StoredBody)
                .map_err(|e| FromSqlError::Other(e.into())),
            _ => Err(FromSqlError::InvalidType),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_comes_back_as_it_went_in_and_smaller() {
        let json = r#"{"anonymousId":"4e2d9711-4e71-4d0b-8a4d-18133c207e1d","context":{"ip":"143.113.238.52","library":{"name":"analytics-ios","version":"4.1.8"},"userAgent":"Shop/3.2 (iPhone; iOS 17.5)"},"event":"Products Searched","messageId":"cebcbc75-8f19-42b4-9a94-7240cf80d476","properties":{"query":"tent"},"receivedAt":"2026-11-30T17:41:23.001Z","timestamp":"2026-07-31T23:43:43.205Z","type":"track"}"#;
        let stored = encode(json).unwrap();
        assert_eq!(stored[0], ZSTD_SEGMENT_V1);
        assert!(
            stored.len() < json.len() / 2,
            "{} bytes of {}",
            stored.len(),
            json.len()
        );
        let decoded = decode(&stored).unwrap();
        assert_eq!(decoded, json);
        assert_eq!(
            decoded.capacity(),
            json.len(),
            "allocated to the body's size, not to the bound"
        );
    }

    #[test]
    fn older_text_bodies_read_as_they_are_and_unknown_encodings_are_refused() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let body: StoredBody = conn
            .query_row("SELECT '{\"a\":1}'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(body.0, r#"{"a":1}"#);
        let stored = encode(r#"{"a":1}"#).unwrap();
        let body: StoredBody = conn
            .query_row("SELECT ?1", [&stored], |r| r.get(0))
            .unwrap();
        assert_eq!(body.0, r#"{"a":1}"#);
        let unknown: rusqlite::Result<StoredBody> =
            conn.query_row("SELECT x'09ff'", [], |r| r.get(0));
        let error = unknown
            .err()
            .expect("an unknown encoding is an error")
            .to_string();
        assert!(error.contains("unknown encoding"), "{error}");
        assert!(
            decode(&[ZSTD_SEGMENT_V1, 1, 2, 3]).is_err(),
            "a damaged frame"
        );
    }

    #[test]
    fn a_decoded_body_is_bounded() {
        let big = format!(r#"{{"p":"{}"}}"#, "x".repeat(MAX_DECODED + 10));
        let stored = encode(&big).unwrap();
        assert!(decode(&stored).is_err(), "larger than the bound");
    }
}
