//! The one error type of the contract crate.

use crate::positional::PeMode;

/// `Result` with [`ProtoError`].
pub type Result<T, E = ProtoError> = std::result::Result<T, E>;

/// What can be wrong with the inputs of the contract's pure functions.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// A token count or token size is 0 along some axis.
    #[error("token geometry: {what} along the {axis} axis is 0")]
    ZeroExtent {
        /// `"num_tokens"` or `"token_size"`.
        what: &'static str,
        /// `"time"`, `"lat"` or `"lon"`.
        axis: &'static str,
    },
    /// The number of values of a sample does not fit in `usize`.
    #[error(
        "token geometry {num_tokens:?} tokens of {token_size:?} points × {levels} levels overflows usize"
    )]
    Overflow {
        num_tokens: [usize; 3],
        token_size: [usize; 3],
        levels: usize,
    },
    /// A field geometry without levels.
    #[error("field geometry has no levels")]
    NoLevels,
    /// A field geometry that lists a level twice.
    #[error("field geometry lists level {0} twice")]
    DuplicateLevel(usize),
    /// A positional encoding whose `tokens × width` values do not fit in `usize`.
    #[error("positional encoding of {tokens} tokens × width {width} overflows usize")]
    EncodingTooLarge { tokens: usize, width: usize },
    /// A positional-encoding width that is odd or below 2.
    #[error("positional-encoding width must be even and at least 2, got {0}")]
    InvalidWidth(usize),
    /// An input slice of the wrong length.
    #[error("{what}: expected {expected} values, got {got}")]
    LengthMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// A positional-encoding mode name that is not one of the known ones.
    #[error(
        "unknown positional-encoding mode {0:?} (expected global, local, standard, info+standard or none)"
    )]
    UnknownPeMode(String),
    /// [`crate::positional::encode`] was asked for a mode without the input it needs.
    #[error("positional encoding `{mode}` needs {what}")]
    MissingPeInput { mode: PeMode, what: &'static str },
}
