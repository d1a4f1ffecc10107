//! An Admin API identity settings body: serde into IdentitySettings, then IdentityRules::new.
#![no_main]

libfuzzer_sys::fuzz_target!(|body: &[u8]| kindred_fuzz::identity_settings(body));
