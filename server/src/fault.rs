//! Faults a test can make the server commit, to show that clients catch
//! damaged bytes and recover from servers that stop mid-stream. The hooks
//! exist only with the `fault-injection` feature; without it they compile to
//! nothing.

use bytes::Bytes;
use surf_transport::ObjectRef;

/// What to do with the next slice of a reply.
pub(crate) enum SliceAction {
    Send(Bytes),
    /// Send these bytes, then stop sending (as a hung server would).
    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    SendThenStall(Bytes),
}

#[cfg(feature = "fault-injection")]
pub use enabled::FaultPlan;

#[cfg(feature = "fault-injection")]
mod enabled {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex, PoisonError};

    use bytes::Bytes;
    use surf_transport::ObjectRef;
    use tokio::sync::Notify;

    use super::SliceAction;

    /// Faults to commit; clones share their state.
    #[derive(Clone, Default)]
    pub struct FaultPlan {
        inner: Arc<Inner>,
    }

    #[derive(Default)]
    struct Inner {
        corruptions: Mutex<Vec<Corruption>>,
        flipped: AtomicU64,
        /// Total weight bytes to send before every reply stalls; 0 = never.
        stall_after: AtomicU64,
        sent: AtomicU64,
        stalled: AtomicBool,
        stall_notify: Notify,
    }

    struct Corruption {
        component: String,
        offset: u64,
        remaining: u32,
    }

    impl FaultPlan {
        pub fn new() -> Self {
            FaultPlan::default()
        }

        /// Flips one bit of byte `offset` of `component` in the next `times`
        /// replies that carry it.
        pub fn corrupt(self, component: &str, offset: u64, times: u32) -> Self {
            self.inner
                .corruptions
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(Corruption {
                    component: component.to_owned(),
                    offset,
                    remaining: times,
                });
            self
        }

        /// Once the server has sent `bytes` weight bytes in all, it stops
        /// sending on every stream without closing anything.
        pub fn stall_after_bytes(self, bytes: u64) -> Self {
            self.inner.stall_after.store(bytes.max(1), Ordering::SeqCst);
            self
        }

        /// Bits flipped so far.
        pub fn bits_flipped(&self) -> u64 {
            self.inner.flipped.load(Ordering::SeqCst)
        }

        /// Resolves once the server has stalled.
        pub async fn stalled(&self) {
            loop {
                let notified = self.inner.stall_notify.notified();
                if self.inner.stalled.load(Ordering::SeqCst) {
                    return;
                }
                notified.await;
            }
        }

        pub(crate) fn apply(&self, object: &ObjectRef, offset: u64, slice: Bytes) -> SliceAction {
            let slice = self.corrupt_slice(object, offset, slice);
            let stall_after = self.inner.stall_after.load(Ordering::SeqCst);
            if stall_after == 0 {
                return SliceAction::Send(slice);
            }
            let len = slice.len() as u64;
            let sent_before = self.inner.sent.fetch_add(len, Ordering::SeqCst);
            if sent_before + len < stall_after {
                return SliceAction::Send(slice);
            }
            let allowed = stall_after.saturating_sub(sent_before) as usize;
            self.inner.stalled.store(true, Ordering::SeqCst);
            self.inner.stall_notify.notify_waiters();
            SliceAction::SendThenStall(slice.slice(..allowed.min(slice.len())))
        }

        fn corrupt_slice(&self, object: &ObjectRef, offset: u64, slice: Bytes) -> Bytes {
            let ObjectRef::Component(name) = object else {
                return slice;
            };
            let mut corruptions = self
                .inner
                .corruptions
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let end = offset + slice.len() as u64;
            let mut damaged: Option<Vec<u8>> = None;
            for corruption in corruptions.iter_mut() {
                let hit = corruption.remaining > 0
                    && corruption.component == *name
                    && (offset..end).contains(&corruption.offset);
                if hit {
                    let bytes = damaged.get_or_insert_with(|| slice.to_vec());
                    bytes[(corruption.offset - offset) as usize] ^= 0x10;
                    corruption.remaining -= 1;
                    self.inner.flipped.fetch_add(1, Ordering::SeqCst);
                }
            }
            damaged.map(Bytes::from).unwrap_or(slice)
        }
    }
}

/// Faults for a server to commit; the default commits none, and only builds
/// with the `fault-injection` feature can ask for any.
#[derive(Clone, Default)]
pub struct Faults {
    #[cfg(feature = "fault-injection")]
    pub(crate) plan: Option<FaultPlan>,
}

impl Faults {
    #[cfg_attr(not(feature = "fault-injection"), allow(unused_variables))]
    pub(crate) fn apply(&self, object: &ObjectRef, offset: u64, slice: Bytes) -> SliceAction {
        #[cfg(feature = "fault-injection")]
        if let Some(plan) = &self.plan {
            return plan.apply(object, offset, slice);
        }
        SliceAction::Send(slice)
    }
}
