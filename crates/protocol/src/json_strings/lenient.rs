//! The lenient reader: where it goes on after a syntax error.

use super::{JsonEvent, JsonStrings, State};

impl JsonStrings {
    /// A reader that goes on after a syntax error: from there it hands on every
    /// double-quoted string (escapes undone where they are valid, control bytes kept) and
    /// skips everything else; [`JsonStrings::finish`] reports the first error.
    pub fn lenient() -> JsonStrings {
        JsonStrings {
            lenient: true,
            ..JsonStrings::new()
        }
    }

    /// Whether a lenient reader has met a syntax error.
    pub fn is_malformed(&self) -> bool {
        self.error.is_some()
    }

    /// Where a lenient reader goes on after a syntax error at `chunk[i]`; the index of the
    /// next byte to read.
    pub(super) fn recover(
        &mut self,
        chunk: &[u8],
        i: usize,
        on: &mut dyn FnMut(JsonEvent<'_>),
    ) -> usize {
        match self.state {
            State::InString | State::Escape => {
                // A control byte, or an escape no parser knows: kept as the byte it is.
                on(JsonEvent::StringData(&chunk[i..=i]));
                self.state = State::InString;
                i + 1
            }
            State::Unicode { .. } | State::LowSurrogate { .. } => {
                self.state = State::InString;
                i
            }
            _ => {
                self.stack.clear();
                self.state = State::Loose;
                i
            }
        }
    }
}
