//! Console sessions. Signing in exchanges the admin token for a sealed cookie: a random id and
//! an expiry, authenticated with a key derived from the admin token by a slow KDF (so a leaked
//! cookie or CSRF token is no fast oracle for guessing the token). With shared state, any
//! replica started with the same token accepts it without a shared session table; embedded,
//! the key also takes a per-process salt, so sessions end with the process (and with it its
//! list of signed-out sessions). Changing the token ends every session.

use std::sync::OnceLock;
use std::time::Duration;

use axum::http::header::{COOKIE, HOST, ORIGIN};
use axum::http::{HeaderMap, HeaderValue, Method};
use dashmap::DashMap;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::auth;
use crate::error::GatewayError;

pub const COOKIE_NAME: &str = "tollgate_console";
/// The header a signed-in page sends its CSRF token in on every state-changing call.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// PBKDF2-HMAC-SHA256 rounds from the admin token to the signing key: paid once per process.
const KDF_ROUNDS: u32 = 600_000;

type Signer = Hmac<Sha256>;

/// One signed-in browser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    id: [u8; 16],
    pub expires_ms: i64,
}

impl Session {
    pub fn id_hex(&self) -> String {
        hex::encode(self.id)
    }
}

/// Whether two secrets are equal, in time that depends on neither's content nor length.
fn tokens_match(presented: &str, expected: &str) -> bool {
    let digest = |text: &str| Sha256::digest(text.as_bytes());
    digest(presented).ct_eq(&digest(expected)).into()
}

/// This replica's side of console sessions: the signing keys, derived on first use, and the
/// sessions signed out here, kept until they would have expired.
pub struct Sessions {
    admin_token: Option<String>,
    /// Set when sessions must not outlive this process (embedded state).
    process_salt: Option<[u8; 16]>,
    keys: OnceLock<Keys>,
    signed_out: DashMap<[u8; 16], i64>,
}

impl Sessions {
    pub fn new(admin_token: Option<String>, per_process: bool) -> Sessions {
        Sessions {
            admin_token,
            process_salt: per_process.then(rand::random),
            keys: OnceLock::new(),
            signed_out: DashMap::new(),
        }
    }

    /// The signing keys; the first call derives them on the blocking pool.
    pub async fn keys(&self) -> Result<&Keys, GatewayError> {
        if let Some(keys) = self.keys.get() {
            return Ok(keys);
        }
        let token = self
            .admin_token
            .clone()
            .ok_or(GatewayError::AdminDisabled)?;
        let salt = self.process_salt;
        let keys = tokio::task::spawn_blocking(move || Keys::derive(&token, salt))
            .await
            .map_err(|e| GatewayError::Internal(e.to_string()))?;
        Ok(self.keys.get_or_init(|| keys))
    }

    /// The admin token, as a bearer token or typed into the sign-in form.
    pub fn check_token(&self, presented: &str) -> Result<(), GatewayError> {
        let expected = self
            .admin_token
            .as_deref()
            .ok_or(GatewayError::AdminDisabled)?;
        match tokens_match(presented, expected) {
            true => Ok(()),
            false => Err(GatewayError::InvalidAdminToken),
        }
    }

    pub fn sign_out(&self, session: Session, now_ms: i64) {
        self.signed_out.retain(|_, expires| *expires > now_ms);
        self.signed_out.insert(session.id, session.expires_ms);
    }

    /// The session among the request's console cookies (a cookie planted beside ours under
    /// a longer path must not lock the page out), if one is ours, unexpired and not signed out.
    pub fn open(
        &self,
        keys: &Keys,
        headers: &HeaderMap,
        now_ms: i64,
    ) -> Result<Session, GatewayError> {
        let mut refusal = GatewayError::InvalidAdminToken;
        for sealed in cookies(headers) {
            match keys.unseal(sealed) {
                Some(session)
                    if session.expires_ms > now_ms
                        && !self.signed_out.contains_key(&session.id) =>
                {
                    return Ok(session)
                }
                Some(_) => refusal = GatewayError::SessionEnded,
                None => {}
            }
        }
        Err(refusal)
    }

    /// The admin API's gate: the admin token as a bearer token, or a console session whose
    /// calls come from our own page, its state-changing ones with its CSRF token. Answers the
    /// session when it was one, for the caller to ask the other replicas about.
    pub async fn authorize(
        &self,
        method: &Method,
        headers: &HeaderMap,
        now_ms: i64,
    ) -> Result<Option<Session>, GatewayError> {
        let bearer = auth::bearer(headers);
        if bearer.is_some() || cookies(headers).next().is_none() {
            return self.check_token(bearer.unwrap_or_default()).map(|()| None);
        }
        same_origin(headers)?;
        let keys = self.keys().await?;
        let session = self.open(keys, headers, now_ms)?;
        if !method.is_safe() {
            keys.check_csrf(&session, headers)?;
        }
        Ok(Some(session))
    }
}

/// What signs sessions and their CSRF tokens.
pub struct Keys {
    secret: [u8; 32],
}

impl Keys {
    fn derive(admin_token: &str, process_salt: Option<[u8; 16]>) -> Keys {
        let mut salt = b"tollgate console session v1".to_vec();
        salt.extend(process_salt.unwrap_or_default());
        let mut secret = [0; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(admin_token.as_bytes(), &salt, KDF_ROUNDS, &mut secret);
        Keys { secret }
    }

    fn mac(&self, purpose: &[u8], session: &Session) -> [u8; 32] {
        let Ok(mut mac) = Signer::new_from_slice(&self.secret) else {
            unreachable!("HMAC takes a key of any length")
        };
        mac.update(purpose);
        mac.update(&session.id);
        mac.update(&session.expires_ms.to_be_bytes());
        mac.finalize().into_bytes().into()
    }

    pub fn start(&self, now_ms: i64, lifetime: Duration) -> Session {
        let lifetime_ms = i64::try_from(lifetime.as_millis()).unwrap_or(i64::MAX);
        Session {
            id: rand::random(),
            expires_ms: now_ms.saturating_add(lifetime_ms),
        }
    }

    /// The cookie's value: `id.expiry.mac`, all hex or decimal, so it needs no escaping.
    pub fn seal(&self, session: &Session) -> String {
        format!(
            "{}.{}.{}",
            hex::encode(session.id),
            session.expires_ms,
            hex::encode(self.mac(b"session", session))
        )
    }

    /// The session a cookie holds if its seal is ours, expired or not.
    fn unseal(&self, sealed: &str) -> Option<Session> {
        let mut parts = sealed.split('.');
        let (Some(id), Some(expires), Some(mac), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let mut session = Session {
            id: [0; 16],
            expires_ms: expires.parse().ok()?,
        };
        hex::decode_to_slice(id, &mut session.id).ok()?;
        let presented = hex::decode(mac).ok()?;
        let genuine: bool = presented.ct_eq(&self.mac(b"session", &session)).into();
        genuine.then_some(session)
    }

    pub fn csrf_token(&self, session: &Session) -> String {
        hex::encode(self.mac(b"csrf", session))
    }

    pub fn check_csrf(&self, session: &Session, headers: &HeaderMap) -> Result<(), GatewayError> {
        let Some(presented) = headers.get(CSRF_HEADER) else {
            return Err(GatewayError::CsrfRefused(
                "this call needs the console's CSRF token in `X-CSRF-Token`",
            ));
        };
        let genuine: bool = presented
            .as_bytes()
            .ct_eq(self.csrf_token(session).as_bytes())
            .into();
        match genuine {
            true => Ok(()),
            false => Err(GatewayError::CsrfRefused(
                "the CSRF token does not belong to this session",
            )),
        }
    }
}

/// The console cookies' values among the request's cookies.
fn cookies(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|line| line.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value)
}

/// Whether the browser reached us over TLS, as the proxy terminating it says (the first hop's
/// `X-Forwarded-Proto`): the cookie is then marked `Secure`.
fn over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|proto| proto.to_str().ok())
        .and_then(|proto| proto.split(',').next())
        .is_some_and(|first| first.trim().eq_ignore_ascii_case("https"))
}

pub fn set_cookie(headers: &HeaderMap, value: &str, max_age_secs: u64) -> HeaderValue {
    let secure = if over_tls(headers) { "; Secure" } else { "" };
    let line = format!(
        "{COOKIE_NAME}={value}; Path=/; Max-Age={max_age_secs}; HttpOnly; SameSite=Strict{secure}"
    );
    HeaderValue::from_str(&line).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Refuses what a browser sends from anywhere but our own page. Browsers say where a request
/// comes from in `Sec-Fetch-Site`, which holds behind any proxy; without it (older browsers),
/// an `Origin` must name the host the request was sent to, as the proxy forwarded it or not.
pub fn same_origin(headers: &HeaderMap) -> Result<(), GatewayError> {
    if let Some(site) = headers.get("sec-fetch-site") {
        return match site.as_bytes() {
            b"same-origin" | b"none" => Ok(()),
            _ => Err(GatewayError::CrossOrigin),
        };
    }
    let Some(origin) = headers.get(ORIGIN) else {
        return Ok(());
    };
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|origin| origin.split_once("://"))
        .map(|(_, host)| host);
    let ours = [headers.get("x-forwarded-host"), headers.get(HOST)];
    let matches = ours
        .iter()
        .flatten()
        .filter_map(|host| host.to_str().ok())
        .any(|host| origin_host.is_some_and(|origin| origin.eq_ignore_ascii_case(host.trim())));
    match matches {
        true => Ok(()),
        false => Err(GatewayError::CrossOrigin),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_cookie(keys: &Keys, session: &Session) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let line = format!(
            "a=b; {COOKIE_NAME}=planted; {COOKIE_NAME}={}",
            keys.seal(session)
        );
        headers.insert(COOKIE, HeaderValue::from_str(&line).unwrap());
        headers.insert(HOST, HeaderValue::from_static("gw.example:8080"));
        headers
    }

    #[tokio::test]
    async fn a_session_opens_only_with_its_own_seal_and_until_it_expires_or_signs_out() {
        let sessions = Sessions::new(Some("adm-secret".to_owned()), false);
        let keys = sessions.keys().await.unwrap();
        let session = keys.start(1_000, Duration::from_secs(60));
        let headers = with_cookie(keys, &session);
        assert_eq!(sessions.open(keys, &headers, 2_000).ok(), Some(session));
        assert!(matches!(
            sessions.open(keys, &headers, 61_000),
            Err(GatewayError::SessionEnded)
        ));
        let sealed = keys.seal(&session);
        let stretched = sealed.replacen(&session.expires_ms.to_string(), "999999999", 1);
        assert!(keys.unseal(&stretched).is_none(), "the expiry is sealed");
        let rotated = Sessions::new(Some("adm-rotated".to_owned()), false);
        assert!(rotated.keys().await.unwrap().unseal(&sealed).is_none());
        let restarted = Sessions::new(Some("adm-secret".to_owned()), true);
        assert!(
            restarted.keys().await.unwrap().unseal(&sealed).is_none(),
            "a per-process salt ends sessions with the process"
        );
        sessions.sign_out(session, 2_000);
        assert!(matches!(
            sessions.open(keys, &headers, 2_000),
            Err(GatewayError::SessionEnded)
        ));
    }

    #[tokio::test]
    async fn state_changes_need_the_sessions_csrf_token_and_our_origin() {
        let sessions = Sessions::new(Some("adm-secret".to_owned()), false);
        let keys = sessions.keys().await.unwrap();
        let session = keys.start(1_000, Duration::from_secs(60));
        let mut headers = with_cookie(keys, &session);
        let allowed = |method: Method, headers: HeaderMap| {
            let sessions = &sessions;
            async move { sessions.authorize(&method, &headers, 2_000).await }
        };
        assert!(allowed(Method::GET, headers.clone()).await.is_ok());
        assert!(matches!(
            allowed(Method::POST, headers.clone()).await,
            Err(GatewayError::CsrfRefused(_))
        ));
        let csrf = keys.csrf_token(&session);
        headers.insert(CSRF_HEADER, HeaderValue::from_str(&csrf).unwrap());
        assert!(allowed(Method::POST, headers.clone()).await.is_ok());
        headers.insert(ORIGIN, HeaderValue::from_static("https://evil.example"));
        assert!(matches!(
            allowed(Method::POST, headers.clone()).await,
            Err(GatewayError::CrossOrigin)
        ));
        headers.insert("x-forwarded-host", HeaderValue::from_static("evil.example"));
        assert!(
            allowed(Method::POST, headers.clone()).await.is_ok(),
            "as the proxy forwarded it"
        );
        headers.remove("x-forwarded-host");
        headers.insert("sec-fetch-site", HeaderValue::from_static("same-origin"));
        assert!(
            allowed(Method::DELETE, headers.clone()).await.is_ok(),
            "the browser's word holds whatever Host a proxy sent"
        );
        headers.insert("sec-fetch-site", HeaderValue::from_static("same-site"));
        assert!(matches!(
            allowed(Method::POST, headers.clone()).await,
            Err(GatewayError::CrossOrigin)
        ));
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(tokens_match("adm-1", "adm-1"));
        assert!(!tokens_match("adm-1", "adm-12"));
        assert!(!tokens_match("", "adm-1"));
    }
}
