//! Striping one stream across K loaders: which shard each sub-stream asks for, the deterministic
//! merge order, and the single public [`StreamCursor`] that encodes every sub-stream's position.
//!
//! This module is pure arithmetic; [the client](super) runs the sub-streams and applies it.
//!
//! # Shards
//!
//! Rank `r` of `W` asks the loader for the epoch positions `i ≡ r (mod W)`. Sub-stream `k` of a
//! K-way stripe asks for shard `k·W + r` of `K·W`, i.e. the positions `i ≡ k·W + r (mod K·W)`.
//! These are exactly the positions `i = r + W·j` of rank `r`'s own shard with `j ≡ k (mod K)`:
//! the K sub-shards partition the rank's shard, so a striped rank receives the very samples an
//! unstriped one would (only their order differs), and the ranks together still cover the epoch
//! exactly once. Sub-shard lengths never increase with `k` and differ by at most one.
//!
//! # Merge order
//!
//! Epoch by epoch, strictly round-robin over the sub-streams, one batch each, skipping those that
//! have finished the epoch; the next epoch starts when all have finished it. Each sub-stream
//! reads one epoch per call (`end_epoch = e + 1`), so its last batch of every epoch may be short:
//! a striped epoch ends with up to K short batches. The order is a pure function of the request
//! and K (never of timing), and a slow loader slows the whole merge.
//!
//! # Cursor
//!
//! After the merged stream delivered `n` batches of epoch `e`, its cursor is
//! `(e, n · batch_size)`; after the last batch of the epoch it is `(e + 1, 0)`. Because the
//! sub-shards' batch counts never increase with `k` and differ by at most one, every round but
//! the epoch's last holds all K sub-streams and the last holds a prefix of them, so sub-stream
//! `k` has delivered `b_k = ⌊n / K⌋ + [k < n mod K]` batches. Its position is `b_k · batch_size`
//! unless its last batch was short; the cursor cannot say which without the shard length, so a
//! resumed sub-stream re-requests its last delivered batch (from `(b_k − 1) · batch_size`) and
//! drops it, learning from its `cursor_after` whether the sub-stream had finished the epoch.
//!
//! A striped cursor is meaningful only with the same K (endpoint count) and batch size; an
//! unstriped cursor mid-epoch is not a striped one. The position of a striped cursor counts
//! batch slots, so near an epoch's end it may exceed the samples delivered.

use crate::batch::StreamCursor;

/// Why a striped stream cannot start or continue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StripeError {
    #[error("a stripe needs at least one sub-stream and a batch size of at least one")]
    Empty,
    #[error(
        "cursor (epoch {epoch}, position {position}) is not a striped cursor: the position is not a multiple of the batch size {batch_size}"
    )]
    NotStriped {
        epoch: u64,
        position: u64,
        batch_size: u64,
    },
    #[error(
        "sub-stream {sub} sent a batch ending at (epoch {}, position {}) during epoch {epoch}",
        .after.epoch,
        .after.position
    )]
    OutOfStep {
        sub: usize,
        epoch: u64,
        after: StreamCursor,
    },
    #[error("sub-stream {sub} ended before the stream did")]
    SubStreamEnded { sub: usize },
}

/// Shard `(rank, world)` of sub-stream `k` of a `subs`-way stripe: `(k·world + rank, subs·world)`.
pub fn sub_shard(rank: u32, world: u32, k: u32, subs: u32) -> (u32, u32) {
    let world = world.max(1);
    (k * world + rank, subs * world)
}

/// What to do with a batch a sub-stream delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Deliver it with this merged `cursor_after`.
    Deliver(StreamCursor),
    /// A re-requested batch the consumer already has (see the module docs): drop it.
    Discard,
}

/// The merge state of a striped stream.
#[derive(Debug, Clone)]
pub struct Stripe {
    batch_size: u64,
    /// The epoch being merged.
    epoch: u64,
    /// Merged batches delivered in `epoch`.
    delivered: u64,
    /// Sub-streams that finished `epoch`.
    done: Vec<bool>,
    /// Sub-streams whose first batch is a re-request to drop.
    refetch: Vec<bool>,
    /// Where round-robin continues.
    next: usize,
}

impl Stripe {
    /// The state at `start` (a cursor this merge produced, or the start of an epoch) for `subs`
    /// sub-streams of `batch_size`-sample batches.
    pub fn resume(start: StreamCursor, subs: usize, batch_size: u64) -> Result<Self, StripeError> {
        if subs == 0 || batch_size == 0 {
            return Err(StripeError::Empty);
        }
        if !start.position.is_multiple_of(batch_size) {
            return Err(StripeError::NotStriped {
                epoch: start.epoch,
                position: start.position,
                batch_size,
            });
        }
        let n = start.position / batch_size;
        let mut stripe = Self {
            batch_size,
            epoch: start.epoch,
            delivered: n,
            done: vec![false; subs],
            refetch: vec![false; subs],
            next: (n % subs as u64) as usize,
        };
        for k in 0..subs {
            stripe.refetch[k] = stripe.sub_batches(k) > 0;
        }
        Ok(stripe)
    }

    /// Batches sub-stream `k` has delivered in the current epoch (module docs).
    fn sub_batches(&self, k: usize) -> u64 {
        let subs = self.done.len() as u64;
        self.delivered / subs + u64::from((k as u64) < self.delivered % subs)
    }

    /// Where each sub-stream's first call starts: at its last delivered batch when it has one
    /// (to be dropped), else at the start of the epoch.
    pub fn sub_starts(&self) -> Vec<StreamCursor> {
        (0..self.done.len())
            .map(|k| StreamCursor {
                epoch: self.epoch,
                position: self.sub_batches(k).saturating_sub(1) * self.batch_size,
            })
            .collect()
    }

    /// The merged cursor now.
    pub fn cursor(&self) -> StreamCursor {
        StreamCursor {
            epoch: self.epoch,
            position: self.delivered * self.batch_size,
        }
    }

    /// The sub-stream whose next batch comes next: pending re-requests first, then round-robin
    /// over those that have not finished the epoch.
    pub fn next_sub(&self) -> usize {
        if let Some(k) = self.refetch.iter().position(|&r| r) {
            return k;
        }
        let subs = self.done.len();
        (0..subs)
            .map(|i| (self.next + i) % subs)
            .find(|&k| !self.done[k])
            .unwrap_or(self.next)
    }

    /// Takes sub-stream `sub`'s next batch, which ends at `after` (its own cursor); `sub` must be
    /// [`next_sub`](Self::next_sub).
    pub fn accept(&mut self, sub: usize, after: StreamCursor) -> Result<Accepted, StripeError> {
        let finished = match after.epoch.checked_sub(self.epoch) {
            Some(0) => false,
            Some(1) if after.position == 0 => true,
            _ => {
                return Err(StripeError::OutOfStep {
                    sub,
                    epoch: self.epoch,
                    after,
                });
            }
        };
        if finished {
            self.done[sub] = true;
        }
        if std::mem::take(&mut self.refetch[sub]) {
            // With every sub-stream done the cursor would already read (epoch + 1, 0).
            if self.done.iter().all(|&d| d) {
                return Err(StripeError::OutOfStep {
                    sub,
                    epoch: self.epoch,
                    after,
                });
            }
            return Ok(Accepted::Discard);
        }
        self.delivered += 1;
        self.next = (sub + 1) % self.done.len();
        if self.done.iter().all(|&d| d) {
            self.epoch += 1;
            self.delivered = 0;
            self.done.fill(false);
            self.next = 0;
        }
        Ok(Accepted::Deliver(self.cursor()))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// Epoch positions `0..num_samples` of rank `rank`'s shard, as the loader shards them.
    fn shard(num_samples: u64, rank: u32, world: u32) -> Vec<u64> {
        (0..num_samples)
            .filter(|i| i % u64::from(world) == u64::from(rank))
            .collect()
    }

    /// A simulated loader call: sub-stream `k`'s batches of one epoch from `start`, as
    /// (positions, cursor_after), the last one short and ending at `(epoch + 1, 0)`.
    fn sub_epoch(ids: &[u64], epoch: u64, start: u64, b: u64) -> Vec<(Vec<u64>, StreamCursor)> {
        let mut out = Vec::new();
        let mut pos = start;
        while pos < ids.len() as u64 {
            let end = (pos + b).min(ids.len() as u64);
            let after = if end == ids.len() as u64 {
                StreamCursor {
                    epoch: epoch + 1,
                    position: 0,
                }
            } else {
                StreamCursor {
                    epoch,
                    position: end,
                }
            };
            out.push((ids[pos as usize..end as usize].to_vec(), after));
            pos = end;
        }
        out
    }

    /// Runs the merge from `start` to `end_epoch` over simulated sub-streams of a rank's shard:
    /// (epoch, position) of every sample delivered, and every merged cursor.
    fn run(
        num_samples: u64,
        rank: u32,
        world: u32,
        subs: usize,
        b: u64,
        start: StreamCursor,
        end_epoch: u64,
    ) -> (Vec<(u64, u64)>, Vec<StreamCursor>) {
        let mut stripe = Stripe::resume(start, subs, b).unwrap();
        let shards: Vec<Vec<u64>> = (0..subs as u32)
            .map(|k| {
                let (r, w) = sub_shard(rank, world, k, subs as u32);
                shard(num_samples, r, w)
            })
            .collect();
        // Each sub-stream: a queue of (epoch, ids, cursor_after), one call per epoch.
        let mut queues: Vec<std::collections::VecDeque<(u64, Vec<u64>, StreamCursor)>> = stripe
            .sub_starts()
            .iter()
            .enumerate()
            .map(|(k, s)| {
                let mut q = std::collections::VecDeque::new();
                let mut pos = s.position;
                for e in s.epoch..end_epoch {
                    for (ids, after) in sub_epoch(&shards[k], e, pos, b) {
                        q.push_back((e, ids, after));
                    }
                    pos = 0;
                }
                q
            })
            .collect();
        let (mut samples, mut cursors) = (Vec::new(), Vec::new());
        while stripe.cursor().epoch < end_epoch {
            let k = stripe.next_sub();
            let (e, ids, after) = queues[k].pop_front().expect("a sub-stream ran dry");
            match stripe.accept(k, after).unwrap() {
                Accepted::Deliver(c) => {
                    samples.extend(ids.iter().map(|&i| (e, i)));
                    cursors.push(c);
                }
                Accepted::Discard => {}
            }
        }
        (samples, cursors)
    }

    #[test]
    fn sub_shards_partition_the_rank_and_the_ranks_cover_the_epoch() {
        for (n, world, subs) in [(50, 1, 3), (47, 2, 3), (13, 3, 2), (64, 4, 4)] {
            let mut all = HashSet::new();
            for rank in 0..world {
                let mut mine: Vec<u64> = (0..subs)
                    .flat_map(|k| {
                        let (r, w) = sub_shard(rank, world, k, subs);
                        shard(n, r, w)
                    })
                    .collect();
                mine.sort_unstable();
                assert_eq!(mine, shard(n, rank, world), "n {n} rank {rank}");
                all.extend(mine);
            }
            assert_eq!(all.len() as u64, n);
        }
        assert_eq!(sub_shard(0, 0, 1, 2), (1, 2), "world 0 means 1");
    }

    #[test]
    fn a_striped_epoch_is_every_sample_once_with_short_last_batches() {
        // 50 samples, K = 3: sub-shards of 17, 17, 16 in batches of 5 → 4 rounds, the last one
        // of short batches (2, 2, 1).
        let (samples, cursors) = run(50, 0, 1, 3, 5, StreamCursor::default(), 2);
        for e in 0..2 {
            let mut ids: Vec<u64> = samples.iter().filter(|s| s.0 == e).map(|s| s.1).collect();
            ids.sort_unstable();
            assert_eq!(ids, (0..50).collect::<Vec<_>>(), "epoch {e}");
        }
        assert_eq!(cursors.len(), 24);
        let positions: Vec<u64> = cursors[..12].iter().map(|c| c.position).collect();
        assert_eq!(
            positions,
            [5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 0],
            "slots of 5, then (1, 0) after the epoch's last batch"
        );
        assert_eq!(cursors[11].epoch, 1);
        assert_eq!(
            cursors[23],
            StreamCursor {
                epoch: 2,
                position: 0
            }
        );
        // Round-robin: the first round is the first batch of each sub-shard, in order.
        let first: Vec<u64> = samples[..15].iter().map(|s| s.1).collect();
        let expect: Vec<u64> = [0u64, 1, 2]
            .iter()
            .flat_map(|&k| (0..5).map(move |j| 3 * j + k))
            .collect();
        assert_eq!(first, expect);
    }

    #[test]
    fn uneven_rounds_and_prefixes_of_finished_subs() {
        // 25 samples, K = 3, B = 4: sub-shards 9, 8, 8 → 3, 2, 2 batches; the last round holds
        // sub-stream 0 alone. 20 samples: 7, 7, 6 → all short in round 2.
        for (n, b) in [(25, 4), (20, 4), (7, 3), (3, 1), (6, 10)] {
            let (samples, _) = run(n, 0, 1, 3, b, StreamCursor::default(), 1);
            let mut ids: Vec<u64> = samples.iter().map(|s| s.1).collect();
            ids.sort_unstable();
            assert_eq!(ids, (0..n).collect::<Vec<_>>(), "n {n} b {b}");
        }
    }

    #[test]
    fn resuming_from_every_merged_cursor_continues_exactly() {
        for (n, rank, world, subs, b) in [
            (50, 0, 1, 3, 5),
            (25, 0, 1, 3, 4),
            (20, 0, 1, 3, 4),
            (47, 1, 2, 3, 2),
            (64, 0, 1, 2, 8),
            (9, 0, 1, 1, 4),
        ] {
            let (samples, cursors) = run(n, rank, world, subs, b, StreamCursor::default(), 3);
            let (again, _) = run(n, rank, world, subs, b, StreamCursor::default(), 3);
            assert_eq!(again, samples, "the merge is deterministic");
            let mut at = 0;
            for (i, c) in cursors.iter().enumerate() {
                let (rest, rest_cursors) = run(n, rank, world, subs, b, *c, 3);
                assert_eq!(rest_cursors, cursors[i + 1..], "cursors after {c:?}");
                at = samples.len() - rest.len();
                assert_eq!(rest, samples[at..], "samples after {c:?}");
            }
            assert_eq!(at, samples.len());
        }
    }

    #[test]
    fn invalid_cursors_and_out_of_step_batches_are_errors() {
        assert_eq!(
            Stripe::resume(StreamCursor::default(), 0, 4).unwrap_err(),
            StripeError::Empty
        );
        assert!(matches!(
            Stripe::resume(
                StreamCursor {
                    epoch: 0,
                    position: 6
                },
                2,
                4
            ),
            Err(StripeError::NotStriped { .. })
        ));
        let mut s = Stripe::resume(StreamCursor::default(), 2, 4).unwrap();
        assert_eq!(s.next_sub(), 0);
        assert!(matches!(
            s.accept(
                0,
                StreamCursor {
                    epoch: 2,
                    position: 0
                }
            ),
            Err(StripeError::OutOfStep { .. })
        ));
    }

    #[test]
    fn resume_arithmetic() {
        // 7 merged batches of 4 in epoch 3 over K = 3: sub-streams delivered 3, 2, 2.
        let s = Stripe::resume(
            StreamCursor {
                epoch: 3,
                position: 28,
            },
            3,
            4,
        )
        .unwrap();
        let starts: Vec<u64> = s.sub_starts().iter().map(|c| c.position).collect();
        assert_eq!(starts, [8, 4, 4]);
        assert!(s.sub_starts().iter().all(|c| c.epoch == 3));
        // Re-requests first, then round-robin from sub-stream 7 mod 3 = 1.
        assert_eq!(s.next_sub(), 0);
        let fresh = Stripe::resume(
            StreamCursor {
                epoch: 3,
                position: 0,
            },
            3,
            4,
        )
        .unwrap();
        assert_eq!(
            fresh.sub_starts(),
            vec![
                StreamCursor {
                    epoch: 3,
                    position: 0
                };
                3
            ]
        );
        assert_eq!(fresh.next_sub(), 0);
    }
}
