//! A streaming JSON reader (RFC 8259) that checks the whole grammar but hands on only the
//! strings, keys and values alike, with their escapes undone: upload APIs carry files as
//! base64 inside JSON strings, and the producer scans those without building a tree of a
//! body that may be hundreds of MiB. A string is handed on in pieces as it arrives, so no
//! string is held whole either; the reader keeps one byte per nesting level and a few bytes
//! of an unfinished escape.
//!
//! It is as lenient as the common parsers where they are lenient: a leading UTF-8 byte
//! order mark is skipped (Jackson, .NET and many body parsers accept it), lone surrogate
//! escapes are kept (JavaScript's and Python's `JSON.parse`/`json.loads` accept them; they
//! come out as their WTF-8 bytes), and numbers are checked for syntax only. Whatever
//! serde_json accepts, this accepts with the same strings (the fuzz target checks it).
//!
//! [`JsonStrings::lenient`] goes on after a syntax error, handing on every string that
//! follows: receivers read more than RFC 8259 (`NaN` in Python, values after the first in
//! JSON Lines and Go's decoder, control characters with `strict=False`), and the strings
//! after such a spot reach them all the same. [`JsonText`] turns the UTF-16 and UTF-32 that
//! Python's `json.loads` detects into UTF-8 for it.

mod escape;
mod lenient;
mod reader;
mod text;

pub use text::{JsonEncoding, JsonText};

/// Deeper nesting than this is refused rather than read as not-JSON: parsers without a
/// depth limit (V8's is iterative) would still find the strings inside.
pub const MAX_DEPTH: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    #[error("JSON is malformed at byte {0}")]
    Syntax(u64),
    #[error("JSON ends inside a value")]
    Truncated,
    #[error("JSON nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

#[derive(Debug, PartialEq, Eq)]
pub enum JsonEvent<'a> {
    /// A string begins; `key` when it names an object member.
    StringStart {
        key: bool,
    },
    /// The next bytes of the string, unescaped.
    StringData(&'a [u8]),
    StringEnd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Number {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ESign,
    Exp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start: bytes of a UTF-8 BOM matched so far.
    Bom(u8),
    Value,
    /// After `[`: a value or `]`.
    ArrayFirst,
    /// After `{`: a key or `}`.
    ObjectFirst,
    /// After `,` in an object.
    Key,
    Colon,
    AfterValue,
    InString,
    Escape,
    Unicode {
        high: Option<u16>,
        digits: u8,
        unit: u16,
    },
    /// After a high surrogate escape: is `\u` of its low half next?
    LowSurrogate {
        high: u16,
        backslash: bool,
    },
    Number(Number),
    Literal(&'static [u8]),
    Done,
    /// Lenient, after a syntax error: outside strings, looking for the next one.
    Loose,
}

#[derive(Debug, Clone)]
pub struct JsonStrings {
    state: State,
    /// One entry per open container: true for an object.
    stack: Vec<bool>,
    key: bool,
    offset: u64,
    lenient: bool,
    /// The first syntax error a lenient reader went on after.
    error: Option<JsonError>,
}

impl Default for JsonStrings {
    fn default() -> Self {
        JsonStrings::new()
    }
}

#[cfg(test)]
mod tests;
