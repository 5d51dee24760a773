//! String escapes undone: `\uXXXX` code units joined into code points, surrogate pairs
//! and lone surrogates alike, written out as WTF-8.

use super::{JsonEvent, JsonStrings, State};

/// WTF-8: UTF-8 that also encodes lone surrogates.
fn push_code_point(cp: u32, out: &mut [u8; 4]) -> usize {
    match cp {
        0..=0x7f => {
            out[0] = cp as u8;
            1
        }
        0x80..=0x7ff => {
            out[0] = 0xc0 | (cp >> 6) as u8;
            out[1] = 0x80 | (cp & 0x3f) as u8;
            2
        }
        0x800..=0xffff => {
            out[0] = 0xe0 | (cp >> 12) as u8;
            out[1] = 0x80 | (cp >> 6 & 0x3f) as u8;
            out[2] = 0x80 | (cp & 0x3f) as u8;
            3
        }
        _ => {
            out[0] = 0xf0 | (cp >> 18) as u8;
            out[1] = 0x80 | (cp >> 12 & 0x3f) as u8;
            out[2] = 0x80 | (cp >> 6 & 0x3f) as u8;
            out[3] = 0x80 | (cp & 0x3f) as u8;
            4
        }
    }
}

pub(super) fn emit_code_point(cp: u32, on: &mut dyn FnMut(JsonEvent<'_>)) {
    let mut buf = [0u8; 4];
    let n = push_code_point(cp, &mut buf);
    on(JsonEvent::StringData(&buf[..n]));
}

impl JsonStrings {
    /// A `\uXXXX` escape completed with `unit`.
    pub(super) fn code_unit(
        &mut self,
        high: Option<u16>,
        unit: u16,
        on: &mut dyn FnMut(JsonEvent<'_>),
    ) {
        if let Some(high) = high {
            if (0xdc00..0xe000).contains(&unit) {
                let cp = 0x10000 + ((u32::from(high) - 0xd800) << 10) + (u32::from(unit) - 0xdc00);
                emit_code_point(cp, on);
                self.state = State::InString;
                return;
            }
            emit_code_point(u32::from(high), on);
        }
        if (0xd800..0xdc00).contains(&unit) {
            self.state = State::LowSurrogate {
                high: unit,
                backslash: false,
            };
        } else {
            emit_code_point(u32::from(unit), on);
            self.state = State::InString;
        }
    }
}
