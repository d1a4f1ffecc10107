//! A Tracking API body: a batch, each item parsed as an event; the same body as one call.
#![no_main]

libfuzzer_sys::fuzz_target!(|body: &[u8]| kindred_fuzz::event_batch(body));
