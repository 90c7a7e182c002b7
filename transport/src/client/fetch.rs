//! One fetch: attempts on the servers' connections, each asking for the rest
//! of the object, until its bytes are whole and verified.

use bytes::Bytes;

use crate::Error;
use crate::error::Recovery;
use crate::wire::{self, FetchReply, FetchRequest, ObjectRef, limits};

use super::WeightClient;
use super::assembly::{Assembly, Verification};
use super::handshake::within;
use super::links::Link;

impl WeightClient {
    pub(super) async fn fetch_verified(
        &self,
        object: ObjectRef,
        byte_len: u64,
        verification: &Verification,
    ) -> Result<Bytes, Error> {
        let retry = self.inner.config.retry;
        let mut assembly = Assembly::new(object.to_string(), 0, byte_len, Some(verification))?;
        let mut failures_in_a_row = 0u32;
        loop {
            let verified_before = assembly.verified;
            let attempt = match self.link().await {
                Ok(link) => self
                    .fetch_once(&link, &object, &mut assembly)
                    .await
                    .and_then(|()| assembly.check_whole())
                    .map_err(|error| (Some(link), error)),
                Err(error) => Err((None, error)),
            };
            let (link, error) = match attempt {
                Ok(()) => return Ok(Bytes::from(std::mem::take(&mut assembly.data))),
                Err(failure) => failure,
            };
            let recovery = error.recovery();
            tracing::debug!(%object, %error, ?recovery, resume_at = assembly.received(), "fetch attempt failed");
            if recovery == Recovery::GiveUp {
                return Err(error);
            }
            if let (Recovery::FailOver, Some(link)) = (recovery, link) {
                self.abandon(&link).await;
            }
            if assembly.verified > verified_before {
                failures_in_a_row = 0;
            }
            failures_in_a_row += 1;
            if failures_in_a_row >= retry.max_attempts {
                return Err(Error::RetriesExhausted {
                    object: object.to_string(),
                    attempts: failures_in_a_row,
                    last: Box::new(error),
                });
            }
            tokio::time::sleep(retry.backoff(failures_in_a_row)).await;
        }
    }

    /// One request for the rest of `assembly`, on one stream.
    pub(super) async fn fetch_once(
        &self,
        link: &Link,
        object: &ObjectRef,
        assembly: &mut Assembly<'_>,
    ) -> Result<(), Error> {
        let response_timeout = self.inner.config.timeouts.response;
        let start = assembly.next_offset();
        let end = assembly.end;
        let (mut send, mut recv) = link.connection.open_bi().await?;
        let request = FetchRequest {
            object: object.clone(),
            start,
            end,
        };
        let frame = wire::encode_frame("fetch request", &request, limits::FETCH_REQUEST)?;
        wire::write_frame(&mut send, &frame, "sending a fetch request").await?;
        // The request is complete; a finished send side also tells the server
        // that nothing else will arrive on this stream.
        let _ = send.finish();

        let reply: FetchReply = within(
            response_timeout,
            "waiting for a fetch reply",
            wire::read_frame(&mut recv, "fetch reply", limits::FETCH_REPLY),
        )
        .await??;
        match reply {
            FetchReply::Data { len } if len == end - start => {}
            FetchReply::Data { len } => {
                return Err(Error::LengthMismatch {
                    object: object.to_string(),
                    announced: len,
                    expected: end - start,
                });
            }
            FetchReply::Refused(refusal) => {
                return Err(Error::FetchRefused {
                    object: object.to_string(),
                    refusal,
                });
            }
        }

        while let Some(chunk) = within(
            response_timeout,
            "waiting for weight bytes",
            recv.read_chunk(usize::MAX, true),
        )
        .await??
        {
            assembly.push(&chunk.bytes)?;
        }
        if assembly.next_offset() != end {
            return Err(Error::Truncated {
                object: object.to_string(),
                received: assembly.next_offset() - assembly.start,
                expected: end - assembly.start,
            });
        }
        Ok(())
    }
}
