//! How the ranks of an NCCL run find each other: rank 0 hands every other rank the 128-byte
//! NCCL unique id over TCP.
//!
//! NCCL needs the same id on every rank before `ncclCommInitRank`, and leaves its transport to
//! the caller (PyTorch uses its TCP store, MPI programs a broadcast). Ranks started by a
//! Kubernetes indexed Job or by hand have no MPI, so rank 0 listens on a known address
//! (`--nccl-root HOST:PORT`, e.g. the Job's headless Service name for pod 0) and the others
//! connect, retrying while rank 0 is not up yet.
//!
//! The exchange is one message each way: a joining rank sends `MAGIC`, its rank and the world
//! size it was started with (u32 little-endian each); rank 0 checks them and answers with the
//! id. A connection that is not a rank of this run (wrong magic, a rank out of range, another
//! world size, a rank that already joined) gets no id and does not count.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// The length of an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const ID_BYTES: usize = 128;

/// The first bytes of a joining rank's message: protocol and version.
const MAGIC: &[u8; 8] = b"ATMNCCL1";

/// How long one read or write may take once connected.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// An NCCL unique id as bytes.
pub type UniqueId = [u8; ID_BYTES];

fn err(what: impl std::fmt::Display) -> Error {
    Error::Collective(format!("NCCL rendezvous: {what}"))
}

/// Rank 0's side: accepts a connection from each of the other `world_size - 1` ranks on
/// `listener` and sends each the id. Returns when all have it, or fails after `timeout`
/// naming the ranks that never came.
pub fn serve(
    listener: &TcpListener,
    world_size: u32,
    id: &UniqueId,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut joined = vec![false; world_size as usize];
    joined[0] = true;
    listener
        .set_nonblocking(true)
        .map_err(|e| err(format!("listener: {e}")))?;
    while joined.iter().any(|j| !j) {
        let (mut stream, peer) = match listener.accept() {
            Ok(conn) => conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> = (0..joined.len()).filter(|&r| !joined[r]).collect();
                    return Err(err(format!(
                        "ranks {missing:?} of {world_size} did not join within {timeout:?}"
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(err(format!("accept: {e}"))),
        };
        match handshake(&mut stream, world_size, &joined) {
            Ok(rank) => {
                stream
                    .write_all(id)
                    .map_err(|e| err(format!("sending the id to rank {rank} ({peer}): {e}")))?;
                joined[rank as usize] = true;
            }
            // Not one of ours: say why (the peer may be a rank started with the wrong flags)
            // and carry on waiting for the real ranks.
            Err(reason) => {
                tracing::warn!(%peer, %reason, "NCCL rendezvous: refused a connection");
                let _ = stream.write_all(format!("ERR {reason}").as_bytes());
            }
        }
    }
    Ok(())
}

/// Reads a joining rank's message and checks it against this run.
fn handshake(
    stream: &mut TcpStream,
    world_size: u32,
    joined: &[bool],
) -> std::result::Result<u32, String> {
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut msg = [0u8; 16];
    stream
        .read_exact(&mut msg)
        .map_err(|e| format!("reading its greeting: {e}"))?;
    if &msg[..8] != MAGIC {
        return Err("not an atmorep NCCL rendezvous greeting".into());
    }
    let rank = u32::from_le_bytes(msg[8..12].try_into().expect("4 bytes"));
    let world = u32::from_le_bytes(msg[12..16].try_into().expect("4 bytes"));
    if world != world_size {
        return Err(format!(
            "rank {rank} was started with world size {world}, rank 0 with {world_size}"
        ));
    }
    if rank == 0 || rank >= world_size {
        return Err(format!("rank {rank} is not a joining rank of {world_size}"));
    }
    if joined[rank as usize] {
        return Err(format!("rank {rank} already joined"));
    }
    Ok(rank)
}

/// A joining rank's side: connects to rank 0 at `root` (retrying until `timeout`, rank 0 may
/// start later), introduces itself and returns the id.
pub fn join(root: &str, rank: u32, world_size: u32, timeout: Duration) -> Result<UniqueId> {
    let deadline = Instant::now() + timeout;
    let mut stream = loop {
        let last = match resolve(root).and_then(|addr| {
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())
        }) {
            Ok(stream) => break stream,
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(err(format!(
                "rank {rank} could not reach rank 0 at {root} within {timeout:?}: {last}"
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let io = |e: std::io::Error| err(format!("rank {rank} with rank 0 at {root}: {e}"));
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    let mut msg = Vec::with_capacity(16);
    msg.extend_from_slice(MAGIC);
    msg.extend_from_slice(&rank.to_le_bytes());
    msg.extend_from_slice(&world_size.to_le_bytes());
    stream.write_all(&msg).map_err(io)?;
    let mut reply = Vec::with_capacity(ID_BYTES);
    stream.read_to_end(&mut reply).map_err(io)?;
    if let Some(reason) = reply.strip_prefix(b"ERR ") {
        return Err(err(format!(
            "rank 0 at {root} refused rank {rank}: {}",
            String::from_utf8_lossy(reason)
        )));
    }
    reply.try_into().map_err(|reply: Vec<u8>| {
        err(format!(
            "rank 0 at {root} sent {} bytes, not a {ID_BYTES}-byte id",
            reply.len()
        ))
    })
}

fn resolve(root: &str) -> std::result::Result<SocketAddr, String> {
    root.to_socket_addrs()
        .map_err(|e| format!("cannot resolve `{root}`: {e}"))?
        .next()
        .ok_or_else(|| format!("`{root}` resolves to no address"))
}

#[cfg(test)]
mod tests {
    use std::thread;

    use super::*;

    /// A port nothing listens on (bound and released).
    fn free_port() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    fn id() -> UniqueId {
        std::array::from_fn(|i| (i * 7 + 3) as u8)
    }

    #[test]
    fn every_rank_gets_rank_0s_id_whoever_comes_first() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let root = listener.local_addr().unwrap().to_string();
        // Ranks 3, 1, 2 connect in that order; the root starts after them.
        let ranks: Vec<_> = [3u32, 1, 2]
            .into_iter()
            .map(|rank| {
                let root = root.clone();
                thread::spawn(move || join(&root, rank, 4, Duration::from_secs(20)))
            })
            .collect();
        thread::sleep(Duration::from_millis(100));
        serve(&listener, 4, &id(), Duration::from_secs(20)).unwrap();
        for rank in ranks {
            assert_eq!(rank.join().unwrap().unwrap(), id());
        }
    }

    #[test]
    fn a_joining_rank_waits_for_a_root_that_starts_late() {
        // The root starts on a free port only after the rank began trying it.
        let port = free_port();
        let root = format!("127.0.0.1:{port}");
        let rank = thread::spawn(move || join(&root, 1, 2, Duration::from_secs(20)));
        thread::sleep(Duration::from_millis(500));
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        serve(&listener, 2, &id(), Duration::from_secs(20)).unwrap();
        assert_eq!(rank.join().unwrap().unwrap(), id());
    }

    #[test]
    fn strangers_and_mismatched_ranks_are_refused_and_do_not_count() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let root = listener.local_addr().unwrap().to_string();
        let server = thread::spawn(move || serve(&listener, 2, &id(), Duration::from_secs(20)));

        let mut stranger = TcpStream::connect(&root).unwrap();
        stranger.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        let mut reply = String::new();
        stranger.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("ERR not an atmorep"), "{reply}");

        let e = join(&root, 1, 3, Duration::from_secs(5)).unwrap_err();
        assert!(
            e.to_string()
                .contains("rank 1 was started with world size 3, rank 0 with 2"),
            "{e}"
        );
        let e = join(&root, 2, 2, Duration::from_secs(5)).unwrap_err();
        assert!(
            e.to_string().contains("rank 2 is not a joining rank of 2"),
            "{e}"
        );

        assert_eq!(join(&root, 1, 2, Duration::from_secs(5)).unwrap(), id());
        server.join().unwrap().unwrap();
    }

    #[test]
    fn the_root_names_the_ranks_that_never_joined() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let e = serve(&listener, 3, &id(), Duration::from_millis(300)).unwrap_err();
        assert!(
            e.to_string().contains("ranks [1, 2] of 3 did not join"),
            "{e}"
        );
    }

    #[test]
    fn a_rank_names_the_root_it_could_not_reach() {
        let port = free_port();
        let root = format!("127.0.0.1:{port}");
        let e = join(&root, 1, 2, Duration::from_millis(300)).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("rank 1 could not reach rank 0 at {root}")),
            "{e}"
        );
    }
}
