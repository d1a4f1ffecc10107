//! Jittered waits between attempts, one rule for every retry loop of the
//! adapters: a random wait of 0 to base·2^min(attempt, cap) ms ("full
//! jitter"), so that racing writers and retrying senders spread out.

pub(crate) async fn jitter(base_ms: u64, attempt: u32, cap: u32) {
    let ms = rand::random_range(0..=(base_ms << attempt.min(cap)));
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
}
