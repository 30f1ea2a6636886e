use serde_json::Value;

/// PEFT's `target_modules`: a list of names (a module matches when its path equals a name or
/// ends with `.name`), a regex string (full match on the path), or `all-linear`.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    Names(Vec<String>),
    Regex(String),
    AllLinear,
}

impl TargetModules {
    pub fn from_json(v: &Value) -> Result<Self, String> {
        match v {
            Value::String(s) if s == "all-linear" => Ok(Self::AllLinear),
            Value::String(s) => {
                regex::Regex::new(&format!("^(?:{s})$"))
                    .map_err(|e| format!("invalid regex {s:?}: {e}"))?;
                Ok(Self::Regex(s.clone()))
            }
            Value::Array(a) => {
                let mut names = a
                    .iter()
                    .map(|x| x.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| "a list must hold module names (strings)".to_string())?;
                names.sort();
                Ok(Self::Names(names))
            }
            other => Err(format!(
                "expected a list, a regex string or \"all-linear\", got {other}"
            )),
        }
    }

    /// `is_output_layer`: the LM head, which `all-linear` leaves out as PEFT does.
    pub fn matches(&self, module_path: &str, is_output_layer: bool) -> bool {
        match self {
            Self::AllLinear => !is_output_layer,
            Self::Regex(re) => regex::Regex::new(&format!("^(?:{re})$"))
                .map(|r| r.is_match(module_path))
                .unwrap_or(false),
            Self::Names(names) => names.iter().any(|n| {
                module_path == n
                    || module_path
                        .strip_suffix(n.as_str())
                        .is_some_and(|p| p.ends_with('.'))
            }),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Self::AllLinear => "all-linear".into(),
            Self::Regex(r) => format!("regex {r:?}"),
            Self::Names(n) => n.join(","),
        }
    }
}

/// PEFT's `rank_pattern`/`alpha_pattern` key match: the key equals the path, or is a regex that
/// matches the path's tail after a `.` boundary.
pub(crate) fn pattern_matches(key: &str, module_path: &str) -> bool {
    key == module_path
        || regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
            .map(|r| r.is_match(module_path))
            .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn name_list_matches_suffix_at_dot() {
        let t = TargetModules::from_json(&json!(["q_proj", "o_proj"])).unwrap();
        assert!(t.matches("model.layers.0.self_attn.q_proj", false));
        assert!(!t.matches("model.layers.0.self_attn.xq_proj", false));
        assert!(!t.matches("model.layers.0.self_attn.k_proj", false));
    }

    #[test]
    fn regex_is_full_match() {
        let t = TargetModules::from_json(&json!(r".*\.layers\.1\..*(q|v)_proj")).unwrap();
        assert!(t.matches("model.layers.1.self_attn.q_proj", false));
        assert!(!t.matches("model.layers.0.self_attn.q_proj", false));
        assert!(!t.matches("model.layers.1.self_attn.q_proj.x", false));
    }

    #[test]
    fn all_linear_leaves_out_lm_head() {
        let t = TargetModules::from_json(&json!("all-linear")).unwrap();
        assert!(t.matches("model.layers.3.mlp.down_proj", false));
        assert!(!t.matches("lm_head", true));
    }
}
