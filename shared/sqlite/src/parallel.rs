//! CPU work of the compute worker spread over the machine's cores, while
//! the one thread that holds the database connection keeps reading and
//! writing: decoding, evaluating and encoding states needs no database.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::Mutex;

/// Below this many items a step runs on the calling thread alone.
const PARALLEL_MIN: usize = 64;

/// At most this many threads (the caller's included).
const MAX_THREADS: usize = 4;

/// The threads a step may use: the machine's cores, at most [`MAX_THREADS`].
pub(crate) fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_THREADS))
}

/// `f` over `items`, in order, split over `threads` threads (the
/// caller's included).
pub(crate) fn par_map<T: Send, U: Send>(
    threads: usize,
    items: Vec<T>,
    f: impl Fn(T) -> U + Sync,
) -> Vec<U> {
    if threads <= 1 || items.len() < PARALLEL_MIN {
        return items.into_iter().map(f).collect();
    }
    let size = items.len().div_ceil(threads);
    let mut chunks: Vec<Vec<T>> = Vec::with_capacity(threads);
    let mut rest = items.into_iter();
    loop {
        let chunk: Vec<T> = rest.by_ref().take(size).collect();
        if chunk.is_empty() {
            break;
        }
        chunks.push(chunk);
    }
    let f = &f;
    std::thread::scope(|scope| {
        let mut chunks = chunks.into_iter();
        let first = chunks.next().unwrap_or_default();
        let handles: Vec<_> = chunks
            .map(|chunk| scope.spawn(move || chunk.into_iter().map(f).collect::<Vec<U>>()))
            .collect();
        let mut out: Vec<U> = first.into_iter().map(f).collect();
        for h in handles {
            out.extend(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
        }
        out
    })
}

/// A three-stage pipeline. The calling thread produces the items one by
/// one (reading them from the database, say) while helper threads run
/// `work` on those already produced; then it joins in the work. Every
/// result comes back to the calling thread, in the order of the items,
/// for `consume` (writing it, say) as soon as it and all before it are
/// done. So the database thread never waits for the CPU work of items it
/// is not about to write, and the other cores never wait for the database.
///
/// Uses `threads` threads, the caller's included (with one, everything
/// runs on the caller's thread, in turn). Stops at the first error of
/// `produce` or `consume` (items already handed out are worked on and
/// dropped).
pub(crate) fn pipeline<T: Send, U: Send, E>(
    threads: usize,
    mut produce: impl FnMut() -> Result<Option<T>, E>,
    work: impl Fn(T) -> U + Sync,
    mut consume: impl FnMut(U) -> Result<(), E>,
) -> Result<(), E> {
    let helpers = threads.saturating_sub(1);
    if helpers == 0 {
        while let Some(item) = produce()? {
            consume(work(item))?;
        }
        return Ok(());
    }
    let (jobs_tx, jobs_rx) = mpsc::channel::<(usize, T)>();
    let jobs_rx = Mutex::new(jobs_rx);
    let (done_tx, done_rx) = mpsc::channel::<(usize, U)>();
    let work = &work;
    std::thread::scope(|scope| {
        let mut spawned = Vec::with_capacity(helpers);
        for _ in 0..helpers {
            let done_tx = done_tx.clone();
            let jobs_rx = &jobs_rx;
            spawned.push(scope.spawn(move || loop {
                // (The lock is held while waiting: the next job goes to
                // whichever helper waits first.)
                let job = match jobs_rx.lock() {
                    Ok(rx) => rx.recv(),
                    Err(_) => return,
                };
                let Ok((i, item)) = job else { return };
                if done_tx.send((i, work(item))).is_err() {
                    return;
                }
            }));
        }
        drop(done_tx);
        let mut ready: BTreeMap<usize, U> = BTreeMap::new();
        let mut next = 0;
        let mut deliver = |ready: &mut BTreeMap<usize, U>, next: &mut usize| {
            while let Some(u) = ready.remove(next) {
                *next += 1;
                consume(u)?;
            }
            Ok::<(), E>(())
        };
        let outcome = (|| {
            let mut sent = 0;
            while let Some(item) = produce()? {
                // (Sending fails only if every helper is gone, which a
                // panic does: the scope re-raises it.)
                if jobs_tx.send((sent, item)).is_err() {
                    break;
                }
                sent += 1;
                while let Ok((i, u)) = done_rx.try_recv() {
                    ready.insert(i, u);
                }
                deliver(&mut ready, &mut next)?;
            }
            drop(jobs_tx);
            while next < sent {
                // Work on what the helpers have not taken yet; wait for
                // them only when nothing is left to take.
                let job = match jobs_rx.try_lock() {
                    Ok(rx) => rx.try_recv().ok(),
                    Err(_) => None,
                };
                if let Some((i, item)) = job {
                    ready.insert(i, work(item));
                } else {
                    match done_rx.recv() {
                        Ok((i, u)) => {
                            ready.insert(i, u);
                        }
                        Err(_) => break,
                    }
                }
                while let Ok((i, u)) = done_rx.try_recv() {
                    ready.insert(i, u);
                }
                deliver(&mut ready, &mut next)?;
            }
            Ok(())
        })();
        for h in spawned {
            if let Err(p) = h.join() {
                std::panic::resume_unwind(p);
            }
        }
        outcome
    })
}

#[cfg(test)]
mod tests {
    use super::{par_map, pipeline};

    #[test]
    fn par_map_keeps_order_and_every_item() {
        for n in [0, 1, 63, 64, 65, 1000, 4097] {
            let items: Vec<usize> = (0..n).collect();
            let out = par_map(4, items, |x| x * 3 + 1);
            assert_eq!(
                out,
                (0..n).map(|x| x * 3 + 1).collect::<Vec<_>>(),
                "n = {n}"
            );
        }
    }

    #[test]
    fn pipeline_consumes_every_result_in_order() {
        for (n, threads) in [(0usize, 4), (1, 4), (2, 2), (100, 1), (100, 4), (5000, 2)] {
            let mut produced = 0;
            let mut out = Vec::new();
            pipeline(
                threads,
                || {
                    produced += 1;
                    Ok::<_, String>((produced <= n).then_some(produced - 1))
                },
                // Uneven work, so that results come back out of order.
                |x| {
                    if x % 7 == 0 {
                        std::thread::sleep(std::time::Duration::from_micros(50));
                    }
                    x * 2
                },
                |y| {
                    out.push(y);
                    Ok(())
                },
            )
            .expect("no errors");
            assert_eq!(
                out,
                (0..n).map(|x| x * 2).collect::<Vec<_>>(),
                "n = {n}, threads = {threads}"
            );
        }
    }

    #[test]
    fn pipeline_stops_at_the_first_error() {
        let mut produced = 0;
        let mut consumed = Vec::new();
        let outcome = pipeline(
            4,
            || {
                produced += 1;
                Ok::<_, String>((produced <= 1000).then_some(produced))
            },
            |x| x,
            |y| {
                if y == 10 {
                    return Err(format!("item {y}"));
                }
                consumed.push(y);
                Ok(())
            },
        );
        assert_eq!(outcome, Err("item 10".to_string()));
        assert_eq!(consumed, (1..10).collect::<Vec<_>>());

        let mut produced = 0;
        let outcome = pipeline(
            4,
            || {
                produced += 1;
                if produced == 5 {
                    return Err("no fifth item".to_string());
                }
                Ok(Some(produced))
            },
            |x| x,
            |_| Ok(()),
        );
        assert_eq!(outcome, Err("no fifth item".to_string()));
    }
}
