//! The operator's explorer (`/ui`) in headless Chromium, driven by
//! `tests/browser/ui.mjs` as a person would use it: a wrong token
//! refused, sign in, search a merged profile by its mixed-case email,
//! both devices and the shared device's refused identifier in the graph,
//! a trait holding markup shown as text, the audience and its member,
//! read-only settings for an access token and editable ones for the
//! admin token. Screenshots go to `target/tmp/ui-screenshots/`; plain
//! HTTP checks of the same pages follow.

use std::path::PathBuf;

use crate::browser::browser_tools;
use crate::common::Server;
use reqwest::StatusCode;
use serde_json::{json, Value};

const SCRIPT: &str = "<script>window.pwned=1</script><img src=x onerror=\"window.pwned=2\">";

async fn send(s: &Server, events: Vec<Value>) {
    let r = s.track("/v1/batch", &json!({ "batch": events })).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    s.settle().await;
}

/// Ann on her phone, then on her laptop (an order), signed in on both:
/// the laptop's profile merges into hers through her email. Then Bob
/// signs in on Ann's phone: merge protection refuses the phone for him.
/// Each batch is sent once the ones before it are in the profiles.
pub(crate) fn scenario_batches() -> Vec<Value> {
    vec![
        json!({"type": "identify", "userId": "ann", "anonymousId": "phone",
               "traits": {"email": "Ann.Lee@Example.com", "name": "Ann", "bio": SCRIPT}}),
        json!({"type": "track", "anonymousId": "laptop", "event": "Order Completed",
               "properties": {"total": 12}}),
        json!({"type": "identify", "anonymousId": "laptop",
               "traits": {"email": "ann.lee@example.com"}}),
        json!({"type": "identify", "userId": "bob", "anonymousId": "phone",
               "traits": {"name": "Bob"}}),
        json!({"type": "group", "userId": "ann", "groupId": "acme",
               "traits": {"name": "Acme Inc", "plan": "enterprise"}}),
    ]
}

/// The identifiers the walk searches: Ann by her email in another case,
/// and Bob.
pub(crate) const SEARCHES: [&str; 2] = ["email:ANN.Lee@example.COM", "user_id:bob"];

async fn scenario(s: &Server) -> (String, String) {
    s.buyers_audience().await;
    for event in scenario_batches() {
        send(s, vec![event]).await;
    }
    let id = |r: crate::common::Reply| {
        r.body["metadata"]["profile_id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let ann = id(s.profile("user_id:ann", "metadata").await);
    let bob = id(s.profile("user_id:bob", "metadata").await);
    assert_ne!(ann, bob);
    (ann, bob)
}

fn shots() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_TARGET_TMPDIR"), "/ui-screenshots"))
}

fn text(v: &Value) -> String {
    match v {
        Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join("\n"),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Walks the explorer at `base` (where `/ui` is under) in headless
/// Chromium with `ui.mjs`; its report.
pub(crate) async fn walk(base: &str, access: &str, admin: &str, shots: &std::path::Path) -> Value {
    let args = vec![
        base.to_string(),
        access.to_string(),
        admin.to_string(),
        SEARCHES[0].to_string(),
        SEARCHES[1].to_string(),
        shots.display().to_string(),
    ];
    let out = crate::common::clients::run("node".into(), "browser/ui.mjs", args).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).expect("the driver's report")
}

/// What the walk of the scenario must have seen, with the explorer at
/// `base` and its session cookie scoped to `cookie_path`.
pub(crate) fn check_walk(
    r: &Value,
    base: &str,
    cookie_path: &str,
    (access, admin): (&str, &str),
    (ann, bob): (&str, &str),
    shots: &std::path::Path,
) {
    let step = |name: &str| r["steps"][name].clone();

    // Nothing off this machine, no console error (a CSP violation is
    // one), and no token in any URL.
    assert_eq!(r["offsite"], json!([]), "{r}");
    assert_eq!(r["console"], json!([]), "{r}");
    for url in r["urls"].as_array().unwrap() {
        let url = url.as_str().unwrap();
        assert!(!url.contains(access) && !url.contains(admin), "{url}");
    }

    let wrong = step("wrong_token");
    assert_eq!(wrong["status"], 401, "{wrong}");
    assert!(text(&wrong["text"]).contains("not valid"), "{wrong}");
    assert_eq!(wrong["cookies"], json!([]), "{wrong}");
    assert!(text(&wrong["console"]).contains("401"), "{wrong}");

    let signed = step("signed_in");
    assert_eq!(signed["url"], format!("{base}/ui"), "{signed}");
    assert_eq!(
        signed["cookies"],
        json!([{"name": "kindred_session", "httpOnly": true, "sameSite": "Strict", "path": cookie_path}])
    );
    assert_eq!(signed["script_can_read_cookie"], "", "{signed}");
    assert!(text(&signed["header"]).contains("read only"), "{signed}");

    let p = step("profile");
    assert_eq!(p["status"], 200, "{p}");
    assert_eq!(p["url"], format!("{base}/ui/profiles/{ann}"), "{p}");
    assert!(text(&p["csp"]).contains("default-src 'none'"), "{p}");
    let graph = text(&p["graph"]);
    for expected in [
        "refused: anonymous_id:phone",
        "anonymous_id:phone",
        "anonymous_id:laptop",
        "email:ann.lee@example.com",
        "user_id:ann",
        "merged in",
        "through",
    ] {
        assert!(
            graph.contains(expected),
            "{expected} missing from the graph: {graph}"
        );
    }
    let traits = text(&p["traits"]);
    assert!(
        traits.contains(SCRIPT),
        "the markup is shown as text: {traits}"
    );
    assert_eq!(p["script_ran"], Value::Null, "{p}");
    assert_eq!(p["script_elements"], 0, "{p}");
    assert!(text(&p["computed"]).contains("buyers"), "{p}");
    assert!(text(&p["events"]).contains("Order Completed"), "{p}");
    assert!(text(&p["events"]).contains("identify"), "{p}");

    let f = step("filtered");
    assert!(text(&f["events"]).contains("Order Completed"), "{f}");
    assert!(!text(&f["events"]).contains("identify"), "{f}");

    // Her account, opened from her page: its traits and its users.
    let acct = step("account");
    assert_eq!(acct["url"], format!("{base}/ui/accounts/acme"), "{acct}");
    assert!(text(&acct["text"]).contains("Acme Inc"), "{acct}");
    assert!(text(&acct["text"]).contains(ann), "{acct}");

    // Bob's side of the shared device: the phone refused, owned by Ann.
    let o = step("other");
    assert_eq!(o["url"], format!("{base}/ui/profiles/{bob}"), "{o}");
    let refused = format!("{}\n{}", text(&o["graph"]), text(&o["refused"]));
    assert!(refused.contains("refused: anonymous_id:phone"), "{o}");
    assert!(text(&o["refused"]).contains(ann), "{o}");

    let c = step("computations");
    assert!(text(&c["text"]).contains("buyers"), "{c}");
    let a = step("audience");
    assert_eq!(
        a["url"],
        format!("{base}/ui/computations/audience/buyers"),
        "{a}"
    );
    assert!(text(&a["text"]).contains(ann), "{a}");
    assert!(!text(&a["text"]).contains(bob), "{a}");

    assert_eq!(step("settings_read")["editable"], 0);
    assert!(text(&step("settings_read")["text"]).contains("anonymous_id"));
    assert!(text(&step("destinations_read")["text"]).contains("Destinations"));
    assert_eq!(step("signed_out")["cookies"], json!([]));
    let admin = step("settings_admin");
    assert_eq!(admin["editable"], 1, "{admin}");
    assert!(text(&admin["header"]).contains("admin"), "{admin}");
    for name in [
        "profile",
        "account",
        "shared-device",
        "audience",
        "settings",
        "destinations",
    ] {
        assert!(shots.join(format!("{name}.png")).is_file(), "{name}.png");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_explorer_in_a_browser_shows_a_merged_profile_its_graph_and_its_audience() {
    if browser_tools().is_none() {
        return;
    }
    let s = Server::start().await;
    let (ann, bob) = scenario(&s).await;
    let (access, admin) = (&s.space.access_token, &s.space.admin_token);
    let r = walk(&s.base, access, admin, &shots()).await;
    check_walk(&r, &s.base, "/ui", (access, admin), (&ann, &bob), &shots());
}

/// A client that keeps no cookies: each request carries exactly the
/// headers given.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Signs in with `token` over plain HTTP; the session cookie to send.
async fn signed_in(base: &str, token: &str) -> String {
    let r = client()
        .post(format!("{base}/ui/session"))
        .form(&[("token", token)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let set = r.headers()["set-cookie"].to_str().unwrap();
    set.split(';').next().unwrap().to_string()
}

/// Signs in over plain HTTP and returns the session cookie it set.
async fn sign_in(s: &Server, token: &str) -> reqwest::Response {
    client()
        .post(format!("{}/ui/session", s.base))
        .form(&[("token", token)])
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_explorer_keeps_each_space_to_itself_and_refuses_forms_from_other_sites() {
    let s = Server::start_for_local_receivers().await;
    let (ann, _bob) = scenario(&s).await;
    let r = s
        .admin(
            "PUT",
            "/destinations/crm",
            Some(&json!({"kind": "webhook", "url": "http://127.0.0.1:9/hook-with-a-key"})),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.body);
    let other = s.running.local.store.create_space("other").unwrap();
    let c = client();
    let get = |path: &str, cookie: Option<&str>| {
        let mut r = c.get(format!("{}{path}", s.base));
        if let Some(cookie) = cookie {
            r = r.header("cookie", cookie);
        }
        r.send()
    };

    // Signing in starts a session: its random id (never the token) in an
    // HttpOnly, SameSite=Strict cookie for /ui that lasts 12 hours, and a
    // redirect to a URL without either.
    let r = sign_in(&s, &s.space.access_token).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()["location"], "/ui");
    let cookie = r.headers()["set-cookie"].to_str().unwrap();
    let (pair, attributes) = cookie.split_once("; ").unwrap();
    assert_eq!(
        attributes,
        "Path=/ui; HttpOnly; SameSite=Strict; Max-Age=43200"
    );
    let id = pair.strip_prefix("kindred_session=").unwrap();
    assert_eq!(id.len(), 43, "{cookie}");
    assert!(!cookie.contains(&s.space.access_token), "{cookie}");
    let access = pair.to_string();
    let admin = signed_in(&s.base, &s.space.admin_token).await;
    let other_access = signed_in(&s.base, &other.access_token).await;
    let other_admin = signed_in(&s.base, &other.admin_token).await;
    // A made-up session, or the token itself as the cookie, is no session.
    for forged in [
        format!("kindred_session={}", "A".repeat(43)),
        format!("kindred_session={}", s.space.access_token),
    ] {
        let r = get(&format!("/ui/profiles/{ann}"), Some(&forged))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    // Behind HTTPS, a __Host- cookie for the whole host (no sibling
    // subdomain can plant one).
    let r = client()
        .post(format!("{}/ui/session", s.base))
        .header("x-forwarded-proto", "https")
        .form(&[("token", s.space.access_token.as_str())])
        .send()
        .await
        .unwrap();
    let cookie = r.headers()["set-cookie"].to_str().unwrap();
    assert!(cookie.starts_with("__Host-kindred_session="), "{cookie}");
    assert!(
        cookie.ends_with("; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=43200"),
        "{cookie}"
    );
    // Over HTTPS only that cookie counts: a plain one (which a sibling
    // host could have planted) is no session there.
    let host_pair = cookie.split(';').next().unwrap().to_string();
    let plain_pair = host_pair.replacen("__Host-", "", 1);
    for (pair, status) in [
        (&host_pair, StatusCode::OK),
        (&plain_pair, StatusCode::UNAUTHORIZED),
    ] {
        let r = c
            .get(format!("{}/ui/profiles/{ann}", s.base))
            .header("x-forwarded-proto", "https")
            .header("cookie", pair.as_str())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{pair}");
    }
    // A write key is not a sign-in.
    let r = sign_in(&s, &s.space.write_key).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().get("set-cookie").is_none());

    // Without a session, a page is the sign-in form with a 401.
    let r = get(&format!("/ui/profiles/{ann}"), None).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.text().await.unwrap().contains("name=\"token\""));

    // Every page has the strict policy.
    let r = get(&format!("/ui/profiles/{ann}"), Some(&access))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(r.headers()["cache-control"], "no-store");
    let page = r.text().await.unwrap();
    assert!(page.contains("&lt;script&gt;window.pwned=1&lt;/script&gt;"));
    assert!(!page.contains(SCRIPT));

    // Another space's tokens see none of this space's profiles, members
    // or settings.
    for cookie in [&other_access, &other_admin] {
        let r = get(&format!("/ui/profiles/{ann}"), Some(cookie))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let r = c
            .post(format!("{}/ui/search", s.base))
            .header("cookie", cookie)
            .form(&[("q", "user_id:ann")])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let r = get("/ui/computations/audience/buyers", Some(cookie))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let r = get("/ui/settings", Some(cookie)).await.unwrap();
        assert!(r.text().await.unwrap().contains("<b>other</b>"));
    }

    // A search is posted (the identifier stays out of the URL) and
    // leads to the profile's page.
    let r = c
        .post(format!("{}/ui/search", s.base))
        .header("cookie", &access)
        .form(&[("q", "email:ANN.LEE@example.com")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()["location"], format!("/ui/profiles/{ann}"));

    // A destination's endpoint is the admin token's to read.
    let page = |cookie: &str| {
        let r = get("/ui/destinations/crm", Some(cookie));
        async move { r.await.unwrap().text().await.unwrap() }
    };
    assert!(!page(&access).await.contains("hook-with-a-key"));
    assert!(page(&admin).await.contains("hook-with-a-key"));
    let list = get("/ui/destinations", Some(&access))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(list.contains(">webhook<"), "{list}");

    // The admin token changes settings; an access token may not, and a
    // form posted from another site is refused before it is read.
    let mut settings: Value = s.admin("GET", "/identity_settings", None).await.body;
    settings["profile_api_requests_per_second"] = json!(77);
    let form = [("settings", settings.to_string())];
    let post = |cookie: &str, origin: &str| {
        c.post(format!("{}/ui/settings", s.base))
            .header("cookie", cookie)
            .header("origin", origin)
            .form(&form)
            .send()
    };
    let r = post(&access, &s.base).await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = post(&admin, "https://evil.example").await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_ne!(
        s.admin("GET", "/identity_settings", None).await.body["profile_api_requests_per_second"],
        77
    );
    let r = post(&admin, &s.base).await.unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        s.admin("GET", "/identity_settings", None).await.body["profile_api_requests_per_second"],
        77
    );
    // Bad settings are refused with the reason, and change nothing.
    let r = c
        .post(format!("{}/ui/settings", s.base))
        .header("cookie", &admin)
        .form(&[("settings", "{\"types\": 5}")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        s.admin("GET", "/identity_settings", None).await.body["profile_api_requests_per_second"],
        77
    );

    // Signing out ends the session on the server (a copy of its cookie
    // is worth nothing afterwards) and clears the cookie; the admin
    // session goes on.
    let r = c
        .post(format!("{}/ui/session/end", s.base))
        .header("cookie", &access)
        .send()
        .await
        .unwrap();
    assert!(r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    let r = get(&format!("/ui/profiles/{ann}"), Some(&access))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = get(&format!("/ui/profiles/{ann}"), Some(&admin))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // Revoking the token a session was started with ends it at once.
    let admin_id = s.space.admin_token.split('_').nth(1).unwrap()[..12].to_string();
    let second_admin = s
        .admin("POST", "/tokens", Some(&json!({"kind": "admin_token"})))
        .await;
    assert!(second_admin.status.is_success(), "{}", second_admin.body);
    let r = s
        .admin("DELETE", &format!("/tokens/{admin_id}"), None)
        .await;
    assert!(r.status.is_success(), "{}", r.body);
    let r = get(&format!("/ui/profiles/{ann}"), Some(&admin))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}
