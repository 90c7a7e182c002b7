//! The word table of a model streamed from a weight server, read by rows:
//! each batch asks the server, in one request, for the rows its tokens use
//! that are not cached yet, and keeps them in a cache bounded in bytes. So a
//! client never holds the whole table (2.5 GB for Qwen3-Embedding-8B in f32)
//! and starts without downloading it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use lru::LruCache;
use surf_transport::manifest::RowTable;
use surf_transport::{Dtype, WeightClient};

use crate::error::{Error, Result};
use crate::source::drive;

/// What the row cache holds by default: 64 MiB, 4,096 rows of width 4096 in
/// f32 or 8,192 in f16, more than the distinct tokens of most batches.
pub const DEFAULT_ROW_CACHE_BYTES: u64 = 64 << 20;

/// Rows by id, least recently used given up first, at most `capacity`
/// bytes of rows in all.
pub struct RowCache {
    rows: LruCache<u32, Box<[u8]>>,
    held: u64,
    capacity: u64,
}

impl RowCache {
    pub fn new(capacity: u64) -> Self {
        Self {
            rows: LruCache::unbounded(),
            held: 0,
            capacity,
        }
    }

    pub fn contains(&self, row: u32) -> bool {
        self.rows.contains(&row)
    }

    /// The row's bytes, marked as just used.
    pub fn get(&mut self, row: u32) -> Option<&[u8]> {
        self.rows.get(&row).map(|bytes| &**bytes)
    }

    /// Keeps `bytes` as row `row`, giving up the least recently used rows
    /// while the cache would hold more than its capacity; a row larger
    /// than the whole capacity is not kept.
    pub fn insert(&mut self, row: u32, bytes: &[u8]) {
        let len = bytes.len() as u64;
        if len > self.capacity || self.rows.contains(&row) {
            return;
        }
        while self.held + len > self.capacity {
            let Some((_, old)) = self.rows.pop_lru() else {
                break;
            };
            self.held -= old.len() as u64;
        }
        self.held += len;
        self.rows.put(row, bytes.into());
    }

    /// Bytes of rows held.
    pub fn held_bytes(&self) -> u64 {
        self.held
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// A row table of a weight server, its rows fetched on demand.
pub(crate) struct RemoteRows {
    client: WeightClient,
    runtime: tokio::runtime::Handle,
    table: RowTable,
    origin: PathBuf,
    cache: Mutex<RowCache>,
    received: AtomicU64,
}

impl RemoteRows {
    pub(crate) fn new(
        client: WeightClient,
        runtime: tokio::runtime::Handle,
        table: RowTable,
        origin: PathBuf,
        cache_bytes: u64,
    ) -> Self {
        Self {
            client,
            runtime,
            table,
            origin,
            cache: Mutex::new(RowCache::new(cache_bytes)),
            received: AtomicU64::new(0),
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.table.name
    }

    /// Bytes of rows received from the server so far.
    pub(crate) fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Appends rows `ids` as f32, fetching the missing ones in one request.
    pub(crate) fn gather(&self, shape: &[usize], ids: &[u32], out: &mut Vec<f32>) -> Result<()> {
        let (rows, width) = (self.table.rows, self.table.width);
        if shape != [rows as usize, width as usize] {
            return Err(Error::WrongShape {
                path: self.origin.clone(),
                tensor: self.table.name.clone(),
                expected: shape.to_vec(),
                actual: vec![rows as usize, width as usize],
            });
        }
        if let Some(bad) = ids.iter().find(|&&id| u64::from(id) >= rows) {
            return Err(Error::InvalidInput(format!(
                "token id {bad} is outside the {rows} rows of `{}`",
                self.table.name
            )));
        }
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut missing: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&id| !cache.contains(id))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        let fetched = if missing.is_empty() {
            Vec::new()
        } else {
            self.fetch(&missing)?
        };
        let row_bytes = self.table.row_bytes() as usize;
        let fresh: HashMap<u32, &[u8]> = missing
            .iter()
            .copied()
            .zip(fetched.chunks_exact(row_bytes))
            .collect();
        out.reserve(ids.len() * width as usize);
        for &id in ids {
            // Rows of this batch come from what it fetched, so that caching
            // them cannot push out a row the batch still needs.
            let row = match fresh.get(&id) {
                Some(&row) => row,
                None => cache.get(id).ok_or_else(|| {
                    Error::WeightSource(format!("row {id} left the cache while in use"))
                })?,
            };
            decode_row(self.table.dtype, row, out);
        }
        for (&id, row) in &fresh {
            cache.insert(id, row);
        }
        Ok(())
    }

    fn fetch(&self, rows: &[u32]) -> Result<Vec<u8>> {
        let client = self.client.clone();
        let table = self.table.name.clone();
        let wanted = rows.to_vec();
        let bytes = drive(&self.runtime, async move {
            client.fetch_rows(&table, &wanted).await
        })?
        .map_err(|source| Error::Fetch {
            component: format!("{} rows of {}", rows.len(), self.table.name),
            source,
        })?;
        self.received
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(bytes)
    }
}

/// Appends one row, served as f32 or f16, as f32.
fn decode_row(dtype: Dtype, row: &[u8], out: &mut Vec<f32>) {
    match dtype {
        Dtype::F16 => out.extend(
            row.chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        Dtype::BF16 => out.extend(
            row.chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        _ => out.extend(
            row.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_gives_up_the_least_recently_used_rows_to_stay_within_its_bytes() {
        let mut cache = RowCache::new(3 * 8);
        for row in 0..3u32 {
            cache.insert(row, &[row as u8; 8]);
        }
        assert_eq!(cache.held_bytes(), 24);
        // Row 0 used again: row 1 is now the least recently used.
        assert_eq!(cache.get(0), Some(&[0u8; 8][..]));
        cache.insert(3, &[3; 8]);
        assert!(!cache.contains(1));
        assert!(cache.contains(0) && cache.contains(2) && cache.contains(3));
        assert_eq!(cache.held_bytes(), 24);
        assert_eq!(cache.len(), 3);
    }

    #[test]
    fn a_row_larger_than_the_cache_is_not_kept_and_evicts_nothing() {
        let mut cache = RowCache::new(8);
        cache.insert(1, &[1; 8]);
        cache.insert(2, &[2; 16]);
        assert!(cache.contains(1));
        assert!(!cache.contains(2));
        let mut none = RowCache::new(0);
        none.insert(0, &[0; 4]);
        assert!(none.is_empty());
        assert_eq!(none.held_bytes(), 0);
    }

    #[test]
    fn rows_decode_by_value_in_each_served_dtype() {
        let values = [1.5f32, -0.25, 3.0];
        let mut out = Vec::new();
        let f32_row: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        decode_row(Dtype::F32, &f32_row, &mut out);
        let f16_row: Vec<u8> = values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        decode_row(Dtype::F16, &f16_row, &mut out);
        assert_eq!(out, [values, values].concat());
    }
}
