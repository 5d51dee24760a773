//! Test certificates made with the `openssl` command: a CA per directory and leaf
//! certificates it signs (server certificates for 127.0.0.1, client certificates with a
//! subject).

use std::path::{Path, PathBuf};
use std::process::Command;

fn openssl(dir: &Path, args: &[&str]) {
    crate::process::run_checked(
        Command::new("openssl").current_dir(dir).args(args),
        &format!("openssl {args:?} (installed by make test)"),
    );
}

/// `ca.crt` and `ca.key` in `dir`, made once.
pub fn ensure_ca(dir: &Path) -> PathBuf {
    let ca = dir.join("ca.crt");
    if !ca.is_file() {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=virus-scanner-test-ca",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
            ],
        );
    }
    ca
}

/// `<name>.crt` and `<name>.key` signed by the CA in `dir`. `subject` like `/CN=admin/O=x`;
/// `ip_san` makes it a server certificate for that address.
pub fn issue(dir: &Path, name: &str, subject: &str, ip_san: Option<&str>) -> (PathBuf, PathBuf) {
    ensure_ca(dir);
    let (crt, key, csr, ext) = (
        format!("{name}.crt"),
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.ext"),
    );
    openssl(
        dir,
        &[
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", &key, "-out", &csr,
        ],
    );
    let ext_text = match ip_san {
        Some(ip) => format!("subjectAltName=IP:{ip},DNS:localhost\nextendedKeyUsage=serverAuth\n"),
        None => "extendedKeyUsage=clientAuth\n".to_owned(),
    };
    std::fs::write(dir.join(&ext), ext_text).expect("write extensions");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &crt,
        ],
    );
    (dir.join(crt), dir.join(key))
}

/// An RSA key pair `<name>.key` / `<name>.pub` (service-account tokens).
pub fn key_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (key, public) = (format!("{name}.key"), format!("{name}.pub"));
    openssl(dir, &["genrsa", "-out", &key, "2048"]);
    openssl(dir, &["rsa", "-in", &key, "-pubout", "-out", &public]);
    (dir.join(key), dir.join(public))
}
