//! The operator's profile explorer at `/ui`: plain server-rendered HTML
//! over the same ports and the same shaping as the Profile, Definitions,
//! Destinations and admin APIs (no rule of its own).
//!
//! - Signed in with a space's access token (read) or admin token (read and
//!   operations): the token is posted once; the server keeps a session
//!   (under the hash of a random id, for 12 hours) and the browser only
//!   that id, in an `HttpOnly`, `SameSite=Strict` cookie scoped to `/ui`,
//!   never in a URL. Each page looks the session up again, so signing
//!   out, its expiry or a revocation of its token ends it at once.
//! - Every value is escaped ([`html::esc`]); the pages run no script and
//!   load nothing from elsewhere, under a Content-Security-Policy that
//!   forbids both.
//! - A form that changes something (replay, settings, signing out) is
//!   refused when the browser says it came from another site.

mod html;
mod profile;
mod space;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use kindred_store::token::{hash_secret, random_base62, token_id, TokenKind};
use kindred_store::SpaceAuth;
use kindred_store::{ProfileLookup, ProfileParts};
use serde::Deserialize;

use crate::error::ApiError;
use crate::ReadState;
use html::{esc, Page};

/// The session cookie: a random session id (the server keeps the session
/// under its hash; the token never leaves the sign-in form), readable
/// only by the server. Over HTTPS it is a `__Host-` cookie (Secure, for
/// the whole host, set by this host only: a sibling subdomain cannot
/// plant one).
const COOKIE: &str = "kindred_session";
const HOST_COOKIE: &str = "__Host-kindred_session";
/// Characters of a session id (base62: about 256 bits).
const SESSION_ID_LEN: usize = 43;
/// How long a session lasts: a working day.
const SESSION_SECS: u64 = 12 * 3600;

/// What every page response carries: no script, no plug-in, no framing,
/// nothing from another origin; forms post only here.
const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub fn router(state: ReadState) -> Router {
    Router::new()
        .route("/ui", get(home))
        .route("/ui/style.css", get(style))
        .route("/ui/icon.svg", get(icon))
        .route("/ui/session", post(sign_in))
        .route("/ui/session/end", post(sign_out))
        .route("/ui/search", post(search))
        .route("/ui/profiles/{profile_id}", get(profile::page))
        .route("/ui/accounts/{group_id}", get(profile::account))
        .route("/ui/computations", get(space::computations))
        .route("/ui/computations/{class}/{key}", get(space::computation))
        .route("/ui/changes", get(space::changes))
        .route("/ui/destinations", get(space::destinations))
        .route("/ui/destinations/{id}", get(space::destination))
        .route("/ui/destinations/{id}/replay", post(space::replay))
        .route(
            "/ui/settings",
            get(space::settings).post(space::put_settings),
        )
        .layer(axum::middleware::from_fn(guard))
        .with_state(state)
}

/// Where the explorer is mounted when a gateway in front of Kindred
/// serves it under a path of its own (API Gateway's stage, `/prod`, or a
/// custom domain's base path): its pages then link, redirect and scope
/// their cookie under it. Set as a request extension by whoever knows the
/// path the browser asked for (the `profile-api` function, from API
/// Gateway's request context; never from a client's header).
#[derive(Clone, Debug, PartialEq)]
pub struct UiPrefix(String);

impl UiPrefix {
    /// The prefix of `asked` (the path the browser asked for) before
    /// `routed` (the path the router sees): as many leading segments as
    /// `asked` has more than `routed`. `None` when there are none, or when
    /// they hold anything but plain path characters.
    pub fn of(asked: &str, routed: &str) -> Option<Self> {
        let segments = |p: &str| p.split('/').filter(|s| !s.is_empty()).count();
        let extra = segments(asked).checked_sub(segments(routed))?;
        let prefix: Vec<&str> = asked
            .split('/')
            .filter(|s| !s.is_empty())
            .take(extra)
            .collect();
        let plain = |s: &&str| {
            s.len() <= 64
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'))
                && !matches!(*s, "." | "..")
        };
        (!prefix.is_empty() && prefix.len() <= 4 && prefix.iter().all(plain))
            .then(|| Self(format!("/{}", prefix.join("/"))))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A page's response with its own paths (`/ui…` in links, form actions,
/// redirects and the cookie's path) moved under `prefix`. Only the
/// explorer's own markup holds `="/ui`: every value shown is escaped, so
/// a `"` from data is `&quot;` and never matches.
async fn under_prefix(response: Response, prefix: &UiPrefix) -> Response {
    let (mut parts, body) = response.into_parts();
    let p = prefix.as_str();
    if let Some(to) = parts
        .headers
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
    {
        if to.starts_with("/ui") {
            if let Ok(v) = HeaderValue::from_str(&format!("{p}{to}")) {
                parts.headers.insert(header::LOCATION, v);
            }
        }
    }
    let cookies: Vec<HeaderValue> = parts
        .headers
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|c| {
            HeaderValue::from_str(&c.replace("; Path=/ui", &format!("; Path={p}/ui"))).ok()
        })
        .collect();
    if !cookies.is_empty() {
        parts.headers.remove(header::SET_COOKIE);
        for c in cookies {
            parts.headers.append(header::SET_COOKIE, c);
        }
    }
    let html = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("text/html"));
    if !html {
        return Response::from_parts(parts, body);
    }
    let Ok(bytes) = axum::body::to_bytes(body, 16 << 20).await else {
        return UiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "The page could not be read.",
        )
        .into_response();
    };
    let page = String::from_utf8_lossy(&bytes)
        .replace("href=\"/ui", &format!("href=\"{p}/ui"))
        .replace("action=\"/ui", &format!("action=\"{p}/ui"));
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(page))
}

/// The headers of every `/ui` response, and the cross-site check of
/// every form post (SameSite=Strict already keeps the cookie off them;
/// this refuses them even from an older browser).
async fn guard(request: Request, next: Next) -> Response {
    if request.method() == axum::http::Method::POST && cross_site(&request) {
        return UiError::new(
            StatusCode::FORBIDDEN,
            "This form was sent from another site; open Kindred and send it again.",
        )
        .into_response();
    }
    let prefix = request.extensions().get::<UiPrefix>().cloned();
    let mut response = next.run(request).await;
    if let Some(prefix) = &prefix {
        response = under_prefix(response, prefix).await;
    }
    let h = response.headers_mut();
    for (name, value) in [
        ("content-security-policy", CSP),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        ("x-frame-options", "DENY"),
        ("cache-control", "no-store"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// Whether the browser says a request came from another origin: its
/// `Sec-Fetch-Site`, or else its `Origin` against the host it asked for.
fn cross_site(request: &Request) -> bool {
    let headers = request.headers();
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return !matches!(site, "same-origin" | "none");
    }
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    // HTTP/2 has no Host header: the request's authority then.
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| request.uri().authority().map(|a| a.to_string()));
    let bare = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"));
    match (bare, host) {
        (Some(bare), Some(host)) => !bare.eq_ignore_ascii_case(&host),
        _ => true,
    }
}

/// The signed-in space and what the token may do.
pub(crate) struct Session {
    pub space_id: String,
    pub source_id: String,
    pub admin: bool,
}

/// A page that could not be shown: an HTML page with the status.
#[derive(Debug)]
pub(crate) struct UiError {
    status: StatusCode,
    message: String,
    retry_after_secs: Option<u64>,
}

impl UiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    fn admin_only() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "This needs the space's admin token; you are signed in with an access token (read only).",
        )
    }
}

impl From<ApiError> for UiError {
    fn from(e: ApiError) -> Self {
        Self {
            retry_after_secs: e.retry_after_secs,
            ..Self::new(e.status, e.message)
        }
    }
}

impl From<kindred_store::StoreError> for UiError {
    fn from(e: kindred_store::StoreError) -> Self {
        ApiError::from(e).into()
    }
}

impl IntoResponse for UiError {
    fn into_response(self) -> Response {
        let signed_out = self.status == StatusCode::UNAUTHORIZED;
        let mut page = Page::new("Kindred", None);
        page.push(&format!("<p class=\"error\">{}</p>", esc(&self.message)));
        if signed_out {
            page.push(&sign_in_form());
        } else {
            page.push("<p><a href=\"/ui\">Back to the start</a></p>");
        }
        let mut response = (self.status, page.finish()).into_response();
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// The session's id, from its cookie: over HTTPS only the `__Host-`
/// cookie (a sibling host can set a plain one, but not that one), else
/// only the plain one.
fn cookie_session(headers: &HeaderMap) -> Option<&str> {
    let name = if https(headers) { HOST_COOKIE } else { COOKIE };
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, value)| value)
        .filter(|v| v.len() == SESSION_ID_LEN && v.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Tokens are short runs of letters, digits and `_`: anything else is not
/// looked up.
fn plausible_token(token: &str) -> bool {
    (8..=128).contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// The session of a space's token: an admin token first, then an access
/// token.
async fn authenticate(state: &ReadState, token: &str) -> Result<Option<SpaceAuth>, UiError> {
    for kind in [TokenKind::Admin, TokenKind::Access] {
        if let Some(auth) = state.spaces.authenticate(token, kind).await? {
            return Ok(Some(auth));
        }
    }
    Ok(None)
}

/// The signed-in session of a request, or the sign-in page (401). The
/// session is looked up each time, so that signing out, its expiry or a
/// revocation of its token ends it at once.
pub(crate) async fn session(state: &ReadState, headers: &HeaderMap) -> Result<Session, UiError> {
    let unauthorized = || {
        UiError::new(
            StatusCode::UNAUTHORIZED,
            "Sign in with a token of your space.",
        )
    };
    let id = cookie_session(headers).ok_or_else(unauthorized)?;
    let auth = state
        .spaces
        .session_auth(hash_secret(id), kindred_store::now_millis())
        .await?
        .ok_or_else(unauthorized)?;
    if auth.kind == TokenKind::Access {
        // The same per-space budget as the Profile API.
        crate::profile::charge_profile_rate(state, &auth)?;
    }
    Ok(Session {
        admin: auth.kind == TokenKind::Admin,
        space_id: auth.space_id,
        source_id: auth.source_id,
    })
}

fn sign_in_form() -> String {
    "<form method=\"post\" action=\"/ui/session\" class=\"signin\">\
     <label>Access token (read) or admin token (read and operations)\
     <input type=\"password\" name=\"token\" autocomplete=\"off\" required autofocus></label>\
     <button type=\"submit\">Sign in</button></form>"
        .to_string()
}

async fn style() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("style.css"),
    )
        .into_response()
}

async fn icon() -> Response {
    (
        [(header::CONTENT_TYPE, "image/svg+xml")],
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 16 16\">\
         <circle cx=\"5\" cy=\"8\" r=\"4\" fill=\"#2f5fd0\"/><circle cx=\"11\" cy=\"8\" r=\"4\" fill=\"#8fa8e8\"/></svg>",
    )
        .into_response()
}

async fn home(State(state): State<ReadState>, headers: HeaderMap) -> Response {
    if cookie_session(&headers).is_none() {
        let mut page = Page::new("Sign in", None);
        page.push("<h1>Kindred</h1>");
        page.push(&sign_in_form());
        return page.finish().into_response();
    }
    let s = match session(&state, &headers).await {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    let mut page = Page::new("Profiles", Some(&s));
    page.push("<h1>Find a profile</h1>");
    page.push(&search_form(""));
    page.push(
        "<p class=\"hint\">Any identifier as <code>type:value</code> (for example \
         <code>email:ann@example.com</code>, <code>user_id:u1</code>, \
         <code>anonymous_id:…</code>; emails match whatever their case), or a \
         profile id (<code>prf_…</code>).</p>",
    );
    page.finish().into_response()
}

pub(crate) fn search_form(value: &str) -> String {
    format!(
        "<form method=\"post\" action=\"/ui/search\" class=\"search\">\
         <input type=\"search\" name=\"q\" value=\"{}\" placeholder=\"email:ann@example.com\" required>\
         <button type=\"submit\">Find</button></form>",
        esc(value)
    )
}

#[derive(Deserialize)]
struct SignIn {
    token: String,
}

/// Checks the token and keeps it in the session cookie.
async fn sign_in(
    State(state): State<ReadState>,
    headers: HeaderMap,
    Form(form): Form<SignIn>,
) -> Response {
    let token = form.token.trim();
    let auth = match token_id(token).filter(|_| plausible_token(token)) {
        Some(_) => authenticate(&state, token).await,
        None => Ok(None),
    };
    match auth {
        Ok(Some(auth)) => {
            // Signing in again ends the session the browser had.
            if let Some(old) = cookie_session(&headers) {
                if let Err(e) = state.spaces.end_session(hash_secret(old)).await {
                    return UiError::from(e).into_response();
                }
            }
            let id = random_base62(SESSION_ID_LEN);
            let expires_at = kindred_store::now_millis() + SESSION_SECS as i64 * 1000;
            let token_id = token_id(token).unwrap_or_default();
            if let Err(e) = state
                .spaces
                .start_session(hash_secret(&id), token_id, auth.kind, expires_at)
                .await
            {
                return UiError::from(e).into_response();
            }
            let cookie = if https(&headers) {
                format!("{HOST_COOKIE}={id}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={SESSION_SECS}")
            } else {
                format!(
                    "{COOKIE}={id}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={SESSION_SECS}"
                )
            };
            let mut response = Redirect::to("/ui").into_response();
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(header::SET_COOKIE, v);
            }
            response
        }
        Ok(None) => UiError::new(
            StatusCode::UNAUTHORIZED,
            "That token is not valid (unknown, revoked, or a write key).",
        )
        .into_response(),
        Err(e) => e.into_response(),
    }
}

/// Whether the browser reached Kindred over HTTPS (directly or through
/// API Gateway or a proxy that says so): the cookie is then `Secure`.
fn https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("https"))
}

/// Ends the session on the server, then clears its cookie.
async fn sign_out(State(state): State<ReadState>, headers: HeaderMap) -> Response {
    if let Some(id) = cookie_session(&headers) {
        if let Err(e) = state.spaces.end_session(hash_secret(id)).await {
            return UiError::from(e).into_response();
        }
    }
    let mut response = Redirect::to("/ui").into_response();
    for cookie in [
        "kindred_session=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0",
        "__Host-kindred_session=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0",
    ] {
        response
            .headers_mut()
            .append(header::SET_COOKIE, HeaderValue::from_static(cookie));
    }
    response
}

#[derive(Deserialize)]
struct Search {
    #[serde(default)]
    q: String,
}

/// Finds the profile of an identifier or profile id and opens its page
/// (posted, so that the identifier stays out of URLs, histories and logs).
async fn search(
    State(state): State<ReadState>,
    headers: HeaderMap,
    Form(q): Form<Search>,
) -> Result<Response, UiError> {
    let s = session(&state, &headers).await?;
    let raw = q.q.trim();
    let lookup = if raw.starts_with("prf_") {
        ProfileLookup::ProfileId(raw.to_string())
    } else {
        match crate::profile::parse_lookup(raw) {
            Ok(l) => l,
            Err(_) => {
                let mut page = Page::new("Profiles", Some(&s));
                page.push("<h1>Find a profile</h1>");
                page.push(&search_form(raw));
                page.push(
                    "<p class=\"error\">Write an identifier as <code>type:value</code>, \
                     or a profile id.</p>",
                );
                return Ok((StatusCode::BAD_REQUEST, page.finish()).into_response());
            }
        }
    };
    let doc = state
        .profiles
        .profile(&s.space_id, &lookup, ProfileParts::default())
        .await?;
    match doc {
        Some(doc) => Ok(
            Redirect::to(&format!("/ui/profiles/{}", html::url_part(&doc.profile_id)))
                .into_response(),
        ),
        None => {
            let mut page = Page::new("Profiles", Some(&s));
            page.push("<h1>Find a profile</h1>");
            page.push(&search_form(raw));
            page.push(&format!(
                "<p class=\"error\">No profile has {}.</p>",
                esc(raw)
            ));
            Ok((StatusCode::NOT_FOUND, page.finish()).into_response())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_is_what_the_browser_asked_for_before_the_routed_path() {
        let of = |a, r| UiPrefix::of(a, r).map(|p| p.as_str().to_string());
        assert_eq!(
            of("/prod/ui/profiles/prf_1", "/ui/profiles/prf_1"),
            Some("/prod".into())
        );
        assert_eq!(of("/base/prod/ui", "/ui"), Some("/base/prod".into()));
        // Encoded differently, counted the same.
        assert_eq!(
            of("/prod/ui/profiles/a%40b", "/ui/profiles/a@b"),
            Some("/prod".into())
        );
        assert_eq!(of("/ui", "/ui"), None);
        assert_eq!(of("/ui", "/prod/ui"), None);
        // Nothing but plain path characters goes into a page.
        assert_eq!(of("/pr\"od/ui", "/ui"), None);
        assert_eq!(of("/../ui", "/ui"), None);
        assert_eq!(of("/a%20b/ui", "/ui"), None);
    }

    #[tokio::test]
    async fn a_page_under_a_prefix_links_redirects_and_scopes_its_cookie_there() {
        let prefix = UiPrefix::of("/prod/ui", "/ui").unwrap();
        let mut page = Page::new("t", None);
        page.push(&format!(
            "<a href=\"/ui/computations\">x</a><form action=\"/ui/search\"></form><p>{}</p>",
            esc("href=\"/ui/evil")
        ));
        let shown = under_prefix(page.finish().into_response(), &prefix).await;
        let body = axum::body::to_bytes(shown.into_body(), usize::MAX)
            .await
            .unwrap();
        let body = String::from_utf8(body.to_vec()).unwrap();
        assert!(body.contains("href=\"/prod/ui/computations\""), "{body}");
        assert!(body.contains("action=\"/prod/ui/search\""), "{body}");
        assert!(body.contains("href=\"/prod/ui/style.css\""), "{body}");
        assert!(body.contains("href=&quot;/ui/evil"), "{body}");
        assert!(!body.contains("\"/ui"), "{body}");

        let mut redirect = Redirect::to("/ui/profiles/prf_1").into_response();
        redirect.headers_mut().insert(
            header::SET_COOKIE,
            HeaderValue::from_static("kindred_session=t; Path=/ui; HttpOnly; SameSite=Strict"),
        );
        let moved = under_prefix(redirect, &prefix).await;
        assert_eq!(moved.headers()[header::LOCATION], "/prod/ui/profiles/prf_1");
        assert_eq!(
            moved.headers()[header::SET_COOKIE],
            "kindred_session=t; Path=/prod/ui; HttpOnly; SameSite=Strict"
        );
    }
}
