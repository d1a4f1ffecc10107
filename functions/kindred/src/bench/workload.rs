//! A deterministic workload of realistic identity structure, for the
//! benchmark and the race tests: users with 1-3 devices who browse
//! anonymously before logging in, 2% of devices shared by two users
//! without a reset, 0.5% of users on a group email (team@company.com),
//! 0.5% of messages retried with the same messageId, and an
//! identify/track/page mix.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// 2026-01-01T00:00:00Z: events are spread a second apart after it.
const START_MS: i64 = 1_767_225_600_000;

pub struct Workload {
    rng: StdRng,
    users: usize,
    /// Per device: its anonymous id, its owner, a second user sharing it.
    devices: Vec<Device>,
    user_devices: Vec<Vec<usize>>,
    produced: u64,
    recent: Vec<Value>,
}

struct Device {
    anonymous_id: String,
    owner: usize,
    second_user: Option<usize>,
    logged_in: Option<usize>,
}

const PAGES: [&str; 6] = ["Home", "Pricing", "Docs", "Blog", "Checkout", "Account"];
const EVENTS: [&str; 5] = [
    "Product Viewed",
    "Product Added",
    "Order Completed",
    "Signed Up",
    "Feature Used",
];

impl Workload {
    pub fn new(seed: u64, users: usize) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let users = users.max(2);
        let mut devices = Vec::new();
        let mut user_devices = vec![Vec::new(); users];
        for (user, owned) in user_devices.iter_mut().enumerate() {
            for d in 0..rng.random_range(1..=3) {
                owned.push(devices.len());
                devices.push(Device {
                    anonymous_id: format!("anon-{user}-{d}"),
                    owner: user,
                    second_user: None,
                    logged_in: None,
                });
            }
        }
        // 2% of devices are shared by a second user who logs in without a reset.
        let shared = devices.len() / 50;
        for _ in 0..shared {
            let device = rng.random_range(0..devices.len());
            let other = rng.random_range(0..users);
            if other != devices[device].owner {
                devices[device].second_user = Some(other);
                user_devices[other].push(device);
            }
        }
        Self {
            rng,
            users,
            devices,
            user_devices,
            produced: 0,
            recent: Vec::with_capacity(64),
        }
    }

    fn email(user: usize) -> String {
        // 0.5% of users sign up with their team's shared address.
        if user % 200 == 7 {
            format!("team@company{}.com", user / 1000)
        } else {
            format!("user{user}@example.com")
        }
    }

    /// The next event as a Segment payload.
    pub fn next_event(&mut self) -> Value {
        self.produced += 1;
        let n = self.produced;
        if !self.recent.is_empty() && self.rng.random_bool(0.005) {
            // A client retry: the very same message again.
            let i = self.rng.random_range(0..self.recent.len());
            return self.recent[i].clone();
        }
        let user = self.rng.random_range(0..self.users);
        let owned = &self.user_devices[user];
        let device_index = owned[self.rng.random_range(0..owned.len())];
        let device = &mut self.devices[device_index];
        let user = if device.owner == user || device.second_user == Some(user) {
            user
        } else {
            device.owner
        };
        let timestamp = kindred_domain::event::format_millis(START_MS + n as i64 * 1000);
        let message_id = format!("msg-{n}");
        let logged_in = device.logged_in == Some(user);
        let roll: f64 = self.rng.random();
        let mut event = if (!logged_in && roll < 0.25) || roll < 0.1 {
            device.logged_in = Some(user);
            let plan = ["free", "pro", "team"][user % 3];
            json!({
                "type": "identify",
                "userId": format!("user-{user}"),
                "traits": {"email": Self::email(user), "plan": plan,
                           "logins": n % 97},
            })
        } else if roll < 0.7 {
            json!({
                "type": "track",
                "event": EVENTS[self.rng.random_range(0..EVENTS.len())],
                "properties": {"revenue": self.rng.random_range(1..500), "currency": "USD"},
            })
        } else {
            json!({
                "type": "page",
                "name": PAGES[self.rng.random_range(0..PAGES.len())],
                "properties": {"path": "/somewhere", "referrer": "https://example.org"},
            })
        };
        let map = event.as_object_mut().expect("built as an object");
        map.insert("messageId".into(), json!(message_id));
        map.insert("timestamp".into(), json!(timestamp));
        map.insert("anonymousId".into(), json!(device.anonymous_id));
        if device.logged_in == Some(user) && !map.contains_key("userId") {
            map.insert("userId".into(), json!(format!("user-{user}")));
        }
        map.insert(
            "context".into(),
            json!({"library": {"name": "kindred-workload", "version": "1"},
                   "ip": "203.0.113.7", "userAgent": "Mozilla/5.0"}),
        );
        if self.recent.len() < 64 {
            self.recent.push(event.clone());
        } else {
            let i = (n % 64) as usize;
            self.recent[i] = event.clone();
        }
        event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_events() {
        let mut a = Workload::new(7, 100);
        let mut b = Workload::new(7, 100);
        for _ in 0..1000 {
            assert_eq!(a.next_event(), b.next_event());
        }
    }

    #[test]
    fn the_mix_has_logins_anonymous_browsing_and_retries() {
        let mut w = Workload::new(1, 500);
        let events: Vec<Value> = (0..20_000).map(|_| w.next_event()).collect();
        let identifies = events.iter().filter(|e| e["type"] == "identify").count();
        let anonymous = events.iter().filter(|e| e.get("userId").is_none()).count();
        let ids: std::collections::HashSet<&str> = events
            .iter()
            .map(|e| e["messageId"].as_str().unwrap())
            .collect();
        assert!(identifies > 1000, "{identifies}");
        assert!(anonymous > 1000, "{anonymous}");
        let retried = events.len() - ids.len();
        assert!((50..200).contains(&retried), "{retried}");
    }
}
