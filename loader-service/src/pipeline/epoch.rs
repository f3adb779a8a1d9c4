//! Epochs, sharding and resumable cursors; every random order draws from
//! [`sample_rng`](super::seeding::sample_rng).
//!
//! A sample is identified by a [`SampleId`] in `0..num_samples`. An epoch is an ordering of all
//! ids, chosen by [`Ordering`]: a global seeded Fisher–Yates permutation, or the block-local order
//! of [`BlockShuffle`] that lets the reader load a time block once and cut many samples from it
//! (docs/design.md §5). A stream is sharded by `(rank, world)`: rank `r` gets the positions
//! `i ≡ r (mod world)` of the epoch's order, so the shards of one epoch are disjoint and cover it,
//! and their lengths differ by at most one. An [`EpochCursor`] `(epoch, position)` names the next
//! item of a rank's shard; [`EpochStream`] resumes from it exactly — no sample lost, none
//! repeated.

use serde::{Deserialize, Serialize};

use super::seeding::{Purpose, sample_rng, shuffle, uniform_below};

/// Identifies one sample of the dataset: `0..num_samples`.
pub type SampleId = u64;

/// Why an epoch plan, shard or stream cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EpochError {
    #[error("world size must be at least 1")]
    ZeroWorld,
    #[error("rank {rank} is out of range for world size {world}")]
    RankOutOfRange { rank: u32, world: u32 },
    #[error(
        "cannot shard {num_samples} samples over {world} ranks: every rank needs at least one sample per epoch"
    )]
    TooFewSamples { num_samples: u64, world: u32 },
    #[error(
        "cursor (epoch {epoch}, position {position}) is past the end of this rank's shard ({len} samples)"
    )]
    CursorOutOfRange { epoch: u64, position: u64, len: u64 },
    #[error("block-local ordering: {what} must be at least 1")]
    ZeroBlockParam { what: &'static str },
    #[error("block-local ordering: {blocks} blocks × {samples_per_block} samples overflows u64")]
    BlockOverflow { blocks: u64, samples_per_block: u64 },
}

/// Locality-aware shuffling for planned reads (docs/design.md §5): a time block is read once and
/// many samples are cut from it, while a bounded buffer of blocks keeps consecutive samples
/// varied.
///
/// Sample id `block * samples_per_block + k` is the `k`-th sample cut from `block`.
///
/// # Algorithm ([`order`](BlockShuffle::order))
///
/// One generator, `sample_rng(seed, epoch, 0, 0, Purpose::BlockShuffle)`, drives everything:
///
/// 1. Shuffle the block ids `0..blocks` (Fisher–Yates): the order in which blocks are opened.
/// 2. Keep a set of *open* blocks, each with its not-yet-emitted samples in a shuffled order
///    (shuffled when the block is opened). While fewer than `buffer_blocks` are open and blocks
///    remain, open the next block of step 1.
/// 3. Pick one open block uniformly, emit its next sample; a block whose samples are exhausted is
///    closed (removed from the set), making room for the next block. Repeat from 2.
///
/// Every id appears exactly once per epoch. At any point at most `buffer_blocks` blocks are open
/// (started but not finished), so a reader holding `buffer_blocks` decoded blocks never reads a
/// block twice in an epoch. With `buffer_blocks = 1` each block's samples are contiguous; with
/// `buffer_blocks >= blocks` the order is a uniform interleaving across all blocks. Picking
/// uniformly among open blocks (rather than by remaining count) keeps every open block equally
/// represented in any window of the stream.
///
/// Degenerate parameters are not errors here: `buffer_blocks = 0` behaves as 1 and
/// `samples_per_block = 0` gives an empty order; [`validate`](BlockShuffle::validate) rejects them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockShuffle {
    pub seed: u64,
    pub blocks: u64,
    pub samples_per_block: u64,
    pub buffer_blocks: u64,
}

impl BlockShuffle {
    /// Checks that the parameters are usable.
    pub fn validate(&self) -> Result<(), EpochError> {
        if self.samples_per_block == 0 {
            return Err(EpochError::ZeroBlockParam {
                what: "samples_per_block",
            });
        }
        if self.buffer_blocks == 0 {
            return Err(EpochError::ZeroBlockParam {
                what: "buffer_blocks",
            });
        }
        self.num_samples().map(|_| ())
    }

    /// `blocks * samples_per_block`.
    pub fn num_samples(&self) -> Result<u64, EpochError> {
        self.blocks
            .checked_mul(self.samples_per_block)
            .ok_or(EpochError::BlockOverflow {
                blocks: self.blocks,
                samples_per_block: self.samples_per_block,
            })
    }

    /// The block a sample id is cut from.
    pub fn block_of(&self, id: SampleId) -> u64 {
        id / self.samples_per_block.max(1)
    }

    /// The order of all sample ids in `epoch` (see the type doc for the algorithm).
    pub fn order(&self, epoch: u64) -> Vec<SampleId> {
        let spb = self.samples_per_block;
        if spb == 0 || self.blocks == 0 {
            return Vec::new();
        }
        let mut rng = sample_rng(self.seed, epoch, 0, 0, Purpose::BlockShuffle);
        let mut block_order: Vec<u64> = (0..self.blocks).collect();
        shuffle(&mut block_order, &mut rng);

        let buffer = usize::try_from(self.buffer_blocks.max(1)).unwrap_or(usize::MAX);
        let mut out = Vec::with_capacity(
            self.blocks
                .checked_mul(spb)
                .and_then(|n| usize::try_from(n).ok())
                .unwrap_or(0),
        );
        // Open blocks: (block id, remaining sample indices; the next one is popped off the end).
        let mut open: Vec<(u64, Vec<u64>)> = Vec::with_capacity(buffer.min(block_order.len()));
        let mut next_block = block_order.iter();
        loop {
            while open.len() < buffer {
                let Some(&block) = next_block.next() else {
                    break;
                };
                let mut ks: Vec<u64> = (0..spb).collect();
                shuffle(&mut ks, &mut rng);
                open.push((block, ks));
            }
            if open.is_empty() {
                break;
            }
            let i = uniform_below(&mut rng, open.len() as u64) as usize;
            let (block, ks) = &mut open[i];
            if let Some(k) = ks.pop() {
                out.push(*block * spb + k);
            }
            if ks.is_empty() {
                open.swap_remove(i);
            }
        }
        out
    }
}

/// Parameters of block-local ordering inside an [`EpochPlan`]; the seed is the plan's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockParams {
    /// Samples cut from one block; sample id `b * samples_per_block + k`. The last block may be
    /// partial when `num_samples` is not a multiple (its missing ids are simply skipped).
    pub samples_per_block: u64,
    /// Blocks open at once (the reader's buffer of decoded blocks).
    pub buffer_blocks: u64,
}

/// How an epoch orders the sample ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Ordering {
    /// A seeded Fisher–Yates permutation of all ids ([`EpochPlan::permutation`]).
    #[default]
    Global,
    /// Locality-aware: [`BlockShuffle`] with the plan's seed.
    BlockLocal(BlockParams),
    /// Ids in increasing order, every epoch (ordered tiles for inference and downstream use).
    Sequential,
}

/// What an epoch is: the seed, how many samples, and how they are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochPlan {
    pub seed: u64,
    pub num_samples: u64,
    #[serde(default)]
    pub ordering: Ordering,
}

impl EpochPlan {
    /// A plan with the global ordering.
    pub fn new(seed: u64, num_samples: u64) -> Self {
        Self {
            seed,
            num_samples,
            ordering: Ordering::Global,
        }
    }

    /// The same plan with another ordering.
    pub fn with_ordering(mut self, ordering: Ordering) -> Self {
        self.ordering = ordering;
        self
    }

    /// Checks the ordering parameters.
    pub fn validate(&self) -> Result<(), EpochError> {
        match self.ordering {
            Ordering::Global | Ordering::Sequential => Ok(()),
            Ordering::BlockLocal(p) => self.block_shuffle(p).validate(),
        }
    }

    fn block_shuffle(&self, p: BlockParams) -> BlockShuffle {
        BlockShuffle {
            seed: self.seed,
            blocks: self.num_samples.div_ceil(p.samples_per_block.max(1)),
            samples_per_block: p.samples_per_block,
            buffer_blocks: p.buffer_blocks,
        }
    }

    /// The global order of `epoch`: Fisher–Yates of `0..num_samples` driven by
    /// `sample_rng(seed, epoch, 0, 0, Purpose::Shuffle)`. Holds all ids in memory (8 bytes each).
    pub fn permutation(&self, epoch: u64) -> Vec<SampleId> {
        let mut ids: Vec<SampleId> = (0..self.num_samples).collect();
        shuffle(
            &mut ids,
            &mut sample_rng(self.seed, epoch, 0, 0, Purpose::Shuffle),
        );
        ids
    }

    /// The order of `epoch` under this plan's [`Ordering`]. Degenerate block parameters behave as
    /// documented on [`BlockShuffle`]; use [`validate`](EpochPlan::validate) to reject them.
    pub fn order(&self, epoch: u64) -> Vec<SampleId> {
        match self.ordering {
            Ordering::Global => self.permutation(epoch),
            Ordering::Sequential => (0..self.num_samples).collect(),
            Ordering::BlockLocal(p) => {
                let mut ids = self.block_shuffle(p).order(epoch);
                let n = self.num_samples;
                ids.retain(|&id| id < n);
                ids
            }
        }
    }

    /// Length of rank `rank`'s shard of every epoch: positions `i < num_samples` with
    /// `i % world == rank`.
    pub fn shard_len(&self, rank: u32, world: u32) -> Result<u64, EpochError> {
        check_rank(rank, world)?;
        Ok(shard_len(self.num_samples, rank, world))
    }

    /// Rank `rank`'s shard of `epoch`: the positions `i` of [`order`](EpochPlan::order) with
    /// `i % world == rank`, in order.
    pub fn shard(&self, epoch: u64, rank: u32, world: u32) -> Result<Vec<SampleId>, EpochError> {
        check_rank(rank, world)?;
        self.validate()?;
        Ok(shard_of(self.order(epoch), rank, world))
    }
}

fn check_rank(rank: u32, world: u32) -> Result<(), EpochError> {
    if world == 0 {
        return Err(EpochError::ZeroWorld);
    }
    if rank >= world {
        return Err(EpochError::RankOutOfRange { rank, world });
    }
    Ok(())
}

fn shard_len(num_samples: u64, rank: u32, world: u32) -> u64 {
    num_samples
        .saturating_sub(u64::from(rank))
        .div_ceil(u64::from(world))
}

fn shard_of(order: Vec<SampleId>, rank: u32, world: u32) -> Vec<SampleId> {
    if world == 1 {
        return order;
    }
    order
        .into_iter()
        .skip(rank as usize)
        .step_by(world as usize)
        .collect()
}

/// Where a rank's stream stands: the next item to deliver is the `position`-th of this rank's
/// shard of `epoch`. `(e, shard_len)` and `(e + 1, 0)` mean the same thing; streams hand out the
/// latter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct EpochCursor {
    pub epoch: u64,
    pub position: u64,
}

impl EpochCursor {
    /// The start of `epoch`.
    pub fn start_of(epoch: u64) -> Self {
        Self { epoch, position: 0 }
    }
}

/// An endless (or epoch-bounded) stream of one rank's sample ids, across epoch boundaries.
///
/// Yields `(id, cursor after this item)`; restarting a stream from any yielded cursor continues
/// with exactly the items an uninterrupted stream would have yielded next. Only the current
/// epoch's shard is held in memory; the epoch's full order is computed when the stream enters it.
#[derive(Debug, Clone)]
pub struct EpochStream {
    plan: EpochPlan,
    rank: u32,
    world: u32,
    /// The next item to deliver, normalized: `position < shard_len`.
    cursor: EpochCursor,
    shard_len: u64,
    /// Stop before this epoch.
    end_epoch: Option<u64>,
    /// The shard of `cached_epoch`.
    shard: Vec<SampleId>,
    cached_epoch: Option<u64>,
    /// Set when the epoch counter would overflow.
    exhausted: bool,
}

impl EpochStream {
    /// A stream for rank `rank` of `world`, starting at `start`.
    ///
    /// Fails for an invalid rank/world or plan, when some rank would get no samples
    /// (`num_samples < world`), or when `start.position` exceeds the shard length.
    pub fn new(
        plan: EpochPlan,
        rank: u32,
        world: u32,
        start: EpochCursor,
    ) -> Result<Self, EpochError> {
        check_rank(rank, world)?;
        plan.validate()?;
        if plan.num_samples < u64::from(world) {
            return Err(EpochError::TooFewSamples {
                num_samples: plan.num_samples,
                world,
            });
        }
        let len = shard_len(plan.num_samples, rank, world);
        if start.position > len {
            return Err(EpochError::CursorOutOfRange {
                epoch: start.epoch,
                position: start.position,
                len,
            });
        }
        let mut stream = Self {
            plan,
            rank,
            world,
            cursor: start,
            shard_len: len,
            end_epoch: None,
            shard: Vec::new(),
            cached_epoch: None,
            exhausted: false,
        };
        if start.position == len {
            stream.advance_epoch();
        }
        Ok(stream)
    }

    /// Stops the stream before `end_epoch` (exclusive): the last item is the last of epoch
    /// `end_epoch - 1`.
    pub fn with_end_epoch(mut self, end_epoch: u64) -> Self {
        self.end_epoch = Some(end_epoch);
        self
    }

    /// The cursor of the next item to deliver.
    pub fn cursor(&self) -> EpochCursor {
        self.cursor
    }

    /// Items in each epoch of this rank's shard.
    pub fn shard_len(&self) -> u64 {
        self.shard_len
    }

    fn advance_epoch(&mut self) {
        match self.cursor.epoch.checked_add(1) {
            Some(e) => self.cursor = EpochCursor::start_of(e),
            None => self.exhausted = true,
        }
    }

    fn finished(&self) -> bool {
        self.exhausted || self.end_epoch.is_some_and(|end| self.cursor.epoch >= end)
    }
}

impl Iterator for EpochStream {
    type Item = (SampleId, EpochCursor);

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished() {
            return None;
        }
        let epoch = self.cursor.epoch;
        if self.cached_epoch != Some(epoch) {
            self.shard = shard_of(self.plan.order(epoch), self.rank, self.world);
            self.cached_epoch = Some(epoch);
        }
        let id = *self
            .shard
            .get(usize::try_from(self.cursor.position).ok()?)?;
        self.cursor.position += 1;
        if self.cursor.position >= self.shard_len {
            self.advance_epoch();
        }
        Some((id, self.cursor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn is_permutation(ids: &[SampleId], n: u64) -> bool {
        let mut sorted = ids.to_vec();
        sorted.sort_unstable();
        sorted == (0..n).collect::<Vec<_>>()
    }

    #[test]
    fn permutation_is_a_permutation_fixed_per_seed_and_epoch() {
        let plan = EpochPlan::new(42, 1000);
        let p0 = plan.permutation(0);
        assert!(is_permutation(&p0, 1000));
        assert_eq!(p0, plan.permutation(0));
        assert_eq!(p0, plan.order(0));
        let p1 = plan.permutation(1);
        assert!(is_permutation(&p1, 1000));
        assert_ne!(p0, p1);
        let other_seed = EpochPlan::new(43, 1000).permutation(0);
        assert!(is_permutation(&other_seed, 1000));
        assert_ne!(p0, other_seed);
        assert_ne!(p0, (0..1000).collect::<Vec<_>>());
        assert!(EpochPlan::new(1, 0).permutation(0).is_empty());
        assert_eq!(EpochPlan::new(1, 1).permutation(5), vec![0]);
    }

    fn block_plan(num_samples: u64, spb: u64, buffer: u64) -> EpochPlan {
        EpochPlan::new(7, num_samples).with_ordering(Ordering::BlockLocal(BlockParams {
            samples_per_block: spb,
            buffer_blocks: buffer,
        }))
    }

    #[test]
    fn shards_are_disjoint_and_cover_the_epoch() {
        for plan in [EpochPlan::new(5, 103), block_plan(103, 10, 3)] {
            for world in 1..=5u32 {
                for epoch in 0..3 {
                    let order = plan.order(epoch);
                    let mut union = Vec::new();
                    let mut seen = HashSet::new();
                    for rank in 0..world {
                        let shard = plan.shard(epoch, rank, world).unwrap();
                        assert_eq!(shard.len() as u64, plan.shard_len(rank, world).unwrap());
                        for (j, &id) in shard.iter().enumerate() {
                            assert!(seen.insert(id), "id {id} in two shards");
                            assert_eq!(order[j * world as usize + rank as usize], id);
                        }
                        union.extend(shard);
                    }
                    assert!(is_permutation(&union, 103));
                }
            }
        }
    }

    #[test]
    fn invalid_rank_world_and_samples_are_rejected() {
        let plan = EpochPlan::new(1, 10);
        assert_eq!(plan.shard(0, 0, 0), Err(EpochError::ZeroWorld));
        assert_eq!(
            plan.shard(0, 3, 3),
            Err(EpochError::RankOutOfRange { rank: 3, world: 3 })
        );
        assert!(matches!(
            EpochStream::new(plan, 3, 2, EpochCursor::default()),
            Err(EpochError::RankOutOfRange { .. })
        ));
        assert!(matches!(
            EpochStream::new(EpochPlan::new(1, 3), 0, 4, EpochCursor::default()),
            Err(EpochError::TooFewSamples { .. })
        ));
        assert!(matches!(
            EpochStream::new(
                plan,
                0,
                2,
                EpochCursor {
                    epoch: 0,
                    position: 6
                }
            ),
            Err(EpochError::CursorOutOfRange { len: 5, .. })
        ));
        assert!(matches!(
            block_plan(10, 0, 1).validate(),
            Err(EpochError::ZeroBlockParam {
                what: "samples_per_block"
            })
        ));
        assert!(matches!(
            block_plan(10, 2, 0).shard(0, 0, 1),
            Err(EpochError::ZeroBlockParam {
                what: "buffer_blocks"
            })
        ));
        let overflow = BlockShuffle {
            seed: 0,
            blocks: u64::MAX,
            samples_per_block: 2,
            buffer_blocks: 1,
        };
        assert!(matches!(
            overflow.validate(),
            Err(EpochError::BlockOverflow { .. })
        ));
    }

    #[test]
    fn stream_runs_across_epochs_and_stops_at_end_epoch() {
        let plan = EpochPlan::new(3, 11);
        let (rank, world) = (1, 3);
        let items: Vec<_> = EpochStream::new(plan, rank, world, EpochCursor::default())
            .unwrap()
            .with_end_epoch(3)
            .collect();
        let expected: Vec<SampleId> = (0..3)
            .flat_map(|e| plan.shard(e, rank, world).unwrap())
            .collect();
        assert_eq!(items.iter().map(|x| x.0).collect::<Vec<_>>(), expected);
        // Shard of 11 over 3 for rank 1: positions 1, 4, 7, 10 → 4 items per epoch.
        assert_eq!(items.len(), 12);
        assert_eq!(
            items[3].1,
            EpochCursor {
                epoch: 1,
                position: 0
            }
        );
        assert_eq!(
            items[4].1,
            EpochCursor {
                epoch: 1,
                position: 1
            }
        );
        assert_eq!(items.last().unwrap().1, EpochCursor::start_of(3));
    }

    #[test]
    fn cursor_resumes_exactly_mid_epoch_and_across_boundaries() {
        for plan in [EpochPlan::new(17, 50), block_plan(50, 6, 2)] {
            for world in 1..=4u32 {
                for rank in 0..world {
                    let full: Vec<_> = EpochStream::new(plan, rank, world, EpochCursor::default())
                        .unwrap()
                        .with_end_epoch(4)
                        .collect();
                    // Resume after every item (mid-epoch and exactly at the epoch boundary).
                    for cut in 0..full.len() {
                        let resumed: Vec<_> = EpochStream::new(plan, rank, world, full[cut].1)
                            .unwrap()
                            .with_end_epoch(4)
                            .collect();
                        assert_eq!(&resumed[..], &full[cut + 1..]);
                    }
                    // An un-normalized end-of-epoch cursor means the start of the next epoch.
                    let len = plan.shard_len(rank, world).unwrap();
                    let a: Vec<_> = EpochStream::new(
                        plan,
                        rank,
                        world,
                        EpochCursor {
                            epoch: 1,
                            position: len,
                        },
                    )
                    .unwrap()
                    .take(2 * len as usize)
                    .collect();
                    let b: Vec<_> = EpochStream::new(plan, rank, world, EpochCursor::start_of(2))
                        .unwrap()
                        .take(2 * len as usize)
                        .collect();
                    assert_eq!(a, b);
                }
            }
        }
    }

    #[test]
    fn interrupted_stream_equals_uninterrupted_stream() {
        // Stop a stream mid-epoch, keep only its cursor, restart, and compare the concatenation.
        let plan = EpochPlan::new(99, 37);
        let mut full = EpochStream::new(plan, 2, 3, EpochCursor::start_of(5)).unwrap();
        let reference: Vec<SampleId> = full.by_ref().take(40).map(|x| x.0).collect();
        let mut first = EpochStream::new(plan, 2, 3, EpochCursor::start_of(5)).unwrap();
        let mut got: Vec<SampleId> = first.by_ref().take(17).map(|x| x.0).collect();
        let saved = serde_json::to_string(&first.cursor()).unwrap();
        drop(first);
        let cursor: EpochCursor = serde_json::from_str(&saved).unwrap();
        got.extend(
            EpochStream::new(plan, 2, 3, cursor)
                .unwrap()
                .take(23)
                .map(|x| x.0),
        );
        assert_eq!(got, reference);
        // 12 per epoch (positions 2, 5, …, 35 of 37): 40 = 3·12 + 4.
        assert_eq!(
            full.cursor(),
            EpochCursor {
                epoch: 8,
                position: 4
            }
        );
    }

    /// Replays an order and returns the largest number of simultaneously open blocks.
    /// `num_samples` may cut the last block short.
    fn max_open_blocks(order: &[SampleId], spb: u64, num_samples: u64) -> usize {
        let mut remaining = std::collections::HashMap::new();
        let mut open = HashSet::new();
        let mut max_open = 0;
        for &id in order {
            let block = id / spb;
            let left = remaining
                .entry(block)
                .or_insert_with(|| spb.min(num_samples - block * spb));
            assert!(*left > 0, "block {block} revisited after finishing");
            *left -= 1;
            open.insert(block);
            max_open = max_open.max(open.len());
            if *left == 0 {
                open.remove(&block);
            }
        }
        max_open
    }

    #[test]
    fn block_shuffle_emits_each_id_once_and_bounds_open_blocks() {
        for (blocks, spb, buffer) in [(20, 16, 4), (7, 5, 3), (9, 1, 2), (5, 8, 10), (1, 4, 1)] {
            let bs = BlockShuffle {
                seed: 11,
                blocks,
                samples_per_block: spb,
                buffer_blocks: buffer,
            };
            bs.validate().unwrap();
            for epoch in 0..3 {
                let order = bs.order(epoch);
                assert!(is_permutation(&order, blocks * spb));
                let max_open = max_open_blocks(&order, spb, blocks * spb);
                assert!(max_open as u64 <= buffer, "{max_open} > {buffer}");
                if buffer > 1 && blocks > 1 && spb > 1 {
                    assert!(max_open > 1, "expected interleaving");
                }
                assert_eq!(order, bs.order(epoch));
            }
            if blocks * spb > 8 {
                assert_ne!(bs.order(0), bs.order(1));
                assert_ne!(bs.order(0), BlockShuffle { seed: 12, ..bs }.order(0));
            }
        }
    }

    #[test]
    fn block_shuffle_with_one_buffer_is_contiguous() {
        let bs = BlockShuffle {
            seed: 3,
            blocks: 12,
            samples_per_block: 7,
            buffer_blocks: 1,
        };
        let order = bs.order(4);
        assert!(is_permutation(&order, 84));
        let blocks: Vec<u64> = order.chunks(7).map(|c| bs.block_of(c[0])).collect();
        for (chunk, &b) in order.chunks(7).zip(&blocks) {
            assert!(chunk.iter().all(|&id| bs.block_of(id) == b));
        }
        let distinct: HashSet<u64> = blocks.iter().copied().collect();
        assert_eq!(distinct.len(), 12);
        assert_ne!(
            blocks,
            (0..12).collect::<Vec<_>>(),
            "blocks should be shuffled"
        );
    }

    #[test]
    fn block_local_plan_handles_partial_last_block_and_serde() {
        let plan = block_plan(50, 6, 3); // 9 blocks, the last one holds ids 48, 49
        plan.validate().unwrap();
        let order = plan.order(0);
        assert!(is_permutation(&order, 50));
        assert!(max_open_blocks(&order, 6, 50) <= 3);
        let json = serde_json::to_string(&plan).unwrap();
        assert!(json.contains("\"kind\":\"block-local\""), "{json}");
        let back: EpochPlan = serde_json::from_str(&json).unwrap();
        assert_eq!(back, plan);
        let global: EpochPlan = serde_json::from_str(r#"{"seed": 1, "num_samples": 5}"#).unwrap();
        assert_eq!(global, EpochPlan::new(1, 5));
    }
}
