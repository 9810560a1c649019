//! The access-token gate on RPCs. It runs inside the RPC stack, in front of the services,
//! for every protocol: a refused call is answered with `unauthenticated` as a gRPC status,
//! which the Connect layer and tonic-web then turn into their own error forms (Connect
//! unary: HTTP 401 JSON; Connect streams: an end-of-stream error; gRPC-Web: trailers-only).

use http::{Request, Response};

use crate::auth::gate::{self, ACCESS_TOKEN_HEADER};
use crate::auth::token::TokenStore;

/// The refusal for `request`, or `None` when it may go on to the services.
pub fn refusal<B>(
    tokens: &TokenStore,
    request: &Request<B>,
) -> Option<Response<tonic::body::Body>> {
    let presented = request
        .headers()
        .get(ACCESS_TOKEN_HEADER)
        .map(|value| value.as_bytes());
    gate::check(tokens, request.method(), request.uri().path(), presented)
        .err()
        .map(|err| tonic::Status::from(err).into_http())
}
