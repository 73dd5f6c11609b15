//! SPIFFE workload ids of the form `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::{fmt, str::FromStr};

use super::Error;

const SCHEME: &str = "spiffe://";
/// SPIFFE: a trust domain is at most 255 bytes, a whole id at most 2048.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
const MAX_ID_LEN: usize = 2048;

/// A workload identity: a Kubernetes service account in a trust domain.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl SpiffeId {
    /// Builds an id, validating each part as the SPIFFE specification requires: the trust
    /// domain is lowercase letters, digits, `.`, `-` and `_`; namespace and service account are
    /// non-empty path segments of ASCII letters, digits, `.`, `-` and `_` (never `.` or `..`).
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, Error> {
        let id = SpiffeId {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        };
        let invalid = |reason: String| Error::InvalidSpiffeId {
            input: id.to_string(),
            reason,
        };
        validate_trust_domain(trust_domain).map_err(|reason| invalid(reason.into_owned()))?;
        validate_segment(namespace).map_err(|r| invalid(format!("namespace: {r}")))?;
        validate_segment(service_account).map_err(|r| invalid(format!("service account: {r}")))?;
        if id.to_string().len() > MAX_ID_LEN {
            return Err(invalid(format!("longer than {MAX_ID_LEN} bytes")));
        }
        Ok(id)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = Error;

    /// Parses exactly `spiffe://<td>/ns/<ns>/sa/<sa>`: no port, user info, query, fragment,
    /// trailing slash or other path shape.
    fn from_str(s: &str) -> Result<Self, Error> {
        let invalid = |reason: &str| Error::InvalidSpiffeId {
            input: s.to_owned(),
            reason: reason.to_owned(),
        };
        if s.len() > MAX_ID_LEN {
            return Err(invalid("longer than 2048 bytes"));
        }
        let Some(rest) = s.strip_prefix(SCHEME) else {
            return Err(invalid("the scheme must be \"spiffe://\""));
        };
        let (trust_domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        validate_trust_domain(trust_domain)
            .map_err(|reason| invalid(&format!("trust domain: {reason}")))?;
        let segments: Vec<&str> = path.split('/').collect();
        match segments.as_slice() {
            ["ns", namespace, "sa", service_account] => {
                validate_segment(namespace).map_err(|r| invalid(&format!("namespace: {r}")))?;
                validate_segment(service_account)
                    .map_err(|r| invalid(&format!("service account: {r}")))?;
                Ok(SpiffeId {
                    trust_domain: trust_domain.to_owned(),
                    namespace: (*namespace).to_owned(),
                    service_account: (*service_account).to_owned(),
                })
            }
            [""] => Err(invalid(
                "no path: a workload id needs /ns/<namespace>/sa/<service-account>",
            )),
            _ => Err(invalid(&format!(
                "the path must be /ns/<namespace>/sa/<service-account>, found /{path}"
            ))),
        }
    }
}

/// Checks a trust domain name; the error says what is wrong with it.
pub(crate) fn validate_trust_domain(td: &str) -> Result<(), std::borrow::Cow<'static, str>> {
    if td.is_empty() {
        return Err("empty".into());
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(format!("longer than {MAX_TRUST_DOMAIN_LEN} bytes").into());
    }
    if let Some(c) = td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        let hint = if c.is_ascii_uppercase() {
            " (trust domains are lowercase)"
        } else {
            ""
        };
        return Err(format!("character {c:?} is not allowed{hint}").into());
    }
    Ok(())
}

/// Validates a trust domain for use in configuration, with an error naming it.
pub(crate) fn check_trust_domain(td: &str) -> Result<(), Error> {
    validate_trust_domain(td).map_err(|reason| Error::InvalidTrustDomain {
        input: td.to_owned(),
        reason: reason.into_owned(),
    })
}

fn validate_segment(segment: &str) -> Result<(), String> {
    if segment.is_empty() {
        return Err("empty".to_owned());
    }
    if segment == "." || segment == ".." {
        return Err(format!("{segment:?} is not allowed"));
    }
    if let Some(c) = segment
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        return Err(format!("character {c:?} is not allowed"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for s in [
            "spiffe://cluster.local/ns/default/sa/default",
            "spiffe://example.org/ns/shop/sa/api-server",
            "spiffe://td_1-x.y/ns/N.s/sa/SA_1",
        ] {
            let id: SpiffeId = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(id.to_string(), s);
            let again = SpiffeId::new(&id.trust_domain, &id.namespace, &id.service_account)
                .unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(again, id);
        }
    }

    #[test]
    fn parse_rejects() {
        let cases = [
            ("", "scheme"),
            ("http://cluster.local/ns/a/sa/b", "scheme"),
            ("SPIFFE://cluster.local/ns/a/sa/b", "scheme"),
            ("spiffe:/cluster.local/ns/a/sa/b", "scheme"),
            ("spiffe:///ns/a/sa/b", "trust domain: empty"),
            ("spiffe://Cluster.local/ns/a/sa/b", "lowercase"),
            ("spiffe://cluster.local:8443/ns/a/sa/b", "':'"),
            ("spiffe://user@cluster.local/ns/a/sa/b", "'@'"),
            ("spiffe://cluster.local", "no path"),
            ("spiffe://cluster.local/", "no path"),
            ("spiffe://cluster.local/ns/a/sa/", "service account: empty"),
            ("spiffe://cluster.local/ns//sa/b", "namespace: empty"),
            ("spiffe://cluster.local/ns/a/sa/b/", "path must be"),
            ("spiffe://cluster.local/ns/a/sa/b/extra", "path must be"),
            ("spiffe://cluster.local/ns/a", "path must be"),
            ("spiffe://cluster.local/sa/b/ns/a", "path must be"),
            ("spiffe://cluster.local/ns/a/sa/b?x=1", "'?'"),
            ("spiffe://cluster.local/ns/a/sa/b#frag", "'#'"),
            ("spiffe://cluster.local/ns/../sa/b", "\"..\""),
            ("spiffe://cluster.local/ns/a/sa/é", "'é'"),
            ("spiffe://cluster.local/ns/a%2F/sa/b", "'%'"),
        ];
        for (input, want) in cases {
            match input.parse::<SpiffeId>() {
                Ok(id) => panic!("{input:?} parsed as {id}"),
                Err(e) => {
                    let msg = e.to_string();
                    assert!(msg.contains(want), "{input:?}: {msg:?} lacks {want:?}");
                    assert!(
                        msg.contains(input),
                        "{input:?}: {msg:?} does not name the input"
                    );
                }
            }
        }
    }

    #[test]
    fn new_rejects() {
        let cases = [
            ("", "default", "default"),
            ("Cluster.local", "default", "default"),
            ("cluster.local", "", "default"),
            ("cluster.local", "default", ""),
            ("cluster.local", "a/b", "default"),
            ("cluster.local", "default", "a/b"),
            ("cluster.local", "default", "ünï"),
        ];
        for (td, ns, sa) in cases {
            assert!(
                SpiffeId::new(td, ns, sa).is_err(),
                "{td:?} {ns:?} {sa:?} accepted"
            );
        }
    }
}
