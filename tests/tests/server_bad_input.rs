//! Bad input of every kind: the server refuses it (or closes that one
//! connection) and keeps serving everyone else; a broken model folder is
//! refused at start.

mod transport_support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use surf_server::{RunningServer, ServerConfig, WeightServer};
use surf_transport::wire::{
    self, FetchRefusal, FetchReply, FetchRequest, Hello, HelloReply, PROTOCOL_VERSION, Refusal,
    close_code, limits,
};
use surf_transport::{CertificateDer, Error, ObjectRef, PrivateKeyDer, WeightClient, tls};
use transport_support::*;

/// A QUIC connection that speaks the protocol by hand.
async fn raw_connection(server: &RunningServer) -> (quinn::Endpoint, quinn::Connection) {
    let mut endpoint = quinn::Endpoint::client(loopback()).expect("a client socket");
    endpoint.set_default_client_config(
        tls::client_config(&[server.certificate_der().clone()]).expect("client TLS"),
    );
    let connection = endpoint
        .connect(server.local_addr(), "localhost")
        .expect("connect starts")
        .await
        .expect("QUIC handshake");
    (endpoint, connection)
}

/// Sends a hello stating `version` and returns the server's version and reply.
async fn raw_hello(
    connection: &quinn::Connection,
    version: u32,
    token: Option<&str>,
) -> (u32, HelloReply) {
    let (mut send, mut recv) = connection.open_bi().await.expect("a stream");
    let hello = Hello {
        token: token.map(str::to_owned),
        weight_dtype: surf_transport::Dtype::F32,
        model: None,
    };
    let frame = wire::encode_handshake_frame("hello", version, &hello, limits::HELLO)
        .expect("hello encodes");
    send.write_all(&frame).await.expect("hello sent");
    send.finish().expect("finish");
    let server_version = wire::read_handshake_version(&mut recv, "hello reply")
        .await
        .expect("a reply header");
    let reply = wire::read_frame(&mut recv, "hello reply", limits::HELLO_REPLY)
        .await
        .expect("a reply");
    (server_version, reply)
}

/// Sends `bytes` as a whole fetch stream and returns the server's reply.
async fn raw_fetch(connection: &quinn::Connection, bytes: &[u8]) -> FetchReply {
    let (mut send, mut recv) = connection.open_bi().await.expect("a stream");
    send.write_all(bytes).await.expect("request sent");
    send.finish().expect("finish");
    wire::read_frame(&mut recv, "fetch reply", limits::FETCH_REPLY)
        .await
        .expect("a fetch reply")
}

async fn assert_still_serving(server: &RunningServer) {
    let file = file_tensors(&model_dir());
    let client = connect(&[server]).await;
    let bytes = client
        .fetch_component("head")
        .await
        .expect("pooler arrives");
    assert_component_matches_file(client.manifest(), "head", &bytes, &file);
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_objects_and_bad_ranges_are_refused_on_a_connection_that_keeps_working() {
    let server = start_model_server().await;
    let client = connect(&[&server]).await;
    let pooler_len = client.manifest().component("head").expect("head").byte_len;

    let out_of_bounds = |start, end| FetchRefusal::RangeOutOfBounds {
        start,
        end,
        len: pooler_len,
    };
    let cases = [
        (
            ObjectRef::Component("encoder.layer.99".into()),
            0..1,
            FetchRefusal::UnknownObject,
        ),
        (
            ObjectRef::Tensor("no.such.tensor".into()),
            0..1,
            FetchRefusal::UnknownObject,
        ),
        (
            ObjectRef::Component("head".into()),
            0..pooler_len + 1,
            out_of_bounds(0, pooler_len + 1),
        ),
    ];
    for (object, range, expected) in cases {
        match client
            .fetch_unverified_range(object.clone(), range.clone())
            .await
        {
            Err(Error::FetchRefused { refusal, .. }) => assert_eq!(refusal, expected),
            other => panic!("{object} {range:?} should be refused, got {other:?}"),
        }
    }
    // The client does not send a reversed range at all (a hand-made
    // request, below, shows that the server refuses it too).
    let reversed = client
        .fetch_unverified_range(
            ObjectRef::Component("head".into()),
            std::ops::Range { start: 10, end: 5 },
        )
        .await;
    assert!(
        matches!(
            reversed,
            Err(Error::InvertedRange {
                start: 10,
                end: 5,
                ..
            })
        ),
        "{reversed:?}"
    );
    let bytes = client
        .fetch_component("head")
        .await
        .expect("the same connection still works");
    assert_eq!(bytes.len() as u64, pooler_len);
    assert_eq!(server.stats().connections, 1);
    client.close().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_requests_are_refused() {
    let server = start_model_server().await;
    let (endpoint, connection) = raw_connection(&server).await;
    let (_, reply) = raw_hello(&connection, PROTOCOL_VERSION, None).await;
    assert!(matches!(reply, HelloReply::Accepted(_)));

    let oversized = (limits::FETCH_REQUEST as u32 + 1).to_be_bytes();
    assert_eq!(
        raw_fetch(&connection, &oversized).await,
        FetchReply::Refused(FetchRefusal::RequestTooLarge {
            len: limits::FETCH_REQUEST as u64 + 1,
            limit: limits::FETCH_REQUEST as u64,
        })
    );

    let mut garbage = 4u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
    assert!(matches!(
        raw_fetch(&connection, &garbage).await,
        FetchReply::Refused(FetchRefusal::Malformed { .. })
    ));

    let reversed = FetchRequest {
        object: ObjectRef::Component("head".into()),
        start: 10,
        end: 5,
    };
    let frame =
        wire::encode_frame("fetch request", &reversed, limits::FETCH_REQUEST).expect("encodes");
    assert!(matches!(
        raw_fetch(&connection, &frame).await,
        FetchReply::Refused(FetchRefusal::RangeOutOfBounds {
            start: 10,
            end: 5,
            ..
        })
    ));

    // The same connection still gets well-formed requests answered.
    let request = FetchRequest {
        object: ObjectRef::Component("head".into()),
        start: 0,
        end: 16,
    };
    let frame =
        wire::encode_frame("fetch request", &request, limits::FETCH_REQUEST).expect("encodes");
    assert_eq!(
        raw_fetch(&connection, &frame).await,
        FetchReply::Data { len: 16 }
    );
    connection.close(close_code::DONE.into(), b"");
    endpoint.wait_idle().await;
    assert_still_serving(&server).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_of_another_protocol_version_is_refused_with_the_reason() {
    let server = start_model_server().await;
    let (_endpoint, connection) = raw_connection(&server).await;
    let (server_version, reply) = raw_hello(&connection, PROTOCOL_VERSION + 1, None).await;
    assert_eq!(server_version, PROTOCOL_VERSION);
    assert_eq!(
        reply,
        HelloReply::Refused(Refusal::VersionMismatch {
            server_version: PROTOCOL_VERSION
        })
    );
    let closed = connection.closed().await;
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, close_code::VERSION_MISMATCH.into());
            let reason = String::from_utf8_lossy(&close.reason).into_owned();
            assert!(reason.contains("version"), "reason: {reason}");
        }
        other => panic!("expected the server to close the connection, got {other:?}"),
    }
    assert_eq!(server.stats().connections_refused, 1);
    assert_eq!(server.stats().bytes_served, 0);
    assert_still_serving(&server).await;
    server.shutdown().await;
}

/// A server of a future protocol version: answers every hello with a v+1 frame.
async fn future_version_server() -> (SocketAddr, CertificateDer<'static>, quinn::Endpoint) {
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("a certificate");
    let certificate = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let config = tls::server_config(vec![certificate.clone()], key).expect("server TLS");
    let endpoint = quinn::Endpoint::server(config, loopback()).expect("binds");
    let addr = endpoint.local_addr().expect("an address");
    let accepting = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = accepting.accept().await {
            let Ok(connection) = incoming.await else {
                continue;
            };
            let Ok((mut send, _recv)) = connection.accept_bi().await else {
                continue;
            };
            let reply = HelloReply::Refused(Refusal::Malformed {
                detail: "from the future".into(),
            });
            let frame = wire::encode_handshake_frame(
                "hello reply",
                PROTOCOL_VERSION + 1,
                &reply,
                limits::HELLO_REPLY,
            )
            .expect("encodes");
            let _ = send.write_all(&frame).await;
            let _ = send.finish();
            let _ = connection.closed().await;
        }
    });
    (addr, certificate, endpoint)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_refuses_a_server_of_another_protocol_version() {
    let (addr, certificate, _endpoint) = future_version_server().await;
    let config = surf_transport::ClientConfig::new(vec![addr], vec![certificate]);
    let result = WeightClient::connect(config).await;
    match result {
        Err(error @ Error::VersionMismatch { local, remote }) => {
            assert_eq!((local, remote), (PROTOCOL_VERSION, PROTOCOL_VERSION + 1));
            assert!(error.to_string().contains("version mismatch"));
            assert!(error.is_bad_input());
        }
        other => panic!("expected a version mismatch, got {:?}", other.err()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_token_nothing_is_sent() {
    let mut config = ServerConfig::new(model_dir(), loopback());
    config.token = Some("correct horse".into());
    let server = start_server(config).await;

    for token in [
        None,
        Some("wrong"),
        Some("correct hors"),
        Some("correct horse "),
    ] {
        let mut config = client_config(&[&server]);
        config.token = token.map(str::to_owned);
        let result = WeightClient::connect(config).await;
        assert!(
            matches!(result, Err(Error::Unauthorized)),
            "token {token:?} must be refused, got {:?}",
            result.err()
        );
    }
    let (_endpoint, connection) = raw_connection(&server).await;
    let (_, reply) = raw_hello(&connection, PROTOCOL_VERSION, Some("wrong")).await;
    assert_eq!(reply, HelloReply::Refused(Refusal::Unauthorized));
    match connection.closed().await {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, close_code::UNAUTHORIZED.into());
        }
        other => panic!("expected the server to close the connection, got {other:?}"),
    }

    let stats = server.stats();
    assert_eq!(stats.connections_refused, 5);
    assert_eq!(stats.requests, 0);
    assert_eq!(stats.bytes_served, 0);

    let mut config = client_config(&[&server]);
    config.token = Some("correct horse".into());
    let client = WeightClient::connect(config)
        .await
        .expect("the right token is accepted");
    let bytes = client
        .fetch_component("head")
        .await
        .expect("pooler arrives");
    assert!(!bytes.is_empty());
    client.close().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_vanishes_mid_stream_does_not_disturb_the_others() {
    // A layer of 50 MB: more than a stream's flow-control window, so the
    // server is still sending when the client walks away.
    let folder = tempfile::tempdir().expect("a temp dir");
    let tokenizer = std::fs::read(model_dir().join("tokenizer.json")).expect("the tokenizer");
    surf_engine::synth::write_model(
        folder.path(),
        &surf_engine::synth::SynthSpec::sized(1, 1024, 16, 4096),
        &tokenizer,
    )
    .expect("a model with a large layer");
    let server = start_server(ServerConfig::new(folder.path(), loopback())).await;
    let (endpoint, connection) = raw_connection(&server).await;
    raw_hello(&connection, PROTOCOL_VERSION, None).await;
    let len = server
        .manifest()
        .component("encoder.layer.0")
        .expect("a layer")
        .byte_len;
    let request = FetchRequest {
        object: ObjectRef::Component("encoder.layer.0".into()),
        start: 0,
        end: len,
    };
    let (mut send, mut recv) = connection.open_bi().await.expect("a stream");
    let frame =
        wire::encode_frame("fetch request", &request, limits::FETCH_REQUEST).expect("encodes");
    send.write_all(&frame).await.expect("sent");
    send.finish().expect("finish");
    let reply: FetchReply = wire::read_frame(&mut recv, "fetch reply", limits::FETCH_REPLY)
        .await
        .expect("a reply");
    assert_eq!(reply, FetchReply::Data { len });
    let mut some_bytes = vec![0u8; 64 * 1024];
    recv.read_exact(&mut some_bytes)
        .await
        .expect("the first bytes arrive");
    // Walk away mid-stream: streams, connection and socket are dropped.
    drop((recv, send, connection, endpoint));

    let client = connect(&[&server]).await;
    let layer = client
        .fetch_component("encoder.layer.0")
        .await
        .expect("another client is still served, hash-checked");
    assert_eq!(layer.len() as u64, len);
    client.close().await;
    // The cut-off fetch is counted as failed once the server notices.
    while server.stats().request_errors == 0 {
        tokio::task::yield_now().await;
    }
    server.shutdown().await;
}

fn write_safetensors(dir: &Path, header: &str, data: &[u8]) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(dir.join("model.safetensors"), bytes).expect("writes");
}

const TINY_HEADER: &str = concat!(
    r#"{"bert.embeddings.word_embeddings.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"#,
    r#""bert.embeddings.position_ids":{"dtype":"I64","shape":[1,2],"data_offsets":[16,32]},"#,
    r#""bert.encoder.layer.0.output.dense.bias":{"dtype":"F32","shape":[2],"data_offsets":[32,40]},"#,
    r#""cls.predictions.bias":{"dtype":"F32","shape":[1],"data_offsets":[40,44]}}"#
);

/// A BERT `config.json`: the family decides which tensors make a component.
const TINY_CONFIG: &[u8] = br#"{"model_type": "bert", "vocab_size": 2, "hidden_size": 4,
    "num_hidden_layers": 1, "num_attention_heads": 1, "intermediate_size": 4,
    "max_position_embeddings": 2}"#;

async fn bind_folder(dir: &Path) -> Result<RunningServer, surf_server::Error> {
    WeightServer::bind(ServerConfig::new(dir, loopback())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_model_folders_are_refused_at_start() {
    let folder = tempfile::tempdir().expect("a temp dir");
    let dir = folder.path();

    let missing = bind_folder(dir).await.err().expect("no weights file");
    assert!(
        matches!(missing, surf_server::Error::MissingWeights { .. }),
        "{missing}"
    );

    write_safetensors(dir, TINY_HEADER, &[0u8; 40]);
    let truncated = bind_folder(dir).await.err().expect("truncated data");
    assert!(
        matches!(truncated, surf_server::Error::Safetensors { .. }),
        "{truncated}"
    );
    assert!(truncated.to_string().contains("model.safetensors"));

    std::fs::write(
        dir.join("model.safetensors"),
        b"this is not a safetensors file",
    )
    .expect("writes");
    let garbage = bind_folder(dir).await.err().expect("garbage");
    assert!(
        matches!(garbage, surf_server::Error::Safetensors { .. }),
        "{garbage}"
    );

    write_safetensors(dir, "{\"a\":", &[]);
    let bad_json = bind_folder(dir).await.err().expect("bad header json");
    assert!(
        matches!(bad_json, surf_server::Error::Safetensors { .. }),
        "{bad_json}"
    );

    write_safetensors(
        dir,
        r#"{"classifier.weight":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
        &[0u8; 4],
    );
    std::fs::write(dir.join("config.json"), TINY_CONFIG).expect("writes");
    let not_bert = bind_folder(dir).await.err().expect("no BERT tensors");
    assert!(
        matches!(not_bert, surf_server::Error::InvalidModel { .. }),
        "{not_bert}"
    );

    for error in [missing, truncated, garbage, bad_json, not_bert] {
        assert!(error.is_bad_input(), "{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bert_prefixed_checkpoints_are_served_under_plain_names() {
    let folder = tempfile::tempdir().expect("a temp dir");
    let data: Vec<u8> = (0..44u8).collect();
    write_safetensors(folder.path(), TINY_HEADER, &data);
    std::fs::write(folder.path().join("config.json"), TINY_CONFIG).expect("writes");
    let server = bind_folder(folder.path())
        .await
        .expect("a valid tiny model");
    let client = connect(&[&server]).await;
    let manifest = Arc::new(client.manifest().clone());

    let names: Vec<_> = manifest
        .components
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(names, ["embeddings", "encoder.layer.0"]);
    let embeddings = client.fetch_component("embeddings").await.expect("arrives");
    assert!(
        embeddings.is_empty(),
        "position_ids are left out, and the word table is served by rows"
    );
    let rows = client
        .fetch_rows("embeddings.word_embeddings.weight", &[1, 0, 1])
        .await
        .expect("rows arrive");
    assert_eq!(rows, [&data[8..16], &data[0..8], &data[8..16]].concat());
    let bias = client
        .fetch_tensor("encoder.layer.0.output.dense.bias")
        .await
        .expect("arrives");
    assert_eq!(&bias[..], &data[32..40]);
    assert_eq!(manifest.file("config.json"), Some(TINY_CONFIG));
    client.close().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_a_model_does_not_need_stay_on_the_server() {
    let folder = tempfile::tempdir().expect("a temp dir");
    let dir = folder.path();
    write_safetensors(dir, TINY_HEADER, &(0..44u8).collect::<Vec<_>>());
    std::fs::write(dir.join("config.json"), TINY_CONFIG).expect("writes");
    std::fs::write(dir.join("secret.txt"), b"hunter2").expect("writes");
    std::fs::write(dir.join("other.json"), b"{}").expect("writes");
    std::fs::create_dir(dir.join("1_Pooling")).expect("a module folder");
    std::fs::write(dir.join("1_Pooling/config.json"), b"{}").expect("writes");
    std::fs::write(dir.join("1_Pooling/notes.txt"), b"private").expect("writes");
    let server = bind_folder(dir).await.expect("a valid tiny model");
    let client = connect(&[&server]).await;

    let files: Vec<&str> = client.manifest().files.keys().map(String::as_str).collect();
    assert_eq!(files, ["1_Pooling/config.json", "config.json"]);
    for name in ["secret.txt", "other.json", "1_Pooling/notes.txt"] {
        let result = client
            .fetch_unverified_range(ObjectRef::Component(name.to_owned()), 0..1)
            .await;
        assert!(
            matches!(
                result,
                Err(Error::FetchRefused {
                    refusal: FetchRefusal::UnknownObject,
                    ..
                })
            ),
            "{name}: {result:?}"
        );
    }
    client.close().await;
    server.shutdown().await;
}
