//! Typed access to GGUF metadata values, with errors that name the file and the key.

use super::GgufImportError;
use candle_core::quantized::gguf_file::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The metadata table of one GGUF file, plus its path for error messages.
pub(crate) struct Metadata<'a> {
    pub(crate) path: &'a Path,
    pub(crate) values: &'a HashMap<String, Value>,
}

impl<'a> Metadata<'a> {
    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        self.values.get(key)
    }

    fn missing(&self, key: &str) -> GgufImportError {
        GgufImportError::MissingKey {
            path: self.path.to_path_buf(),
            key: key.to_string(),
        }
    }

    pub(crate) fn bad(&self, key: &str, expected: &str, found: &Value) -> GgufImportError {
        GgufImportError::BadValue {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            expected: expected.to_string(),
            found: describe(found),
        }
    }

    pub(crate) fn opt_int(&self, key: &str) -> Result<Option<i64>, GgufImportError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => as_int(v)
                .map(Some)
                .ok_or_else(|| self.bad(key, "an integer", v)),
        }
    }

    pub(crate) fn int(&self, key: &str) -> Result<i64, GgufImportError> {
        self.opt_int(key)?.ok_or_else(|| self.missing(key))
    }

    /// An integer that must be positive (a count or a size).
    pub(crate) fn count(&self, key: &str) -> Result<usize, GgufImportError> {
        let v = self.int(key)?;
        usize::try_from(v)
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| self.bad(key, "a positive integer", &Value::I64(v)))
    }

    pub(crate) fn opt_float(&self, key: &str) -> Result<Option<f64>, GgufImportError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x as f64)),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(v) => as_int(v)
                .map(|i| Some(i as f64))
                .ok_or_else(|| self.bad(key, "a number", v)),
        }
    }

    pub(crate) fn float(&self, key: &str) -> Result<f64, GgufImportError> {
        self.opt_float(key)?.ok_or_else(|| self.missing(key))
    }

    pub(crate) fn opt_str(&self, key: &str) -> Result<Option<&'a str>, GgufImportError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(self.bad(key, "a string", v)),
        }
    }

    pub(crate) fn str(&self, key: &str) -> Result<&'a str, GgufImportError> {
        self.opt_str(key)?.ok_or_else(|| self.missing(key))
    }

    pub(crate) fn array(&self, key: &str) -> Result<&'a [Value], GgufImportError> {
        match self.get(key) {
            None => Err(self.missing(key)),
            Some(Value::Array(items)) => Ok(items),
            Some(v) => Err(self.bad(key, "an array", v)),
        }
    }

    pub(crate) fn str_array(&self, key: &str) -> Result<Vec<&'a str>, GgufImportError> {
        self.array(key)?
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                other => Err(self.bad(key, "an array of strings", other)),
            })
            .collect()
    }

    pub(crate) fn int_array(&self, key: &str) -> Result<Vec<i64>, GgufImportError> {
        self.array(key)?
            .iter()
            .map(|v| as_int(v).ok_or_else(|| self.bad(key, "an array of integers", v)))
            .collect()
    }

    pub(crate) fn path_buf(&self) -> PathBuf {
        self.path.to_path_buf()
    }
}

fn as_int(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => *x as i64,
        Value::I8(x) => *x as i64,
        Value::U16(x) => *x as i64,
        Value::I16(x) => *x as i64,
        Value::U32(x) => *x as i64,
        Value::I32(x) => *x as i64,
        Value::U64(x) => i64::try_from(*x).ok()?,
        Value::I64(x) => *x,
        _ => return None,
    })
}

/// A short description of a value for error messages (arrays are summarised, not dumped).
fn describe(v: &Value) -> String {
    match v {
        Value::String(s) if s.len() > 80 => {
            format!("string {:?}…", s.chars().take(80).collect::<String>())
        }
        Value::String(s) => format!("string {s:?}"),
        Value::Array(items) => match items.first() {
            Some(first) => format!("array of {} ({:?}, …)", items.len(), first.value_type()),
            None => "empty array".to_string(),
        },
        other => format!("{other:?}"),
    }
}
