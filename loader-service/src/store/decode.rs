//! Chunk decoding: encoded chunk bytes (or the fill value of a missing chunk) through the
//! array's codecs to physical f32 values — unpacked with `scale_factor`/`add_offset` in f64 like
//! xarray, missing values as NaN — on the rayon pool, off the async runtime.

use zarrs::array::data_type::{
    Float32DataType, Float64DataType, Int8DataType, Int16DataType, Int32DataType, Int64DataType,
    UInt8DataType, UInt16DataType, UInt32DataType, UInt64DataType,
};
use zarrs::array::{ArrayBytesRaw, ArrayToBytesCodecTraits, CodecOptions, DataType};

use crate::error::{Result, StoreError};
use crate::panic::Panicked;
use crate::store::cache::DecodedChunk;
use crate::store::dataset::Packing;
use crate::store::discovery::{ArrayNode, MetaArray};

/// Codec options for decoding one chunk: single-threaded, because reads already decode many
/// chunks in parallel on the rayon pool and nested codec threads would only contend.
pub fn chunk_codec_options() -> CodecOptions {
    CodecOptions::default().with_concurrent_target(1)
}

/// Runs CPU-bound work on the rayon pool and awaits it without blocking the async runtime. A
/// panic in `work` (or in the parallel iterators it runs) comes back as [`Panicked`]: rayon
/// aborts the process on a panic that escapes a spawned job, and the pool is shared by every
/// stream.
pub(crate) async fn run_on_rayon<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> std::result::Result<T, Panicked> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    rayon::spawn(move || {
        // The receiver only disappears when the caller was cancelled.
        let _ = tx.send(crate::panic::catch("decode", work));
    });
    rx.await.expect("rayon worker dropped its result")
}

/// Decodes one chunk's bytes (the fill value when it is missing) to native-endian elements,
/// with the chunk's shape; errors are the codec's words, for the caller to attach the key to.
pub(crate) fn decode_raw<'a>(
    array: &MetaArray,
    indices: &[u64],
    encoded: Option<&'a [u8]>,
) -> std::result::Result<(ArrayBytesRaw<'a>, Vec<usize>), String> {
    let shape = array.chunk_shape(indices).map_err(|e| e.to_string())?;
    let dims: Vec<usize> = shape.iter().map(|n| n.get() as usize).collect();
    let raw = match encoded {
        Some(bytes) => array
            .codecs()
            .decode(
                std::borrow::Cow::Borrowed(bytes),
                &shape,
                array.data_type(),
                array.fill_value(),
                &chunk_codec_options(),
            )
            .map_err(|e| e.to_string())?
            .into_fixed()
            .map_err(|e| e.to_string())?,
        None => std::borrow::Cow::Owned(
            array
                .fill_value()
                .as_ne_bytes()
                .repeat(dims.iter().product()),
        ),
    };
    Ok((raw, dims))
}

/// Decodes encoded chunk bytes (or the fill value when the chunk is missing) of `node` to
/// physical f32 values.
pub fn decode_chunk(
    url: &str,
    node: &ArrayNode,
    key: &str,
    indices: &[u64],
    encoded: Option<&[u8]>,
    packing: &Packing,
) -> Result<DecodedChunk> {
    crate::panic::decode_hook(|| format!("{url}/{}/{key}", node.name));
    let array = &node.array;
    let corrupt = |detail: String| StoreError::CorruptChunk {
        array: format!("{url}/{}", node.name),
        key: key.to_string(),
        detail,
    };
    let (raw, dims) = decode_raw(array, indices, encoded).map_err(corrupt)?;
    let count: usize = dims.iter().product();
    if array.data_type().is::<Float32DataType>() && packing.is_identity() {
        if raw.len() != count * 4 {
            return Err(corrupt(format!(
                "decoded {} bytes, expected {}",
                raw.len(),
                count * 4
            )));
        }
        // Compressed chunks arrive as an owned buffer, so this moves rather than copies.
        return Ok(DecodedChunk::from_native_bytes(raw.into_owned(), dims));
    }
    let values = to_physical(array.data_type(), &raw, packing).ok_or_else(|| {
        StoreError::UnsupportedDataType {
            array: format!("{url}/{}", node.name),
            dtype: format!("{:?}", array.data_type()),
        }
    })?;
    if values.len() != count {
        return Err(corrupt(format!(
            "decoded {} values, expected {count}",
            values.len()
        )));
    }
    Ok(DecodedChunk::new(values, dims))
}

macro_rules! numeric_kinds {
    ($dtype:expr, $raw:expr, $f:ident) => {{
        let dt: &DataType = $dtype;
        if dt.is::<Float32DataType>() {
            Some($f::<f32, 4>($raw, f32::from_ne_bytes))
        } else if dt.is::<Float64DataType>() {
            Some($f::<f64, 8>($raw, f64::from_ne_bytes))
        } else if dt.is::<Int16DataType>() {
            Some($f::<i16, 2>($raw, i16::from_ne_bytes))
        } else if dt.is::<Int32DataType>() {
            Some($f::<i32, 4>($raw, i32::from_ne_bytes))
        } else if dt.is::<Int64DataType>() {
            Some($f::<i64, 8>($raw, i64::from_ne_bytes))
        } else if dt.is::<Int8DataType>() {
            Some($f::<i8, 1>($raw, i8::from_ne_bytes))
        } else if dt.is::<UInt8DataType>() {
            Some($f::<u8, 1>($raw, u8::from_ne_bytes))
        } else if dt.is::<UInt16DataType>() {
            Some($f::<u16, 2>($raw, u16::from_ne_bytes))
        } else if dt.is::<UInt32DataType>() {
            Some($f::<u32, 4>($raw, u32::from_ne_bytes))
        } else if dt.is::<UInt64DataType>() {
            Some($f::<u64, 8>($raw, u64::from_ne_bytes))
        } else {
            None
        }
    }};
}

/// A stored numeric element that can be widened to f64.
trait Widen: Copy {
    fn widen(self) -> f64;
}
macro_rules! widen {
    ($($t:ty),*) => { $(impl Widen for $t { fn widen(self) -> f64 { self as f64 } })* };
}
widen!(f32, f64, i8, i16, i32, i64, u8, u16, u32, u64);

fn elements<'a, T: Widen + 'a, const N: usize>(
    raw: &'a [u8],
    from: fn([u8; N]) -> T,
) -> impl Iterator<Item = T> + 'a {
    raw.chunks_exact(N)
        .map(move |c| from(c.try_into().expect("chunks_exact yields N bytes")))
}

fn widen_all<T: Widen, const N: usize>(raw: &[u8], from: fn([u8; N]) -> T) -> Vec<f64> {
    elements(raw, from).map(Widen::widen).collect()
}

/// Raw stored values as f64 (for coordinates; no packing).
pub(crate) fn to_f64(dtype: &DataType, raw: &[u8]) -> Option<Vec<f64>> {
    numeric_kinds!(dtype, raw, widen_all)
}

fn to_physical(dtype: &DataType, raw: &[u8], packing: &Packing) -> Option<Vec<f32>> {
    let wide = to_f64(dtype, raw)?;
    // Unpacking in f64 like xarray, so packed values match it to the last bit.
    Some(
        wide.into_iter()
            .map(|v| {
                if v.is_nan() || packing.missing.contains(&v) {
                    f32::NAN
                } else {
                    (v * packing.scale + packing.offset) as f32
                }
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_unpacks_in_f64_and_masks_fill() {
        let packing = Packing {
            scale: 0.5,
            offset: 10.0,
            missing: vec![-32767.0],
        };
        let raw: Vec<u8> = [4i16, -32767, -2]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        let dt = zarrs::array::data_type::int16();
        let v = to_physical(&dt, &raw, &packing).unwrap();
        assert_eq!(v[0], 12.0);
        assert!(v[1].is_nan());
        assert_eq!(v[2], 9.0);
    }
}
