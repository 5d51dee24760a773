//! Media types as they appear in `Content-Type` (RFC 2045 §5.1, RFC 9110 §8.3.1): a type, a
//! subtype and parameters whose values are tokens or quoted strings with backslash escapes.
//! Every parameter is kept, duplicates included, so that a caller can refuse a header that
//! different readers would understand differently instead of picking one reading.

/// More parameters than this is not a media type any client sends.
pub const MAX_PARAMS: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MediaTypeError {
    #[error("media type has no token/token essence")]
    BadEssence,
    #[error("media type parameter is malformed at byte {0}")]
    BadParameter(usize),
    #[error("quoted parameter value is not closed")]
    Unterminated,
    #[error("media type has more than {MAX_PARAMS} parameters")]
    TooManyParams,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaType {
    /// Lower-cased.
    pub ty: String,
    /// Lower-cased.
    pub subtype: String,
    pub params: Vec<Param>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    /// Lower-cased: parameter names are case-insensitive (RFC 2045 §5.1).
    pub name: String,
    /// The value with quotes and escapes removed.
    pub value: Vec<u8>,
    /// The value was a quoted string.
    pub quoted: bool,
    /// The quoted string held a backslash escape, which naive readers keep as is.
    pub escaped: bool,
}

impl MediaType {
    pub fn is_multipart(&self) -> bool {
        self.ty == "multipart"
    }

    /// `application/json` or any `+json` structured syntax suffix (RFC 6839 §3.1).
    pub fn is_json(&self) -> bool {
        (self.ty == "application" && self.subtype == "json") || self.subtype.ends_with("+json")
    }

    /// Every parameter of that (lower-case) name, in order.
    pub fn params_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Param> + 'a {
        self.params.iter().filter(move |p| p.name == name)
    }
}

/// RFC 9110 §5.6.2 `tchar`.
pub fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

fn is_ows(c: u8) -> bool {
    c == b' ' || c == b'\t'
}

/// Parses a `Content-Type` value. Whitespace is allowed around `;` and, leniently, around
/// `=`; empty parameters (`;;`, a trailing `;`) are allowed as RFC 9110 does.
pub fn parse(value: &[u8]) -> Result<MediaType, MediaTypeError> {
    let mut i = 0;
    let skip_ows = |i: &mut usize| {
        while *i < value.len() && is_ows(value[*i]) {
            *i += 1;
        }
    };
    let token = |i: &mut usize| -> &[u8] {
        let start = *i;
        while *i < value.len() && is_tchar(value[*i]) {
            *i += 1;
        }
        &value[start..*i]
    };
    skip_ows(&mut i);
    let ty = token(&mut i);
    if ty.is_empty() || value.get(i) != Some(&b'/') {
        return Err(MediaTypeError::BadEssence);
    }
    i += 1;
    let subtype = token(&mut i);
    if subtype.is_empty() {
        return Err(MediaTypeError::BadEssence);
    }
    let mut media = MediaType {
        ty: String::from_utf8_lossy(ty).to_ascii_lowercase(),
        subtype: String::from_utf8_lossy(subtype).to_ascii_lowercase(),
        params: Vec::new(),
    };
    loop {
        skip_ows(&mut i);
        match value.get(i) {
            None => return Ok(media),
            Some(b';') => i += 1,
            Some(_) => return Err(MediaTypeError::BadParameter(i)),
        }
        skip_ows(&mut i);
        match value.get(i) {
            None => return Ok(media),
            Some(b';') => continue,
            Some(_) => {}
        }
        let name_at = i;
        let name = token(&mut i);
        if name.is_empty() {
            return Err(MediaTypeError::BadParameter(name_at));
        }
        skip_ows(&mut i);
        if value.get(i) != Some(&b'=') {
            return Err(MediaTypeError::BadParameter(i));
        }
        i += 1;
        skip_ows(&mut i);
        let mut param = Param {
            name: String::from_utf8_lossy(name).to_ascii_lowercase(),
            value: Vec::new(),
            quoted: false,
            escaped: false,
        };
        if value.get(i) == Some(&b'"') {
            param.quoted = true;
            i += 1;
            loop {
                match value.get(i) {
                    None => return Err(MediaTypeError::Unterminated),
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    // quoted-pair = "\" ( HTAB / SP / VCHAR / obs-text )
                    Some(b'\\') => match value.get(i + 1) {
                        Some(&c) if c == b'\t' || c >= b' ' && c != 0x7f => {
                            param.value.push(c);
                            param.escaped = true;
                            i += 2;
                        }
                        None => return Err(MediaTypeError::Unterminated),
                        Some(_) => return Err(MediaTypeError::BadParameter(i + 1)),
                    },
                    // qdtext = HTAB / SP / %x21 / %x23-5B / %x5D-7E / obs-text
                    Some(&c) if c == b'\t' || c >= b' ' && c != 0x7f => {
                        param.value.push(c);
                        i += 1;
                    }
                    Some(_) => return Err(MediaTypeError::BadParameter(i)),
                }
            }
        } else {
            let v = token(&mut i);
            if v.is_empty() {
                return Err(MediaTypeError::BadParameter(i));
            }
            param.value = v.to_vec();
        }
        if media.params.len() == MAX_PARAMS {
            return Err(MediaTypeError::TooManyParams);
        }
        media.params.push(param);
    }
}

/// The essence (`type/subtype`) of a value that may not parse, lower-cased and trimmed: what
/// a reader that only splits at the first `;` sees.
pub fn loose_essence(value: &[u8]) -> String {
    let end = memchr::memchr(b';', value).unwrap_or(value.len());
    String::from_utf8_lossy(value[..end].trim_ascii()).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(v: &str) -> Vec<(String, String)> {
        parse(v.as_bytes())
            .unwrap()
            .params
            .into_iter()
            .map(|p| (p.name, String::from_utf8(p.value).unwrap()))
            .collect()
    }

    fn p(name: &str, value: &str) -> (String, String) {
        (name.to_owned(), value.to_owned())
    }

    #[test]
    fn essence_is_lower_cased_and_whitespace_tolerated() {
        let m = parse(b"  Multipart/Form-Data ;  Boundary=AbC ; ").unwrap();
        assert_eq!(
            (m.ty.as_str(), m.subtype.as_str()),
            ("multipart", "form-data")
        );
        assert!(m.is_multipart());
        assert_eq!(
            params("text/plain; Boundary=AbC"),
            vec![p("boundary", "AbC")]
        );
        assert_eq!(params("text/plain;;a=1;"), vec![p("a", "1")]);
        assert_eq!(params("text/plain; a = 1"), vec![p("a", "1")]);
    }

    #[test]
    fn quoted_strings_hide_semicolons_and_undo_escapes() {
        assert_eq!(
            params(r#"multipart/form-data; x="; boundary=A;"; boundary=B"#),
            vec![p("x", "; boundary=A;"), p("boundary", "B")]
        );
        let m = parse(br#"a/b; q="a\"b\\c""#).unwrap();
        assert_eq!(m.params[0].value, br#"a"b\c"#);
        assert!(m.params[0].quoted && m.params[0].escaped);
        let m = parse(br#"a/b; q="plain""#).unwrap();
        assert!(m.params[0].quoted && !m.params[0].escaped);
    }

    #[test]
    fn duplicates_are_all_kept() {
        let m = parse(b"multipart/mixed; boundary=A; BOUNDARY=B").unwrap();
        let b: Vec<&[u8]> = m.params_named("boundary").map(|p| &p.value[..]).collect();
        assert_eq!(b, vec![&b"A"[..], &b"B"[..]]);
    }

    #[test]
    fn json_types_are_recognised() {
        assert!(parse(b"application/json; charset=utf-8").unwrap().is_json());
        assert!(parse(b"application/vnd.api+JSON").unwrap().is_json());
        assert!(!parse(b"application/jsonx").unwrap().is_json());
        assert!(!parse(b"text/plain").unwrap().is_json());
    }

    #[test]
    fn malformed_values_are_errors() {
        assert_eq!(parse(b""), Err(MediaTypeError::BadEssence));
        assert_eq!(parse(b"text"), Err(MediaTypeError::BadEssence));
        assert_eq!(parse(b"text/"), Err(MediaTypeError::BadEssence));
        assert_eq!(parse(b"text /plain"), Err(MediaTypeError::BadEssence));
        assert_eq!(
            parse(b"text/plain boundary=a"),
            Err(MediaTypeError::BadParameter(11))
        );
        assert_eq!(
            parse(b"text/plain; boundary"),
            Err(MediaTypeError::BadParameter(20))
        );
        assert_eq!(
            parse(b"text/plain; a=\"open"),
            Err(MediaTypeError::Unterminated)
        );
        assert_eq!(
            parse(b"text/plain; a=\"x\"y"),
            Err(MediaTypeError::BadParameter(17))
        );
        assert_eq!(
            parse(b"text/plain; a=\"x\ny\""),
            Err(MediaTypeError::BadParameter(16))
        );
        assert_eq!(
            parse(b"text/plain, text/html"),
            Err(MediaTypeError::BadParameter(10))
        );
        assert_eq!(
            parse(b"text/plain; a=b c"),
            Err(MediaTypeError::BadParameter(16))
        );
        let many = format!("a/b{}", "; x=1".repeat(MAX_PARAMS + 1));
        assert_eq!(parse(many.as_bytes()), Err(MediaTypeError::TooManyParams));
    }

    #[test]
    fn loose_essence_splits_at_the_first_semicolon() {
        assert_eq!(loose_essence(b" Multipart/Mixed x; y"), "multipart/mixed x");
        assert_eq!(loose_essence(b"text/plain"), "text/plain");
    }
}
