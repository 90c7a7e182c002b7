//! One fetch: attempts on the servers' connections, each asking for the rest
//! of the object, until its bytes are whole and verified.

use std::time::Instant;

use bytes::Bytes;

use crate::Error;
use crate::retry::{AttemptFailure, Decision, FetchRetry, GiveUp, NextServer};
use crate::wire::{self, FetchReply, FetchRequest, ObjectRef, limits};

use super::WeightClient;
use super::assembly::{Assembly, Verification};
use super::handshake::within;
use super::links::Link;

impl WeightClient {
    /// Drives one fetch: each attempt runs until it fails or the fetch's
    /// deadline passes, and [`FetchRetry`] decides what follows.
    pub(super) async fn fetch_verified(
        &self,
        object: ObjectRef,
        byte_len: u64,
        verification: &Verification,
    ) -> Result<Bytes, Error> {
        let mut assembly = Assembly::new(object.to_string(), 0, byte_len, Some(verification))?;
        let mut retry = FetchRetry::new(
            self.inner.config.retry,
            Instant::now(),
            self.inner.config.timeouts.fetch,
        );
        loop {
            let mut link = None;
            let attempt = self.attempt(&object, &mut assembly, &mut link);
            let outcome = tokio::time::timeout_at(retry.deadline().into(), attempt).await;
            let (decision, error) = match outcome {
                Ok(Ok(())) => return Ok(Bytes::from(std::mem::take(&mut assembly.data))),
                Ok(Err(error)) => {
                    let failure = AttemptFailure {
                        recovery: error.recovery(),
                        received: assembly.next_offset(),
                        verified: assembly.verified,
                        damaged: matches!(error, Error::HashMismatch { .. }),
                    };
                    (retry.attempt_failed(Instant::now(), failure), Some(error))
                }
                Err(_elapsed) => (retry.deadline_passed(), None),
            };
            tracing::debug!(%object, error = ?error, ?decision, "fetch attempt failed");
            match (decision, error) {
                (
                    Decision::Retry {
                        after,
                        next_server,
                        resume_at,
                    },
                    _,
                ) => {
                    if let (NextServer::FailOver, Some(link)) = (next_server, &link) {
                        self.abandon(link).await;
                    }
                    assembly.resume_from(resume_at);
                    tokio::time::sleep(after).await;
                }
                (Decision::GiveUp(GiveUp::Final), Some(error)) => return Err(error),
                (Decision::GiveUp(GiveUp::RetriesExhausted { attempts }), Some(error)) => {
                    return Err(Error::RetriesExhausted {
                        object: object.to_string(),
                        attempts,
                        last: Box::new(error),
                    });
                }
                (Decision::GiveUp(_), _) => {
                    return Err(self.deadline_error(&object, link.as_ref(), &assembly));
                }
            }
        }
    }

    /// One attempt: a connection, then the rest of the object on it. The
    /// link it uses is left in `link`, where the deadline cannot take it.
    async fn attempt(
        &self,
        object: &ObjectRef,
        assembly: &mut Assembly<'_>,
        link: &mut Option<Link>,
    ) -> Result<(), Error> {
        let current = link.insert(self.link().await?).clone();
        self.fetch_once(&current, object, assembly).await?;
        assembly.check_whole()
    }

    pub(super) fn deadline_error(
        &self,
        object: &ObjectRef,
        link: Option<&Link>,
        assembly: &Assembly<'_>,
    ) -> Error {
        Error::FetchDeadline {
            object: object.to_string(),
            server: link.map(|link| self.inner.config.servers[link.server]),
            timeout: self.inner.config.timeouts.fetch,
            received: assembly.next_offset() - assembly.start,
            expected: assembly.end - assembly.start,
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
