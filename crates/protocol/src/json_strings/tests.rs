use super::*;

/// The strings of `doc` fed in chunks of `step` bytes: (is a key, bytes).
fn strings(doc: &[u8], step: usize) -> Result<Vec<(bool, Vec<u8>)>, JsonError> {
    let mut out: Vec<(bool, Vec<u8>)> = Vec::new();
    let mut open = false;
    let mut on = |e: JsonEvent<'_>| match e {
        JsonEvent::StringStart { key } => {
            assert!(!open);
            open = true;
            out.push((key, Vec::new()));
        }
        JsonEvent::StringData(d) => {
            assert!(open);
            out.last_mut().unwrap().1.extend_from_slice(d);
        }
        JsonEvent::StringEnd => {
            assert!(open);
            open = false;
        }
    };
    let mut p = JsonStrings::new();
    for chunk in doc.chunks(step.max(1)) {
        p.feed(chunk, &mut on)?;
    }
    p.finish()?;
    Ok(out)
}

/// What serde_json reads as the strings of `doc`, in document order.
fn serde_strings(doc: &[u8]) -> Option<Vec<(bool, Vec<u8>)>> {
    fn walk(v: &serde_json::Value, out: &mut Vec<(bool, Vec<u8>)>) {
        match v {
            serde_json::Value::String(s) => out.push((false, s.as_bytes().to_vec())),
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            serde_json::Value::Object(o) => o.iter().for_each(|(k, v)| {
                out.push((true, k.as_bytes().to_vec()));
                walk(v, out);
            }),
            _ => {}
        }
    }
    let v: serde_json::Value = serde_json::from_slice(doc).ok()?;
    let mut out = Vec::new();
    walk(&v, &mut out);
    Some(out)
}

#[test]
fn strings_come_out_unescaped_at_every_chunk_size() {
    let doc = br#" {"file":"QUJD\/RA==\n","n":[1,-0.5e+3,true,false,null,{}],"k\u00e9y":"\ud83d\ude00\"\\\b\f\r\t"} "#;
    let want = vec![
        (true, b"file".to_vec()),
        (false, b"QUJD/RA==\n".to_vec()),
        (true, b"n".to_vec()),
        (true, "kéy".as_bytes().to_vec()),
        (false, "😀\"\\\x08\x0c\r\t".as_bytes().to_vec()),
    ];
    for step in [1, 2, 3, 5, 8, 1000] {
        assert_eq!(strings(doc, step).unwrap(), want, "step {step}");
    }
}

#[test]
fn agrees_with_serde_json() {
    for doc in [
        &br#"{"a":{"b":["c",{"d":"e"}]},"f":"g"}"#[..],
        br#"["\u0041\u00e9\u4e2d\ud834\udd1e"]"#,
        br#""top-level string""#,
        b"[0,1.5,-2e10,3E-2]",
        b"[[],[[]],{}]",
    ] {
        let serde = serde_strings(doc).expect("serde_json reads it");
        for step in [1, 3, 100] {
            assert_eq!(strings(doc, step).unwrap(), serde);
        }
    }
}

#[test]
fn lenient_where_common_parsers_are() {
    assert_eq!(
        strings(b"\xef\xbb\xbf[\"a\"]", 1).unwrap(),
        vec![(false, b"a".to_vec())]
    );
    // A lone surrogate, then an ordinary escape after it.
    assert_eq!(
        strings(br#"["\ud800\n","\udc00","\ud800\u0041"]"#, 1).unwrap(),
        vec![
            (false, b"\xed\xa0\x80\n".to_vec()),
            (false, b"\xed\xb0\x80".to_vec()),
            (false, b"\xed\xa0\x80A".to_vec()),
        ]
    );
    assert_eq!(strings(b"42", 1).unwrap(), vec![]);
    assert_eq!(strings(b"1e999", 1).unwrap(), vec![]);
}

#[test]
fn malformed_documents_are_errors() {
    for doc in [
        &b"[1,]"[..],
        b"{\"a\":1,}",
        b"{\"a\" 1}",
        b"{1:2}",
        b"[01]",
        b"[1.]",
        b"[-]",
        b"[1e]",
        b"[tru]",
        b"[\"a\x01\"]",
        b"[\"\\x\"]",
        b"[\"\\u12G4\"]",
        b"[1] [2]",
        b"[}",
        b"{]",
        b"'a'",
        b"\xef\xbb[]",
    ] {
        assert!(
            matches!(strings(doc, 1), Err(JsonError::Syntax(_))),
            "{}",
            String::from_utf8_lossy(doc)
        );
    }
    for doc in [&b""[..], b"  ", b"[", b"{\"a\"", b"\"abc", b"-", b"[1"] {
        assert_eq!(strings(doc, 1), Err(JsonError::Truncated), "{doc:?}");
    }
}

/// The strings a lenient reader hands on, and whether it found the text malformed.
fn lenient_strings(doc: &[u8], step: usize) -> (Vec<Vec<u8>>, bool) {
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut on = |e: JsonEvent<'_>| match e {
        JsonEvent::StringStart { .. } => out.push(Vec::new()),
        JsonEvent::StringData(d) => out.last_mut().unwrap().extend_from_slice(d),
        JsonEvent::StringEnd => {}
    };
    let mut p = JsonStrings::lenient();
    for chunk in doc.chunks(step.max(1)) {
        p.feed(chunk, &mut on).unwrap();
    }
    let malformed = p.is_malformed();
    assert_eq!(malformed, p.finish().is_err());
    (out, malformed)
}

#[test]
fn a_lenient_reader_hands_on_the_strings_after_a_syntax_error() {
    for step in [1, 2, 5, 1000] {
        // Python reads NaN; JSON Lines and Go's decoder read values after the first;
        // `strict=False` accepts control bytes in strings.
        let (s, malformed) = lenient_strings(
            b"{\"a\":NaN,\"f\":\"QUJD\"}\n{\"g\":\"x\ty\\qz\"} 'h' \"i",
            step,
        );
        assert!(malformed);
        let want: Vec<Vec<u8>> = vec![
            b"a".to_vec(),
            b"f".to_vec(),
            b"QUJD".to_vec(),
            b"g".to_vec(),
            b"x\tyqz".to_vec(),
            b"i".to_vec(),
        ];
        assert_eq!(s, want, "step {step}");
        // Well-formed: the strict reading.
        let (s, malformed) = lenient_strings(br#"{"k":["v\u0041"]}"#, step);
        assert!(!malformed);
        assert_eq!(s, vec![b"k".to_vec(), b"vA".to_vec()]);
    }
}

fn text(doc: &[u8], step: usize) -> Vec<u8> {
    let mut t = JsonText::new();
    let mut out = Vec::new();
    for chunk in doc.chunks(step.max(1)) {
        t.feed(chunk, &mut out);
    }
    t.finish(&mut out);
    out
}

#[test]
fn utf16_and_utf32_json_is_read_as_python_detects_it() {
    let doc = "{\"f\":\"QUJD\",\"é\":1}";
    let utf16le: Vec<u8> = doc.encode_utf16().flat_map(u16::to_le_bytes).collect();
    let utf16be: Vec<u8> = doc.encode_utf16().flat_map(u16::to_be_bytes).collect();
    let bom16: Vec<u8> = "\u{feff}"
        .encode_utf16()
        .chain(doc.encode_utf16())
        .flat_map(u16::to_le_bytes)
        .collect();
    let utf32be: Vec<u8> = doc
        .chars()
        .flat_map(|c| u32::from(c).to_be_bytes())
        .collect();
    let bom32: Vec<u8> = "\u{feff}"
        .chars()
        .chain(doc.chars())
        .flat_map(|c| u32::from(c).to_le_bytes())
        .collect();
    let want = "{\"f\":\"QUJD\",\"\u{fffd}\":1}".as_bytes();
    for (enc, encoded) in [
        (JsonEncoding::Utf16Le, utf16le),
        (JsonEncoding::Utf16Be, utf16be),
        (JsonEncoding::Utf16Le, bom16),
        (JsonEncoding::Utf32Be, utf32be),
        (JsonEncoding::Utf32Le, bom32),
    ] {
        assert_eq!(JsonEncoding::detect(&encoded[..4]), enc);
        for step in [1, 3, 1000] {
            assert_eq!(text(&encoded, step), want, "{enc:?} step {step}");
        }
    }
    assert_eq!(text(doc.as_bytes(), 3), doc.as_bytes());
    assert_eq!(text(b"[]", 1), b"[]");
    assert_eq!(text(b"[\0]\0", 1), b"[]");
}

#[test]
fn nesting_is_bounded() {
    let deep = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
    assert!(strings(deep.as_bytes(), 64).is_ok());
    let deeper = "[".repeat(MAX_DEPTH + 1);
    assert_eq!(strings(deeper.as_bytes(), 64), Err(JsonError::TooDeep));
}
