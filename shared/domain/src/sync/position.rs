//! Which destinations receive what, and when: where a destination stands
//! in its sync ([`SyncPosition`]) decides whether a change or a merge is
//! sent to it, and how an initial sync pass moves its change horizon; a
//! destination's secret is checked here too. Both stores follow these
//! rules; they only keep the numbers.

use super::settings::{secret_field, Settings, SettingsError};

/// Where a destination stands in receiving its space's changes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncPosition {
    /// An initial sync pass (all current values, or those of the keys a
    /// replace added) is pending.
    pub initial_pending: bool,
    /// A first initial sync has begun: its change horizon is set.
    pub synced: bool,
    /// Changes at or before this position of the change log were covered
    /// by the first initial sync.
    pub since_change: i64,
}

impl SyncPosition {
    /// Whether the destination receives live traffic (changes and
    /// aliases): it is enabled, and it is not a new destination whose
    /// first initial sync has not begun (that pass sends the current
    /// values, and live traffic starts at its horizon). One synced before
    /// keeps receiving changes during a later pass.
    pub fn live(&self, settings: &Settings) -> bool {
        settings.enabled && (self.synced || !self.initial_pending)
    }

    /// Whether the change at position `seq` of the log, of `key`, is sent.
    pub fn receives_change(&self, settings: &Settings, seq: i64, key: &str) -> bool {
        self.live(settings) && seq > self.since_change && settings.selects(key)
    }

    /// Whether a profile's new identifiers of `types` are sent its
    /// current values: live, and syncing one of those types.
    pub fn receives_identifiers<'a>(
        &self,
        settings: &Settings,
        mut types: impl Iterator<Item = &'a str>,
    ) -> bool {
        self.live(settings) && types.any(|t| settings.id_types.iter().any(|s| s == t))
    }

    /// Whether a merge is sent (as an `alias` call).
    pub fn receives_alias(&self, settings: &Settings) -> bool {
        self.live(settings) && settings.alias_on_merge
    }

    /// The change horizon once an initial sync pass has read the states as
    /// of log position `read_to`: a first pass moves it there (changes up
    /// to it are in the values it sends), a later pass leaves it (changes
    /// kept flowing meanwhile). `None`: unchanged.
    pub fn horizon_after_pass(&self, read_to: i64) -> Option<i64> {
        (!self.synced).then_some(self.since_change.max(read_to))
    }
}

/// Whether a put of `settings` must carry a secret: a new destination
/// always does, a replace does when the stored secret would go elsewhere
/// ([`Settings::secret_needed_after`]). `old` is the stored settings, if
/// the destination exists.
pub fn check_secret(
    settings: &Settings,
    old: Option<&Settings>,
    has_secret: bool,
) -> Result<(), SettingsError> {
    if has_secret {
        return Ok(());
    }
    match old {
        None => Err(SettingsError {
            field: secret_field(settings.kind).to_string(),
            message: format!(
                "is required for a new {} destination",
                settings.kind.as_str()
            ),
        }),
        Some(old) => settings.secret_needed_after(old).map_or(Ok(()), Err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings(extra: serde_json::Value) -> Settings {
        let mut body = json!({"kind": "webhook", "url": "https://x.example/hook", "secret": "s"});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        Settings::parse(&body).unwrap().0
    }

    #[test]
    fn a_new_destination_waits_for_its_first_pass() {
        let s = settings(json!({"alias_on_merge": true}));
        let new = SyncPosition {
            initial_pending: true,
            synced: false,
            since_change: 0,
        };
        assert!(!new.receives_change(&s, 5, "k") && !new.receives_alias(&s));
        let begun = SyncPosition {
            synced: true,
            since_change: 10,
            ..new
        };
        assert!(!begun.receives_change(&s, 10, "k"), "covered by the pass");
        assert!(begun.receives_change(&s, 11, "k") && begun.receives_alias(&s));
        let off = settings(json!({"enabled": false}));
        assert!(!begun.receives_change(&off, 11, "k"));
        let some = settings(json!({"keys": ["a"]}));
        assert!(begun.receives_change(&some, 11, "a") && !begun.receives_change(&some, 11, "b"));
    }

    #[test]
    fn only_a_first_pass_moves_the_horizon() {
        let first = SyncPosition {
            initial_pending: true,
            synced: false,
            since_change: 3,
        };
        assert_eq!(first.horizon_after_pass(9), Some(9));
        assert_eq!(first.horizon_after_pass(1), Some(3));
        let later = SyncPosition {
            synced: true,
            ..first
        };
        assert_eq!(later.horizon_after_pass(9), None);
    }

    #[test]
    fn secrets_are_required_when_new_or_moved() {
        let s = settings(json!({}));
        let e = check_secret(&s, None, false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "secret: is required for a new webhook destination"
        );
        assert!(check_secret(&s, None, true).is_ok());
        assert!(check_secret(&s, Some(&s), false).is_ok());
        let moved = Settings::parse(
            &json!({"kind": "segment", "host": "https://api.segment.io", "write_key": "w"}),
        )
        .unwrap()
        .0;
        assert!(check_secret(&moved, Some(&s), false).is_err());
    }
}
