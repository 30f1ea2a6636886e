//! A JSON Schema validator for the subset that `json_constraint` supports, written
//! independently of the compiler so that tests check generated values against the schema's
//! meaning rather than against the compiler's reading of it.

use serde_json::Value;

/// `Ok` if `v` matches `schema` (`root` resolves `$ref`); `Err` says where and why not.
pub fn validate(schema: &Value, v: &Value, root: &Value) -> Result<(), String> {
    let map = match schema {
        Value::Bool(true) => return Ok(()),
        Value::Bool(false) => return Err("schema false".into()),
        Value::Object(m) => m,
        _ => return Err(format!("bad schema {schema}")),
    };
    if let Some(r) = map.get("$ref").and_then(Value::as_str) {
        let target = root
            .pointer(r.trim_start_matches('#'))
            .ok_or_else(|| format!("dangling {r}"))?;
        return validate(target, v, root);
    }
    if let Some(all) = map.get("allOf").and_then(Value::as_array) {
        for s in all {
            validate(s, v, root)?;
        }
    }
    if let Some(alts) = map.get("anyOf").and_then(Value::as_array) {
        if !alts.iter().any(|s| validate(s, v, root).is_ok()) {
            return Err(format!("{v} matches no anyOf alternative"));
        }
    }
    if let Some(alts) = map.get("oneOf").and_then(Value::as_array) {
        let n = alts.iter().filter(|s| validate(s, v, root).is_ok()).count();
        if n != 1 {
            return Err(format!("{v} matches {n} oneOf alternatives"));
        }
    }
    if let Some(e) = map.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            return Err(format!("{v} not in enum"));
        }
    }
    if let Some(c) = map.get("const") {
        if c != v {
            return Err(format!("{v} != const {c}"));
        }
    }
    if let Some(t) = map.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => return Err("bad type".into()),
        };
        if !types.iter().any(|t| has_type(v, t)) {
            return Err(format!("{v} is not of type {t}"));
        }
    }
    let get_n = |k: &str| map.get(k).and_then(Value::as_u64);
    match v {
        Value::String(s) => {
            let n = s.chars().count() as u64;
            if get_n("minLength").is_some_and(|m| n < m)
                || get_n("maxLength").is_some_and(|m| n > m)
            {
                return Err(format!("{v}: length {n} out of bounds"));
            }
        }
        Value::Array(items) => {
            let n = items.len() as u64;
            if get_n("minItems").is_some_and(|m| n < m) || get_n("maxItems").is_some_and(|m| n > m)
            {
                return Err(format!("{v}: {n} items out of bounds"));
            }
            if let Some(s) = map.get("items") {
                for it in items {
                    validate(s, it, root)?;
                }
            }
        }
        Value::Object(o) => {
            let props = map.get("properties").and_then(Value::as_object);
            if let Some(req) = map.get("required").and_then(Value::as_array) {
                for r in req.iter().filter_map(Value::as_str) {
                    if !o.contains_key(r) {
                        return Err(format!("{v}: missing required {r}"));
                    }
                }
            }
            for (k, x) in o {
                match props.and_then(|p| p.get(k)) {
                    Some(s) => validate(s, x, root)?,
                    None => {
                        if let Some(a) = map.get("additionalProperties") {
                            validate(a, x, root).map_err(|e| format!("property {k}: {e}"))?;
                        }
                    }
                }
            }
        }
        _ => {}
    }
    Ok(())
}

fn has_type(v: &Value, t: &str) -> bool {
    match t {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "integer" => v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
        "number" => v.is_number(),
        "string" => v.is_string(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        _ => false,
    }
}
