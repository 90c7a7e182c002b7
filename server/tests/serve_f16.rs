//! Weights served as f16: the manifest of an f16 server describes half the
//! bytes of an f32 one, the bytes it sends are the checkpoint's values
//! converted (never reinterpreted), and a client asking for the dtype a
//! server does not serve is told so with a typed error.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::SafeTensors;
use surf_server::{RunningServer, ServerConfig, WeightServer};
use surf_transport::{ClientConfig, Dtype, Error, Manifest, WeightClient};

fn model_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/models/all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "the MiniLM model is missing at {}: run `bash assets/fetch-model.sh` first",
        dir.display()
    );
    dir
}

async fn serve(dir: &Path, weight_dtype: Dtype) -> RunningServer {
    let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
    WeightServer::bind(ServerConfig {
        weight_dtype,
        ..ServerConfig::new(dir, loopback)
    })
    .await
    .expect("the server starts")
}

fn client_config(servers: &[&RunningServer], weight_dtype: Dtype) -> ClientConfig {
    ClientConfig {
        weight_dtype,
        ..ClientConfig::new(
            servers.iter().map(|server| server.local_addr()).collect(),
            servers
                .iter()
                .map(|server| server.certificate_der().clone())
                .collect(),
        )
    }
}

async fn connect(servers: &[&RunningServer], weight_dtype: Dtype) -> WeightClient {
    WeightClient::connect(client_config(servers, weight_dtype))
        .await
        .expect("the client connects")
}

/// The values of a float tensor of the checkpoint, widened to f32.
fn file_values(file: &SafeTensors<'_>, name: &str) -> Option<Vec<f32>> {
    let view = file
        .tensor(name)
        .or_else(|_| file.tensor(&format!("bert.{name}")))
        .unwrap_or_else(|_| panic!("{name} is in the checkpoint"));
    let data = view.data();
    let values = match view.dtype() {
        safetensors::Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        safetensors::Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        safetensors::Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    };
    Some(values)
}

/// What a server of `served` weights must send for `name`: float values
/// converted one by one with `half`, other tensors as stored.
fn expected_bytes(file: &SafeTensors<'_>, name: &str, served: Dtype) -> Vec<u8> {
    match (file_values(file, name), served) {
        (Some(values), Dtype::F16) => values
            .iter()
            .flat_map(|&value| f16::from_f32(value).to_le_bytes())
            .collect(),
        (Some(values), _) => values
            .iter()
            .flat_map(|value| value.to_le_bytes())
            .collect(),
        (None, _) => file
            .tensor(name)
            .or_else(|_| file.tensor(&format!("bert.{name}")))
            .expect("in the checkpoint")
            .data()
            .to_vec(),
    }
}

/// Fetches `component` and checks it against its manifest hashes and
/// against the checkpoint's values converted to the manifest's dtype.
async fn assert_component_is_the_converted_checkpoint(
    client: &WeightClient,
    component: &str,
    file: &SafeTensors<'_>,
) {
    let manifest = client.manifest();
    let entry = manifest.component(component).expect("in the manifest");
    let bytes = client
        .fetch_component(component)
        .await
        .expect("the component arrives");
    assert_eq!(bytes.len() as u64, entry.byte_len);
    assert!(entry.hash.matches(&blake3::hash(&bytes)), "{component}");
    for tensor in &entry.tensors {
        let range = tensor.byte_range();
        let sent = &bytes[range.start as usize..range.end as usize];
        assert!(tensor.hash.matches(&blake3::hash(sent)), "{}", tensor.name);
        let expected = expected_bytes(file, &tensor.name, manifest.weight_dtype);
        assert!(
            sent == expected.as_slice(),
            "{} differs from the checkpoint converted to {}",
            tensor.name,
            manifest.weight_dtype
        );
    }
}

/// Bytes of the float tensors and of the others.
fn float_and_other_bytes(manifest: &Manifest) -> (u64, u64) {
    let tensors = manifest
        .components
        .iter()
        .flat_map(|component| &component.tensors);
    tensors.fold((0, 0), |(float, other), tensor| {
        if tensor.dtype.is_float() {
            (float + tensor.byte_len, other)
        } else {
            (float, other + tensor.byte_len)
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_f16_server_sends_half_the_bytes_converted_from_the_checkpoint() {
    let dir = model_dir();
    let f32_server = serve(&dir, Dtype::F32).await;
    let f16_server = serve(&dir, Dtype::F16).await;
    let f32_client = connect(&[&f32_server], Dtype::F32).await;
    let f16_client = connect(&[&f16_server], Dtype::F16).await;
    let (wide, narrow) = (f32_client.manifest(), f16_client.manifest());

    assert_eq!(wide.weight_dtype, Dtype::F32);
    assert_eq!(narrow.weight_dtype, Dtype::F16);
    assert_ne!(
        wide.revision, narrow.revision,
        "other bytes, other revision"
    );
    narrow.validate().expect("the f16 manifest is consistent");
    assert_eq!(wide.components.len(), narrow.components.len());
    for (wide_component, narrow_component) in wide.components.iter().zip(&narrow.components) {
        assert_eq!(wide_component.name, narrow_component.name);
        assert_eq!(wide_component.tensors.len(), narrow_component.tensors.len());
        for (wide_tensor, narrow_tensor) in
            wide_component.tensors.iter().zip(&narrow_component.tensors)
        {
            assert_eq!(wide_tensor.name, narrow_tensor.name);
            assert_eq!(wide_tensor.shape, narrow_tensor.shape);
            if wide_tensor.dtype.is_float() {
                assert_eq!(wide_tensor.dtype, Dtype::F32, "{}", wide_tensor.name);
                assert_eq!(narrow_tensor.dtype, Dtype::F16, "{}", narrow_tensor.name);
                assert_eq!(wide_tensor.byte_len, 2 * narrow_tensor.byte_len);
            } else {
                assert_eq!(wide_tensor, narrow_tensor);
            }
        }
    }
    let (wide_float, wide_other) = float_and_other_bytes(wide);
    let (narrow_float, narrow_other) = float_and_other_bytes(narrow);
    assert!(narrow_float > 0);
    assert_eq!(wide_float, 2 * narrow_float);
    assert_eq!(wide_other, narrow_other);
    assert_eq!(
        wide.total_bytes() - wide_other,
        2 * (narrow.total_bytes() - narrow_other)
    );

    let checkpoint = std::fs::read(dir.join("model.safetensors")).expect("the checkpoint reads");
    let file = SafeTensors::deserialize(&checkpoint).expect("the checkpoint parses");
    assert_component_is_the_converted_checkpoint(&f16_client, "encoder.layer.0", &file).await;
    assert_component_is_the_converted_checkpoint(&f32_client, "encoder.layer.0", &file).await;

    // A tensor alone is the same bytes as within its component.
    let (component, tensor) = narrow
        .tensor("encoder.layer.0.attention.self.query.weight")
        .expect("a query weight");
    assert_eq!(component.name, "encoder.layer.0");
    let alone = f16_client
        .fetch_tensor(&tensor.name)
        .await
        .expect("the tensor arrives");
    assert_eq!(
        alone.as_ref(),
        expected_bytes(&file, &tensor.name, Dtype::F16).as_slice()
    );

    // The converted component was made once and then served from the cache.
    let stats = f16_server.stats();
    assert_eq!(stats.cache_misses, 1, "{stats:?}");
    assert!(stats.cache_hits >= 1, "{stats:?}");

    f32_client.close().await;
    f16_client.close().await;
    f32_server.shutdown().await;
    f16_server.shutdown().await;
}

/// Little-endian bytes of `values` as bf16.
fn bf16_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|&value| bf16::from_f32(value).to_le_bytes())
        .collect()
}

fn tensor_view<'a>(
    dtype: safetensors::Dtype,
    shape: &[usize],
    data: &'a [u8],
) -> safetensors::tensor::TensorView<'a> {
    safetensors::tensor::TensorView::new(dtype, shape.to_vec(), data).expect("a consistent tensor")
}

/// A two-layer BERT-shaped checkpoint, mostly bf16, with an f32, an f16 and
/// an i64 tensor, and values that f16 must round or cannot hold.
fn write_bf16_model(dir: &Path) {
    use safetensors::Dtype as St;
    let word = bf16_bytes(&[1.5, -0.333, 1.0e5, -1.0e5, 3.0e-6, 0.0, 7.25, -2.0]);
    let dense = bf16_bytes(&[0.1, 0.2, 0.3, -0.4]);
    let norm: Vec<u8> = [0.5f32, 1.0e-9]
        .iter()
        .flat_map(|value| value.to_le_bytes())
        .collect();
    let bias: Vec<u8> = [f16::from_f32(0.25), f16::from_f32(-3.0)]
        .iter()
        .flat_map(|value| value.to_le_bytes())
        .collect();
    let ids: Vec<u8> = [3i64, -1].iter().flat_map(|id| id.to_le_bytes()).collect();
    let pooler = bf16_bytes(&[9.0, -9.0]);
    let tensors = vec![
        (
            "bert.embeddings.word_embeddings.weight",
            tensor_view(St::BF16, &[4, 2], &word),
        ),
        ("bert.embeddings.type_ids", tensor_view(St::I64, &[2], &ids)),
        (
            "bert.encoder.layer.0.attention.output.dense.weight",
            tensor_view(St::BF16, &[2, 2], &dense),
        ),
        (
            "bert.encoder.layer.0.output.LayerNorm.bias",
            tensor_view(St::F32, &[2], &norm),
        ),
        (
            "bert.encoder.layer.1.output.dense.bias",
            tensor_view(St::F16, &[2], &bias),
        ),
        (
            "bert.pooler.dense.bias",
            tensor_view(St::BF16, &[2], &pooler),
        ),
    ];
    safetensors::tensor::serialize_to_file(tensors, None, &dir.join("model.safetensors"))
        .expect("the checkpoint is written");
    // The server groups tensors by the family the config names; it checks
    // no shapes, which the engine does when it loads the model.
    let config = br#"{"model_type": "bert", "vocab_size": 4, "hidden_size": 4,
        "num_hidden_layers": 2, "num_attention_heads": 1, "intermediate_size": 4,
        "max_position_embeddings": 4}"#;
    std::fs::write(dir.join("config.json"), config).expect("a config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bf16_checkpoint_is_served_converted_by_value() {
    let folder = tempfile::tempdir().expect("a temp dir");
    write_bf16_model(folder.path());
    let checkpoint =
        std::fs::read(folder.path().join("model.safetensors")).expect("the checkpoint reads");
    let file = SafeTensors::deserialize(&checkpoint).expect("the checkpoint parses");

    for served in [Dtype::F16, Dtype::F32] {
        let server = serve(folder.path(), served).await;
        let client = connect(&[&server], served).await;
        let manifest = client.manifest();
        assert_eq!(manifest.weight_dtype, served);
        for component in &manifest.components {
            for tensor in &component.tensors {
                let expected = if tensor.name.ends_with("type_ids") {
                    Dtype::I64
                } else {
                    served
                };
                assert_eq!(tensor.dtype, expected, "{}", tensor.name);
            }
        }
        for component in ["embeddings", "encoder.layer.0", "encoder.layer.1", "head"] {
            assert_component_is_the_converted_checkpoint(&client, component, &file).await;
        }
        client.close().await;
        server.shutdown().await;
    }

    // The values f16 cannot hold, and the bits that reinterpreting would give.
    let server = serve(folder.path(), Dtype::F16).await;
    let client = connect(&[&server], Dtype::F16).await;
    // The word table ([4, 2]) is served by rows: the first three hold the
    // values checked.
    let word = client
        .fetch_rows("embeddings.word_embeddings.weight", &[0, 1, 2])
        .await
        .expect("the row arrives");
    let values: Vec<f16> = word
        .chunks_exact(2)
        .map(|b| f16::from_le_bytes([b[0], b[1]]))
        .collect();
    assert_eq!(values[0], f16::from_f32(1.5));
    assert_ne!(
        values[0].to_bits(),
        bf16::from_f32(1.5).to_bits(),
        "bf16 bits are not f16 bits"
    );
    assert_eq!(values[2], f16::INFINITY);
    assert_eq!(values[3], f16::NEG_INFINITY);
    assert_eq!(values[4], f16::from_f32(bf16::from_f32(3.0e-6).to_f32()));
    client.close().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_asking_for_another_dtype_gets_a_typed_refusal_or_fails_over() {
    let folder = tempfile::tempdir().expect("a temp dir");
    write_bf16_model(folder.path());
    let f16_server = serve(folder.path(), Dtype::F16).await;
    let f32_server = serve(folder.path(), Dtype::F32).await;

    let error = WeightClient::connect(client_config(&[&f16_server], Dtype::F32))
        .await
        .err()
        .expect("an f16 server refuses an f32 client");
    match &error {
        Error::DtypeUnavailable {
            addr,
            requested,
            served,
        } => {
            assert_eq!(*addr, f16_server.local_addr());
            assert_eq!((*requested, *served), (Dtype::F32, Dtype::F16));
        }
        other => panic!("expected DtypeUnavailable, got {other:?}"),
    }
    assert!(error.is_bad_input());
    let message = error.to_string();
    assert!(
        message.contains("serves f16 weights, not f32") && message.contains("--dtype f32"),
        "{message}"
    );
    assert_eq!(f16_server.stats().connections_refused, 1);

    // Every server of the list refusing still gives the dtype error.
    let both = client_config(&[&f32_server, &f32_server], Dtype::F16);
    let error = WeightClient::connect(both)
        .await
        .err()
        .expect("no server serves f16");
    assert!(
        matches!(
            error,
            Error::DtypeUnavailable {
                requested: Dtype::F16,
                served: Dtype::F32,
                ..
            }
        ),
        "{error:?}"
    );

    // A server further down the list that serves the dtype is used.
    let client = connect(&[&f16_server, &f32_server], Dtype::F32).await;
    assert_eq!(client.current_server().await, Some(f32_server.local_addr()));
    assert_eq!(client.manifest().weight_dtype, Dtype::F32);
    client
        .fetch_component("head")
        .await
        .expect("the pooler arrives from the f32 server");
    client.close().await;
    f16_server.shutdown().await;
    f32_server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_f32_and_f16_can_be_served() {
    let folder = tempfile::tempdir().expect("a temp dir");
    write_bf16_model(folder.path());
    let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
    let error = WeightServer::bind(ServerConfig {
        weight_dtype: Dtype::BF16,
        ..ServerConfig::new(folder.path(), loopback)
    })
    .await
    .err()
    .expect("bf16 is not served");
    assert!(
        matches!(
            error,
            surf_server::Error::UnservableDtype { dtype: Dtype::BF16 }
        ),
        "{error}"
    );
    assert!(error.is_bad_input());
}
