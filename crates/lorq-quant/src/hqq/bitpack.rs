//! hqq's bit packings of the quantization grid (`hqq/core/bitpack.py` layouts).
//!
//! All packings work along the grid's rows (`R` rows of `C` codes): row slice `k` of `R / n` rows
//! goes to bit slot `k` of the packed element, the first slice in the highest bits.
//! - `4bit_u8`: `[R/2, C]` u8, `g[r] << 4 | g[r + R/2]`.
//! - `2bit_u8`: `[R/4, C]` u8, slices at shifts 6, 4, 2, 0.
//! - `3bit_32`: rows zero-padded to a multiple of 10, `[ceil(R/10), C]` i32, slices at shifts 27 − 3k.
//! - `1bit_u8`: `[R/8, C]` u8, slices at shifts 7..0; `8bit_u8`: the codes as they are.

use crate::QuantError;

/// One of hqq's packing names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    Bit8U8,
    Bit4U8,
    Bit3I32,
    Bit2U8,
    Bit1U8,
}

impl Packing {
    /// The packing hqq 0.2.8 uses for `nbits` (`Quantizer.bit_to_packing`).
    pub fn for_nbits(nbits: u32) -> Result<Self, QuantError> {
        Ok(match nbits {
            8 | 6 | 5 => Packing::Bit8U8,
            4 => Packing::Bit4U8,
            3 => Packing::Bit3I32,
            2 => Packing::Bit2U8,
            1 => Packing::Bit1U8,
            _ => {
                return Err(QuantError::Invalid(format!(
                    "hqq: unsupported nbits {nbits}"
                )))
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Packing::Bit8U8 => "8bit_u8",
            Packing::Bit4U8 => "4bit_u8",
            Packing::Bit3I32 => "3bit_32",
            Packing::Bit2U8 => "2bit_u8",
            Packing::Bit1U8 => "1bit_u8",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [
            Packing::Bit8U8,
            Packing::Bit4U8,
            Packing::Bit3I32,
            Packing::Bit2U8,
            Packing::Bit1U8,
        ]
        .into_iter()
        .find(|p| p.name() == name)
    }

    /// hqq's `unpack_view_dtype` string for this packing.
    pub fn view_dtype_name(self) -> &'static str {
        match self {
            Packing::Bit3I32 => "torch.int32",
            _ => "torch.uint8",
        }
    }

    /// Codes per packed element (row slices).
    pub fn slots(self) -> usize {
        match self {
            Packing::Bit8U8 => 1,
            Packing::Bit4U8 => 2,
            Packing::Bit3I32 => 10,
            Packing::Bit2U8 => 4,
            Packing::Bit1U8 => 8,
        }
    }

    pub fn bits(self) -> u32 {
        match self {
            Packing::Bit8U8 => 8,
            Packing::Bit4U8 => 4,
            Packing::Bit3I32 => 3,
            Packing::Bit2U8 => 2,
            Packing::Bit1U8 => 1,
        }
    }

    /// Packed rows for a grid of `grid_rows` rows; an error where hqq's packer would fail
    /// (rows not divisible by the slot count, except 3-bit which pads).
    pub fn packed_rows(self, grid_rows: usize) -> Result<usize, QuantError> {
        let s = self.slots();
        if self == Packing::Bit3I32 {
            return Ok(grid_rows.div_ceil(10));
        }
        if grid_rows.checked_rem(s) != Some(0) {
            return Err(QuantError::Invalid(format!(
                "hqq: {} packing needs grid rows divisible by {s}, got {grid_rows}",
                self.name()
            )));
        }
        Ok(grid_rows / s)
    }

    /// Shift of bit slot `slot` (0 = first row slice).
    #[inline(always)]
    pub fn shift(self, slot: usize) -> u32 {
        let b = self.bits();
        let top = if self == Packing::Bit3I32 { 27 } else { 8 - b };
        top - b * slot as u32
    }

    #[inline(always)]
    pub fn mask(self) -> u32 {
        (1u32 << self.bits()) - 1
    }
}

/// Packed codes: `[packed_rows, C]` row-major, u8 or (3-bit) i32 words.
#[derive(Debug, Clone, PartialEq)]
pub enum PackedCodes {
    U8(Vec<u8>),
    I32(Vec<i32>),
}

impl PackedCodes {
    pub fn byte_len(&self) -> usize {
        match self {
            PackedCodes::U8(v) => v.len(),
            PackedCodes::I32(v) => v.len() * 4,
        }
    }

    /// The packed element at flat index `i`, as u32 bits.
    #[inline(always)]
    pub fn word(&self, i: usize) -> u32 {
        match self {
            PackedCodes::U8(v) => v[i] as u32,
            PackedCodes::I32(v) => v[i] as u32,
        }
    }
}

/// Packs a `[rows, cols]` grid of codes (each `< 2^bits`) as hqq does.
pub fn pack(
    packing: Packing,
    grid: &[u8],
    rows: usize,
    cols: usize,
) -> Result<PackedCodes, QuantError> {
    assert_eq!(grid.len(), rows * cols, "grid size");
    let prow = packing.packed_rows(rows)?;
    let mut words = vec![0u32; prow * cols];
    for r in 0..rows {
        let (slot, pr) = (r / prow, r % prow);
        let shift = packing.shift(slot);
        let dst = &mut words[pr * cols..(pr + 1) * cols];
        for (d, &g) in dst.iter_mut().zip(&grid[r * cols..(r + 1) * cols]) {
            *d |= (g as u32 & packing.mask()) << shift;
        }
    }
    Ok(match packing {
        Packing::Bit3I32 => PackedCodes::I32(words.into_iter().map(|w| w as i32).collect()),
        _ => PackedCodes::U8(words.into_iter().map(|w| w as u8).collect()),
    })
}

/// The code at grid position `(r, c)`; `prow` is the packed row count.
#[inline(always)]
pub fn code_at(
    packing: Packing,
    packed: &PackedCodes,
    prow: usize,
    cols: usize,
    r: usize,
    c: usize,
) -> u8 {
    let (slot, pr) = (r / prow, r % prow);
    ((packed.word(pr * cols + c) >> packing.shift(slot)) & packing.mask()) as u8
}

/// Unpacks to the `[rows, cols]` grid (3-bit padding rows dropped), the inverse of [`pack`].
pub fn unpack(
    packing: Packing,
    packed: &PackedCodes,
    rows: usize,
    cols: usize,
) -> Result<Vec<u8>, QuantError> {
    let prow = packing.packed_rows(rows)?;
    let mut grid = vec![0u8; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            grid[r * cols + c] = code_at(packing, packed, prow, cols, r, c);
        }
    }
    Ok(grid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_all_packings() {
        for (p, rows) in [
            (Packing::Bit4U8, 6),
            (Packing::Bit2U8, 8),
            (Packing::Bit3I32, 13),
            (Packing::Bit1U8, 16),
            (Packing::Bit8U8, 3),
        ] {
            let cols = 5;
            let grid: Vec<u8> = (0..rows * cols)
                .map(|i| ((i * 7 + 3) % (1 << p.bits())) as u8)
                .collect();
            let packed = pack(p, &grid, rows, cols).unwrap();
            assert_eq!(unpack(p, &packed, rows, cols).unwrap(), grid, "{p:?}");
        }
        // 4-bit: first half of the rows in the high nibble.
        let packed = pack(Packing::Bit4U8, &[1, 2, 3, 4], 2, 2).unwrap();
        assert_eq!(packed, PackedCodes::U8(vec![0x13, 0x24]));
        assert!(pack(Packing::Bit4U8, &[0; 3], 3, 1).is_err());
    }
}
