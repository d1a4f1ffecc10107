//! A full read of one space's identity graph, as every store reports it
//! for consistency checks in tests and operations.

use std::collections::BTreeMap;

use kindred_domain::{Identifier, IdentifierEntry};

#[derive(Clone, Debug)]
pub struct AuditEvent {
    /// Commit order.
    pub seq: i64,
    pub message_id: String,
    pub body: String,
    /// The root profile the event belongs to now.
    pub root: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct GraphAudit {
    pub events: Vec<AuditEvent>,
    /// Every identifier row, with its owner's root.
    pub owners: BTreeMap<Identifier, String>,
    /// Every root profile with the identifiers it records.
    pub roots: BTreeMap<String, Vec<IdentifierEntry>>,
    /// Recorded merge count of every root.
    pub merges: BTreeMap<String, u32>,
    /// Custom traits of every root.
    pub traits: BTreeMap<String, kindred_domain::Traits>,
}
