//! Where the operator may send what tenants' specs ask it to send: client
//! secrets, refresh tokens and bearer tokens go to URLs a SourceConnection
//! names, from inside the cluster. A URL is parsed, never prefix-matched;
//! it may carry no user name or password; plain `http` is for loopback in
//! development only (`--allow-plain-http-loopback`); and no request goes to
//! an address in a denied network (link-local, which holds cloud metadata
//! services; loopback outside development; what `--deny-network` adds,
//! such as the cluster's service and pod ranges). The check runs on the
//! addresses a name resolves to, in the resolver the HTTP client connects
//! with, so a name that resolves elsewhere between a check and the
//! connection (DNS rebinding) cannot get around it.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

/// A network no request may go to, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct DeniedNetwork {
    pub net: IpNet,
    /// Which rule denies it, as the connection's message names it.
    pub rule: String,
}

/// The operator's rules for outbound requests.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointPolicy {
    /// Plain `http` to loopback addresses, and loopback at all (local
    /// development and the tests).
    pub plain_http_loopback: bool,
    pub denied: Vec<DeniedNetwork>,
}

impl Default for EndpointPolicy {
    fn default() -> Self {
        Self::new(false, &[])
    }
}

/// Link-local networks: cloud metadata services (169.254.169.254) live
/// there.
const LINK_LOCAL: [&str; 2] = ["169.254.0.0/16", "fe80::/10"];
const LOOPBACK: [&str; 2] = ["127.0.0.0/8", "::1/128"];
/// "This host" and the unspecified addresses reach the operator itself.
const UNSPECIFIED: [&str; 2] = ["0.0.0.0/8", "::/128"];

impl EndpointPolicy {
    /// The default rules plus `extra` networks (`--deny-network`).
    pub fn new(plain_http_loopback: bool, extra: &[IpNet]) -> Self {
        let rule = |nets: &[&str], rule: &str| -> Vec<DeniedNetwork> {
            nets.iter()
                .filter_map(|net| net.parse().ok())
                .map(|net| DeniedNetwork {
                    net,
                    rule: rule.to_owned(),
                })
                .collect()
        };
        let mut denied = rule(
            &LINK_LOCAL,
            "link-local, where cloud metadata services answer",
        );
        denied.extend(rule(&UNSPECIFIED, "the unspecified address"));
        if !plain_http_loopback {
            denied.extend(rule(
                &LOOPBACK,
                "loopback, allowed only with --allow-plain-http-loopback (development)",
            ));
        }
        denied.extend(extra.iter().map(|net| DeniedNetwork {
            net: *net,
            rule: format!("{net}, denied by --deny-network"),
        }));
        EndpointPolicy {
            plain_http_loopback,
            denied,
        }
    }

    /// The rule that denies `ip`, if one does.
    pub fn denies(&self, ip: IpAddr) -> Option<&DeniedNetwork> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.denied.iter().find(|d| d.net.contains(&ip))
    }

    /// Checks the URL in `field` before anything is sent to it.
    pub fn check_url(&self, field: &str, text: &str) -> Result<(), String> {
        let url =
            url::Url::parse(text).map_err(|e| format!("{field} \"{text}\" is not a URL ({e})"))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(format!(
                "{field} must not carry a user name or password (user@host): the client's \
                 credentials go in the Secret of spec.oauth2.client"
            ));
        }
        let host = url
            .host()
            .ok_or_else(|| format!("{field} \"{text}\" names no host"))?;
        let ip = match host {
            url::Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
            url::Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
            url::Host::Domain(_) => None,
        };
        let loopback = ip.is_some_and(|ip| ip.is_loopback())
            || matches!(host, url::Host::Domain(name) if name.eq_ignore_ascii_case("localhost"));
        match url.scheme() {
            "https" => {}
            "http" if loopback && self.plain_http_loopback => {}
            "http" if loopback => {
                return Err(format!(
                    "{field} \"{text}\" is plain http to this machine, which the operator \
                     allows only in development (--allow-plain-http-loopback)"
                ));
            }
            _ => {
                return Err(format!(
                    "{field} \"{text}\" must be an https:// URL, because client secrets and \
                     tokens travel over it"
                ));
            }
        }
        if let Some(denied) = ip.and_then(|ip| self.denies(ip)) {
            return Err(format!(
                "{field} \"{text}\" is an address the operator does not send to: {}",
                denied.rule
            ));
        }
        Ok(())
    }
}

/// A name that resolved only to denied addresses.
#[derive(Debug)]
pub struct DeniedDestination {
    pub host: String,
    pub rule: String,
}

impl fmt::Display for DeniedDestination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} resolves to an address the operator does not send to: {}",
            self.host, self.rule
        )
    }
}

impl std::error::Error for DeniedDestination {}

/// The addresses of `host` that `policy` allows, from `resolved`; an error
/// naming the rule when none is left.
pub fn allowed_addresses(
    policy: &EndpointPolicy,
    host: &str,
    resolved: impl IntoIterator<Item = SocketAddr>,
) -> Result<Vec<SocketAddr>, DeniedDestination> {
    let mut first_rule = None;
    let allowed: Vec<SocketAddr> = resolved
        .into_iter()
        .filter(|addr| match policy.denies(addr.ip()) {
            Some(denied) => {
                first_rule.get_or_insert_with(|| denied.rule.clone());
                false
            }
            None => true,
        })
        .collect();
    if allowed.is_empty() {
        return Err(DeniedDestination {
            host: host.to_owned(),
            rule: first_rule.unwrap_or_else(|| "it resolves to no address".to_owned()),
        });
    }
    Ok(allowed)
}

/// The HTTP client's resolver: the system's answer, less denied addresses.
pub struct GuardedResolver {
    pub policy: Arc<EndpointPolicy>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let resolved = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let allowed = allowed_addresses(&policy, &host, resolved)?;
            let addrs: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn production() -> EndpointPolicy {
        EndpointPolicy::new(false, &["10.96.0.0/12".parse().unwrap()])
    }

    #[test]
    fn urls_are_parsed_not_prefix_matched() {
        let policy = EndpointPolicy::new(true, &[]);
        let ok = |url: &str| policy.check_url("spec.oauth2.tokenUrl", url);
        assert!(ok("https://login.example.com/token").is_ok());
        assert!(ok("http://127.0.0.1:8080/token").is_ok());
        assert!(ok("http://localhost/token").is_ok());
        assert!(ok("http://[::1]:9/token").is_ok());
        // The loopback prefix of a URL whose host is elsewhere.
        let refused = ok("http://localhost:x@10.0.0.5:9200/").unwrap_err();
        assert!(refused.contains("user name or password"), "{refused}");
        assert!(ok("http://127.0.0.1.example.com/token").is_err());
        assert!(ok("http://10.0.0.5/token").is_err());
        assert!(ok("ftp://example.com/token").is_err());
        assert!(ok("not a url").is_err());
        assert!(ok("https://user@login.example.com/").is_err());
    }

    #[test]
    fn plain_http_and_loopback_need_the_development_flag() {
        let policy = production();
        let refused = policy
            .check_url("spec.oauth2.tokenUrl", "http://127.0.0.1:8080/token")
            .unwrap_err();
        assert!(refused.contains("--allow-plain-http-loopback"), "{refused}");
        let refused = policy
            .check_url("spec.oauth2.tokenUrl", "https://127.0.0.1/token")
            .unwrap_err();
        assert!(refused.contains("loopback"), "{refused}");
    }

    #[test]
    fn denied_networks_are_named() {
        let policy = production();
        for (url, rule) in [
            ("https://169.254.169.254/latest/meta-data", "link-local"),
            ("https://[fe80::1]/", "link-local"),
            ("https://[::ffff:169.254.169.254]/", "link-local"),
            ("https://10.100.0.1/token", "--deny-network"),
            ("https://0.0.0.0/token", "unspecified"),
        ] {
            let refused = policy.check_url("spec.oauth2.tokenUrl", url).unwrap_err();
            assert!(refused.contains(rule), "{url}: {refused}");
        }
        assert!(
            policy
                .check_url("spec.oauth2.tokenUrl", "https://10.0.0.5/token")
                .is_ok()
        );
    }

    #[test]
    fn the_resolver_keeps_only_allowed_addresses() {
        let policy = production();
        let at = |ip: &str| SocketAddr::new(ip.parse().unwrap(), 443);
        // A name that answers with a metadata address too: that one goes.
        let allowed = allowed_addresses(
            &policy,
            "api.example.com",
            [at("169.254.169.254"), at("93.184.216.34")],
        )
        .unwrap();
        assert_eq!(allowed, [at("93.184.216.34")]);
        // Rebinding: the name checked earlier now resolves to a denied
        // address only; the connection gets no address at all.
        let refused = allowed_addresses(&policy, "api.example.com", [at("10.96.0.1")]).unwrap_err();
        assert!(refused.to_string().contains("--deny-network"), "{refused}");
        let refused = allowed_addresses(&policy, "api.example.com", [at("127.0.0.1")]).unwrap_err();
        assert!(refused.to_string().contains("loopback"), "{refused}");
    }

    #[tokio::test]
    async fn the_http_client_does_not_connect_to_a_denied_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = reqwest::Client::builder()
            .dns_resolver(Arc::new(GuardedResolver {
                policy: Arc::new(production()),
            }))
            .build()
            .unwrap();
        // "localhost" passes a check of the URL's text; it resolves to
        // loopback, which production denies, so nothing connects.
        let error = client
            .get(format!("http://localhost:{port}/"))
            .send()
            .await
            .unwrap_err();
        let denied =
            std::iter::successors(Some(&error as &(dyn std::error::Error + 'static)), |e| {
                e.source()
            })
            .any(|e| e.downcast_ref::<DeniedDestination>().is_some());
        assert!(denied, "{error:?}");
        let accepted =
            tokio::time::timeout(std::time::Duration::from_millis(200), listener.accept()).await;
        assert!(accepted.is_err(), "no connection reached the listener");
    }
}
