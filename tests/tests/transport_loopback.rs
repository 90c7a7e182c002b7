//! The whole MiniLM model over loopback QUIC: many clients at once, every
//! byte checked against the file.

mod transport_support;

use std::collections::BTreeSet;

use surf_transport::Error;
use transport_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_clients_each_fetch_the_whole_model_byte_for_byte() {
    let model = model_dir();
    let file = file_tensors(&model);
    let server = start_model_server().await;

    let mut clients = Vec::new();
    for _ in 0..16 {
        let file = file.clone();
        let config = client_config(&[&server]);
        clients.push(tokio::spawn(async move {
            let client = surf_transport::WeightClient::connect(config)
                .await
                .expect("the client connects");
            fetch_and_check_whole_model(&client, &file).await;
            client.close().await;
        }));
    }
    for client in clients {
        client.await.expect("every client finishes");
    }

    let stats = server.stats();
    let total = server.manifest().total_bytes();
    assert_eq!(stats.bytes_served, 16 * total);
    assert_eq!(stats.connections, 16);
    // However the requests interleave, each assembled component is loaded
    // from the file at most once.
    assert!(stats.cache_misses <= server.manifest().components.len() as u64);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_lists_every_weight_and_carries_the_small_files() {
    let model = model_dir();
    let file = file_tensors(&model);
    let server = start_model_server().await;
    let client = connect(&[&server]).await;
    let manifest = client.manifest();

    let listed: BTreeSet<_> = manifest
        .components
        .iter()
        .flat_map(|component| component.tensors.iter().map(|tensor| tensor.name.clone()))
        .chain(manifest.row_tables.iter().map(|table| table.name.clone()))
        .collect();
    let row_tables: Vec<_> = manifest
        .row_tables
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(row_tables, ["embeddings.word_embeddings.weight"]);
    let in_file: BTreeSet<_> = file
        .keys()
        .filter(|name| name.as_str() != "embeddings.position_ids")
        .cloned()
        .collect();
    assert_eq!(listed, in_file);

    let names: Vec<_> = manifest
        .components
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    let config: serde_json::Value =
        serde_json::from_slice(manifest.file("config.json").expect("config.json travels"))
            .expect("config.json parses");
    let layers = config["num_hidden_layers"].as_u64().expect("a layer count") as usize;
    let mut expected = vec!["embeddings".to_owned()];
    expected.extend((0..layers).map(|index| format!("encoder.layer.{index}")));
    expected.push("head".to_owned());
    assert_eq!(names, expected);
    assert_eq!(manifest.num_layers(), layers);

    for path in [
        "config.json",
        "tokenizer.json",
        "modules.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
    ] {
        let on_disk = std::fs::read(model.join(path)).expect("the file reads");
        assert_eq!(manifest.file(path), Some(on_disk.as_slice()), "{path}");
    }
    assert!(manifest.file("model.safetensors").is_none());
    client.close().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_tensors_and_ranges_come_from_the_right_place() {
    let model = model_dir();
    let file = file_tensors(&model);
    let server = start_model_server().await;
    let client = connect(&[&server]).await;

    let name = "encoder.layer.2.attention.self.query.weight";
    let tensor = client.fetch_tensor(name).await.expect("the tensor arrives");
    assert_eq!(&tensor[..], &file[name][..]);

    let range = client
        .fetch_unverified_range(surf_transport::ObjectRef::Tensor(name.to_owned()), 100..164)
        .await
        .expect("the range arrives");
    assert_eq!(&range[..], &file[name][100..164]);

    let unknown = client.fetch_component("encoder.layer.99").await;
    assert!(matches!(unknown, Err(Error::UnknownComponent { .. })));
    client.close().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_a_fetch_in_flight_finish() {
    let model = model_dir();
    let file = file_tensors(&model);
    let server = start_model_server().await;
    let client = connect(&[&server]).await;

    let fetch = tokio::spawn({
        let client = client.clone();
        async move { client.fetch_component("embeddings").await }
    });
    while server.stats().bytes_served == 0 {
        tokio::task::yield_now().await;
    }
    let manifest = server.manifest().clone();
    server.shutdown().await;
    let bytes = fetch
        .await
        .expect("the fetch task finishes")
        .expect("the fetch in flight completes");
    assert_component_matches_file(&manifest, "embeddings", &bytes, &file);
}
