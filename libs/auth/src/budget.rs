//! The bytes the authorization layer may hold, and how long it waits for them.
//!
//! To find the teams a request names before tonic decodes it, the layer reads the request's
//! message into memory ([`crate::layer`]). Without a bound, every caller with a valid token
//! could make the instance hold a message of up to the server's message limit per call (4
//! MiB, more than a thousand at a time), and a body sent a byte at a time would hold its
//! bytes for ever. So:
//!
//! - Every message buffered holds its size in a per-instance budget of bytes
//!   ([`BodyBudget`], `--auth-buffer-mib`, default [`DEFAULT_AUTH_BUFFER_MIB`]) until it is
//!   handed to the service: [`MIN_RESERVATION`] as soon as its first bytes arrive, its whole
//!   size once its gRPC frame header says what that is. A call that cannot get its bytes
//!   waits at most [`BUDGET_WAIT`], then is refused RESOURCE_EXHAUSTED with `RetryInfo`.
//!   Since each read holds at least [`MIN_RESERVATION`], the budget also bounds how many
//!   bodies are read at once.
//! - A message must arrive whole within the read timeout (`--auth-read-timeout-ms`, default
//!   [`DEFAULT_AUTH_READ_TIMEOUT_MS`]), counted from the call's start for the first message
//!   and from a message's first bytes for later ones of a client stream: a body that
//!   trickles ends DEADLINE_EXCEEDED with the `ErrorInfo` reason `BODY_TIMEOUT`.
//!
//! Not here: the time between the messages of a client stream (the stream layer's idle
//! timeout, `convoy_mesh::streams`), and the decoded message (tonic's, bounded by its
//! message limit and by the bulkhead or the stream limits).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tonic::body::Body;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::layer::{ERROR_DOMAIN, exhausted};
use crate::wire;

/// `--auth-buffer-mib`'s default: 64 MiB, sixteen messages at tonic's default 4 MiB limit
/// (or 4,096 small ones, each holding [`MIN_RESERVATION`]), a small share of an instance's
/// memory.
pub const DEFAULT_AUTH_BUFFER_MIB: u64 = 64;

/// `--auth-read-timeout-ms`'s default: 10 s. A 4 MiB message arrives in well under a second
/// on any network a fleet runs on; a client slower than 400 KiB/s is not sending in earnest.
pub const DEFAULT_AUTH_READ_TIMEOUT_MS: u64 = 10_000;

/// Longest a call waits for its bytes when the budget is spent: 250 ms, long enough to ride
/// out a burst of large messages, short enough that a waiting call costs little.
pub const BUDGET_WAIT: Duration = Duration::from_millis(250);

/// What a message holds from its first bytes until its frame header gives its size: 16 KiB,
/// HTTP/2's default largest frame, the most one read of the body hands over.
pub const MIN_RESERVATION: usize = 16 << 10;

/// How the budget is sized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufferConfig {
    /// Bytes of messages held at once, across every call.
    pub bytes: usize,
    /// Longest a message may take to arrive.
    pub read_timeout: Duration,
    /// Longest a call waits for its bytes.
    pub wait: Duration,
}

impl Default for BufferConfig {
    fn default() -> Self {
        Self {
            bytes: (DEFAULT_AUTH_BUFFER_MIB as usize) << 20,
            read_timeout: Duration::from_millis(DEFAULT_AUTH_READ_TIMEOUT_MS),
            wait: BUDGET_WAIT,
        }
    }
}

/// The budget's flags, with `CONVOY_*` environment fallbacks.
#[derive(Clone, Debug, clap::Args)]
pub struct BufferArgs {
    /// Bytes of request messages the authorization layer holds at once, across every call,
    /// in MiB (1 to 4095); a call that cannot get its bytes within 250 ms is refused
    /// RESOURCE_EXHAUSTED. Must exceed the largest message the server accepts.
    #[arg(long, env = "CONVOY_AUTH_BUFFER_MIB", default_value_t = DEFAULT_AUTH_BUFFER_MIB,
          value_parser = clap::value_parser!(u64).range(1..4096))]
    pub auth_buffer_mib: u64,
    /// Longest a request message may take to arrive, in milliseconds; a slower one ends the
    /// call with DEADLINE_EXCEEDED.
    #[arg(long, env = "CONVOY_AUTH_READ_TIMEOUT_MS", default_value_t = DEFAULT_AUTH_READ_TIMEOUT_MS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub auth_read_timeout_ms: u64,
}

impl BufferArgs {
    /// The budget these flags ask for.
    pub fn config(&self) -> BufferConfig {
        BufferConfig {
            bytes: usize::try_from(self.auth_buffer_mib << 20).unwrap_or(usize::MAX),
            read_timeout: Duration::from_millis(self.auth_read_timeout_ms),
            wait: BUDGET_WAIT,
        }
    }
}

/// One instance's budget; clones share it.
#[derive(Clone, Debug)]
pub struct BodyBudget {
    bytes: Arc<Semaphore>,
    config: BufferConfig,
}

impl Default for BodyBudget {
    fn default() -> Self {
        Self::new(BufferConfig::default())
    }
}

impl BodyBudget {
    /// A budget sized by `config`.
    pub fn new(config: BufferConfig) -> Self {
        let bytes = config.bytes.min(Semaphore::MAX_PERMITS);
        Self {
            bytes: Arc::new(Semaphore::new(bytes)),
            config: BufferConfig { bytes, ..config },
        }
    }

    /// Its configuration.
    pub fn config(&self) -> BufferConfig {
        self.config
    }

    /// Bytes held now.
    pub fn in_use(&self) -> usize {
        self.config.bytes - self.bytes.available_permits()
    }

    /// `bytes` more of the budget, waiting at most [`BufferConfig::wait`] for them.
    pub(crate) async fn reserve(&self, bytes: usize) -> Result<Reservation, Status> {
        let n = u32::try_from(bytes)
            .ok()
            .filter(|_| bytes <= self.config.bytes)
            .ok_or_else(|| {
                Status::resource_exhausted(format!(
                    "a message of {bytes} bytes is larger than this server's whole \
                     authorization buffer ({} bytes)",
                    self.config.bytes
                ))
            })?;
        let permit = match self.bytes.clone().try_acquire_many_owned(n) {
            Ok(permit) => permit,
            Err(_) => {
                let wait = self.config.wait;
                match tokio::time::timeout(wait, self.bytes.clone().acquire_many_owned(n)).await {
                    Ok(Ok(permit)) => permit,
                    // The semaphore is never closed: only the wait can fail.
                    _ => return Err(self.refusal()),
                }
            }
        };
        metrics::gauge!("convoy_auth_buffered_bytes").increment(bytes as f64);
        Ok(Reservation { permit })
    }

    fn refusal(&self) -> Status {
        metrics::counter!("convoy_auth_refused_total", "reason" => "BUFFER_FULL").increment(1);
        exhausted(
            format!(
                "this server holds {} MiB of request messages for authorization, all in use; \
                 retry in {} ms",
                self.config.bytes >> 20,
                self.config.wait.as_millis()
            ),
            "instance",
            "the bytes of request messages held at once for authorization are used up",
            self.config.wait,
        )
    }

    /// The status of a message that took longer than the read timeout.
    pub(crate) fn timed_out(&self) -> Status {
        metrics::counter!("convoy_auth_refused_total", "reason" => "BODY_TIMEOUT").increment(1);
        Status::with_error_details(
            Code::DeadlineExceeded,
            format!(
                "a request message did not arrive whole within {} ms; send each message \
                 at once",
                self.config.read_timeout.as_millis()
            ),
            ErrorDetails::with_error_info(
                "BODY_TIMEOUT",
                ERROR_DOMAIN,
                std::collections::HashMap::new(),
            ),
        )
    }

    /// `future`'s output, if it comes before `deadline`, the read timeout's end.
    async fn within<T>(
        &self,
        deadline: Instant,
        future: impl Future<Output = T>,
    ) -> Result<T, Status> {
        tokio::time::timeout_at(deadline, future)
            .await
            .map_err(|_| self.timed_out())
    }

    /// Reads the one message of a request whose client does not stream, holding its bytes
    /// in the budget, within the read timeout; refuses a larger message than `max` bytes
    /// and a body holding more than one message.
    pub(crate) async fn read_message(&self, body: Body, max: usize) -> Result<Buffered, Status> {
        let deadline = Instant::now() + self.config.read_timeout;
        let mut held = self
            .within(deadline, self.reserve(MIN_RESERVATION.min(max + 5)))
            .await??;
        let mut body = std::pin::pin!(body);
        let mut buf = BytesMut::new();
        while let Some(frame) = self.within(deadline, body.frame()).await? {
            let frame = frame?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            let Some(len) = wire::frame_len(&buf) else {
                continue;
            };
            if len > max {
                return Err(too_large(max));
            }
            let whole = len + 5;
            if buf.len() > whole {
                return Err(Status::invalid_argument(
                    "the request holds more than one message",
                ));
            }
            if whole > held.bytes() {
                let more = self.reserve(whole - held.bytes());
                held.merge(self.within(deadline, more).await??);
                buf.reserve(whole - buf.len());
            }
        }
        Ok(Buffered {
            data: Some(buf.freeze()),
            held: Some(held),
        })
    }
}

/// The status of a message over the server's limit.
pub(crate) fn too_large(max: usize) -> Status {
    Status::resource_exhausted(format!("a request message is larger than {max} bytes"))
}

/// Bytes held in a [`BodyBudget`] until dropped.
#[derive(Debug)]
pub(crate) struct Reservation {
    permit: OwnedSemaphorePermit,
}

impl Reservation {
    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.permit.num_permits()
    }

    /// Holds `other`'s bytes too.
    pub(crate) fn merge(&mut self, mut other: Reservation) {
        if let Some(bytes) = other.permit.split(other.bytes()) {
            self.permit.merge(bytes);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        metrics::gauge!("convoy_auth_buffered_bytes").decrement(self.bytes() as f64);
    }
}

/// A request message read whole, passed on to the service; it holds its bytes in the
/// budget until the service takes them.
#[derive(Debug)]
pub(crate) struct Buffered {
    data: Option<Bytes>,
    held: Option<Reservation>,
}

impl Buffered {
    /// The bytes read (the whole body).
    pub(crate) fn bytes(&self) -> &Bytes {
        self.data.as_ref().expect("not yet handed on")
    }
}

impl http_body::Body for Buffered {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let data = self.data.take();
        self.held = None;
        Poll::Ready(data.map(|data| Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(message: &[u8]) -> Bytes {
        let mut out = vec![0u8];
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(message);
        Bytes::from(out)
    }

    fn budget(bytes: usize) -> BodyBudget {
        BodyBudget::new(BufferConfig {
            bytes,
            read_timeout: Duration::from_secs(10),
            wait: BUDGET_WAIT,
        })
    }

    /// A body sending `chunks`, each after `gap`.
    fn trickle(chunks: Vec<Bytes>, gap: Duration) -> Body {
        Body::new(Trickle {
            chunks: chunks.into(),
            gap,
            sleep: Box::pin(tokio::time::sleep(gap)),
        })
    }

    struct Trickle {
        chunks: std::collections::VecDeque<Bytes>,
        gap: Duration,
        sleep: Pin<Box<tokio::time::Sleep>>,
    }

    impl http_body::Body for Trickle {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            if self.chunks.is_empty() {
                return Poll::Ready(None);
            }
            std::task::ready!(self.sleep.as_mut().poll(cx));
            let next = Instant::now() + self.gap;
            self.sleep.as_mut().reset(next);
            Poll::Ready(self.chunks.pop_front().map(|c| Ok(Frame::data(c))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_holds_its_size_in_the_budget_until_the_service_takes_it() {
        let budget = budget(1 << 20);
        let message = framed(&[7u8; 100_000]);
        let mut read = budget
            .read_message(trickle(vec![message.clone()], Duration::ZERO), 4 << 20)
            .await
            .unwrap();
        assert_eq!(read.bytes(), &message);
        assert_eq!(budget.in_use(), message.len());
        let got = read.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(got, message);
        assert_eq!(budget.in_use(), 0, "released once handed on");
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_cannot_get_its_bytes_waits_briefly_then_is_refused_with_retry_info() {
        let budget = budget(256 << 10);
        let big = framed(&[1u8; 200 << 10]);
        let held = budget
            .read_message(trickle(vec![big.clone()], Duration::ZERO), 4 << 20)
            .await
            .unwrap();
        let started = Instant::now();
        let refused = budget
            .read_message(trickle(vec![big.clone()], Duration::ZERO), 4 << 20)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert_eq!(
            started.elapsed(),
            BUDGET_WAIT,
            "waited briefly, then refused"
        );
        let details = refused.get_error_details();
        assert_eq!(details.retry_info().unwrap().retry_delay, Some(BUDGET_WAIT));
        assert_eq!(
            details.quota_failure().unwrap().violations[0].subject,
            "instance"
        );
        assert_eq!(budget.in_use(), big.len(), "the refused call holds nothing");

        // Freed a moment into the wait: the waiting call gets its bytes.
        let waiting = tokio::spawn({
            let budget = budget.clone();
            let big = big.clone();
            async move {
                budget
                    .read_message(trickle(vec![big], Duration::ZERO), 4 << 20)
                    .await
                    .map(|_| ())
            }
        });
        tokio::time::sleep(BUDGET_WAIT / 2).await;
        drop(held);
        waiting.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickling_body_is_cut_at_the_read_timeout_and_releases_its_bytes() {
        let budget = budget(1 << 20);
        let message = framed(&[3u8; 1000]);
        // A byte a second: 1005 s for the whole message.
        let chunks: Vec<Bytes> = (0..message.len()).map(|i| message.slice(i..=i)).collect();
        let started = Instant::now();
        let cut = budget
            .read_message(trickle(chunks, Duration::from_secs(1)), 4 << 20)
            .await
            .unwrap_err();
        assert_eq!(cut.code(), Code::DeadlineExceeded);
        assert_eq!(
            cut.get_error_details().error_info().unwrap().reason,
            "BODY_TIMEOUT"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        assert_eq!(budget.in_use(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn oversized_and_doubled_messages_are_refused_before_they_are_read_whole() {
        let budget = budget(1 << 20);
        // A header announcing 5 MiB, then data that never comes.
        let mut header = vec![0u8];
        header.extend_from_slice(&(5u32 << 20).to_be_bytes());
        let refused = budget
            .read_message(trickle(vec![Bytes::from(header)], Duration::ZERO), 4 << 20)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        let two = [framed(b"a"), framed(b"b")].concat();
        let refused = budget
            .read_message(trickle(vec![Bytes::from(two)], Duration::ZERO), 4 << 20)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert_eq!(budget.in_use(), 0);
    }
}
