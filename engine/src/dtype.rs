//! The element type of weights as fetched and as held in GPU memory. The
//! arithmetic is f32 either way: f16 weights travel and sit in VRAM two to a
//! `u32` word and the kernels unpack them as they read.

use std::fmt;
use std::str::FromStr;

/// How weights are stored on the wire and in GPU buffers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum WeightDtype {
    #[default]
    F32,
    /// Half the bytes of f32 on the network, the bus and in a VRAM budget.
    F16,
}

impl WeightDtype {
    pub const NAMES: [&'static str; 2] = ["f32", "f16"];

    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::F32 => "f32",
            WeightDtype::F16 => "f16",
        }
    }

    /// Bytes of one element.
    pub fn size_bytes(self) -> usize {
        match self {
            WeightDtype::F32 => 4,
            WeightDtype::F16 => 2,
        }
    }

    /// The buffer format the kernels are built for.
    pub fn words(self) -> surf_shaders::WeightWords {
        match self {
            WeightDtype::F32 => surf_shaders::WeightWords::F32,
            WeightDtype::F16 => surf_shaders::WeightWords::F16Pairs,
        }
    }

    /// The dtype to ask a weight server for.
    pub fn wire(self) -> surf_transport::Dtype {
        match self {
            WeightDtype::F32 => surf_transport::Dtype::F32,
            WeightDtype::F16 => surf_transport::Dtype::F16,
        }
    }
}

impl fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A weight dtype name that is neither `f32` nor `f16`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown weight dtype {given:?}; expected one of: f32, f16")]
pub struct UnknownDtype {
    pub given: String,
}

impl FromStr for WeightDtype {
    type Err = UnknownDtype;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(WeightDtype::F32),
            "f16" | "float16" | "half" => Ok(WeightDtype::F16),
            _ => Err(UnknownDtype {
                given: s.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::WeightDtype;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for name in WeightDtype::NAMES {
            let dtype: WeightDtype = name.parse().expect("a listed name parses");
            assert_eq!(dtype.to_string(), name);
        }
        let error = "bf16"
            .parse::<WeightDtype>()
            .expect_err("bf16 is not served");
        assert!(error.to_string().contains("f32, f16"), "{error}");
        assert_eq!(
            WeightDtype::F16.size_bytes() * 2,
            WeightDtype::F32.size_bytes()
        );
    }
}
