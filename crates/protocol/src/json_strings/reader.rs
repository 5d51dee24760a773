//! The grammar: one byte at a time through values, containers, strings and numbers.

use super::escape::emit_code_point;
use super::{JsonError, JsonEvent, JsonStrings, MAX_DEPTH, Number, State};

fn is_whitespace(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r')
}

impl JsonStrings {
    pub fn new() -> JsonStrings {
        JsonStrings {
            state: State::Bom(0),
            stack: Vec::new(),
            key: false,
            offset: 0,
            lenient: false,
            error: None,
        }
    }

    fn syntax(&self, at: usize) -> JsonError {
        JsonError::Syntax(self.offset + at as u64)
    }

    fn end_value(&mut self) {
        self.state = if self.stack.is_empty() {
            State::Done
        } else {
            State::AfterValue
        };
    }

    fn open(&mut self, object: bool) -> Result<(), JsonError> {
        if self.stack.len() == MAX_DEPTH {
            return Err(JsonError::TooDeep);
        }
        self.stack.push(object);
        self.state = if object {
            State::ObjectFirst
        } else {
            State::ArrayFirst
        };
        Ok(())
    }

    /// A value may start here.
    fn value(
        &mut self,
        c: u8,
        at: usize,
        on: &mut dyn FnMut(JsonEvent<'_>),
    ) -> Result<(), JsonError> {
        match c {
            b'"' => {
                self.key = false;
                on(JsonEvent::StringStart { key: false });
                self.state = State::InString;
            }
            b'{' => self.open(true)?,
            b'[' => self.open(false)?,
            b'-' => self.state = State::Number(Number::Minus),
            b'0' => self.state = State::Number(Number::Zero),
            b'1'..=b'9' => self.state = State::Number(Number::Int),
            b't' => self.state = State::Literal(b"rue"),
            b'f' => self.state = State::Literal(b"alse"),
            b'n' => self.state = State::Literal(b"ull"),
            _ => return Err(self.syntax(at)),
        }
        Ok(())
    }

    fn close(&mut self, object: bool, at: usize) -> Result<(), JsonError> {
        if self.stack.pop() != Some(object) {
            return Err(self.syntax(at));
        }
        self.end_value();
        Ok(())
    }

    /// Feeds the next bytes of the document.
    pub fn feed(
        &mut self,
        chunk: &[u8],
        on: &mut dyn FnMut(JsonEvent<'_>),
    ) -> Result<(), JsonError> {
        let mut i = 0;
        while i < chunk.len() {
            i = match self.step(chunk, i, on) {
                Ok(next) => next,
                Err(e @ JsonError::Syntax(_)) if self.lenient => {
                    self.error.get_or_insert(e);
                    self.recover(chunk, i, on)
                }
                Err(e) => return Err(e),
            };
        }
        self.offset += chunk.len() as u64;
        Ok(())
    }

    /// Reads `chunk[i]` (or a run of string bytes from there); the index of the next byte
    /// to read.
    fn step(
        &mut self,
        chunk: &[u8],
        i: usize,
        on: &mut dyn FnMut(JsonEvent<'_>),
    ) -> Result<usize, JsonError> {
        let c = chunk[i];
        match self.state {
            State::InString => {
                let run = chunk[i..]
                    .iter()
                    .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
                    .unwrap_or(chunk.len() - i);
                if run > 0 {
                    on(JsonEvent::StringData(&chunk[i..i + run]));
                    return Ok(i + run);
                }
                match c {
                    b'"' => {
                        on(JsonEvent::StringEnd);
                        if self.error.is_some() {
                            self.state = State::Loose;
                        } else if self.key {
                            self.state = State::Colon;
                        } else {
                            self.end_value();
                        }
                    }
                    b'\\' => self.state = State::Escape,
                    _ => return Err(self.syntax(i)),
                }
            }
            State::Escape => {
                let b = match c {
                    b'"' | b'\\' | b'/' => c,
                    b'b' => 0x08,
                    b'f' => 0x0c,
                    b'n' => b'\n',
                    b'r' => b'\r',
                    b't' => b'\t',
                    b'u' => {
                        self.state = State::Unicode {
                            high: None,
                            digits: 0,
                            unit: 0,
                        };
                        return Ok(i + 1);
                    }
                    _ => return Err(self.syntax(i)),
                };
                on(JsonEvent::StringData(&[b]));
                self.state = State::InString;
            }
            State::Unicode { high, digits, unit } => {
                let d = (c as char).to_digit(16).ok_or_else(|| self.syntax(i))?;
                let unit = unit << 4 | d as u16;
                if digits < 3 {
                    self.state = State::Unicode {
                        high,
                        digits: digits + 1,
                        unit,
                    };
                } else {
                    self.code_unit(high, unit, on);
                }
            }
            State::LowSurrogate { high, backslash } => {
                if !backslash && c == b'\\' {
                    self.state = State::LowSurrogate {
                        high,
                        backslash: true,
                    };
                } else if backslash && c == b'u' {
                    self.state = State::Unicode {
                        high: Some(high),
                        digits: 0,
                        unit: 0,
                    };
                } else {
                    // A lone high surrogate; this byte is read again after it.
                    emit_code_point(u32::from(high), on);
                    self.state = if backslash {
                        State::Escape
                    } else {
                        State::InString
                    };
                    return Ok(i);
                }
            }
            State::Number(n) => {
                let next = match (n, c) {
                    (Number::Minus, b'0') => Some(Number::Zero),
                    (Number::Minus, b'1'..=b'9') => Some(Number::Int),
                    (Number::Int, b'0'..=b'9') => Some(Number::Int),
                    (Number::Zero | Number::Int, b'.') => Some(Number::Dot),
                    (Number::Dot | Number::Frac, b'0'..=b'9') => Some(Number::Frac),
                    (Number::Zero | Number::Int | Number::Frac, b'e' | b'E') => Some(Number::E),
                    (Number::E, b'+' | b'-') => Some(Number::ESign),
                    (Number::E | Number::ESign | Number::Exp, b'0'..=b'9') => Some(Number::Exp),
                    (Number::Zero | Number::Int | Number::Frac | Number::Exp, _) => None,
                    _ => return Err(self.syntax(i)),
                };
                match next {
                    Some(n) => self.state = State::Number(n),
                    None => {
                        // The number ended: this byte belongs to what follows it.
                        self.end_value();
                        return Ok(i);
                    }
                }
            }
            State::Literal(rest) => {
                if rest.first() != Some(&c) {
                    return Err(self.syntax(i));
                }
                if rest.len() == 1 {
                    self.end_value();
                } else {
                    self.state = State::Literal(&rest[1..]);
                }
            }
            State::Bom(matched) => {
                const BOM: [u8; 3] = [0xef, 0xbb, 0xbf];
                if c == BOM[usize::from(matched)] {
                    self.state = if matched == 2 {
                        State::Value
                    } else {
                        State::Bom(matched + 1)
                    };
                } else if matched == 0 {
                    self.state = State::Value;
                    return Ok(i);
                } else {
                    return Err(self.syntax(i));
                }
            }
            State::Loose if c == b'"' => {
                self.key = false;
                on(JsonEvent::StringStart { key: false });
                self.state = State::InString;
            }
            State::Loose => {}
            _ if is_whitespace(c) => {}
            State::Value => self.value(c, i, on)?,
            State::ArrayFirst if c == b']' => self.close(false, i)?,
            State::ArrayFirst => self.value(c, i, on)?,
            State::ObjectFirst | State::Key if c == b'"' => {
                self.key = true;
                on(JsonEvent::StringStart { key: true });
                self.state = State::InString;
            }
            State::ObjectFirst if c == b'}' => self.close(true, i)?,
            State::Colon if c == b':' => self.state = State::Value,
            State::AfterValue => match (c, self.stack.last()) {
                (b',', Some(true)) => self.state = State::Key,
                (b',', Some(false)) => self.state = State::Value,
                (b']', _) => self.close(false, i)?,
                (b'}', _) => self.close(true, i)?,
                _ => return Err(self.syntax(i)),
            },
            State::ObjectFirst | State::Key | State::Colon | State::Done => {
                return Err(self.syntax(i));
            }
        }
        Ok(i + 1)
    }

    /// The document ended: it must have been exactly one complete value.
    pub fn finish(self) -> Result<(), JsonError> {
        if let Some(e) = self.error {
            return Err(e);
        }
        match self.state {
            State::Done => Ok(()),
            State::Number(Number::Zero | Number::Int | Number::Frac | Number::Exp)
                if self.stack.is_empty() =>
            {
                Ok(())
            }
            _ => Err(JsonError::Truncated),
        }
    }
}
