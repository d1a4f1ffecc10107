//! Kindred on AWS: the DynamoDB adapters of the store ports, the SQS
//! event queue, and the identity step as the `identity` function runs it.
//! The identity rules are the domain's and the retry loop is the store's
//! pipeline; nothing here decides who is who.

pub mod compute;
pub mod dynamo;
pub mod identity;
pub mod lambda;
pub mod privacy;
mod retry;
pub mod sqs;
pub mod sync;

pub use dynamo::{DynamoStore, UsageSnapshot};
pub use identity::identify;
pub use sqs::SqsQueue;
