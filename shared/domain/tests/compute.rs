//! Computed traits and audiences: every trait type, condition kind and the
//! lookback rules, and the property that the incremental engine always
//! equals a from-scratch computation over the same events at the same
//! moment, across merges and pruning.

use std::collections::{BTreeMap, BTreeSet};

use kindred_domain::compute::{
    settle, Class, Definition, EventFacts, ProfileState, Ruleset, Values, HOUR_MS,
};
use kindred_domain::event::parse_time;
use kindred_domain::{Millis, TraitValue, Traits};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

const T0: Millis = 1_780_000_000_000 / HOUR_MS * HOUR_MS;

struct Ev {
    name: &'static str,
    ts: Millis,
    props: Map<String, Value>,
}

fn ev(name: &'static str, ts: Millis, props: Value) -> Ev {
    Ev {
        name,
        ts,
        props: props.as_object().cloned().unwrap_or_default(),
    }
}

impl Ev {
    fn facts(&self) -> EventFacts<'_> {
        EventFacts {
            name: self.name,
            timestamp: self.ts,
            properties: Some(&self.props),
        }
    }
}

fn def(class: Class, key: &str, body: Value) -> Definition {
    Definition::parse(class, key, 1, &body).unwrap_or_else(|e| panic!("{key}: {e}"))
}

fn trait_def(key: &str, body: Value) -> Definition {
    def(Class::ComputedTrait, key, body)
}

fn audience(key: &str, condition: Value) -> Definition {
    def(Class::Audience, key, json!({ "condition": condition }))
}

fn values(ruleset: &Ruleset, events: &[Ev], traits: &Traits, now: Millis) -> Values {
    let mut state = ruleset.fresh();
    for e in events {
        ruleset.apply(&mut state, &e.facts());
    }
    ruleset.evaluate(&state, traits, now)
}

fn one(d: Definition, events: &[Ev], now: Millis) -> Option<Value> {
    let key = d.key.clone();
    let r = Ruleset::new(vec![d]).unwrap();
    values(&r, events, &Traits::new(), now).remove(&key)
}

#[test]
fn validation_names_the_bad_field() {
    let cases = [
        (
            Class::ComputedTrait,
            json!({"type": "counter", "event": "A"}),
            "type",
        ),
        (
            Class::ComputedTrait,
            json!({"type": "event_counter"}),
            "event",
        ),
        (
            Class::ComputedTrait,
            json!({"type": "aggregation", "function": "median", "event": "A", "property": "x"}),
            "function",
        ),
        (
            Class::ComputedTrait,
            json!({"type": "aggregation", "function": "sum", "event": "A"}),
            "property",
        ),
        (
            Class::ComputedTrait,
            json!({"type": "event_counter", "event": "A", "lookback": {"weeks": 2}}),
            "lookback",
        ),
        (
            Class::ComputedTrait,
            json!({"type": "event_counter", "event": "A", "lookback": {"days": 0}}),
            "lookback.days",
        ),
        (
            Class::ComputedTrait,
            json!({"type": "event_counter", "event": "A", "where": [{"property": "x", "op": "~", "value": 1}]}),
            "where[0].op",
        ),
        (
            Class::ComputedTrait,
            json!({"type": "event_counter", "event": "A", "where": [{"property": "x", "op": ">", "value": "a"}]}),
            "where[0].value",
        ),
        (
            Class::ComputedTrait,
            json!({"type": "event_counter", "event": "A", "where": [{"property": "x", "op": "before", "value": "soon"}]}),
            "where[0].value",
        ),
        (
            Class::ComputedTrait,
            json!({"type": "event_counter", "event": "A", "colour": 1}),
            "colour",
        ),
        (Class::Audience, json!({}), "condition"),
        (
            Class::Audience,
            json!({"condition": {"performed": {"event": "A", "count": {"more_than": 1}}}}),
            "condition.performed.count.more_than",
        ),
        (
            Class::Audience,
            json!({"condition": {"and": [{"performed": {"event": "A"}}, {"oops": 1}]}}),
            "condition.and[1].oops",
        ),
        (
            Class::Audience,
            json!({"condition": {"performed": {"event": "A", "then": {"event": "B"}}}}),
            "condition.performed.then.within",
        ),
        (
            Class::Audience,
            json!({"condition": {"performed": {"event": "A", "between": ["2026-02-01T00:00:00Z", "2026-01-01T00:00:00Z"]}}}),
            "condition.performed.between",
        ),
        (
            Class::Audience,
            json!({"condition": {"not": {"trait": {"name": "x", "op": "in", "value": []}}}}),
            "condition.not.trait.value",
        ),
    ];
    for (class, body, field) in cases {
        let e = Definition::parse(class, "k", 1, &body).expect_err(&body.to_string());
        assert_eq!(e.field, field, "{body}: {e}");
    }
    assert_eq!(
        Definition::parse(Class::Audience, "bad key!", 1, &json!({}))
            .unwrap_err()
            .field,
        "key"
    );
}

#[test]
fn at_most_fifty_expressions() {
    let leaf = json!({"performed": {"event": "A"}});
    let ok = json!({"condition": {"or": vec![leaf.clone(); 49]}});
    assert!(Definition::parse(Class::Audience, "a", 1, &ok).is_ok());
    let nested =
        json!({"condition": {"and": [{"or": vec![leaf.clone(); 30]}, {"or": vec![leaf; 30]}]}});
    let e = Definition::parse(Class::Audience, "a", 1, &nested).unwrap_err();
    assert_eq!(e.field, "condition");
}

#[test]
fn audience_references_must_exist_and_not_cycle() {
    let a = audience("a", json!({"audience": "b"}));
    let b = audience("b", json!({"not": {"audience": "a"}}));
    let e = Ruleset::new(vec![a.clone(), b]).unwrap_err();
    assert!(e.message.contains("cycle"), "{e}");
    let e = Ruleset::new(vec![a.clone()]).unwrap_err();
    assert!(e.message.contains("does not exist"), "{e}");
    let own = audience(
        "own",
        json!({"trait": {"name": "own", "op": "=", "value": true}}),
    );
    assert!(Ruleset::new(vec![own]).is_err());
    // A trait condition may read a computed trait: it is evaluated first.
    let b = audience(
        "b",
        json!({"trait": {"name": "ltv", "op": ">", "value": 10}}),
    );
    let ltv = trait_def(
        "ltv",
        json!({"type": "aggregation", "function": "sum", "event": "Order Completed", "property": "revenue"}),
    );
    let r = Ruleset::new(vec![a, b, ltv]).unwrap();
    let order: Vec<&str> = r.definitions().iter().map(|d| d.key.as_str()).collect();
    assert_eq!(order, ["ltv", "b", "a"]);
}

#[test]
fn every_computed_trait_type() {
    let now = T0;
    let events = [
        ev(
            "Page Viewed",
            now - 5 * HOUR_MS,
            json!({"category": "shoes", "n": 2}),
        ),
        ev(
            "Page Viewed",
            now - 4 * HOUR_MS,
            json!({"category": "hats", "n": 7}),
        ),
        ev(
            "Page Viewed",
            now - 3 * HOUR_MS,
            json!({"category": "shoes", "n": "1.5"}),
        ),
        ev(
            "Page Viewed",
            now - 2 * HOUR_MS,
            json!({"category": "bags"}),
        ),
        ev(
            "Page Viewed",
            now - 100 * HOUR_MS,
            json!({"category": "old", "n": 1000}),
        ),
        ev("Other", now - HOUR_MS, json!({"category": "other", "n": 1})),
    ];
    let w = json!({"days": 2});
    let body = |ty: &str, extra: Value| {
        let mut b = json!({"type": ty, "event": "Page Viewed", "lookback": w});
        b.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        b
    };
    let cases = [
        (body("event_counter", json!({})), json!(4)),
        (
            body("aggregation", json!({"function": "sum", "property": "n"})),
            json!(10.5),
        ),
        (
            body("aggregation", json!({"function": "avg", "property": "n"})),
            json!(3.5),
        ),
        (
            body("aggregation", json!({"function": "min", "property": "n"})),
            json!(1.5),
        ),
        (
            body("aggregation", json!({"function": "max", "property": "n"})),
            json!(7),
        ),
        (
            body("most_frequent", json!({"property": "category"})),
            json!("shoes"),
        ),
        (
            body("first", json!({"property": "category"})),
            json!("shoes"),
        ),
        (body("last", json!({"property": "category"})), json!("bags")),
        (
            body("unique_list", json!({"property": "category"})),
            json!(["bags", "hats", "shoes"]),
        ),
        (
            body("unique_list_count", json!({"property": "category"})),
            json!(3),
        ),
        (
            json!({"type": "event_counter", "event": "Page Viewed", "where": [{"property": "category", "op": "=", "value": "shoes"}]}),
            json!(2),
        ),
        (
            json!({"type": "first", "event": "Page Viewed", "property": "category"}),
            json!("old"),
        ),
    ];
    for (b, want) in cases {
        assert_eq!(
            one(trait_def("t", b.clone()), &events, now),
            Some(want),
            "{b}"
        );
    }
    // Most frequent needs a value seen at least twice; ties go alphabetical.
    let mf = json!({"type": "most_frequent", "event": "A", "property": "c"});
    let single = [
        ev("A", now, json!({"c": "x"})),
        ev("A", now, json!({"c": "y"})),
    ];
    assert_eq!(one(trait_def("t", mf.clone()), &single, now), None);
    let tie = [
        ev("A", now, json!({"c": "zebra"})),
        ev("A", now, json!({"c": "apple"})),
        ev("A", now, json!({"c": "zebra"})),
        ev("A", now, json!({"c": "apple"})),
    ];
    assert_eq!(one(trait_def("t", mf), &tie, now), Some(json!("apple")));
    // No matching events: a counter is 0, an aggregate has no value.
    let none = one(
        trait_def(
            "t",
            body("aggregation", json!({"function": "sum", "property": "n"})),
        ),
        &[],
        now,
    );
    assert_eq!(none, None);
}

#[test]
fn performed_counts_spans_and_trait_conditions() {
    let now = T0;
    let orders = [
        ev(
            "Order Completed",
            now - 2 * HOUR_MS,
            json!({"revenue": 120}),
        ),
        ev(
            "Order Completed",
            now - 30 * 24 * HOUR_MS,
            json!({"revenue": 80}),
        ),
        ev(
            "Order Completed",
            parse_time("2026-01-15T00:00:00Z").unwrap(),
            json!({"revenue": 500}),
        ),
    ];
    let cases = [
        (
            json!({"performed": {"event": "Order Completed", "count": {"at_least": 3}}}),
            true,
        ),
        (
            json!({"performed": {"event": "Order Completed", "count": {"at_least": 2}, "within": {"days": 30}}}),
            false,
        ),
        (
            json!({"performed": {"event": "Order Completed", "count": {"exactly": 2}, "within": {"hours": 721}}}),
            true,
        ),
        (
            json!({"performed": {"event": "Order Completed", "count": {"at_most": 1}, "within": {"days": 7}}}),
            true,
        ),
        (
            json!({"performed": {"event": "Order Completed", "where": [{"property": "revenue", "op": ">=", "value": 100}], "count": {"exactly": 2}}}),
            true,
        ),
        (
            json!({"performed": {"event": "Order Completed", "between": ["2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"]}}),
            true,
        ),
        (
            json!({"performed": {"event": "Order Completed", "between": ["2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z"]}}),
            false,
        ),
        (
            json!({"not_performed": {"event": "Login", "within": {"days": 14}}}),
            true,
        ),
        (
            json!({"not_performed": {"event": "Order Completed", "within": {"days": 14}}}),
            false,
        ),
        (
            json!({"trait": {"name": "plan", "op": "=", "value": "pro"}}),
            true,
        ),
        (
            json!({"trait": {"name": "plan", "op": "in", "value": ["free", "team"]}}),
            false,
        ),
        (
            json!({"trait": {"name": "missing", "op": "not_exists"}}),
            true,
        ),
        (
            json!({"and": [{"trait": {"name": "plan", "op": "=", "value": "pro"}}, {"not": {"performed": {"event": "Order Completed"}}}]}),
            false,
        ),
        (
            json!({"or": [{"performed": {"event": "Nope"}}, {"performed": {"event": "Order Completed", "within": {"hours": 3}}}]}),
            true,
        ),
    ];
    let mut traits = Traits::new();
    traits.insert(
        "plan".into(),
        TraitValue {
            value: json!("pro"),
            updated_at: now,
            source_id: "s".into(),
        },
    );
    for (c, want) in cases {
        let r = Ruleset::new(vec![audience("a", c.clone())]).unwrap();
        assert_eq!(values(&r, &orders, &traits, now)["a"], json!(want), "{c}");
    }
}

#[test]
fn audiences_on_audiences_and_computed_traits() {
    let now = T0;
    let ltv = trait_def(
        "lifetime_value",
        json!({"type": "aggregation", "function": "sum", "event": "Order Completed", "property": "revenue"}),
    );
    let high = audience(
        "high_value_users",
        json!({"trait": {"name": "lifetime_value", "op": ">", "value": 500}}),
    );
    let vip = audience(
        "vip",
        json!({"and": [{"audience": "high_value_users"}, {"performed": {"event": "Login", "within": {"days": 1}}}]}),
    );
    let r = Ruleset::new(vec![vip, high, ltv]).unwrap();
    let mut events = vec![
        ev("Order Completed", now - HOUR_MS, json!({"revenue": 400})),
        ev("Login", now - HOUR_MS, json!({})),
    ];
    let v = values(&r, &events, &Traits::new(), now);
    assert_eq!(
        (v["high_value_users"].clone(), v["vip"].clone()),
        (json!(false), json!(false))
    );
    events.push(ev("Order Completed", now, json!({"revenue": 101})));
    let v = values(&r, &events, &Traits::new(), now);
    assert_eq!(v["lifetime_value"], json!(501));
    assert_eq!(
        (v["high_value_users"].clone(), v["vip"].clone()),
        (json!(true), json!(true))
    );
}

fn cart_abandonment() -> Ruleset {
    Ruleset::new(vec![audience(
        "cart_abandoners",
        json!({"performed": {"event": "Product Added", "within": {"days": 7},
                              "then_not": {"event": "Order Completed", "within": {"days": 1}}}}),
    )])
    .unwrap()
}

#[test]
fn cart_abandonment_funnel() {
    let r = cart_abandonment();
    let t = T0 - 3 * 24 * HOUR_MS;
    let later = T0;
    let member = |events: &[Ev], now: Millis| {
        values(&r, events, &Traits::new(), now)["cart_abandoners"].clone()
    };
    // Added without an order within a day: in, once the day has passed.
    let added = [ev("Product Added", t, json!({}))];
    assert_eq!(member(&added, t + HOUR_MS), json!(false));
    assert_eq!(member(&added, later), json!(true));
    // Added, ordered, added again: the second add counts by itself.
    let again = [
        ev("Product Added", t, json!({})),
        ev("Order Completed", t + HOUR_MS, json!({})),
        ev("Product Added", t + 2 * HOUR_MS, json!({})),
    ];
    assert_eq!(member(&again, later), json!(true));
    // Added then ordered: out.
    let bought = [
        ev("Product Added", t, json!({})),
        ev("Order Completed", t + HOUR_MS, json!({})),
    ];
    assert_eq!(member(&bought, later), json!(false));
    // An order more than a day later does not complete the funnel.
    let slow = [
        ev("Product Added", t, json!({})),
        ev("Order Completed", t + 25 * HOUR_MS, json!({})),
    ];
    assert_eq!(member(&slow, later), json!(true));
    // `then`: completed within the window.
    let r2 = Ruleset::new(vec![audience(
        "converted",
        json!({"performed": {"event": "Added Credit Card", "then": {"event": "Subscribed", "within": {"hours": 48}}}}),
    )])
    .unwrap();
    let ok = [
        ev("Added Credit Card", t, json!({})),
        ev("Subscribed", t + 47 * HOUR_MS, json!({})),
    ];
    let late = [
        ev("Added Credit Card", t, json!({})),
        ev("Subscribed", t + 49 * HOUR_MS, json!({})),
    ];
    let before = [
        ev("Subscribed", t - HOUR_MS, json!({})),
        ev("Added Credit Card", t, json!({})),
    ];
    for (events, want) in [(&ok[..], true), (&late[..], false), (&before[..], false)] {
        assert_eq!(
            values(&r2, events, &Traits::new(), later)["converted"],
            json!(want)
        );
    }
}

#[test]
fn the_funnel_window_closing_is_a_scheduled_change() {
    let r = cart_abandonment();
    let t = T0 + 17 * 60_000;
    let mut state = ProfileState::default();
    r.apply(&mut state, &ev("Product Added", t, json!({})).facts());
    let now = t + 60_000;
    assert_eq!(
        r.next_change(&state, &Traits::new(), now),
        Some(t + 24 * HOUR_MS)
    );
}

#[test]
fn lookback_is_exact_to_the_hour() {
    let now = T0 + 30 * 60_000;
    let count = trait_def(
        "orders_90d",
        json!({"type": "event_counter", "event": "Order Completed", "lookback": {"days": 90}}),
    );
    let any = audience(
        "ordered_90d",
        json!({"performed": {"event": "Order Completed", "within": {"days": 90}}}),
    );
    let r = Ruleset::new(vec![count, any]).unwrap();
    let inside = ev("Order Completed", now - 2_159 * HOUR_MS, json!({}));
    let outside = ev("Order Completed", now - 2_161 * HOUR_MS, json!({}));
    let mut state = ProfileState::default();
    r.apply(&mut state, &inside.facts());
    r.apply(&mut state, &outside.facts());
    let v = r.evaluate(&state, &Traits::new(), now);
    assert_eq!(
        (v["orders_90d"].clone(), v["ordered_90d"].clone()),
        (json!(1), json!(true))
    );
    // The next change is the hour the 2,159-hour-old event ages out.
    let next = r.next_change(&state, &Traits::new(), now).unwrap();
    assert_eq!(next, (now / HOUR_MS + 1) * HOUR_MS);
    let stored = v.clone();
    let later = r.evaluate(&state, &Traits::new(), now + HOUR_MS);
    assert_eq!(
        (later["orders_90d"].clone(), later["ordered_90d"].clone()),
        (json!(0), json!(false))
    );
    let (_, changes) = settle(&r, &stored, &later);
    let keys: Vec<_> = changes
        .iter()
        .map(|c| (c.key.as_str(), c.new.clone()))
        .collect();
    assert_eq!(
        keys,
        [("orders_90d", json!(0)), ("ordered_90d", json!(false))]
    );
    let exited = changes[1].payloads("space", "2026-01-01T00:00:00Z");
    assert_eq!(exited[1]["event"], "Audience Exited");
    assert_eq!(exited[0]["traits"]["ordered_90d"], false);
    assert_eq!(r.next_change(&state, &Traits::new(), now + HOUR_MS), None);
}

#[test]
fn blank_values_are_not_announced_for_new_profiles() {
    let r = Ruleset::new(vec![
        trait_def("n", json!({"type": "event_counter", "event": "A"})),
        audience("a", json!({"performed": {"event": "A"}})),
    ])
    .unwrap();
    let computed = values(&r, &[], &Traits::new(), T0);
    let (stored, changes) = settle(&r, &Values::new(), &computed);
    assert!(
        stored.is_empty() && changes.is_empty(),
        "{stored:?} {changes:?}"
    );
    let computed = values(&r, &[ev("A", T0, json!({}))], &Traits::new(), T0);
    let (stored, changes) = settle(&r, &stored, &computed);
    assert_eq!(changes.len(), 2);
    let payloads = changes[1].payloads("sp", "t");
    assert_eq!(payloads[1]["event"], "Audience Entered");
    assert_eq!(
        payloads[1]["context"]["personas"]["computation_class"],
        "audience"
    );
    let (_, again) = settle(&r, &stored, &computed);
    assert!(again.is_empty());
}

// ---- Property: incremental == from scratch -------------------------------

/// The definitions the property runs over: every trait type and condition kind.
fn property_ruleset() -> Ruleset {
    let w = json!({"hours": 48});
    let defs = vec![
        trait_def(
            "count",
            json!({"type": "event_counter", "event": "A", "lookback": w}),
        ),
        trait_def(
            "count_all",
            json!({"type": "event_counter", "event": "B", "where": [{"property": "x", "op": ">=", "value": 2}]}),
        ),
        trait_def(
            "sum",
            json!({"type": "aggregation", "function": "sum", "event": "A", "property": "x", "lookback": w}),
        ),
        trait_def(
            "avg",
            json!({"type": "aggregation", "function": "avg", "event": "A", "property": "x", "lookback": {"hours": 30}}),
        ),
        trait_def(
            "min",
            json!({"type": "aggregation", "function": "min", "event": "B", "property": "x", "lookback": w}),
        ),
        trait_def(
            "max",
            json!({"type": "aggregation", "function": "max", "event": "A", "property": "x"}),
        ),
        trait_def(
            "freq",
            json!({"type": "most_frequent", "event": "A", "property": "c", "lookback": w}),
        ),
        trait_def(
            "first",
            json!({"type": "first", "event": "B", "property": "c", "lookback": {"hours": 20}}),
        ),
        trait_def(
            "last",
            json!({"type": "last", "event": "A", "property": "c", "lookback": w}),
        ),
        trait_def(
            "uniq",
            json!({"type": "unique_list", "event": "A", "property": "c", "lookback": {"hours": 10}}),
        ),
        trait_def(
            "uniq_n",
            json!({"type": "unique_list_count", "event": "B", "property": "c"}),
        ),
        audience(
            "two_a",
            json!({"performed": {"event": "A", "count": {"at_least": 2}, "within": {"hours": 24}}}),
        ),
        audience(
            "funnel",
            json!({"performed": {"event": "A", "within": w, "then_not": {"event": "B", "within": {"hours": 5}}}}),
        ),
        audience(
            "then",
            json!({"performed": {"event": "B", "count": {"exactly": 1}, "within": w, "then": {"event": "A", "within": {"hours": 3}}}}),
        ),
        audience(
            "quiet",
            json!({"not_performed": {"event": "B", "within": {"hours": 12}}}),
        ),
        audience(
            "combo",
            json!({"or": [{"and": [{"audience": "two_a"}, {"not": {"audience": "quiet"}}]}, {"trait": {"name": "sum", "op": ">", "value": 12}}]}),
        ),
    ];
    Ruleset::new(defs).unwrap()
}

fn naive(d: &Definition, events: &[&Ev], values: &Values, now: Millis) -> Option<Value> {
    use kindred_domain::compute::{Aggregate, Body, Condition, Count, Span, TraitKind};
    let in_window = |ts: Millis, hours: Option<i64>| {
        hours.is_none_or(|w| now.div_euclid(HOUR_MS) - ts.div_euclid(HOUR_MS) < w)
    };
    let matching = |m: &kindred_domain::compute::EventMatch| -> Vec<&Ev> {
        events
            .iter()
            .copied()
            .filter(|e| e.name == m.event)
            .filter(|e| {
                m.filters.iter().all(|f| {
                    let v = e.props.get(&f.property);
                    let x = v.and_then(Value::as_f64);
                    let y = f.test.value.as_f64();
                    match f.test.op.as_str() {
                        ">=" => matches!((x, y), (Some(x), Some(y)) if x >= y),
                        other => panic!("naive does not know {other}"),
                    }
                })
            })
            .collect()
    };
    match &d.body {
        Body::Trait(t) => {
            let w = t.lookback.map(|w| w.hours);
            let evs: Vec<&Ev> = matching(&t.matcher)
                .into_iter()
                .filter(|e| in_window(e.ts, w))
                .collect();
            let prop = |p: &str| -> Vec<(Millis, Value)> {
                evs.iter()
                    .filter_map(|e| e.props.get(p).map(|v| (e.ts, v.clone())))
                    .collect()
            };
            match &t.kind {
                TraitKind::EventCounter => Some(json!(evs.len())),
                TraitKind::Aggregation(f, p) => {
                    let xs: Vec<f64> = prop(p).iter().filter_map(|(_, v)| v.as_f64()).collect();
                    if xs.is_empty() {
                        return None;
                    }
                    let x = match f {
                        Aggregate::Sum => xs.iter().sum::<f64>(),
                        Aggregate::Avg => xs.iter().sum::<f64>() / xs.len() as f64,
                        Aggregate::Min => xs.iter().cloned().fold(f64::INFINITY, f64::min),
                        Aggregate::Max => xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
                    };
                    Some(if x.fract() == 0.0 {
                        json!(x as i64)
                    } else {
                        json!(x)
                    })
                }
                TraitKind::MostFrequent(p) => {
                    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
                    for (_, v) in prop(p) {
                        *counts.entry(v.as_str().unwrap().to_string()).or_default() += 1;
                    }
                    let max = counts.values().copied().max().filter(|n| *n >= 2)?;
                    counts
                        .into_iter()
                        .find(|(_, n)| *n == max)
                        .map(|(v, _)| json!(v))
                }
                TraitKind::First(p) => prop(p)
                    .into_iter()
                    .map(|(t, v)| (t, v.to_string(), v))
                    .min_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)))
                    .map(|x| x.2),
                TraitKind::Last(p) => prop(p)
                    .into_iter()
                    .map(|(t, v)| (t, v.to_string(), v))
                    .max_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)))
                    .map(|x| x.2),
                TraitKind::UniqueList(p) => {
                    let set: BTreeSet<String> = prop(p)
                        .iter()
                        .map(|(_, v)| v.as_str().unwrap().to_string())
                        .collect();
                    Some(json!(set.into_iter().collect::<Vec<_>>()))
                }
                TraitKind::UniqueListCount(p) => {
                    let set: BTreeSet<String> =
                        prop(p).iter().map(|(_, v)| v.to_string()).collect();
                    Some(json!(set.len()))
                }
            }
        }
        Body::Audience(c) => {
            fn holds(c: &Condition, f: &dyn Fn(&Condition) -> bool) -> bool {
                match c {
                    Condition::And(cs) => cs.iter().all(|c| holds(c, f)),
                    Condition::Or(cs) => cs.iter().any(|c| holds(c, f)),
                    Condition::Not(c) => !holds(c, f),
                    leaf => f(leaf),
                }
            }
            let leaf = |c: &Condition| -> bool {
                let count_in =
                    |m, span: &Span, funnel: Option<&kindred_domain::compute::Funnel>| -> u64 {
                        let w = match span {
                            Span::Within(w) => Some(w.hours),
                            _ => None,
                        };
                        let parents: Vec<&Ev> = matching(m)
                            .into_iter()
                            .filter(|e| in_window(e.ts, w))
                            .collect();
                        match funnel {
                            None => parents.len() as u64,
                            Some(f) => {
                                let d = f.within.hours * HOUR_MS;
                                let children = matching(&f.matcher);
                                parents
                                    .iter()
                                    .filter(|p| {
                                        let followed = children
                                            .iter()
                                            .any(|c| c.ts >= p.ts && c.ts <= p.ts + d);
                                        if f.did {
                                            followed
                                        } else {
                                            now >= p.ts + d && !followed
                                        }
                                    })
                                    .count() as u64
                            }
                        }
                    };
                match c {
                    Condition::Performed {
                        matcher,
                        count,
                        span,
                        funnel,
                    } => {
                        let n = count_in(matcher, span, funnel.as_ref());
                        match count {
                            Count::AtLeast(k) => n >= *k,
                            Count::Exactly(k) => n == *k,
                            Count::AtMost(k) => n <= *k,
                        }
                    }
                    Condition::NotPerformed { matcher, span } => count_in(matcher, span, None) == 0,
                    Condition::Audience(k) => values.get(k) == Some(&json!(true)),
                    Condition::Trait { name, test } => {
                        assert_eq!(test.op.as_str(), ">");
                        values
                            .get(name)
                            .and_then(Value::as_f64)
                            .is_some_and(|x| x > test.value.as_f64().unwrap())
                    }
                    _ => unreachable!(),
                }
            };
            Some(json!(holds(c, &leaf)))
        }
    }
}

fn naive_all(r: &Ruleset, events: &[&Ev], now: Millis) -> Values {
    let mut values = Values::new();
    for d in r.definitions() {
        if let Some(v) = naive(d, events, &values, now) {
            values.insert(d.key.clone(), v);
        }
    }
    values
}

fn arb_event() -> impl Strategy<Value = (bool, i64, i64, u8, usize)> {
    // (is A, minute offset within 100 hours, x, category, profile)
    (any::<bool>(), 0..100 * 60i64, 0..6i64, 0..4u8, 0..3usize)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn incremental_equals_from_scratch(
        raw in prop::collection::vec(arb_event(), 0..40),
        prune_at in prop::collection::vec(0..110 * 60i64, 0..3),
        now_min in 0..130 * 60i64,
    ) {
        let r = property_ruleset();
        let cats = ["p", "q", "r", "s"];
        let events: Vec<(usize, Ev)> = raw.iter().map(|(a, m, x, c, p)| {
            let props = if *x == 5 { json!({"c": cats[*c as usize]}) } else { json!({"x": x, "c": cats[*c as usize]}) };
            (*p, ev(if *a { "A" } else { "B" }, T0 + m * 60_000, props))
        }).collect();
        let now = T0 + now_min * 60_000;
        // Three profiles take their events, pruned at earlier moments on
        // the way, then merge into one.
        let mut prunes: Vec<Millis> = prune_at.iter().map(|m| T0 + m * 60_000).filter(|t| *t <= now).collect();
        prunes.sort();
        let mut states = vec![r.fresh(), r.fresh(), r.fresh()];
        for (i, (p, e)) in events.iter().enumerate() {
            r.apply(&mut states[*p], &e.facts());
            if let Some(t) = prunes.get(i % 4) {
                r.prune(&mut states[*p], *t);
            }
        }
        let mut merged = states.remove(0);
        for s in states {
            r.merge(&mut merged, s);
        }
        r.prune(&mut merged, now);
        // What is stored is what comes back.
        let stored = serde_json::to_string(&merged).unwrap();
        let merged: ProfileState = serde_json::from_str(&stored).unwrap();
        let all: Vec<&Ev> = events.iter().map(|(_, e)| e).collect();
        let incremental = r.evaluate(&merged, &Traits::new(), now);
        prop_assert_eq!(&incremental, &naive_all(&r, &all, now));

        // The scheduled next change is exact: nothing changes before it,
        // and at it something does.
        if let Some(next) = r.next_change(&merged, &Traits::new(), now) {
            prop_assert!(next > now);
            if all.len() <= 4 {
                // Few enough moments that the look-ahead cannot run out.
                prop_assert_ne!(naive_all(&r, &all, next), incremental.clone());
            }
            let step = ((next - now) / 7).max(1);
            let mut t = now;
            while t < next {
                prop_assert_eq!(naive_all(&r, &all, t), incremental.clone());
                t += step;
            }
        } else {
            prop_assert_eq!(naive_all(&r, &all, now + 400 * HOUR_MS), incremental);
        }
    }
}

#[test]
fn relative_date_conditions_on_traits_follow_the_clock() {
    let day = 24 * HOUR_MS;
    let trial_ends = T0 + 10 * day;
    let mut traits = Traits::new();
    traits.insert(
        "trial_ends_at".into(),
        TraitValue {
            value: json!(kindred_domain::event::format_millis(trial_ends)),
            updated_at: T0,
            source_id: "s".into(),
        },
    );
    let days = |n: i64| json!({"days": n});
    let cases = [
        // (op, span, [(now, member)])
        (
            "within_next",
            days(3),
            vec![
                (T0, false),
                (trial_ends - 3 * day, true),
                (trial_ends, true),
                (trial_ends + 1, false),
            ],
        ),
        (
            "within_last",
            days(2),
            vec![
                (trial_ends - 1, false),
                (trial_ends, true),
                (trial_ends + 2 * day, true),
                (trial_ends + 2 * day + 1, false),
            ],
        ),
        (
            "before_last",
            days(1),
            vec![(trial_ends + day, false), (trial_ends + day + 1, true)],
        ),
        (
            "after_next",
            days(7),
            vec![(T0, true), (trial_ends - 7 * day, false)],
        ),
    ];
    for (op, span, points) in cases {
        let c = json!({"trait": {"name": "trial_ends_at", "op": op, "value": span}});
        let r = Ruleset::new(vec![audience("a", c.clone())]).unwrap();
        let state = r.fresh();
        for (now, member) in &points {
            let got = &r.evaluate(&state, &traits, *now)["a"];
            assert_eq!(got, &json!(member), "{op} at {}", now - T0);
        }
        // The scheduler is told when membership flips, by time alone.
        let (first_now, first) = points[0];
        let flip = r.next_change(&state, &traits, first_now).unwrap();
        let after = r.evaluate(&state, &traits, flip)["a"].clone();
        assert_eq!(after, json!(!first), "{op}: flips at {}", flip - T0);
        let just_before = r.evaluate(&state, &traits, flip - 1)["a"].clone();
        assert_eq!(just_before, json!(first), "{op}: not before {}", flip - T0);
    }
    // Only trait conditions are relative; a bad span is named.
    let in_where = Definition::parse(
        Class::ComputedTrait,
        "x",
        1,
        &json!({"type": "event_counter", "event": "E",
                "where": [{"property": "at", "op": "within_last", "value": {"days": 1}}]}),
    );
    assert_eq!(in_where.unwrap_err().field, "where[0].op");
    let bad_span = Definition::parse(
        Class::Audience,
        "x",
        1,
        &json!({"condition": {"trait": {"name": "t", "op": "within_last", "value": 3}}}),
    );
    assert_eq!(bad_span.unwrap_err().field, "condition.trait.value");
}
