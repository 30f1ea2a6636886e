//! JSON text laid out the way Python's `json.dump(obj, f, indent=2)` lays it out, so the files the
//! importer writes are byte-identical to the reference converter's: two-space indent, `": "` and `","`
//! separators, floats as Python's `repr` spells them (`1e-05`, `100000.0`), and optionally
//! `ensure_ascii` escaping (`\u00e9`, surrogate pairs above U+FFFF).

use serde_json::ser::{Formatter, PrettyFormatter};
use std::io::{self, Write};

/// Serializes `value` as Python's `json.dump(value, f, indent=2, ensure_ascii=ensure_ascii)` would.
pub(crate) fn to_python_json<T: serde::Serialize + ?Sized>(
    value: &T,
    ensure_ascii: bool,
) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::new();
    let formatter = PyFormatter {
        pretty: PrettyFormatter::with_indent(b"  "),
        ensure_ascii,
    };
    let mut ser = serde_json::Serializer::with_formatter(&mut out, formatter);
    value.serialize(&mut ser)?;
    Ok(out)
}

/// Python's `repr(float)`: shortest round-trip digits, fixed notation for decimal exponents in
/// [-4, 16), exponent notation with a sign and at least two digits otherwise.
pub(crate) fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    // Rust's `{:e}` gives the shortest digits that round-trip, e.g. "-9.5e-6", "1e5", "0e0".
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci
        .split_once('e')
        .expect("LowerExp output has an exponent");
    let exp: i32 = exp.parse().expect("LowerExp exponent is an integer");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let decpt = exp + 1; // position of the decimal point relative to the first digit
    let body = if !(-4 < decpt && decpt <= 16) {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let e = decpt - 1;
        format!(
            "{first}{frac}e{}{:02}",
            if e < 0 { '-' } else { '+' },
            e.abs()
        )
    } else if decpt <= 0 {
        format!("0.{}{digits}", "0".repeat((-decpt) as usize))
    } else if decpt as usize >= digits.len() {
        format!("{digits}{}.0", "0".repeat(decpt as usize - digits.len()))
    } else {
        let (int, frac) = digits.split_at(decpt as usize);
        format!("{int}.{frac}")
    };
    format!("{sign}{body}")
}

struct PyFormatter<'a> {
    pretty: PrettyFormatter<'a>,
    ensure_ascii: bool,
}

impl Formatter for PyFormatter<'_> {
    fn write_f32<W: ?Sized + Write>(&mut self, w: &mut W, value: f32) -> io::Result<()> {
        w.write_all(python_float_repr(value as f64).as_bytes())
    }
    fn write_f64<W: ?Sized + Write>(&mut self, w: &mut W, value: f64) -> io::Result<()> {
        w.write_all(python_float_repr(value).as_bytes())
    }
    fn write_string_fragment<W: ?Sized + Write>(&mut self, w: &mut W, s: &str) -> io::Result<()> {
        if !self.ensure_ascii || s.is_ascii() {
            return w.write_all(s.as_bytes());
        }
        let mut units = [0u16; 2];
        for c in s.chars() {
            if c.is_ascii() {
                w.write_all(&[c as u8])?;
            } else {
                for unit in c.encode_utf16(&mut units) {
                    write!(w, "\\u{unit:04x}")?;
                }
            }
        }
        Ok(())
    }
    fn begin_array<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.pretty.begin_array(w)
    }
    fn end_array<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.pretty.end_array(w)
    }
    fn begin_array_value<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        self.pretty.begin_array_value(w, first)
    }
    fn end_array_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.pretty.end_array_value(w)
    }
    fn begin_object<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.pretty.begin_object(w)
    }
    fn end_object<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.pretty.end_object(w)
    }
    fn begin_object_key<W: ?Sized + Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        self.pretty.begin_object_key(w, first)
    }
    fn begin_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.pretty.begin_object_value(w)
    }
    fn end_object_value<W: ?Sized + Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.pretty.end_object_value(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_match_python_repr() {
        let cases: [(f64, &str); 12] = [
            (1e-5f32 as f64, "9.999999747378752e-06"),
            (1e-5, "1e-05"),
            (100000.0, "100000.0"),
            (10000.0, "10000.0"),
            (0.0001, "0.0001"),
            (0.5, "0.5"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (-2.5e-7, "-2.5e-07"),
            (123.456, "123.456"),
        ];
        for (x, want) in cases {
            assert_eq!(python_float_repr(x), want, "{x:e}");
        }
    }

    #[test]
    fn layout_and_ascii_escaping() {
        let v = serde_json::json!({"a": [], "b": {}, "c": ["é", "😀\n"], "d": 1e-5});
        let plain = String::from_utf8(to_python_json(&v, false).unwrap()).unwrap();
        assert_eq!(
            plain,
            "{\n  \"a\": [],\n  \"b\": {},\n  \"c\": [\n    \"é\",\n    \"😀\\n\"\n  ],\n  \"d\": 1e-05\n}"
        );
        let ascii = String::from_utf8(to_python_json(&v, true).unwrap()).unwrap();
        assert!(
            ascii.contains("\"\\u00e9\"") && ascii.contains("\"\\ud83d\\ude00\\n\""),
            "{ascii}"
        );
    }
}
