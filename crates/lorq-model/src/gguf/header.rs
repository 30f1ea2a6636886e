//! A minimal walk over a GGUF header, used only to explain a file that candle's reader rejects:
//! it finds the first tensor whose ggml type candle cannot represent (IQ*, TQ*, MXFP4, I8…), so the
//! error can name the tensor and its type.

use std::io::{self, Read, Seek, SeekFrom};

/// ggml type ids that candle's GGUF reader accepts.
const CANDLE_TYPES: [u32; 15] = [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 30];

/// The ggml name of a tensor type id, as llama.cpp spells it.
pub(crate) fn ggml_type_name(id: u32) -> String {
    const NAMES: [(u32, &str); 34] = [
        (0, "F32"),
        (1, "F16"),
        (2, "Q4_0"),
        (3, "Q4_1"),
        (6, "Q5_0"),
        (7, "Q5_1"),
        (8, "Q8_0"),
        (9, "Q8_1"),
        (10, "Q2_K"),
        (11, "Q3_K"),
        (12, "Q4_K"),
        (13, "Q5_K"),
        (14, "Q6_K"),
        (15, "Q8_K"),
        (16, "IQ2_XXS"),
        (17, "IQ2_XS"),
        (18, "IQ3_XXS"),
        (19, "IQ1_S"),
        (20, "IQ4_NL"),
        (21, "IQ3_S"),
        (22, "IQ2_S"),
        (23, "IQ4_XS"),
        (24, "I8"),
        (25, "I16"),
        (26, "I32"),
        (27, "I64"),
        (28, "F64"),
        (29, "IQ1_M"),
        (30, "BF16"),
        (34, "TQ1_0"),
        (35, "TQ2_0"),
        (39, "MXFP4"),
        (40, "NVFP4"),
        (41, "Q1_0"),
    ];
    NAMES
        .iter()
        .find(|(i, _)| *i == id)
        .map_or_else(|| format!("ggml type {id}"), |(_, n)| n.to_string())
}

struct Walker<R> {
    r: R,
    wide: bool, // GGUF v2+: u64 lengths and dims; v1: u32
}

impl<R: Read + Seek> Walker<R> {
    fn u32(&mut self) -> io::Result<u32> {
        let mut b = [0u8; 4];
        self.r.read_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn len(&mut self) -> io::Result<u64> {
        if self.wide {
            let mut b = [0u8; 8];
            self.r.read_exact(&mut b)?;
            Ok(u64::from_le_bytes(b))
        } else {
            self.u32().map(u64::from)
        }
    }
    fn skip(&mut self, n: u64) -> io::Result<()> {
        self.r
            .seek(SeekFrom::Current(
                i64::try_from(n).map_err(io::Error::other)?,
            ))
            .map(|_| ())
    }
    fn string(&mut self) -> io::Result<String> {
        let n = self.len()?;
        if n > 1 << 20 {
            return Err(io::Error::other("implausible string length"));
        }
        let mut b = vec![0u8; n as usize];
        self.r.read_exact(&mut b)?;
        Ok(String::from_utf8_lossy(&b).into_owned())
    }
    fn skip_value(&mut self, ty: u32) -> io::Result<()> {
        match ty {
            0 | 1 | 7 => self.skip(1),
            2 | 3 => self.skip(2),
            4..=6 => self.skip(4),
            10..=12 => self.skip(8),
            8 => {
                let n = self.len()?;
                self.skip(n)
            }
            9 => {
                let elem = self.u32()?;
                let n = self.len()?;
                let fixed = match elem {
                    0 | 1 | 7 => Some(1),
                    2 | 3 => Some(2),
                    4..=6 => Some(4),
                    10..=12 => Some(8),
                    _ => None,
                };
                match fixed {
                    Some(size) => self.skip(n.saturating_mul(size)),
                    None => (0..n).try_for_each(|_| self.skip_value(elem)),
                }
            }
            _ => Err(io::Error::other(format!(
                "unknown metadata value type {ty}"
            ))),
        }
    }
}

/// The first tensor (name, ggml type id) that candle's reader cannot represent, if the header can be walked.
pub(crate) fn first_unreadable_tensor<R: Read + Seek>(r: R) -> Option<(String, u32)> {
    let mut w = Walker { r, wide: true };
    w.r.seek(SeekFrom::Start(0)).ok()?;
    let mut magic = [0u8; 4];
    w.r.read_exact(&mut magic).ok()?;
    if &magic != b"GGUF" {
        return None;
    }
    w.wide = w.u32().ok()? >= 2;
    let (n_tensors, n_kv) = (w.len().ok()?, w.len().ok()?);
    for _ in 0..n_kv {
        let key_len = w.len().ok()?;
        w.skip(key_len).ok()?;
        let ty = w.u32().ok()?;
        w.skip_value(ty).ok()?;
    }
    for _ in 0..n_tensors {
        let name = w.string().ok()?;
        let n_dims = w.u32().ok()?;
        w.skip(u64::from(n_dims) * if w.wide { 8 } else { 4 })
            .ok()?;
        let ty = w.u32().ok()?;
        w.skip(8).ok()?;
        if !CANDLE_TYPES.contains(&ty) {
            return Some((name, ty));
        }
    }
    None
}
