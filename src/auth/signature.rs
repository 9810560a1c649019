//! Signed `/files` URLs (reference §2.4): a URL carrying `signature=v1_...` (and optionally
//! `signature_expiration=<unix seconds>`) grants one operation on one path, as one user,
//! without the token itself. The signature is
//! `"v1_" + base64_std_unpadded(sha256("path:operation:username:token[:expiration]"))`
//! over the raw query values.

use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::auth::token::TokenStore;
use crate::error::{Error, Result};

/// The version prefix of every signature this daemon accepts.
pub const SIGNATURE_PREFIX: &str = "v1_";

/// What a signed URL allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Download (`GET /files`).
    Read,
    /// Upload (`POST /files`).
    Write,
}

impl Operation {
    /// The word used in the signed string.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Read => "read",
            Operation::Write => "write",
        }
    }
}

/// The signature of `operation` on `path` as `username` (`""` for the default user),
/// valid until `expiration` (Unix seconds) when given.
pub fn sign(
    path: &str,
    operation: Operation,
    username: &str,
    token: &str,
    expiration: Option<i64>,
) -> String {
    let op = operation.as_str();
    let signed = match expiration {
        Some(expiration) => format!("{path}:{op}:{username}:{token}:{expiration}"),
        None => format!("{path}:{op}:{username}:{token}"),
    };
    let digest = Sha256::digest(signed.as_bytes());
    let encoded = base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest);
    format!("{SIGNATURE_PREFIX}{encoded}")
}

/// The parts of a `/files` request that prove access, as they arrived (raw query values).
#[derive(Clone, Copy, Default)]
pub struct FileAccess<'a> {
    /// `X-Access-Token`, when present and non-empty.
    pub header_token: Option<&'a [u8]>,
    /// The raw `path` query value (`""` when absent); not resolved.
    pub path: &'a str,
    /// The raw `username` query value (`""` when absent).
    pub username: &'a str,
    /// The `signature` query value.
    pub signature: Option<&'a str>,
    /// The `signature_expiration` query value.
    pub expiration: Option<i64>,
}

impl std::fmt::Debug for FileAccess<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The header may hold the real token: show only whether there was one.
        f.debug_struct("FileAccess")
            .field("header_token", &self.header_token.map(|_| "<redacted>"))
            .field("path", &self.path)
            .field("username", &self.username)
            .field("signature", &self.signature)
            .field("expiration", &self.expiration)
            .finish()
    }
}

/// Checks a `/files` request. With no token in force, every request passes. Otherwise a
/// header token must be the token (and then the signature is not looked at); without one,
/// the signature must match and must not have expired (`expiration == now` is still valid).
///
/// # Errors
/// [`Error::Unauthenticated`]: `access token present in header but does not match`,
/// `missing signature query parameter`, `invalid signature`, `signature is already expired`.
pub fn check(
    tokens: &TokenStore,
    access: &FileAccess<'_>,
    operation: Operation,
    now: i64,
) -> Result<()> {
    let Some(token) = tokens.current() else {
        return Ok(());
    };
    let refuse = |message: &str| Err(Error::Unauthenticated(message.to_owned()));
    if let Some(presented) = access.header_token.filter(|t| !t.is_empty()) {
        if token.matches(presented) {
            return Ok(());
        }
        return refuse("access token present in header but does not match");
    }
    let Some(signature) = access.signature else {
        return refuse("missing signature query parameter");
    };
    let expected = sign(
        access.path,
        operation,
        access.username,
        token.expose_secret(),
        access.expiration,
    );
    if !bool::from(expected.as_bytes().ct_eq(signature.as_bytes())) {
        return refuse("invalid signature");
    }
    if access.expiration.is_some_and(|expiration| expiration < now) {
        return refuse("signature is already expired");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::token::AccessToken;

    #[test]
    fn the_formula() {
        // sha256("/tmp/a.txt:read::tok") and sha256("/tmp/a.txt:write:root:tok:1700000000"),
        // computed independently with coreutils: `printf %s ... | sha256sum | xxd -r -p | base64`.
        let cases = [
            (
                ("/tmp/a.txt", Operation::Read, "", None),
                "v1_tRlsooM2hvGDgtWWsmSPYkbHGF1tnIIlZnLHK/9lpTk",
            ),
            (
                ("/tmp/a.txt", Operation::Write, "root", Some(1_700_000_000)),
                "v1_cPAg3XmgAZxms09SW0Wfh4f1KcLTY2oLgFlDp7VsMrE",
            ),
        ];
        for ((path, op, user, exp), want) in cases {
            assert_eq!(sign(path, op, user, "tok", exp), want, "{path} {op:?}");
        }
        let sig = sign("p", Operation::Read, "", "t", None);
        assert!(!sig.contains('='), "unpadded: {sig}");
    }

    #[test]
    fn the_check_matrix() {
        let tokens = TokenStore::default();
        let open = FileAccess {
            path: "/x",
            ..FileAccess::default()
        };
        assert!(
            check(&tokens, &open, Operation::Read, 0).is_ok(),
            "no token: open"
        );
        tokens.replace(Some(AccessToken::new("tok").expect("token")));
        let now = 1_000;
        let signed = |path, op, user, exp| sign(path, op, user, "tok", exp);
        let read_sig = signed("/x", Operation::Read, "", None);
        let user_sig = signed("/x", Operation::Read, "root", None);
        let exp_sig = signed("/x", Operation::Read, "", Some(now));
        let old_sig = signed("/x", Operation::Read, "", Some(now - 1));
        let base = FileAccess {
            path: "/x",
            ..FileAccess::default()
        };
        // (access, operation, expected error or None)
        let cases: Vec<(FileAccess<'_>, Operation, Option<&str>)> = vec![
            (
                base,
                Operation::Read,
                Some("missing signature query parameter"),
            ),
            (
                FileAccess {
                    header_token: Some(b"tok"),
                    ..base
                },
                Operation::Write,
                None,
            ),
            (
                FileAccess {
                    header_token: Some(b"bad"),
                    signature: Some(&read_sig),
                    ..base
                },
                Operation::Read,
                Some("access token present in header but does not match"),
            ),
            (
                FileAccess {
                    header_token: Some(b""),
                    signature: Some(&read_sig),
                    ..base
                },
                Operation::Read,
                None,
            ),
            (
                FileAccess {
                    signature: Some(&read_sig),
                    ..base
                },
                Operation::Read,
                None,
            ),
            (
                FileAccess {
                    signature: Some(&read_sig),
                    ..base
                },
                Operation::Write,
                Some("invalid signature"),
            ),
            (
                FileAccess {
                    signature: Some(&read_sig),
                    path: "/y",
                    ..base
                },
                Operation::Read,
                Some("invalid signature"),
            ),
            (
                FileAccess {
                    signature: Some(&user_sig),
                    username: "root",
                    ..base
                },
                Operation::Read,
                None,
            ),
            (
                FileAccess {
                    signature: Some(&user_sig),
                    ..base
                },
                Operation::Read,
                Some("invalid signature"),
            ),
            (
                FileAccess {
                    signature: Some(&exp_sig),
                    expiration: Some(now),
                    ..base
                },
                Operation::Read,
                None,
            ),
            (
                FileAccess {
                    signature: Some(&exp_sig),
                    expiration: Some(now + 1),
                    ..base
                },
                Operation::Read,
                Some("invalid signature"),
            ),
            (
                FileAccess {
                    signature: Some(&old_sig),
                    expiration: Some(now - 1),
                    ..base
                },
                Operation::Read,
                Some("signature is already expired"),
            ),
        ];
        for (access, op, want) in cases {
            let got = check(&tokens, &access, op, now);
            match (&got, want) {
                (Ok(()), None) => {}
                (Err(Error::Unauthenticated(message)), Some(want)) => {
                    assert_eq!(message, want, "{access:?} {op:?}");
                }
                _ => panic!("{access:?} {op:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    mod properties {
        use super::*;
        use crate::auth::token::AccessToken;
        use proptest::prelude::*;

        fn operation() -> impl Strategy<Value = Operation> {
            prop_oneof![Just(Operation::Read), Just(Operation::Write)]
        }

        /// (path, operation, username, expiration). Paths may hold `:`; user names cannot
        /// (`:` separates the fields of /etc/passwd, so no such user exists).
        fn grant() -> impl Strategy<Value = (String, Operation, String, Option<i64>)> {
            (
                prop_oneof![".{0,20}", "/[a-z:/]{0,12}"],
                operation(),
                "[^:]{0,8}",
                prop::option::of(prop_oneof![any::<i64>(), 0i64..2_000_000_000]),
            )
        }

        proptest! {
            /// A signed URL grants exactly what it was signed for: the same path, operation,
            /// user and expiration verify; with any one of them (or all) changed, refused.
            #[test]
            fn a_signature_grants_only_its_own_path_operation_and_user(
                token in "[^:]{1,24}",
                signed in grant(),
                other in grant(),
                change in 0usize..6,
            ) {
                let tokens = TokenStore::default();
                tokens.replace(Some(AccessToken::new(token.clone()).expect("token")));
                let (path, op, user, expiration) = signed.clone();
                let used = match change {
                    0 => signed.clone(),
                    1 => (other.0, op, user, expiration),
                    2 => (path, other.1, user, expiration),
                    3 => (path, op, other.2, expiration),
                    4 => (path, op, user, other.3),
                    _ => other,
                };
                let signature = sign(&signed.0, signed.1, &signed.2, &token, signed.3);
                let access = FileAccess {
                    header_token: None,
                    path: &used.0,
                    username: &used.2,
                    signature: Some(&signature),
                    expiration: used.3,
                };
                // Before every expiration, so that only the grant decides.
                let got = check(&tokens, &access, used.1, i64::MIN);
                prop_assert_eq!(got.is_ok(), signed == used, "{:?} used as {:?}", signed, used);
            }

            /// Any request at all is decided without a panic; a header token that is not
            /// the token is refused whatever the signature says.
            #[test]
            fn any_request_is_decided(
                header in prop::option::of(prop::collection::vec(any::<u8>(), 0..16)),
                path in ".{0,16}",
                user in ".{0,8}",
                signature in prop::option::of(".{0,50}"),
                expiration in prop::option::of(any::<i64>()),
                op in operation(),
                now in any::<i64>(),
            ) {
                let tokens = TokenStore::default();
                tokens.replace(Some(AccessToken::new("tok").expect("token")));
                let access = FileAccess {
                    header_token: header.as_deref(),
                    path: &path,
                    username: &user,
                    signature: signature.as_deref(),
                    expiration,
                };
                let got = check(&tokens, &access, op, now);
                if let Some(header) = header.as_deref().filter(|h| !h.is_empty()) {
                    prop_assert_eq!(got.is_ok(), header == b"tok");
                }
            }
        }
    }
}
