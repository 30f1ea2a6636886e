//! The character-level JSON parser driven by a compiled schema: a pushdown automaton whose
//! stacks live in an arena as linked lists, so a stack is one `u32` and forking it at a branch
//! (a trie node, an `anyOf`, an optional property) costs nothing but the frames that change.

use super::schema::{JsonSchema, Node, ANY, INF, LIT_COLON, LIT_FALSE, LIT_NULL, LIT_TRUE};

/// The empty stack: the value is complete and nothing may follow.
pub(super) const EMPTY: u32 = u32::MAX;

/// Longest integer part / fraction accepted (keeps every number exactly representable enough
/// for common JSON parsers and stops digit runs), and exponent digits (no overflow to infinity).
const MAX_INT_DIGITS: u8 = 18;
const MAX_FRAC_DIGITS: u8 = 18;
const MAX_EXP_DIGITS: u8 = 2;

// Phases of the container frames.
const OPEN: u8 = 0;
const AFTER_VALUE: u8 = 1;
const AFTER_COMMA: u8 = 2;

// Number phases.
const N_MINUS: u8 = 0;
const N_ZERO: u8 = 1;
const N_INT: u8 = 2;
const N_DOT: u8 = 3;
const N_FRAC: u8 = 4;
const N_EXP: u8 = 5;
const N_EXP_SIGN: u8 = 6;
const N_EXP_DIGITS: u8 = 7;

// String escape states: 0 plain, 1 after `\`, 2..=6 inside `\uXXXX`.
const E_PLAIN: u8 = 0;
const E_BACKSLASH: u8 = 1;
const E_HEX1: u8 = 2;
const E_HEX2: u8 = 3;
const E_HEX2_AFTER_D: u8 = 4;
const E_HEX3: u8 = 5;
const E_HEX4: u8 = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Frame {
    /// A value of this schema node is expected; nothing of it read yet.
    Value(u32),
    /// Inside a fixed text (literal index, byte offset of the next char, characters of its
    /// `\u` escape read so far).
    Lit {
        lit: u32,
        pos: u32,
        esc: u8,
    },
    /// Inside a string, after the opening quote; `len` in chars (capped once it can no longer
    /// matter, so equal states compare equal).
    Str {
        min: u32,
        max: u32,
        len: u32,
        esc: u8,
    },
    Num {
        integer: bool,
        phase: u8,
        digits: u8,
    },
    /// An object with fixed properties; `next` is the first property not yet passed.
    Obj {
        node: u32,
        next: u32,
        phase: u8,
    },
    FreeObj {
        values: u32,
        phase: u8,
    },
    Arr {
        node: u32,
        count: u32,
        phase: u8,
    },
}

/// Stacks as linked lists of frames: entry = (frame, index of the entry below or `EMPTY`).
#[derive(Default)]
pub(super) struct Arena {
    entries: Vec<(Frame, u32)>,
}

impl Arena {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Drops entries made after `len` (no stack still in use may point at them).
    pub fn truncate(&mut self, len: usize) {
        self.entries.truncate(len);
    }

    fn push(&mut self, below: u32, f: Frame) -> u32 {
        self.entries.push((f, below));
        (self.entries.len() - 1) as u32
    }

    fn get(&self, s: u32) -> Option<(Frame, u32)> {
        (s != EMPTY).then(|| self.entries[s as usize])
    }

    pub fn load(&mut self, frames: &[Frame]) -> u32 {
        frames.iter().fold(EMPTY, |below, &f| self.push(below, f))
    }

    /// The frames of stack `s`, bottom first.
    pub fn frames(&self, mut s: u32) -> Vec<Frame> {
        let mut out = Vec::new();
        while let Some((f, below)) = self.get(s) {
            out.push(f);
            s = below;
        }
        out.reverse();
        out
    }

    pub fn top(&self, s: u32) -> Option<Frame> {
        self.get(s).map(|(f, _)| f)
    }

    /// How many more plain string characters (no `"`, `\`, control) the stack absorbs while
    /// staying inside the same string, or `None` if it is not inside a string.
    pub fn plain_budget(&self, s: u32) -> Option<u32> {
        match self.top(s) {
            Some(Frame::Str {
                max,
                len,
                esc: E_PLAIN,
                ..
            }) => Some(if max == INF { INF } else { max - len }),
            _ => None,
        }
    }
}

/// The value is complete with these frames: nothing left, or only a top-level number that
/// may end here.
pub(super) fn accepting(frames: &[Frame]) -> bool {
    match frames {
        [] => true,
        [Frame::Num { phase, .. }] => num_can_end(*phase),
        _ => false,
    }
}

/// Characters that are the same inside any JSON string state (no quote, backslash, control).
pub(super) fn is_plain(ch: char) -> bool {
    ch != '"' && ch != '\\' && ch >= ' '
}

fn num_can_end(phase: u8) -> bool {
    matches!(phase, N_ZERO | N_INT | N_FRAC | N_EXP_DIGITS)
}

/// Advances stacks by characters against one schema.
pub(super) struct Stepper<'a> {
    pub schema: &'a JsonSchema,
    pub arena: Arena,
}

impl Stepper<'_> {
    /// Appends to `out` every stack that stack `s` becomes after reading `ch` (none if `ch` is
    /// not allowed there).
    pub fn step(&mut self, s: u32, ch: char, out: &mut Vec<u32>) {
        let Some((top, below)) = self.arena.get(s) else {
            return;
        };
        match top {
            Frame::Value(node) => self.start_value(below, node, ch, out),
            Frame::Lit { lit, pos, esc } => {
                let text = &self.schema.literals[lit as usize];
                let Some(want) = text[pos as usize..].chars().next() else {
                    return;
                };
                let (pos, esc) = if esc == 0 && ch == want {
                    (pos as usize + ch.len_utf8(), 0)
                } else if !want.is_ascii() && escape_char(want, esc as usize, ch) {
                    // A non-ASCII character (only ever inside a string) may also be written as
                    // its `\u` escape(s), for vocabularies without a token for it.
                    let esc = esc as usize + 1;
                    if esc == want.len_utf16() * 6 {
                        (pos as usize + want.len_utf8(), 0)
                    } else {
                        (pos as usize, esc)
                    }
                } else {
                    return;
                };
                if pos == text.len() {
                    out.push(below);
                } else {
                    let f = Frame::Lit {
                        lit,
                        pos: pos as u32,
                        esc: esc as u8,
                    };
                    out.push(self.arena.push(below, f));
                }
            }
            Frame::Str { min, max, len, esc } => {
                let next = |len: u32, esc: u8| Frame::Str { min, max, len, esc };
                // One more character of string content (an escape counts as one).
                let grown = |len: u32| {
                    if max == INF {
                        (len + 1).min(min)
                    } else {
                        len + 1
                    }
                };
                let f = match esc {
                    E_PLAIN => match ch {
                        '"' => {
                            if len >= min {
                                out.push(below);
                            }
                            return;
                        }
                        _ if len >= max || ch < ' ' => return,
                        '\\' => next(len, E_BACKSLASH),
                        _ => next(grown(len), E_PLAIN),
                    },
                    E_BACKSLASH => match ch {
                        '"' | '\\' | '/' | 'b' | 'f' | 'n' | 'r' | 't' => next(grown(len), E_PLAIN),
                        'u' => next(len, E_HEX1),
                        _ => return,
                    },
                    // No UTF-16 surrogates (`\uD800`-`\uDFFF`): a lone one is invalid for many
                    // parsers; characters outside the BMP are written as themselves.
                    E_HEX1 if ch == 'd' || ch == 'D' => next(len, E_HEX2_AFTER_D),
                    E_HEX1 if ch.is_ascii_hexdigit() => next(len, E_HEX2),
                    E_HEX2_AFTER_D if ('0'..='7').contains(&ch) => next(len, E_HEX3),
                    E_HEX2 if ch.is_ascii_hexdigit() => next(len, E_HEX3),
                    E_HEX3 if ch.is_ascii_hexdigit() => next(len, E_HEX4),
                    E_HEX4 if ch.is_ascii_hexdigit() => next(grown(len), E_PLAIN),
                    _ => return,
                };
                if f == top {
                    out.push(s);
                } else {
                    out.push(self.arena.push(below, f));
                }
            }
            Frame::Num {
                integer,
                phase,
                digits,
            } => match num_step(integer, phase, digits, ch) {
                Some((phase, digits)) => {
                    let f = Frame::Num {
                        integer,
                        phase,
                        digits,
                    };
                    out.push(self.arena.push(below, f));
                }
                // The number ends here; the character belongs to what encloses it.
                None if num_can_end(phase) => self.step(below, ch, out),
                None => {}
            },
            Frame::Obj { node, next, phase } => {
                let Node::Object { props, req_from } = &self.schema.nodes[node as usize] else {
                    unreachable!("Obj frames are made from Object nodes")
                };
                let n = props.len() as u32;
                match (phase, ch) {
                    (OPEN | AFTER_VALUE, '}') if req_from[next as usize] == n => out.push(below),
                    (AFTER_VALUE, ',') if next < n => {
                        let f = Frame::Obj {
                            node,
                            next,
                            phase: AFTER_COMMA,
                        };
                        out.push(self.arena.push(below, f));
                    }
                    (OPEN | AFTER_COMMA, '"') if next < n => {
                        // Any optional property up to and including the next required one.
                        let last = req_from[next as usize].min(n - 1);
                        for i in next..=last {
                            let p = &props[i as usize];
                            let (key_lit, value) = (p.key_lit, p.value);
                            let obj = Frame::Obj {
                                node,
                                next: i + 1,
                                phase: AFTER_VALUE,
                            };
                            let o = self.arena.push(below, obj);
                            let v = self.arena.push(o, Frame::Value(value));
                            out.push(self.arena.push(v, lit_frame(key_lit, 0)));
                        }
                    }
                    _ => {}
                }
            }
            Frame::FreeObj { values, phase } => match (phase, ch) {
                (OPEN | AFTER_VALUE, '}') => out.push(below),
                (AFTER_VALUE, ',') => {
                    let f = Frame::FreeObj {
                        values,
                        phase: AFTER_COMMA,
                    };
                    out.push(self.arena.push(below, f));
                }
                (OPEN | AFTER_COMMA, '"') => {
                    let f = Frame::FreeObj {
                        values,
                        phase: AFTER_VALUE,
                    };
                    let o = self.arena.push(below, f);
                    let v = self.arena.push(o, Frame::Value(values));
                    let c = self.arena.push(v, lit_frame(LIT_COLON, 0));
                    let key = Frame::Str {
                        min: 0,
                        max: INF,
                        len: 0,
                        esc: E_PLAIN,
                    };
                    out.push(self.arena.push(c, key));
                }
                _ => {}
            },
            Frame::Arr { node, count, phase } => {
                let (items, min, max) = match &self.schema.nodes[node as usize] {
                    Node::Array { items, min, max } => (*items, *min, *max),
                    // `Any` arrays use the Any node itself.
                    _ => (ANY, 0, INF),
                };
                match (phase, ch) {
                    (OPEN, ']') if min == 0 => out.push(below),
                    (AFTER_VALUE, ']') if count >= min => out.push(below),
                    (AFTER_VALUE, ',') if count < max => {
                        let f = Frame::Arr {
                            node,
                            count: count + 1,
                            phase: AFTER_VALUE,
                        };
                        let a = self.arena.push(below, f);
                        out.push(self.arena.push(a, Frame::Value(items)));
                    }
                    (OPEN, _) if max > 0 => {
                        let f = Frame::Arr {
                            node,
                            count: 1,
                            phase: AFTER_VALUE,
                        };
                        let a = self.arena.push(below, f);
                        self.start_value(a, items, ch, out);
                    }
                    _ => {}
                }
            }
        }
    }

    /// `ch` is the first character of a value of `node`, on top of stack `below`.
    fn start_value(&mut self, below: u32, node: u32, ch: char, out: &mut Vec<u32>) {
        let schema = self.schema;
        match &schema.nodes[node as usize] {
            Node::Any => {
                let f = match ch {
                    '{' => Frame::FreeObj {
                        values: ANY,
                        phase: OPEN,
                    },
                    '[' => Frame::Arr {
                        node: ANY,
                        count: 0,
                        phase: OPEN,
                    },
                    '"' => Frame::Str {
                        min: 0,
                        max: INF,
                        len: 0,
                        esc: E_PLAIN,
                    },
                    't' => lit_frame(LIT_TRUE, 1),
                    'f' => lit_frame(LIT_FALSE, 1),
                    'n' => lit_frame(LIT_NULL, 1),
                    _ => return self.start_number(below, false, ch, out),
                };
                out.push(self.arena.push(below, f));
            }
            Node::Null => {
                if ch == 'n' {
                    let f = lit_frame(LIT_NULL, 1);
                    out.push(self.arena.push(below, f));
                }
            }
            Node::Boolean => {
                let lit = match ch {
                    't' => LIT_TRUE,
                    'f' => LIT_FALSE,
                    _ => return,
                };
                out.push(self.arena.push(below, lit_frame(lit, 1)));
            }
            &Node::Number { integer } => self.start_number(below, integer, ch, out),
            &Node::String { min, max } => {
                if ch == '"' {
                    let f = Frame::Str {
                        min,
                        max,
                        len: 0,
                        esc: E_PLAIN,
                    };
                    out.push(self.arena.push(below, f));
                }
            }
            Node::Enum(lits) => {
                for &lit in lits {
                    // Every literal starts with an ASCII character: reuse the literal step.
                    let s = self.arena.push(below, lit_frame(lit, 0));
                    self.step(s, ch, out);
                }
            }
            Node::Object { .. } => {
                if ch == '{' {
                    let f = Frame::Obj {
                        node,
                        next: 0,
                        phase: OPEN,
                    };
                    out.push(self.arena.push(below, f));
                }
            }
            &Node::FreeObject { values } => {
                if ch == '{' {
                    let f = Frame::FreeObj {
                        values,
                        phase: OPEN,
                    };
                    out.push(self.arena.push(below, f));
                }
            }
            Node::Array { .. } => {
                if ch == '[' {
                    let f = Frame::Arr {
                        node,
                        count: 0,
                        phase: OPEN,
                    };
                    out.push(self.arena.push(below, f));
                }
            }
            Node::AnyOf(alts) => {
                for &a in alts {
                    self.start_value(below, a, ch, out);
                }
            }
            &Node::Ref(target) => self.start_value(below, target, ch, out),
        }
    }

    fn start_number(&mut self, below: u32, integer: bool, ch: char, out: &mut Vec<u32>) {
        let (phase, digits) = match ch {
            '-' => (N_MINUS, 0),
            '0' => (N_ZERO, 1),
            '1'..='9' => (N_INT, 1),
            _ => return,
        };
        let f = Frame::Num {
            integer,
            phase,
            digits,
        };
        out.push(self.arena.push(below, f));
    }
}

fn lit_frame(lit: u32, pos: u32) -> Frame {
    Frame::Lit { lit, pos, esc: 0 }
}

/// Whether `ch` is character `k` of the `\u` escape of `want` (`\uXXXX`, or two of them for a
/// surrogate pair); hex digits in either case.
fn escape_char(want: char, k: usize, ch: char) -> bool {
    let mut units = [0u16; 2];
    let units = want.encode_utf16(&mut units);
    let Some(&unit) = units.get(k / 6) else {
        return false;
    };
    match k % 6 {
        0 => ch == '\\',
        1 => ch == 'u',
        d => ch
            .to_digit(16)
            .is_some_and(|x| x == u32::from((unit >> (4 * (5 - d))) & 0xf)),
    }
}

/// The number phase after `ch`, or `None` if `ch` does not continue the number.
fn num_step(integer: bool, phase: u8, digits: u8, ch: char) -> Option<(u8, u8)> {
    let digit = ch.is_ascii_digit();
    match phase {
        N_MINUS if ch == '0' => Some((N_ZERO, 1)),
        N_MINUS if digit => Some((N_INT, 1)),
        N_INT if digit && digits < MAX_INT_DIGITS => Some((N_INT, digits + 1)),
        N_ZERO | N_INT if !integer && ch == '.' => Some((N_DOT, 0)),
        N_ZERO | N_INT | N_FRAC if !integer && (ch == 'e' || ch == 'E') => Some((N_EXP, 0)),
        N_DOT if digit => Some((N_FRAC, 1)),
        N_FRAC if digit && digits < MAX_FRAC_DIGITS => Some((N_FRAC, digits + 1)),
        N_EXP if ch == '+' || ch == '-' => Some((N_EXP_SIGN, 0)),
        N_EXP | N_EXP_SIGN if digit => Some((N_EXP_DIGITS, 1)),
        N_EXP_DIGITS if digit && digits < MAX_EXP_DIGITS => Some((N_EXP_DIGITS, digits + 1)),
        _ => None,
    }
}
