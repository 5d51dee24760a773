use std::io::Write;

use super::*;

fn limits(dir: &std::path::Path) -> BodyLimits {
    BodyLimits {
        spill_dir: dir.to_path_buf(),
        spill_threshold: 1024,
        max: 1 << 20,
    }
}

fn opts(max_decoded: u64) -> UnpackOptions {
    UnpackOptions {
        max_decoded,
        embedded_files: true,
    }
}

fn read(b: &Body) -> Vec<u8> {
    let mut v = Vec::new();
    b.reader().unwrap().read_to_end(&mut v).unwrap();
    v
}

fn contents(u: Unpacked) -> Vec<Vec<u8>> {
    match u {
        Unpacked::Original => vec![b"<original>".to_vec()],
        Unpacked::Files(files) => files.iter().map(read).collect(),
        Unpacked::OriginalAnd(files) => std::iter::once(b"<original>".to_vec())
            .chain(files.iter().map(read))
            .collect(),
        Unpacked::Unscannable(why) => panic!("unscannable: {why}"),
        Unpacked::Refused(why) => panic!("refused: {why}"),
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn headers(ce: Option<&str>, ct: Option<&str>) -> BodyHeaders {
    BodyHeaders {
        content_encoding: ce.map(str::to_owned),
        content_type: ct.map(str::to_owned),
        refusal: None,
    }
}

#[test]
fn a_gzip_body_of_several_members_is_scanned_whole_and_as_its_first_member() {
    let dir = tempfile::tempdir().unwrap();
    let l = limits(dir.path());
    let mut body = gzip(b"the file");
    body.extend(gzip(b" and more"));
    let body = Body::from_vec(body, &l).unwrap();
    let out = unpack(&body, &headers(Some("gzip"), None), &l, &opts(1 << 20)).unwrap();
    assert_eq!(
        contents(out),
        vec![b"the file and more".to_vec(), b"the file".to_vec()]
    );
    // One member (or an empty second one): one file.
    let mut body = gzip(b"the file");
    body.extend(gzip(b""));
    let body = Body::from_vec(body, &l).unwrap();
    let out = unpack(&body, &headers(Some("gzip"), None), &l, &opts(1 << 20)).unwrap();
    assert_eq!(contents(out), vec![b"the file".to_vec()]);
    // Several members under another coding: refused.
    let mut two = gzip(&gzip(b"a"));
    two.extend(gzip(&gzip(b"b")));
    let body = Body::from_vec(two, &l).unwrap();
    let out = unpack(
        &body,
        &headers(Some("gzip, gzip"), None),
        &l,
        &opts(1 << 20),
    )
    .unwrap();
    assert!(matches!(out, Unpacked::Refused(_)), "{out:?}");
}

#[test]
fn stacked_encodings_are_undone_in_reverse() {
    let dir = tempfile::tempdir().unwrap();
    let l = limits(dir.path());
    let data = b"the payload ".repeat(300);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(&gzip(&data)).unwrap();
    let body = Body::from_vec(z.finish().unwrap(), &l).unwrap();
    let out = unpack(
        &body,
        &headers(Some("gzip, deflate"), None),
        &l,
        &opts(1 << 20),
    )
    .unwrap();
    assert_eq!(contents(out), vec![data]);
}

#[test]
fn raw_deflate_and_identity_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let l = limits(dir.path());
    let mut d = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    d.write_all(b"raw").unwrap();
    let body = Body::from_vec(d.finish().unwrap(), &l).unwrap();
    assert_eq!(
        contents(unpack(&body, &headers(Some("deflate"), None), &l, &opts(100)).unwrap()),
        vec![b"raw".to_vec()]
    );
    let body = Body::from_vec(b"plain".to_vec(), &l).unwrap();
    assert!(matches!(
        unpack(&body, &headers(Some("identity"), None), &l, &opts(100)).unwrap(),
        Unpacked::Original
    ));
}

#[test]
fn decompression_bomb_is_unscannable() {
    let dir = tempfile::tempdir().unwrap();
    let l = limits(dir.path());
    let bomb = gzip(&vec![0u8; 10 << 20]);
    assert!(bomb.len() < 64 * 1024);
    let body = Body::from_vec(bomb, &l).unwrap();
    let out = unpack(&body, &headers(Some("gzip"), None), &l, &opts(1 << 20)).unwrap();
    assert!(
        matches!(out, Unpacked::Unscannable(ref w) if w.contains("exceeds")),
        "{out:?}"
    );
    // Only the body itself is on disk: the partial decoded output was removed.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    drop(body);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn corrupt_and_unknown_encodings_are_unscannable() {
    let dir = tempfile::tempdir().unwrap();
    let l = limits(dir.path());
    let body = Body::from_vec(b"not gzip at all".to_vec(), &l).unwrap();
    assert!(matches!(
        unpack(&body, &headers(Some("gzip"), None), &l, &opts(100)).unwrap(),
        Unpacked::Unscannable(_)
    ));
    let body = Body::from_vec(b"x".to_vec(), &l).unwrap();
    assert!(matches!(
        unpack(&body, &headers(Some("compress"), None), &l, &opts(100)).unwrap(),
        Unpacked::Unscannable(_)
    ));
}

#[test]
fn multipart_parts_become_files_including_spilled_ones() {
    let dir = tempfile::tempdir().unwrap();
    let l = limits(dir.path());
    let big = vec![7u8; 5000];
    let mut form = b"--B\r\nContent-Disposition: form-data; name=\"t\"\r\n\r\nfield\r\n--B\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a\"\r\n\r\n".to_vec();
    form.extend_from_slice(&big);
    form.extend_from_slice(b"\r\n--B--\r\n");
    let body = Body::from_vec(form, &l).unwrap();
    let out = unpack(
        &body,
        &headers(None, Some("multipart/form-data; boundary=B")),
        &l,
        &opts(1 << 20),
    )
    .unwrap();
    assert_eq!(
        contents(out),
        vec![b"<original>".to_vec(), b"field".to_vec(), big]
    );
}

#[test]
fn gzip_encoded_multipart_is_decoded_then_split() {
    let dir = tempfile::tempdir().unwrap();
    let l = limits(dir.path());
    let form = b"--B\r\n\r\nfile\r\n--B--";
    let body = Body::from_vec(gzip(form), &l).unwrap();
    let out = unpack(
        &body,
        &headers(Some("gzip"), Some("multipart/form-data; boundary=B")),
        &l,
        &opts(1 << 20),
    )
    .unwrap();
    assert_eq!(contents(out), vec![form.to_vec(), b"file".to_vec()]);
}

/// Unpacks `body` sent with that Content-Type (and Content-Encoding).
fn unpack_with(
    l: &BodyLimits,
    ce: Option<&str>,
    ct: &str,
    body: &[u8],
    embedded_files: bool,
) -> Unpacked {
    let body = Body::from_vec(body.to_vec(), l).unwrap();
    let options = UnpackOptions {
        max_decoded: 1 << 20,
        embedded_files,
    };
    unpack(&body, &headers(ce, Some(ct)), l, &options).unwrap()
}

fn refused(u: Unpacked) -> String {
    match u {
        Unpacked::Refused(why) => why,
        other => panic!("not refused: {:?}", contents(other)),
    }
}

const EICAR: &[u8] = br"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";
const EICAR_B64: &str =
    "WDVPIVAlQEFQWzRcUFpYNTQoUF4pN0NDKTd9JEVJQ0FSLVNUQU5EQVJELUFOVElWSVJVUy1URVNULUZJTEUhJEgrSCo=";

#[test]
fn malformed_multipart_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let l = limits(dir.path());
    let ct = "multipart/form-data; boundary=B";
    for body in [
        &b"--B\r\n\r\nno end"[..],
        b"no delimiter",
        b"--B\r\n\r\na\r\n--B--x\r\n",
        b"--B\nContent-Type: text/plain\n\nbare LF lines\n--B--\n",
    ] {
        let why = refused(unpack_with(&l, None, ct, body, true));
        assert!(why.contains("does not parse"), "{why}");
    }
    let mut big_head = b"--B\r\nX: ".to_vec();
    big_head.extend(std::iter::repeat_n(b'h', 9000));
    big_head.extend_from_slice(b"\r\n\r\nbody\r\n--B--");
    refused(unpack_with(&l, None, ct, &big_head, true));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn boundary_hidden_in_a_quoted_parameter_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let l = limits(dir.path());
    // A quoted-string aware server splits at B; one that splits the header at every
    // `;` or searches it for `boundary=` splits at A, where the file is.
    let body = b"--A\r\nContent-Type: application/octet-stream\r\n\r\nfile\r\n--A--\r\n";
    for ct in [
        r#"multipart/form-data; x="; boundary=A;"; boundary=B"#,
        "multipart/form-data; boundary=A; boundary=B",
        "multipart/form-data; boundary=A; boundary*=B",
        r#"multipart/form-data; x="boundary=A""#,
    ] {
        let why = refused(unpack_with(&l, None, ct, body, true));
        assert!(why.starts_with("multipart content type"), "{why}");
    }
    // Without a boundary at all no server splits it: one file.
    assert!(matches!(
        unpack_with(&l, None, "multipart/form-data", body, true),
        Unpacked::Original
    ));
}

#[test]
fn preamble_and_epilogue_become_files() {
    let dir = tempfile::tempdir().unwrap();
    let l = limits(dir.path());
    let body = b"hidden before\r\n--B\r\n\r\npart\r\n--B--\r\nhidden after";
    let out = unpack_with(&l, None, "multipart/mixed; boundary=B", body, true);
    assert_eq!(
        contents(out),
        vec![
            b"<original>".to_vec(),
            b"part".to_vec(),
            b"hidden before".to_vec(),
            b"hidden after".to_vec()
        ]
    );
    let body = b"\r\n \r\n--B\r\n\r\npart\r\n--B--\r\n\r\n";
    for ct in [
        "multipart/mixed; boundary=B",
        "multipart/form-data; boundary=B",
    ] {
        let out = unpack_with(&l, None, ct, body, true);
        assert_eq!(
            contents(out),
            vec![b"<original>".to_vec(), b"part".to_vec()]
        );
    }
}

#[test]
fn form_data_with_text_around_its_parts_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let l = limits(dir.path());
    let ct = "multipart/form-data; boundary=AaB";
    // Django parses a preamble with a head as a part: the file is `F`.
    let preamble = b"Content-Disposition: form-data; name=\"f\"; filename=\"e.com\"\r\n\r\nF\r\n--AaB\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nx\r\n--AaB--\r\n";
    assert!(refused(unpack_with(&l, None, ct, preamble, true)).contains("before the first"));
    let epilogue = b"--AaB\r\n\r\nx\r\n--AaB--\r\nafter";
    assert!(refused(unpack_with(&l, None, ct, epilogue, true)).contains("after the last"));
    // Other types keep their text as a file, unless it holds a part head and body.
    let out = unpack_with(&l, None, "multipart/mixed; boundary=AaB", epilogue, true);
    assert_eq!(
        contents(out),
        vec![b"<original>".to_vec(), b"x".to_vec(), b"after".to_vec()]
    );
    for ct in [
        "multipart/mixed; boundary=AaB",
        "multipart/related; boundary=AaB",
    ] {
        refused(unpack_with(&l, None, ct, preamble, true));
        let lf = b"X: y\n\nF\r\n--AaB\r\n\r\nx\r\n--AaB--";
        refused(unpack_with(&l, None, ct, lf, true));
    }
}

#[test]
fn boundary_outside_a_delimiter_or_in_another_type_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let l = limits(dir.path());
    let ct = "multipart/form-data; boundary=AaB";
    let head = "--AaB\r\nContent-Disposition: form-data; name=\"f\"; filename=\"e.com\"\r\n\r\n";
    let next = "\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nx\r\n--AaB--\r\n";
    for end in ["\n--AaB", "--AaB", "\n--AaBzz"] {
        let body = format!("{head}F{end}{next}");
        let why = refused(unpack_with(&l, None, ct, body.as_bytes(), true));
        assert!(why.contains("does not parse"), "{why}");
    }
    // formidable splits any type that mentions multipart and a boundary.
    let body = format!("{head}F\r\n--AaB--\r\n");
    let why = refused(unpack_with(
        &l,
        None,
        "text/plain; x=multipart; boundary=AaB",
        body.as_bytes(),
        true,
    ));
    assert!(why.starts_with("multipart content type"), "{why}");
    assert!(headers(None, Some("text/plain; x=multipart; boundary=AaB")).needs_unpacking());
}

#[test]
fn transfer_encoded_parts_are_decoded_and_spill_when_large() {
    let dir = tempfile::tempdir().unwrap();
    let l = limits(dir.path());
    let big: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut b64 = Vec::new();
    {
        // MIME wraps base64 at 76 characters.
        let text = encode_base64(&big);
        for line in text.as_bytes().chunks(76) {
            b64.extend_from_slice(line);
            b64.extend_from_slice(b"\r\n");
        }
    }
    let mut body = b"--B\r\nContent-Transfer-Encoding: BASE64\r\n\r\n".to_vec();
    body.extend_from_slice(&b64);
    body.extend_from_slice(
        b"\r\n--B\r\ncontent-transfer-encoding: quoted-printable\r\n\r\ncaf=C3=A9 =\r\nau lait\r\n--B\r\nContent-Transfer-Encoding: 8bit\r\n\r\nraw\r\n--B--",
    );
    let out = unpack_with(&l, None, "multipart/mixed; boundary=B", &body, true);
    // Each encoded part also as sent: PHP, busboy and werkzeug store those bytes.
    assert_eq!(
        contents(out),
        vec![
            b"<original>".to_vec(),
            b64.clone(),
            big,
            b"caf=C3=A9 =\r\nau lait".to_vec(),
            "café au lait".as_bytes().to_vec(),
            b"raw".to_vec()
        ]
    );
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn an_encoded_part_is_scanned_as_sent_besides_decoded() {
    let dir = tempfile::tempdir().unwrap();
    let l = limits(dir.path());
    // A receiver that ignores the encoding stores `=58...`, not `X...`.
    let body = b"--B\r\nContent-Disposition: form-data; name=\"f\"; filename=\"f\"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n=41stored\r\n--B--\r\n";
    let out = unpack_with(&l, None, "multipart/form-data; boundary=B", body, true);
    assert_eq!(
        contents(out),
        vec![
            b"<original>".to_vec(),
            b"=41stored".to_vec(),
            b"Astored".to_vec()
        ]
    );
}

/// Standard base64, padded.
fn encode_base64(data: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for group in data.chunks(3) {
        let n = group.iter().fold(0u32, |n, &b| n << 8 | u32::from(b)) << (8 * (3 - group.len()));
        for i in 0..4 {
            if i <= group.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn unknown_or_broken_transfer_encodings_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let l = limits(dir.path());
    let ct = "multipart/form-data; boundary=B";
    for body in [
        &b"--B\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\nbegin 644 f\r\n--B--"[..],
        b"--B\r\nContent-Transfer-Encoding: base64\r\n\r\nnot*base64\r\n--B--",
        b"--B\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nbad =ZZ escape\r\n--B--",
        b"--B\r\nContent-Transfer-Encoding: base64\r\nContent-Transfer-Encoding: 7bit\r\n\r\nQUJD\r\n--B--",
    ] {
        refused(unpack_with(&l, None, ct, body, true));
    }
}

#[test]
fn nested_multipart_is_split_and_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let l = limits(dir.path());
    let inner = b"--in\r\nContent-Type: text/plain\r\n\r\nfirst\r\n--in\r\n\r\nsecond\r\n--in--";
    let mut body =
        b"--out\r\n\r\nfield\r\n--out\r\nContent-Type: multipart/mixed; boundary=in\r\n\r\n"
            .to_vec();
    body.extend_from_slice(inner);
    body.extend_from_slice(b"\r\n--out--\r\n");
    let out = unpack_with(&l, None, "multipart/form-data; boundary=out", &body, true);
    // The nested part whole too: Go and PHP store a multipart/mixed part as a file.
    assert_eq!(
        contents(out),
        vec![
            b"<original>".to_vec(),
            b"field".to_vec(),
            b"first".to_vec(),
            b"second".to_vec(),
            inner.to_vec()
        ]
    );
    // Depth 1 holds depth 2 ... up to MAX_DEPTH; one more is refused.
    let nest = |levels: usize| {
        let mut body = b"file".to_vec();
        let mut ct = "text/plain".to_owned();
        for level in 0..levels {
            let b = format!("b{level}");
            let mut outer = format!("--{b}\r\nContent-Type: {ct}\r\n\r\n").into_bytes();
            outer.extend_from_slice(&body);
            outer.extend_from_slice(format!("\r\n--{b}--").as_bytes());
            body = outer;
            ct = format!("multipart/mixed; boundary={b}");
        }
        unpack_with(&l, None, &ct, &body, true)
    };
    let files = contents(nest(MAX_DEPTH));
    assert_eq!(files.len(), MAX_DEPTH + 1);
    assert_eq!(files[1], b"file");
    assert!(refused(nest(MAX_DEPTH + 1)).contains("deeper"));
    // A multipart part is never transfer-encoded (RFC 2045 §6.4).
    let body = b"--out\r\nContent-Type: multipart/mixed; boundary=in\r\nContent-Transfer-Encoding: base64\r\n\r\nLS1pbi0t\r\n--out--";
    refused(unpack_with(
        &l,
        None,
        "multipart/mixed; boundary=out",
        body,
        true,
    ));
}

#[test]
fn too_many_parts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let l = limits(dir.path());
    let body = b"--B\r\n\r\nx\r\n".repeat(MAX_PARTS + 1);
    let body = [&body[..], b"--B--"].concat();
    assert!(
        refused(unpack_with(
            &l,
            None,
            "multipart/mixed; boundary=B",
            &body,
            true
        ))
        .contains("parts")
    );
}

#[test]
fn base64_files_in_json_strings_are_scanned_besides_the_body() {
    let dir = tempfile::tempdir().unwrap();
    let l = limits(dir.path());
    // `\/` and `\u` escapes are undone as every JSON parser does.
    let escaped = EICAR_B64.replacen('W', r"\u0057", 1);
    let json = format!(
        r#"{{"name":"report.pdf","id":"123e4567-e89b-12d3-a456-426614174000","file":"{escaped}","thumb":"data:image/png;base64,aGk=","note":"Hello world 2024 is here and Today","nested":[{{"k":"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo\/\/\/4="}}]}}"#
    );
    let out = unpack_with(
        &l,
        None,
        "application/json; charset=utf-8",
        json.as_bytes(),
        true,
    );
    let files = contents(out);
    // Strings of 32 bytes or fewer decoded are scanned together, in a row.
    assert_eq!(files.len(), 3, "{files:?}");
    assert_eq!(files[0], b"<original>");
    assert_eq!(files[1], EICAR);
    assert_eq!(&files[2][..12], b"hiABCDEFGHIJ");
    // Off: the body alone.
    let out = unpack_with(&l, None, "application/json", json.as_bytes(), false);
    assert!(matches!(out, Unpacked::Original));
    // Not JSON after all: the strings are read all the same, nothing kept on disk.
    let broken = format!("{json},");
    let out = unpack_with(
        &l,
        None,
        "application/vnd.api+json",
        broken.as_bytes(),
        true,
    );
    assert_eq!(contents(out), files);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn json_files_are_found_in_decoded_bodies_and_json_parts() {
    let dir = tempfile::tempdir().unwrap();
    let l = limits(dir.path());
    let json = format!(r#"["{EICAR_B64}"]"#);
    let out = unpack_with(
        &l,
        Some("gzip"),
        "application/json",
        &gzip(json.as_bytes()),
        true,
    );
    assert_eq!(
        contents(out),
        vec![json.as_bytes().to_vec(), EICAR.to_vec()]
    );
    let mut body = b"--B\r\nContent-Type: application/json\r\n\r\n".to_vec();
    body.extend_from_slice(json.as_bytes());
    body.extend_from_slice(b"\r\n--B--");
    let out = unpack_with(&l, None, "multipart/related; boundary=B", &body, true);
    assert_eq!(
        contents(out),
        vec![
            b"<original>".to_vec(),
            EICAR.to_vec(),
            json.as_bytes().to_vec()
        ]
    );
}

#[test]
fn embedded_files_past_their_bounds_are_refused_or_unscannable() {
    let dir = tempfile::tempdir().unwrap();
    let l = limits(dir.path());
    let many: Vec<String> = (0..=MAX_EMBEDDED_FILES)
        .map(|i| {
            format!(
                r#""data:;base64,{}""#,
                encode_base64(format!("file {i:<40}").as_bytes())
            )
        })
        .collect();
    let json = format!("[{}]", many.join(","));
    assert!(
        refused(unpack_with(
            &l,
            None,
            "application/json",
            json.as_bytes(),
            true
        ))
        .contains("embedded")
    );
    let deep = "[".repeat(2000) + &"]".repeat(2000);
    refused(unpack_with(
        &l,
        None,
        "application/json",
        deep.as_bytes(),
        true,
    ));
    let big = encode_base64(&vec![1u8; 3000]);
    let json = format!(r#"["data:;base64,{big}"]"#);
    let body = Body::from_vec(json.into_bytes(), &l).unwrap();
    let options = UnpackOptions {
        max_decoded: 2000,
        embedded_files: true,
    };
    let out = unpack(
        &body,
        &headers(None, Some("application/json")),
        &l,
        &options,
    )
    .unwrap();
    assert!(
        matches!(out, Unpacked::Unscannable(ref w) if w.contains("embedded")),
        "{out:?}"
    );
    drop(body);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn every_type_needs_unpacking() {
    for ct in [
        "application/json",
        "application/problem+json; charset=utf-8",
        "multipart/form-data",
        "multipart/form-data; boundary=\"x",
        "text/plain",
    ] {
        assert!(headers(None, Some(ct)).needs_unpacking(), "{ct}");
    }
    assert!(headers(None, None).needs_unpacking());
}

#[test]
fn json_is_read_whatever_the_type_says() {
    let dir = tempfile::tempdir().unwrap();
    let l = limits(dir.path());
    // fetch() sends a string body as text/plain; applications parse what they expect.
    let json = format!(r#"{{"file":"{EICAR_B64}"}}"#);
    let bom = format!("{} \r\n[\"{EICAR_B64}\"]", '\u{feff}');
    for ct in ["text/plain;charset=UTF-8", "application/octet-stream", ""] {
        for body in [&json, &bom] {
            let out = unpack_with(&l, None, ct, body.as_bytes(), true);
            assert_eq!(
                contents(out),
                vec![b"<original>".to_vec(), EICAR.to_vec()],
                "{ct}"
            );
        }
        // Not JSON by its first byte: the body alone.
        let text = format!("see {json}");
        assert!(matches!(
            unpack_with(&l, None, ct, text.as_bytes(), true),
            Unpacked::Original
        ));
    }
    // A JSON part of another type too.
    let mut body = b"--B\r\nContent-Type: text/plain\r\n\r\n".to_vec();
    body.extend_from_slice(json.as_bytes());
    body.extend_from_slice(b"\r\n--B--");
    let out = unpack_with(&l, None, "multipart/mixed; boundary=B", &body, true);
    assert_eq!(
        contents(out),
        vec![
            b"<original>".to_vec(),
            EICAR.to_vec(),
            json.as_bytes().to_vec()
        ]
    );
}

#[test]
fn json_that_is_not_quite_json_keeps_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let l = limits(dir.path());
    let want = vec![b"<original>".to_vec(), EICAR.to_vec()];
    // Python reads NaN; JSON Lines and Go's decoder read values after the first.
    for json in [
        format!(r#"{{"a":NaN,"file":"{EICAR_B64}"}}"#),
        format!(r#"{{"file":"{EICAR_B64}"}} trailing"#),
        format!("{{\"a\":1}}\n{{\"file\":\"{EICAR_B64}\"}}"),
    ] {
        let out = unpack_with(&l, None, "application/json", json.as_bytes(), true);
        assert_eq!(contents(out), want, "{json}");
    }
    // Python's json.loads detects UTF-16.
    let json = format!(r#"{{"file":"{EICAR_B64}"}}"#);
    let utf16: Vec<u8> = json.encode_utf16().flat_map(u16::to_le_bytes).collect();
    let out = unpack_with(&l, None, "application/json", &utf16, true);
    assert_eq!(contents(out), want);
}

#[test]
fn base64_that_lenient_decoders_read_is_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let l = limits(dir.path());
    // Python's b64decode and Node's Buffer.from skip the dots and spaces.
    let dotted: String = EICAR_B64
        .as_bytes()
        .chunks(7)
        .map(|c| format!("{}. ", std::str::from_utf8(c).unwrap()))
        .collect();
    let json = format!(r#"["{dotted}"]"#);
    let out = unpack_with(&l, None, "application/json", json.as_bytes(), true);
    assert_eq!(contents(out), vec![b"<original>".to_vec(), EICAR.to_vec()]);
    // Node takes `+` and `_` in one string; its reading stops at a `=` Python skips
    // (here one after a whole group), Python's goes on.
    let file = [EICAR, b"\n"].concat();
    let node = format!(r#"["{}=QUJD_+"]"#, encode_base64(&file));
    let files = contents(unpack_with(
        &l,
        None,
        "application/json",
        node.as_bytes(),
        true,
    ));
    assert_eq!(files.len(), 3, "{files:?}");
    assert_eq!(files[1], file);
    assert_eq!(files[2], [&file[..], b"ABC", &[0xff]].concat());
}

#[test]
fn many_identifiers_are_not_many_files_but_many_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let l = limits(dir.path());
    // An API listing: 300 objects with 20-character mixed-case ids and a SHA-256.
    let items: Vec<String> = (0..300u32)
        .map(|i| {
            let id = format!("aB3dE5fG7hJ9kL{i:06}");
            let digest = encode_base64(&[(i % 251) as u8; 32]);
            format!(r#"{{"id":"{id}","sha256":"{digest}","name":"item {i}"}}"#)
        })
        .collect();
    let json = format!("[{}]", items.join(","));
    let files = contents(unpack_with(
        &l,
        None,
        "application/json",
        json.as_bytes(),
        true,
    ));
    assert_eq!(files.len(), 2, "the body and its small strings in a row");
    // A file among more decoys than are scanned one by one: refused, not skipped.
    let mut decoys: Vec<String> = (0..MAX_EMBEDDED_FILES)
        .map(|i| {
            format!(
                r#""{}""#,
                encode_base64(format!("decoy {i:<40}").as_bytes())
            )
        })
        .collect();
    decoys.push(format!(r#""{EICAR_B64}""#));
    let json = format!("[{}]", decoys.join(","));
    assert!(
        refused(unpack_with(
            &l,
            None,
            "application/json",
            json.as_bytes(),
            true
        ))
        .contains("embedded")
    );
    // The same file many times is one file.
    let same = vec![format!(r#""{EICAR_B64}""#); 2 * MAX_EMBEDDED_FILES].join(",");
    let out = unpack_with(
        &l,
        None,
        "application/json",
        format!("[{same}]").as_bytes(),
        true,
    );
    assert_eq!(contents(out), vec![b"<original>".to_vec(), EICAR.to_vec()]);
}
