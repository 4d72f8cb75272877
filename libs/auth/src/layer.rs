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
//!    grant ([`MethodPolicy::require_fleet_grant`]); then every team the request names in its
//!    policy's `team_fields`, read from the encoded request ([`crate::wire`]) before tonic
//!    decodes it: a team the caller does not reach gets PERMISSION_DENIED. Client streams
//!    are checked message by message as they arrive.
//! 4. The team's bucket for the caller's role is charged ([`RateLimits`]); an empty one gets
//!    RESOURCE_EXHAUSTED with `google.rpc.RetryInfo` and `grpc-retry-pushback-ms`.
//! 5. The service runs with the [`Caller`] in the request's extensions and, for its own
//!    outgoing calls, the user's token in a task-local ([`forwarded_token`]), which convoy's
//!    clients send on as [`SUBJECT_HEADER`].

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use convoy_proto::v1::TeamScope;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::Frame as BodyFrame;
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use tonic::body::Body;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};
use tower::{BoxError, Layer, Service};

use crate::claims::{Caller, Claims, Role};
use crate::limit::RateLimits;
use crate::policy::{self, MethodPolicy};
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

    /// Step 4.
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

fn token_message(header: &str, e: &TokenError) -> String {
    if header == SUBJECT_HEADER {
        format!("the forwarded token ({SUBJECT_HEADER}): {e}")
    } else {
        e.to_string()
    }
}

fn unauthenticated(reason: &str, message: impl Into<String>) -> Status {
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
    let mut details = ErrorDetails::with_retry_info(Some(wait));
    details.add_quota_failure_violation(
        format!("teams/{team}"),
        "the team's request rate for this role is used up",
    );
    let mut status = Status::with_error_details(
        Code::ResourceExhausted,
        format!(
            "team {team:?} is over its rate limit; retry in {} ms",
            wait.as_millis()
        ),
        details,
    );
    if let Ok(value) = wait.as_millis().to_string().parse() {
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
}

impl AuthLayer {
    /// The layer.
    pub fn new(authorizer: Arc<Authorizer>) -> Self {
        Self { authorizer }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            authorizer: self.authorizer.clone(),
        }
    }
}

/// The service made by [`AuthLayer`].
#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    authorizer: Arc<Authorizer>,
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
            match authorize(&authorizer, policy, request).await {
                Ok((request, forward)) => FORWARD
                    .scope(forward, inner.call(request))
                    .await
                    .map_err(Into::into),
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

/// Steps 1-4; the request to pass on (its body rebuilt or wrapped) and the token to
/// forward.
async fn authorize(
    authorizer: &Arc<Authorizer>,
    policy: &'static MethodPolicy,
    request: Request<Body>,
) -> Result<(Request<Body>, Option<HeaderValue>), Status> {
    let (caller, forward) = authorizer.authenticate(request.headers(), policy)?;
    let (mut parts, body) = request.into_parts();
    let body = match policy.scope {
        TeamScope::Request | TeamScope::CacheKey if policy.client_streaming => {
            // The first message is checked before the service runs (so a refused stream is
            // refused whatever the service does with it), the rest as they arrive.
            let mut checked = Box::pin(CheckedStream {
                inner: body,
                buf: BytesMut::new(),
                check: StreamCheck {
                    authorizer: authorizer.clone(),
                    caller: caller.clone(),
                    policy,
                },
                first: None,
                failed: false,
            });
            match checked.as_mut().frame().await {
                Some(Ok(frame)) => checked.first = Some(frame),
                Some(Err(status)) => return Err(status),
                None => return Err(Status::invalid_argument("the stream holds no message")),
            }
            Body::new(checked)
        }
        TeamScope::Request | TeamScope::CacheKey => {
            let bytes = http_body_util::Limited::new(body, authorizer.max_message_bytes + 5)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        Status::resource_exhausted(format!(
                            "the request is larger than {} bytes",
                            authorizer.max_message_bytes
                        ))
                    } else {
                        Status::from_error(e)
                    }
                })?
                .to_bytes();
            let mut rest = bytes.clone();
            let frame = wire::next_frame(&mut rest)
                .ok_or_else(|| Status::invalid_argument("the request holds no complete message"))?;
            if frame.compressed {
                return Err(Status::unimplemented(
                    "compressed requests are not accepted",
                ));
            }
            let team = authorizer.check_teams(&caller, policy, &frame.message)?;
            authorizer.charge(&caller, team)?;
            Body::new(http_body_util::Full::new(bytes))
        }
        TeamScope::Fleet | TeamScope::Unspecified => {
            authorizer.charge(&caller, FLEET)?;
            body
        }
    };
    parts.extensions.insert(caller);
    Ok((Request::from_parts(parts, body), forward))
}

/// What a checked stream checks each message with.
struct StreamCheck {
    authorizer: Arc<Authorizer>,
    caller: Caller,
    policy: &'static MethodPolicy,
}

impl StreamCheck {
    fn message(&self, frame: &wire::Frame) -> Result<(), Status> {
        if frame.compressed {
            return Err(Status::unimplemented(
                "compressed requests are not accepted",
            ));
        }
        let team = self
            .authorizer
            .check_teams(&self.caller, self.policy, &frame.message)?;
        self.authorizer.charge(&self.caller, team)
    }
}

pin_project! {
    /// A client stream whose messages are checked as they pass; the first refused one ends
    /// the stream with its status (the service sees it as the stream's error).
    struct CheckedStream {
        #[pin]
        inner: Body,
        buf: BytesMut,
        check: StreamCheck,
        // A frame read (and checked) ahead, handed on first.
        first: Option<BodyFrame<Bytes>>,
        failed: bool,
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
        loop {
            // Hand on every complete message held, checked.
            if let Some(len) = wire::frame_len(this.buf) {
                if len > this.check.authorizer.max_message_bytes {
                    *this.failed = true;
                    return Poll::Ready(Some(Err(Status::resource_exhausted(format!(
                        "a message is larger than {} bytes",
                        this.check.authorizer.max_message_bytes
                    )))));
                }
                if this.buf.len() >= len + 5 {
                    let mut whole = this.buf.split_to(len + 5).freeze();
                    let out = whole.clone();
                    let frame = wire::next_frame(&mut whole).expect("a complete frame");
                    if let Err(status) = this.check.message(&frame) {
                        *this.failed = true;
                        return Poll::Ready(Some(Err(status)));
                    }
                    return Poll::Ready(Some(Ok(BodyFrame::data(out))));
                }
            }
            match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.buf.extend_from_slice(&data),
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None if this.buf.is_empty() => return Poll::Ready(None),
                None => {
                    *this.failed = true;
                    return Poll::Ready(Some(Err(Status::invalid_argument(
                        "the stream ended inside a message",
                    ))));
                }
            }
        }
    }
}
