//! The server layer every convoy service runs: authenticate, authorize against the RPC's
//! declared policy, rate-limit, then call the service with the caller in scope.
//!
//! In order, for a `/convoy.*` method (health and reflection pass untouched):
//! 1. The policy comes from the contract ([`crate::policy`]); a method without one is
//!    refused (PERMISSION_DENIED), so nothing new is open by omission.
//! 2. `authorization: Bearer <token>` is verified ([`Verifier`]): missing, malformed, badly
//!    signed or expired tokens get UNAUTHENTICATED with an `ErrorInfo` reason. A service
//!    acting for a user adds the user's token in [`SUBJECT_HEADER`]; it is verified too,
//!    and honoured only from a caller with the service role.
//! 3. The role is checked ([`Caller::may_call`]) and, for a fleet-scoped RPC, the fleet-wide
//!    grant ([`MethodPolicy::require_fleet_grant`]). A call whose team is known before its
//!    body is read (a fleet call, or a caller who reaches a single team) is charged now
//!    (step 5), so a team over its rate is refused before a byte of its body is buffered.
//! 4. Every team the request names in its policy's `team_fields` is read from the encoded
//!    request ([`crate::wire`]) before tonic decodes it: a team the caller does not reach
//!    gets PERMISSION_DENIED. The message is read into memory within a per-instance budget
//!    of bytes and a read timeout ([`crate::budget`]). Client streams are checked message by
//!    message as they arrive, each within the same budget and timeout.
//! 5. The team's bucket for the caller's role is charged ([`RateLimits`]); an empty one gets
//!    RESOURCE_EXHAUSTED with `google.rpc.RetryInfo` and `grpc-retry-pushback-ms`.
//! 6. The service runs with the [`Caller`] in the request's extensions and, for its own
//!    outgoing calls, the user's token in a task-local ([`forwarded_token`]), which convoy's
//!    clients send on as [`SUBJECT_HEADER`]. A streaming call also gets its
//!    [`StreamRights`] (which end when its tokens stop being valid) and, when it names a
//!    team, its [`StreamTeam`], for the server's stream layer (`convoy_mesh::streams`).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use convoy_proto::v1::TeamScope;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::Frame as BodyFrame;
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tonic::body::Body;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use tower::{BoxError, Layer, Service};

use crate::budget::{BodyBudget, MIN_RESERVATION, Reservation, too_large};
use crate::claims::{ALL_TEAMS, Caller, Claims, Role};
use crate::limit::RateLimits;
use crate::policy::{self, MethodPolicy};
use crate::rights::{StreamRights, StreamTeam};
use crate::verify::{TokenError, Verifier};
use crate::wire::{self, WireError};

/// The header a service puts its user's `authorization` value (`Bearer <token>`) in when it
/// calls on the user's behalf.
pub const SUBJECT_HEADER: &str = "x-convoy-subject";

/// `google.rpc.ErrorInfo.domain` of this layer's refusals.
pub const ERROR_DOMAIN: &str = "auth.convoy.dev";

/// The team key of calls that name no team (fleet RPCs), in rate limits.
const FLEET: &str = "_fleet";

tokio::task_local! {
    static FORWARD: Option<HeaderValue>;
}

/// The user the current call acts for (`Bearer <token>`), inside a call this layer let
/// through: what a client sends on as [`SUBJECT_HEADER`]. `None` outside calls, in tasks
/// spawned from them, and when the caller is a service acting on its own.
pub fn forwarded_token() -> Option<HeaderValue> {
    FORWARD.try_with(Clone::clone).ok().flatten()
}

/// Runs `future` as if inside a call acting for the bearer of `token` (`Bearer <token>`;
/// for work a service does on a user's behalf outside the call).
pub async fn with_forwarded_token<F: Future>(token: Option<HeaderValue>, future: F) -> F::Output {
    FORWARD.scope(token, future).await
}

/// What the layer needs; shared by every connection.
#[derive(Debug)]
pub struct Authorizer {
    verifier: Arc<Verifier>,
    limits: RateLimits,
    max_message_bytes: usize,
}

impl Authorizer {
    /// An authorizer verifying with `verifier`, limiting with `limits`, and buffering at most
    /// `max_message_bytes` of a unary request (the server's decoded message limit).
    pub fn new(verifier: Arc<Verifier>, limits: RateLimits, max_message_bytes: usize) -> Self {
        Self {
            verifier,
            limits,
            max_message_bytes,
        }
    }

    /// Reloads the keys (every [`Verifier::reload_interval`]) and forgets idle rate
    /// buckets (every minute) for as long as it runs: the server runs it beside itself.
    pub async fn maintain(self: Arc<Self>) {
        let keys = self.verifier.clone().watch();
        let buckets = async {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                self.limits.shrink();
            }
        };
        tokio::join!(keys, buckets);
    }

    /// The claims of the token in header `name`, if it is there. Both headers carry
    /// `Bearer <token>`: a service forwards its user's `authorization` value as it came.
    fn token(&self, headers: &HeaderMap, name: &str) -> Result<Option<Arc<Claims>>, Status> {
        let Some(token) = bearer(headers, name)? else {
            return Ok(None);
        };
        let claims = self
            .verifier
            .verify(token)
            .map_err(|e| unauthenticated(e.reason(), token_message(name, &e)))?;
        Ok(Some(claims))
    }

    /// Steps 2 and 3 up to the teams: who calls, and whether their role may call `policy`.
    fn authenticate(
        &self,
        headers: &HeaderMap,
        policy: &MethodPolicy,
    ) -> Result<(Caller, Option<HeaderValue>), Status> {
        let path = policy.path.as_str();
        let actor = self
            .token(headers, http::header::AUTHORIZATION.as_str())?
            .ok_or_else(|| {
                unauthenticated(
                    "TOKEN_MISSING",
                    "this call needs `authorization: Bearer <token>`",
                )
            })?;
        let subject = self.token(headers, SUBJECT_HEADER)?;
        if subject.is_some() && actor.role != Role::Service {
            return Err(denied(
                "NOT_A_SERVICE",
                format!("only services may send {SUBJECT_HEADER}"),
                path,
            ));
        }
        // The user's header value, forwarded as it came (a cheap clone of its bytes).
        let forward = if subject.is_some() {
            headers.get(SUBJECT_HEADER).cloned()
        } else if actor.role != Role::Service {
            headers.get(http::header::AUTHORIZATION).cloned()
        } else {
            None
        };
        let caller = Caller { actor, subject };
        if !caller.may_call(policy.role) {
            return Err(denied(
                "ROLE_INSUFFICIENT",
                format!(
                    "{path} needs the {} role; the caller is {}",
                    role_name(policy.role),
                    caller.acting().role.as_str()
                ),
                path,
            ));
        }
        policy
            .require_fleet_grant(&caller)
            .map_err(|m| denied("FLEET_GRANT_REQUIRED", m, path))?;
        Ok((caller, forward))
    }

    /// Step 3 for one message: every team it names must be reachable; returns the first.
    fn check_teams<'m>(
        &self,
        caller: &Caller,
        policy: &'static MethodPolicy,
        message: &'m [u8],
    ) -> Result<&'m str, Status> {
        let values = wire::team_values(message, policy).map_err(|e| match e {
            WireError::Malformed => Status::invalid_argument(e.to_string()),
            WireError::NotUtf8(field) => bad_request(&field, "must be UTF-8"),
        })?;
        let cache_key = policy.scope == TeamScope::CacheKey;
        let mut first = None;
        for (field, value) in values {
            let team = wire::team_of(field, value, cache_key).ok_or_else(|| {
                let expected = if cache_key {
                    "a cache key `{kind}:{team}:...` or a tag `team:{team}`"
                } else {
                    "a resource name `teams/{team}/...`"
                };
                bad_request(field, &format!("{value:?} is not {expected}"))
            })?;
            if !caller.reaches(team) {
                return Err(denied(
                    "TEAM_NOT_ALLOWED",
                    format!("the caller may not reach team {team:?}"),
                    &policy.path,
                ));
            }
            first.get_or_insert(team);
        }
        match first {
            Some(team) => Ok(team),
            None => {
                let field = &policy.team_fields[0].name;
                Err(bad_request(
                    field,
                    "required: it names the team this call is about",
                ))
            }
        }
    }

    /// The rights of a streaming call let in with `headers` as `caller`.
    fn rights(&self, headers: &HeaderMap, caller: &Caller) -> StreamRights {
        let mut tokens = Vec::with_capacity(2);
        for name in [http::header::AUTHORIZATION.as_str(), SUBJECT_HEADER] {
            // Both verified a moment ago.
            if let Ok(Some(token)) = bearer(headers, name) {
                tokens.push((name, Arc::from(token)));
            }
        }
        let exp = caller
            .subject
            .as_ref()
            .map_or(caller.actor.exp, |s| s.exp.min(caller.actor.exp));
        StreamRights::new(self.verifier.clone(), tokens, exp)
    }

    /// Step 3's early charge: charges the call now if its team is known before its body is
    /// read (fleet calls; callers reaching a single team, which is the only one their
    /// requests may name). Returns whether it did.
    fn precharge(&self, caller: &Caller, policy: &MethodPolicy) -> Result<bool, Status> {
        if matches!(policy.scope, TeamScope::Fleet | TeamScope::Unspecified) {
            self.charge(caller, FLEET)?;
            return Ok(true);
        }
        match caller.acting().teams.as_slice() {
            [team] if team != ALL_TEAMS && caller.actor.role != Role::Service => {
                self.charge(caller, team)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Step 5.
    fn charge(&self, caller: &Caller, team: &str) -> Result<(), Status> {
        if caller.actor.role == Role::Service {
            return Ok(());
        }
        self.limits
            .check(team, caller.acting().role)
            .map_err(|wait| rate_limited(team, wait))
    }
}

fn role_name(role: convoy_proto::v1::AccessRole) -> &'static str {
    use convoy_proto::v1::AccessRole;
    match role {
        AccessRole::Reader => "reader",
        AccessRole::Writer => "writer",
        AccessRole::Service => "service",
        AccessRole::Admin | AccessRole::Unspecified => "admin",
    }
}

/// The token in header `name` (`Bearer <token>`), if the header is there.
fn bearer<'h>(headers: &'h HeaderMap, name: &str) -> Result<Option<&'h str>, Status> {
    let Some(value) = headers.get(name) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| unauthenticated("TOKEN_INVALID", format!("{name} is not ASCII")))?;
    let token = text
        .strip_prefix("Bearer ")
        .or_else(|| text.strip_prefix("bearer "))
        .ok_or_else(|| {
            unauthenticated("TOKEN_INVALID", format!("{name} must be `Bearer <token>`"))
        })?
        .trim();
    Ok(Some(token))
}

fn token_message(header: &str, e: &TokenError) -> String {
    if header == SUBJECT_HEADER {
        format!("the forwarded token ({SUBJECT_HEADER}): {e}")
    } else {
        e.to_string()
    }
}

/// UNAUTHENTICATED with an `ErrorInfo` of this layer's domain, counted by reason.
pub(crate) fn unauthenticated(reason: &str, message: impl Into<String>) -> Status {
    metrics::counter!("convoy_auth_refused_total", "reason" => reason.to_owned()).increment(1);
    Status::with_error_details(
        Code::Unauthenticated,
        message,
        ErrorDetails::with_error_info(reason, ERROR_DOMAIN, HashMap::new()),
    )
}

fn denied(reason: &str, message: impl Into<String>, path: &str) -> Status {
    metrics::counter!("convoy_auth_refused_total", "reason" => reason.to_owned()).increment(1);
    Status::with_error_details(
        Code::PermissionDenied,
        message,
        ErrorDetails::with_error_info(
            reason,
            ERROR_DOMAIN,
            HashMap::from([("method".to_owned(), path.to_owned())]),
        ),
    )
}

fn bad_request(field: &str, description: &str) -> Status {
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{field}: {description}"),
        ErrorDetails::with_bad_request_violation(field, description),
    )
}

fn rate_limited(team: &str, wait: Duration) -> Status {
    metrics::counter!("convoy_auth_refused_total", "reason" => "RATE_LIMITED").increment(1);
    // Whole milliseconds, rounded up: a client waiting exactly this long finds a token.
    let wait = Duration::from_millis(
        u64::try_from(wait.as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1),
    );
    exhausted(
        format!(
            "team {team:?} is over its rate limit; retry in {} ms",
            wait.as_millis()
        ),
        &format!("teams/{team}"),
        "the team's request rate for this role is used up",
        wait,
    )
}

/// RESOURCE_EXHAUSTED for a quota on `subject`, with `google.rpc.QuotaFailure`,
/// `google.rpc.RetryInfo` and `grpc-retry-pushback-ms` telling the client when to retry.
pub fn exhausted(message: String, subject: &str, description: &str, retry: Duration) -> Status {
    let mut details = ErrorDetails::with_retry_info(Some(retry));
    details.add_quota_failure_violation(subject, description);
    let mut status = Status::with_error_details(Code::ResourceExhausted, message, details);
    if let Ok(value) = retry.as_millis().to_string().parse() {
        status
            .metadata_mut()
            .insert("grpc-retry-pushback-ms", value);
    }
    status
}

/// Applies [`Authorizer`] to a server. A server without authorization (`--no-auth`) leaves
/// the layer out (`tower::util::option_layer`), so its calls pay nothing for it.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    authorizer: Arc<Authorizer>,
    budget: BodyBudget,
}

impl AuthLayer {
    /// The layer, buffering within a budget of the default size
    /// ([`crate::BufferConfig::default`]).
    pub fn new(authorizer: Arc<Authorizer>) -> Self {
        Self {
            authorizer,
            budget: BodyBudget::default(),
        }
    }

    /// The layer buffering within `budget` (one per server: clones of it share it).
    pub fn with_budget(self, budget: BodyBudget) -> Self {
        Self { budget, ..self }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            authorizer: self.authorizer.clone(),
            budget: self.budget.clone(),
        }
    }
}

/// The service made by [`AuthLayer`].
#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    authorizer: Arc<Authorizer>,
    budget: BodyBudget,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> Service<Request<Body>> for AuthService<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        // The clone that was polled ready serves this call (tower's usual dance).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let authorizer = self.authorizer.clone();
        let budget = self.budget.clone();
        let path = request.uri().path();
        if !path.starts_with("/convoy.") {
            return Box::pin(async move { inner.call(request).await.map_err(Into::into) });
        }
        let Some(policy) = policy::policy(path) else {
            let status = denied(
                "NO_POLICY",
                format!("{path} declares no access policy"),
                path,
            );
            return Box::pin(async move { Ok(status.into_http()) });
        };
        Box::pin(async move {
            match authorize(&authorizer, &budget, policy, request).await {
                Ok((request, forward)) => FORWARD
                    .scope(forward, inner.call(request))
                    .await
                    .map_err(Into::into),
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

/// Steps 1-5; the request to pass on (its body rebuilt or wrapped) and the token to
/// forward.
async fn authorize(
    authorizer: &Arc<Authorizer>,
    budget: &BodyBudget,
    policy: &'static MethodPolicy,
    request: Request<Body>,
) -> Result<(Request<Body>, Option<HeaderValue>), Status> {
    let (caller, forward) = authorizer.authenticate(request.headers(), policy)?;
    let streaming = convoy_proto::methods::shape(&policy.path).is_streaming();
    let rights = streaming.then(|| authorizer.rights(request.headers(), &caller));
    let precharged = authorizer.precharge(&caller, policy)?;
    let (mut parts, body) = request.into_parts();
    let (body, team) = match policy.scope {
        TeamScope::Request | TeamScope::CacheKey if policy.client_streaming => {
            // The first message is checked before the service runs (so a refused stream is
            // refused whatever the service does with it), the rest as they arrive.
            let check = StreamCheck {
                authorizer: authorizer.clone(),
                caller: caller.clone(),
                policy,
                precharged,
                first_team: None,
            };
            let mut checked = Box::pin(CheckedStream::new(body, check, budget.clone()));
            match checked.as_mut().frame().await {
                Some(Ok(frame)) => checked.first = Some(frame),
                Some(Err(status)) => return Err(status),
                None => return Err(Status::invalid_argument("the stream holds no message")),
            }
            let team = checked.check.first_team.take();
            (Body::new(checked), team)
        }
        TeamScope::Request | TeamScope::CacheKey => {
            let buffered = budget
                .read_message(body, authorizer.max_message_bytes)
                .await?;
            let mut rest = buffered.bytes().clone();
            let frame = wire::next_frame(&mut rest)
                .ok_or_else(|| Status::invalid_argument("the request holds no complete message"))?;
            if frame.compressed {
                return Err(Status::unimplemented(
                    "compressed requests are not accepted",
                ));
            }
            let team = authorizer.check_teams(&caller, policy, &frame.message)?;
            if !precharged {
                authorizer.charge(&caller, team)?;
            }
            let team = streaming.then(|| Arc::from(team));
            (Body::new(buffered), team)
        }
        TeamScope::Fleet | TeamScope::Unspecified => (body, None),
    };
    if let Some(rights) = rights {
        parts.extensions.insert(rights);
    }
    if let Some(team) = team {
        parts.extensions.insert(StreamTeam(team));
    }
    parts.extensions.insert(caller);
    Ok((Request::from_parts(parts, body), forward))
}

/// What a checked stream checks each message with.
struct StreamCheck {
    authorizer: Arc<Authorizer>,
    caller: Caller,
    policy: &'static MethodPolicy,
    /// The first message's charge was paid before the body was read.
    precharged: bool,
    /// The team the first message named.
    first_team: Option<Arc<str>>,
}

impl StreamCheck {
    fn message(&mut self, frame: &wire::Frame) -> Result<(), Status> {
        if frame.compressed {
            return Err(Status::unimplemented(
                "compressed requests are not accepted",
            ));
        }
        let team = self
            .authorizer
            .check_teams(&self.caller, self.policy, &frame.message)?;
        if !std::mem::take(&mut self.precharged) {
            self.authorizer.charge(&self.caller, team)?;
        }
        if self.first_team.is_none() {
            self.first_team = Some(Arc::from(team));
        }
        Ok(())
    }
}

/// A reservation of the budget on its way.
type Reserving = Pin<Box<dyn Future<Output = Result<Reservation, Status>> + Send>>;

pin_project! {
    /// A client stream whose messages are checked as they pass; the first refused one ends
    /// the stream with its status (the service sees it as the stream's error). Each message
    /// holds its bytes in the budget while it is read, and must arrive within the read
    /// timeout (the first counted from the call's start, the others from their first
    /// bytes: the time between messages is the stream layer's to bound).
    struct CheckedStream {
        #[pin]
        inner: Body,
        buf: BytesMut,
        check: StreamCheck,
        budget: BodyBudget,
        // The bytes of the message being read.
        held: Option<Reservation>,
        reserving: Option<Reserving>,
        // When the message being read must be whole, while `reading`.
        timer: Pin<Box<Sleep>>,
        reading: bool,
        // A frame read (and checked) ahead, handed on first.
        first: Option<BodyFrame<Bytes>>,
        failed: bool,
    }
}

impl CheckedStream {
    fn new(inner: Body, check: StreamCheck, budget: BodyBudget) -> Self {
        let timer = Box::pin(tokio::time::sleep(budget.config().read_timeout));
        Self {
            inner,
            buf: BytesMut::new(),
            check,
            budget,
            held: None,
            reserving: None,
            timer,
            reading: true,
            first: None,
            failed: false,
        }
    }
}

impl http_body::Body for CheckedStream {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<BodyFrame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        if let Some(frame) = this.first.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if *this.failed {
            return Poll::Ready(None);
        }
        let max = this.check.authorizer.max_message_bytes;
        let mut fail = |status: Status| {
            *this.failed = true;
            Poll::Ready(Some(Err(status)))
        };
        loop {
            // Hand on the next message once it is whole, checked.
            let len = wire::frame_len(this.buf);
            if let Some(len) = len {
                if len > max {
                    return fail(too_large(max));
                }
                if this.buf.len() >= len + 5 {
                    let mut whole = this.buf.split_to(len + 5).freeze();
                    let out = whole.clone();
                    let frame = wire::next_frame(&mut whole).expect("a complete frame");
                    if let Err(status) = this.check.message(&frame) {
                        return fail(status);
                    }
                    *this.held = None;
                    *this.reading = !this.buf.is_empty();
                    if *this.reading {
                        let due = Instant::now() + this.budget.config().read_timeout;
                        this.timer.as_mut().reset(due);
                    }
                    return Poll::Ready(Some(Ok(BodyFrame::data(out))));
                }
            }
            // Hold the bytes of the message being read before reading more of it.
            if !this.buf.is_empty() {
                let need = len.map_or(MIN_RESERVATION.min(max + 5), |len| len + 5);
                let have = this.held.as_ref().map_or(0, Reservation::bytes);
                if need > have {
                    let reserving = this.reserving.get_or_insert_with(|| {
                        let budget = this.budget.clone();
                        Box::pin(async move { budget.reserve(need - have).await })
                    });
                    match reserving.as_mut().poll(cx) {
                        Poll::Ready(Ok(more)) => {
                            *this.reserving = None;
                            match this.held {
                                Some(held) => held.merge(more),
                                None => *this.held = Some(more),
                            }
                        }
                        Poll::Ready(Err(status)) => return fail(status),
                        Poll::Pending if this.timer.as_mut().poll(cx).is_ready() => {
                            return fail(this.budget.timed_out());
                        }
                        Poll::Pending => return Poll::Pending,
                    }
                }
            }
            match this.inner.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        if !*this.reading && !data.is_empty() {
                            *this.reading = true;
                            let due = Instant::now() + this.budget.config().read_timeout;
                            this.timer.as_mut().reset(due);
                        }
                        this.buf.extend_from_slice(&data);
                    }
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) if this.buf.is_empty() => return Poll::Ready(None),
                Poll::Ready(None) => {
                    return fail(Status::invalid_argument(
                        "the stream ended inside a message",
                    ));
                }
                Poll::Pending if *this.reading && this.timer.as_mut().poll(cx).is_ready() => {
                    return fail(this.budget.timed_out());
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::BufferConfig;
    use crate::limit::{Rate, RateLimitConfig};
    use crate::mint::{Signer, generate_key_pair};
    use convoy_proto::v1 as pb;
    use prost::Message;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tonic_types::StatusExt;

    const INGEST: &str = "/convoy.v1.IngestService/IngestEvents";
    const GET: &str = "/convoy.v1.ConversationService/GetConversation";
    const TIMEOUT: Duration = Duration::from_secs(10);

    struct Setup {
        _dir: tempfile::TempDir,
        signer: Signer,
        authorizer: Arc<Authorizer>,
        budget: BodyBudget,
    }

    fn setup(writer_rate: Option<Rate>) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let pair = generate_key_pair().unwrap();
        std::fs::write(dir.path().join("k1.pem"), &pair.public_pem).unwrap();
        let signer = Signer::from_pem("k1", pair.private_pem.as_bytes()).unwrap();
        let verifier = Arc::new(Verifier::from_dir(dir.path()).unwrap());
        let limits = RateLimits::new(RateLimitConfig {
            writer: writer_rate,
            ..RateLimitConfig::default()
        });
        Setup {
            _dir: dir,
            signer,
            authorizer: Arc::new(Authorizer::new(verifier, limits, 4 << 20)),
            budget: BodyBudget::new(BufferConfig {
                bytes: 1 << 20,
                read_timeout: TIMEOUT,
                wait: crate::budget::BUDGET_WAIT,
            }),
        }
    }

    /// A body fed chunk by chunk by the test, counting how often it is polled.
    struct Feed {
        chunks: tokio::sync::mpsc::Receiver<Bytes>,
        polls: Arc<AtomicUsize>,
    }

    impl http_body::Body for Feed {
        type Data = Bytes;
        type Error = Status;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<BodyFrame<Bytes>, Status>>> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            self.chunks
                .poll_recv(cx)
                .map(|c| c.map(|c| Ok(BodyFrame::data(c))))
        }
    }

    fn framed(message: &impl Message) -> Bytes {
        let encoded = message.encode_to_vec();
        let mut out = vec![0u8];
        out.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        out.extend_from_slice(&encoded);
        Bytes::from(out)
    }

    fn declaration(padding: usize) -> Bytes {
        framed(&pb::IngestEventsRequest {
            item: Some(pb::ingest_events_request::Item::Conversation(
                pb::IngestConversation {
                    name: "teams/acme/conversations/0190f0c6-0000-7000-8000-000000000001".into(),
                    title: "x".repeat(padding),
                    ..Default::default()
                },
            )),
        })
    }

    impl Setup {
        /// A request to `path` by a writer of acme, whose body the returned sender feeds.
        fn request(
            &self,
            path: &str,
        ) -> (
            Request<Body>,
            tokio::sync::mpsc::Sender<Bytes>,
            Arc<AtomicUsize>,
        ) {
            let token = self
                .signer
                .mint(
                    "t",
                    &["acme".into()],
                    Role::Writer,
                    Duration::from_secs(3600),
                )
                .unwrap();
            let (tx, chunks) = tokio::sync::mpsc::channel(16);
            let polls = Arc::new(AtomicUsize::new(0));
            let body = Body::new(Feed {
                chunks,
                polls: polls.clone(),
            });
            let request = Request::builder()
                .uri(path)
                .header("authorization", format!("Bearer {token}"))
                .body(body)
                .unwrap();
            (request, tx, polls)
        }

        async fn authorize(
            &self,
            path: &'static str,
            request: Request<Body>,
        ) -> Result<Request<Body>, Status> {
            let policy = policy::policy(path).unwrap();
            authorize(&self.authorizer, &self.budget, policy, request)
                .await
                .map(|(request, _)| request)
        }
    }

    async fn next(body: &mut Body) -> Option<Result<BodyFrame<Bytes>, Status>> {
        body.frame().await
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_stream_s_first_message_must_arrive_within_the_read_timeout() {
        let setup = setup(None);
        let (request, tx, _) = setup.request(INGEST);
        let whole = declaration(10);
        tx.send(whole.slice(..8)).await.unwrap();
        let started = tokio::time::Instant::now();
        let cut = setup.authorize(INGEST, request).await.unwrap_err();
        assert_eq!(started.elapsed(), TIMEOUT);
        assert_eq!(cut.code(), Code::DeadlineExceeded);
        assert_eq!(
            cut.get_error_details().error_info().unwrap().reason,
            "BODY_TIMEOUT"
        );
        assert_eq!(setup.budget.in_use(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_message_holds_its_bytes_while_it_arrives_and_is_cut_if_it_trickles() {
        let setup = setup(None);
        let (request, tx, _) = setup.request(INGEST);
        tx.send(declaration(10)).await.unwrap();
        let request = setup.authorize(INGEST, request).await.unwrap();
        assert!(request.extensions().get::<StreamRights>().is_some());
        assert_eq!(
            request.extensions().get::<StreamTeam>(),
            Some(&StreamTeam(Arc::from("acme")))
        );
        let mut body = request.into_body();
        assert!(next(&mut body).await.unwrap().unwrap().is_data());
        assert_eq!(setup.budget.in_use(), 0, "handed on: released");

        // A quiet minute between messages is not the read timeout's business.
        tokio::time::sleep(Duration::from_secs(60)).await;
        let big = declaration(100_000);
        tx.send(big.slice(..50_000)).await.unwrap();
        let reading = tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            (next(&mut body).await, started.elapsed())
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            setup.budget.in_use(),
            big.len(),
            "its whole size, from its header"
        );
        let (cut, waited) = reading.await.unwrap();
        assert_eq!(waited, TIMEOUT, "counted from its first bytes");
        let cut = cut.unwrap().unwrap_err();
        assert_eq!(cut.code(), Code::DeadlineExceeded);
        assert_eq!(setup.budget.in_use(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_single_team_caller_over_its_rate_is_refused_before_its_body_is_read() {
        let setup = setup(Some("1/h".parse().unwrap()));
        let (request, tx, _) = setup.request(GET);
        let get = framed(&pb::GetConversationRequest {
            name: "teams/acme/conversations/0190f0c6-0000-7000-8000-000000000001".into(),
        });
        tx.send(get.clone()).await.unwrap();
        drop(tx);
        setup.authorize(GET, request).await.unwrap();
        let (request, _tx, polls) = setup.request(GET);
        let refused = setup.authorize(GET, request).await.unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert_eq!(polls.load(Ordering::Relaxed), 0, "not a byte was read");
    }
}
