//! Rotary position settings as `config.json` gives them: transformers 5's
//! `rope_parameters` (one set, or one per layer type), or the older
//! `rope_theta` with `rope_scaling`. Only plain rotary (`rope_type:
//! default`) runs; a scaled variant is refused by name rather than computed
//! at the wrong positions.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// The rotary variants the engine computes.
const SUPPORTED_ROPE_TYPES: &str = "default";

/// Where a family's rotary settings are in its config.
pub struct RopeFields<'a> {
    /// `rope_parameters`, transformers 5's form.
    pub parameters: Option<&'a Value>,
    /// `rope_scaling`, the older form of a variant.
    pub scaling: Option<&'a Value>,
    /// A theta given outside `rope_parameters` (`rope_theta`,
    /// ModernBERT's `global_rope_theta`, `local_rope_theta`).
    pub legacy_theta: Option<f64>,
    /// The family's theta when the config names none.
    pub default_theta: f64,
}

impl RopeFields<'_> {
    /// The theta of layers of `layer_type` (`full_attention`,
    /// `sliding_attention`), checking that their variant is plain rotary.
    pub fn theta(&self, path: &Path, layer_type: &str) -> Result<f64> {
        if let Some(scaling) = self.scaling.filter(|v| !v.is_null()) {
            check_type(path, "rope_scaling", scaling)?;
        }
        let parameters = match self.parameters.filter(|v| !v.is_null()) {
            Some(Value::Object(map)) => match map.get(layer_type) {
                Some(per_type @ Value::Object(_)) => Some(per_type),
                _ => self.parameters,
            },
            Some(_) => {
                return Err(Error::bad_model(
                    path,
                    "`rope_parameters` must be an object",
                ));
            }
            None => None,
        };
        let theta = match parameters {
            Some(parameters) => {
                check_type(path, "rope_parameters", parameters)?;
                parameters.get("rope_theta").and_then(Value::as_f64)
            }
            None => None,
        };
        let theta = theta.or(self.legacy_theta).unwrap_or(self.default_theta);
        if !(theta.is_finite() && theta > 1.0) {
            return Err(Error::bad_model(
                path,
                format!("rope_theta {theta} must be a number above 1"),
            ));
        }
        Ok(theta)
    }
}

/// Refuses every rotary variant but the plain one, naming it.
fn check_type(path: &Path, field: &'static str, value: &Value) -> Result<()> {
    let kind = value
        .get("rope_type")
        .or_else(|| value.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    if kind == "default" {
        return Ok(());
    }
    Err(Error::Unsupported {
        path: path.into(),
        field,
        value: kind.into(),
        supported: SUPPORTED_ROPE_TYPES,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use serde_json::json;

    use super::RopeFields;

    fn fields<'a>(
        parameters: Option<&'a serde_json::Value>,
        scaling: Option<&'a serde_json::Value>,
    ) -> RopeFields<'a> {
        RopeFields {
            parameters,
            scaling,
            legacy_theta: Some(500.0),
            default_theta: 10000.0,
        }
    }

    #[test]
    fn theta_comes_from_the_layer_type_then_the_set_then_the_legacy_field() {
        let path = Path::new("config.json");
        let per_type = json!({
            "full_attention": {"rope_theta": 160000.0, "rope_type": "default"},
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
        });
        let rope = fields(Some(&per_type), None);
        assert_eq!(rope.theta(path, "full_attention").ok(), Some(160000.0));
        assert_eq!(rope.theta(path, "sliding_attention").ok(), Some(10000.0));
        let single = json!({"rope_theta": 1e6, "rope_type": "default"});
        assert_eq!(
            fields(Some(&single), None)
                .theta(path, "full_attention")
                .ok(),
            Some(1e6)
        );
        assert_eq!(
            fields(None, None).theta(path, "full_attention").ok(),
            Some(500.0)
        );
    }

    #[test]
    fn a_scaled_variant_is_refused_by_name() {
        let path = Path::new("config.json");
        let yarn = json!({"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0});
        let error = fields(Some(&yarn), None)
            .theta(path, "full_attention")
            .expect_err("yarn is refused");
        assert!(error.to_string().contains("yarn"), "{error}");
        let llama3 = json!({"type": "llama3", "factor": 8.0});
        let error = fields(None, Some(&llama3))
            .theta(path, "full_attention")
            .expect_err("llama3 is refused");
        assert!(error.to_string().contains("llama3"), "{error}");
        assert!(error.is_bad_input());
    }
}
