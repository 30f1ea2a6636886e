//! Every token's text piece and a prefix trie over them, built once per tokenizer.

use super::parser::is_plain;
use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;

/// Every token's decoded text piece, computed once per tokenizer: the text of `[anchor, id]`
/// minus the text of `[anchor]`, so SentencePiece leading-space markers and byte-level BPE both
/// come out as they appear in running text. Special tokens, tokens that decode to nothing and
/// tokens whose bytes are not valid UTF-8 on their own (partial characters) are unusable inside
/// JSON.
pub struct TokenPieces {
    pieces: Vec<Option<Box<str>>>,
    pub(super) trie: Trie,
}

/// Prefix trie over the usable pieces. Tokens are sorted by piece, so the tokens under any trie
/// node form one contiguous range of `order`, and a node's children are contiguous in `nodes`.
pub(super) struct Trie {
    /// Usable token ids sorted by piece.
    pub order: Vec<u32>,
    /// `nodes[0]` is the root (the empty prefix).
    pub nodes: Vec<TrieNode>,
}

pub(super) struct TrieNode {
    pub ch: char,
    pub children: (u32, u32),
    /// `order[lo..hi]`: tokens whose piece starts with this node's prefix; the first `ends` of
    /// them are exactly the prefix.
    pub lo: u32,
    pub hi: u32,
    pub ends: u32,
    /// Every character below this node is plain string content.
    pub plain_below: bool,
    /// Longest path below this node, in characters.
    pub depth_below: u32,
}

impl TokenPieces {
    pub fn new(tok: &Tokenizer) -> Result<Self> {
        let anchor = *tok
            .encode("a")?
            .last()
            .ok_or_else(|| ModelError::Tokenizer("\"a\" encodes to no token".into()))?;
        let base = tok.decode(&[anchor], false)?;
        let n = tok.vocab_size();
        let mut pieces = Vec::with_capacity(n);
        for id in 0..n as u32 {
            let piece = if tok.is_special(id) || tok.id_to_token(id).is_none() {
                None
            } else {
                let text = tok.decode(&[anchor, id], false)?;
                text.strip_prefix(base.as_str())
                    .filter(|p| !p.is_empty() && !p.contains('\u{FFFD}'))
                    .map(|p| p.to_string())
            };
            pieces.push(piece);
        }
        Ok(Self::from_pieces(pieces))
    }

    /// From explicit pieces (index = token id; `None` = never allowed inside JSON). Empty pieces
    /// count as `None`.
    pub fn from_pieces(pieces: Vec<Option<String>>) -> Self {
        let pieces: Vec<Option<Box<str>>> = pieces
            .into_iter()
            .map(|p| p.filter(|p| !p.is_empty()).map(String::into_boxed_str))
            .collect();
        let trie = Trie::build(&pieces);
        Self { pieces, trie }
    }

    /// Number of token ids covered (usable or not).
    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// The token's text piece, `None` if it is unusable inside JSON.
    pub fn piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize)?.as_deref()
    }

    /// Number of usable tokens.
    pub fn usable(&self) -> usize {
        self.trie.order.len()
    }
}

impl Trie {
    fn build(pieces: &[Option<Box<str>>]) -> Self {
        let mut order: Vec<u32> = (0..pieces.len() as u32)
            .filter(|&i| pieces[i as usize].is_some())
            .collect();
        let text = |i: u32| pieces[i as usize].as_deref().unwrap_or("");
        order.sort_by(|&a, &b| text(a).cmp(text(b)));
        let chars: Vec<Vec<char>> = order.iter().map(|&i| text(i).chars().collect()).collect();

        let mut nodes = vec![TrieNode {
            ch: '\0',
            children: (0, 0),
            lo: 0,
            hi: order.len() as u32,
            ends: 0,
            plain_below: true,
            depth_below: 0,
        }];
        let mut depths = vec![0usize];
        // Breadth first: each node's children are appended together, so they are contiguous
        // and always after their parent.
        let mut i = 0;
        while i < nodes.len() {
            let (lo, hi, d) = (nodes[i].lo as usize, nodes[i].hi as usize, depths[i]);
            let mut k = lo;
            while k < hi && chars[k].len() == d {
                k += 1;
            }
            nodes[i].ends = (k - lo) as u32;
            let first_child = nodes.len() as u32;
            while k < hi {
                let ch = chars[k][d];
                let start = k;
                while k < hi && chars[k][d] == ch {
                    k += 1;
                }
                nodes.push(TrieNode {
                    ch,
                    children: (0, 0),
                    lo: start as u32,
                    hi: k as u32,
                    ends: 0,
                    plain_below: true,
                    depth_below: 0,
                });
                depths.push(d + 1);
            }
            nodes[i].children = (first_child, nodes.len() as u32);
            i += 1;
        }
        for i in (0..nodes.len()).rev() {
            let (cs, ce) = nodes[i].children;
            let mut plain = true;
            let mut depth = 0;
            for c in cs..ce {
                let c = &nodes[c as usize];
                plain &= is_plain(c.ch) && c.plain_below;
                depth = depth.max(c.depth_below + 1);
            }
            nodes[i].plain_below = plain;
            nodes[i].depth_below = depth;
        }
        Self { order, nodes }
    }
}
