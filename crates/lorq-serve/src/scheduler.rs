//! Which waiting requests join the running batch, and when.
//!
//! Continuous batching under two budgets (TGI's): the tokens every running sequence may come to
//! hold (`max_batch_total_tokens`, prompt plus `max_new_tokens`), and the prompt tokens one step
//! may prefill (`max_batch_prefill_tokens`). Adapters get LoRAX-style fairness: one FIFO queue
//! per adapter, at most `max_active_adapters` adapters admitting new requests at a time, and an
//! active adapter gives way after `adapter_cycle` when others are waiting (its running requests
//! finish normally). The base model is a queue like any other but takes no adapter slot, since it
//! holds no adapter memory.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// What the scheduler needs to know about a waiting request.
pub trait Queued {
    /// The adapter's cache key; `None` is the base model.
    fn adapter_key(&self) -> Option<&str>;
    fn prompt_tokens(&self) -> usize;
    /// Prompt plus the most tokens it may generate: what it can come to hold in the KV cache.
    fn max_tokens(&self) -> usize;
    /// Whether the client has gone away.
    fn cancelled(&self) -> bool;
}

#[derive(Debug, Clone)]
pub struct Budgets {
    pub max_batch_total_tokens: usize,
    pub max_batch_prefill_tokens: usize,
    pub max_active_adapters: usize,
    pub adapter_cycle: Duration,
}

struct Active {
    since: Instant,
    /// No longer admits new requests (its slice ran out while others waited).
    retired: bool,
}

pub struct Scheduler<J> {
    budgets: Budgets,
    queues: HashMap<Option<String>, VecDeque<(u64, J)>>,
    active: HashMap<Option<String>, Active>,
    /// Round-robin position over the admitting queues.
    turn: usize,
    next_seq: u64,
    waiting: usize,
}

impl<J: Queued> Scheduler<J> {
    pub fn new(budgets: Budgets) -> Self {
        Self {
            budgets,
            queues: HashMap::new(),
            active: HashMap::new(),
            turn: 0,
            next_seq: 0,
            waiting: 0,
        }
    }

    pub fn push(&mut self, job: J) {
        let key = job.adapter_key().map(str::to_string);
        self.next_seq += 1;
        self.queues
            .entry(key)
            .or_default()
            .push_back((self.next_seq, job));
        self.waiting += 1;
    }

    pub fn waiting(&self) -> usize {
        self.waiting
    }

    pub fn is_empty(&self) -> bool {
        self.waiting == 0
    }

    /// Removes and returns the waiting requests whose client is gone.
    pub fn take_cancelled(&mut self) -> Vec<J> {
        let mut out = Vec::new();
        for q in self.queues.values_mut() {
            let (gone, keep): (VecDeque<_>, VecDeque<_>) =
                q.drain(..).partition(|(_, j)| j.cancelled());
            *q = keep;
            out.extend(gone.into_iter().map(|(_, j)| j));
        }
        self.waiting -= out.len();
        self.queues.retain(|_, q| !q.is_empty());
        out
    }

    /// Removes every waiting request (shutdown).
    pub fn drain(&mut self) -> Vec<J> {
        self.waiting = 0;
        self.queues
            .drain()
            .flat_map(|(_, q)| q.into_iter().map(|(_, j)| j))
            .collect()
    }

    /// Picks the requests that join the batch now. `running_tokens`: the `max_tokens` of every
    /// running sequence; `running_adapters`: the adapter keys that still have running sequences.
    pub fn admit(
        &mut self,
        now: Instant,
        running_tokens: usize,
        running_adapters: &[Option<String>],
    ) -> Vec<J> {
        self.update_active(now, running_adapters);
        let b = self.budgets.clone();
        let mut admitted = Vec::new();
        let mut total = running_tokens;
        let mut prefill = 0;
        let mut blocked: Vec<Option<String>> = Vec::new();
        loop {
            let mut keys: Vec<Option<String>> = self
                .active
                .iter()
                .filter(|(k, a)| !a.retired && self.queues.contains_key(*k) && !blocked.contains(k))
                .map(|(k, _)| k.clone())
                .collect();
            if keys.is_empty() {
                break;
            }
            // A stable order so the round-robin is fair: by the age of each queue's head.
            keys.sort_by_key(|k| self.queues[k].front().map(|(s, _)| *s));
            let key = keys[self.turn % keys.len()].clone();
            self.turn = self.turn.wrapping_add(1);
            let q = self.queues.get_mut(&key).expect("listed above");
            let (_, job) = q.front().expect("queues are never left empty");
            let fits_total = total + job.max_tokens() <= b.max_batch_total_tokens;
            let fits_prefill = prefill + job.prompt_tokens() <= b.max_batch_prefill_tokens;
            // One request always runs when nothing else does (validation keeps it within
            // the per-request limits), so the server cannot stall on an oversized budget.
            let alone = total == 0 && admitted.is_empty();
            if !(alone || (fits_total && fits_prefill)) {
                blocked.push(key);
                continue;
            }
            let (_, job) = q.pop_front().expect("checked above");
            if q.is_empty() {
                self.queues.remove(&key);
            }
            total += job.max_tokens();
            prefill += job.prompt_tokens();
            self.waiting -= 1;
            admitted.push(job);
        }
        admitted
    }

    /// Retires adapters whose slice ran out while others wait, drops idle ones, and activates
    /// waiting adapters (oldest request first) into the free slots.
    fn update_active(&mut self, now: Instant, running_adapters: &[Option<String>]) {
        let others_waiting = self
            .queues
            .keys()
            .any(|k| k.is_some() && !self.active.contains_key(k));
        let cycle = self.budgets.adapter_cycle;
        for (key, a) in self.active.iter_mut() {
            if key.is_some() && others_waiting && now.duration_since(a.since) >= cycle {
                a.retired = true;
            }
        }
        let queues = &self.queues;
        self.active.retain(|k, a| {
            let waiting = queues.contains_key(k);
            let running = running_adapters.contains(k);
            // Idle adapters leave; retired ones leave once their running requests finish.
            running || (waiting && !a.retired)
        });
        // A retired adapter whose requests are still queued re-enters at the back.
        let mut candidates: Vec<(u64, Option<String>)> = self
            .queues
            .iter()
            .filter(|(k, _)| !self.active.contains_key(*k))
            .map(|(k, q)| (q.front().map(|(s, _)| *s).unwrap_or(u64::MAX), k.clone()))
            .collect();
        candidates.sort();
        for (_, key) in candidates {
            let used = self
                .active
                .iter()
                .filter(|(k, a)| k.is_some() && !a.retired)
                .count();
            if key.is_some() && used >= self.budgets.max_active_adapters {
                continue;
            }
            self.active.insert(
                key,
                Active {
                    since: now,
                    retired: false,
                },
            );
        }
    }

    /// Adapter keys currently admitting requests (for `/v1/lora_adapters` and metrics).
    pub fn active_adapters(&self) -> Vec<String> {
        self.active
            .iter()
            .filter(|(_, a)| !a.retired)
            .filter_map(|(k, _)| k.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct J {
        adapter: Option<String>,
        prompt: usize,
        max: usize,
        gone: bool,
    }
    impl Queued for J {
        fn adapter_key(&self) -> Option<&str> {
            self.adapter.as_deref()
        }
        fn prompt_tokens(&self) -> usize {
            self.prompt
        }
        fn max_tokens(&self) -> usize {
            self.max
        }
        fn cancelled(&self) -> bool {
            self.gone
        }
    }
    fn job(a: Option<&str>, prompt: usize, max: usize) -> J {
        J {
            adapter: a.map(str::to_string),
            prompt,
            max,
            gone: false,
        }
    }
    fn budgets(total: usize, prefill: usize, adapters: usize) -> Budgets {
        Budgets {
            max_batch_total_tokens: total,
            max_batch_prefill_tokens: prefill,
            max_active_adapters: adapters,
            adapter_cycle: Duration::from_secs(2),
        }
    }

    #[test]
    fn admits_under_both_budgets() {
        let mut s = Scheduler::new(budgets(100, 30, 8));
        for _ in 0..5 {
            s.push(job(None, 10, 40));
        }
        let now = Instant::now();
        // total budget: 2 × 40 = 80 fits, a third would be 120.
        assert_eq!(s.admit(now, 0, &[]).len(), 2);
        // 80 running: nothing more fits.
        assert_eq!(s.admit(now, 80, &[None]).len(), 0);
        let mut s = Scheduler::new(budgets(1000, 30, 8));
        for _ in 0..5 {
            s.push(job(None, 10, 40));
        }
        // prefill budget: 3 × 10 = 30 per step.
        assert_eq!(s.admit(now, 0, &[]).len(), 3);
        assert_eq!(s.admit(now, 120, &[None]).len(), 2);
        assert!(s.is_empty());
    }

    #[test]
    fn an_oversized_request_runs_alone() {
        let mut s = Scheduler::new(budgets(10, 10, 8));
        s.push(job(None, 50, 60));
        s.push(job(None, 1, 2));
        let now = Instant::now();
        assert_eq!(s.admit(now, 0, &[]).len(), 1);
        assert_eq!(s.admit(now, 60, &[None]).len(), 0);
        assert_eq!(s.admit(now, 0, &[]).len(), 1);
    }

    #[test]
    fn max_active_adapters_limits_admission_and_cycles() {
        let mut s = Scheduler::new(budgets(10_000, 10_000, 1));
        s.push(job(Some("a"), 1, 2));
        s.push(job(Some("b"), 1, 2));
        s.push(job(Some("a"), 1, 2));
        s.push(job(None, 1, 2));
        let t0 = Instant::now();
        let first: Vec<_> = s.admit(t0, 0, &[]).into_iter().map(|j| j.adapter).collect();
        // Only adapter a (oldest) gets the single slot; the base model needs none.
        assert_eq!(first.iter().filter(|a| a.is_none()).count(), 1);
        assert_eq!(
            first.iter().filter(|a| a.as_deref() == Some("a")).count(),
            2
        );
        assert_eq!(s.waiting(), 1);
        // a still runs and b waits: before the slice ends, b is not admitted.
        let run = [Some("a".to_string())];
        assert!(s.admit(t0 + Duration::from_millis(500), 4, &run).is_empty());
        // After the slice, a retires (its requests keep running) and b takes the slot.
        let later = s.admit(t0 + Duration::from_secs(3), 4, &run);
        assert_eq!(later.len(), 1);
        assert_eq!(later[0].adapter.as_deref(), Some("b"));
    }

    #[test]
    fn cancelled_waiting_requests_are_removed() {
        let mut s = Scheduler::new(budgets(100, 100, 8));
        s.push(job(None, 1, 2));
        let mut j = job(Some("x"), 1, 2);
        j.gone = true;
        s.push(j);
        assert_eq!(s.take_cancelled().len(), 1);
        assert_eq!(s.waiting(), 1);
    }
}
