//! Matching and merge protection (SPEC 5), on the in-memory reference graph.

use std::collections::BTreeSet;

use kindred_domain::model::MemoryGraph;
use kindred_domain::settings::{IdentityRules, MAX_MERGES};
use kindred_domain::{Frequency, Identifier, IdentitySettings, Incoming, Limit, TypeRule};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

const DAY: i64 = 86_400_000;

fn id(kind: &str, value: &str) -> Identifier {
    Identifier::new(kind, value)
}

fn send(
    graph: &mut MemoryGraph,
    rules: &IdentityRules,
    ids: &[Identifier],
    traits: Option<&Map<String, Value>>,
    at: i64,
    message_id: &str,
) -> Option<String> {
    let incoming = Incoming {
        identifiers: ids,
        traits,
        timestamp: at,
        received_at: at,
        source_id: "src",
    };
    graph.process(&incoming, rules, message_id)
}

fn set(ids: &[Identifier]) -> BTreeSet<Identifier> {
    ids.iter().cloned().collect()
}

#[test]
fn anonymous_id_without_reset_does_not_merge_two_users() {
    let rules = IdentityRules::default();
    let mut g = MemoryGraph::default();
    let p1 = send(&mut g, &rules, &[id("anonymous_id", "a1")], None, 1, "m1").unwrap();
    let p1b = send(
        &mut g,
        &rules,
        &[id("user_id", "u1"), id("anonymous_id", "a1")],
        None,
        2,
        "m2",
    )
    .unwrap();
    assert_eq!(p1, p1b);
    let p2 = send(
        &mut g,
        &rules,
        &[id("user_id", "u2"), id("anonymous_id", "a1")],
        None,
        3,
        "m3",
    )
    .unwrap();
    assert_ne!(p1, p2);
    assert_eq!(
        g.partition(),
        BTreeSet::from([
            set(&[id("anonymous_id", "a1"), id("user_id", "u1")]),
            set(&[id("user_id", "u2")]),
        ])
    );
    // Later anonymous traffic from a1 still lands on the first profile.
    assert_eq!(
        send(&mut g, &rules, &[id("anonymous_id", "a1")], None, 4, "m4").unwrap(),
        p1
    );
}

#[test]
fn shared_email_from_a_second_device_merges_into_the_older_profile() {
    let rules = IdentityRules::default();
    let mut g = MemoryGraph::default();
    let laptop = send(
        &mut g,
        &rules,
        &[id("anonymous_id", "laptop"), id("email", "Jo@X.com")],
        None,
        1,
        "m1",
    )
    .unwrap();
    let phone = send(
        &mut g,
        &rules,
        &[id("anonymous_id", "phone")],
        None,
        2,
        "m2",
    )
    .unwrap();
    assert_ne!(laptop, phone);
    let merged = send(
        &mut g,
        &rules,
        &[id("anonymous_id", "phone"), id("email", "jo@x.com ")],
        None,
        3,
        "m3",
    )
    .unwrap();
    assert_eq!(merged, laptop, "the profile created first is the parent");
    assert_eq!(g.partition().len(), 1);
    assert_eq!(g.event_partition().into_iter().next().unwrap().len(), 3);
    let root = g.roots().next().unwrap();
    assert_eq!(root.merges, 1);
}

#[test]
fn conflicting_traits_after_a_merge_keep_the_newest_value() {
    let rules = IdentityRules::default();
    let mut g = MemoryGraph::default();
    let t = |v: Value| v.as_object().unwrap().clone();
    send(
        &mut g,
        &rules,
        &[id("anonymous_id", "a")],
        Some(&t(json!({"plan": "free", "city": "Oslo"}))),
        10,
        "m1",
    );
    send(
        &mut g,
        &rules,
        &[id("user_id", "u")],
        Some(&t(json!({"plan": "pro"}))),
        20,
        "m2",
    );
    send(
        &mut g,
        &rules,
        &[id("anonymous_id", "a"), id("user_id", "u")],
        None,
        30,
        "m3",
    );
    let root = g.roots().next().unwrap();
    assert_eq!(g.roots().count(), 1);
    assert_eq!(root.traits["plan"].value, json!("pro"));
    assert_eq!(root.traits["city"].value, json!("Oslo"));
}

#[test]
fn blocked_values_never_merge_and_the_event_is_kept() {
    let rules = IdentityRules::default();
    let mut g = MemoryGraph::default();
    let p1 = send(
        &mut g,
        &rules,
        &[id("user_id", "u1"), id("anonymous_id", "undefined")],
        None,
        1,
        "m1",
    );
    let p2 = send(
        &mut g,
        &rules,
        &[id("user_id", "u2"), id("anonymous_id", "undefined")],
        None,
        2,
        "m2",
    );
    assert_ne!(p1, p2);
    assert_eq!(g.partition().len(), 2);
    // Only blocked identifiers: kept, but not attached to anyone.
    assert_eq!(
        send(&mut g, &rules, &[id("anonymous_id", "null")], None, 3, "m3"),
        None
    );
}

#[test]
fn lowest_priority_identifier_is_dropped_first() {
    let rules = IdentityRules::default();
    let mut g = MemoryGraph::default();
    let p1 = send(
        &mut g,
        &rules,
        &[id("user_id", "u1"), id("email", "shared@x.com")],
        None,
        1,
        "m1",
    )
    .unwrap();
    // u2 arrives with the same email and a new device: the user_id limit
    // refuses the merge; the device id (lowest priority) is dropped first,
    // then the email, and u2 gets a profile of its own (SPEC 5 step 3).
    let p2 = send(
        &mut g,
        &rules,
        &[
            id("user_id", "u2"),
            id("email", "shared@x.com"),
            id("ios.id", "d2"),
        ],
        None,
        2,
        "m2",
    )
    .unwrap();
    assert_ne!(p1, p2);
    assert_eq!(
        g.partition(),
        BTreeSet::from([
            set(&[id("user_id", "u1"), id("email", "shared@x.com")]),
            set(&[id("user_id", "u2")]),
        ])
    );
}

#[test]
fn frequency_limits_count_values_added_within_the_window() {
    let rules = IdentityRules::default();
    let mut g = MemoryGraph::default();
    let user = id("user_id", "u");
    for i in 0..5 {
        send(
            &mut g,
            &rules,
            &[user.clone(), id("anonymous_id", &format!("a{i}"))],
            None,
            i,
            &format!("m{i}"),
        );
    }
    // A sixth anonymous id in the same week is dropped; the event still
    // lands on the user's profile...
    let p6 = send(
        &mut g,
        &rules,
        &[user.clone(), id("anonymous_id", "a5")],
        None,
        DAY,
        "m5",
    );
    let all = g.partition();
    assert_eq!(all.len(), 1);
    assert!(!all.iter().flatten().any(|i| i.value == "a5"));
    // ...but a week later the window has room again.
    send(
        &mut g,
        &rules,
        &[user.clone(), id("anonymous_id", "a6")],
        None,
        8 * DAY,
        "m6",
    );
    let owner_of_a6 = g
        .partition()
        .into_iter()
        .find(|p| p.contains(&id("anonymous_id", "a6")))
        .unwrap();
    assert!(owner_of_a6.contains(&user));
    assert!(p6.is_some());
}

#[test]
fn merges_stop_at_the_cap_but_events_still_resolve() {
    let mut settings = IdentitySettings::default();
    settings.types.insert(
        "device".into(),
        TypeRule {
            priority: 3,
            limit: Limit {
                count: 1000,
                frequency: Frequency::Ever,
            },
            from: Vec::new(),
        },
    );
    settings.types.get_mut("anonymous_id").unwrap().limit = Limit {
        count: 1000,
        frequency: Frequency::Ever,
    };
    let rules = IdentityRules::new(settings).unwrap();
    let mut g = MemoryGraph::default();
    let root = send(&mut g, &rules, &[id("device", "hub")], None, 0, "root").unwrap();
    for i in 0..(MAX_MERGES + 5) {
        send(
            &mut g,
            &rules,
            &[id("anonymous_id", &format!("a{i}"))],
            None,
            1 + i as i64,
            &format!("c{i}"),
        );
        let landed = send(
            &mut g,
            &rules,
            &[id("device", "hub"), id("anonymous_id", &format!("a{i}"))],
            None,
            1000 + i as i64,
            &format!("j{i}"),
        );
        assert!(landed.is_some());
    }
    let top = g.roots().find(|p| p.id == root).unwrap();
    assert_eq!(top.merges, MAX_MERGES);
    assert_eq!(g.partition().len(), 6, "five profiles stayed apart");
}

/// A random event over a small identifier universe: a few users, shared
/// devices, shared emails.
fn arb_event() -> impl Strategy<Value = Vec<Identifier>> {
    let one = prop_oneof![
        (0..4u8).prop_map(|i| id("user_id", &format!("u{i}"))),
        (0..6u8).prop_map(|i| id("anonymous_id", &format!("a{i}"))),
        (0..3u8).prop_map(|i| id("email", &format!("e{i}@x.com"))),
        (0..3u8).prop_map(|i| id("ios.id", &format!("d{i}"))),
        Just(id("anonymous_id", "null")),
    ];
    prop::collection::vec(one, 1..4)
}

fn tight_rules() -> IdentityRules {
    let mut s = IdentitySettings::default();
    s.types.get_mut("anonymous_id").unwrap().limit = Limit {
        count: 2,
        frequency: Frequency::Ever,
    };
    s.types.get_mut("email").unwrap().limit = Limit {
        count: 2,
        frequency: Frequency::Ever,
    };
    s.types.get_mut("ios.id").unwrap().limit = Limit {
        count: 1,
        frequency: Frequency::Ever,
    };
    IdentityRules::new(s).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn limits_hold_ownership_is_unique_and_every_event_is_attached_once(
        events in prop::collection::vec(arb_event(), 1..60)
    ) {
        let rules = tight_rules();
        let mut g = MemoryGraph::default();
        for (i, ids) in events.iter().enumerate() {
            send(&mut g, &rules, ids, None, i as i64, &format!("m{i}"));
        }
        let partition = g.partition();
        // Every identifier in exactly one profile.
        let total: usize = partition.iter().map(|p| p.len()).sum();
        let distinct: BTreeSet<&Identifier> = partition.iter().flatten().collect();
        prop_assert_eq!(total, distinct.len());
        // No profile over a limit.
        for profile in &partition {
            for kind in ["user_id", "anonymous_id", "email", "ios.id"] {
                let count = profile.iter().filter(|i| i.kind == kind).count();
                prop_assert!(count <= rules.rule(kind).limit.count as usize, "{kind}: {count}");
            }
            prop_assert!(!profile.contains(&id("anonymous_id", "null")));
        }
        // Every event with a usable identifier attached exactly once.
        let attached: Vec<String> = g.event_partition().into_iter().flatten().collect();
        let unique: BTreeSet<&String> = attached.iter().collect();
        prop_assert_eq!(attached.len(), unique.len());
        let usable = events.iter().filter(|ids| ids.iter().any(|i| i.value != "null")).count();
        prop_assert_eq!(attached.len(), usable);
    }

    #[test]
    fn serial_replay_is_deterministic_and_replaying_an_event_changes_nothing(
        events in prop::collection::vec(arb_event(), 1..40)
    ) {
        let rules = tight_rules();
        let mut a = MemoryGraph::default();
        let mut b = MemoryGraph::default();
        for (i, ids) in events.iter().enumerate() {
            send(&mut a, &rules, ids, None, i as i64, &format!("m{i}"));
            send(&mut b, &rules, ids, None, i as i64, &format!("m{i}"));
        }
        prop_assert_eq!(a.partition(), b.partition());
        prop_assert_eq!(a.event_partition(), b.event_partition());
        let before = a.partition();
        for (i, ids) in events.iter().enumerate() {
            send(&mut a, &rules, ids, None, 1000 + i as i64, &format!("r{i}"));
        }
        prop_assert_eq!(a.partition(), before);
    }
}

#[test]
fn a_profiles_identifiers_stay_within_256_kib() {
    let mut settings = IdentitySettings::default();
    settings.types.get_mut("anonymous_id").unwrap().limit = Limit {
        count: 1000,
        frequency: Frequency::Ever,
    };
    let rules = IdentityRules::new(settings).unwrap();
    let mut g = MemoryGraph::default();
    let root = send(&mut g, &rules, &[id("user_id", "u1")], None, 0, "root").unwrap();
    // 400 anonymous ids of 1,000 bytes each: 400 KB, over the cap.
    for i in 0..400 {
        let anon = format!("{i:04}{}", "x".repeat(996));
        let landed = send(
            &mut g,
            &rules,
            &[id("user_id", "u1"), id("anonymous_id", &anon)],
            None,
            1 + i,
            &format!("m{i}"),
        );
        assert_eq!(
            landed.as_deref(),
            Some(root.as_str()),
            "events still resolve"
        );
    }
    let top = g.roots().find(|p| p.id == root).unwrap();
    let bytes: usize = top
        .identifiers
        .iter()
        .map(|e| e.id.kind.len() + e.id.value.len())
        .sum();
    assert!(
        bytes <= kindred_domain::settings::MAX_IDENTIFIER_BYTES_PER_PROFILE,
        "{bytes}"
    );
    assert!(
        top.identifiers.len() > 200 && top.identifiers.len() < 300,
        "{}",
        top.identifiers.len()
    );
}

#[test]
fn refusals_name_each_identifier_left_out_and_the_rule() {
    use kindred_domain::{resolve, Facts, IdentifierEntry, ProfileFacts, Rule};
    let rules = IdentityRules::default();
    // SPEC 5's example: a1 is u1's; an event with a1 and u2 arrives.
    let p1 = ProfileFacts {
        id: "p1".into(),
        version: 1,
        created_at: 1,
        merges: 0,
        identifiers: vec![
            IdentifierEntry {
                id: id("anonymous_id", "a1"),
                added_at: 1,
            },
            IdentifierEntry {
                id: id("user_id", "u1"),
                added_at: 1,
            },
        ],
        traits: Default::default(),
    };
    let mut facts = Facts::default();
    facts.owners.insert(id("anonymous_id", "a1"), "p1".into());
    facts.owners.insert(id("user_id", "u1"), "p1".into());
    facts.profiles.insert("p1".into(), p1);
    let ids = [
        id("user_id", "u2"),
        id("anonymous_id", "a1"),
        id("anonymous_id", "null"),
    ];
    let incoming = Incoming {
        identifiers: &ids,
        traits: None,
        timestamp: 2,
        received_at: 2,
        source_id: "src",
    };
    let r = resolve(&incoming, &facts, &rules, "p2");
    assert_eq!(r.plan.profile_id(), Some("p2"));
    assert_eq!(r.refusals.len(), 2, "{:?}", r.refusals);
    assert_eq!(r.refusals[0].rule, Rule::Blocked);
    assert_eq!(r.refusals[0].id, id("anonymous_id", "null"));
    assert_eq!(r.refusals[0].owner, None);
    assert_eq!(
        r.refusals[1].rule,
        Rule::Limit {
            kind: "user_id".into(),
            count: 1,
            frequency: Frequency::Ever
        }
    );
    assert_eq!(r.refusals[1].id, id("anonymous_id", "a1"));
    assert_eq!(r.refusals[1].owner.as_deref(), Some("p1"));
    assert_eq!(r.refusals[1].rule.name(), "limit");
    assert_eq!(
        r.refusals[1].rule.detail(),
        json!({"type": "user_id", "count": 1, "frequency": "ever"})
    );
}

#[test]
fn profiles_split_apart_do_not_merge_again() {
    use kindred_domain::{resolve, Facts, IdentifierEntry, ProfileFacts, Rule};
    let rules = IdentityRules::default();
    let profile = |pid: &str, at: i64, ids: &[Identifier]| ProfileFacts {
        id: pid.into(),
        version: 1,
        created_at: at,
        merges: 0,
        identifiers: ids
            .iter()
            .map(|i| IdentifierEntry {
                id: i.clone(),
                added_at: at,
            })
            .collect(),
        traits: Default::default(),
    };
    let mut facts = Facts::default();
    for (pid, at, ids) in [
        (
            "parent",
            1,
            vec![id("user_id", "alice"), id("anonymous_id", "tablet")],
        ),
        ("child", 2, vec![id("email", "bob@x.io")]),
    ] {
        for i in &ids {
            facts.owners.insert(i.clone(), pid.to_string());
        }
        facts
            .profiles
            .insert(pid.to_string(), profile(pid, at, &ids));
    }
    let ids = [id("email", "bob@x.io"), id("anonymous_id", "tablet")];
    let incoming = Incoming {
        identifiers: &ids,
        traits: None,
        timestamp: 3,
        received_at: 3,
        source_id: "src",
    };
    // Without a block the two merge.
    let r = resolve(&incoming, &facts, &rules, "new");
    assert!(matches!(&r.plan, kindred_domain::Plan::Attach(a) if a.children.len() == 1));
    // Split apart: the tablet (lower priority than email) is left out,
    // and the event lands on the child alone.
    facts.apart.insert(("parent".into(), "child".into()));
    facts.apart.insert(("child".into(), "parent".into()));
    let r = resolve(&incoming, &facts, &rules, "new");
    assert_eq!(r.plan.profile_id(), Some("child"));
    assert!(matches!(&r.plan, kindred_domain::Plan::Attach(a) if a.children.is_empty()));
    assert_eq!(r.refusals.len(), 1);
    assert_eq!(r.refusals[0].rule, Rule::SplitBlock);
    assert_eq!(r.refusals[0].id, id("anonymous_id", "tablet"));
    assert_eq!(r.refusals[0].owner.as_deref(), Some("parent"));
}
