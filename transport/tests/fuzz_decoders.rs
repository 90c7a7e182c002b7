//! Property tests of everything the client decodes from the wire: frames,
//! handshake headers and manifests. Arbitrary and mutated bytes end in an
//! error, never a panic; announced lengths larger than what arrives cost no
//! more memory than what arrives; valid messages survive the round trip.
//!
//! Each property runs a modest number of cases by default; the ignored
//! `stress_*` variants run `SURF_FUZZ_CASES` (default 20 000) of each:
//! `cargo test -p surf-transport --test fuzz_decoders -- --ignored`.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::task::{Context, Poll};

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use surf_tests::fuzz::{DEFAULT_CASES, check, stress_cases};
use surf_transport::manifest::{MAX_CHUNK_SIZE, MAX_COMPONENT_BYTES};
use surf_transport::wire::{
    self, FetchRefusal, FetchReply, FetchRequest, Hello, HelloReply, PROTOCOL_VERSION, Refusal,
    limits,
};
use surf_transport::{Component, Digest, Dtype, Error, Manifest, ObjectRef, TensorEntry};
use tokio::io::{AsyncRead, ReadBuf};

/// Runs a decoder to completion on this thread: its readers never wait.
fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime")
        .block_on(future)
}

/// Hands out its bytes a few at a time, as a network would, and remembers
/// the largest buffer a decoder offered to fill: what it had allocated.
struct Trickle<'a> {
    bytes: &'a [u8],
    largest_buffer: usize,
}

impl<'a> Trickle<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Trickle {
            bytes,
            largest_buffer: 0,
        }
    }
}

impl AsyncRead for Trickle<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.largest_buffer = self.largest_buffer.max(buf.remaining());
        let n = self.bytes.len().min(buf.remaining()).min(1500);
        let (now, rest) = self.bytes.split_at(n);
        buf.put_slice(now);
        self.bytes = rest;
        Poll::Ready(Ok(()))
    }
}

/// Decodes `bytes` as every message kind the client and server read, with
/// their limits; each must come back as a value or an error.
fn decode_every_kind(bytes: &[u8]) {
    block_on(async {
        let _ =
            wire::read_frame::<Hello, _>(&mut Trickle::new(bytes), "hello", limits::HELLO).await;
        let _ = wire::read_frame::<FetchRequest, _>(
            &mut Trickle::new(bytes),
            "fetch request",
            limits::FETCH_REQUEST,
        )
        .await;
        let _ = wire::read_frame::<FetchReply, _>(
            &mut Trickle::new(bytes),
            "fetch reply",
            limits::FETCH_REPLY,
        )
        .await;
        let mut reader = Trickle::new(bytes);
        if wire::read_handshake_version(&mut reader, "hello reply")
            .await
            .is_ok()
        {
            let reply =
                wire::read_frame::<HelloReply, _>(&mut reader, "hello reply", limits::HELLO_REPLY)
                    .await;
            if let Ok(HelloReply::Accepted(manifest)) = reply {
                exercise_manifest(&manifest);
            }
        }
    });
}

/// Everything a client does with a manifest before trusting it, and what
/// it relies on once it does.
fn exercise_manifest(manifest: &Manifest) {
    let _ = manifest.total_bytes();
    let _ = manifest.compute_revision();
    if manifest.validate().is_err() {
        return;
    }
    for component in &manifest.components {
        assert!(component.byte_len <= MAX_COMPONENT_BYTES);
        let ends = manifest.chunk_ends(component);
        assert_eq!(ends.last().map_or(0, |(end, _)| *end), component.byte_len);
        for tensor in &component.tensors {
            assert!(tensor.byte_range().end <= component.byte_len);
        }
    }
}

fn arbitrary_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..512)
}

/// A frame header announcing `announced` bytes, then `body`.
fn framed(announced: u32, body: &[u8]) -> Vec<u8> {
    let mut frame = announced.to_be_bytes().to_vec();
    frame.extend_from_slice(body);
    frame
}

fn arbitrary_bytes_decode_or_fail_cleanly(cases: u32) {
    let as_frame = (any::<u32>(), arbitrary_bytes()).prop_map(|(len, body)| framed(len, &body));
    let as_handshake =
        (any::<u32>(), any::<u32>(), arbitrary_bytes()).prop_map(|(version, len, body)| {
            let mut bytes = wire::MAGIC.to_vec();
            bytes.extend_from_slice(&version.to_be_bytes());
            bytes.extend_from_slice(&framed(len, &body));
            bytes
        });
    let strategy = prop_oneof![arbitrary_bytes(), as_frame, as_handshake];
    check(cases, strategy, |bytes| {
        decode_every_kind(&bytes);
        Ok(())
    });
}

#[test]
fn arbitrary_bytes_decode_or_fail_cleanly_default() {
    arbitrary_bytes_decode_or_fail_cleanly(DEFAULT_CASES);
}

#[test]
#[ignore = "stress: SURF_FUZZ_CASES cases"]
fn stress_arbitrary_bytes_decode_or_fail_cleanly() {
    arbitrary_bytes_decode_or_fail_cleanly(stress_cases());
}

fn announced_lengths_cost_only_what_arrives(cases: u32) {
    let strategy = (0..=limits::HELLO_REPLY as u32, arbitrary_bytes());
    check(cases, strategy, |(announced, body)| {
        let frame = framed(announced, &body);
        let mut reader = Trickle::new(&frame);
        let result = block_on(wire::read_frame::<HelloReply, _>(
            &mut reader,
            "hello reply",
            limits::HELLO_REPLY,
        ));
        if announced as usize > body.len() {
            prop_assert!(
                matches!(&result, Err(Error::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::UnexpectedEof),
                "{result:?}"
            );
        }
        let affordable = limits::INITIAL_READ_BUFFER.max(2 * frame.len());
        prop_assert!(
            reader.largest_buffer <= affordable,
            "{} bytes announced, {} sent: a {}-byte buffer was offered",
            announced,
            body.len(),
            reader.largest_buffer
        );
        Ok(())
    });
}

#[test]
fn announced_lengths_cost_only_what_arrives_default() {
    announced_lengths_cost_only_what_arrives(DEFAULT_CASES);
}

#[test]
#[ignore = "stress: SURF_FUZZ_CASES cases"]
fn stress_announced_lengths_cost_only_what_arrives() {
    announced_lengths_cost_only_what_arrives(stress_cases());
}

fn lengths_over_the_limit_are_refused_unread(cases: u32) {
    let strategy = (limits::FETCH_REQUEST as u32 + 1.., arbitrary_bytes());
    check(cases, strategy, |(announced, body)| {
        let frame = framed(announced, &body);
        let mut reader = Trickle::new(&frame);
        let result = block_on(wire::read_frame::<FetchRequest, _>(
            &mut reader,
            "fetch request",
            limits::FETCH_REQUEST,
        ));
        let refused = matches!(
            result,
            Err(Error::MessageTooLarge { len, .. }) if len == u64::from(announced)
        );
        prop_assert!(refused, "{} bytes announced", announced);
        prop_assert_eq!(reader.bytes.len(), body.len(), "the body was left unread");
        Ok(())
    });
}

#[test]
fn lengths_over_the_limit_are_refused_unread_default() {
    lengths_over_the_limit_are_refused_unread(DEFAULT_CASES);
}

#[test]
#[ignore = "stress: SURF_FUZZ_CASES cases"]
fn stress_lengths_over_the_limit_are_refused_unread() {
    lengths_over_the_limit_are_refused_unread(stress_cases());
}

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9._]{0,24}"
}

fn object() -> impl Strategy<Value = ObjectRef> {
    prop_oneof![
        name().prop_map(ObjectRef::Component),
        name().prop_map(ObjectRef::Tensor)
    ]
}

fn dtype() -> impl Strategy<Value = Dtype> {
    prop::sample::select(vec![
        Dtype::Bool,
        Dtype::U8,
        Dtype::I8,
        Dtype::I16,
        Dtype::I32,
        Dtype::I64,
        Dtype::F16,
        Dtype::BF16,
        Dtype::F32,
        Dtype::F64,
    ])
}

fn fetch_reply() -> impl Strategy<Value = FetchReply> {
    prop_oneof![
        any::<u64>().prop_map(|len| FetchReply::Data { len }),
        Just(FetchReply::Refused(FetchRefusal::UnknownObject)),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(start, end, len)| {
            FetchReply::Refused(FetchRefusal::RangeOutOfBounds { start, end, len })
        }),
        name().prop_map(|detail| FetchReply::Refused(FetchRefusal::Internal { detail })),
    ]
}

async fn round_trip<T>(kind: &'static str, message: &T, limit: usize) -> Result<T, Error>
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    let frame = wire::encode_frame(kind, message, limit)?;
    wire::read_frame(&mut Trickle::new(&frame), kind, limit).await
}

fn valid_messages_survive_the_round_trip(cases: u32) {
    let strategy = (
        (object(), any::<u64>(), any::<u64>()).prop_map(|(object, start, end)| FetchRequest {
            object,
            start,
            end,
        }),
        fetch_reply(),
        (
            proptest::option::of(name()),
            dtype(),
            proptest::option::of(name()),
        )
            .prop_map(|(token, weight_dtype, model)| Hello {
                token,
                weight_dtype,
                model,
            }),
    );
    check(cases, strategy, |(request, reply, hello)| {
        block_on(async {
            let decoded = round_trip("fetch request", &request, limits::FETCH_REQUEST).await;
            prop_assert_eq!(decoded.ok(), Some(request));
            let decoded = round_trip("fetch reply", &reply, limits::FETCH_REPLY).await;
            prop_assert_eq!(decoded.ok(), Some(reply));
            let frame =
                wire::encode_handshake_frame("hello", PROTOCOL_VERSION, &hello, limits::HELLO)
                    .map_err(|error| TestCaseError::fail(error.to_string()))?;
            let mut reader = Trickle::new(&frame);
            let version = wire::read_handshake_version(&mut reader, "hello").await;
            prop_assert_eq!(version.ok(), Some(PROTOCOL_VERSION));
            let decoded = wire::read_frame::<Hello, _>(&mut reader, "hello", limits::HELLO).await;
            prop_assert_eq!(decoded.ok(), Some(hello));
            Ok(())
        })
    });
}

#[test]
fn valid_messages_survive_the_round_trip_default() {
    valid_messages_survive_the_round_trip(DEFAULT_CASES);
}

#[test]
#[ignore = "stress: SURF_FUZZ_CASES cases"]
fn stress_valid_messages_survive_the_round_trip() {
    valid_messages_survive_the_round_trip(stress_cases());
}

/// A tensor's dtype and shape, its bytes made up to fit.
fn tensor_spec(weight_dtype: Dtype) -> impl Strategy<Value = (Dtype, Vec<u64>)> {
    let dtype = prop_oneof![
        Just(weight_dtype),
        prop::sample::select(vec![Dtype::U8, Dtype::I32, Dtype::I64])
    ];
    (dtype, prop::collection::vec(1u64..5, 1..3))
}

/// A manifest that a server would build: tensors back to back in each
/// component, chunk hashes and revision computed from made-up bytes.
fn valid_manifest() -> impl Strategy<Value = Manifest> {
    let weight_dtype = prop::sample::select(Dtype::SERVABLE.to_vec());
    (weight_dtype, 1u64..64).prop_flat_map(|(weight_dtype, chunk_size)| {
        let component = prop::collection::vec(tensor_spec(weight_dtype), 1..4);
        let files = prop::collection::btree_map(name(), arbitrary_bytes(), 0..3);
        (prop::collection::vec(component, 1..4), files, name()).prop_map(
            move |(components, files, model_id)| {
                build_manifest(model_id, weight_dtype, chunk_size, files, components)
            },
        )
    })
}

fn build_manifest(
    model_id: String,
    weight_dtype: Dtype,
    chunk_size: u64,
    files: BTreeMap<String, Vec<u8>>,
    components: Vec<Vec<(Dtype, Vec<u64>)>>,
) -> Manifest {
    let components = components
        .into_iter()
        .enumerate()
        .map(|(index, specs)| {
            let mut bytes = Vec::new();
            let tensors = specs
                .into_iter()
                .enumerate()
                .map(|(number, (dtype, shape))| {
                    let byte_len = shape.iter().product::<u64>() * dtype.size_bytes();
                    let offset = bytes.len() as u64;
                    let tensor_bytes: Vec<u8> =
                        (0..byte_len).map(|i| (i as u8) ^ (number as u8)).collect();
                    bytes.extend_from_slice(&tensor_bytes);
                    TensorEntry {
                        name: format!("encoder.layer.{index}.t{number}"),
                        dtype,
                        shape,
                        offset,
                        byte_len,
                        hash: Digest::of(&tensor_bytes),
                    }
                })
                .collect();
            Component::describe(
                format!("encoder.layer.{index}"),
                tensors,
                &bytes,
                chunk_size,
            )
        })
        .collect();
    let mut manifest = Manifest {
        model_id,
        revision: String::new(),
        files,
        chunk_size,
        weight_dtype,
        components,
        row_tables: Vec::new(),
    };
    manifest.revision = manifest.compute_revision();
    manifest
}

fn valid_manifests_validate_and_round_trip(cases: u32) {
    check(cases, valid_manifest(), |manifest| {
        prop_assert!(manifest.validate().is_ok(), "{:?}", manifest.validate());
        exercise_manifest(&manifest);
        let reply = HelloReply::Accepted(Box::new(manifest.clone()));
        let decoded = block_on(round_trip("hello reply", &reply, limits::HELLO_REPLY));
        prop_assert_eq!(decoded.ok(), Some(reply));
        Ok(())
    });
}

#[test]
fn valid_manifests_validate_and_round_trip_default() {
    valid_manifests_validate_and_round_trip(DEFAULT_CASES);
}

#[test]
#[ignore = "stress: SURF_FUZZ_CASES cases"]
fn stress_valid_manifests_validate_and_round_trip() {
    valid_manifests_validate_and_round_trip(stress_cases());
}

/// One lie a server could tell in a manifest's numbers.
#[derive(Debug, Clone)]
enum Lie {
    ByteLen(u64),
    ChunkSize(u64),
    TensorOffset(u64),
    TensorByteLen(u64),
}

fn lie() -> impl Strategy<Value = Lie> {
    let number = prop_oneof![
        any::<u64>(),
        Just(u64::MAX),
        Just(MAX_COMPONENT_BYTES + 1),
        Just(MAX_CHUNK_SIZE + 1),
        0u64..256,
    ];
    number.prop_flat_map(|n| {
        prop_oneof![
            Just(Lie::ByteLen(n)),
            Just(Lie::ChunkSize(n)),
            Just(Lie::TensorOffset(n)),
            Just(Lie::TensorByteLen(n)),
        ]
    })
}

fn tell(manifest: &mut Manifest, lie: &Lie) {
    let component = &mut manifest.components[0];
    match *lie {
        Lie::ByteLen(n) => component.byte_len = n,
        Lie::ChunkSize(n) => manifest.chunk_size = n,
        Lie::TensorOffset(n) => component.tensors[0].offset = n,
        Lie::TensorByteLen(n) => component.tensors[0].byte_len = n,
    }
    // A liar also signs its lie: only the numbers can give it away.
    manifest.revision = manifest.compute_revision();
}

fn lies_about_lengths_are_caught(cases: u32) {
    check(cases, (valid_manifest(), lie()), |(mut manifest, lie)| {
        let honest = manifest.clone();
        tell(&mut manifest, &lie);
        let unchanged =
            manifest.components == honest.components && manifest.chunk_size == honest.chunk_size;
        let result = manifest.validate();
        if unchanged {
            prop_assert!(result.is_ok());
        } else if let Lie::ChunkSize(chunk_size) = lie {
            // Another chunk size is no lie when it cuts the same chunks.
            let same_chunks = manifest.components.iter().all(|component| {
                chunk_size > 0
                    && component.byte_len.div_ceil(chunk_size)
                        == component.chunk_hashes.len() as u64
            });
            prop_assert!(result.is_ok() == (same_chunks && chunk_size <= MAX_CHUNK_SIZE));
        } else {
            prop_assert!(result.is_err(), "{lie:?} went unnoticed");
        }
        exercise_manifest(&manifest);
        Ok(())
    });
}

#[test]
fn lies_about_lengths_are_caught_default() {
    lies_about_lengths_are_caught(DEFAULT_CASES);
}

#[test]
#[ignore = "stress: SURF_FUZZ_CASES cases"]
fn stress_lies_about_lengths_are_caught() {
    lies_about_lengths_are_caught(stress_cases());
}

fn mutated_manifests_decode_or_fail_cleanly(cases: u32) {
    let mutations = prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8);
    check(
        cases,
        (valid_manifest(), mutations, any::<prop::sample::Index>()),
        |(manifest, mutations, cut)| {
            let reply = HelloReply::Accepted(Box::new(manifest));
            let mut frame = wire::encode_handshake_frame(
                "hello reply",
                PROTOCOL_VERSION,
                &reply,
                limits::HELLO_REPLY,
            )
            .map_err(|error| TestCaseError::fail(error.to_string()))?;
            for (at, byte) in mutations {
                let at = at.index(frame.len());
                frame[at] ^= byte;
            }
            frame.truncate(frame.len() - cut.index(frame.len() / 4 + 1));
            decode_every_kind(&frame);
            Ok(())
        },
    );
}

#[test]
fn mutated_manifests_decode_or_fail_cleanly_default() {
    mutated_manifests_decode_or_fail_cleanly(DEFAULT_CASES);
}

#[test]
#[ignore = "stress: SURF_FUZZ_CASES cases"]
fn stress_mutated_manifests_decode_or_fail_cleanly() {
    mutated_manifests_decode_or_fail_cleanly(stress_cases());
}

/// Refusals travel whole too, so that a client can say why it was turned away.
#[test]
fn refusals_survive_the_round_trip() {
    let refusals = [
        Refusal::Unauthorized,
        Refusal::VersionMismatch { server_version: 7 },
        Refusal::DtypeUnavailable {
            requested: Dtype::F16,
            served: Dtype::F32,
        },
    ];
    for refusal in refusals {
        let reply = HelloReply::Refused(refusal);
        let decoded = block_on(round_trip("hello reply", &reply, limits::HELLO_REPLY));
        assert_eq!(decoded.ok(), Some(reply));
    }
}
