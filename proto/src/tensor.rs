//! Tensors on the wire ([`pb::Tensor`]): a row-major shape, an element type and little-endian
//! bytes (docs/design.md §5).
//!
//! Two element types travel: `f32` and `bf16` (the upper half of an `f32`, rounded to
//! nearest-even; halves the bytes of token payloads at the cost of ~3 significant digits).
//! Everything decodes to `f32`.
//!
//! Copies are avoided where that is cheap: encoding an owned `Vec<f32>` as F32 on a
//! little-endian machine hands the vector itself to [`Bytes`] (no copy), and
//! [`pb::Tensor::as_f32`] borrows the received buffer when it is F32 and suitably aligned.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;

use crate::pb;
use crate::pb::Dtype;

/// Why a tensor cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TensorError {
    /// The dtype field holds `DTYPE_UNSPECIFIED` or a value this build does not know.
    #[error("tensor dtype {0} is unspecified or unknown")]
    Dtype(i32),
    /// The shape's element count overflows `usize`.
    #[error("tensor shape {0:?} overflows")]
    Overflow(Vec<u64>),
    /// The data does not hold exactly `product(shape)` elements.
    #[error("tensor of shape {shape:?} and dtype {dtype:?} needs {expected} bytes, data has {got}")]
    DataLength {
        shape: Vec<u64>,
        dtype: Dtype,
        expected: usize,
        got: usize,
    },
    /// The tensor does not have the shape the message requires.
    #[error("{what}: expected shape {expected}, got {got:?}")]
    Shape {
        what: String,
        /// The expected shape, `_` for a free axis.
        expected: String,
        got: Vec<u64>,
    },
}

/// Bytes per element of `dtype`, `None` for `DTYPE_UNSPECIFIED`.
pub const fn element_size(dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::F32 => Some(4),
        Dtype::Bf16 => Some(2),
        Dtype::Unspecified => None,
    }
}

/// `f32` → `bf16` bits, rounding to nearest, ties to even. Values beyond the largest finite
/// bf16 round to infinity, as IEEE rounding requires. NaN stays NaN (sign and the upper payload
/// bits kept, quiet bit set) — plain truncation could otherwise turn a NaN whose payload sits in
/// the low bits into infinity.
pub const fn f32_to_bf16(value: f32) -> u16 {
    let bits = value.to_bits();
    if value.is_nan() {
        return ((bits >> 16) as u16) | 0x0040;
    }
    // Adding 0x7FFF rounds up exactly when the dropped half exceeds 0x8000; the lowest kept bit
    // breaks the tie. Cannot overflow: the largest non-NaN pattern is 0xFF80_0000.
    let round = 0x7FFF + ((bits >> 16) & 1);
    ((bits + round) >> 16) as u16
}

/// `bf16` bits → `f32` (exact).
pub const fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Owns an `f32` vector and shows it as bytes, so [`Bytes::from_owner`] can send it without a
/// copy. Only sound as "little-endian bytes" on little-endian targets.
#[cfg(target_endian = "little")]
struct F32Le(Vec<f32>);

#[cfg(target_endian = "little")]
impl AsRef<[u8]> for F32Le {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

/// Encodes `values` as `dtype` (F32 without a copy on little-endian machines).
///
/// # Panics
/// On `DTYPE_UNSPECIFIED`, a programming error: requests map it to F32 before encoding.
pub fn encode_f32(values: Vec<f32>, dtype: Dtype) -> Bytes {
    match dtype {
        #[cfg(target_endian = "little")]
        Dtype::F32 => Bytes::from_owner(F32Le(values)),
        _ => encode_f32_slice(&values, dtype),
    }
}

/// Takes back the buffers of sent tensors (see [`encode_f32_recycled`]): a buffer pool.
pub trait Recycle: Send + Sync {
    fn recycle(&self, buffer: Vec<f32>);
}

/// Owns an `f32` vector shown as bytes and hands it back to its pool once the message that
/// holds it has been encoded and dropped.
#[cfg(target_endian = "little")]
struct Recycled {
    values: Vec<f32>,
    pool: Arc<dyn Recycle>,
}

#[cfg(target_endian = "little")]
impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.values)
    }
}

#[cfg(target_endian = "little")]
impl Drop for Recycled {
    fn drop(&mut self) {
        self.pool.recycle(std::mem::take(&mut self.values));
    }
}

/// [`encode_f32`], giving `values` back to `pool` once the bytes are dropped (F32 on
/// little-endian machines: no copy), or right after converting them (other cases).
///
/// # Panics
/// On `DTYPE_UNSPECIFIED`, as [`encode_f32`].
pub fn encode_f32_recycled(values: Vec<f32>, dtype: Dtype, pool: &Arc<dyn Recycle>) -> Bytes {
    match dtype {
        #[cfg(target_endian = "little")]
        Dtype::F32 => Bytes::from_owner(Recycled {
            values,
            pool: pool.clone(),
        }),
        _ => {
            let bytes = encode_f32_slice(&values, dtype);
            pool.recycle(values);
            bytes
        }
    }
}

/// Encodes `values` as `dtype` into a new buffer.
///
/// # Panics
/// On `DTYPE_UNSPECIFIED`, as [`encode_f32`].
pub fn encode_f32_slice(values: &[f32], dtype: Dtype) -> Bytes {
    match dtype {
        Dtype::F32 => {
            let mut out = Vec::with_capacity(values.len() * 4);
            for v in values {
                out.extend_from_slice(&v.to_le_bytes());
            }
            Bytes::from(out)
        }
        Dtype::Bf16 => {
            let mut out = Vec::with_capacity(values.len() * 2);
            for v in values {
                out.extend_from_slice(&f32_to_bf16(*v).to_le_bytes());
            }
            Bytes::from(out)
        }
        Dtype::Unspecified => panic!("encode_f32: DTYPE_UNSPECIFIED has no encoding"),
    }
}

/// Appends the values of `data` (little-endian `dtype` elements) to `out` as `f32`.
pub fn decode_into(data: &[u8], dtype: Dtype, out: &mut Vec<f32>) -> Result<(), TensorError> {
    let size = element_size(dtype).ok_or(TensorError::Dtype(dtype as i32))?;
    if !data.len().is_multiple_of(size) {
        return Err(TensorError::DataLength {
            shape: vec![],
            dtype,
            expected: data.len() / size * size,
            got: data.len(),
        });
    }
    out.reserve(data.len() / size);
    match dtype {
        // Received bytes are rarely 4-aligned. This compiles to a vectorized copy (1.5× the
        // speed of zero-filling the floats and copying the bytes over them).
        Dtype::F32 => out.extend(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        Dtype::Bf16 => out.extend(
            data.chunks_exact(2)
                .map(|c| bf16_to_f32(u16::from_le_bytes([c[0], c[1]]))),
        ),
        Dtype::Unspecified => unreachable!("rejected by element_size"),
    }
    Ok(())
}

fn numel_of(shape: &[u64]) -> Result<usize, TensorError> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| {
            usize::try_from(d).ok().and_then(|d| n.checked_mul(d))
        })
        .ok_or_else(|| TensorError::Overflow(shape.to_vec()))
}

impl pb::Tensor {
    /// The element type, rejecting unspecified or unknown values.
    pub fn element_type(&self) -> Result<Dtype, TensorError> {
        match Dtype::try_from(self.dtype) {
            Ok(Dtype::Unspecified) | Err(_) => Err(TensorError::Dtype(self.dtype)),
            Ok(dtype) => Ok(dtype),
        }
    }

    /// Number of elements (`product(shape)`; 1 for a scalar).
    pub fn numel(&self) -> Result<usize, TensorError> {
        numel_of(&self.shape)
    }

    /// Checks that the data length matches shape and dtype; returns the element count.
    pub fn validate(&self) -> Result<usize, TensorError> {
        let dtype = self.element_type()?;
        let numel = self.numel()?;
        let expected = numel
            .checked_mul(element_size(dtype).unwrap_or(1))
            .ok_or_else(|| TensorError::Overflow(self.shape.clone()))?;
        if expected != self.data.len() {
            return Err(TensorError::DataLength {
                shape: self.shape.clone(),
                dtype,
                expected,
                got: self.data.len(),
            });
        }
        Ok(numel)
    }

    /// Checks the shape against `expected` (`None` = any extent on that axis).
    pub fn expect_shape(&self, what: &str, expected: &[Option<u64>]) -> Result<(), TensorError> {
        let ok = self.shape.len() == expected.len()
            && self
                .shape
                .iter()
                .zip(expected)
                .all(|(d, e)| e.is_none_or(|e| e == *d));
        if ok {
            Ok(())
        } else {
            let expected = expected
                .iter()
                .map(|e| e.map_or_else(|| "_".to_string(), |e| e.to_string()))
                .collect::<Vec<_>>()
                .join(", ");
            Err(TensorError::Shape {
                what: what.to_string(),
                expected: format!("[{expected}]"),
                got: self.shape.clone(),
            })
        }
    }

    /// The values as `f32`, validated against the shape.
    pub fn to_f32(&self) -> Result<Vec<f32>, TensorError> {
        let mut out = Vec::new();
        self.extend_f32(&mut out)?;
        Ok(out)
    }

    /// Appends the values as `f32` to `out`, validated against the shape.
    pub fn extend_f32(&self, out: &mut Vec<f32>) -> Result<(), TensorError> {
        self.validate()?;
        decode_into(&self.data, self.element_type()?, out)
    }

    /// The values as `f32`, borrowed from the received buffer when it already is little-endian
    /// F32 and 4-byte aligned, decoded otherwise.
    pub fn as_f32(&self) -> Result<Cow<'_, [f32]>, TensorError> {
        self.validate()?;
        #[cfg(target_endian = "little")]
        if self.element_type()? == Dtype::F32
            && let Ok(values) = bytemuck::try_cast_slice::<u8, f32>(&self.data)
        {
            return Ok(Cow::Borrowed(values));
        }
        self.to_f32().map(Cow::Owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tensor of `shape` holding `values` encoded as `dtype`, as the server sends them.
    fn tensor(shape: &[u64], values: Vec<f32>, dtype: Dtype) -> pb::Tensor {
        pb::Tensor {
            shape: shape.to_vec(),
            dtype: dtype as i32,
            data: encode_f32(values, dtype),
        }
    }

    #[test]
    fn bf16_exact_values_round_trip() {
        for v in [
            0.0f32,
            1.0,
            -2.5,
            0.15625,
            65536.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ] {
            assert_eq!(bf16_to_f32(f32_to_bf16(v)), v, "{v}");
        }
        assert_eq!(f32_to_bf16(1.0), 0x3F80);
        assert_eq!(f32_to_bf16(-0.0), 0x8000);
        assert!(bf16_to_f32(f32_to_bf16(-0.0)).is_sign_negative());
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        let r = |bits: u32| f32_to_bf16(f32::from_bits(bits));
        // Below, at and above the halfway point with an even kept part.
        assert_eq!(r(0x3F80_7FFF), 0x3F80);
        assert_eq!(r(0x3F80_8000), 0x3F80, "tie → even (down)");
        assert_eq!(r(0x3F80_8001), 0x3F81);
        // With an odd kept part the tie goes up.
        assert_eq!(r(0x3F81_8000), 0x3F82, "tie → even (up)");
        assert_eq!(r(0x3F81_7FFF), 0x3F81);
        // Negative numbers round by magnitude.
        assert_eq!(r(0xBF81_8000), 0xBF82);
        // Rounding carries into the exponent.
        assert_eq!(r(0x3FFF_FFFF), 0x4000);
        // Beyond the largest finite bf16 → infinity; the largest finite bf16 stays.
        assert_eq!(f32_to_bf16(f32::MAX), 0x7F80);
        assert_eq!(r(0x7F7F_0000), 0x7F7F);
        assert_eq!(f32_to_bf16(f32::MIN), 0xFF80);
        // Subnormals round like everything else; the smallest rounds to zero.
        assert_eq!(r(0x0000_0001), 0x0000);
        assert_eq!(r(0x0001_8000), 0x0002);
    }

    #[test]
    fn bf16_keeps_nan() {
        for bits in [0x7FC0_0000u32, 0x7F80_0001, 0xFF80_0001, 0x7FFF_FFFF] {
            let b = f32_to_bf16(f32::from_bits(bits));
            let back = bf16_to_f32(b);
            assert!(back.is_nan(), "{bits:#x} → {b:#x}");
            assert_eq!(back.is_sign_negative(), bits >> 31 == 1);
        }
    }

    #[test]
    fn f32_tensor_round_trip() {
        let values: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
        let t = tensor(&[2, 3, 4], values.clone(), Dtype::F32);
        assert_eq!(t.shape, vec![2, 3, 4]);
        assert_eq!(t.data.len(), 96);
        assert_eq!(&t.data[4..8], &(-2.5f32).to_le_bytes());
        assert_eq!(t.to_f32().unwrap(), values);
        assert_eq!(&*t.as_f32().unwrap(), &values[..]);
        t.expect_shape("t", &[Some(2), None, Some(4)]).unwrap();
        assert!(t.expect_shape("t", &[Some(2), Some(3)]).is_err());
    }

    #[test]
    fn bf16_tensor_round_trip() {
        let values = vec![1.0f32, -0.5, 3.140625, 1.0e-3];
        let t = tensor(&[4], values.clone(), Dtype::Bf16);
        assert_eq!(t.data.len(), 8);
        let back = t.to_f32().unwrap();
        for (a, b) in values.iter().zip(&back) {
            assert!((a - b).abs() <= a.abs() / 128.0, "{a} vs {b}");
        }
        assert!(matches!(t.as_f32().unwrap(), Cow::Owned(_)));
    }

    #[test]
    fn misaligned_f32_data_decodes() {
        let raw: Vec<u8> = [7.0f32, -1.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut buf = vec![0u8];
        buf.extend_from_slice(&raw);
        let data = Bytes::from(buf).slice(1..);
        let t = pb::Tensor {
            shape: vec![2],
            dtype: Dtype::F32 as i32,
            data,
        };
        assert_eq!(&*t.as_f32().unwrap(), &[7.0, -1.0]);
    }

    #[test]
    fn wrong_lengths_are_errors() {
        let t = pb::Tensor {
            shape: vec![2, 2],
            dtype: Dtype::Bf16 as i32,
            data: Bytes::from_static(&[0; 6]),
        };
        assert!(matches!(
            t.to_f32(),
            Err(TensorError::DataLength {
                expected: 8,
                got: 6,
                ..
            })
        ));
        let unspecified = pb::Tensor {
            shape: vec![1],
            dtype: 0,
            data: Bytes::from_static(&[0; 4]),
        };
        assert_eq!(unspecified.to_f32(), Err(TensorError::Dtype(0)));
        let unknown = pb::Tensor {
            dtype: 99,
            ..unspecified
        };
        assert_eq!(unknown.to_f32(), Err(TensorError::Dtype(99)));
        let huge = pb::Tensor {
            shape: vec![u64::MAX, 2],
            dtype: Dtype::F32 as i32,
            data: Bytes::new(),
        };
        assert!(matches!(huge.to_f32(), Err(TensorError::Overflow(_))));
        let mut out = Vec::new();
        assert!(decode_into(&[0; 3], Dtype::F32, &mut out).is_err());
    }

    #[test]
    fn empty_tensor_is_valid() {
        let t = tensor(&[0, 5], vec![], Dtype::F32);
        assert_eq!(t.to_f32().unwrap(), Vec::<f32>::new());
        assert_eq!(t.numel().unwrap(), 0);
    }

    struct Pool(std::sync::Mutex<Vec<Vec<f32>>>);

    impl Recycle for Pool {
        fn recycle(&self, buffer: Vec<f32>) {
            self.0.lock().unwrap().push(buffer);
        }
    }

    #[test]
    fn recycled_buffers_return_to_their_pool_when_the_bytes_are_dropped() {
        let pool = Arc::new(Pool(std::sync::Mutex::new(Vec::new())));
        let dyn_pool: Arc<dyn Recycle> = pool.clone();
        let values = vec![1.0f32, -2.5, 3.25];
        let bytes = encode_f32_recycled(values.clone(), Dtype::F32, &dyn_pool);
        let slice = bytes.slice(4..);
        drop(bytes);
        assert!(
            pool.0.lock().unwrap().is_empty(),
            "a slice still holds the buffer"
        );
        let mut decoded = Vec::new();
        decode_into(&slice, Dtype::F32, &mut decoded).unwrap();
        assert_eq!(decoded, values[1..]);
        drop(slice);
        assert_eq!(*pool.0.lock().unwrap(), vec![values.clone()]);

        // bf16 converts at once and gives the buffer back straight away.
        let bytes = encode_f32_recycled(values.clone(), Dtype::Bf16, &dyn_pool);
        assert_eq!(pool.0.lock().unwrap().len(), 2);
        assert_eq!(bytes.len(), 6);
    }
}
