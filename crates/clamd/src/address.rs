use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Where clamd listens: `tcp://host:port`, `host:port`, `unix:///path` or an absolute path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClamdAddress {
    Tcp(String),
    Unix(PathBuf),
}

impl FromStr for ClamdAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(format!("clamd unix socket path must be absolute: {s:?}"));
            }
            return Ok(ClamdAddress::Unix(PathBuf::from(path)));
        }
        if s.starts_with('/') {
            return Ok(ClamdAddress::Unix(PathBuf::from(s)));
        }
        let hostport = s.strip_prefix("tcp://").unwrap_or(s);
        match hostport.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(ClamdAddress::Tcp(hostport.to_owned()))
            }
            _ => Err(format!(
                "clamd address must be host:port, tcp://host:port or unix:///path, got {s:?}"
            )),
        }
    }
}

impl fmt::Display for ClamdAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClamdAddress::Tcp(hostport) => write!(f, "tcp://{hostport}"),
            ClamdAddress::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            "127.0.0.1:3310".parse(),
            Ok(ClamdAddress::Tcp("127.0.0.1:3310".into()))
        );
        assert_eq!(
            "tcp://clamd:3310".parse(),
            Ok(ClamdAddress::Tcp("clamd:3310".into()))
        );
        assert_eq!(
            "unix:///run/clamd.sock".parse(),
            Ok(ClamdAddress::Unix("/run/clamd.sock".into()))
        );
        assert_eq!(
            "/run/clamd.sock".parse(),
            Ok(ClamdAddress::Unix("/run/clamd.sock".into()))
        );
        for bad in ["clamd", "clamd:", ":3310", "unix://relative", "h:99999"] {
            assert!(bad.parse::<ClamdAddress>().is_err(), "{bad}");
        }
    }
}
