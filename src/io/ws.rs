//! MQTT over WebSocket, both ways: the client handshake for the uplink (ws://, wss://, for
//! networks that only let HTTPS out), the server handshake for `ws`/`wss` listeners (browser
//! pages on the site LAN), and an adapter that makes a WebSocket look like a byte stream to
//! either. Each write becomes one binary message; MQTT packets may span messages or share one
//! ([MQTT-6.0.0-2]), so reads hand out bytes as they come.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The WebSocket handshake over `stream` (TCP, or TLS for wss). `host`, `port` and `path`
/// make the request URI; the broker must accept subprotocol `mqtt`.
pub async fn connect<S>(
    stream: S,
    tls: bool,
    host: &str,
    port: u16,
    path: &str,
    max_message: usize,
) -> Result<WsStream<S>, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let scheme = if tls { "wss" } else { "ws" };
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let uri = format!("{scheme}://{host}:{port}{path}");
    let mut req = uri
        .as_str()
        .into_client_request()
        .map_err(|e| format!("WebSocket request {uri}: {e}"))?;
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
    let cfg = WebSocketConfig::default()
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message));
    let (ws, resp) = tokio_tungstenite::client_async_with_config(req, stream, Some(cfg))
        .await
        .map_err(|e| format!("WebSocket handshake with {uri}: {e}"))?;
    let proto = resp
        .headers()
        .get("Sec-WebSocket-Protocol")
        .and_then(|v| v.to_str().ok());
    if proto != Some("mqtt") {
        return Err(format!(
            "WebSocket handshake with {uri}: the server did not accept subprotocol mqtt ({proto:?})"
        ));
    }
    Ok(WsStream {
        inner: ws,
        rbuf: Bytes::new(),
    })
}

/// The server side of the handshake, for a listener. The client must offer subprotocol `mqtt`
/// (or `mqttv3.1`, which 3.1 clients send), which we echo. A request that names no
/// subprotocol at all is taken as MQTT too; one that offers only others is refused with 400.
/// Any path is accepted, as mosquitto does.
pub async fn accept<S>(stream: S, max_message: usize) -> Result<WsStream<S>, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let cfg = WebSocketConfig::default()
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message));
    // The error type is tungstenite's, by its Callback trait.
    #[allow(clippy::result_large_err)]
    let choose = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let offered: Vec<&str> = req
            .headers()
            .get_all("Sec-WebSocket-Protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect();
        match pick_subprotocol(&offered) {
            Ok(Some(p)) => {
                resp.headers_mut()
                    .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(p));
                Ok(resp)
            }
            Ok(None) => Ok(resp),
            Err(()) => {
                let mut refusal = ErrorResponse::new(Some(
                    "this endpoint speaks MQTT: offer WebSocket subprotocol mqtt".into(),
                ));
                *refusal.status_mut() = StatusCode::BAD_REQUEST;
                Err(refusal)
            }
        }
    };
    let ws = tokio_tungstenite::accept_hdr_async_with_config(stream, choose, Some(cfg))
        .await
        .map_err(|e| format!("WebSocket handshake: {e}"))?;
    Ok(WsStream {
        inner: ws,
        rbuf: Bytes::new(),
    })
}

/// Which offered subprotocol to answer with: `Ok(None)` when none was offered, `Err` when
/// none of those offered is MQTT.
fn pick_subprotocol(offered: &[&str]) -> Result<Option<&'static str>, ()> {
    if offered.is_empty() {
        return Ok(None);
    }
    if offered.iter().any(|p| p.eq_ignore_ascii_case("mqtt")) {
        return Ok(Some("mqtt"));
    }
    if offered.iter().any(|p| p.eq_ignore_ascii_case("mqttv3.1")) {
        return Ok(Some("mqttv3.1"));
    }
    Err(())
}

/// A WebSocket as a byte stream. Writes are queued as binary messages and pushed out by
/// `poll_flush`, which the driver calls after every write.
pub struct WsStream<S> {
    inner: WebSocketStream<S>,
    rbuf: Bytes,
}

fn other(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::other(e)
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.rbuf.is_empty() {
                let n = this.rbuf.len().min(buf.remaining());
                buf.put_slice(&this.rbuf[..n]);
                this.rbuf.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
                // End of stream: a read of 0 bytes.
                None | Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(other(e))),
                Some(Ok(Message::Binary(b))) => this.rbuf = b,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text WebSocket message: MQTT uses binary ones",
                    )))
                }
                // Pings are answered by tungstenite itself; pongs and raw frames carry nothing.
                Some(Ok(_)) => {}
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(Pin::new(&mut this.inner).poll_ready(cx)).map_err(other)?;
        Pin::new(&mut this.inner)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(other)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner)
            .poll_flush(cx)
            .map_err(other)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner)
            .poll_close(cx)
            .map_err(other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subprotocol_choice() {
        assert_eq!(pick_subprotocol(&[]), Ok(None));
        assert_eq!(pick_subprotocol(&["mqtt"]), Ok(Some("mqtt")));
        assert_eq!(pick_subprotocol(&["chat", "MQTT"]), Ok(Some("mqtt")));
        assert_eq!(pick_subprotocol(&["mqttv3.1"]), Ok(Some("mqttv3.1")));
        assert_eq!(pick_subprotocol(&["mqttv3.1", "mqtt"]), Ok(Some("mqtt")));
        assert_eq!(pick_subprotocol(&["chat"]), Err(()));
    }
}
