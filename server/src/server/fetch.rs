//! Serving one fetch stream: the request read and checked against the
//! manifest, the bytes found (mapped file, cache, Redis, origin) and sent in
//! slices.

use std::sync::Arc;

use bytes::Bytes;
use surf_transport::ObjectRef;
use surf_transport::manifest::MAX_ROWS_PER_REQUEST;
use surf_transport::wire::{self, FetchRefusal, FetchReply, FetchRequest, limits, stream_code};

use crate::fault::SliceAction;
use crate::redis_tier::Lookup;

use super::greeting::send_last_frame;
use super::{REPLY_SLICE, REQUEST_TIMEOUT, Served, Shared};

pub(super) async fn serve_fetch(
    connection: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    shared: &Arc<Shared>,
    served: &Arc<Served>,
) {
    shared.stats.requests.increment();
    let request = tokio::time::timeout(
        REQUEST_TIMEOUT,
        wire::read_frame::<FetchRequest, _>(&mut recv, "fetch request", limits::FETCH_REQUEST),
    )
    .await;
    let outcome = match request {
        Ok(Ok(request)) => match resolve(shared, served, &request).await {
            Ok(payload) => send_payload(&connection, &mut send, shared, &request, payload).await,
            Err(refusal) => Err(refusal),
        },
        Ok(Err(surf_transport::Error::MessageTooLarge { len, limit, .. })) => {
            Err(FetchRefusal::RequestTooLarge {
                len,
                limit: limit as u64,
            })
        }
        Ok(Err(surf_transport::Error::Malformed { source, .. })) => Err(FetchRefusal::Malformed {
            detail: source.to_string(),
        }),
        Ok(Err(error)) => {
            shared.stats.request_errors.increment();
            tracing::debug!(%error, "fetch stream ended before its request");
            return;
        }
        Err(_) => {
            shared.stats.request_errors.increment();
            let _ = send.reset(stream_code::CANCELLED.into());
            return;
        }
    };
    let Err(refusal) = outcome else {
        return;
    };
    shared.stats.request_errors.increment();
    tracing::debug!(%refusal, "fetch refused");
    let frame = wire::encode_frame(
        "fetch reply",
        &FetchReply::Refused(refusal),
        limits::FETCH_REPLY,
    );
    send_last_frame(&mut send, frame).await;
}

/// The requested bytes, or why they cannot be served.
async fn resolve(
    shared: &Arc<Shared>,
    served: &Arc<Served>,
    request: &FetchRequest,
) -> Result<Bytes, FetchRefusal> {
    let manifest = &served.manifest;
    let (component_name, object_range) = match &request.object {
        ObjectRef::Component(name) => {
            let component = manifest
                .component(name)
                .ok_or(FetchRefusal::UnknownObject)?;
            (component.name.as_str(), 0..component.byte_len)
        }
        ObjectRef::Tensor(name) => {
            let (component, tensor) = manifest.tensor(name).ok_or(FetchRefusal::UnknownObject)?;
            (component.name.as_str(), tensor.byte_range())
        }
        ObjectRef::RowHashes(table) => {
            let table = manifest
                .row_table(table)
                .ok_or(FetchRefusal::UnknownObject)?;
            check_range(request, table.hash_list_bytes())?;
            let hashes = served.origin.row_hashes(&table.name).await?;
            return Ok(hashes.slice(request.start as usize..request.end as usize));
        }
        ObjectRef::Rows { table, rows } => {
            let table = manifest
                .row_table(table)
                .ok_or(FetchRefusal::UnknownObject)?;
            if rows.len() > MAX_ROWS_PER_REQUEST {
                return Err(FetchRefusal::TooManyRows {
                    asked: rows.len() as u64,
                    limit: MAX_ROWS_PER_REQUEST as u64,
                });
            }
            if let Some(&row) = rows.iter().find(|&&row| u64::from(row) >= table.rows) {
                return Err(FetchRefusal::RowOutOfBounds {
                    row,
                    rows: table.rows,
                });
            }
            check_range(request, rows.len() as u64 * table.row_bytes())?;
            let bytes = served.origin.rows(&table.name, rows.clone()).await?;
            return Ok(bytes.slice(request.start as usize..request.end as usize));
        }
    };
    check_range(request, object_range.end - object_range.start)?;
    let component_bytes = component_bytes(shared, served, component_name).await?;
    let start = (object_range.start + request.start) as usize;
    let end = (object_range.start + request.end) as usize;
    Ok(component_bytes.slice(start..end))
}

/// Refuses a range that does not lie inside an object of `len` bytes.
fn check_range(request: &FetchRequest, len: u64) -> Result<(), FetchRefusal> {
    if request.start > request.end || request.end > len {
        return Err(FetchRefusal::RangeOutOfBounds {
            start: request.start,
            end: request.end,
            len,
        });
    }
    Ok(())
}

/// A component's bytes, looked up in order: the mapped model file, this
/// server's cache, the shared Redis tier, then the origin. Concurrent misses
/// on one component share one load, so the origin sees one fetch.
async fn component_bytes(
    shared: &Arc<Shared>,
    served: &Arc<Served>,
    name: &str,
) -> Result<Bytes, FetchRefusal> {
    if let Some(bytes) = served.origin.mapped_component(name) {
        return Ok(bytes);
    }
    shared
        .cache
        .get_or_load(&served.cache_key(name), || {
            load_component(shared, served, name)
        })
        .await
}

/// Bytes that this server's cache does not hold: from Redis when the tier
/// is worth asking, else from the origin, and then written to Redis in the
/// background, without delaying the reply.
async fn load_component(
    shared: &Arc<Shared>,
    served: &Arc<Served>,
    name: &str,
) -> Result<Bytes, FetchRefusal> {
    let shared_tier = shared
        .redis
        .as_ref()
        .filter(|_| served.origin.worth_sharing(name))
        .zip(served.manifest.component(name));
    if let Some((redis, component)) = shared_tier {
        let (revision, dtype) = (&served.manifest.revision, served.manifest.weight_dtype);
        if let Lookup::Hit(bytes) = redis.lookup(revision, dtype, component).await {
            return Ok(bytes);
        }
        let bytes = served.origin.load(name, &shared.stats).await?;
        redis.store_in_background(revision, dtype, component, bytes.clone());
        return Ok(bytes);
    }
    served.origin.load(name, &shared.stats).await
}

async fn send_payload(
    connection: &quinn::Connection,
    send: &mut quinn::SendStream,
    shared: &Shared,
    request: &FetchRequest,
    mut payload: Bytes,
) -> Result<(), FetchRefusal> {
    let header = FetchReply::Data {
        len: payload.len() as u64,
    };
    let frame =
        wire::encode_frame("fetch reply", &header, limits::FETCH_REPLY).map_err(|error| {
            FetchRefusal::Internal {
                detail: error.to_string(),
            }
        })?;
    let mut offset = request.start;
    let result: Result<(), quinn::WriteError> = async {
        send.write_all(&frame).await?;
        while !payload.is_empty() {
            let slice = payload.split_to(payload.len().min(REPLY_SLICE));
            let len = slice.len() as u64;
            match shared.faults.apply(&request.object, offset, slice) {
                SliceAction::Send(bytes) => send.write_chunk(bytes).await?,
                SliceAction::SendThenStall(bytes) => {
                    send.write_chunk(bytes).await?;
                    tracing::warn!("fault injection: stalling until the connection closes");
                    connection.closed().await;
                    return Err(quinn::WriteError::ConnectionLost(
                        quinn::ConnectionError::LocallyClosed,
                    ));
                }
            }
            shared.stats.bytes_served.add(len);
            if matches!(
                request.object,
                ObjectRef::Rows { .. } | ObjectRef::RowHashes(_)
            ) {
                shared.stats.row_bytes_served.add(len);
            }
            offset += len;
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => {
            let _ = send.finish();
            // Until the client has acknowledged the bytes, closing the
            // connection (at shutdown) would lose them.
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, send.stopped()).await;
        }
        Err(error) => {
            shared.stats.request_errors.increment();
            tracing::debug!(object = %request.object, %error, "client went away mid-stream");
        }
    }
    Ok(())
}
