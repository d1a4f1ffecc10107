//! A Definitions API body: a computed trait or an audience, checked with the space's others.
#![no_main]

libfuzzer_sys::fuzz_target!(|body: &[u8]| kindred_fuzz::definition(body));
