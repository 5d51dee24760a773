//! The streaming JSON string reader against serde_json: whatever serde_json accepts, the
//! reader accepts too, with the same strings (keys included) in document order, and its
//! answer does not depend on how the document is cut into pieces.
#![no_main]

use std::fmt;

use libfuzzer_sys::fuzz_target;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use virus_scanner_protocol::json_strings::{JsonError, JsonEvent, JsonStrings};

type Strings = Vec<(bool, Vec<u8>)>;

fn stream(doc: &[u8], step: usize) -> Result<Strings, JsonError> {
    let mut out: Strings = Vec::new();
    let mut on = |e: JsonEvent<'_>| match e {
        JsonEvent::StringStart { key } => out.push((key, Vec::new())),
        JsonEvent::StringData(d) => out
            .last_mut()
            .expect("a string is open")
            .1
            .extend_from_slice(d),
        JsonEvent::StringEnd => {}
    };
    let mut p = JsonStrings::new();
    for piece in doc.chunks(step) {
        p.feed(piece, &mut on)?;
    }
    p.finish()?;
    Ok(out)
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
    assert_eq!(ours, stream(doc, usize::from(step).max(1)));
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
