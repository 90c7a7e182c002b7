//! Messages of the weight protocol and how they are framed on a QUIC stream.
//!
//! A connection starts on its first bidirectional stream with a handshake:
//! the client sends `Hello`, the server answers `HelloReply` (the manifest,
//! or a refusal). Handshake frames open with [`MAGIC`] and the sender's
//! protocol version, so that peers of different versions understand each
//! other well enough to refuse clearly. Every later request opens its own
//! bidirectional stream: one `FetchRequest` frame up, one `FetchReply` frame
//! down, then the raw bytes until the server finishes the stream.
//!
//! Frames are a big-endian `u32` length and a postcard body; each message
//! kind has a size limit that is checked before its body is read.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::Error;
use crate::manifest::{Dtype, Manifest};

/// Version of the messages below; bump it whenever they change.
/// v2: `Hello` states the weight dtype wanted, the manifest the one served.
/// v3: the word table leaves the `embeddings` component for the manifest's
/// row tables, read by rows ([`ObjectRef::Rows`], [`ObjectRef::RowHashes`]).
/// v4: `Hello` names the model wanted, of those a server serves.
pub const PROTOCOL_VERSION: u32 = 4;
/// TLS application protocol name: only surf peers complete a handshake.
pub const ALPN: &[u8] = b"surf-weights";
/// First bytes of both handshake frames.
pub const MAGIC: [u8; 4] = *b"SURF";

/// Largest body of each message kind, in bytes.
pub mod limits {
    pub const HELLO: usize = 4 * 1024;
    /// The manifest carries the tokenizer, which can run to megabytes.
    pub const HELLO_REPLY: usize = 64 * 1024 * 1024;
    /// Room for a rows request: up to `MAX_ROWS_PER_REQUEST` ids of at most
    /// 5 bytes each (postcard's varints), and the table's name.
    pub const FETCH_REQUEST: usize = 5 * crate::manifest::MAX_ROWS_PER_REQUEST + 4 * 1024;
    pub const FETCH_REPLY: usize = 4 * 1024;
    /// What a frame's buffer starts at before its body arrives: small
    /// messages fit at once, larger ones grow from here as bytes arrive.
    pub const INITIAL_READ_BUFFER: usize = 64 * 1024;
}

/// Application close codes on a QUIC connection.
pub mod close_code {
    pub const DONE: u32 = 0;
    pub const VERSION_MISMATCH: u32 = 1;
    pub const UNAUTHORIZED: u32 = 2;
    pub const PROTOCOL_VIOLATION: u32 = 3;
    pub const SHUTTING_DOWN: u32 = 4;
    pub const UNRESPONSIVE: u32 = 5;
    pub const DTYPE_UNAVAILABLE: u32 = 6;
    pub const UNKNOWN_MODEL: u32 = 7;
}

/// Application codes for resetting or stopping one stream.
pub mod stream_code {
    pub const CANCELLED: u32 = 1;
    pub const SHUTTING_DOWN: u32 = 2;
}

/// The client's first message.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub token: Option<String>,
    /// The dtype the client wants float weights in; a server that serves
    /// another refuses with [`Refusal::DtypeUnavailable`].
    pub weight_dtype: Dtype,
    /// The model wanted, by the name the server gives it; `None` asks for
    /// the server's first model.
    pub model: Option<String>,
}

impl fmt::Debug for Hello {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let token = self.token.as_ref().map(|_| "<redacted>");
        f.debug_struct("Hello")
            .field("token", &token)
            .field("weight_dtype", &self.weight_dtype)
            .field("model", &self.model)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    Accepted(Box<Manifest>),
    Refused(Refusal),
}

/// Why the server will not talk to a client at all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("the server speaks protocol v{server_version}")]
    VersionMismatch { server_version: u32 },
    #[error("wrong or missing token")]
    Unauthorized,
    #[error("malformed hello: {detail}")]
    Malformed { detail: String },
    /// The server serves its weights in another dtype than the one asked for.
    #[error("{}", dtype_unavailable(*requested, *served))]
    DtypeUnavailable { requested: Dtype, served: Dtype },
    /// The server serves no model of the name asked for.
    #[error("the server serves no model named `{requested}`; it serves: {}", served.join(", "))]
    UnknownModel {
        requested: String,
        served: Vec<String>,
    },
}

fn dtype_unavailable(requested: Dtype, served: Dtype) -> String {
    format!(
        "the server serves {served} weights, not {requested} ({})",
        dtype_fix(requested)
    )
}

/// What makes a server serve `requested`.
pub(crate) fn dtype_fix(requested: Dtype) -> String {
    if requested.is_servable() {
        format!("start it with --dtype {requested}")
    } else {
        "servers serve only f32 or f16".to_owned()
    }
}

/// What a fetch asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ObjectRef {
    Component(String),
    /// A tensor by its prefix-free name.
    Tensor(String),
    /// The 32-byte blake3 digests of every row of a row table, in row order.
    RowHashes(String),
    /// Rows of a row table, back to back in the order given.
    Rows {
        table: String,
        rows: Vec<u32>,
    },
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectRef::Component(name) => write!(f, "component {name}"),
            ObjectRef::Tensor(name) => write!(f, "tensor {name}"),
            ObjectRef::RowHashes(name) => write!(f, "row hashes of {name}"),
            ObjectRef::Rows { table, rows } => write!(f, "{} rows of {table}", rows.len()),
        }
    }
}

/// Asks for bytes `start..end` of an object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchRequest {
    pub object: ObjectRef,
    pub start: u64,
    pub end: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FetchReply {
    /// `len` raw bytes follow, then the stream finishes.
    Data {
        len: u64,
    },
    Refused(FetchRefusal),
}

/// Why the server will not serve one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum FetchRefusal {
    #[error("no such object")]
    UnknownObject,
    #[error("row {row} is outside the {rows} rows of the table")]
    RowOutOfBounds { row: u32, rows: u64 },
    #[error("{asked} rows asked for at once; at most {limit} are served a request")]
    TooManyRows { asked: u64, limit: u64 },
    #[error("range {start}..{end} is outside the object's {len} bytes")]
    RangeOutOfBounds { start: u64, end: u64, len: u64 },
    #[error("request of {len} bytes exceeds the {limit}-byte limit")]
    RequestTooLarge { len: u64, limit: u64 },
    #[error("malformed request: {detail}")]
    Malformed { detail: String },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the server failed to read the weights: {detail}")]
    Internal { detail: String },
}

impl FetchRefusal {
    pub(crate) fn is_bad_input(&self) -> bool {
        matches!(
            self,
            FetchRefusal::UnknownObject
                | FetchRefusal::RangeOutOfBounds { .. }
                | FetchRefusal::RowOutOfBounds { .. }
                | FetchRefusal::TooManyRows { .. }
        )
    }

    /// Refusals that another server (or a later try) may not repeat.
    pub(crate) fn is_transient(&self) -> bool {
        matches!(
            self,
            FetchRefusal::ShuttingDown | FetchRefusal::Internal { .. }
        )
    }
}

/// Encodes `message` as a frame: length prefix, then postcard body.
pub fn encode_frame<T: Serialize>(
    kind: &'static str,
    message: &T,
    limit: usize,
) -> Result<Vec<u8>, Error> {
    let body = postcard::to_stdvec(message).map_err(|source| Error::Malformed { kind, source })?;
    check_len(kind, body.len() as u64, limit)?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Encodes a handshake frame: magic, the sender's version, then a frame.
pub fn encode_handshake_frame<T: Serialize>(
    kind: &'static str,
    version: u32,
    message: &T,
    limit: usize,
) -> Result<Vec<u8>, Error> {
    let frame = encode_frame(kind, message, limit)?;
    let mut out = Vec::with_capacity(8 + frame.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&frame);
    Ok(out)
}

fn check_len(kind: &'static str, len: u64, limit: usize) -> Result<(), Error> {
    if len > limit as u64 {
        return Err(Error::MessageTooLarge { kind, len, limit });
    }
    Ok(())
}

pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    frame: &[u8],
    during: &'static str,
) -> Result<(), Error> {
    writer
        .write_all(frame)
        .await
        .map_err(|source| Error::Io { during, source })
}

/// Reads one frame and decodes it, refusing bodies over `limit` unread.
/// The body's buffer grows as its bytes arrive, so a peer that announces a
/// large body and sends little of it costs little memory.
pub async fn read_frame<T: DeserializeOwned, R: AsyncRead + Unpin>(
    reader: &mut R,
    kind: &'static str,
    limit: usize,
) -> Result<T, Error> {
    let mut len = [0u8; 4];
    reader
        .read_exact(&mut len)
        .await
        .map_err(|source| Error::Io {
            during: kind,
            source,
        })?;
    let len = u32::from_be_bytes(len);
    check_len(kind, u64::from(len), limit)?;
    let mut body = Vec::with_capacity((len as usize).min(limits::INITIAL_READ_BUFFER));
    reader
        .take(u64::from(len))
        .read_to_end(&mut body)
        .await
        .map_err(|source| Error::Io {
            during: kind,
            source,
        })?;
    if body.len() != len as usize {
        return Err(Error::Io {
            during: kind,
            source: std::io::ErrorKind::UnexpectedEof.into(),
        });
    }
    postcard::from_bytes(&body).map_err(|source| Error::Malformed { kind, source })
}

/// Reads the magic and protocol version that open a handshake frame.
pub async fn read_handshake_version<R: AsyncRead + Unpin>(
    reader: &mut R,
    kind: &'static str,
) -> Result<u32, Error> {
    let mut head = [0u8; 8];
    reader
        .read_exact(&mut head)
        .await
        .map_err(|source| Error::Io {
            during: kind,
            source,
        })?;
    let (magic, version) = head.split_at(4);
    if magic != MAGIC {
        let mut found = [0u8; 4];
        found.copy_from_slice(magic);
        return Err(Error::NotSurfProtocol { found });
    }
    let mut version_bytes = [0u8; 4];
    version_bytes.copy_from_slice(version);
    Ok(u32::from_be_bytes(version_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_survives_the_round_trip() {
        let request = FetchRequest {
            object: ObjectRef::Component("encoder.layer.3".into()),
            start: 7,
            end: 1 << 40,
        };
        let frame = encode_frame("fetch request", &request, limits::FETCH_REQUEST)
            .expect("a small request encodes");
        let decoded: FetchRequest = read_frame(
            &mut frame.as_slice(),
            "fetch request",
            limits::FETCH_REQUEST,
        )
        .await
        .expect("decodes");
        assert_eq!(decoded, request);
    }

    #[tokio::test]
    async fn a_request_for_the_most_rows_of_the_largest_ids_fits_its_frame() {
        let request = FetchRequest {
            object: ObjectRef::Rows {
                table: "embed_tokens.weight".into(),
                rows: vec![u32::MAX; crate::manifest::MAX_ROWS_PER_REQUEST],
            },
            start: 0,
            end: u64::MAX,
        };
        let frame = encode_frame("fetch request", &request, limits::FETCH_REQUEST)
            .expect("the largest rows request fits the limit");
        let decoded: FetchRequest = read_frame(
            &mut frame.as_slice(),
            "fetch request",
            limits::FETCH_REQUEST,
        )
        .await
        .expect("decodes");
        assert_eq!(decoded, request);
    }

    #[tokio::test]
    async fn an_oversized_length_is_refused_before_the_body_is_read() {
        let mut frame = (limits::FETCH_REQUEST as u32 + 1).to_be_bytes().to_vec();
        frame.extend_from_slice(&[0u8; 16]);
        let result: Result<FetchRequest, _> = read_frame(
            &mut frame.as_slice(),
            "fetch request",
            limits::FETCH_REQUEST,
        )
        .await;
        assert!(matches!(
            result,
            Err(Error::MessageTooLarge { len, .. }) if len == limits::FETCH_REQUEST as u64 + 1
        ));
    }

    /// A reader that hands out its bytes a few at a time and remembers the
    /// largest buffer it was asked to fill.
    struct Trickle<'a> {
        bytes: &'a [u8],
        largest_read: usize,
    }

    impl AsyncRead for Trickle<'_> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            self.largest_read = self.largest_read.max(buf.remaining());
            let n = self.bytes.len().min(buf.remaining()).min(7);
            let (now, rest) = self.bytes.split_at(n);
            buf.put_slice(now);
            self.bytes = rest;
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_large_announced_body_is_not_reserved_before_it_arrives() {
        let announced = limits::HELLO_REPLY as u32;
        let mut frame = announced.to_be_bytes().to_vec();
        frame.extend_from_slice(&[0u8; 100]);
        let mut reader = Trickle {
            bytes: &frame,
            largest_read: 0,
        };
        let result: Result<HelloReply, _> =
            read_frame(&mut reader, "hello reply", limits::HELLO_REPLY).await;
        assert!(
            matches!(&result, Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::UnexpectedEof),
            "{result:?}"
        );
        assert!(
            reader.largest_read <= limits::INITIAL_READ_BUFFER,
            "a buffer of {} bytes was offered for 100 bytes that arrived",
            reader.largest_read
        );
    }

    #[tokio::test]
    async fn a_body_that_arrives_in_pieces_decodes() {
        let request = FetchRequest {
            object: ObjectRef::Tensor("pooler.dense.weight".into()),
            start: 3,
            end: 9,
        };
        let frame = encode_frame("fetch request", &request, limits::FETCH_REQUEST)
            .expect("a small request encodes");
        let mut reader = Trickle {
            bytes: &frame,
            largest_read: 0,
        };
        let decoded: FetchRequest = read_frame(&mut reader, "fetch request", limits::FETCH_REQUEST)
            .await
            .expect("decodes");
        assert_eq!(decoded, request);
    }

    #[tokio::test]
    async fn garbage_body_is_malformed() {
        let mut frame = 3u32.to_be_bytes().to_vec();
        frame.extend_from_slice(&[0xff, 0xff, 0xff]);
        let result: Result<FetchRequest, _> = read_frame(
            &mut frame.as_slice(),
            "fetch request",
            limits::FETCH_REQUEST,
        )
        .await;
        assert!(matches!(result, Err(Error::Malformed { .. })));
    }

    #[tokio::test]
    async fn handshake_frame_states_its_version() {
        let hello = Hello {
            token: Some("secret".into()),
            weight_dtype: Dtype::F16,
            model: Some("mini".into()),
        };
        let frame = encode_handshake_frame("hello", 42, &hello, limits::HELLO).expect("encodes");
        let mut reader = frame.as_slice();
        let version = read_handshake_version(&mut reader, "hello")
            .await
            .expect("has a header");
        assert_eq!(version, 42);
        let decoded: Hello = read_frame(&mut reader, "hello", limits::HELLO)
            .await
            .expect("decodes");
        assert_eq!(decoded, hello);
    }

    #[tokio::test]
    async fn a_stranger_is_told_apart_by_its_magic() {
        let bytes = b"GET / HTTP/1.1\r\n".to_vec();
        let result = read_handshake_version(&mut bytes.as_slice(), "hello").await;
        assert!(matches!(result, Err(Error::NotSurfProtocol { found }) if &found == b"GET "));
    }

    #[test]
    fn the_token_stays_out_of_logs() {
        let hello = Hello {
            token: Some("hunter2".into()),
            weight_dtype: Dtype::F32,
            model: None,
        };
        assert!(!format!("{hello:?}").contains("hunter2"));
    }

    #[test]
    fn a_dtype_refusal_says_how_to_start_the_server() {
        let refusal = Refusal::DtypeUnavailable {
            requested: Dtype::F16,
            served: Dtype::F32,
        };
        assert_eq!(
            refusal.to_string(),
            "the server serves f32 weights, not f16 (start it with --dtype f16)"
        );
        let odd = Refusal::DtypeUnavailable {
            requested: Dtype::BF16,
            served: Dtype::F32,
        };
        assert!(!odd.to_string().contains("--dtype bf16"), "{odd}");
    }
}
