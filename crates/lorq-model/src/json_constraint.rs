//! Constrained decoding to JSON: each decode step masks every token that cannot continue a
//! valid JSON text matching a schema, so generation always yields valid JSON matching it
//! (LoRAX `response_format: {"type": "json_object", "schema": {...}}`, OpenAI
//! `{"type": "json_schema", "json_schema": {"schema": ...}}`, and `{"type": "json_object"}`
//! without a schema, which means any JSON object).
//!
//! Output is compact JSON: no whitespace outside strings, so outputs are short and
//! deterministic.
//!
//! # Supported schema subset
//!
//! - `type`: `object`, `array`, `string`, `number`, `integer`, `boolean`, `null`, or a list of
//!   these. Without `type`, object/array/string keywords imply their type; no keyword at all
//!   (`{}`) or `true` means any JSON value.
//! - object: `properties`, `required`, `additionalProperties`. With `properties`, exactly those
//!   properties are emitted, in the order the schema map iterates (alphabetical unless
//!   serde_json's `preserve_order` feature is on, then schema order); optional ones may be
//!   skipped; no other property is ever emitted. Without `properties`: a free-form object with
//!   string keys and values of `additionalProperties` (any value if absent or `true`; `false`
//!   allows only `{}`).
//! - array: `items` (a schema or a boolean), `minItems`, `maxItems`.
//! - string: `minLength`, `maxLength` (in characters; an escape sequence is one character).
//!   Escapes are JSON's; `\u` escapes of UTF-16 surrogates are not produced (characters
//!   outside the Basic Multilingual Plane are written as themselves).
//! - number / integer: the JSON number grammar (integer: no fraction, no exponent), at most 18
//!   integer digits, 18 fraction digits and 2 exponent digits. `minimum`, `maximum`,
//!   `exclusiveMinimum` and `exclusiveMaximum` are accepted but NOT enforced.
//! - `enum`, `const`: any JSON values (with `type` they must have that type), emitted as compact
//!   JSON (object keys in serde_json's map order). Enum values and property names with
//!   non-ASCII characters may also be written with `\u` escapes, so that a vocabulary without a
//!   token for such a character (byte-level pieces are unusable on their own) never dead-ends.
//! - `anyOf`, `oneOf`: the parser keeps a set of stacks, one per alternative still possible.
//!   `oneOf` is treated as `anyOf`: the output matches at least one alternative, which is
//!   "exactly one" only when the alternatives do not overlap.
//! - `allOf` with exactly one schema.
//! - `$ref` to any place inside the schema (`#/$defs/...`, `#/definitions/...`); recursive
//!   schemas work, except a cycle that reads no character (left recursion), which is refused.
//! - Annotations (`title`, `description`, `default`, `examples`, `$schema`, `$id`, `$comment`,
//!   `deprecated`, `readOnly`, `writeOnly`, `discriminator`) are ignored.
//!
//! Every other keyword (`pattern`, `format`, `patternProperties`, `prefixItems`, `uniqueItems`,
//! `multipleOf`, `not`, `if`, `minProperties`, ...) is an error naming the keyword and the schema
//! path, as are unknown types, `required` naming a property not in `properties`, and
//! `minItems` > `maxItems` or `minLength` > `maxLength`.
//!
//! # How
//!
//! [`TokenPieces`] holds every token's text and a prefix trie of them. [`JsonConstraint`] keeps
//! the set of parser stacks reachable after the text so far; [`JsonConstraint::mask_logits`]
//! walks the trie once, stepping the stacks one character per trie edge (stacks are linked lists
//! in an arena, so branching copies nothing) and pruning a subtree as soon as no stack survives.
//! Inside a string, a subtree made only of plain string characters is allowed as a whole
//! without walking it.

mod parser;
mod pieces;
mod schema;
#[cfg(test)]
mod test_validator;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use crate::error::{ModelError, Result};
use parser::{Arena, Frame, Stepper};
pub use pieces::TokenPieces;
pub use schema::JsonSchema;

/// Per-sequence state of JSON-constrained decoding.
#[derive(Clone)]
pub struct JsonConstraint {
    schema: Arc<JsonSchema>,
    pieces: Arc<TokenPieces>,
    /// Every parser stack consistent with the text so far (bottom frame first); an empty stack
    /// means the value is complete.
    stacks: Vec<Vec<Frame>>,
    text: String,
}

impl JsonConstraint {
    pub fn new(schema: Arc<JsonSchema>, pieces: Arc<TokenPieces>) -> Self {
        let root = schema.root;
        Self {
            schema,
            pieces,
            stacks: vec![vec![Frame::Value(root)]],
            text: String::new(),
        }
    }

    /// Sets to -inf every logit whose token cannot continue valid JSON for the schema. The `eos`
    /// ids are allowed exactly when the value is complete ([`Self::is_complete`]); once nothing
    /// can follow ([`Self::is_finished`]), only they remain. Logits past the tokenizer's
    /// vocabulary (padded embeddings) are masked.
    pub fn mask_logits(&self, logits: &mut [f32], eos: &[u32]) {
        let mut allowed = self.allowed();
        let complete = self.is_complete();
        for &e in eos {
            let e = e as usize;
            if e >= allowed.len() {
                allowed.resize(e + 1, false);
            }
            allowed[e] = complete;
        }
        for (i, l) in logits.iter_mut().enumerate() {
            if !allowed.get(i).copied().unwrap_or(false) {
                *l = f32::NEG_INFINITY;
            }
        }
    }

    /// Which token ids may come next (EOS not included), indexed by token id.
    pub fn allowed(&self) -> Vec<bool> {
        let trie = &self.pieces.trie;
        let mut walk = Walk {
            stepper: Stepper {
                schema: &self.schema,
                arena: Arena::default(),
            },
            trie,
            buf: Vec::with_capacity(256),
            allowed: vec![false; self.pieces.len()],
        };
        for frames in &self.stacks {
            let s = walk.stepper.arena.load(frames);
            walk.buf.push(s);
        }
        let n = walk.buf.len();
        walk.walk(0, 0, n);
        walk.allowed
    }

    /// Advances the state by the chosen token; an error (state unchanged) if the token was not
    /// allowed here. EOS is not a token to advance by: stop when it is sampled.
    pub fn advance(&mut self, token: u32) -> Result<()> {
        let Some(piece) = self.pieces.piece(token) else {
            return Err(ModelError::JsonConstraint(format!(
                "token {token} has no usable text (special, partial UTF-8 or out of vocabulary) \
                 and cannot appear inside JSON, after {:?}",
                self.text
            )));
        };
        let mut stepper = Stepper {
            schema: &self.schema,
            arena: Arena::default(),
        };
        let mut cur: Vec<u32> = self.stacks.iter().map(|f| stepper.arena.load(f)).collect();
        let mut next = Vec::new();
        for ch in piece.chars() {
            next.clear();
            for &s in &cur {
                stepper.step(s, ch, &mut next);
            }
            dedup_tail(&mut next, 0);
            if next.is_empty() {
                return Err(ModelError::JsonConstraint(format!(
                    "token {token} ({piece:?}) cannot continue the JSON text {:?} for this schema",
                    self.text
                )));
            }
            std::mem::swap(&mut cur, &mut next);
        }
        let mut stacks: Vec<Vec<Frame>> = Vec::with_capacity(cur.len());
        for &s in &cur {
            let frames = stepper.arena.frames(s);
            if !stacks.contains(&frames) {
                stacks.push(frames);
            }
        }
        self.stacks = stacks;
        self.text.push_str(piece);
        Ok(())
    }

    /// The text so far is a complete value matching the schema (EOS is allowed). For a
    /// top-level number more digits may still follow.
    pub fn is_complete(&self) -> bool {
        self.stacks.iter().any(|f| parser::accepting(f))
    }

    /// Nothing but EOS can follow.
    pub fn is_finished(&self) -> bool {
        self.stacks.iter().all(Vec::is_empty)
    }

    /// The text accepted so far.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// Removes duplicate stack ids from `v[from..]` (few entries: quadratic is fine).
fn dedup_tail(v: &mut Vec<u32>, from: usize) {
    let mut w = from;
    for r in from..v.len() {
        let x = v[r];
        if !v[from..w].contains(&x) {
            v[w] = x;
            w += 1;
        }
    }
    v.truncate(w);
}

/// One trie walk for [`JsonConstraint::allowed`].
struct Walk<'a> {
    stepper: Stepper<'a>,
    trie: &'a pieces::Trie,
    /// Stacks per trie depth, appended and truncated as the walk goes down and up.
    buf: Vec<u32>,
    allowed: Vec<bool>,
}

impl Walk<'_> {
    fn allow(&mut self, lo: u32, hi: u32) {
        for &t in &self.trie.order[lo as usize..hi as usize] {
            self.allowed[t as usize] = true;
        }
    }

    /// Visits the children of trie node `node`, whose stacks are `buf[start..end]`.
    fn walk(&mut self, node: usize, start: usize, end: usize) {
        let (cs, ce) = self.trie.nodes[node].children;
        let trie = self.trie;
        for c in cs as usize..ce as usize {
            let child = &trie.nodes[c];
            let mark = self.stepper.arena.len();
            let mid = self.buf.len();
            for k in start..end {
                let s = self.buf[k];
                self.stepper.step(s, child.ch, &mut self.buf);
            }
            dedup_tail(&mut self.buf, mid);
            if self.buf.len() > mid && child.plain_below {
                // Stacks inside a string with room for the deepest piece below accept every
                // token of this subtree: allow them all, walk on only with the other stacks.
                let before = self.buf.len();
                let mut w = mid;
                for r in mid..before {
                    let s = self.buf[r];
                    let absorbs = self
                        .stepper
                        .arena
                        .plain_budget(s)
                        .is_some_and(|b| b >= child.depth_below);
                    if !absorbs {
                        self.buf[w] = s;
                        w += 1;
                    }
                }
                if w < before {
                    self.allow(child.lo, child.hi);
                    self.buf.truncate(w);
                }
            }
            let end2 = self.buf.len();
            if end2 > mid {
                self.allow(child.lo, child.lo + child.ends);
                if child.children.0 < child.children.1 {
                    self.walk(c, mid, end2);
                }
            }
            self.buf.truncate(mid);
            self.stepper.arena.truncate(mark);
        }
    }
}
