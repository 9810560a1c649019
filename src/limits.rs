//! The daemon's limits: every bound on what a client can make it hold or wait for. Each is
//! a named default with the reason for its value, a flag (with an `ENVD_*` variable) that
//! changes it, and a documented effect when it is hit (README, "Limits"). The one check no
//! library makes for us, the nesting depth of a JSON body, lives here too.
//!
//! Nothing here touches a socket: `server` applies the connection limits, `http` and `rpc`
//! the body and message limits.

use std::time::Duration;

use crate::error::{Error, Result};

/// Connections served at once. Each holds a descriptor and a task; beyond this the daemon
/// stops accepting and new clients wait in the kernel's listen queue. Far above what the SDKs
/// open (a few per sandbox), far below the descriptor limit the daemon raises itself to.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// HTTP/2 streams (requests) open at once on one connection; the client is told in SETTINGS
/// and must queue beyond it. Go's HTTP/2 server allows 250; a round number above it.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 256;
/// Bytes of a request's header section: HTTP/1.1's read buffer (a head that does not fit is
/// 431) and HTTP/2's header list size. A full metadata set with its header names is about
/// 10 KiB; Go's default (1 MiB) is more than anything a client of this daemon sends.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Header fields in one HTTP/1.1 request (431 beyond it). The metadata size rule allows at
/// most 409 `X-Metadata-*` keys, so this leaves room for them plus the ordinary headers.
pub const DEFAULT_MAX_HEADERS: usize = 512;
/// `X-Metadata-*` headers on one upload, repeats and empty names included (400 beyond it).
/// Distinct keys are capped at 409 by the 4096-byte set rule; this bounds the rest.
pub const DEFAULT_MAX_METADATA_HEADERS: usize = 500;
/// How long a connection may go without a request in progress: a new connection's first
/// request, a request's whole header section (however slowly it trickles in) and the idle
/// time between keep-alive requests. Longer than the SDKs' pool idle timeouts (httpx 5 s,
/// undici 4 s), so clients close idle connections before the daemon does.
pub const DEFAULT_REQUEST_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a request body may deliver nothing before the request fails (408) and the
/// connection is closed. Between chunks, not in total: a large upload on a slow link is
/// fine as long as it moves.
pub const DEFAULT_BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes of a JSON body on the REST routes that take one (`/init`, `PATCH /files/metadata`):
/// room for a CA bundle of a few hundred KiB and thousands of environment variables.
pub const DEFAULT_MAX_JSON_BODY_BYTES: usize = 2 * 1024 * 1024;
/// Nesting of arrays and objects in a JSON body or Connect JSON message. The deepest schemas
/// need 3 (`StartRequest.pty.size`, `/init`'s `volumeMounts`); the rest is slack for fields
/// a newer client may add.
pub const DEFAULT_MAX_JSON_NESTING: usize = 8;
/// Bytes of one RPC request message, in every protocol (gRPC, gRPC-Web, Connect; after
/// decompression). The largest real message is `SendInput` data, which clients chunk.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Threads for blocking filesystem work (tokio's default). Uploads hold one only while a
/// chunk is being written, so slow clients cannot pin them.
pub const DEFAULT_MAX_BLOCKING_THREADS: usize = 512;
/// hyper refuses an HTTP/1.1 read buffer below this, so the header limit cannot be lower.
pub const MIN_HEADER_BYTES: usize = 8192;

/// The limit flags, flattened into [`crate::config::Cli`].
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// Connections served at once; more wait in the listen queue.
    #[arg(long, env = "ENVD_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// HTTP/2 streams open at once on one connection.
    #[arg(long, env = "ENVD_MAX_CONCURRENT_STREAMS", default_value_t = DEFAULT_MAX_CONCURRENT_STREAMS)]
    pub max_concurrent_streams: u32,
    /// Bytes of a request's header section (at least 8192).
    #[arg(long, env = "ENVD_MAX_HEADER_BYTES", default_value_t = DEFAULT_MAX_HEADER_BYTES)]
    pub max_header_bytes: usize,
    /// Header fields in one HTTP/1.1 request.
    #[arg(long, env = "ENVD_MAX_HEADERS", default_value_t = DEFAULT_MAX_HEADERS)]
    pub max_headers: usize,
    /// `X-Metadata-*` headers on one upload.
    #[arg(long, env = "ENVD_MAX_METADATA_HEADERS", default_value_t = DEFAULT_MAX_METADATA_HEADERS)]
    pub max_metadata_headers: usize,
    /// Seconds a connection may go without a request in progress (headers, keep-alive idle).
    #[arg(long, env = "ENVD_REQUEST_HEADER_TIMEOUT_SECS", default_value_t = DEFAULT_REQUEST_HEADER_TIMEOUT.as_secs())]
    pub request_header_timeout_secs: u64,
    /// Seconds a request body may deliver nothing before the request fails.
    #[arg(long, env = "ENVD_BODY_IDLE_TIMEOUT_SECS", default_value_t = DEFAULT_BODY_IDLE_TIMEOUT.as_secs())]
    pub body_idle_timeout_secs: u64,
    /// Bytes of a JSON body on `/init` and `PATCH /files/metadata`.
    #[arg(long, env = "ENVD_MAX_JSON_BODY_BYTES", default_value_t = DEFAULT_MAX_JSON_BODY_BYTES)]
    pub max_json_body_bytes: usize,
    /// Nesting depth of arrays and objects in a JSON body or Connect JSON message.
    #[arg(long, env = "ENVD_MAX_JSON_NESTING", default_value_t = DEFAULT_MAX_JSON_NESTING)]
    pub max_json_nesting: usize,
    /// Bytes of one RPC request message (any protocol, after decompression).
    #[arg(long, env = "ENVD_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// Threads for blocking filesystem work.
    #[arg(long, env = "ENVD_MAX_BLOCKING_THREADS", default_value_t = DEFAULT_MAX_BLOCKING_THREADS)]
    pub max_blocking_threads: usize,
}

/// The validated limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// Bytes of a header section.
    pub max_header_bytes: usize,
    /// Header fields in an HTTP/1.1 request.
    pub max_headers: usize,
    /// `X-Metadata-*` headers on an upload.
    pub max_metadata_headers: usize,
    /// Time a connection may go without a request in progress.
    pub request_header_timeout: Duration,
    /// Time a request body may deliver nothing.
    pub body_idle_timeout: Duration,
    /// Bytes of a REST JSON body.
    pub max_json_body_bytes: usize,
    /// Nesting of a JSON body or message.
    pub max_json_nesting: usize,
    /// Bytes of an RPC request message.
    pub max_message_bytes: usize,
    /// Threads for blocking work.
    pub max_blocking_threads: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
            max_metadata_headers: DEFAULT_MAX_METADATA_HEADERS,
            request_header_timeout: DEFAULT_REQUEST_HEADER_TIMEOUT,
            body_idle_timeout: DEFAULT_BODY_IDLE_TIMEOUT,
            max_json_body_bytes: DEFAULT_MAX_JSON_BODY_BYTES,
            max_json_nesting: DEFAULT_MAX_JSON_NESTING,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_blocking_threads: DEFAULT_MAX_BLOCKING_THREADS,
        }
    }
}

impl Limits {
    /// Validates the flags.
    ///
    /// # Errors
    /// A message for the operator naming the flag whose value is unusable.
    pub fn from_args(args: &LimitArgs) -> Result<Self, String> {
        let positive = |value: u64, flag: &str| {
            if value == 0 {
                Err(format!("--{flag} must be at least 1"))
            } else {
                Ok(())
            }
        };
        positive(args.max_connections as u64, "max-connections")?;
        positive(
            u64::from(args.max_concurrent_streams),
            "max-concurrent-streams",
        )?;
        positive(args.max_headers as u64, "max-headers")?;
        positive(
            args.request_header_timeout_secs,
            "request-header-timeout-secs",
        )?;
        positive(args.body_idle_timeout_secs, "body-idle-timeout-secs")?;
        positive(args.max_json_body_bytes as u64, "max-json-body-bytes")?;
        positive(args.max_json_nesting as u64, "max-json-nesting")?;
        positive(args.max_message_bytes as u64, "max-message-bytes")?;
        positive(args.max_blocking_threads as u64, "max-blocking-threads")?;
        if args.max_header_bytes < MIN_HEADER_BYTES {
            return Err(format!(
                "--max-header-bytes must be at least {MIN_HEADER_BYTES}"
            ));
        }
        if u32::try_from(args.max_header_bytes).is_err() {
            return Err("--max-header-bytes must fit in 32 bits".into());
        }
        Ok(Limits {
            max_connections: args.max_connections,
            max_concurrent_streams: args.max_concurrent_streams,
            max_header_bytes: args.max_header_bytes,
            max_headers: args.max_headers,
            max_metadata_headers: args.max_metadata_headers,
            request_header_timeout: Duration::from_secs(args.request_header_timeout_secs),
            body_idle_timeout: Duration::from_secs(args.body_idle_timeout_secs),
            max_json_body_bytes: args.max_json_body_bytes,
            max_json_nesting: args.max_json_nesting,
            max_message_bytes: args.max_message_bytes,
            max_blocking_threads: args.max_blocking_threads,
        })
    }

    /// Refuses a JSON text nested deeper than [`Limits::max_json_nesting`].
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the limit.
    pub fn check_json_nesting(&self, json: &[u8]) -> Result<()> {
        if json_nesting(json) > self.max_json_nesting {
            return Err(Error::InvalidArgument(format!(
                "JSON nested deeper than {} levels",
                self.max_json_nesting
            )));
        }
        Ok(())
    }
}

/// The deepest nesting of arrays and objects in a JSON text (brackets inside strings do not
/// count). A linear scan without recursion, so it is safe to run before parsing: a hostile
/// body cannot make the parser recurse or allocate for depth it will refuse anyway. Text
/// that is not JSON gets some number back and is refused by the parser.
pub fn json_nesting(json: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &byte in json {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use proptest::prelude::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        limits: LimitArgs,
    }

    fn parse(args: &[&str]) -> Result<Limits, String> {
        let cli = Cli::try_parse_from(std::iter::once("envd").chain(args.iter().copied()))
            .map_err(|err| err.to_string())?;
        Limits::from_args(&cli.limits)
    }

    #[test]
    fn defaults_are_the_named_constants() {
        assert_eq!(parse(&[]).expect("defaults"), Limits::default());
    }

    #[test]
    fn unusable_values_are_refused() {
        for (args, flag) in [
            (&["--max-connections", "0"][..], "max-connections"),
            (&["--max-header-bytes", "8191"], "max-header-bytes"),
            (&["--body-idle-timeout-secs", "0"], "body-idle-timeout-secs"),
            (&["--max-json-nesting", "0"], "max-json-nesting"),
        ] {
            let err = parse(args).expect_err(flag);
            assert!(err.contains(flag), "{err}");
        }
        let limits = parse(&["--max-header-bytes", "8192", "--max-metadata-headers", "0"])
            .expect("smallest usable values");
        assert_eq!(limits.max_header_bytes, 8192);
    }

    #[test]
    fn nesting_counts_brackets_outside_strings() {
        for (json, depth) in [
            ("", 0),
            ("1", 0),
            ("{}", 1),
            (r#"{"a":[{"b":{}}]}"#, 4),
            (r#"{"a":"[[[{{{"}"#, 1),
            (r#"{"a":"\"[[["}"#, 1),
            (r#"[[]][[[]]]"#, 3),
            ("]]]]{", 1),
        ] {
            assert_eq!(json_nesting(json.as_bytes()), depth, "{json}");
        }
    }

    /// A JSON value of bounded size and depth.
    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            ".{0,8}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(12, 64, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::Array),
                prop::collection::btree_map(".{0,6}", inner, 0..4)
                    .prop_map(|map| serde_json::Value::Object(map.into_iter().collect())),
            ]
        })
    }

    fn depth(value: &serde_json::Value) -> usize {
        match value {
            serde_json::Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
            serde_json::Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }

    proptest! {
        /// The scan agrees with the parsed structure on every JSON text, strings with
        /// brackets and escapes included.
        #[test]
        fn nesting_matches_the_parsed_depth(value in json_value()) {
            let text = serde_json::to_vec(&value).expect("serialize");
            prop_assert_eq!(json_nesting(&text), depth(&value));
        }

        /// Any bytes at all: no panic, and never deeper than the number of openers.
        #[test]
        fn nesting_of_any_bytes_is_bounded(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let openers = bytes.iter().filter(|b| **b == b'{' || **b == b'[').count();
            prop_assert!(json_nesting(&bytes) <= openers);
        }
    }
}
