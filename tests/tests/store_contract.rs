//! One contract for the store ports (identity graph, profiles, spaces),
//! run against the embedded SQLite adapter and against the DynamoDB
//! adapter on DynamoDB Local. Each case gets a fresh store.

use kindred_aws::dynamo::DynamoGraph;
use kindred_aws::DynamoStore;
use kindred_domain::event::Envelope;
use kindred_domain::{Event, Identifier, IdentityRules, IdentitySettings, Incoming};
use kindred_sqlite::{OptimisticGraph, SqliteStore};
use kindred_store::identity::{process_event, Job, Outcome, SpaceRules};
use kindred_store::ports::{
    Applied, EventQuery, EventRecord, IdentityGraph, ProfileLookup, ProfileParts, Profiles,
    Revoked, Spaces,
};
use kindred_store::token::{new_profile_id, TokenKind};
use kindred_store::StoreError;
use serde_json::{json, Value};

/// What the contract needs of an adapter besides its ports.
trait Adapter: Profiles + Spaces {
    type Graph<'a>: IdentityGraph
    where
        Self: 'a;
    fn graph(&self) -> Self::Graph<'_>;
}

impl Adapter for SqliteStore {
    type Graph<'a> = OptimisticGraph<'a>;
    fn graph(&self) -> OptimisticGraph<'_> {
        OptimisticGraph::new(self)
    }
}

impl Adapter for DynamoStore {
    type Graph<'a> = DynamoGraph<'a>;
    fn graph(&self) -> DynamoGraph<'_> {
        DynamoStore::graph(self)
    }
}

/// Received on 2026-06-01, after every event time of these tests.
fn parse(value: Value) -> Event {
    Event::parse(
        value,
        Envelope {
            kind: None,
            received_at: 1_780_272_000_000,
            batch_sent_at: None,
            generated_message_id: "unused",
            future_tolerance: kindred_domain::event::DEFAULT_FUTURE_TOLERANCE,
        },
    )
    .expect("a valid test event")
}

async fn send<A: Adapter>(a: &A, space: &str, rules: &IdentityRules, value: Value) -> Outcome {
    let event = parse(value);
    let body = Value::Object(event.body.clone()).to_string();
    let job = Job {
        space_id: space,
        source_id: "src_contract",
        event: &event,
        body_json: &body,
        now: 1_767_225_600_000,
    };
    let rules = SpaceRules {
        rules: rules.clone(),
    };
    process_event(&mut a.graph(), &rules, &job, new_profile_id)
        .await
        .expect("the pipeline applies the event")
}

fn identify(
    message_id: &str,
    anonymous_id: &str,
    user_id: Option<&str>,
    traits: Value,
    at: &str,
) -> Value {
    let mut event = json!({
        "type": "identify", "messageId": message_id, "anonymousId": anonymous_id,
        "traits": traits, "timestamp": at,
    });
    if let Some(user_id) = user_id {
        event["userId"] = json!(user_id);
    }
    event
}

fn by(kind: &str, value: &str) -> ProfileLookup {
    ProfileLookup::Identifier(Identifier::new(kind, value))
}

async fn root_of<A: Adapter>(a: &A, space: &str, lookup: ProfileLookup) -> Option<String> {
    a.profile(space, &lookup, ProfileParts::default())
        .await
        .unwrap()
        .map(|p| p.profile_id)
}

async fn an_identify_creates_a_profile_with_traits_and_identifiers<A: Adapter>(a: &A, space: &str) {
    let rules = IdentityRules::default();
    let outcome = send(
        a,
        space,
        &rules,
        identify(
            "m1",
            "anon-1",
            Some("u1"),
            json!({"email": "Ada@Example.com", "plan": "pro"}),
            "2026-01-01T00:00:00Z",
        ),
    )
    .await;
    assert!(
        matches!(
            outcome,
            Outcome::Recorded {
                created: true,
                merged: 0,
                ..
            }
        ),
        "{outcome:?}"
    );
    let doc = a
        .profile(space, &by("email", "ada@example.com"), ProfileParts::ALL)
        .await
        .unwrap()
        .expect("found by its normalized email");
    assert_eq!(doc.traits["plan"].value, json!("pro"));
    let mut ids: Vec<String> = doc
        .external_ids
        .iter()
        .map(|e| format!("{}:{}", e.id.kind, e.id.value))
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        ["anonymous_id:anon-1", "email:ada@example.com", "user_id:u1"]
    );
    assert!(doc.external_ids.iter().all(|e| e.first_message_id == "m1"));
    assert_eq!(doc.last_message_id, "m1");
    assert_eq!(
        root_of(a, space, ProfileLookup::ProfileId(doc.profile_id.clone())).await,
        Some(doc.profile_id)
    );
    assert_eq!(root_of(a, space, by("user_id", "nobody")).await, None);
}

async fn a_shared_email_merges_two_devices<A: Adapter>(a: &A, space: &str) {
    let rules = IdentityRules::default();
    send(
        a,
        space,
        &rules,
        identify(
            "m1",
            "phone",
            None,
            json!({"email": "bo@x.io", "color": "red"}),
            "2026-01-01T00:00:00Z",
        ),
    )
    .await;
    send(
        a,
        space,
        &rules,
        identify(
            "m2",
            "laptop",
            Some("bo"),
            json!({"color": "blue"}),
            "2026-01-02T00:00:00Z",
        ),
    )
    .await;
    let phone = root_of(a, space, by("anonymous_id", "phone"))
        .await
        .unwrap();
    let laptop = root_of(a, space, by("anonymous_id", "laptop"))
        .await
        .unwrap();
    assert_ne!(phone, laptop, "nothing links the devices yet");
    // An older event with the email arrives from the laptop.
    let outcome = send(
        a,
        space,
        &rules,
        identify(
            "m3",
            "laptop",
            Some("bo"),
            json!({"email": "bo@x.io", "color": "green"}),
            "2026-01-01T12:00:00Z",
        ),
    )
    .await;
    assert!(
        matches!(outcome, Outcome::Recorded { merged: 1, .. }),
        "{outcome:?}"
    );
    let doc = a
        .profile(space, &by("anonymous_id", "phone"), ProfileParts::ALL)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        root_of(a, space, by("anonymous_id", "laptop"))
            .await
            .as_ref(),
        Some(&doc.profile_id)
    );
    assert_eq!(doc.tree.len(), 2);
    assert_eq!(doc.merges, 1);
    assert_eq!(doc.merge_history.len(), 1);
    assert_eq!(doc.merge_history[0].message_id, "m3");
    // Newest by event time wins: blue (Jan 2) over green (Jan 1, 12:00).
    assert_eq!(doc.traits["color"].value, json!("blue"));
    // Both devices' events are the merged profile's, in time order.
    let query = EventQuery {
        limit: 10,
        ..EventQuery::default()
    };
    let events = a.events(space, &doc.tree, &query).await.unwrap();
    let ids: Vec<String> = events
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(&e.body).unwrap()["messageId"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ids, ["m1", "m3", "m2"]);
    // Merged-away ids still find the profile.
    let other = doc
        .tree
        .iter()
        .find(|p| **p != doc.profile_id)
        .unwrap()
        .clone();
    assert_eq!(
        root_of(a, space, ProfileLookup::ProfileId(other)).await,
        Some(doc.profile_id.clone())
    );
    assert_eq!(doc.last_message_id, "m2");
}

async fn a_repeated_message_id_is_recorded_once<A: Adapter>(a: &A, space: &str) {
    let rules = IdentityRules::default();
    let event = identify(
        "dup",
        "anon",
        Some("u"),
        json!({"n": 1}),
        "2026-01-01T00:00:00Z",
    );
    assert!(matches!(
        send(a, space, &rules, event.clone()).await,
        Outcome::Recorded { .. }
    ));
    assert_eq!(send(a, space, &rules, event).await, Outcome::Duplicate);
    let doc = a
        .profile(space, &by("user_id", "u"), ProfileParts::ALL)
        .await
        .unwrap()
        .unwrap();
    let events = a
        .events(
            space,
            &doc.tree,
            &EventQuery {
                limit: 10,
                ..EventQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(events.len(), 1);
}

async fn a_logout_without_reset_keeps_two_users_apart<A: Adapter>(a: &A, space: &str) {
    // SPEC 5: user_id allows one value per profile, so a shared device's
    // anonymous id does not merge the second user into the first.
    let rules = IdentityRules::default();
    send(
        a,
        space,
        &rules,
        identify(
            "m1",
            "shared",
            Some("alice"),
            json!({}),
            "2026-01-01T00:00:00Z",
        ),
    )
    .await;
    send(
        a,
        space,
        &rules,
        identify(
            "m2",
            "shared",
            Some("bob"),
            json!({}),
            "2026-01-01T01:00:00Z",
        ),
    )
    .await;
    let alice = root_of(a, space, by("user_id", "alice")).await.unwrap();
    let bob = root_of(a, space, by("user_id", "bob")).await.unwrap();
    assert_ne!(alice, bob);
    assert_eq!(
        root_of(a, space, by("anonymous_id", "shared")).await,
        Some(alice)
    );
}

async fn blocked_values_never_merge<A: Adapter>(a: &A, space: &str) {
    let settings = IdentitySettings {
        blocked: serde_json::from_value(json!([{"value": "test@test.com", "types": ["email"]}]))
            .unwrap(),
        ..IdentitySettings::default()
    };
    let rules = IdentityRules::new(settings).unwrap();
    send(
        a,
        space,
        &rules,
        identify(
            "m1",
            "a1",
            Some("x"),
            json!({"email": "test@test.com"}),
            "2026-01-01T00:00:00Z",
        ),
    )
    .await;
    send(
        a,
        space,
        &rules,
        identify(
            "m2",
            "a2",
            Some("y"),
            json!({"email": "test@test.com"}),
            "2026-01-01T00:00:00Z",
        ),
    )
    .await;
    assert_ne!(
        root_of(a, space, by("user_id", "x")).await,
        root_of(a, space, by("user_id", "y")).await
    );
    assert_eq!(root_of(a, space, by("email", "test@test.com")).await, None);
}

async fn a_plan_from_stale_facts_is_refused_whole<A: Adapter>(a: &A, space: &str) {
    let rules = IdentityRules::default();
    let wanted = [
        Identifier::new("user_id", "late"),
        Identifier::new("anonymous_id", "dev"),
    ];
    let mut graph = a.graph();
    let stale = graph.facts(space, &wanted).await.unwrap();
    assert!(stale.owners.is_empty());
    // Meanwhile another worker claims one of the identifiers.
    send(
        a,
        space,
        &rules,
        identify("first", "dev", None, json!({}), "2026-01-01T00:00:00Z"),
    )
    .await;
    let event = parse(identify(
        "second",
        "dev",
        Some("late"),
        json!({}),
        "2026-01-01T00:00:01Z",
    ));
    let incoming = Incoming {
        identifiers: &wanted,
        traits: event.profile_traits(),
        timestamp: event.timestamp,
        received_at: event.received_at,
        source_id: "src",
    };
    let plan = kindred_domain::resolve(&incoming, &stale, &rules, "prf_stale").plan;
    let record = EventRecord {
        event: &event,
        body_json: "{}",
        source_id: "src",
        external_ids: &[],
        group_id: None,
        account: None,
        now: 0,
    };
    let outcome = graph.apply(space, &plan, &record).await;
    assert!(matches!(outcome, Err(StoreError::Conflict)), "{outcome:?}");
    // Nothing of the refused plan was written.
    assert_eq!(root_of(a, space, by("user_id", "late")).await, None);
    assert_eq!(
        root_of(a, space, ProfileLookup::ProfileId("prf_stale".into())).await,
        None
    );
    // Re-planned on fresh facts, it applies.
    let fresh = graph.facts(space, &wanted).await.unwrap();
    let plan = kindred_domain::resolve(&incoming, &fresh, &rules, "prf_fresh").plan;
    assert_eq!(
        graph.apply(space, &plan, &record).await.unwrap(),
        Applied::Recorded
    );
    assert_eq!(
        root_of(a, space, by("user_id", "late")).await,
        root_of(a, space, by("anonymous_id", "dev")).await
    );
}

async fn events_page_in_both_directions<A: Adapter>(a: &A, space: &str) {
    let rules = IdentityRules::default();
    for i in 0..7 {
        let event = json!({"type": "track", "event": if i % 2 == 0 { "Even" } else { "Odd" },
            "messageId": format!("t{i}"), "anonymousId": "pager",
            "timestamp": format!("2026-01-01T00:00:0{i}Z")});
        send(a, space, &rules, event).await;
    }
    let doc = a
        .profile(space, &by("anonymous_id", "pager"), ProfileParts::default())
        .await
        .unwrap()
        .unwrap();
    let names = |events: &[kindred_store::ports::StoredEvent]| -> Vec<String> {
        events
            .iter()
            .map(|e| {
                serde_json::from_str::<Value>(&e.body).unwrap()["messageId"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    let first = a
        .events(
            space,
            &doc.tree,
            &EventQuery {
                limit: 3,
                ..EventQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(names(&first), ["t0", "t1", "t2"]);
    let last = first.last().unwrap();
    let next = EventQuery {
        limit: 3,
        after: Some((last.timestamp, last.seq)),
        ..EventQuery::default()
    };
    assert_eq!(
        names(&a.events(space, &doc.tree, &next).await.unwrap()),
        ["t3", "t4", "t5"]
    );
    let newest = EventQuery {
        limit: 2,
        descending: true,
        ..EventQuery::default()
    };
    let page = a.events(space, &doc.tree, &newest).await.unwrap();
    assert_eq!(names(&page), ["t6", "t5"]);
    let older = EventQuery {
        limit: 2,
        descending: true,
        after: Some((page[1].timestamp, page[1].seq)),
        ..EventQuery::default()
    };
    assert_eq!(
        names(&a.events(space, &doc.tree, &older).await.unwrap()),
        ["t4", "t3"]
    );
    let odd = EventQuery {
        limit: 10,
        include: vec!["Odd".into()],
        ..EventQuery::default()
    };
    assert_eq!(
        names(&a.events(space, &doc.tree, &odd).await.unwrap()),
        ["t1", "t3", "t5"]
    );
    let window = EventQuery {
        limit: 10,
        start: Some(first[1].timestamp),
        end: Some(first[1].timestamp + 2_000),
        exclude: vec!["Even".into()],
        ..EventQuery::default()
    };
    assert_eq!(
        names(&a.events(space, &doc.tree, &window).await.unwrap()),
        ["t1"]
    );
}

async fn settings_round_trip_and_tokens_stay_in_their_space<A: Adapter>(a: &A, space: &str) {
    let mut settings = a.identity_settings(space).await.unwrap();
    assert_eq!(settings, IdentitySettings::default());
    settings.blocked =
        serde_json::from_value(json!([{"value": "x@y.z", "types": ["email"]}])).unwrap();
    a.put_identity_settings(space, &settings).await.unwrap();
    assert_eq!(a.identity_settings(space).await.unwrap(), settings);
    assert!(matches!(
        a.put_identity_settings("no-such-space", &settings).await,
        Err(StoreError::NotFound)
    ));
    assert!(a
        .authenticate(
            "wk_notatokenatall0000000000000000000000000000",
            TokenKind::WriteKey
        )
        .await
        .unwrap()
        .is_none());
}

async fn keys_and_tokens_rotate<A: Adapter>(a: &A, space: &str) {
    // A space starts with one of each kind.
    let start = a.tokens(space).await.unwrap();
    let kinds: Vec<TokenKind> = start.iter().map(|t| t.kind).collect();
    assert_eq!(kinds.len(), 3, "{start:?}");
    for kind in [TokenKind::WriteKey, TokenKind::Access, TokenKind::Admin] {
        assert!(kinds.contains(&kind));
    }
    // Two write keys live at once, each working.
    let (old, old_secret) = a
        .create_token(space, TokenKind::WriteKey, Some("web".into()))
        .await
        .unwrap();
    let (new, new_secret) = a
        .create_token(space, TokenKind::WriteKey, Some("ios app".into()))
        .await
        .unwrap();
    assert!(new_secret.starts_with(&new.prefix()));
    for secret in [&old_secret, &new_secret] {
        let auth = a.authenticate(secret, TokenKind::WriteKey).await.unwrap();
        assert_eq!(auth.map(|a| a.space_id), Some(space.to_string()));
    }
    let listed = a.tokens(space).await.unwrap();
    assert_eq!(listed.len(), 5);
    let ios = listed.iter().find(|t| t.token_id == new.token_id).unwrap();
    assert_eq!(ios.label.as_deref(), Some("ios app"));
    assert_eq!(ios.revoked_at, None);
    // Revoked: stops working at once (this process), the other goes on.
    assert_eq!(
        a.revoke_token(space, &old.token_id).await.unwrap(),
        Revoked::Revoked
    );
    assert!(a
        .authenticate(&old_secret, TokenKind::WriteKey)
        .await
        .unwrap()
        .is_none());
    assert!(a
        .authenticate(&new_secret, TokenKind::WriteKey)
        .await
        .unwrap()
        .is_some());
    assert_eq!(
        a.revoke_token(space, &old.token_id).await.unwrap(),
        Revoked::NotFound
    );
    let listed = a.tokens(space).await.unwrap();
    assert!(listed
        .iter()
        .find(|t| t.token_id == old.token_id)
        .unwrap()
        .revoked_at
        .is_some());
    // Another space can neither see nor revoke it.
    assert_eq!(
        a.revoke_token("other", &new.token_id).await.unwrap(),
        Revoked::NotFound
    );
    assert!(a.tokens("other").await.unwrap().is_empty());
    assert!(matches!(
        a.create_token("no-such-space", TokenKind::Access, None)
            .await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        a.create_token(space, TokenKind::Access, Some("x".repeat(201)))
            .await,
        Err(StoreError::Invalid(_))
    ));
    // The last admin token stays; with a second one either may go, but
    // two racing revocations cannot remove both.
    let admin = listed.iter().find(|t| t.kind == TokenKind::Admin).unwrap();
    assert_eq!(
        a.revoke_token(space, &admin.token_id).await.unwrap(),
        Revoked::LastAdmin
    );
    let (second, _) = a.create_token(space, TokenKind::Admin, None).await.unwrap();
    let (r1, r2) = futures::future::join(
        a.revoke_token(space, &admin.token_id),
        a.revoke_token(space, &second.token_id),
    )
    .await;
    let mut outcomes = vec![r1.unwrap(), r2.unwrap()];
    outcomes.sort_by_key(|o| format!("{o:?}"));
    assert_eq!(outcomes, vec![Revoked::LastAdmin, Revoked::Revoked]);
    let live_admins = a
        .tokens(space)
        .await
        .unwrap()
        .into_iter()
        .filter(|t| t.kind == TokenKind::Admin && t.revoked_at.is_none())
        .count();
    assert_eq!(live_admins, 1);
}

macro_rules! contract {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let dir = tempfile::tempdir().unwrap();
                    let store = SqliteStore::open(dir.path()).unwrap();
                    let space = store.create_space("contract").unwrap();
                    super::$case(&*store, &space.space_id).await;
                }
            )*
        }
        mod dynamodb {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    if !kindred_tests::emulators(concat!("dynamodb::", stringify!($case))) {
                        return;
                    }
                    let store = kindred_tests::fresh_dynamo().await;
                    let space = store.create_space("contract").await.unwrap();
                    assert!(matches!(store.create_space("contract").await, Err(StoreError::AlreadyExists)));
                    let auth = store.authenticate(&space.write_key, TokenKind::WriteKey).await.unwrap();
                    assert_eq!(auth.map(|a| a.space_id), Some(space.space_id.clone()));
                    assert!(store.authenticate(&space.write_key, TokenKind::Admin).await.unwrap().is_none());
                    super::$case(&store, &space.space_id).await;
                }
            )*
        }
    };
}

/// Explorer sessions: found while live, gone once ended, expired, or once
/// their token is revoked; a session names its own space only.
async fn explorer_sessions_end_with_sign_out_expiry_and_revocation<A: Adapter>(a: &A, space: &str) {
    use kindred_store::token::hash_secret;
    let now = kindred_store::now_millis();
    let hour = 3_600_000;
    let (token, _) = a
        .create_token(space, TokenKind::Access, Some("explorer".into()))
        .await
        .unwrap();
    let (admin, _) = a.create_token(space, TokenKind::Admin, None).await.unwrap();
    let [s1, s2, s3, s4] = ["s1", "s2", "s3", "s4"].map(hash_secret);
    a.start_session(s1, &token.token_id, TokenKind::Access, now + hour)
        .await
        .unwrap();
    a.start_session(s2, &token.token_id, TokenKind::Access, now - 1)
        .await
        .unwrap();
    a.start_session(s3, &admin.token_id, TokenKind::Admin, now + hour)
        .await
        .unwrap();
    let found = a.session_auth(s1, now).await.unwrap().unwrap();
    assert_eq!(
        (found.space_id.as_str(), found.kind),
        (space, TokenKind::Access)
    );
    let found = a.session_auth(s3, now).await.unwrap().unwrap();
    assert_eq!(
        (found.space_id.as_str(), found.kind),
        (space, TokenKind::Admin)
    );
    // Expired, never started, or asked for after its end.
    assert!(a.session_auth(s2, now).await.unwrap().is_none());
    assert!(a.session_auth(s4, now).await.unwrap().is_none());
    assert!(a.session_auth(s1, now + hour).await.unwrap().is_none());
    // A session claiming another kind than its token's is nothing.
    a.start_session(s4, &token.token_id, TokenKind::Admin, now + hour)
        .await
        .unwrap();
    assert!(a.session_auth(s4, now).await.unwrap().is_none());
    // Signing out ends one session; revoking the token ends the rest.
    a.end_session(s3).await.unwrap();
    assert!(a.session_auth(s3, now).await.unwrap().is_none());
    a.end_session(s3).await.unwrap();
    assert_eq!(
        a.revoke_token(space, &token.token_id).await.unwrap(),
        Revoked::Revoked
    );
    assert!(a.session_auth(s1, now).await.unwrap().is_none());
}

contract!(
    an_identify_creates_a_profile_with_traits_and_identifiers,
    a_shared_email_merges_two_devices,
    a_repeated_message_id_is_recorded_once,
    a_logout_without_reset_keeps_two_users_apart,
    blocked_values_never_merge,
    a_plan_from_stale_facts_is_refused_whole,
    events_page_in_both_directions,
    settings_round_trip_and_tokens_stay_in_their_space,
    keys_and_tokens_rotate,
    explorer_sessions_end_with_sign_out_expiry_and_revocation,
);
