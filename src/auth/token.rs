//! The access token: the secret every caller must present once the control plane has set
//! one, and the rules for changing it (reference §2.3).
//!
//! The secret never reaches a log: [`AccessToken`]'s `Debug` is redacted, and comparisons
//! run in constant time. Nothing here knows about HTTP.

use std::fmt;
use std::sync::RwLock;

use futures_util::future::BoxFuture;
use sha2::{Digest, Sha256, Sha512};
use subtle::ConstantTimeEq;

use crate::error::{Error, Result};

/// Refusal when `/init` names a token different from the one in force.
pub const MISMATCH_MESSAGE: &str = "access token validation failed";
/// Refusal when `/init` would clear the token in force.
pub const RESET_MESSAGE: &str = "access token reset not authorized";

/// A non-empty access token.
#[derive(Clone)]
pub struct AccessToken {
    secret: String,
    /// SHA-256 of the secret, computed once: a comparison hashes only the candidate, so the
    /// time it takes depends on the candidate alone, never on the token.
    digest: [u8; 32],
}

#[cfg(test)]
thread_local! {
    /// Calls of [`digests_equal`] on this thread, for the code-path test.
    static COMPARISONS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The one place a presented secret is compared: two fixed-size digests, in constant time.
fn digests_equal(want: &[u8; 32], got: &[u8; 32]) -> bool {
    #[cfg(test)]
    COMPARISONS.with(|count| count.set(count.get() + 1));
    want.ct_eq(got).into()
}

impl AccessToken {
    /// Wraps a token.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `token` is empty: an empty token is never valid.
    pub fn new(token: impl Into<String>) -> Result<Self> {
        let token = token.into();
        if token.is_empty() {
            return Err(Error::InvalidArgument(
                "accessToken must not be empty".into(),
            ));
        }
        let digest = Sha256::digest(token.as_bytes()).into();
        Ok(AccessToken {
            secret: token,
            digest,
        })
    }

    /// True when `candidate` is this token. Constant time: the candidate is hashed and the
    /// digests compared in constant time, so neither the content nor the length of the
    /// token shows in the time taken, and there is no early exit (not even on length).
    pub fn matches(&self, candidate: &[u8]) -> bool {
        digests_equal(&self.digest, &Sha256::digest(candidate).into())
    }

    /// The secret itself, for computing URL signatures. Never log it.
    pub fn expose_secret(&self) -> &str {
        &self.secret
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessToken(<redacted>)")
    }
}

/// The token in force, if any. Starts empty: until `/init` sets one, everything is open.
#[derive(Debug, Default)]
pub struct TokenStore {
    current: RwLock<Option<AccessToken>>,
}

impl TokenStore {
    /// True once a token is in force.
    pub fn is_set(&self) -> bool {
        self.read().is_some()
    }

    /// A copy of the token in force.
    pub fn current(&self) -> Option<AccessToken> {
        self.read().clone()
    }

    /// True when no token is in force, or `presented` is that token.
    pub fn admits(&self, presented: Option<&[u8]>) -> bool {
        match (&*self.read(), presented) {
            (None, _) => true,
            (Some(token), Some(presented)) => token.matches(presented),
            (Some(_), None) => false,
        }
    }

    /// Puts `token` in force, or clears the token when `None`. Callers check
    /// [`authorize_change`] first.
    pub fn replace(&self, token: Option<AccessToken>) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = token;
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Option<AccessToken>> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Where the host can vouch for a token change: on Firecracker, envd reads the lowercase
/// hex SHA-512 of the wanted token from MMDS (the hash of `""` authorizes clearing it).
/// This daemon has no such channel yet; [`NoHostTokenHash`] is the only implementation.
pub trait HostTokenHash: fmt::Debug + Send + Sync {
    /// The hash the host published, or `None` when there is none (or it cannot be read).
    fn token_hash(&self) -> BoxFuture<'_, Option<String>>;
}

/// No host channel: every change is judged by the token in force alone.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHostTokenHash;

impl HostTokenHash for NoHostTokenHash {
    fn token_hash(&self) -> BoxFuture<'_, Option<String>> {
        Box::pin(std::future::ready(None))
    }
}

/// Decides whether an `/init` carrying `requested` (`None`: no token in the request) may
/// replace the token in force (`current`), in envd's order:
///
/// 1. re-sending the token in force is always allowed;
/// 2. a host hash matching the requested token (or `""` when none) allows the change;
/// 3. with no token in force and no host hash, anything goes (first-time setup);
/// 4. otherwise the change is refused.
///
/// # Errors
/// [`Error::Unauthenticated`] `access token reset not authorized` when the request would
/// clear the token, `access token validation failed` when it names another one.
pub async fn authorize_change(
    current: Option<&AccessToken>,
    requested: Option<&AccessToken>,
    host: &dyn HostTokenHash,
) -> Result<()> {
    if let (Some(current), Some(requested)) = (current, requested) {
        if current.matches(requested.expose_secret().as_bytes()) {
            return Ok(());
        }
    }
    let host_hash = host.token_hash().await.filter(|hash| !hash.is_empty());
    if let Some(hash) = &host_hash {
        let wanted = sha512_hex(requested.map_or(&b""[..], |t| t.expose_secret().as_bytes()));
        let published = hash.trim().to_ascii_lowercase();
        if bool::from(wanted.as_bytes().ct_eq(published.as_bytes())) {
            return Ok(());
        }
    }
    match (current, host_hash, requested) {
        (None, None, _) => Ok(()),
        (_, _, None) => Err(Error::Unauthenticated(RESET_MESSAGE.into())),
        (_, _, Some(_)) => Err(Error::Unauthenticated(MISMATCH_MESSAGE.into())),
    }
}

/// Lowercase hex SHA-512, the format of the host's token hash.
fn sha512_hex(data: &[u8]) -> String {
    use std::fmt::Write;
    let digest = Sha512::digest(data);
    let mut hex = String::with_capacity(digest.len() * 2);
    for byte in digest.iter() {
        // Writing to a String cannot fail.
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host that publishes a fixed hash.
    #[derive(Debug)]
    struct Published(String);

    impl HostTokenHash for Published {
        fn token_hash(&self) -> BoxFuture<'_, Option<String>> {
            Box::pin(std::future::ready(Some(self.0.clone())))
        }
    }

    fn token(text: &str) -> AccessToken {
        AccessToken::new(text).expect("non-empty")
    }

    #[test]
    fn tokens_are_redacted_and_compared_exactly() {
        let secret = token("s3cret");
        assert_eq!(format!("{secret:?}"), "AccessToken(<redacted>)");
        let store = TokenStore::default();
        store.replace(Some(secret.clone()));
        assert!(!format!("{store:?}").contains("s3cret"));
        assert!(secret.matches(b"s3cret"));
        for wrong in [&b"s3cre"[..], b"s3cret ", b"S3CRET", b""] {
            assert!(!secret.matches(wrong), "{wrong:?}");
        }
        assert!(AccessToken::new("").is_err());
    }

    /// Every refusal, whatever the wrong token looks like, takes the same path: one
    /// constant-time comparison of two 32-byte digests, and nothing before it that could
    /// return early (no length check, no byte-by-byte compare).
    #[test]
    fn every_comparison_is_one_constant_time_digest_compare() {
        let secret = "Tok-3f9a-ABCD";
        let store = TokenStore::default();
        store.replace(Some(token(secret)));
        let long = secret.repeat(100);
        let candidates: [&[u8]; 9] = [
            b"",
            b"T",
            b"Tok-3f9a-ABC",
            b"Tok-3f9a-ABCE",
            b"xok-3f9a-ABCD",
            b"tok-3f9a-abcd",
            b"TOK-3F9A-ABCD",
            b"Tok-3f9a-ABCD ",
            long.as_bytes(),
        ];
        for candidate in candidates.into_iter().chain([secret.as_bytes()]) {
            let before = COMPARISONS.with(std::cell::Cell::get);
            let admitted = store.admits(Some(candidate));
            assert_eq!(admitted, candidate == secret.as_bytes(), "{candidate:?}");
            let compared = COMPARISONS.with(std::cell::Cell::get) - before;
            assert_eq!(compared, 1, "{candidate:?} took another path");
        }
    }

    #[test]
    fn the_store_admits_anyone_until_a_token_is_set() {
        let store = TokenStore::default();
        assert!(store.admits(None));
        assert!(store.admits(Some(b"anything")));
        store.replace(Some(token("t")));
        assert!(store.is_set());
        assert!(store.admits(Some(b"t")));
        assert!(!store.admits(Some(b"u")));
        assert!(!store.admits(None));
    }

    #[tokio::test]
    async fn change_rules_without_a_host_hash() {
        let host = NoHostTokenHash;
        let (a, b) = (token("a"), token("b"));
        // (current, requested, expected error message or None for allowed)
        let cases: [(Option<&AccessToken>, Option<&AccessToken>, Option<&str>); 6] = [
            (None, None, None),
            (None, Some(&a), None),
            (Some(&a), Some(&a), None),
            (Some(&a), Some(&b), Some(MISMATCH_MESSAGE)),
            (Some(&a), None, Some(RESET_MESSAGE)),
            (Some(&b), Some(&a), Some(MISMATCH_MESSAGE)),
        ];
        for (current, requested, want) in cases {
            let got = authorize_change(current, requested, &host).await;
            match (got, want) {
                (Ok(()), None) => {}
                (Err(Error::Unauthenticated(message)), Some(want)) => assert_eq!(message, want),
                (got, want) => panic!("{current:?} → {requested:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_host_hash_authorizes_rotation_and_reset() {
        let (a, b) = (token("a"), token("b"));
        // Rotation: the host published the hash of the new token.
        let host = Published(sha512_hex(b"b"));
        authorize_change(Some(&a), Some(&b), &host)
            .await
            .expect("rotation vouched for");
        let err = authorize_change(Some(&a), None, &host).await;
        assert!(matches!(err, Err(Error::Unauthenticated(m)) if m == RESET_MESSAGE));
        // A published hash also guards first-time setup.
        let err = authorize_change(None, Some(&a), &host).await;
        assert!(matches!(err, Err(Error::Unauthenticated(m)) if m == MISMATCH_MESSAGE));
        // Reset: the host published the hash of "".
        authorize_change(Some(&a), None, &Published(sha512_hex(b"")))
            .await
            .expect("reset vouched for");
        // An empty published hash counts as none.
        authorize_change(None, Some(&a), &Published(String::new()))
            .await
            .expect("first-time setup");
    }

    proptest::proptest! {
        /// A candidate matches exactly when it is the token, byte for byte (so a token
        /// differing only in case, or by a prefix or suffix, never does).
        #[test]
        fn matches_is_byte_equality(
            secret in "[ -~]{1,40}",
            candidate in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..48),
        ) {
            let token = token(&secret);
            proptest::prop_assert_eq!(token.matches(&candidate), candidate == secret.as_bytes());
            proptest::prop_assert!(token.matches(secret.as_bytes()));
            let flipped: String = secret.chars().map(|c| if c.is_ascii_lowercase() { c.to_ascii_uppercase() } else { c.to_ascii_lowercase() }).collect();
            proptest::prop_assert_eq!(token.matches(flipped.as_bytes()), flipped == secret);
        }
    }

    #[test]
    fn sha512_hex_is_lowercase_hex() {
        let empty = sha512_hex(b"");
        assert_eq!(empty.len(), 128);
        assert!(empty.starts_with("cf83e1357eefb8bd"), "{empty}");
    }
}
