//! Console sessions. Signing in exchanges the admin token for a sealed cookie: a random id and
//! an expiry, authenticated with a key derived from the admin token. Any replica started with
//! the same token accepts it without a shared session table, and changing the token ends every
//! session. Signing out revokes the id on this replica until it would have expired anyway.

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

type Signer = Hmac<Sha256>;

/// One signed-in browser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    id: [u8; 16],
    pub expires_ms: i64,
}

/// Sessions this replica has seen signed out, kept until they expire.
#[derive(Default)]
pub struct Revoked(DashMap<[u8; 16], i64>);

impl Session {
    pub fn id_hex(&self) -> String {
        hex::encode(self.id)
    }
}

impl Revoked {
    pub fn revoke(&self, session: Session, now_ms: i64) {
        self.0.retain(|_, expires| *expires > now_ms);
        self.0.insert(session.id, session.expires_ms);
    }

    fn contains(&self, session: &Session) -> bool {
        self.0.contains_key(&session.id)
    }
}

/// What signs sessions and their CSRF tokens, derived from the admin token so that the token
/// itself never signs anything a browser holds.
pub struct Keys {
    secret: [u8; 32],
}

impl Keys {
    pub fn new(admin_token: &str) -> Keys {
        let mut digest = Sha256::new();
        digest.update(b"tollgate console session v1\0");
        digest.update(admin_token.as_bytes());
        Keys {
            secret: digest.finalize().into(),
        }
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

    pub fn csrf_token(&self, session: &Session) -> String {
        hex::encode(self.mac(b"csrf", session))
    }

    /// The session a cookie holds, if its seal is ours and it has not expired or been revoked.
    pub fn open(
        &self,
        sealed: &str,
        now_ms: i64,
        revoked: &Revoked,
    ) -> Result<Session, GatewayError> {
        let mut parts = sealed.split('.');
        let (Some(id), Some(expires), Some(mac), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(GatewayError::InvalidAdminToken);
        };
        let mut session = Session {
            id: [0; 16],
            expires_ms: expires
                .parse()
                .map_err(|_| GatewayError::InvalidAdminToken)?,
        };
        hex::decode_to_slice(id, &mut session.id).map_err(|_| GatewayError::InvalidAdminToken)?;
        let presented = hex::decode(mac).map_err(|_| GatewayError::InvalidAdminToken)?;
        let genuine: bool = presented.ct_eq(&self.mac(b"session", &session)).into();
        if !genuine {
            return Err(GatewayError::InvalidAdminToken);
        }
        if session.expires_ms <= now_ms || revoked.contains(&session) {
            return Err(GatewayError::SessionEnded);
        }
        Ok(session)
    }
}

/// The console cookie's value among the request's cookies.
pub fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|line| line.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value)
}

/// Whether the request came over TLS to whatever terminates it in front of us: the cookie is
/// then marked `Secure`.
fn over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .is_some_and(|proto| proto.as_bytes().eq_ignore_ascii_case(b"https"))
}

pub fn set_cookie(headers: &HeaderMap, value: &str, max_age_secs: u64) -> HeaderValue {
    let secure = if over_tls(headers) { "; Secure" } else { "" };
    let line = format!(
        "{COOKIE_NAME}={value}; Path=/; Max-Age={max_age_secs}; HttpOnly; SameSite=Strict{secure}"
    );
    HeaderValue::from_str(&line).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Refuses what a browser sends from another site: `Sec-Fetch-Site: cross-site`, or an
/// `Origin` whose host is not the one the request was sent to.
pub fn same_origin(headers: &HeaderMap) -> Result<(), GatewayError> {
    if headers
        .get("sec-fetch-site")
        .is_some_and(|site| site.as_bytes() == b"cross-site")
    {
        return Err(GatewayError::CrossOrigin);
    }
    let Some(origin) = headers.get(ORIGIN) else {
        return Ok(());
    };
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|origin| origin.split_once("://"))
        .map(|(_, host)| host);
    let host = headers.get(HOST).and_then(|host| host.to_str().ok());
    match (origin_host, host) {
        (Some(origin), Some(host)) if origin.eq_ignore_ascii_case(host) => Ok(()),
        _ => Err(GatewayError::CrossOrigin),
    }
}

/// The admin API's gate: the admin token as a bearer token, or a console session whose
/// state-changing calls come from our own page with its CSRF token. Answers the session when
/// it was one, for the caller to ask the other replicas about.
pub fn authorize(
    admin_token: Option<&str>,
    revoked: &Revoked,
    method: &Method,
    headers: &HeaderMap,
    now_ms: i64,
) -> Result<Option<Session>, GatewayError> {
    let Some(expected) = admin_token else {
        return Err(GatewayError::AdminDisabled);
    };
    let sealed = match (auth::bearer(headers), cookie(headers)) {
        (None, Some(sealed)) => sealed,
        (presented, _) => {
            let presented = presented.unwrap_or_default();
            let same: bool = presented.as_bytes().ct_eq(expected.as_bytes()).into();
            return match same {
                true => Ok(None),
                false => Err(GatewayError::InvalidAdminToken),
            };
        }
    };
    same_origin(headers)?;
    let keys = Keys::new(expected);
    let session = keys.open(sealed, now_ms, revoked)?;
    if !method.is_safe() {
        check_csrf(&keys, &session, headers)?;
    }
    Ok(Some(session))
}

pub fn check_csrf(keys: &Keys, session: &Session, headers: &HeaderMap) -> Result<(), GatewayError> {
    let Some(presented) = headers.get(CSRF_HEADER) else {
        return Err(GatewayError::CsrfRefused(
            "this call needs the console's CSRF token in `X-CSRF-Token`",
        ));
    };
    let genuine: bool = presented
        .as_bytes()
        .ct_eq(keys.csrf_token(session).as_bytes())
        .into();
    match genuine {
        true => Ok(()),
        false => Err(GatewayError::CsrfRefused(
            "the CSRF token does not belong to this session",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_opens_only_with_its_own_seal_and_until_it_expires() {
        let keys = Keys::new("adm-secret");
        let revoked = Revoked::default();
        let session = keys.start(1_000, Duration::from_secs(60));
        let sealed = keys.seal(&session);
        assert_eq!(keys.open(&sealed, 2_000, &revoked).ok(), Some(session));
        assert!(matches!(
            keys.open(&sealed, 61_000, &revoked),
            Err(GatewayError::SessionEnded)
        ));
        let stretched = sealed.replacen(&session.expires_ms.to_string(), "999999999", 1);
        assert!(matches!(
            keys.open(&stretched, 2_000, &revoked),
            Err(GatewayError::InvalidAdminToken)
        ));
        let other_token = Keys::new("adm-rotated");
        assert!(matches!(
            other_token.open(&sealed, 2_000, &revoked),
            Err(GatewayError::InvalidAdminToken)
        ));
        revoked.revoke(session, 2_000);
        assert!(matches!(
            keys.open(&sealed, 2_000, &revoked),
            Err(GatewayError::SessionEnded)
        ));
    }

    #[test]
    fn state_changes_need_the_sessions_csrf_token_and_our_origin() {
        let keys = Keys::new("adm-secret");
        let revoked = Revoked::default();
        let session = keys.start(1_000, Duration::from_secs(60));
        let mut headers = HeaderMap::new();
        let cookie_line = format!("a=b; {COOKIE_NAME}={}", keys.seal(&session));
        headers.insert(COOKIE, HeaderValue::from_str(&cookie_line).unwrap());
        headers.insert(HOST, HeaderValue::from_static("gw.example:8080"));
        let token = Some("adm-secret");
        assert!(authorize(token, &revoked, &Method::GET, &headers, 2_000).is_ok());
        assert!(matches!(
            authorize(token, &revoked, &Method::POST, &headers, 2_000),
            Err(GatewayError::CsrfRefused(_))
        ));
        let csrf = keys.csrf_token(&session);
        headers.insert(CSRF_HEADER, HeaderValue::from_str(&csrf).unwrap());
        assert!(authorize(token, &revoked, &Method::POST, &headers, 2_000).is_ok());
        headers.insert(ORIGIN, HeaderValue::from_static("https://evil.example"));
        assert!(matches!(
            authorize(token, &revoked, &Method::POST, &headers, 2_000),
            Err(GatewayError::CrossOrigin)
        ));
        headers.insert(ORIGIN, HeaderValue::from_static("http://gw.example:8080"));
        assert!(authorize(token, &revoked, &Method::DELETE, &headers, 2_000).is_ok());
    }
}
