//! Kindred's domain: the rules of the product as pure functions over values.
//!
//! Nothing here performs I/O, reads a clock or knows about AWS or SQLite:
//! adapters gather facts, call these functions, and execute the plans they
//! return atomically.

pub mod account;
pub mod compute;
pub mod event;
pub mod identifier;
pub mod model;
pub mod origin;
pub mod privacy;
pub mod resolve;
pub mod settings;
pub mod sync;
pub mod traits;

pub use event::{Envelope, Event, EventKind, Rejection};
pub use identifier::{extract_identifiers, normalize_lookup, ExternalId, Identifier};
pub use resolve::{
    resolve, Attach, Condition, Create, Facts, IdentifierEntry, Incoming, Plan, ProfileFacts,
    Refusal, Resolution, Rule,
};
pub use settings::{
    BlockedValue, Frequency, IdentityRules, IdentitySettings, Limit, SettingsError, TypeRule,
};
pub use traits::{merge_traits, TraitValue, Traits};

/// Milliseconds since the Unix epoch, the one time unit stored everywhere.
pub type Millis = i64;
