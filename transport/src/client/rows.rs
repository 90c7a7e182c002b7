//! Rows of a row table (the word embeddings): the list of row hashes,
//! fetched once per table and checked against the manifest, then any set of
//! rows, each checked against its own hash as it arrives.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use tokio::sync::OnceCell;

use crate::Error;
use crate::manifest::{Digest, MAX_ROWS_PER_REQUEST, RowTable};
use crate::wire::ObjectRef;

use super::WeightClient;
use super::assembly::Verification;

/// One table's row hashes, fetched by the first caller; later ones wait on it.
type HashListCell = Arc<OnceCell<Arc<[Digest]>>>;

/// The row hashes of each table asked for so far; concurrent first uses of
/// one table share one fetch.
#[derive(Default)]
pub(super) struct RowHashLists {
    tables: Mutex<HashMap<String, HashListCell>>,
}

impl RowHashLists {
    fn cell(&self, table: &str) -> HashListCell {
        let mut tables = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(tables.entry(table.to_owned()).or_default())
    }
}

impl WeightClient {
    /// The manifest's row table `name`.
    pub fn row_table(&self, name: &str) -> Result<&RowTable, Error> {
        self.inner
            .manifest
            .row_table(name)
            .ok_or_else(|| Error::UnknownRowTable {
                name: name.to_owned(),
            })
    }

    /// The blake3 digest of every row of table `name`, in row order: fetched
    /// on the first call and checked against the manifest, kept after.
    pub async fn row_hashes(&self, name: &str) -> Result<Arc<[Digest]>, Error> {
        let table = self.row_table(name)?.clone();
        let cell = self.inner.row_hashes.cell(name);
        let list = cell
            .get_or_try_init(|| async {
                let len = table.hash_list_bytes();
                let verification = Verification {
                    segments: vec![(len, table.row_hashes)],
                    whole: None,
                };
                let bytes = self
                    .fetch_verified(ObjectRef::RowHashes(table.name.clone()), len, &verification)
                    .await?;
                let digests: Arc<[Digest]> = bytes
                    .chunks_exact(32)
                    .map(|word| {
                        let mut digest = [0u8; 32];
                        digest.copy_from_slice(word);
                        Digest(digest)
                    })
                    .collect();
                Ok::<_, Error>(digests)
            })
            .await?;
        Ok(Arc::clone(list))
    }

    /// Rows `rows` of table `name`, back to back in the order given, each
    /// checked against its hash; a damaged row is fetched again from the
    /// last good one. Sets of more than [`MAX_ROWS_PER_REQUEST`] rows go in
    /// several requests, one after another.
    pub async fn fetch_rows(&self, name: &str, rows: &[u32]) -> Result<Vec<u8>, Error> {
        let table = self.row_table(name)?.clone();
        if let Some(&row) = rows.iter().find(|&&row| u64::from(row) >= table.rows) {
            return Err(Error::RowOutOfRange {
                table: table.name.clone(),
                row,
                rows: table.rows,
            });
        }
        let hashes = self.row_hashes(name).await?;
        let row_bytes = table.row_bytes();
        let mut out = Vec::new();
        out.try_reserve_exact(rows.len() * row_bytes as usize)
            .map_err(|_| Error::OutOfMemory {
                object: format!("{} rows of {name}", rows.len()),
                len: rows.len() as u64 * row_bytes,
            })?;
        for group in rows.chunks(MAX_ROWS_PER_REQUEST) {
            let verification = Verification {
                segments: group
                    .iter()
                    .enumerate()
                    .map(|(i, &row)| ((i as u64 + 1) * row_bytes, hashes[row as usize]))
                    .collect(),
                whole: None,
            };
            let object = ObjectRef::Rows {
                table: table.name.clone(),
                rows: group.to_vec(),
            };
            let bytes: Bytes = self
                .fetch_verified(object, group.len() as u64 * row_bytes, &verification)
                .await?;
            out.extend_from_slice(&bytes);
        }
        Ok(out)
    }
}
