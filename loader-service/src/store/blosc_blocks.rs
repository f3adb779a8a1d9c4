//! The blocks of a blosc1 chunk, read and decoded one by one. A blosc chunk is a 16-byte header
//! and a table of block offsets (`bstarts`), then independently compressed (and shuffled)
//! blocks, so a reader that needs a few rows of a large chunk can fetch the header, then only the
//! byte ranges of the blocks holding those rows, and decode each of them alone
//! (docs/performance.md, "Reading only the blosc blocks a request uses").
//!
//! A block is decoded by wrapping its compressed bytes in a one-block blosc buffer and letting
//! c-blosc decode that (through zarrs' safe wrapper): the same code decodes it, byte for byte as
//! in a whole-chunk decode. Blocks of a chunk compressed by several threads may be stored out of
//! order, so a block ends at the next larger offset (or at the end of the chunk), not at the next
//! table entry.

use std::ops::Range;

use zarrs::array::codec::bytes_to_bytes::blosc::blosc_decompress_bytes;

/// Bytes of a blosc1 header before the block offsets.
pub const HEADER_LEN: usize = 16;
/// The blosc format version c-blosc 1.x writes and reads.
const FORMAT_VERSION: u8 = 2;
/// Stored without compression: the data follows the header, no block offsets.
const MEMCPYED: u8 = 0x2;
/// Blocks are not split into one stream per byte of an element.
const DONT_SPLIT: u8 = 0x10;
/// Elements are byte-shuffled (bit shuffling, 0x4, is left to c-blosc).
const DOSHUFFLE: u8 = 0x1;
/// The flags' top three bits name the compressor's format; lz4 and lz4hc share format 1.
const FORMAT_MASK: u8 = 0xE0;
const LZ4_FORMAT: u8 = 1;
/// c-blosc splits a block only if each stream holds at least this many bytes.
const MIN_BUFFERSIZE: usize = 128;
/// Bytes to read first: the header and the offsets of up to 1020 blocks (a 37-level ERA5 chunk
/// at 0.25° has 294 blocks of 512 KiB).
pub const FIRST_READ: usize = 4096;

/// The header (and one-entry block table) of a block decoded alone.
pub const MINI_HEADER_LEN: usize = HEADER_LEN + 4;

/// Why the start of a chunk is not a blosc1 header this reader can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BloscIndexError {
    #[error("blosc header truncated: {got} bytes, {needed} needed")]
    Truncated { needed: usize, got: usize },
    #[error("blosc format version {0}, expected {FORMAT_VERSION}")]
    Version(u8),
    #[error("blosc header field {field} is {value}: {why}")]
    Field {
        field: &'static str,
        value: usize,
        why: &'static str,
    },
    #[error("blosc block {block} starts at {start}, outside {header}..{cbytes}")]
    BlockStart {
        block: usize,
        start: usize,
        header: usize,
        cbytes: usize,
    },
    #[error("blosc blocks {0} and {1} start at the same offset")]
    SharedStart(usize, usize),
    #[error("blosc block {block}: {detail}")]
    Decode { block: usize, detail: String },
}

/// The header and block table of one blosc1 chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BloscIndex {
    versionlz: u8,
    flags: u8,
    typesize: u8,
    /// Decoded bytes of the whole chunk.
    pub nbytes: usize,
    /// Decoded bytes of every block but a shorter last one.
    pub blocksize: usize,
    /// Encoded bytes of the whole chunk.
    pub cbytes: usize,
    /// Encoded byte range of each block (empty for a memcpyed chunk).
    ranges: Vec<Range<usize>>,
}

fn le_u32(bytes: &[u8], at: usize) -> usize {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize
}

impl BloscIndex {
    /// How many bytes from the start of the chunk hold the header and the block table, from
    /// its first [`HEADER_LEN`] bytes.
    pub fn header_len(first: &[u8]) -> Result<usize, BloscIndexError> {
        let (nbytes, blocksize, flags) = Self::fixed(first)?;
        Ok(if flags & MEMCPYED != 0 {
            HEADER_LEN
        } else {
            HEADER_LEN + 4 * nbytes.div_ceil(blocksize)
        })
    }

    fn fixed(first: &[u8]) -> Result<(usize, usize, u8), BloscIndexError> {
        if first.len() < HEADER_LEN {
            return Err(BloscIndexError::Truncated {
                needed: HEADER_LEN,
                got: first.len(),
            });
        }
        if first[0] != FORMAT_VERSION {
            return Err(BloscIndexError::Version(first[0]));
        }
        let field = |field, value, why| BloscIndexError::Field { field, value, why };
        if first[3] == 0 {
            return Err(field("typesize", 0, "must be positive"));
        }
        let (nbytes, blocksize) = (le_u32(first, 4), le_u32(first, 8));
        if nbytes == 0 {
            return Err(field("nbytes", 0, "an empty chunk has no blocks"));
        }
        if blocksize == 0 {
            return Err(field("blocksize", 0, "must be positive"));
        }
        Ok((nbytes, blocksize, first[2]))
    }

    /// Parses the header and block table from the first bytes of a chunk (at least
    /// [`Self::header_len`] of them).
    pub fn parse(bytes: &[u8]) -> Result<Self, BloscIndexError> {
        let (nbytes, blocksize, flags) = Self::fixed(bytes)?;
        let header = Self::header_len(bytes)?;
        if bytes.len() < header {
            return Err(BloscIndexError::Truncated {
                needed: header,
                got: bytes.len(),
            });
        }
        let cbytes = le_u32(bytes, 12);
        let mut index = Self {
            versionlz: bytes[1],
            flags,
            typesize: bytes[3],
            nbytes,
            blocksize,
            cbytes,
            ranges: Vec::new(),
        };
        if flags & MEMCPYED != 0 {
            if cbytes != HEADER_LEN + nbytes {
                return Err(BloscIndexError::Field {
                    field: "cbytes",
                    value: cbytes,
                    why: "a memcpyed chunk holds exactly its header and nbytes",
                });
            }
            return Ok(index);
        }
        let nblocks = nbytes.div_ceil(blocksize);
        let starts: Vec<usize> = (0..nblocks)
            .map(|j| le_u32(bytes, HEADER_LEN + 4 * j))
            .collect();
        for (block, &start) in starts.iter().enumerate() {
            // A block holds at least one split's 4-byte size.
            if start < header || start + 4 > cbytes {
                return Err(BloscIndexError::BlockStart {
                    block,
                    start,
                    header,
                    cbytes,
                });
            }
        }
        let mut order: Vec<usize> = (0..nblocks).collect();
        order.sort_by_key(|&j| starts[j]);
        index.ranges = vec![0..0; nblocks];
        for (k, &j) in order.iter().enumerate() {
            let end = match order.get(k + 1) {
                Some(&next) if starts[next] == starts[j] => {
                    return Err(BloscIndexError::SharedStart(j.min(next), j.max(next)));
                }
                Some(&next) => starts[next],
                None => cbytes,
            };
            index.ranges[j] = starts[j]..end;
        }
        Ok(index)
    }

    /// Blocks of the chunk.
    pub fn nblocks(&self) -> usize {
        self.nbytes.div_ceil(self.blocksize)
    }

    /// Whether the chunk is stored uncompressed.
    pub fn memcpyed(&self) -> bool {
        self.flags & MEMCPYED != 0
    }

    /// The decoded byte range of block `j`.
    pub fn decoded_range(&self, j: usize) -> Range<usize> {
        let start = j * self.blocksize;
        start..(start + self.blocksize).min(self.nbytes)
    }

    /// Whether the blocks are stored in their order (each after the one before), as a
    /// single-threaded compressor writes them.
    pub fn in_order(&self) -> bool {
        (1..self.nblocks()).all(|j| self.encoded_range(j - 1).end <= self.encoded_range(j).start)
    }

    /// The encoded byte range of block `j` in the chunk.
    pub fn encoded_range(&self, j: usize) -> Range<usize> {
        if self.memcpyed() {
            let decoded = self.decoded_range(j);
            HEADER_LEN + decoded.start..HEADER_LEN + decoded.end
        } else {
            self.ranges[j].clone()
        }
    }

    /// The blocks holding the decoded bytes `decoded` (clamped to the chunk).
    pub fn blocks_for(&self, decoded: Range<usize>) -> Range<usize> {
        let end = decoded.end.min(self.nbytes);
        if decoded.start >= end {
            return 0..0;
        }
        decoded.start / self.blocksize..end.div_ceil(self.blocksize)
    }

    /// Decodes block `j` alone from its encoded bytes (those of [`Self::encoded_range`]).
    pub fn decode_block(&self, j: usize, encoded: &[u8]) -> Result<Vec<u8>, BloscIndexError> {
        let mut mini = vec![0u8; MINI_HEADER_LEN];
        mini.extend_from_slice(encoded);
        self.decode_block_in_place(j, &mut mini, MINI_HEADER_LEN)
    }

    /// Decodes block `j` from `buf[at..]`, which starts with its encoded bytes (those of
    /// [`Self::encoded_range`]), writing a one-block header over the [`MINI_HEADER_LEN`] bytes
    /// before them: no copy of the block, for a reader that has used those bytes (the block
    /// before, or the chunk's header).
    pub fn decode_block_in_place(
        &self,
        j: usize,
        buf: &mut [u8],
        at: usize,
    ) -> Result<Vec<u8>, BloscIndexError> {
        let decoded = self.decoded_range(j);
        let size = decoded.len();
        let fail = |detail: String| BloscIndexError::Decode { block: j, detail };
        let len = self.encoded_range(j).len();
        if at < MINI_HEADER_LEN || buf.len() < at + len {
            return Err(fail(format!(
                "{} encoded bytes after {at}, expected {len} after at least {MINI_HEADER_LEN}",
                buf.len().saturating_sub(at)
            )));
        }
        let encoded = &mut buf[at - MINI_HEADER_LEN..at + len];
        if self.memcpyed() {
            return Ok(encoded[MINI_HEADER_LEN..].to_vec());
        }
        // A one-block buffer: nbytes = blocksize = this block's size, its data right after a
        // one-entry table. The whole-chunk decoder never splits a shorter last block, while a
        // one-block buffer has no "last block", so the flag says so.
        let mut flags = self.flags;
        if size < self.blocksize {
            flags |= DONT_SPLIT;
        }
        let as_u32 = |v: usize| {
            u32::try_from(v).map_err(|_| fail(format!("size {v} does not fit a blosc header")))
        };
        let mut header = [0u8; MINI_HEADER_LEN];
        header[..4].copy_from_slice(&[FORMAT_VERSION, self.versionlz, flags, self.typesize]);
        header[4..8].copy_from_slice(&as_u32(size)?.to_le_bytes());
        header[8..12].copy_from_slice(&as_u32(size)?.to_le_bytes());
        header[12..16].copy_from_slice(&as_u32(MINI_HEADER_LEN + len)?.to_le_bytes());
        header[16..20].copy_from_slice(&as_u32(MINI_HEADER_LEN)?.to_le_bytes());
        encoded[..MINI_HEADER_LEN].copy_from_slice(&header);
        let out = blosc_decompress_bytes(encoded, size, 1).map_err(|e| fail(e.to_string()))?;
        if out.len() != size {
            return Err(fail(format!(
                "decoded {} bytes, expected {size}",
                out.len()
            )));
        }
        Ok(out)
    }

    /// Whether [`Self::decode_f32_block`] decodes this chunk's blocks itself: 4-byte elements,
    /// stored uncompressed or compressed by lz4 (or lz4hc: the same format), byte-shuffled or
    /// not.
    pub fn native_f32(&self) -> bool {
        let known = DOSHUFFLE | DONT_SPLIT | FORMAT_MASK;
        self.typesize == 4
            && (self.memcpyed() || (self.flags >> 5 == LZ4_FORMAT && self.flags & !known == 0))
    }

    /// Decodes block `j` of a chunk of f32 values (see [`Self::native_f32`]) from its encoded
    /// bytes (those of [`Self::encoded_range`]) into `out` (the block's values), as c-blosc's
    /// block decoder does, without its per-block allocation or copy: lz4 writes each byte
    /// stream into `planes` (reused; streams stored raw are read where they are) and the
    /// unshuffle reads the streams straight into `out`.
    pub fn decode_f32_block(
        &self,
        j: usize,
        encoded: &[u8],
        out: &mut [f32],
        planes: &mut Vec<u8>,
    ) -> Result<(), BloscIndexError> {
        let size = self.decoded_range(j).len();
        let fail = |detail: String| BloscIndexError::Decode { block: j, detail };
        if !self.native_f32() {
            return Err(fail("not an lz4 chunk of 4-byte values".into()));
        }
        if out.len() * 4 != size {
            return Err(fail(format!(
                "{} values asked for a block of {size} bytes",
                out.len()
            )));
        }
        if self.memcpyed() {
            if encoded.len() != size {
                return Err(fail(format!(
                    "{} bytes stored, expected {size}",
                    encoded.len()
                )));
            }
            for (v, b) in out.iter_mut().zip(encoded.chunks_exact(4)) {
                *v = f32::from_le_bytes(b.try_into().expect("4 bytes"));
            }
            return Ok(());
        }
        // c-blosc's rule (blosc_d): a full block is split into one stream per byte of an
        // element unless the header says not to or the streams would be too short.
        let leftover = size < self.blocksize;
        let nsplits = if self.flags & DONT_SPLIT == 0 && size / 4 >= MIN_BUFFERSIZE && !leftover {
            4
        } else {
            1
        };
        let neblock = size / nsplits;
        // Unshuffled blocks are their streams one after another, decoded straight into `out`;
        // shuffled ones go through `planes`, or are read where they are when stored raw.
        let shuffle = self.flags & DOSHUFFLE != 0;
        if shuffle && planes.len() < size {
            planes.resize(size, 0);
        }
        let out_bytes = bytemuck::cast_slice_mut::<f32, u8>(out);
        let mut raw: [Option<Range<usize>>; 4] = [None, None, None, None];
        let mut at = 0;
        for (s, raw) in raw.iter_mut().enumerate().take(nsplits) {
            let cbytes = encoded
                .get(at..at + 4)
                .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")))
                .ok_or_else(|| fail(format!("stream {s} has no size at byte {at}")))?;
            at += 4;
            let end = usize::try_from(cbytes)
                .ok()
                .filter(|&n| n > 0 && at + n <= encoded.len())
                .map(|n| at + n)
                .ok_or_else(|| {
                    fail(format!(
                        "stream {s} says {cbytes} bytes, {} are left",
                        encoded.len() - at
                    ))
                })?;
            let src = &encoded[at..end];
            let dst = if shuffle {
                &mut planes[s * neblock..(s + 1) * neblock]
            } else {
                &mut out_bytes[s * neblock..(s + 1) * neblock]
            };
            if src.len() == neblock {
                if shuffle {
                    *raw = Some(at..end);
                } else {
                    dst.copy_from_slice(src);
                }
            } else {
                let n = lz4::block::decompress_to_buffer(src, Some(neblock as i32), dst)
                    .map_err(|e| fail(format!("lz4 stream {s}: {e}")))?;
                if n != neblock {
                    return Err(fail(format!(
                        "lz4 stream {s} decoded {n} bytes, expected {neblock}"
                    )));
                }
            }
            at = end;
        }
        if shuffle {
            let stream = |s: usize| match &raw[s] {
                Some(r) => &encoded[r.clone()],
                None => &planes[s * neblock..(s + 1) * neblock],
            };
            let n = out.len();
            let byte_planes: [&[u8]; 4] = if nsplits == 4 {
                [stream(0), stream(1), stream(2), stream(3)]
            } else {
                let all = stream(0);
                [&all[..n], &all[n..2 * n], &all[2 * n..3 * n], &all[3 * n..]]
            };
            unshuffle4(byte_planes, out);
        }
        Ok(())
    }
}

/// c-blosc's byte unshuffle of 4-byte elements: value `i` is byte `i` of each plane, least
/// significant first.
fn unshuffle4(planes: [&[u8]; 4], out: &mut [f32]) {
    let n = out.len();
    let planes = planes.map(|p| &p[..n]);
    let done = unshuffle4_simd(planes, out);
    let [p0, p1, p2, p3] = planes;
    for i in done..n {
        out[i] = f32::from_bits(u32::from_le_bytes([p0[i], p1[i], p2[i], p3[i]]));
    }
}

/// The unshuffle 16 values at a time with c-blosc's SSE2 kernel: two rounds of interleaving
/// (bytes of planes 0 and 1, and of 2 and 3; then their 16-bit pairs). Returns how many values
/// it wrote. (The scalar loop compiles to 4 values per step, ≈ 1.8× c-blosc's time.)
#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
fn unshuffle4_simd(planes: [&[u8]; 4], out: &mut [f32]) -> usize {
    use safe_arch::{
        m128i, unpack_high_i8_m128i, unpack_high_i16_m128i, unpack_low_i8_m128i,
        unpack_low_i16_m128i,
    };
    const W: usize = 16;
    let whole = out.len() / W * W;
    let [p0, p1, p2, p3] = planes;
    let load = |p: &[u8]| m128i::from(<[u8; W]>::try_from(p).expect("16 bytes"));
    for ((((o, a), b), c), d) in out[..whole]
        .chunks_exact_mut(W)
        .zip(p0.chunks_exact(W))
        .zip(p1.chunks_exact(W))
        .zip(p2.chunks_exact(W))
        .zip(p3.chunks_exact(W))
    {
        let (a, b, c, d) = (load(a), load(b), load(c), load(d));
        let (ab_lo, ab_hi) = (unpack_low_i8_m128i(a, b), unpack_high_i8_m128i(a, b));
        let (cd_lo, cd_hi) = (unpack_low_i8_m128i(c, d), unpack_high_i8_m128i(c, d));
        let values: [[u32; 4]; 4] = [
            unpack_low_i16_m128i(ab_lo, cd_lo).into(),
            unpack_high_i16_m128i(ab_lo, cd_lo).into(),
            unpack_low_i16_m128i(ab_hi, cd_hi).into(),
            unpack_high_i16_m128i(ab_hi, cd_hi).into(),
        ];
        o.copy_from_slice(&bytemuck::cast::<[[u32; 4]; 4], [f32; W]>(values));
    }
    whole
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "sse2")))]
fn unshuffle4_simd(_planes: [&[u8]; 4], _out: &mut [f32]) -> usize {
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use zarrs::array::codec::bytes_to_bytes::blosc::{
        BloscCompressionLevel, BloscCompressor, BloscShuffleMode, blosc_compress_bytes,
    };

    /// Smooth-ish floats (compressible), `n` of them, as little-endian bytes.
    fn field(n: usize) -> Vec<u8> {
        (0..n)
            .flat_map(|i| {
                let x = i as f32;
                let v = (x * 0.013).sin() * 40.0 + (x * 0.0007).cos() * 250.0;
                // Few significant bits, as in ERA5's packed origins: compressible unshuffled too.
                ((v * 8.0).round() / 8.0).to_le_bytes()
            })
            .collect()
    }

    /// Random bytes: blosc stores them uncompressed.
    fn noise(n: usize) -> Vec<u8> {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect()
    }

    fn compress(
        data: &[u8],
        compressor: BloscCompressor,
        shuffle: BloscShuffleMode,
        clevel: u8,
        blocksize: usize,
    ) -> Vec<u8> {
        blosc_compress_bytes(
            data,
            BloscCompressionLevel::try_from(clevel).unwrap(),
            shuffle,
            4,
            compressor,
            blocksize,
            1,
        )
        .unwrap()
    }

    /// Every block decoded alone equals the same bytes of the whole-chunk decode.
    fn blocks_match_whole(chunk: &[u8], data: &[u8]) -> BloscIndex {
        let whole = blosc_decompress_bytes(chunk, data.len(), 1).unwrap();
        assert_eq!(whole, data);
        let index = BloscIndex::parse(&chunk[..BloscIndex::header_len(chunk).unwrap()]).unwrap();
        assert_eq!(index.nbytes, data.len());
        for j in 0..index.nblocks() {
            let block = index
                .decode_block(j, &chunk[index.encoded_range(j)])
                .unwrap();
            assert_eq!(block, whole[index.decoded_range(j)], "block {j}");
        }
        if index.native_f32() {
            let mut planes = Vec::new();
            for j in 0..index.nblocks() {
                let mut out = vec![f32::NAN; index.decoded_range(j).len() / 4];
                index
                    .decode_f32_block(j, &chunk[index.encoded_range(j)], &mut out, &mut planes)
                    .unwrap();
                let bytes: Vec<u8> = out.iter().flat_map(|v| v.to_le_bytes()).collect();
                assert_eq!(bytes, whole[index.decoded_range(j)], "block {j} natively");
            }
        }
        if index.in_order() && !index.memcpyed() {
            // In place, in order, over one buffer holding the chunk: each block's header
            // overwrites the end of the block before, which is decoded already.
            let mut buf = chunk.to_vec();
            for j in 0..index.nblocks() {
                let at = index.encoded_range(j).start;
                let block = index.decode_block_in_place(j, &mut buf, at).unwrap();
                assert_eq!(block, whole[index.decoded_range(j)], "block {j} in place");
            }
            assert_ne!(buf, chunk, "the headers were written over the buffer");
        }
        index
    }

    #[test]
    fn every_block_alone_matches_the_whole_chunk() {
        use BloscCompressor::{LZ4, Zstd};
        use BloscShuffleMode::{BitShuffle, NoShuffle, Shuffle};
        // 100 000 floats in blocks asked to be 16 KiB: lz4 splits (one stream per byte of a
        // float) and so enlarges them to 64 KiB (6 blocks and a leftover), zstd keeps them
        // (24 and a leftover).
        let data = field(100_000);
        for (compressor, shuffle) in [
            (LZ4, Shuffle),
            (Zstd, Shuffle),
            (LZ4, BitShuffle),
            (Zstd, BitShuffle),
            (LZ4, NoShuffle),
        ] {
            let chunk = compress(&data, compressor, shuffle, 5, 16384);
            let index = blocks_match_whole(&chunk, &data);
            let what = format!("{compressor:?} {shuffle:?}");
            assert!(index.nblocks() >= 7, "{what}: {} blocks", index.nblocks());
            assert!(!index.memcpyed(), "{what}");
            let last = index.nblocks() - 1;
            assert!(index.decoded_range(last).len() < index.blocksize, "{what}");
        }
        // Blosc's own block size (0: chosen from the level and the codec).
        let chunk = compress(&field(400_000), LZ4, Shuffle, 5, 0);
        assert!(blocks_match_whole(&chunk, &field(400_000)).nblocks() > 1);
    }

    #[test]
    fn memcpyed_chunks_are_copied_block_by_block() {
        for (data, clevel) in [(noise(300_000), 5), (field(75_000), 0)] {
            let chunk = compress(
                &data,
                BloscCompressor::LZ4,
                BloscShuffleMode::Shuffle,
                clevel,
                16384,
            );
            let index = blocks_match_whole(&chunk, &data);
            assert!(index.memcpyed(), "clevel {clevel}");
            assert!(index.nblocks() > 1);
            assert_eq!(BloscIndex::header_len(&chunk).unwrap(), HEADER_LEN);
        }
    }

    /// Floats whose least significant byte is noise: lz4 stores that byte's stream raw.
    fn noisy_field(n: usize) -> Vec<u8> {
        let noise = noise(n);
        let mut data = field(n);
        for (i, b) in noise.into_iter().enumerate() {
            data[4 * i] = b;
        }
        data
    }

    #[test]
    fn lz4_blocks_decode_natively_as_c_blosc_does() {
        use BloscCompressor::{BloscLZ, LZ4, LZ4HC, Zstd};
        use BloscShuffleMode::{BitShuffle, NoShuffle, Shuffle};
        let mut native = 0;
        for (data, blocksize) in [
            (field(100_000), 16384),
            (noisy_field(100_000), 16384),
            (noisy_field(300_001 * 4 / 4), 0),
            // Blocks of 256 bytes: 64 values, too few to split.
            (field(1000), 256),
        ] {
            for (compressor, shuffle) in [
                (LZ4, Shuffle),
                (LZ4HC, Shuffle),
                (LZ4, NoShuffle),
                (LZ4, BitShuffle),
                (Zstd, Shuffle),
                (BloscLZ, Shuffle),
            ] {
                let chunk = compress(&data, compressor, shuffle, 5, blocksize);
                let index = blocks_match_whole(&chunk, &data);
                let lz4 = matches!(compressor, LZ4 | LZ4HC) && shuffle != BitShuffle;
                assert_eq!(
                    index.native_f32(),
                    lz4 || index.memcpyed(),
                    "{compressor:?} {shuffle:?} {blocksize}"
                );
                native += usize::from(index.native_f32());
            }
        }
        assert!(native >= 12);
        // The split stream path with raw streams was taken: the noisy byte's stream is raw.
        let chunk = compress(&noisy_field(100_000), LZ4, Shuffle, 5, 16384);
        let index = BloscIndex::parse(&chunk).unwrap();
        let first = &chunk[index.encoded_range(0)];
        let size = index.decoded_range(0).len();
        assert_eq!(le_u32(first, 0), size / 4, "stream 0 stored raw");
    }

    #[test]
    fn corrupt_lz4_blocks_are_errors_naming_the_block() {
        let data = field(100_000);
        let chunk = compress(
            &data,
            BloscCompressor::LZ4,
            BloscShuffleMode::Shuffle,
            5,
            16384,
        );
        let index = BloscIndex::parse(&chunk).unwrap();
        let mut planes = Vec::new();
        let mut out = vec![0.0; index.decoded_range(2).len() / 4];
        let mut block = chunk[index.encoded_range(2)].to_vec();
        // A stream longer than the block.
        let len = block.len() as u32;
        block[..4].copy_from_slice(&len.to_le_bytes());
        let err = index
            .decode_f32_block(2, &block, &mut out, &mut planes)
            .unwrap_err();
        assert!(
            matches!(err, BloscIndexError::Decode { block: 2, .. }),
            "{err}"
        );
        // Garbage lz4 data.
        let mut block = chunk[index.encoded_range(2)].to_vec();
        for b in &mut block[4..40] {
            *b = 0xff;
        }
        let err = index
            .decode_f32_block(2, &block, &mut out, &mut planes)
            .unwrap_err();
        assert!(err.to_string().contains("block 2"), "{err}");
        // The wrong number of values.
        let err = index
            .decode_f32_block(
                2,
                &chunk[index.encoded_range(2)],
                &mut out[1..],
                &mut planes,
            )
            .unwrap_err();
        assert!(err.to_string().contains("values asked"), "{err}");
    }

    #[test]
    fn blocks_stored_out_of_order_end_at_the_next_larger_offset() {
        let data = field(10_000);
        let chunk = compress(
            &data,
            BloscCompressor::Zstd,
            BloscShuffleMode::Shuffle,
            5,
            8192,
        );
        let index = BloscIndex::parse(&chunk).unwrap();
        assert_eq!(index.nblocks(), 5);
        // Store the blocks in the order 3, 0, 4, 1, 2, rewriting the offsets.
        let order = [3, 0, 4, 1, 2];
        let header = BloscIndex::header_len(&chunk).unwrap();
        let mut permuted = chunk[..header].to_vec();
        for &j in &order {
            let at = permuted.len() as u32;
            permuted[HEADER_LEN + 4 * j..HEADER_LEN + 4 * j + 4].copy_from_slice(&at.to_le_bytes());
            permuted.extend_from_slice(&chunk[index.encoded_range(j)]);
        }
        assert_eq!(permuted.len(), chunk.len());
        let permuted_index = blocks_match_whole(&permuted, &data);
        let len = |j: usize| index.encoded_range(j).len();
        let at4 = header + len(3) + len(0);
        assert_eq!(permuted_index.encoded_range(4), at4..at4 + len(4));
        assert_eq!(permuted_index.encoded_range(2).end, chunk.len());
    }

    #[test]
    fn blocks_for_covers_a_decoded_range() {
        let chunk = compress(
            &field(10_000),
            BloscCompressor::Zstd,
            BloscShuffleMode::Shuffle,
            5,
            8192,
        );
        let index = BloscIndex::parse(&chunk).unwrap();
        assert_eq!(index.blocks_for(0..1), 0..1);
        assert_eq!(index.blocks_for(8191..8193), 0..2);
        assert_eq!(index.blocks_for(8192..16384), 1..2);
        assert_eq!(index.blocks_for(39_000..1 << 30), 4..5);
        assert_eq!(index.blocks_for(5..5), 0..0);
    }

    #[test]
    fn bad_headers_are_refused_with_the_reason() {
        let data = field(10_000);
        let chunk = compress(
            &data,
            BloscCompressor::Zstd,
            BloscShuffleMode::Shuffle,
            5,
            8192,
        );
        assert_eq!(
            BloscIndex::parse(&chunk[..10]),
            Err(BloscIndexError::Truncated {
                needed: 16,
                got: 10
            })
        );
        assert_eq!(
            BloscIndex::parse(&chunk[..20]),
            Err(BloscIndexError::Truncated {
                needed: 36,
                got: 20
            })
        );
        let mut bad = chunk.clone();
        bad[0] = 3;
        assert_eq!(BloscIndex::parse(&bad), Err(BloscIndexError::Version(3)));
        let mut bad = chunk.clone();
        bad[8..12].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            BloscIndex::parse(&bad),
            Err(BloscIndexError::Field {
                field: "blocksize",
                ..
            })
        ));
        let mut bad = chunk.clone();
        bad[HEADER_LEN + 8..HEADER_LEN + 12].copy_from_slice(&(chunk.len() as u32).to_le_bytes());
        assert!(matches!(
            BloscIndex::parse(&bad),
            Err(BloscIndexError::BlockStart { block: 2, .. })
        ));
        let mut bad = chunk.clone();
        let first = bad[HEADER_LEN..HEADER_LEN + 4].to_vec();
        bad[HEADER_LEN + 4..HEADER_LEN + 8].copy_from_slice(&first);
        assert_eq!(
            BloscIndex::parse(&bad),
            Err(BloscIndexError::SharedStart(0, 1))
        );
        // Corrupt compressed bytes fail in the decoder, naming the block.
        let index = BloscIndex::parse(&chunk).unwrap();
        let mut block = chunk[index.encoded_range(1)].to_vec();
        block[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            index.decode_block(1, &block),
            Err(BloscIndexError::Decode { block: 1, .. })
        ));
        assert!(matches!(
            index.decode_block(1, &block[1..]),
            Err(BloscIndexError::Decode { block: 1, .. })
        ));
    }
}
