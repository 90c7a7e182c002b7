//! Helpers shared by the transport and server tests: the MiniLM model on
//! disk, servers on loopback, and clients that pin their certificates.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use surf_server::{RunningServer, ServerConfig, WeightServer};
use surf_transport::{ClientConfig, Manifest, RetryPolicy, Timeouts, WeightClient};

pub const LOOPBACK: &str = "127.0.0.1:0";

/// The MiniLM model folder; fails with a hint when it was not fetched.
pub fn model_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/models/all-MiniLM-L6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "the MiniLM model is missing at {}: run `bash assets/fetch-model.sh` first",
        dir.display()
    );
    dir
}

pub fn loopback() -> SocketAddr {
    LOOPBACK.parse().expect("a valid loopback address")
}

pub async fn start_server(config: ServerConfig) -> RunningServer {
    WeightServer::bind(config).await.expect("the server starts")
}

pub async fn start_model_server() -> RunningServer {
    start_server(ServerConfig::new(model_dir(), loopback())).await
}

/// Client settings that pin `servers`' certificates, with short timeouts so
/// that fault tests fail over quickly.
pub fn client_config(servers: &[&RunningServer]) -> ClientConfig {
    let mut config = ClientConfig::new(
        servers.iter().map(|server| server.local_addr()).collect(),
        servers
            .iter()
            .map(|server| server.certificate_der().clone())
            .collect(),
    );
    config.timeouts = Timeouts {
        connect: std::time::Duration::from_secs(5),
        response: std::time::Duration::from_secs(5),
        ..Timeouts::default()
    };
    config.retry = RetryPolicy {
        max_attempts: 6,
        initial_backoff: std::time::Duration::from_millis(10),
        max_backoff: std::time::Duration::from_millis(200),
    };
    config
}

pub async fn connect(servers: &[&RunningServer]) -> WeightClient {
    WeightClient::connect(client_config(servers))
        .await
        .expect("the client connects")
}

/// Every tensor of the model file by its name without a `bert.` prefix,
/// read with the safetensors crate, independently of the server.
pub fn file_tensors(model_dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let file = std::fs::read(model_dir.join("model.safetensors")).expect("the weights read");
    let tensors = safetensors::SafeTensors::deserialize(&file).expect("the weights parse");
    tensors
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let name = name.strip_prefix("bert.").unwrap_or(&name).to_owned();
            (name, view.data().to_vec())
        })
        .collect()
}

/// Checks each tensor of a fetched component against the file.
pub fn assert_component_matches_file(
    manifest: &Manifest,
    name: &str,
    bytes: &[u8],
    file: &BTreeMap<String, Vec<u8>>,
) {
    let component = manifest.component(name).expect("the component is listed");
    assert_eq!(bytes.len() as u64, component.byte_len, "length of {name}");
    for tensor in &component.tensors {
        let range = tensor.offset as usize..(tensor.offset + tensor.byte_len) as usize;
        let expected = file
            .get(&tensor.name)
            .unwrap_or_else(|| panic!("{} is not in the file", tensor.name));
        assert!(
            bytes[range] == expected[..],
            "bytes of {} in {name} differ from the file",
            tensor.name
        );
    }
}

/// Fetches every component and checks every byte against the file.
pub async fn fetch_and_check_whole_model(client: &WeightClient, file: &BTreeMap<String, Vec<u8>>) {
    let manifest = client.manifest();
    let fetches = manifest.components.iter().map(|component| {
        let client = client.clone();
        let name = component.name.clone();
        async move {
            let bytes = client
                .fetch_component(&name)
                .await
                .unwrap_or_else(|error| panic!("fetching {name} failed: {error}"));
            (name, bytes)
        }
    });
    let mut handles = Vec::new();
    for fetch in fetches {
        handles.push(tokio::spawn(fetch));
    }
    for handle in handles {
        let (name, bytes) = handle.await.expect("the fetch task finishes");
        assert_component_matches_file(manifest, &name, &bytes, file);
    }
}
