//! Trailers a handler adds to a successful stream. tonic gives server streams no way to
//! add trailer metadata on success; a handler puts an [`ExtraTrailers`] in its response's
//! extensions, fills it while streaming, and the lifetime layer appends it to the final
//! trailers (which Connect turns into end-of-stream `metadata` and gRPC-Web into its
//! trailer frame).

use std::sync::{Arc, Mutex};

use http::{HeaderMap, HeaderName, HeaderValue};

/// Shared trailer slot between a streaming handler and the transport.
#[derive(Debug, Clone, Default)]
pub struct ExtraTrailers(Arc<Mutex<HeaderMap>>);

impl ExtraTrailers {
    /// Sets a trailer (a value that is not a valid header is dropped).
    pub fn insert(&self, name: &'static str, value: &str) {
        if let Ok(value) = HeaderValue::from_str(value) {
            self.lock().insert(HeaderName::from_static(name), value);
        }
    }

    /// Takes everything set so far.
    pub fn take(&self) -> HeaderMap {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HeaderMap> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
