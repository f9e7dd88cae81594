//! The operators' console: a web page served by the gateway itself on the admin side
//! (`GET /console`), its assets compiled into the binary. The page signs in with the admin
//! token once (`POST /console/session`) and then calls the admin API with the session cookie
//! and a CSRF token (see [`session`]); it reads nothing the API does not offer to scripts.

use std::sync::Arc;

use axum::extract::rejection::StringRejection;
use axum::extract::{Path, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, SET_COOKIE};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::json;

use crate::app::App;
use crate::error::{small_body, GatewayError};

pub mod session;

/// Same-origin everything, no inline script or style, never framed.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; \
     frame-ancestors 'none'";

const PAGE: &str = include_str!("assets/index.html");
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "console.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/console.js"),
    ),
    (
        "console.css",
        "text/css; charset=utf-8",
        include_str!("assets/console.css"),
    ),
];

pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/console", get(page))
        .route("/console/", get(page))
        .route("/console/assets/{name}", get(asset))
        .route(
            "/console/session",
            get(current).post(sign_in).delete(sign_out),
        )
        .layer(axum::middleware::map_response(guarded))
}

/// Headers every console response carries, errors included.
async fn guarded(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        HeaderName::from_static("content-security-policy"),
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        HeaderName::from_static("x-frame-options"),
        HeaderValue::from_static("DENY"),
    );
    headers.insert(
        HeaderName::from_static("referrer-policy"),
        HeaderValue::from_static("no-referrer"),
    );
    headers
        .entry(CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

async fn page() -> Response {
    (
        [(
            CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        )],
        PAGE,
    )
        .into_response()
}

async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(asset, _, _)| *asset == name) {
        Some((_, content_type, body)) => (
            [
                (CONTENT_TYPE, HeaderValue::from_static(content_type)),
                (CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            ],
            *body,
        )
            .into_response(),
        None => GatewayError::NotFound(format!("console asset {name}")).into_response(),
    }
}

/// Refuses a session another replica signed out (shared state only).
pub async fn still_open(app: &App, session: &session::Session) -> Result<(), GatewayError> {
    match app.admission.console_session_ended(session).await? {
        true => Err(GatewayError::SessionEnded),
        false => Ok(()),
    }
}

/// What the page keeps of its session: the CSRF token to send back, and when it ends.
fn session_body(keys: &session::Keys, session: &session::Session) -> serde_json::Value {
    json!({
        "object": "console.session",
        "csrf_token": keys.csrf_token(session),
        "expires_at": crate::rfc3339(session.expires_ms),
    })
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SignIn {
    token: String,
}

/// `POST /console/session` with `{"token": "<admin token>"}`: sets the session cookie. JSON
/// only, so a plain cross-site form cannot post it, and from our own origin only. A session
/// the browser still held is signed out.
async fn sign_in(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<String, StringRejection>,
) -> Result<Response, GatewayError> {
    session::same_origin(&headers)?;
    let is_json = headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if !is_json {
        return Err(GatewayError::bad_request(
            "signing in takes a JSON body: {\"token\": \"…\"}",
        ));
    }
    let SignIn { token } = serde_json::from_str(&small_body(body)?)
        .map_err(|_| GatewayError::bad_request("expected a JSON body {\"token\": \"…\"}"))?;
    app.console.check_token(&token).inspect_err(|_| {
        tracing::warn!("console sign-in refused: wrong admin token");
    })?;
    let keys = app.console.keys().await?;
    let now = crate::unix_ms();
    if let Ok(previous) = app.console.open(keys, &headers, now) {
        end(&app, previous, now).await?;
    }
    let lifetime = app.config().server.console_session;
    let session = keys.start(now, lifetime);
    let cookie = session::set_cookie(&headers, &keys.seal(&session), lifetime.as_secs());
    Ok((
        [(SET_COOKIE, cookie)],
        axum::Json(session_body(keys, &session)),
    )
        .into_response())
}

/// `GET /console/session`: the signed-in page's CSRF token again (after a reload), or 401.
async fn current(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> Result<Response, GatewayError> {
    let keys = app.console.keys().await?;
    let session = app.console.open(keys, &headers, crate::unix_ms())?;
    still_open(&app, &session).await?;
    Ok(axum::Json(session_body(keys, &session)).into_response())
}

/// `DELETE /console/session`: ends the session on every replica. The cookie is cleared
/// whatever the answer, so a dead one does not linger in the browser.
async fn sign_out(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let clear = [(SET_COOKIE, session::set_cookie(&headers, "", 0))];
    let ended = async {
        session::same_origin(&headers)?;
        let keys = app.console.keys().await?;
        let now = crate::unix_ms();
        let session = app.console.open(keys, &headers, now)?;
        keys.check_csrf(&session, &headers)?;
        end(&app, session, now).await
    };
    match ended.await {
        Ok(()) => (
            clear,
            axum::Json(json!({"object": "console.session", "signed_out": true})),
        )
            .into_response(),
        Err(error) => (clear, error).into_response(),
    }
}

/// Ends a session here and, with shared state, for every replica: a sign-out that Redis did
/// not record is answered 503, since the other replicas would take the session again.
async fn end(app: &App, session: session::Session, now_ms: i64) -> Result<(), GatewayError> {
    app.console.sign_out(session, now_ms);
    app.admission.end_console_session(&session, now_ms).await
}
