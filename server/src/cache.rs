//! A byte-bounded LRU cache of component bytes in which concurrent misses on
//! the same component share one load.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use lru::LruCache;
use tokio::sync::OnceCell;

use crate::metrics::Stats;

pub struct ComponentCache {
    capacity_bytes: u64,
    state: Mutex<CacheState>,
    stats: Arc<Stats>,
}

struct CacheState {
    entries: LruCache<String, Bytes>,
    held_bytes: u64,
    /// Loads in progress; later requests for the same key wait on the cell.
    loading: HashMap<String, Arc<OnceCell<Bytes>>>,
}

impl ComponentCache {
    pub fn new(capacity_bytes: u64, stats: Arc<Stats>) -> Self {
        ComponentCache {
            capacity_bytes,
            state: Mutex::new(CacheState {
                entries: LruCache::unbounded(),
                held_bytes: 0,
                loading: HashMap::new(),
            }),
            stats,
        }
    }

    /// The cached bytes of `key`, or the result of `load`. While one load of
    /// a key is running, other callers for that key wait for it instead of
    /// loading again.
    pub async fn get_or_load<E, F, Fut>(&self, key: &str, load: F) -> Result<Bytes, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Bytes, E>>,
    {
        let cell = {
            let mut state = self.lock();
            if let Some(bytes) = state.entries.get(key) {
                self.stats.cache_hits.increment();
                return Ok(bytes.clone());
            }
            match state.loading.get(key) {
                Some(cell) => {
                    self.stats.cache_coalesced.increment();
                    cell.clone()
                }
                None => {
                    let cell = Arc::new(OnceCell::new());
                    state.loading.insert(key.to_owned(), cell.clone());
                    cell
                }
            }
        };
        let bytes = cell
            .get_or_try_init(|| {
                self.stats.cache_misses.increment();
                load()
            })
            .await;
        let mut state = self.lock();
        // Whoever gets here first retires the cell; the bytes move into the
        // cache under the same lock, so no caller can miss both.
        if state
            .loading
            .get(key)
            .is_some_and(|loading| Arc::ptr_eq(loading, &cell))
        {
            state.loading.remove(key);
            if let Ok(bytes) = &bytes {
                self.insert(&mut state, key, Bytes::clone(bytes));
            }
        }
        bytes.cloned()
    }

    fn insert(&self, state: &mut CacheState, key: &str, bytes: Bytes) {
        let len = bytes.len() as u64;
        if len > self.capacity_bytes {
            return;
        }
        while state.held_bytes + len > self.capacity_bytes {
            let Some((_, evicted)) = state.entries.pop_lru() else {
                break;
            };
            state.held_bytes -= evicted.len() as u64;
            self.stats.cache_evictions.increment();
        }
        if let Some(replaced) = state.entries.put(key.to_owned(), bytes) {
            state.held_bytes -= replaced.len() as u64;
        }
        state.held_bytes += len;
        self.stats.cache_bytes.set(state.held_bytes);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState> {
        // The state stays consistent at every await-free step, so a panic
        // elsewhere while holding the lock cannot leave it half-updated.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn bytes_of(len: usize) -> Bytes {
        Bytes::from(vec![7u8; len])
    }

    async fn load_ok(len: usize) -> Result<Bytes, ()> {
        Ok(bytes_of(len))
    }

    #[tokio::test]
    async fn least_recently_used_entry_is_evicted_to_stay_in_budget() {
        let stats = Arc::new(Stats::default());
        let cache = ComponentCache::new(250, stats.clone());
        for key in ["a", "b"] {
            cache
                .get_or_load(key, || load_ok(100))
                .await
                .expect("loads");
        }
        cache.get_or_load("a", || load_ok(100)).await.expect("hit");
        cache
            .get_or_load("c", || load_ok(100))
            .await
            .expect("loads");
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.cache_evictions, 1);
        assert_eq!(snapshot.cache_bytes, 200);
        assert_eq!(snapshot.cache_hits, 1);
        // "b" was the least recently used, so "a" is still cached.
        cache.get_or_load("a", || load_ok(100)).await.expect("hit");
        assert_eq!(stats.snapshot().cache_hits, 2);
        cache
            .get_or_load("b", || load_ok(100))
            .await
            .expect("reload");
        assert_eq!(stats.snapshot().cache_misses, 4);
    }

    #[tokio::test]
    async fn entries_larger_than_the_budget_are_served_but_not_kept() {
        let stats = Arc::new(Stats::default());
        let cache = ComponentCache::new(10, stats.clone());
        let bytes = cache
            .get_or_load("big", || load_ok(11))
            .await
            .expect("loads");
        assert_eq!(bytes.len(), 11);
        assert_eq!(stats.snapshot().cache_bytes, 0);
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_load() {
        let stats = Arc::new(Stats::default());
        let cache = Arc::new(ComponentCache::new(1000, stats.clone()));
        let loads = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(tokio::sync::Notify::new());

        let first = tokio::spawn({
            let (cache, loads, release) = (cache.clone(), loads.clone(), release.clone());
            async move {
                cache
                    .get_or_load("layer", || async move {
                        loads.fetch_add(1, Ordering::SeqCst);
                        release.notified().await;
                        Ok::<_, ()>(bytes_of(64))
                    })
                    .await
            }
        });
        while loads.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let second = tokio::spawn({
            let (cache, loads) = (cache.clone(), loads.clone());
            async move {
                cache
                    .get_or_load("layer", || async move {
                        loads.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, ()>(bytes_of(64))
                    })
                    .await
            }
        });
        while stats.snapshot().cache_coalesced == 0 {
            tokio::task::yield_now().await;
        }
        release.notify_one();
        let (first, second) = (first.await, second.await);
        assert_eq!(first.expect("joins").expect("loads").len(), 64);
        assert_eq!(second.expect("joins").expect("loads").len(), 64);
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert_eq!(stats.snapshot().cache_misses, 1);
    }

    #[tokio::test]
    async fn a_failed_load_is_not_cached() {
        let stats = Arc::new(Stats::default());
        let cache = ComponentCache::new(1000, stats.clone());
        let failed = cache
            .get_or_load("x", || async { Err::<Bytes, _>("disk") })
            .await;
        assert_eq!(failed, Err("disk"));
        let loaded = cache.get_or_load("x", || load_ok(3)).await;
        assert_eq!(loaded.map(|bytes| bytes.len()), Ok(3));
    }
}
