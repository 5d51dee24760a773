//! The streaming JSON string reader against serde_json: whatever serde_json accepts, the
//! reader accepts too, with the same strings (keys included) in document order, and its
//! answer does not depend on how the document is cut into pieces. The lenient reader reads
//! any bytes the same way whatever the pieces, finds every string the strict reader finds
//! (the same ones where the strict reader accepts the document), and so does it through
//! `JsonText`, which leaves UTF-8 as it is.
#![no_main]

use std::fmt;

use libfuzzer_sys::fuzz_target;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use virus_scanner_protocol::json_strings::{
    JsonEncoding, JsonError, JsonEvent, JsonStrings, JsonText,
};

type Strings = Vec<(bool, Vec<u8>)>;

fn stream(doc: &[u8], step: usize) -> Result<Strings, JsonError> {
    let (strings, result) = read(JsonStrings::new(), doc, step);
    result.map(|()| strings)
}

/// The strings a reader hands on, complete ones only, and how the reading ended.
fn read(mut p: JsonStrings, doc: &[u8], step: usize) -> (Strings, Result<(), JsonError>) {
    let mut out: Strings = Vec::new();
    let mut open = false;
    let mut on = |e: JsonEvent<'_>| match e {
        JsonEvent::StringStart { key } => {
            open = true;
            out.push((key, Vec::new()));
        }
        JsonEvent::StringData(d) => out
            .last_mut()
            .expect("a string is open")
            .1
            .extend_from_slice(d),
        JsonEvent::StringEnd => open = false,
    };
    let mut result = Ok(());
    for piece in doc.chunks(step) {
        result = p.feed(piece, &mut on);
        if result.is_err() {
            break;
        }
    }
    let result = result.and_then(|()| p.finish());
    if open {
        out.pop();
    }
    (out, result)
}

fn through_text(doc: &[u8], step: usize) -> Vec<u8> {
    let mut t = JsonText::new();
    let mut out = Vec::new();
    for piece in doc.chunks(step) {
        t.feed(piece, &mut out);
    }
    t.finish(&mut out);
    out
}

/// Collects every string serde_json reads, in order, without building a tree (which would
/// merge duplicate keys).
struct Collect<'a> {
    out: &'a mut Strings,
    key: bool,
}

impl<'de> DeserializeSeed<'de> for Collect<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Collect<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        self.out.push((self.key, v.as_bytes().to_vec()));
        Ok(())
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(Collect {
                out: &mut *self.out,
                key: false,
            })?
            .is_some()
        {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map
            .next_key_seed(Collect {
                out: &mut *self.out,
                key: true,
            })?
            .is_some()
        {
            map.next_value_seed(Collect {
                out: &mut *self.out,
                key: false,
            })?;
        }
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, doc)) = data.split_first() else {
        return;
    };
    let ours = stream(doc, doc.len().max(1));
    let step = usize::from(step).max(1);
    assert_eq!(ours, stream(doc, step));
    let loose = read(JsonStrings::lenient(), doc, doc.len().max(1));
    assert_eq!(loose, read(JsonStrings::lenient(), doc, step));
    let (strict_strings, strict_result) = read(JsonStrings::new(), doc, step);
    match (&strict_result, &loose.1) {
        (Ok(()), lenient) => {
            assert_eq!(*lenient, Ok(()));
            assert_eq!(strict_strings, loose.0);
        }
        (Err(JsonError::TooDeep), lenient) => assert_eq!(*lenient, Err(JsonError::TooDeep)),
        (Err(_), _) => {
            // What the strict reader found before its error, the lenient one finds too.
            assert!(loose.0.len() >= strict_strings.len());
            assert_eq!(loose.0[..strict_strings.len()], strict_strings[..]);
        }
    }
    if JsonEncoding::detect(&doc[..doc.len().min(4)]) == JsonEncoding::Utf8 {
        assert_eq!(through_text(doc, step), doc);
    }
    let mut theirs = Vec::new();
    let mut de = serde_json::Deserializer::from_slice(doc);
    let accepted = Collect {
        out: &mut theirs,
        key: false,
    }
    .deserialize(&mut de)
    .and_then(|()| de.end())
    .is_ok();
    if accepted {
        assert_eq!(ours, Ok(theirs), "serde_json accepts it");
    }
});
