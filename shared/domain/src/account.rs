//! Accounts (Segment's `accounts` collection): one profile per `group_id`
//! of a space, made and kept by the events that name it. A `group` call
//! names its `groupId` and sets the account's traits (newest value wins
//! per key, as on users); any other call names the account of its
//! `context.groupId` and counts as the account's activity.
//!
//! [`Account::apply`] is order-independent for distinct events and
//! idempotent, so a store may apply an event's update again after a
//! retry, and concurrent writers that each apply theirs to the version
//! they read (conditionally) end where some serial order would.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::event::{Event, EventKind};
use crate::traits::{apply_updates, fit, Traits};
use crate::Millis;

/// Longest `group_id` (Segment drops longer ones).
pub const MAX_GROUP_ID_BYTES: usize = 500;

/// One account as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Account {
    pub group_id: String,
    /// The time of its earliest event, and that event's message id.
    pub created_at: Millis,
    pub first_message_id: String,
    /// The time of its latest event, and that event's message id.
    pub updated_at: Millis,
    pub last_message_id: String,
    pub traits: Traits,
}

/// What one event does to its account.
#[derive(Clone, Copy, Debug)]
pub struct AccountUpdate<'a> {
    pub group_id: &'a str,
    /// A group call's traits.
    pub traits: Option<&'a Map<String, Value>>,
    pub timestamp: Millis,
    pub message_id: &'a str,
    pub source_id: &'a str,
}

/// The account an event names: a group call's `groupId`, any other
/// call's `context.groupId`; none when empty or too long.
pub fn account_of(event: &Event) -> Option<&str> {
    let id = match event.kind {
        EventKind::Group => event.str_field("groupId"),
        _ => event
            .object("context")
            .and_then(|c| c.get("groupId"))
            .and_then(Value::as_str),
    }?;
    (!id.trim().is_empty() && id.len() <= MAX_GROUP_ID_BYTES).then_some(id)
}

/// The account update an event makes, if it names an account.
pub fn account_update<'a>(event: &'a Event, source_id: &'a str) -> Option<AccountUpdate<'a>> {
    Some(AccountUpdate {
        group_id: account_of(event)?,
        traits: match event.kind {
            EventKind::Group => event.object("traits"),
            _ => None,
        },
        timestamp: event.timestamp,
        message_id: &event.message_id,
        source_id,
    })
}

impl Account {
    /// The account as its first event makes it.
    pub fn new(update: &AccountUpdate<'_>) -> Self {
        let mut account = Account {
            group_id: update.group_id.to_string(),
            created_at: update.timestamp,
            first_message_id: update.message_id.to_string(),
            updated_at: update.timestamp,
            last_message_id: update.message_id.to_string(),
            traits: Traits::new(),
        };
        account.apply(update);
        account
    }

    /// Applies one event; returns whether anything changed. Earliest and
    /// latest event are by `(timestamp, message id)`, traits newest first.
    pub fn apply(&mut self, update: &AccountUpdate<'_>) -> bool {
        let mut changed = false;
        let at = (update.timestamp, update.message_id);
        if at < (self.created_at, self.first_message_id.as_str()) {
            self.created_at = update.timestamp;
            self.first_message_id = update.message_id.to_string();
            changed = true;
        }
        if at > (self.updated_at, self.last_message_id.as_str()) {
            self.updated_at = update.timestamp;
            self.last_message_id = update.message_id.to_string();
            changed = true;
        }
        if let Some(traits) = update.traits {
            if apply_updates(&mut self.traits, traits, update.timestamp, update.source_id) {
                fit(&mut self.traits);
                changed = true;
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Envelope;
    use serde_json::json;

    fn event(v: Value) -> Event {
        Event::parse(v, Envelope::received(1_800_000_000_000, "gen")).unwrap()
    }

    #[test]
    fn group_calls_set_traits_and_context_group_ids_count_as_activity() {
        let group = event(json!({"type": "group", "userId": "u1", "groupId": "acme",
            "traits": {"plan": "team", "seats": 5}, "messageId": "m2",
            "timestamp": "2026-01-02T00:00:00Z"}));
        let track = event(
            json!({"type": "track", "userId": "u1", "event": "E", "messageId": "m3",
            "context": {"groupId": "acme"}, "timestamp": "2026-01-03T00:00:00Z"}),
        );
        let older = event(json!({"type": "group", "userId": "u2", "groupId": "acme",
            "traits": {"plan": "free", "region": "eu"}, "messageId": "m1",
            "timestamp": "2026-01-01T00:00:00Z"}));
        let updates: Vec<AccountUpdate> = [&group, &track, &older]
            .iter()
            .map(|e| account_update(e, "src").unwrap())
            .collect();
        let mut in_order = Account::new(&updates[0]);
        updates[1..].iter().for_each(|u| {
            in_order.apply(u);
        });
        assert_eq!(in_order.traits["plan"].value, "team", "newest wins");
        assert_eq!(in_order.traits["region"].value, "eu");
        assert_eq!(
            (
                in_order.first_message_id.as_str(),
                in_order.last_message_id.as_str()
            ),
            ("m1", "m3")
        );
        // Any order, and again: the same account.
        let mut reversed = Account::new(&updates[2]);
        for u in updates.iter().rev() {
            reversed.apply(u);
        }
        assert_eq!(reversed, in_order);
        assert!(!reversed.apply(&updates[0]), "idempotent");
        let none = event(json!({"type": "track", "userId": "u1", "event": "E"}));
        assert!(account_update(&none, "src").is_none());
        let blank = event(json!({"type": "track", "userId": "u1", "event": "E",
                                 "context": {"groupId": " "}}));
        assert!(account_of(&blank).is_none());
    }
}
