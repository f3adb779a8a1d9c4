//! Conversions between the generated messages and this crate's own types (the loader's types
//! convert in the loader crate; these are here because the orphan rule allows them nowhere
//! else).

use crate::pb;
use crate::positional::PeMode;

impl From<PeMode> for pb::PeMode {
    fn from(mode: PeMode) -> Self {
        match mode {
            PeMode::Global => Self::Global,
            PeMode::Local => Self::Local,
            PeMode::Standard => Self::Standard,
            PeMode::InfoStandard => Self::InfoStandard,
            PeMode::None => Self::None,
        }
    }
}

impl TryFrom<pb::PeMode> for PeMode {
    /// `PE_MODE_UNSPECIFIED` has no encoding: requests must name one.
    type Error = pb::PeMode;

    fn try_from(mode: pb::PeMode) -> Result<Self, pb::PeMode> {
        match mode {
            pb::PeMode::Global => Ok(Self::Global),
            pb::PeMode::Local => Ok(Self::Local),
            pb::PeMode::Standard => Ok(Self::Standard),
            pb::PeMode::InfoStandard => Ok(Self::InfoStandard),
            pb::PeMode::None => Ok(Self::None),
            pb::PeMode::Unspecified => Err(mode),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pe_modes_round_trip() {
        for mode in PeMode::ALL {
            assert_eq!(PeMode::try_from(pb::PeMode::from(mode)), Ok(mode));
        }
        assert!(PeMode::try_from(pb::PeMode::Unspecified).is_err());
        assert_eq!(
            pb::PeMode::from(PeMode::InfoStandard).as_str_name(),
            "PE_MODE_INFO_STANDARD"
        );
    }
}
