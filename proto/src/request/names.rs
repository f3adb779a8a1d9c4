//! The names a request file uses for the schema's enums (kebab-case), each standing for the
//! generated enum variant of the same identifier.

use serde::{Deserialize, Serialize};

use crate::pb;

/// Declares a name enum (kebab-case serde names) that stands for a generated enum whose
/// variants have the same identifiers, with `to_proto()` and conversions into the generated
/// enum and its `i32`.
macro_rules! name_enum {
    (
        $(#[$meta:meta])*
        $name:ident => $pb:ident {
            $($(#[$vmeta:meta])* $variant:ident,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
        #[serde(rename_all = "kebab-case")]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            #[doc = concat!("The [`pb::", stringify!($pb), "`] this name stands for.")]
            pub const fn to_proto(self) -> pb::$pb {
                match self {
                    $(Self::$variant => pb::$pb::$variant,)+
                }
            }
        }

        impl From<$name> for pb::$pb {
            fn from(name: $name) -> Self {
                name.to_proto()
            }
        }

        impl From<$name> for i32 {
            fn from(name: $name) -> Self {
                name.to_proto().into()
            }
        }
    };
}

name_enum! {
    /// Tensor encoding: `f32` (default) or `bf16`.
    DtypeName => Dtype {
        /// IEEE 754 binary32.
        #[default]
        F32,
        /// bfloat16.
        Bf16,
    }
}

name_enum! {
    /// Part of the time axis: `train` (default), `validation` or `test`.
    SplitName => Split {
        /// The training split.
        #[default]
        Train,
        /// The validation split.
        Validation,
        /// The test split.
        Test,
    }
}

name_enum! {
    /// Sample order: `training` (default) or `tiles`.
    ModeName => Mode {
        /// Seeded, shuffled epochs, sharded by rank.
        #[default]
        Training,
        /// Every tile of the whole-globe tiling once, time-major.
        Tiles,
    }
}

name_enum! {
    /// Units of the values: `normalized` (default) or `physical`.
    UnitsName => Units {
        /// Each field as its normalization says.
        #[default]
        Normalized,
        /// Physical units for every field.
        Physical,
    }
}

name_enum! {
    /// How centre latitudes are drawn: `area` (default) or `uniform`.
    LatitudeWeightingName => LatitudeWeighting {
        /// Proportional to the area of a grid row (cos φ).
        #[default]
        Area,
        /// Every grid row equally.
        Uniform,
    }
}

name_enum! {
    /// A field's normalization: `global` (default), `local` or `none`.
    NormalizationName => Normalization {
        /// Per field, level and year-month over the globe.
        #[default]
        Global,
        /// Per grid point, level and calendar month.
        Local,
        /// Physical units for this field.
        None,
    }
}
