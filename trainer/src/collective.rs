//! The collective operations of data-parallel training, behind one small trait.
//!
//! The training loop talks to a [`Collective`] and to nothing else about other processes: it
//! all-reduces the flattened gradients once per step, a few counts and statistics per
//! micro-batch, broadcasts rank 0's weights at the start of a run and gathers every rank's loader
//! cursors for the checkpoint. [`SingleProcess`] (world size 1, every operation the identity) is
//! what a plain run uses, so the loop has one code path; [`Mpi`] (the `mpi` feature) runs the
//! same operations over `MPI_COMM_WORLD` for `mpirun -np N atmorep train`.
//!
//! The tensor operations take and return tensors rather than host slices so that an
//! implementation over device memory (NCCL through cudarc, say) can reduce gradients where they
//! live; [`Mpi`] copies them to the host. The scalar operations are host slices of a few
//! numbers.

use std::fmt::Debug;

use candle_core::Tensor;

use crate::error::Result;

/// Collective operations over the ranks of one data-parallel run. Every rank must call the
/// same operations in the same order with buffers of the same length (the MPI rule); the
/// trainer keeps to it by making every call on every rank, in lockstep.
pub trait Collective: Debug + Send + Sync {
    /// This process's rank, in `0 .. world_size`.
    fn rank(&self) -> u32;

    /// The number of ranks.
    fn world_size(&self) -> u32;

    /// The elementwise sum over all ranks of `t` (a 1-D tensor), on every rank. Every rank gets
    /// the same bits (the optimizer then takes the same step everywhere).
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;

    /// Rank 0's `t` (a 1-D tensor of the same length on every rank), on every rank.
    fn broadcast_from_root(&self, t: &Tensor) -> Result<Tensor>;

    /// The elementwise sum over all ranks of `buf`, in place on every rank.
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;

    /// Every rank's `mine` (the same length on every rank), concatenated in rank order, on
    /// every rank.
    fn all_gather_u64(&self, mine: &[u64]) -> Result<Vec<u64>>;
}

/// One process alone: rank 0 of 1, every operation the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> u32 {
        0
    }

    fn world_size(&self) -> u32 {
        1
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }

    fn broadcast_from_root(&self, t: &Tensor) -> Result<Tensor> {
        Ok(t.clone())
    }

    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }

    fn all_gather_u64(&self, mine: &[u64]) -> Result<Vec<u64>> {
        Ok(mine.to_vec())
    }
}

#[cfg(feature = "mpi")]
pub use self::mpi_world::{Mpi, MpiSession};

#[cfg(feature = "mpi")]
mod mpi_world {
    use candle_core::{DType, Tensor};
    use mpi::collective::SystemOperation;
    use mpi::environment::Universe;
    use mpi::topology::{Communicator, SimpleCommunicator};
    use mpi::traits::{CommunicatorCollectives, Root};

    use super::Collective;
    use crate::error::{Error, Result};

    /// MPI, initialized for this process; finalized when dropped. Hold it for as long as any
    /// [`Mpi`] is in use, on the thread that created it.
    pub struct MpiSession {
        // `Universe` calls `MPI_Finalize` on drop.
        _universe: Universe,
        world: Mpi,
    }

    impl std::fmt::Debug for MpiSession {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("MpiSession")
                .field("world", &self.world)
                .finish_non_exhaustive()
        }
    }

    impl MpiSession {
        /// Initializes MPI with `MPI_THREAD_SERIALIZED`: the training loop may be polled on
        /// any thread of the tokio runtime, but makes one MPI call at a time.
        pub fn init() -> Result<Self> {
            let (universe, provided) = mpi::initialize_with_threading(mpi::Threading::Serialized)
                .ok_or_else(|| {
                Error::Collective("MPI was already initialized in this process".into())
            })?;
            if provided < mpi::Threading::Serialized {
                return Err(Error::Collective(format!(
                    "the MPI library provides thread level {provided:?}; the trainer needs \
                     Serialized"
                )));
            }
            let world = universe.world();
            let world = Mpi {
                rank: u32::try_from(world.rank()).expect("an MPI rank is not negative"),
                size: u32::try_from(world.size()).expect("an MPI size is positive"),
            };
            Ok(Self {
                _universe: universe,
                world,
            })
        }

        /// `MPI_COMM_WORLD`.
        pub fn world(&self) -> Mpi {
            self.world
        }

        /// Ends every rank of the run (`MPI_Abort`): a rank that fails alone would otherwise
        /// leave the others waiting in their next collective, and itself in `MPI_Finalize`.
        pub fn abort(&self, code: i32) -> ! {
            SimpleCommunicator::world().abort(code)
        }
    }

    /// `MPI_COMM_WORLD` of an initialized [`MpiSession`].
    ///
    /// It keeps only its rank and size, and names the world communicator afresh in every call:
    /// rsmpi's communicator handles are not `Send`, the trainer is.
    #[derive(Debug, Clone, Copy)]
    pub struct Mpi {
        rank: u32,
        size: u32,
    }

    fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    }

    fn back(values: Vec<f32>, like: &Tensor) -> Result<Tensor> {
        let n = values.len();
        Ok(Tensor::from_vec(values, n, like.device())?.to_dtype(like.dtype())?)
    }

    impl Collective for Mpi {
        fn rank(&self) -> u32 {
            self.rank
        }

        fn world_size(&self) -> u32 {
            self.size
        }

        fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
            let send = host_f32(t)?;
            let mut recv = vec![0f32; send.len()];
            // MPI recommends (and OpenMPI's reductions give) the same result on every rank;
            // with two ranks it is a + b = b + a in any case.
            SimpleCommunicator::world().all_reduce_into(
                &send[..],
                &mut recv[..],
                SystemOperation::sum(),
            );
            back(recv, t)
        }

        fn broadcast_from_root(&self, t: &Tensor) -> Result<Tensor> {
            let mut buf = host_f32(t)?;
            SimpleCommunicator::world()
                .process_at_rank(0)
                .broadcast_into(&mut buf[..]);
            back(buf, t)
        }

        fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
            let send = buf.to_vec();
            SimpleCommunicator::world().all_reduce_into(&send[..], buf, SystemOperation::sum());
            Ok(())
        }

        fn all_gather_u64(&self, mine: &[u64]) -> Result<Vec<u64>> {
            let mut all = vec![0u64; mine.len() * self.size as usize];
            SimpleCommunicator::world().all_gather_into(mine, &mut all[..]);
            Ok(all)
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn a_single_process_is_rank_0_of_1_and_changes_nothing() -> Result<()> {
        let c = SingleProcess;
        assert_eq!((c.rank(), c.world_size()), (0, 1));
        let t = Tensor::new(&[1.5f32, -2.0], &Device::Cpu)?;
        assert_eq!(c.all_reduce_sum(&t)?.to_vec1::<f32>()?, [1.5, -2.0]);
        assert_eq!(c.broadcast_from_root(&t)?.to_vec1::<f32>()?, [1.5, -2.0]);
        let mut v = [3.0, 4.0];
        c.all_reduce_sum_f64(&mut v)?;
        assert_eq!(v, [3.0, 4.0]);
        assert_eq!(c.all_gather_u64(&[7, 8])?, [7, 8]);
        Ok(())
    }
}
