//! A [`Held`] store that holds a batch's new assignments on a thread of its own.
//!
//! Holding a batch of 1,000 new assignments in a full store of a million costs about 0.1 ms,
//! mostly cache misses in its tables, on the thread that serves `AllocateBatch` (the server's
//! event loop, its bottleneck). [`Holder::hand_over`] queues the batch instead, and the
//! holder's thread holds it. Nothing can see the difference: [`Holder::lock`], the only way to
//! the store, first holds every batch handed over before it (in order), so a lookup made after
//! a batch was answered finds its assignments, as it did when they were held inline.
//!
//! The queue is bounded (`MAX_PENDING` assignments): past it, or when no thread can be
//! started, the caller holds the queue and its batch itself.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::held::{Held, Made};

/// At most this many assignments wait to be held; then the caller holds them.
const MAX_PENDING: usize = 1 << 16;

struct Queue {
    batches: VecDeque<Arc<Made>>,
    /// Assignments in `batches`.
    assignments: usize,
    /// The holder's thread is running (started on the first hand-over).
    started: bool,
    /// The [`Holder`] is gone: the thread holds what is left and ends.
    closed: bool,
}

struct Shared {
    held: Mutex<Held>,
    queue: Mutex<Queue>,
    wake: Condvar,
}

impl Shared {
    /// Hold every queued batch, oldest first. Called with the store locked, so a batch is
    /// held before any later one and before anyone else sees the store.
    fn drain(&self, held: &mut Held) {
        loop {
            let next = {
                let mut queue = self.queue.lock();
                let next = queue.batches.pop_front();
                if let Some(made) = &next {
                    queue.assignments -= made.len();
                }
                next
            };
            match next {
                Some(made) => held.add_made(&made),
                None => return,
            }
        }
    }

    fn run(&self) {
        loop {
            {
                let mut queue = self.queue.lock();
                while queue.batches.is_empty() && !queue.closed {
                    self.wake.wait(&mut queue);
                }
                if queue.batches.is_empty() {
                    return;
                }
            }
            self.drain(&mut self.held.lock());
        }
    }
}

/// A [`Held`] store and the batches of new assignments on their way into it.
pub struct Holder {
    shared: Arc<Shared>,
}

impl Holder {
    pub fn new(held: Held) -> Self {
        Holder {
            shared: Arc::new(Shared {
                held: Mutex::new(held),
                queue: Mutex::new(Queue {
                    batches: VecDeque::new(),
                    assignments: 0,
                    started: false,
                    closed: false,
                }),
                wake: Condvar::new(),
            }),
        }
    }

    /// The store, with every batch handed over so far held in it.
    pub fn lock(&self) -> MutexGuard<'_, Held> {
        let mut held = self.shared.held.lock();
        self.shared.drain(&mut held);
        held
    }

    /// Hold `made` (new assignments, in order) after the batches handed over before it: on
    /// the holder's thread, or in the next [`Holder::lock`], whichever comes first.
    pub fn hand_over(&self, made: Arc<Made>) {
        if made.is_empty() {
            return;
        }
        {
            let mut queue = self.shared.queue.lock();
            if queue.assignments + made.len() <= MAX_PENDING && self.started(&mut queue) {
                queue.assignments += made.len();
                queue.batches.push_back(made);
                drop(queue);
                self.shared.wake.notify_one();
                return;
            }
        }
        self.lock().add_made(&made);
    }

    /// Assignments handed over and not yet held.
    pub fn pending(&self) -> usize {
        self.shared.queue.lock().assignments
    }

    /// Whether the holder's thread runs (started now if it did not).
    fn started(&self, queue: &mut Queue) -> bool {
        if !queue.started {
            let shared = Arc::clone(&self.shared);
            queue.started = std::thread::Builder::new()
                .name("allocsvc-holder".into())
                .spawn(move || shared.run())
                .is_ok();
        }
        queue.started
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.shared.queue.lock().closed = true;
        self.shared.wake.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn batch(prefix: &str, first_seq: u64, users: &[&str]) -> Arc<Made> {
        let mut made = Made::new(prefix, 1_000);
        for (k, user) in users.iter().enumerate() {
            made.push(first_seq + k as u64, 7, user, k % 2, "country:us", 1, 0.5);
        }
        Arc::new(made)
    }

    #[test]
    fn a_lock_after_a_hand_over_sees_the_batch_in_order() {
        let holder = Holder::new(Held::new("p"));
        // As if its thread ran and took nothing: the lock alone holds what was handed over.
        holder.shared.queue.lock().started = true;
        // The same user in two batches: the second's assignment is its latest.
        for round in 0..200u64 {
            holder.hand_over(batch("p", 1 + round * 2, &["u", "v"]));
            let held = holder.lock();
            let latest = held.latest(7, "u").expect("held");
            assert_eq!(latest.id, format!("p-{:x}", 1 + round * 2));
            assert_eq!(held.len() as u64, 2 * (round + 1));
        }
        assert_eq!(holder.pending(), 0);
    }

    #[test]
    fn the_holder_s_thread_holds_batches_nobody_asks_for() {
        let holder = Holder::new(Held::new("p"));
        holder.hand_over(batch("p", 1, &["a", "b", "c"]));
        let start = Instant::now();
        // Only pending() is read here: it does not hold anything itself.
        while holder.pending() > 0 {
            assert!(start.elapsed() < Duration::from_secs(30), "never held");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(holder.shared.held.lock().len(), 3);
    }

    #[test]
    fn past_the_bound_the_caller_holds_the_queue_and_then_its_batch() {
        let holder = Holder::new(Held::new("p"));
        // As if its thread ran and took nothing (a forked process has no such thread).
        holder.shared.queue.lock().started = true;
        let users: Vec<String> = (0..1000).map(|i| format!("u{i}")).collect();
        let users: Vec<&str> = users.iter().map(String::as_str).collect();
        let rounds = MAX_PENDING / users.len();
        for r in 0..=rounds {
            holder.hand_over(batch("p", 1 + (r * users.len()) as u64, &users));
            let queued = if r < rounds { (r + 1) * users.len() } else { 0 };
            assert_eq!(holder.pending(), queued, "round {r}");
        }
        let held = holder.shared.held.lock();
        assert_eq!(held.len(), (rounds + 1) * users.len());
        // Every user's latest is the batch over the bound: it was held after the queue.
        let last = 1 + (rounds * users.len()) as u64;
        assert_eq!(
            held.latest(7, "u0").expect("held").id,
            format!("p-{last:x}")
        );
    }

    #[test]
    fn dropping_the_holder_ends_its_thread_after_the_queue() {
        let holder = Holder::new(Held::new("p"));
        holder.hand_over(batch("p", 1, &["a"]));
        let shared = Arc::downgrade(&holder.shared);
        drop(holder);
        let start = Instant::now();
        // The thread keeps the shared state until it has held the queue and ended.
        while shared.upgrade().is_some() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "thread never ended"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
