//! The collective operations of data-parallel training, behind one small trait.
//!
//! The training loop talks to a [`Collective`] and to nothing else about other processes: it
//! all-reduces the flattened gradients once per step, a few counts and statistics per
//! micro-batch, broadcasts rank 0's weights at the start of a run and gathers every rank's loader
//! cursors for the checkpoint. [`SingleProcess`] (world size 1, every operation the identity) is
//! what a plain run uses, so the loop has one code path; [`Mpi`] (the `mpi` feature) runs the
//! same operations over `MPI_COMM_WORLD` for `mpirun -np N atmorep train`; `Nccl` (the `nccl`
//! feature) runs them with NCCL on each rank's GPU, the ranks meeting through
//! [`crate::rendezvous`].
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

/// `t` as f32 values in host memory, for a collective library that reduces host buffers.
#[cfg(any(feature = "mpi", feature = "nccl"))]
fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// The 1-D tensor of `values`, on `like`'s device and in its dtype.
#[cfg(any(feature = "mpi", feature = "nccl"))]
fn back(values: Vec<f32>, like: &Tensor) -> Result<Tensor> {
    let n = values.len();
    Ok(Tensor::from_vec(values, n, like.device())?.to_dtype(like.dtype())?)
}

#[cfg(feature = "mpi")]
pub use self::mpi_world::{Mpi, MpiSession};

#[cfg(feature = "mpi")]
mod mpi_world {
    use candle_core::Tensor;
    use mpi::collective::SystemOperation;
    use mpi::environment::Universe;
    use mpi::topology::{Communicator, SimpleCommunicator};
    use mpi::traits::{CommunicatorCollectives, Root};

    use super::{Collective, back, host_f32};
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

#[cfg(feature = "nccl")]
pub use self::nccl_world::Nccl;

#[cfg(feature = "nccl")]
mod nccl_world {
    use std::net::TcpListener;
    use std::sync::{Arc, mpsc};
    use std::thread::JoinHandle;
    use std::time::Duration;

    use candle_core::Tensor;
    use cudarc::driver::{CudaContext, CudaStream, DriverError};
    use cudarc::nccl::{Comm, Id, ReduceOp};

    use super::{Collective, back, host_f32};
    use crate::error::{Error, Result};
    use crate::rendezvous::{self, UniqueId};

    fn driver(what: &str, e: DriverError) -> Error {
        Error::Collective(format!("NCCL: {what}: CUDA driver error {e}"))
    }

    fn nccl(what: &str, e: cudarc::nccl::result::NcclError) -> Error {
        Error::Collective(format!("NCCL: {what}: {:?}", e.0))
    }

    /// Fails with the library's name when the CUDA driver or NCCL cannot be loaded: cudarc
    /// would panic at the first call instead.
    fn check_libraries() -> Result<()> {
        // SAFETY: loading a shared library runs its initializers; libcuda and libnccl are the
        // libraries cudarc loads at its first call anyway, this only asks earlier.
        #[allow(unsafe_code)]
        let (cuda, nccl) = unsafe {
            (
                cudarc::driver::sys::is_culib_present(),
                cudarc::nccl::sys::is_culib_present(),
            )
        };
        let missing: Vec<&str> = [("libcuda (the NVIDIA driver)", cuda), ("libnccl", nccl)]
            .into_iter()
            .filter_map(|(name, present)| (!present).then_some(name))
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(Error::Collective(format!(
                "NCCL data-parallel training needs {} on the library path, and this machine \
                 has not got {}",
                missing.join(" and "),
                if missing.len() == 1 { "it" } else { "them" }
            )))
        }
    }

    /// A host buffer to reduce, broadcast or gather, and where to send the result.
    enum Op {
        AllReduceF32(Vec<f32>, mpsc::Sender<Result<Vec<f32>>>),
        BroadcastF32(Vec<f32>, mpsc::Sender<Result<Vec<f32>>>),
        AllReduceF64(Vec<f64>, mpsc::Sender<Result<Vec<f64>>>),
        AllGatherU64(Vec<u64>, mpsc::Sender<Result<Vec<u64>>>),
    }

    /// One rank of an NCCL communicator on one GPU.
    ///
    /// The communicator and its CUDA context live on a thread of their own, which runs the
    /// operations one at a time in the order they are called: a CUDA context is bound to a
    /// thread, NCCL handles are not `Send`, and the trainer may be polled on any thread.
    ///
    /// The trainer's tensors are in host memory (it has no CUDA build yet), so each operation
    /// copies its buffer to the GPU, runs the NCCL collective there and copies the result back.
    #[derive(Debug)]
    pub struct Nccl {
        rank: u32,
        size: u32,
        ops: Option<mpsc::Sender<Op>>,
        worker: Option<JoinHandle<()>>,
    }

    impl Nccl {
        /// Joins the run: rank 0 listens on `root` (`HOST:PORT`, bound on all interfaces) and
        /// hands the NCCL id to the others, which connect to it, all within `timeout`. The
        /// GPU is `device`, by default `LOCAL_RANK` when set (one process per GPU of a node),
        /// else `rank` modulo the node's GPU count.
        pub fn init(
            root: &str,
            rank: u32,
            world_size: u32,
            device: Option<usize>,
            timeout: Duration,
        ) -> Result<Self> {
            if rank >= world_size {
                return Err(Error::Collective(format!(
                    "rank {rank} must be below the world size {world_size}"
                )));
            }
            check_libraries()?;
            let id: UniqueId = if rank == 0 {
                let id = Id::new().map_err(|e| nccl("ncclGetUniqueId", e))?;
                let bytes: UniqueId = id.internal().map(|c| c as u8);
                let port = root.rsplit_once(':').map(|(_, p)| p).unwrap_or(root);
                let listener = TcpListener::bind(format!("0.0.0.0:{port}")).map_err(|e| {
                    Error::Collective(format!(
                        "NCCL rendezvous: rank 0 cannot listen on port {port} (of `{root}`): {e}"
                    ))
                })?;
                rendezvous::serve(&listener, world_size, &bytes, timeout)?;
                bytes
            } else {
                rendezvous::join(root, rank, world_size, timeout)?
            };
            let device = match device.or_else(local_rank) {
                Some(d) => d,
                None => {
                    let count =
                        CudaContext::device_count().map_err(|e| driver("counting the GPUs", e))?;
                    if count < 1 {
                        return Err(Error::Collective("NCCL: this machine has no GPU".into()));
                    }
                    rank as usize % count as usize
                }
            };
            let (ready_tx, ready_rx) = mpsc::channel();
            let (ops_tx, ops_rx) = mpsc::channel();
            let worker = std::thread::Builder::new()
                .name(format!("nccl-rank-{rank}"))
                .spawn(move || {
                    let comm = CudaContext::new(device)
                        .map_err(|e| driver(&format!("opening GPU {device}"), e))
                        .and_then(|ctx| {
                            let stream = ctx.default_stream();
                            let id = Id::uninit(id.map(|b| b as std::ffi::c_char));
                            Comm::from_rank(stream, rank as usize, world_size as usize, id)
                                .map_err(|e| nccl("ncclCommInitRank", e))
                        });
                    match comm {
                        Ok(comm) => {
                            let _ = ready_tx.send(Ok(()));
                            serve_ops(&comm, &ops_rx);
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                })
                .map_err(|e| Error::Collective(format!("NCCL: starting its thread: {e}")))?;
            ready_rx
                .recv()
                .map_err(|_| Error::Collective("NCCL: its thread ended while starting".into()))??;
            tracing::info!(rank, world_size, device, "NCCL communicator ready");
            Ok(Self {
                rank,
                size: world_size,
                ops: Some(ops_tx),
                worker: Some(worker),
            })
        }

        fn call<T>(&self, op: impl FnOnce(mpsc::Sender<Result<T>>) -> Op) -> Result<T> {
            let (tx, rx) = mpsc::channel();
            let gone = || Error::Collective("NCCL: its thread has ended".into());
            self.ops
                .as_ref()
                .ok_or_else(gone)?
                .send(op(tx))
                .map_err(|_| gone())?;
            rx.recv().map_err(|_| gone())?
        }
    }

    impl Drop for Nccl {
        fn drop(&mut self) {
            // Closing the queue ends the thread, which destroys the communicator.
            self.ops.take();
            if let Some(worker) = self.worker.take() {
                let _ = worker.join();
            }
        }
    }

    fn local_rank() -> Option<usize> {
        std::env::var("LOCAL_RANK").ok()?.parse().ok()
    }

    /// The communicator's thread: runs each operation on the GPU, in order.
    fn serve_ops(comm: &Comm, ops: &mpsc::Receiver<Op>) {
        let stream = comm.stream();
        while let Ok(op) = ops.recv() {
            match op {
                Op::AllReduceF32(buf, reply) => {
                    let _ = reply.send(all_reduce(comm, &stream, &buf));
                }
                Op::AllReduceF64(buf, reply) => {
                    let _ = reply.send(all_reduce(comm, &stream, &buf));
                }
                Op::BroadcastF32(buf, reply) => {
                    let _ = reply.send(broadcast(comm, &stream, &buf));
                }
                Op::AllGatherU64(buf, reply) => {
                    let _ = reply.send(all_gather(comm, &stream, &buf));
                }
            }
        }
    }

    fn all_reduce<T>(comm: &Comm, stream: &Arc<CudaStream>, host: &[T]) -> Result<Vec<T>>
    where
        T: cudarc::nccl::NcclType + cudarc::driver::DeviceRepr,
    {
        let mut dev = stream
            .clone_htod(host)
            .map_err(|e| driver("copying to the GPU", e))?;
        comm.all_reduce_in_place(&mut dev, &ReduceOp::Sum)
            .map_err(|e| nccl("ncclAllReduce", e))?;
        stream
            .clone_dtoh(&dev)
            .map_err(|e| driver("copying from the GPU", e))
    }

    fn broadcast(comm: &Comm, stream: &Arc<CudaStream>, host: &[f32]) -> Result<Vec<f32>> {
        let mut dev = stream
            .clone_htod(host)
            .map_err(|e| driver("copying to the GPU", e))?;
        comm.broadcast_in_place(&mut dev, 0)
            .map_err(|e| nccl("ncclBroadcast", e))?;
        stream
            .clone_dtoh(&dev)
            .map_err(|e| driver("copying from the GPU", e))
    }

    fn all_gather(comm: &Comm, stream: &Arc<CudaStream>, host: &[u64]) -> Result<Vec<u64>> {
        let send = stream
            .clone_htod(host)
            .map_err(|e| driver("copying to the GPU", e))?;
        let mut recv = stream
            .alloc_zeros::<u64>(host.len() * comm.world_size())
            .map_err(|e| driver("allocating on the GPU", e))?;
        comm.all_gather(&send, &mut recv)
            .map_err(|e| nccl("ncclAllGather", e))?;
        stream
            .clone_dtoh(&recv)
            .map_err(|e| driver("copying from the GPU", e))
    }

    impl Collective for Nccl {
        fn rank(&self) -> u32 {
            self.rank
        }

        fn world_size(&self) -> u32 {
            self.size
        }

        fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
            let host = host_f32(t)?;
            back(self.call(|tx| Op::AllReduceF32(host, tx))?, t)
        }

        fn broadcast_from_root(&self, t: &Tensor) -> Result<Tensor> {
            let host = host_f32(t)?;
            back(self.call(|tx| Op::BroadcastF32(host, tx))?, t)
        }

        fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
            let host = buf.to_vec();
            buf.copy_from_slice(&self.call(|tx| Op::AllReduceF64(host, tx))?);
            Ok(())
        }

        fn all_gather_u64(&self, mine: &[u64]) -> Result<Vec<u64>> {
            let host = mine.to_vec();
            self.call(|tx| Op::AllGatherU64(host, tx))
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// On a machine without the NVIDIA driver or NCCL (CI's), joining a run is an error
        /// that names what is missing, not cudarc's panic at the first call.
        #[test]
        fn a_machine_without_the_libraries_gets_an_error_naming_them() {
            // SAFETY: as in `check_libraries`.
            #[allow(unsafe_code)]
            let present = unsafe {
                cudarc::driver::sys::is_culib_present() && cudarc::nccl::sys::is_culib_present()
            };
            if present {
                eprintln!("libcuda and libnccl are present: the error path is not exercised here");
                return;
            }
            let result = Nccl::init("127.0.0.1:0", 0, 1, None, Duration::from_secs(1));
            let e = result.unwrap_err().to_string();
            assert!(
                e.contains("needs libcuda (the NVIDIA driver)") || e.contains("needs libnccl"),
                "{e}"
            );
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
