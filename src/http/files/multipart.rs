//! Reading a `multipart/form-data` upload part by part. A part's data is handed on as
//! slices of the buffers the body arrived in, never copied: an upload's bytes go from the
//! socket to the file with no pass through another buffer.
//!
//! The body is `[preamble] --B [padding] CRLF headers CRLF data (CRLF --B [padding] CRLF
//! headers CRLF data)* CRLF --B --` (RFC 2046 §5.1.1), where `B` is the boundary and
//! padding is spaces and tabs. A delimiter (`CRLF --B`) can straddle two of the body's
//! chunks: what could be its start stays behind until the next chunk tells. The boundary's
//! characters never include CR, so that can only be from the last CR of a chunk on.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, HeaderName, HeaderValue};
use memchr::memmem::Finder;

use crate::error::Error;

/// Largest header block of one part.
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Most transport padding after a boundary.
const MAX_PADDING: usize = 1024;
/// Most headers in one part.
const MAX_HEADERS: usize = 32;

/// A request body: chunks of bytes, or why reading it failed.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, Error>> + Send>>;

/// The boundary of a `multipart/form-data` `Content-Type`.
///
/// # Errors
/// Why there is none: another media type, or no `boundary` parameter.
pub fn boundary(content_type: &str) -> Result<String, String> {
    let media = content_type.split(';').next().unwrap_or("");
    if !media.trim().eq_ignore_ascii_case("multipart/form-data") {
        return Err(format!(
            "the Content-Type is not multipart/form-data: {content_type}"
        ));
    }
    crate::http::files::disposition::params(content_type)
        .into_iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("boundary"))
        .map(|(_, value)| value)
        .filter(|value| !value.is_empty())
        .ok_or_else(|| "no multipart boundary param in Content-Type".to_owned())
}

/// Where the reader is in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Before the first boundary.
    Preamble,
    /// Just after a boundary: the close (`--`), or padding and CRLF before a part.
    Boundary,
    /// In a part's header block.
    Headers,
    /// In a part's data.
    Data,
    /// After the closing boundary (the epilogue is not read).
    End,
}

/// A multipart body being read.
pub struct Form {
    body: ByteStream,
    /// What has arrived and is not yet consumed.
    buf: Bytes,
    stage: Stage,
    /// `--B`: the first boundary, which the preamble leads to.
    first: Finder<'static>,
    /// `CRLF --B`: the delimiter that ends a part's data.
    delimiter: Finder<'static>,
}

impl Form {
    /// A reader of `body`, whose parts are separated by `boundary`.
    pub fn new(body: ByteStream, boundary: &str) -> Form {
        Form {
            body,
            buf: Bytes::new(),
            stage: Stage::Preamble,
            first: Finder::new(format!("--{boundary}").as_bytes()).into_owned(),
            delimiter: Finder::new(format!("\r\n--{boundary}").as_bytes()).into_owned(),
        }
    }

    /// The next part's headers (skipping what is left of the current part's data), or
    /// `None` after the closing boundary.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the body is not a well-formed form, or ends early;
    /// the body's own error (a stall stays [`Error::TimedOut`]).
    pub async fn next_part(&mut self) -> Result<Option<HeaderMap>, Error> {
        std::future::poll_fn(|cx| self.poll_next_part(cx)).await
    }

    /// The current part's data, chunk by chunk; it ends at the part's end.
    pub fn data(&mut self) -> PartData<'_> {
        PartData(self)
    }

    fn poll_next_part(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<HeaderMap>, Error>> {
        loop {
            match self.stage {
                Stage::Preamble => {
                    if let Some(at) = self.first.find(&self.buf) {
                        self.buf.advance(at + self.first.needle().len());
                        self.stage = Stage::Boundary;
                        continue;
                    }
                    // Only what could be the start of the boundary is kept.
                    let keep = self.first.needle().len() - 1;
                    if self.buf.len() > keep {
                        self.buf.advance(self.buf.len() - keep);
                    }
                }
                Stage::Data => match ready!(self.poll_data(cx)) {
                    Some(Ok(_)) | None => continue,
                    Some(Err(err)) => return Poll::Ready(Err(err)),
                },
                Stage::Boundary => {
                    if self.buf.starts_with(b"--") {
                        self.stage = Stage::End;
                        continue;
                    }
                    let padding = self
                        .buf
                        .iter()
                        .take_while(|b| **b == b' ' || **b == b'\t')
                        .count();
                    let line = &self.buf[padding..];
                    if line.starts_with(b"\r\n") {
                        self.buf.advance(padding + 2);
                        self.stage = Stage::Headers;
                        continue;
                    }
                    // Not yet the bytes to tell by: padding may go on, or a CR or a dash
                    // be the first of two.
                    let undecided = match line {
                        [] => padding <= MAX_PADDING,
                        [b'\r'] => true,
                        [b'-'] => padding == 0,
                        _ => false,
                    };
                    if !undecided {
                        return Poll::Ready(Err(malformed("a boundary is followed by junk")));
                    }
                }
                Stage::Headers => {
                    if let Some(headers) = self.headers()? {
                        self.stage = Stage::Data;
                        return Poll::Ready(Ok(Some(headers)));
                    }
                }
                Stage::End => return Poll::Ready(Ok(None)),
            }
            if !ready!(self.poll_fill(cx))? {
                return Poll::Ready(Err(malformed("the body ended before the closing boundary")));
            }
        }
    }

    /// The header block at the start of the buffer, consumed, once it is whole.
    fn headers(&mut self) -> Result<Option<HeaderMap>, Error> {
        let len = if self.buf.starts_with(b"\r\n") {
            2
        } else {
            match memchr::memmem::find(&self.buf, b"\r\n\r\n") {
                Some(at) => at + 4,
                None if self.buf.len() > MAX_HEADER_BYTES => {
                    return Err(malformed("a part's headers are too large"));
                }
                None => return Ok(None),
            }
        };
        if len > MAX_HEADER_BYTES {
            return Err(malformed("a part's headers are too large"));
        }
        let mut parsed = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let headers = match httparse::parse_headers(&self.buf[..len], &mut parsed) {
            Ok(httparse::Status::Complete((_, headers))) => headers,
            Ok(httparse::Status::Partial) => return Err(malformed("a part's headers are cut")),
            Err(err) => return Err(malformed(&format!("a part's headers: {err}"))),
        };
        let mut map = HeaderMap::with_capacity(headers.len());
        for header in headers {
            let name = HeaderName::from_bytes(header.name.as_bytes())
                .map_err(|err| malformed(&format!("a part's header name: {err}")))?;
            let value = HeaderValue::from_bytes(header.value)
                .map_err(|err| malformed(&format!("a part's header value: {err}")))?;
            map.append(name, value);
        }
        self.buf.advance(len);
        Ok(Some(map))
    }

    /// The next piece of the current part's data; `None` at its end (the delimiter is
    /// consumed), and always `None` outside a part.
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Error>>> {
        while self.stage == Stage::Data {
            if let Some(at) = self.delimiter.find(&self.buf) {
                if at > 0 {
                    return Poll::Ready(Some(Ok(self.buf.split_to(at))));
                }
                self.buf.advance(self.delimiter.needle().len());
                self.stage = Stage::Boundary;
                break;
            }
            let decided = self.undecided_tail();
            if decided > 0 {
                return Poll::Ready(Some(Ok(self.buf.split_to(decided))));
            }
            match ready!(self.poll_fill(cx)) {
                Ok(true) => {}
                Ok(false) => {
                    return Poll::Ready(Some(Err(malformed("the body ended inside a part"))));
                }
                Err(err) => return Poll::Ready(Some(Err(err))),
            }
        }
        Poll::Ready(None)
    }

    /// Where the end of the buffer could begin a delimiter that the next chunk completes
    /// (the buffer's length when it cannot).
    fn undecided_tail(&self) -> usize {
        let needle = self.delimiter.needle();
        let from = self.buf.len().saturating_sub(needle.len() - 1);
        match memchr::memrchr(b'\r', &self.buf[from..]) {
            Some(at) if needle.starts_with(&self.buf[from + at..]) => from + at,
            _ => self.buf.len(),
        }
    }

    /// Appends the body's next chunk to the buffer: `false` at the body's end. The buffer
    /// then is empty (the chunk becomes it, uncopied) or holds only a few bytes that the
    /// chunk decides (they are joined).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, Error>> {
        loop {
            let chunk = match ready!(self.body.poll_next_unpin(cx)) {
                Some(Ok(chunk)) => chunk,
                Some(Err(err)) => return Poll::Ready(Err(body_error(err))),
                None => return Poll::Ready(Ok(false)),
            };
            if chunk.is_empty() {
                continue;
            }
            if self.buf.is_empty() {
                self.buf = chunk;
            } else {
                let mut joined = BytesMut::with_capacity(self.buf.len() + chunk.len());
                joined.extend_from_slice(&self.buf);
                joined.extend_from_slice(&chunk);
                self.buf = joined.freeze();
            }
            return Poll::Ready(Ok(true));
        }
    }
}

/// One part's data, as a stream (see [`Form::data`]).
pub struct PartData<'a>(&'a mut Form);

impl Stream for PartData<'_> {
    type Item = Result<Bytes, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_data(cx)
    }
}

fn malformed(why: &str) -> Error {
    Error::InvalidArgument(format!("error reading form: {why}"))
}

/// A failure of the body itself: a stall stays a timeout.
fn body_error(err: Error) -> Error {
    match err {
        stalled @ Error::TimedOut(_) => stalled,
        other => malformed(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (headers' `Content-Disposition`, data) of every part, or the error's text.
    type Parts = Result<Vec<(String, Vec<u8>)>, String>;

    /// A body that arrives as `chunks`.
    fn body(chunks: Vec<Bytes>) -> ByteStream {
        Box::pin(futures_util::stream::iter(chunks.into_iter().map(Ok)))
    }

    fn read(chunks: Vec<Bytes>, boundary: &str) -> Parts {
        let mut form = Form::new(body(chunks), boundary);
        futures_util::FutureExt::now_or_never(async move {
            let mut parts = Vec::new();
            while let Some(headers) = form.next_part().await.map_err(|e| e.to_string())? {
                let disposition = headers
                    .get(http::header::CONTENT_DISPOSITION)
                    .map(|v| v.to_str().unwrap_or("?").to_owned())
                    .unwrap_or_default();
                let mut data = Vec::new();
                let mut stream = form.data();
                while let Some(chunk) = stream.next().await {
                    data.extend_from_slice(&chunk.map_err(|e| e.to_string())?);
                }
                parts.push((disposition, data));
            }
            Ok(parts)
        })
        .expect("an in-memory body never waits")
    }

    fn whole(body: &[u8], boundary: &str) -> Parts {
        read(vec![Bytes::copy_from_slice(body)], boundary)
    }

    fn cut_every(body: &[u8], boundary: &str, size: usize) -> Parts {
        read(
            body.chunks(size).map(Bytes::copy_from_slice).collect(),
            boundary,
        )
    }

    const FORM: &[u8] = b"preamble\r\n--XyZ\r\n\
        Content-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n\
        Content-Type: text/plain\r\n\r\n\
        line one\r\nline two\r\n--XyY\r\n-XyZ\r--XyZ\n--XyZ\r\n-\r\r\n\r\n--XyZ  \t\r\n\
        Content-Disposition: form-data; name=\"other\"\r\n\r\n\
        \r\n--XyZ\r\n\
        Content-Disposition: form-data; name=\"file\"; filename=\"b\"\r\n\r\n\
        \r\n\r\n--XyZ--\r\nepilogue --XyZ";

    fn expected() -> Vec<(String, Vec<u8>)> {
        vec![
            (
                "form-data; name=\"file\"; filename=\"a.txt\"".to_owned(),
                b"line one\r\nline two\r\n--XyY\r\n-XyZ\r--XyZ\n--XyZ\r\n-\r\r\n".to_vec(),
            ),
            ("form-data; name=\"other\"".to_owned(), Vec::new()),
            (
                "form-data; name=\"file\"; filename=\"b\"".to_owned(),
                b"\r\n".to_vec(),
            ),
        ]
    }

    #[test]
    fn reads_parts_whole_and_cut_at_every_size_and_place() {
        assert_eq!(whole(FORM, "XyZ"), Ok(expected()));
        for size in 1..FORM.len() {
            assert_eq!(
                cut_every(FORM, "XyZ", size),
                Ok(expected()),
                "chunks of {size}"
            );
        }
        for at in 1..FORM.len() {
            let (a, b) = FORM.split_at(at);
            let chunks = vec![
                Bytes::copy_from_slice(a),
                Bytes::new(),
                Bytes::copy_from_slice(b),
            ];
            assert_eq!(read(chunks, "XyZ"), Ok(expected()), "cut at {at}");
        }
    }

    #[test]
    fn unread_data_is_skipped() {
        for size in [1, 5, FORM.len()] {
            let chunks: Vec<Bytes> = FORM.chunks(size).map(Bytes::copy_from_slice).collect();
            let mut form = Form::new(body(chunks), "XyZ");
            let names = futures_util::FutureExt::now_or_never(async {
                let mut names = Vec::new();
                while let Some(headers) = form.next_part().await.expect("well-formed") {
                    let disposition = headers[http::header::CONTENT_DISPOSITION].to_str();
                    names.push(disposition.expect("ASCII").to_owned());
                }
                names
            })
            .expect("in memory");
            let want: Vec<String> = expected().into_iter().map(|(d, _)| d).collect();
            assert_eq!(names, want, "chunks of {size}");
        }
    }

    /// multer's reading of the same chunks, in the same shape.
    fn multer_read(chunks: Vec<Bytes>, boundary: &str) -> Parts {
        let body = futures_util::stream::iter(chunks.into_iter().map(Ok::<_, std::io::Error>));
        let mut form = multer::Multipart::new(body, boundary);
        futures_util::FutureExt::now_or_never(async move {
            let mut parts = Vec::new();
            while let Some(mut field) = form.next_field().await.map_err(|e| e.to_string())? {
                let disposition = field
                    .headers()
                    .get(http::header::CONTENT_DISPOSITION)
                    .map(|v| v.to_str().unwrap_or("?").to_owned())
                    .unwrap_or_default();
                let mut data = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(|e| e.to_string())? {
                    data.extend_from_slice(&chunk);
                }
                parts.push((disposition, data));
            }
            Ok(parts)
        })
        .expect("an in-memory body never waits")
    }

    /// Part data from an alphabet that makes near-misses of the delimiter common.
    fn tricky_data() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        let byte = proptest::sample::select(vec![b'\r', b'\n', b'-', b'a', b'b', b' ', 0xff]);
        proptest::collection::vec(byte, 0..48)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// On any form, cut anywhere, this reader and multer find the same parts with the
        /// same data, or both refuse it.
        #[test]
        fn reads_what_multer_reads(
            boundary in "[ab'()+_,./:=?-]{1,6}",
            parts in proptest::collection::vec(("[a-z\"]{0,6}", tricky_data()), 0..4),
            padding in "[ \t]{0,3}",
            closed in proptest::prelude::any::<bool>(),
            preamble in tricky_data(),
            cuts in proptest::collection::vec(1usize..40, 1..6),
        ) {
            let mut body = preamble;
            for (name, data) in &parts {
                body.extend_from_slice(format!("--{boundary}{padding}\r\n").as_bytes());
                body.extend_from_slice(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
                );
                body.extend_from_slice(data);
                body.extend_from_slice(b"\r\n");
            }
            if closed {
                body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
            }
            let mut chunks = Vec::new();
            let mut rest = &body[..];
            for cut in cuts.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (chunk, after) = rest.split_at((*cut).min(rest.len()));
                chunks.push(Bytes::copy_from_slice(chunk));
                rest = after;
            }
            let ours = read(chunks.clone(), &boundary);
            let theirs = multer_read(chunks, &boundary);
            proptest::prop_assert_eq!(ours.is_ok(), theirs.is_ok(), "{:?} vs {:?}", ours, theirs);
            if let (Ok(ours), Ok(theirs)) = (ours, theirs) {
                proptest::prop_assert_eq!(ours, theirs);
            }
        }
    }

    #[test]
    fn a_part_without_headers_and_a_form_without_parts() {
        let body = b"--b\r\n\r\nbare\r\n--b--";
        assert_eq!(
            whole(body, "b"),
            Ok(vec![(String::new(), b"bare".to_vec())])
        );
        assert_eq!(whole(b"--b--\r\n", "b"), Ok(vec![]));
    }

    #[test]
    fn data_is_handed_on_uncopied() {
        let whole = Bytes::from_static(b"--b\r\n\r\n0123456789\r\n--b--");
        let mut form = Form::new(body(vec![whole.clone()]), "b");
        futures_util::FutureExt::now_or_never(async {
            form.next_part().await.expect("part").expect("one");
            let chunk = form.data().next().await.expect("data").expect("ok");
            assert_eq!(&chunk[..], b"0123456789");
            assert_eq!(
                chunk.as_ptr(),
                whole[7..].as_ptr(),
                "a slice of the body's chunk"
            );
        })
        .expect("in memory");
    }

    #[test]
    fn malformed_bodies_are_refused() {
        for (body, why) in [
            (&b"no boundary at all"[..], "before the closing boundary"),
            (
                b"--b\r\nContent-Type: x\r\n\r\nunterminated",
                "inside a part",
            ),
            (b"--bjunk\r\n\r\n", "followed by junk"),
            (b"--b\r\nno colon here\r\n\r\n\r\n--b--", "headers"),
            (b"--b\r\n", "before the closing boundary"),
        ] {
            let got = whole(body, "b");
            assert!(
                got.as_ref().is_err_and(|err| err.contains(why)),
                "{:?}: {got:?}",
                String::from_utf8_lossy(body)
            );
        }
        let mut huge = b"--b\r\nX-Big: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_HEADER_BYTES + 1));
        let got = cut_every(&huge, "b", 1000);
        assert!(got.is_err_and(|err| err.contains("too large")));
    }

    #[test]
    fn a_long_preamble_is_not_kept() {
        let mut bytes = vec![b'p'; 1 << 20];
        bytes.extend_from_slice(b"--b\r\n\r\nx\r\n--b--");
        let chunks: Vec<Bytes> = bytes.chunks(4096).map(Bytes::copy_from_slice).collect();
        let mut form = Form::new(body(chunks), "b");
        futures_util::FutureExt::now_or_never(async {
            form.next_part().await.expect("part").expect("one");
        })
        .expect("in memory");
        assert!(form.buf.len() < 4096 + 8, "kept {} bytes", form.buf.len());
    }

    #[test]
    fn body_errors_are_passed_on_and_stalls_stay_timeouts() {
        for (err, timed_out) in [
            (Error::TimedOut("stalled".into()), true),
            (Error::InvalidArgument("reset".into()), false),
        ] {
            let chunks = vec![Ok(Bytes::from_static(b"--b\r\n\r\nda")), Err(err)];
            let body: ByteStream = Box::pin(futures_util::stream::iter(chunks));
            let mut form = Form::new(body, "b");
            let got = futures_util::FutureExt::now_or_never(async {
                form.next_part().await.expect("part").expect("one");
                let mut data = form.data();
                assert_eq!(&data.next().await.expect("da").expect("ok")[..], b"da");
                data.next()
                    .await
                    .expect("an error")
                    .expect_err("the body's")
            })
            .expect("in memory");
            assert_eq!(matches!(got, Error::TimedOut(_)), timed_out, "{got:?}");
        }
    }

    #[test]
    fn boundaries_come_from_form_data_content_types_only() {
        assert_eq!(
            boundary("multipart/form-data; boundary=abc"),
            Ok("abc".into())
        );
        assert_eq!(
            boundary("Multipart/Form-Data ; charset=x; boundary=\"a b:c\""),
            Ok("a b:c".into())
        );
        assert!(boundary("multipart/form-data").is_err());
        assert!(boundary("multipart/form-data; boundary=").is_err());
        assert!(boundary("multipart/mixed; boundary=abc").is_err());
    }
}
