use std::collections::BTreeSet;

use serde_json::{json, Value};

use super::calls::*;
use super::delivery::*;
use super::settings::*;
use crate::compute::Class;
use crate::resolve::IdentifierEntry;
use crate::Identifier;
use crate::Millis;

fn entry(kind: &str, value: &str, at: Millis) -> IdentifierEntry {
    IdentifierEntry {
        id: Identifier::new(kind, value),
        added_at: at,
    }
}

fn settings(body: Value) -> Settings {
    Settings::parse(&body).unwrap().0
}

#[test]
fn settings_validate_and_name_the_bad_field() {
    let (s, secret) =
        Settings::parse(&json!({"kind": "webhook", "url": "http://x/hook", "secret": "s3"}))
            .unwrap();
    assert_eq!(secret.as_deref(), Some("s3"));
    assert_eq!(s.strategy, Strategy::LastAdded);
    assert_eq!(s.batch_size, 1);
    assert!(s.identify && s.track && s.enabled && !s.alias_on_merge);
    assert!(s.to_json().get("secret").is_none());
    let s =
        settings(json!({"kind": "segment", "host": "https://api.segment.io/", "write_key": "wk"}));
    assert_eq!(s.request_url(), "https://api.segment.io/v1/batch");
    assert_eq!(s.batch_size, MAX_BATCH);
    for (body, field) in [
        (json!([]), "body"),
        (json!({"url": "http://x"}), "kind"),
        (json!({"kind": "email", "url": "http://x"}), "kind"),
        (json!({"kind": "webhook"}), "url"),
        (json!({"kind": "webhook", "url": "ftp://x"}), "url"),
        (json!({"kind": "webhook", "url": "http://"}), "url"),
        (json!({"kind": "webhook", "host": "http://x"}), "host"),
        (
            json!({"kind": "segment", "host": "http://x", "secret": "s"}),
            "secret",
        ),
        (
            json!({"kind": "webhook", "url": "http://x", "keys": [1]}),
            "keys[0]",
        ),
        (
            json!({"kind": "webhook", "url": "http://x", "calls": ["page"]}),
            "calls[0]",
        ),
        (
            json!({"kind": "webhook", "url": "http://x", "calls": []}),
            "calls",
        ),
        (
            json!({"kind": "webhook", "url": "http://x", "id_sync": {"strategy": "newest"}}),
            "id_sync.strategy",
        ),
        (
            json!({"kind": "webhook", "url": "http://x", "id_sync": {"types": []}}),
            "id_sync.types",
        ),
        (
            json!({"kind": "webhook", "url": "http://x", "id_sync": {"limit": 1}}),
            "id_sync.limit",
        ),
        (
            json!({"kind": "webhook", "url": "http://x", "batch_size": 0}),
            "batch_size",
        ),
        (
            json!({"kind": "webhook", "url": "http://x", "batch_size": 101}),
            "batch_size",
        ),
        (
            json!({"kind": "webhook", "url": "http://x", "alias_on_merge": "yes"}),
            "alias_on_merge",
        ),
        (
            json!({"kind": "webhook", "url": "http://x", "secret": ""}),
            "secret",
        ),
        (
            json!({"kind": "webhook", "url": "http://x", "colour": "red"}),
            "colour",
        ),
    ] {
        let err = Settings::parse(&body).unwrap_err();
        assert_eq!(err.field, field, "{body}: {err}");
    }
}

fn audience_change<'a>(new: &'a Value) -> ChangeEntry<'a> {
    ChangeEntry {
        seq: Some(7),
        key: "vip",
        class: Class::Audience,
        new,
        at: "2026-11-29T10:00:00.000Z",
        group_id: None,
    }
}

#[test]
fn the_all_strategy_sends_one_call_per_identifier_value() {
    let s = settings(
        json!({"kind": "webhook", "url": "http://x", "calls": ["track"],
        "id_sync": {"strategy": "all", "types": ["email", "user_id"]}}),
    );
    let ids = [
        entry("anonymous_id", "a1", 1),
        entry("email", "A@x.io", 2),
        entry("user_id", "u1", 3),
        entry("email", "b@x.io", 4),
    ];
    let t = json!(true);
    let calls = change_calls("sp", "d1", &s, "prf_1", &ids, &audience_change(&t));
    assert_eq!(calls.len(), 3);
    assert_eq!(calls[0]["event"], "Audience Entered");
    assert_eq!(calls[0]["context"]["traits"]["email"], "a@x.io");
    assert_eq!(
        calls[0]["userId"], "u1",
        "an email call carries the profile's user id"
    );
    assert_eq!(calls[1]["userId"], "u1");
    assert!(calls[1]["context"].get("traits").is_none());
    assert_eq!(calls[2]["context"]["traits"]["email"], "b@x.io");
    assert_eq!(
        calls[0]["context"]["personas"]["computation_class"],
        "audience"
    );
    assert_eq!(calls[0]["context"]["personas"]["computation_key"], "vip");
    assert_eq!(calls[0]["context"]["personas"]["space_id"], "sp");
    let mids: BTreeSet<&str> = calls
        .iter()
        .map(|c| c["messageId"].as_str().unwrap())
        .collect();
    assert_eq!(mids.len(), 3, "one messageId per identifier");
    // Deterministic per (change, destination, identifier).
    assert_eq!(
        change_calls("sp", "d1", &s, "prf_1", &ids, &audience_change(&t)),
        calls
    );
    let other = change_calls("sp", "d2", &s, "prf_1", &ids, &audience_change(&t));
    assert_ne!(other[0]["messageId"], calls[0]["messageId"]);
}

#[test]
fn first_and_last_added_send_one_call_with_one_value_per_type() {
    let ids = [
        entry("email", "first@x.io", 1),
        entry("user_id", "u1", 2),
        entry("email", "last@x.io", 3),
        entry("anonymous_id", "a1", 4),
    ];
    let f = json!(false);
    for (strategy, email) in [("first_added", "first@x.io"), ("last_added", "last@x.io")] {
        let s = settings(json!({"kind": "webhook", "url": "http://x",
            "id_sync": {"strategy": strategy, "types": ["user_id", "email"]}}));
        let calls = change_calls("sp", "d", &s, "p", &ids, &audience_change(&f));
        assert_eq!(calls.len(), 2, "{strategy}");
        assert_eq!(calls[0]["type"], "identify");
        assert_eq!(calls[0]["traits"], json!({"vip": false, "email": email}));
        assert_eq!(calls[0]["userId"], "u1");
        assert!(calls[0].get("anonymousId").is_none(), "not a listed type");
        assert_eq!(calls[1]["event"], "Audience Exited");
        assert_eq!(calls[1]["context"]["traits"]["email"], email);
    }
    // No identifier of the listed types: nothing to send.
    let s =
        settings(json!({"kind": "webhook", "url": "http://x", "id_sync": {"types": ["phone"]}}));
    assert!(change_calls("sp", "d", &s, "p", &ids, &audience_change(&f)).is_empty());
    // An unselected key: nothing.
    let s = settings(json!({"kind": "webhook", "url": "http://x", "keys": ["other"]}));
    assert!(change_calls("sp", "d", &s, "p", &ids, &audience_change(&f)).is_empty());
}

#[test]
fn traits_become_identify_and_trait_computed() {
    let s = settings(json!({"kind": "segment", "host": "http://x", "write_key": "k"}));
    let v = json!(42.5);
    let change = ChangeEntry {
        seq: None,
        key: "ltv",
        class: Class::ComputedTrait,
        new: &v,
        at: "2026-11-29T10:00:00.000Z",
        group_id: None,
    };
    let calls = change_calls("sp", "d", &s, "p", &[entry("user_id", "u", 1)], &change);
    assert_eq!(calls[0]["traits"]["ltv"], 42.5);
    assert_eq!(calls[1]["event"], "Trait Computed");
    assert_eq!(
        calls[1]["properties"],
        json!({"trait_key": "ltv", "ltv": 42.5})
    );
    assert!(worth_initial_sync(Class::ComputedTrait, &v));
    assert!(!worth_initial_sync(Class::Audience, &json!(false)));
}

#[test]
fn alias_names_the_merged_away_and_the_surviving_user() {
    let child = [entry("anonymous_id", "anon", 1)];
    let parent = [entry("user_id", "u1", 0), entry("anonymous_id", "anon", 1)];
    let a = alias_call("sp", "d", 3, &child, &parent, "t").unwrap();
    assert_eq!(a["previousId"], "anon");
    assert_eq!(a["userId"], "u1");
    assert_eq!(a, alias_call("sp", "d", 3, &child, &parent, "t").unwrap());
    let child = [entry("user_id", "old", 1), entry("anonymous_id", "anon", 1)];
    assert_eq!(
        alias_call("sp", "d", 3, &child, &parent, "t").unwrap()["previousId"],
        "old"
    );
    assert!(alias_call("sp", "d", 3, &[entry("email", "e@x", 1)], &parent, "t").is_none());
    // Merged into an anonymous profile: its anonymous id becomes the user.
    let anon_parent = [entry("anonymous_id", "a0", 0), entry("user_id", "u7", 2)];
    let a = alias_call(
        "sp",
        "d",
        4,
        &[entry("user_id", "u7", 2)],
        &anon_parent,
        "t",
    )
    .unwrap();
    assert_eq!(
        (a["previousId"].as_str(), a["userId"].as_str()),
        (Some("a0"), Some("u7"))
    );
    // Nobody has a user id: nothing to alias to.
    assert!(alias_call(
        "sp",
        "d",
        5,
        &[entry("anonymous_id", "a1", 1)],
        &[entry("anonymous_id", "a0", 0)],
        "t"
    )
    .is_none());
}

#[test]
fn a_stored_secret_does_not_follow_a_new_kind_or_segment_host() {
    let hook = settings(json!({"kind": "webhook", "url": "http://a"}));
    let seg = settings(json!({"kind": "segment", "host": "http://a", "write_key": "k"}));
    let other_host = settings(json!({"kind": "segment", "host": "http://evil", "write_key": "k"}));
    let other_url = settings(json!({"kind": "webhook", "url": "http://b"}));
    assert_eq!(seg.secret_needed_after(&hook).unwrap().field, "write_key");
    assert_eq!(hook.secret_needed_after(&seg).unwrap().field, "secret");
    assert!(other_host.secret_needed_after(&seg).is_some());
    assert!(seg.secret_needed_after(&seg).is_none());
    // A webhook secret only signs: a new URL may keep it.
    assert!(other_url.secret_needed_after(&hook).is_none());
}

#[test]
fn a_replace_resyncs_only_what_it_adds() {
    let some =
        |keys: &[&str]| settings(json!({"kind": "webhook", "url": "http://a", "keys": keys}));
    let all = settings(json!({"kind": "webhook", "url": "http://a"}));
    assert_eq!(
        some(&["a", "b"]).resync_keys(&some(&["a"])),
        Resync::Keys(BTreeSet::from(["b".to_string()]))
    );
    assert_eq!(
        some(&["a"]).resync_keys(&some(&["a", "b"])),
        Resync::Nothing
    );
    assert_eq!(all.resync_keys(&some(&["a"])), Resync::Every);
    assert_eq!(some(&["a"]).resync_keys(&all), Resync::Nothing);
    let off = settings(json!({"kind": "webhook", "url": "http://a", "enabled": false}));
    assert_eq!(all.resync_keys(&off), Resync::Every);
    // A pass still pending keeps its keys and gains the added ones.
    let b = BTreeSet::from(["b".to_string()]);
    let c = BTreeSet::from(["c".to_string()]);
    let bc = BTreeSet::from(["b".to_string(), "c".to_string()]);
    let abc = some(&["a", "b", "c"]);
    assert_eq!(
        abc.pending_after(&some(&["a", "b"]), true, Some(b.clone())),
        (true, Some(bc))
    );
    assert_eq!(
        abc.pending_after(&some(&["a", "b"]), false, None),
        (true, Some(c))
    );
    assert_eq!(
        abc.pending_after(&abc, true, Some(b.clone())),
        (true, Some(b))
    );
    assert_eq!(abc.pending_after(&abc, false, None), (false, None));
    assert_eq!(
        abc.pending_after(&some(&["a", "b"]), true, None),
        (true, None)
    );
}

#[test]
fn signatures_are_hmac_sha256_of_the_timestamp_and_body() {
    // HMAC-SHA256 of "1700000000." + the body, as Python's hmac computes it.
    let sig = sign("Jefe", 1_700_000_000, b"what do ya want for nothing?");
    assert_eq!(
        sig,
        "sha256=1cdd0650c8be1cb0974b1788d458b1e781206cfef59b85faafc582d2e182c57e"
    );
    let body = b"what do ya want for nothing?";
    let ok = |ts: &str, sig: &str, body: &[u8], now: i64| {
        verify_signature("Jefe", ts, sig, body, now, SIGNATURE_TOLERANCE_SECS)
    };
    assert!(ok("1700000000", &sig, body, 1_700_000_100));
    // Replayed ten minutes later: refused.
    assert!(!ok("1700000000", &sig, body, 1_700_000_600));
    // A fresh timestamp on an old signature: refused.
    assert!(!ok("1700000500", &sig, body, 1_700_000_500));
    assert!(!ok(
        "1700000000",
        &sig,
        b"what do ya want for something?",
        1_700_000_000
    ));
    assert!(!ok("1700000000", "sha256=zz", body, 1_700_000_000));
    assert!(!ok("soon", &sig, body, 1_700_000_000));
    assert!(!verify_signature(
        "other",
        "1700000000",
        &sig,
        body,
        1_700_000_000,
        300
    ));
}

#[test]
fn internal_addresses_are_recognised() {
    for ip in [
        "127.0.0.1",
        "127.1.2.3",
        "10.0.0.1",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "100.127.255.255",
        "0.0.0.0",
        "255.255.255.255",
        "224.0.0.1",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd12:3456::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "64:ff9b::a00:1",
        "2002:7f00:1::",
        "::127.0.0.1",
        "64:ff9b:1::a00:1",
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",
    ] {
        assert!(is_internal(ip.parse().unwrap()), "{ip}");
    }
    for ip in [
        "8.8.8.8",
        "1.1.1.1",
        "100.128.0.1",
        "172.32.0.1",
        "2606:4700::1111",
        "::ffff:8.8.8.8",
    ] {
        assert!(!is_internal(ip.parse().unwrap()), "{ip}");
    }
}

#[test]
fn reach_refuses_internal_literals_localhost_and_clear_segment_keys() {
    let refused = [
        json!({"kind": "webhook", "url": "http://127.0.0.1:9000/hook"}),
        json!({"kind": "webhook", "url": "http://169.254.169.254/latest/meta-data"}),
        json!({"kind": "webhook", "url": "http://10.0.0.1/"}),
        json!({"kind": "webhook", "url": "http://[::1]:8080/"}),
        // Other spellings of 127.0.0.1 that URL parsers accept.
        json!({"kind": "webhook", "url": "http://2130706433/"}),
        json!({"kind": "webhook", "url": "http://0x7f.1/"}),
        json!({"kind": "webhook", "url": "http://localhost:3000/"}),
        json!({"kind": "webhook", "url": "http://api.LOCALHOST./"}),
        json!({"kind": "segment", "host": "http://api.example.com", "write_key": "k"}),
    ];
    for body in refused {
        let s = settings(body.clone());
        assert!(s.check_reach(false).is_err(), "{body}");
        assert!(s.check_reach(true).is_ok(), "{body}");
    }
    for body in [
        json!({"kind": "webhook", "url": "http://hooks.example.com/x"}),
        json!({"kind": "webhook", "url": "https://8.8.8.8/x"}),
        json!({"kind": "segment", "host": "https://api.segment.io", "write_key": "k"}),
    ] {
        assert!(settings(body.clone()).check_reach(false).is_ok(), "{body}");
    }
    // Credentials in the URL are refused outright (they hide the host).
    let err =
        Settings::parse(&json!({"kind": "webhook", "url": "http://x@127.0.0.1/"})).unwrap_err();
    assert_eq!(err.field, "url");
}

#[test]
fn retries_back_off_exponentially_with_jitter_and_honour_retry_after() {
    assert_eq!(outcome(204, None), Outcome::Delivered);
    assert_eq!(
        outcome(429, Some(2000)),
        Outcome::Retry {
            retry_after: Some(2000)
        }
    );
    assert_eq!(outcome(503, None), Outcome::Retry { retry_after: None });
    assert_eq!(outcome(400, None), Outcome::Rejected);
    assert_eq!(
        outcome(301, None),
        Outcome::Rejected,
        "a redirect is not a delivery"
    );
    assert_eq!(retry_delay(1, 100, 10_000, 0.0, None), 50);
    assert_eq!(retry_delay(1, 100, 10_000, 0.999_999, None), 99);
    assert_eq!(retry_delay(4, 100, 10_000, 0.0, None), 400);
    assert_eq!(retry_delay(30, 100, 10_000, 0.0, None), 5_000);
    assert_eq!(retry_delay(1, 100, 10_000, 0.0, Some(3_000)), 3_000);
    assert_eq!(parse_retry_after(" 2 ", 0), Some(2_000));
    let now = chrono::DateTime::parse_from_rfc2822("Sun, 29 Nov 2026 10:00:00 GMT")
        .unwrap()
        .timestamp_millis();
    assert_eq!(
        parse_retry_after("Sun, 29 Nov 2026 10:00:05 GMT", now),
        Some(5_000)
    );
    assert_eq!(parse_retry_after("soon", now), None);
}

#[test]
fn personas_are_segment_s_for_new_destinations_and_kept_for_stored_ones() {
    let body = json!({"kind": "webhook", "url": "http://x/hook"});
    let new = settings(body.clone());
    assert_eq!(new.personas, Personas::Segment);
    let ids = [entry("user_id", "u1", 1)];
    let t = json!(true);
    let calls = change_calls("sp", "d1", &new, "prf_1", &ids, &audience_change(&t));
    let personas = &calls[0]["context"]["personas"];
    let id = personas["computation_id"].as_str().unwrap();
    assert_eq!(personas["computation_class"], "audience");
    assert_eq!(personas["computation_key"], "vip");
    assert_eq!(personas["namespace"], "spa_sp");
    assert!(id.starts_with("aud_") && id.len() == 28, "{id}");
    assert_eq!(
        id,
        crate::compute::computation_id("sp", Class::Audience, "vip"),
        "stable"
    );
    let traits = crate::compute::computation_id("sp", Class::ComputedTrait, "vip");
    assert!(traits.starts_with("tra_") && traits != id);
    assert_ne!(
        crate::compute::computation_id("other", Class::Audience, "vip"),
        id
    );

    // Stored before the setting existed: Kindred's first form, kept.
    let old = Settings::from_stored(&body).unwrap();
    assert_eq!(old.personas, Personas::KindredV1);
    let calls = change_calls("sp", "d1", &old, "prf_1", &ids, &audience_change(&t));
    let personas = &calls[0]["context"]["personas"];
    assert_eq!(personas["computation_id"], "vip");
    assert!(personas.get("namespace").is_none());
    let trait_change = ChangeEntry {
        class: Class::ComputedTrait,
        ..audience_change(&t)
    };
    let calls = change_calls("sp", "d1", &old, "prf_1", &ids, &trait_change);
    assert_eq!(
        calls[0]["context"]["personas"]["computation_class"],
        "computed_trait"
    );
    let calls = change_calls("sp", "d1", &new, "prf_1", &ids, &trait_change);
    assert_eq!(
        calls[0]["context"]["personas"]["computation_class"],
        "trait"
    );
    // What an adapter stores round-trips.
    let stored = Settings::from_stored(&new.to_json()).unwrap();
    assert_eq!(stored, new);
    assert!(
        Settings::parse(&json!({"kind": "webhook", "url": "http://x", "personas": "v9"})).is_err()
    );
}
