//! URL safety: the only way to obtain a webhook target is to pass the checks.
//!
//! A [`TargetUrl`] can only be built by [`UrlPolicy::parse`], which rejects
//! anything that could make the gateway a server-side request forgery proxy:
//! other schemes, userinfo, and hosts that are (or resolve to) loopback,
//! private, link-local, CGNAT, unique-local, multicast, unspecified,
//! documentation or cloud-metadata addresses, unless an operator exempted the
//! range. The same [`UrlPolicy`] drives [`SafeResolver`], the DNS resolver of
//! the delivery HTTP client, so a name that resolved to a public address at
//! registration cannot be re-pointed at an internal one later (DNS rebinding).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use url::{Host, Url};

/// Longest URL we store; longer ones are almost certainly abuse.
const MAX_URL_LEN: usize = 2048;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("is not a valid URL: {0}")]
    Invalid(String),
    #[error("is longer than {MAX_URL_LEN} characters")]
    TooLong,
    #[error("scheme `{0}` is not allowed (use {1})")]
    Scheme(String, &'static str),
    #[error("must not contain a username or password")]
    Userinfo,
    #[error("has no host")]
    NoHost,
    #[error("host `{0}` is a local name")]
    LocalName(String),
    #[error("host {host} is a {class} address")]
    Blocked { host: String, class: &'static str },
    #[error("host `{0}` does not resolve")]
    Unresolvable(String),
}

/// Which targets the operator allows. Built once from configuration.
#[derive(Debug, Clone)]
pub struct UrlPolicy {
    allow_http: bool,
    allowed_cidrs: Arc<[IpNet]>,
}

/// A webhook target URL that passed every check of a [`UrlPolicy`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetUrl(Url);

impl TargetUrl {
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    pub fn as_url(&self) -> &Url {
        &self.0
    }
}

impl std::fmt::Display for TargetUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.as_str())
    }
}

impl UrlPolicy {
    pub fn new(allow_http: bool, allowed_cidrs: Vec<IpNet>) -> Self {
        Self {
            allow_http,
            allowed_cidrs: allowed_cidrs.into(),
        }
    }

    /// Parses and checks a URL without touching DNS: scheme, userinfo and
    /// IP literals in every spelling the `url` crate normalises (decimal,
    /// octal, hex, IPv4-mapped IPv6). Used at send time, where the resolver
    /// checks names.
    pub fn parse(&self, raw: &str) -> Result<TargetUrl, UrlError> {
        if raw.len() > MAX_URL_LEN {
            return Err(UrlError::TooLong);
        }
        let url = Url::parse(raw.trim()).map_err(|e| UrlError::Invalid(e.to_string()))?;
        match url.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            other => {
                let allowed = if self.allow_http {
                    "https or http"
                } else {
                    "https"
                };
                return Err(UrlError::Scheme(other.to_owned(), allowed));
            }
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(UrlError::Userinfo);
        }
        match url.host().ok_or(UrlError::NoHost)? {
            Host::Ipv4(ip) => self.check_ip(IpAddr::V4(ip))?,
            Host::Ipv6(ip) => self.check_ip(IpAddr::V6(ip))?,
            Host::Domain(name) => check_name(name)?,
        }
        Ok(TargetUrl(url))
    }

    /// [`parse`](Self::parse) plus a DNS lookup of a host name, every
    /// resolved address checked. Used when a webhook is registered or its
    /// URL changes.
    pub async fn parse_and_resolve(&self, raw: &str) -> Result<TargetUrl, UrlError> {
        let target = self.parse(raw)?;
        if let Some(Host::Domain(name)) = target.0.host() {
            let port = target.0.port_or_known_default().unwrap_or(443);
            self.resolve(name, port).await?;
        }
        Ok(target)
    }

    /// Resolves a name and fails unless every address it yields is allowed.
    pub async fn resolve(&self, name: &str, port: u16) -> Result<Vec<SocketAddr>, UrlError> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name, port))
            .await
            .map_err(|_| UrlError::Unresolvable(name.to_owned()))?
            .collect();
        if addrs.is_empty() {
            return Err(UrlError::Unresolvable(name.to_owned()));
        }
        for addr in &addrs {
            self.check_ip(addr.ip())?;
        }
        Ok(addrs)
    }

    /// Fails for a blocked address outside every exempted range.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), UrlError> {
        if self.allowed_cidrs.iter().any(|net| net.contains(&ip)) {
            return Ok(());
        }
        match blocked_class(ip) {
            Some(class) => Err(UrlError::Blocked {
                host: ip.to_string(),
                class,
            }),
            None => Ok(()),
        }
    }
}

/// Names that always mean "this machine" or an internal service, whatever
/// DNS says.
fn check_name(name: &str) -> Result<(), UrlError> {
    let lower = name.trim_end_matches('.').to_ascii_lowercase();
    let local = lower == "localhost"
        || lower.ends_with(".localhost")
        || lower.ends_with(".local")
        || lower.ends_with(".internal")
        || !lower.contains('.');
    if local {
        return Err(UrlError::LocalName(name.to_owned()));
    }
    Ok(())
}

/// Classifies an address that must never be a webhook target, or `None` for
/// a public unicast address.
pub fn blocked_class(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => blocked_v4(v4),
        IpAddr::V6(v6) => blocked_v6(v6),
    }
}

fn blocked_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    let class = match (a, b, c) {
        (0, _, _) => "unspecified",
        (127, _, _) => "loopback",
        (10, _, _) | (192, 168, _) => "private",
        (172, 16..=31, _) => "private",
        (100, 64..=127, _) => "carrier-grade NAT",
        (169, 254, _) => "link-local (cloud metadata)",
        (192, 0, 0) => "IETF protocol assignment",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (198, 18..=19, _) => "benchmarking",
        (224..=239, _, _) => "multicast",
        (240..=255, _, _) => "reserved or broadcast",
        _ => return None,
    };
    Some(class)
}

fn blocked_v6(ip: Ipv6Addr) -> Option<&'static str> {
    // NAT64 and 6to4 also wrap public IPv4 addresses, so judge the
    // wrapped address rather than the wrapper.
    if let Some(v4) = embedded_v4(ip) {
        return blocked_v4(v4);
    }
    let seg = ip.segments();
    let class = match seg[0] {
        0 if ip.is_unspecified() => "unspecified",
        0 if ip.is_loopback() => "loopback",
        0x2001 if seg[1] == 0x0db8 => "documentation",
        0x2001 if seg[1] == 0 => "Teredo",
        0x3fff if seg[1] < 0x1000 => "documentation",
        s if s & 0xfe00 == 0xfc00 => "unique-local",
        s if s & 0xffc0 == 0xfe80 => "link-local",
        s if s & 0xffc0 == 0xfec0 => "site-local",
        s if s & 0xff00 == 0xff00 => "multicast",
        0x0100 if seg[1..4] == [0, 0, 0] => "discard-only",
        0 => "reserved",
        _ => return None,
    };
    Some(class)
}

/// The IPv4 address inside an IPv4-mapped (`::ffff:a.b.c.d`),
/// IPv4-compatible (`::a.b.c.d`), NAT64 (`64:ff9b::/96`) or 6to4
/// (`2002::/16`) IPv6 address.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let seg = ip.segments();
    let low = |hi: u16, lo: u16| Ipv4Addr::from(((hi as u32) << 16) | lo as u32);
    match seg {
        [0, 0, 0, 0, 0, 0xffff, hi, lo] => Some(low(hi, lo)),
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(low(hi, lo)),
        [0x2002, hi, lo, ..] => Some(low(hi, lo)),
        _ if is_v4_compatible(ip) => Some(low(seg[6], seg[7])),
        _ => None,
    }
}

fn is_v4_compatible(ip: Ipv6Addr) -> bool {
    let seg = ip.segments();
    seg[..6] == [0; 6] && (seg[6] != 0 || seg[7] > 1)
}

/// DNS resolver for the delivery HTTP client: resolves with the system
/// resolver and refuses the connection if any address is blocked, so the
/// address checked is the address connected to.
#[derive(Debug, Clone)]
pub struct SafeResolver {
    policy: UrlPolicy,
}

impl SafeResolver {
    pub fn new(policy: UrlPolicy) -> Self {
        Self { policy }
    }
}

impl reqwest::dns::Resolve for SafeResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            check_name(name.as_str())?;
            let addrs = policy.resolve(name.as_str(), 0).await?;
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strict() -> UrlPolicy {
        UrlPolicy::new(false, vec![])
    }

    #[test]
    fn public_https_passes() {
        let url = strict().parse("https://example.com/hooks?x=1").unwrap();
        assert_eq!(url.as_str(), "https://example.com/hooks?x=1");
        assert!(strict().parse("https://93.184.216.34/").is_ok());
        assert!(strict().parse("https://[2606:2800:220:1::1]/").is_ok());
    }

    #[test]
    fn unusual_ipv4_spellings_are_normalised_and_blocked() {
        for raw in [
            "https://2130706433/",
            "https://0x7f000001/",
            "https://0177.0.0.1/",
            "https://127.1/",
            "https://[::ffff:127.0.0.1]/",
            "https://[::ffff:a9fe:a9fe]/",
            "https://[64:ff9b::10.0.0.1]/",
            "https://[2002:c0a8:0101::1]/",
        ] {
            assert!(
                matches!(strict().parse(raw), Err(UrlError::Blocked { .. })),
                "{raw} must be blocked"
            );
        }
    }

    #[test]
    fn nat64_of_a_public_address_is_allowed() {
        assert!(strict().parse("https://[64:ff9b::93.184.216.34]/").is_ok());
    }

    /// Names are judged by every address they resolve to (`localhost`
    /// comes from the hosts file, so this needs no network).
    #[tokio::test]
    async fn resolved_addresses_are_checked() {
        let blocked = strict().resolve("localhost", 443).await;
        assert!(
            matches!(
                blocked,
                Err(UrlError::Blocked {
                    class: "loopback",
                    ..
                })
            ),
            "{blocked:?}"
        );
        let exempt = UrlPolicy::new(
            false,
            vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
        );
        assert!(exempt.resolve("localhost", 443).await.is_ok());
    }

    #[tokio::test]
    async fn the_http_client_resolver_refuses_blocked_names() {
        use reqwest::dns::Resolve;
        let resolver = SafeResolver::new(UrlPolicy::new(true, vec![]));
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        assert!(resolver.resolve(name).await.is_err());
    }

    #[test]
    fn allowed_cidrs_exempt_ranges() {
        let policy = UrlPolicy::new(true, vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(policy.parse("http://127.0.0.1:9000/").is_ok());
        assert!(policy.parse("http://10.0.0.1/").is_err());
    }
}
