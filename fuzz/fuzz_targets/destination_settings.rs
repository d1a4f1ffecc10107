//! A Destinations API body: Settings::parse, and the stored form parsed back.
#![no_main]

libfuzzer_sys::fuzz_target!(|body: &[u8]| kindred_fuzz::destination_settings(body));
