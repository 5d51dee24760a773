//! A real Squid (Debian `squid-openssl`) as a forward proxy whose REQMOD and RESPMOD ICAP
//! services (`bypass=off`) are ours: clean files pass byte for byte, EICAR is refused on
//! download and upload, over plain HTTP and through `ssl_bump` against an HTTPS origin
//! signed by a CA made for the test.
#![allow(clippy::unwrap_used)]

mod support;

use support::{Stack, StackOptions, sha256_hex, temp_file};
use virus_scanner_test_support::certs;
use virus_scanner_test_support::{
    BodyMode, EICAR, EICAR_BODY_SIGNATURE, Origin, Squid, SquidOptions, clean_bytes,
};

struct Fetched {
    status: u16,
    body: Vec<u8>,
}

fn curl(args: &[&str]) -> Fetched {
    let out_file = tempfile::NamedTempFile::new().unwrap();
    let out = virus_scanner_test_support::clean_command("curl")
        .args(["-s", "--max-time", "60", "-o"])
        .arg(out_file.path())
        .args(["-w", "%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    Fetched {
        status,
        body: std::fs::read(out_file.path()).unwrap_or_default(),
    }
}

#[test]
fn squid_with_our_icap_passes_clean_and_refuses_eicar_also_through_ssl_bump() {
    let stack = Stack::start(StackOptions::new(BodyMode::Buffered));
    let pki = tempfile::tempdir().unwrap();
    let ca = certs::ensure_ca(pki.path());
    let ca_key = pki.path().join("ca.key");
    let (origin_crt, origin_key) =
        certs::issue(pki.path(), "origin", "/CN=localhost", Some("127.0.0.1"));
    let http = Origin::start(None);
    let https = Origin::start(Some((&origin_crt, &origin_key)));
    let squid = Squid::start(&SquidOptions {
        icap_port: stack.icap_port,
        icap_service: "/avscan".to_owned(),
        bump_ca: Some((ca.clone(), ca_key)),
        origin_ca: Some(ca.clone()),
    });
    let proxy = squid.proxy_url();
    let ca_arg = ca.display().to_string();
    let context = || format!("{}\n{}", squid.log_tail(), stack.producer.log_tail());

    // Under 64 KiB: Debian 12's Squid 5.7 stalls RESPMOD bodies of 64 KiB and more after
    // `100 Continue` (Squid bug 5352; measured with this service too: 60 KiB passes, 64 KiB
    // waits for the ICAP read timeout and ends in Squid's 500). Larger bodies are covered
    // by the c-icap-client tests.
    let clean = clean_bytes(60 * 1024, 21);
    for origin in [&http, &https] {
        origin.put_file("clean.bin", &clean);
        origin.put_file("eicar.com", EICAR);
    }

    // Plain HTTP: download clean, download EICAR, upload EICAR, upload clean.
    let got = curl(&["-x", &proxy, &http.url("/files/clean.bin")]);
    assert_eq!(got.status, 200, "{}", context());
    assert!(got.body == clean, "clean download altered\n{}", context());
    let blocked = curl(&["-x", &proxy, &http.url("/files/eicar.com")]);
    assert_eq!(blocked.status, 403, "{}", context());
    assert!(
        String::from_utf8_lossy(&blocked.body).contains(EICAR_BODY_SIGNATURE),
        "{}",
        String::from_utf8_lossy(&blocked.body)
    );
    let dir = tempfile::tempdir().unwrap();
    let eicar_file = temp_file(&dir, "eicar.com", EICAR);
    let upload = curl(&[
        "-x",
        &proxy,
        "-T",
        &eicar_file.display().to_string(),
        &http.url("/upload"),
    ]);
    assert_eq!(
        upload.status,
        403,
        "EICAR upload not refused\n{}",
        context()
    );
    let clean_file = temp_file(&dir, "clean.bin", &clean);
    let upload = curl(&[
        "-x",
        &proxy,
        "-T",
        &clean_file.display().to_string(),
        &http.url("/upload"),
    ]);
    assert_eq!(upload.status, 200, "{}", context());
    assert!(
        String::from_utf8_lossy(&upload.body).contains(&sha256_hex(&clean)),
        "the origin did not receive the exact upload"
    );

    // HTTPS through ssl_bump: Squid decrypts, our service scans.
    let got = curl(&[
        "-x",
        &proxy,
        "--cacert",
        &ca_arg,
        &https.url("/files/clean.bin"),
    ]);
    assert_eq!(got.status, 200, "{}", context());
    assert!(got.body == clean, "clean HTTPS download altered");
    let blocked = curl(&[
        "-x",
        &proxy,
        "--cacert",
        &ca_arg,
        &https.url("/files/eicar.com"),
    ]);
    assert_eq!(blocked.status, 403, "{}", context());
    assert!(String::from_utf8_lossy(&blocked.body).contains(EICAR_BODY_SIGNATURE));

    assert!(
        stack.producer_metric(
            "virus_scanner_producer_icap_requests_total{method=\"REQMOD\",verdict=\"infected\"}"
        ) >= 1.0
    );
    assert!(
        stack.producer_metric(
            "virus_scanner_producer_icap_requests_total{method=\"RESPMOD\",verdict=\"infected\"}"
        ) >= 2.0
    );
}
