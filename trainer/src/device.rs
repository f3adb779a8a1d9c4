//! Where the model computes: `cpu` (the default, and the only device of a build without the
//! `cuda` feature) or a GPU, `cuda` (GPU 0) or `cuda:N`, through candle's CUDA backend.
//!
//! A name is checked in two steps: [`DeviceSpec`]'s [`FromStr`] checks the spelling and that
//! this build can compute there (so a command line fails while its arguments are parsed), and
//! [`DeviceSpec::open`] makes the candle [`Device`] (for a GPU: the driver, the GPU, its
//! context). [`device_from_str`] does both.
//!
//! The CPU path is the one every determinism guarantee of the trainer is stated for (a resumed
//! run reproduces the uninterrupted one bit for bit); on a GPU the weights start from the same
//! bits (the seeded initialization draws them on the host), but cuBLAS and the reductions may
//! order sums differently from run to run.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

/// The environment variable the command line reads `--device` from.
pub const DEVICE_ENV: &str = "ATMOREP_DEVICE";

/// The spellings, for messages.
const SPELLINGS: &str = "`cpu`, `cuda` or `cuda:N`";

/// A device by name, as `--device` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The host's cores (`cpu`).
    #[default]
    Cpu,
    /// GPU `N` of the machine, as CUDA numbers them (`cuda` is `cuda:0`).
    Cuda(usize),
}

/// Why a device name cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// Not one of the spellings.
    #[error("device `{name}`: not a device name (expected {SPELLINGS})")]
    Unknown { name: String },
    /// A GPU on a build without the `cuda` feature.
    #[error(
        "device `{name}`: this build has no CUDA support (rebuild with `--features cuda`; \
         see scripts/check-cuda.sh for what the build needs)"
    )]
    NoCudaSupport { name: String },
    /// candle could not open it (no driver, no such GPU, out of memory…).
    #[error("device `{name}`: {source}")]
    Open {
        name: String,
        #[source]
        source: candle_core::Error,
    },
}

impl DeviceSpec {
    /// Whether this build can compute on a GPU (the `cuda` feature).
    pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

    /// The candle device. For a GPU this opens the driver and the GPU, so it fails on a machine
    /// without them with candle's reason, named after the device.
    pub fn open(self) -> Result<Device, DeviceError> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => {
                if !Self::CUDA_BUILT {
                    return Err(DeviceError::NoCudaSupport {
                        name: self.to_string(),
                    });
                }
                Device::new_cuda(n).map_err(|source| DeviceError::Open {
                    name: self.to_string(),
                    source,
                })
            }
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    /// `cpu`, `cuda` (GPU 0) or `cuda:N`; a GPU only on a build with the `cuda` feature.
    fn from_str(s: &str) -> Result<Self, DeviceError> {
        let unknown = || DeviceError::Unknown { name: s.into() };
        let spec = match s {
            "cpu" => DeviceSpec::Cpu,
            "cuda" => DeviceSpec::Cuda(0),
            _ => {
                let n = s.strip_prefix("cuda:").ok_or_else(unknown)?;
                // Digits only: no sign, no spaces.
                if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(unknown());
                }
                DeviceSpec::Cuda(n.parse().map_err(|_| unknown())?)
            }
        };
        if matches!(spec, DeviceSpec::Cuda(_)) && !Self::CUDA_BUILT {
            return Err(DeviceError::NoCudaSupport { name: s.into() });
        }
        Ok(spec)
    }
}

/// The device `s` names (see [`DeviceSpec`]), opened.
pub fn device_from_str(s: &str) -> Result<Device, DeviceError> {
    s.parse::<DeviceSpec>()?.open()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_the_default_and_opens() {
        assert_eq!(DeviceSpec::default(), DeviceSpec::Cpu);
        assert!(matches!(device_from_str("cpu").unwrap(), Device::Cpu));
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap().to_string(), "cpu");
    }

    #[test]
    fn bad_names_are_refused_naming_them() {
        for bad in [
            "", "CPU", "gpu", "cuda:", "cuda:x", "cuda:-1", "cuda:+1", "cuda: 1", " cpu", "cuda0",
            "cuda:1:2", "metal",
        ] {
            let e = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(matches!(e, DeviceError::Unknown { .. }), "{bad:?}: {e}");
            let msg = e.to_string();
            assert!(msg.contains(&format!("`{bad}`")), "{msg}");
            assert!(msg.contains("`cpu`, `cuda` or `cuda:N`"), "{msg}");
            assert!(device_from_str(bad).is_err());
        }
        // Larger than any usize.
        let e = "cuda:99999999999999999999999".parse::<DeviceSpec>();
        assert!(matches!(e, Err(DeviceError::Unknown { .. })));
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_names_it() {
        for name in ["cuda", "cuda:0", "cuda:3"] {
            let e = name.parse::<DeviceSpec>().unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, DeviceError::NoCudaSupport { .. }), "{msg}");
            assert!(msg.contains(&format!("`{name}`")), "{msg}");
            assert!(msg.contains("--features cuda"), "{msg}");
            let msg = device_from_str(name).unwrap_err().to_string();
            assert!(msg.contains("--features cuda"), "{msg}");
        }
        let msg = DeviceSpec::Cuda(1).open().unwrap_err().to_string();
        assert!(
            msg.contains("`cuda:1`") && msg.contains("--features cuda"),
            "{msg}"
        );
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_names_parse_and_open_or_say_why_not() {
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:2".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(2));
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
        // With a GPU it opens; without one (or without the driver) candle's reason is named
        // after the device.
        match device_from_str("cuda:0") {
            Ok(d) => assert!(d.is_cuda()),
            Err(e) => {
                let msg = e.to_string();
                assert!(matches!(e, DeviceError::Open { .. }), "{msg}");
                assert!(msg.starts_with("device `cuda:0`: "), "{msg}");
            }
        }
    }
}
