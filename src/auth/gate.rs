//! The access-token gate (reference §2.1). With a token in force, a request gets through
//! only when it carries the token in `X-Access-Token` or is one of the exempt routes
//! (exact method and path). The REST middleware and the RPC stack both ask [`check`], so
//! they refuse exactly the same requests.

use http::Method;

use crate::auth::token::TokenStore;
use crate::error::{Error, Result};

/// The request header that carries the access token.
pub const ACCESS_TOKEN_HEADER: &str = "x-access-token";

/// The refusal, in envd's words.
pub const UNAUTHORIZED_MESSAGE: &str =
    "unauthorized access, please provide a valid access token or method signing if supported";

/// Routes that pass without the token: `/health` (liveness probes), `/files` and
/// `/files/metadata` (they check the token or a URL signature themselves) and `/init` (it
/// checks token changes itself). Matched exactly: `GET /files/` or `HEAD /files` are not
/// exempt.
const EXEMPT: [(Method, &str); 5] = [
    (Method::GET, "/health"),
    (Method::GET, "/files"),
    (Method::POST, "/files"),
    (Method::PATCH, "/files/metadata"),
    (Method::POST, "/init"),
];

/// True for the routes that pass without the token.
pub fn is_exempt(method: &Method, path: &str) -> bool {
    EXEMPT.iter().any(|(m, p)| m == method && *p == path)
}

/// Lets a request through, or refuses it.
///
/// # Errors
/// [`Error::Unauthenticated`] with [`UNAUTHORIZED_MESSAGE`] when a token is in force, the
/// route is not exempt and `presented` (the `X-Access-Token` value) is not the token.
pub fn check(
    tokens: &TokenStore,
    method: &Method,
    path: &str,
    presented: Option<&[u8]>,
) -> Result<()> {
    if is_exempt(method, path) || tokens.admits(presented) {
        return Ok(());
    }
    Err(Error::Unauthenticated(UNAUTHORIZED_MESSAGE.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::token::AccessToken;

    /// (store, method, path, presented token, admitted)
    type Case<'a> = (&'a TokenStore, Method, &'a str, Option<&'a [u8]>, bool);

    #[test]
    fn the_gate_matrix() {
        let open = TokenStore::default();
        let locked = TokenStore::default();
        locked.replace(Some(AccessToken::new("tok").expect("token")));
        let rpc = "/filesystem.Filesystem/Stat";
        let cases: &[Case<'_>] = &[
            (&open, Method::GET, "/envs", None, true),
            (&open, Method::POST, rpc, Some(b"whatever"), true),
            (&locked, Method::GET, "/envs", None, false),
            (&locked, Method::GET, "/envs", Some(b"tok"), true),
            (&locked, Method::GET, "/envs", Some(b"nope"), false),
            (&locked, Method::GET, "/metrics", Some(b""), false),
            (&locked, Method::POST, rpc, None, false),
            (&locked, Method::POST, rpc, Some(b"tok"), true),
            (&locked, Method::GET, "/health", None, true),
            (&locked, Method::GET, "/files", None, true),
            (&locked, Method::POST, "/files", Some(b"wrong"), true),
            (&locked, Method::POST, "/init", None, true),
            (&locked, Method::HEAD, "/health", None, false),
            (&locked, Method::HEAD, "/files", None, false),
            (&locked, Method::GET, "/files/", None, false),
            (&locked, Method::POST, "/files/compose", None, false),
            (&locked, Method::GET, "/init", None, false),
            (&locked, Method::GET, "/HEALTH", None, false),
            (&locked, Method::GET, "/nope", None, false),
        ];
        for (store, method, path, presented, admitted) in cases {
            let got = check(store, method, path, *presented);
            assert_eq!(got.is_ok(), *admitted, "{method} {path} {presented:?}");
            if let Err(err) = got {
                assert_eq!(err.to_string(), UNAUTHORIZED_MESSAGE);
                assert_eq!(err.http_status(), http::StatusCode::UNAUTHORIZED);
            }
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn paths() -> impl Strategy<Value = String> {
            prop_oneof![
                prop::sample::select(vec![
                    "/health",
                    "/files",
                    "/files/metadata",
                    "/init",
                    "/envs",
                    "/metrics",
                    "/filesystem.Filesystem/Stat",
                ])
                .prop_map(str::to_owned),
                ".{0,20}",
            ]
        }

        proptest! {
            /// With a token in force, a request passes exactly when its route is exempt or
            /// it presents the token, byte for byte (another case is another token).
            #[test]
            fn the_gate_admits_exactly_the_token_or_an_exemption(
                method in prop::sample::select(vec![Method::GET, Method::POST, Method::PATCH, Method::HEAD, Method::PUT]),
                path in paths(),
                presented in prop::option::of(prop_oneof![
                    Just(b"Tok-9".to_vec()),
                    Just(b"tok-9".to_vec()),
                    Just(b"TOK-9".to_vec()),
                    prop::collection::vec(any::<u8>(), 0..8),
                ]),
            ) {
                let locked = TokenStore::default();
                locked.replace(Some(AccessToken::new("Tok-9").expect("token")));
                let admitted = check(&locked, &method, &path, presented.as_deref()).is_ok();
                let want = is_exempt(&method, &path) || presented.as_deref() == Some(&b"Tok-9"[..]);
                prop_assert_eq!(admitted, want);
            }
        }
    }
}
