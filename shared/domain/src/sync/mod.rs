//! Destinations and what they are sent (SPEC 11): a destination's settings
//! and their validation, the Segment-spec calls that a change, a current
//! value (initial sync) or a merge becomes for one destination, the
//! messageId receivers deduplicate on, the webhook signature and the retry
//! schedule. Pure: no HTTP, no clock, no randomness (jitter comes in as a
//! number).

mod calls;
mod delivery;
mod position;
mod settings;
#[cfg(test)]
mod tests;

pub use calls::*;
pub use delivery::*;
pub use position::*;
pub use settings::*;
