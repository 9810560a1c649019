//! Content-coding negotiation for `/files`: which encoding a download may use
//! (`Accept-Encoding`), and whether an upload body is gzip (`Content-Encoding`).
//! gzip is the only coding besides identity (reference §3.5, §3.6).

/// A content coding the daemon produces or accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    /// No transformation.
    Identity,
    /// gzip.
    Gzip,
}

struct Offer<'a> {
    name: &'a str,
    q: f32,
}

fn offers(header: &str) -> Vec<Offer<'_>> {
    header
        .split(',')
        .filter_map(|item| {
            let mut parts = item.split(';');
            let name = parts.next()?.trim();
            if name.is_empty() {
                return None;
            }
            let q = parts
                .filter_map(|p| {
                    p.trim()
                        .strip_prefix("q=")
                        .or_else(|| p.trim().strip_prefix("Q="))
                })
                .find_map(|v| v.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            Some(Offer { name, q })
        })
        .collect()
}

/// True when the header forbids identity: `identity;q=0`, or `*;q=0` without an explicit
/// acceptable `identity`.
pub fn identity_rejected(header: Option<&str>) -> bool {
    let Some(header) = header else { return false };
    let offers = offers(header);
    let explicit = offers
        .iter()
        .find(|o| o.name.eq_ignore_ascii_case("identity"));
    match explicit {
        Some(offer) => offer.q <= 0.0,
        None => offers.iter().any(|o| o.name == "*" && o.q <= 0.0),
    }
}

/// Chooses the coding of a download. `None` when nothing acceptable can be produced (406).
pub fn negotiate(header: Option<&str>) -> Option<Coding> {
    let Some(header) = header else {
        return Some(Coding::Identity);
    };
    let rejected = identity_rejected(Some(header));
    let mut offers = offers(header);
    // Stable sort: equal q keeps header order.
    offers.sort_by(|a, b| b.q.partial_cmp(&a.q).unwrap_or(std::cmp::Ordering::Equal));
    for offer in offers.iter().filter(|o| o.q > 0.0) {
        if offer.name.eq_ignore_ascii_case("identity") {
            return Some(Coding::Identity);
        }
        if offer.name == "*" {
            return Some(if rejected {
                Coding::Gzip
            } else {
                Coding::Identity
            });
        }
        if offer.name.eq_ignore_ascii_case("gzip") {
            return Some(Coding::Gzip);
        }
    }
    (!rejected).then_some(Coding::Identity)
}

/// The coding of an upload body from its `Content-Encoding`. `Err` carries the header for
/// the error message.
///
/// # Errors
/// Any coding but identity and gzip.
pub fn request_coding(header: Option<&str>) -> Result<Coding, String> {
    let Some(header) = header else {
        return Ok(Coding::Identity);
    };
    let name = header.split(';').next().unwrap_or("").trim();
    if name.is_empty() || name.eq_ignore_ascii_case("identity") {
        Ok(Coding::Identity)
    } else if name.eq_ignore_ascii_case("gzip") {
        Ok(Coding::Gzip)
    } else {
        Err(header.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiates_like_envd() {
        let cases: &[(Option<&str>, Option<Coding>)] = &[
            (None, Some(Coding::Identity)),
            (Some("gzip"), Some(Coding::Gzip)),
            (Some("GZIP"), Some(Coding::Gzip)),
            (Some("deflate, gzip, br"), Some(Coding::Gzip)),
            (Some("br"), Some(Coding::Identity)),
            (Some("gzip;q=0.5, identity;q=1.0"), Some(Coding::Identity)),
            (Some("br;q=1.0, gzip;q=0.5"), Some(Coding::Gzip)),
            (Some("*"), Some(Coding::Identity)),
            (Some("*, identity;q=0"), Some(Coding::Gzip)),
            (Some("*;q=0"), None),
            (Some("br, identity;q=0"), None),
            (Some("gzip, identity"), Some(Coding::Gzip)),
            (Some("identity, gzip"), Some(Coding::Identity)),
            (Some("gzip;q=0"), Some(Coding::Identity)),
            (Some("gzip, deflate"), Some(Coding::Gzip)),
        ];
        for (header, want) in cases {
            assert_eq!(negotiate(*header), *want, "{header:?}");
        }
        assert!(identity_rejected(Some("gzip;q=1,*;q=0")));
        assert!(!identity_rejected(Some("*;q=0, identity")));
    }

    #[test]
    fn request_codings() {
        assert_eq!(request_coding(None), Ok(Coding::Identity));
        assert_eq!(request_coding(Some("identity")), Ok(Coding::Identity));
        assert_eq!(request_coding(Some("GZip;q=1")), Ok(Coding::Gzip));
        assert_eq!(request_coding(Some("br")), Err("br".to_owned()));
    }
}
