//! A handler that panics answers INTERNAL instead of tearing down its connection.
//!
//! tower-http's `CatchPanic` does the catching; this module only shapes the answer as a gRPC
//! status (and logs the panic, whose message never reaches the client).

use std::any::Any;

use http::Response;
use tower_http::catch_panic::CatchPanicLayer;

/// The panic handler: logs, answers INTERNAL.
pub fn internal_on_panic(panic: Box<dyn Any + Send + 'static>) -> Response<tonic::body::Body> {
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("<non-string panic>");
    tracing::error!(panic = message, "handler panicked");
    tonic::Status::internal("internal error; the server logged the details").into_http()
}

/// The shape of [`internal_on_panic`].
pub type PanicHandler = fn(Box<dyn Any + Send + 'static>) -> Response<tonic::body::Body>;

/// The layer that catches handler panics.
pub fn catch_panic_layer() -> CatchPanicLayer<PanicHandler> {
    CatchPanicLayer::custom(internal_on_panic as PanicHandler)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower::{Layer, ServiceExt};

    #[tokio::test]
    async fn a_panicking_handler_answers_internal() {
        let panicking = tower::service_fn(|_req: http::Request<()>| async {
            if true {
                panic!("bug in a handler");
            }
            Ok::<_, Infallible>(Response::new(tonic::body::Body::empty()))
        });
        let response = catch_panic_layer()
            .layer(panicking)
            .oneshot(http::Request::new(()))
            .await
            .unwrap();
        assert_eq!(response.headers().get("grpc-status").unwrap(), "13");
    }
}
