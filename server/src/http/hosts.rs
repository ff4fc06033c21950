//! Which `Host` header values the server answers: a page on another site that rebinds its DNS
//! name to 127.0.0.1 must not reach a server bound to loopback.

use std::net::IpAddr;

use axum::http::{header, HeaderMap};

use crate::error::ServiceError;

/// Which `Host` values are answered; None: any.
#[derive(Debug, Clone)]
pub struct HostPolicy {
    allowed: Option<Vec<String>>,
}

impl HostPolicy {
    /// `--allowed-hosts` when given (`*` allows any); else loopback names only when bound to a
    /// loopback address, and any host otherwise.
    pub fn new(allowed: Option<&[String]>, bind_host: &str) -> Self {
        let allowed = match allowed {
            Some(list) if list.iter().any(|h| h.trim() == "*") => None,
            Some(list) => Some(list.iter().map(|h| normalize_host(h)).collect()),
            None if is_loopback(bind_host) => {
                Some(["localhost", "127.0.0.1", "::1"].map(String::from).to_vec())
            }
            None => None,
        };
        Self { allowed }
    }

    pub fn check(&self, headers: &HeaderMap) -> Result<(), ServiceError> {
        let Some(allowed) = &self.allowed else {
            return Ok(());
        };
        let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
            return Err(ServiceError::bad_request(
                "missing or unreadable Host header",
            ));
        };
        let name = normalize_host(host);
        if allowed.contains(&name) {
            return Ok(());
        }
        Err(ServiceError::misdirected(
            "this server does not answer for that Host; see --allowed-hosts",
        ))
    }
}

fn is_loopback(bind_host: &str) -> bool {
    let host = bind_host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `Example.COM.:8080` -> `example.com`, `[::1]:80` -> `::1`.
fn normalize_host(host: &str) -> String {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(value: &str) -> HeaderMap {
        crate::http::one_header(header::HOST, value)
    }

    #[test]
    fn a_loopback_bind_answers_loopback_names_on_any_port_only() {
        let policy = HostPolicy::new(None, "127.0.0.1");
        for ok in ["localhost", "127.0.0.1:8080", "[::1]:9", "LOCALHOST.:1"] {
            assert!(policy.check(&host(ok)).is_ok(), "{ok}");
        }
        for refused in [
            "evil.example",
            "evil.example:8080",
            "127.0.0.2",
            "localhost.evil",
        ] {
            assert!(policy.check(&host(refused)).is_err(), "{refused}");
        }
        assert!(policy.check(&HeaderMap::new()).is_err(), "no Host");
        assert!(HostPolicy::new(None, "0.0.0.0")
            .check(&host("anything"))
            .is_ok());
        let listed = HostPolicy::new(Some(&["api.example".into()]), "0.0.0.0");
        assert!(listed.check(&host("api.example:443")).is_ok());
        assert!(listed.check(&host("localhost")).is_err());
        let any = HostPolicy::new(Some(&["*".into()]), "127.0.0.1");
        assert!(any.check(&host("whatever")).is_ok());
    }
}
