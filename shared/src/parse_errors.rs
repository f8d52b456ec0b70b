//! JSON bodies for the answers hyper writes itself, before any router sees a request: 400 for a
//! request it cannot parse, 414 for a URI over its limit, 431 for a head over its buffer or with
//! too many headers. hyper offers no hook for those answers (it writes a bare head with
//! `content-length: 0` and closes the connection), so [`JsonParseErrors`] wraps the connection's
//! stream and swaps such a head for the same status with a `{"error", "message"}` body as it is
//! written.
//!
//! How such a head is told from an application's answer: it is a 400, 414 or 431 with an empty
//! body, and the routers never answer a 4xx without a JSON body (the ingest's `json_errors`, the
//! ops endpoints' own bodies).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// hyper's limits behind the 414 and 431 it writes (hyper 1.x: `MAX_URI_LEN`,
/// `DEFAULT_MAX_HEADERS`, and the default `max_buf_size` of 408 KiB, which a head may pass by
/// what one read brings, so the message says "about").
const MAX_URI_BYTES: usize = 65_534;
const MAX_HEADERS: usize = 100;
const MAX_HEAD_KIB: usize = 408;

/// The `{"error", "message"}` body for a status hyper answers on its own; `None` for any other.
fn body_for(status: u16) -> Option<serde_json::Value> {
    let (error, message) = match status {
        400 => (
            "bad_request",
            "the request is not valid HTTP/1.1 (request line or headers)".to_owned(),
        ),
        414 => (
            "uri_too_long",
            format!("the request URI is longer than {MAX_URI_BYTES} bytes"),
        ),
        431 => (
            "request_header_too_large",
            format!(
                "the request head is larger than about {MAX_HEAD_KIB} KiB or has more than \
                 {MAX_HEADERS} headers"
            ),
        ),
        _ => return None,
    };
    Some(json!({"error": error, "message": message}))
}

/// If `written` is a whole response head hyper wrote on its own (see the module's doc), the
/// response to send instead: the same status line and headers, a JSON body.
fn replacement(written: &[u8]) -> Option<Vec<u8>> {
    // Every response of every connection passes here: look at the status first (12 bytes), and
    // scan for the head's end only for the three statuses hyper answers on its own.
    let status = written.get(9..12)?;
    if !(written.starts_with(b"HTTP/1.") && matches!(status, b"400" | b"414" | b"431")) {
        return None;
    }
    let head_len = written.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    if head_len != written.len() {
        return None;
    }
    let head = std::str::from_utf8(&written[..head_len - 4]).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?;
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| status_line.strip_prefix("HTTP/1.0 "))?
        .get(..3)?
        .parse()
        .ok()?;
    let body = body_for(status)?.to_string();
    let mut empty = false;
    let mut out = format!("{status_line}\r\n");
    for line in lines {
        let name = line.split(':').next().unwrap_or_default().trim();
        if name.eq_ignore_ascii_case("content-length") {
            empty = line[name.len() + 1..].trim() == "0";
        } else if !name.eq_ignore_ascii_case("content-type") {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    if !empty {
        return None;
    }
    out.push_str(&format!(
        "content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    ));
    Some(out.into_bytes())
}

/// A connection's stream whose hyper-written 400, 414 and 431 heads leave with a JSON body.
#[derive(Debug)]
pub struct JsonParseErrors<S> {
    inner: S,
    /// A replacement response not yet written to `inner`; written before anything else.
    pending: Vec<u8>,
}

impl<S> JsonParseErrors<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            pending: Vec::new(),
        }
    }
}

impl<S: AsyncWrite + Unpin> JsonParseErrors<S> {
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending.is_empty() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pending.drain(..n);
        }
        Poll::Ready(Ok(()))
    }

    /// Takes `buf` as written when it is one of hyper's own heads: its replacement goes out
    /// instead (now, or on the flush that follows).
    fn swap(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Option<Poll<io::Result<usize>>> {
        self.pending = replacement(buf)?;
        Some(match self.poll_pending(cx) {
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(buf.len())),
        })
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for JsonParseErrors<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for JsonParseErrors<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_pending(cx))?;
        if let Some(done) = self.swap(cx, buf) {
            return done;
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_pending(cx))?;
        // hyper queues a head as one buffer; an automatic answer has nothing after it.
        if let [only] = bufs {
            if let Some(done) = self.swap(cx, only) {
                return done;
            }
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hyper_heads_get_json_bodies_and_everything_else_passes() {
        let head = "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\
                    date: Mon, 07 Dec 2026 16:00:00 GMT\r\n\r\n";
        let out = String::from_utf8(replacement(head.as_bytes()).unwrap()).unwrap();
        let (new_head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(new_head.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        assert!(new_head.contains("date: Mon, 07 Dec 2026"));
        assert!(new_head.contains(&format!("content-length: {}", body.len())));
        assert!(new_head.contains("content-type: application/json"));
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["error"], "request_header_too_large");

        for passes in [
            // An application's answer: a body follows, or is announced.
            "HTTP/1.1 400 Bad Request\r\ncontent-length: 20\r\n\r\n",
            "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n{}",
            // Not a status hyper answers itself.
            "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            // Not a head at all: a body, or half a head.
            "{\"error\":\"x\"}",
            "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n",
        ] {
            assert_eq!(replacement(passes.as_bytes()), None, "{passes:?}");
        }
    }
}
