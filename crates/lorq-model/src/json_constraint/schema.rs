//! Compiling a JSON Schema (the supported subset, see the module above) into a graph of nodes that
//! the character-level parser walks. Nodes refer to each other by index, so `$ref` cycles
//! (recursive schemas) are plain back edges.

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::error::{ModelError, Result};

/// "No upper bound" for lengths and counts.
pub(super) const INF: u32 = u32::MAX;
/// Node index of the "any JSON value" node (always present).
pub(super) const ANY: u32 = 0;
/// Literal indices that every schema has.
pub(super) const LIT_TRUE: u32 = 0;
pub(super) const LIT_FALSE: u32 = 1;
pub(super) const LIT_NULL: u32 = 2;
pub(super) const LIT_COLON: u32 = 3;

#[derive(Debug, Clone)]
pub(super) enum Node {
    Any,
    Null,
    Boolean,
    Number {
        integer: bool,
    },
    String {
        min: u32,
        max: u32,
    },
    /// One of these compact JSON texts (indices into `JsonSchema::literals`).
    Enum(Vec<u32>),
    /// An object with these properties, emitted in this order, none other.
    Object {
        props: Vec<Prop>,
        /// `req_from[i]`: the first required property at index `>= i` (`props.len()` if none).
        req_from: Vec<u32>,
    },
    /// An object with any string keys whose values all match `values`.
    FreeObject {
        values: u32,
    },
    Array {
        items: u32,
        min: u32,
        max: u32,
    },
    AnyOf(Vec<u32>),
    Ref(u32),
}

#[derive(Debug, Clone)]
pub(super) struct Prop {
    /// Literal: the key's JSON text without its opening quote, then `":`.
    pub key_lit: u32,
    pub value: u32,
    pub required: bool,
}

/// A compiled schema: validated once, shared by every sequence that uses it.
#[derive(Debug)]
pub struct JsonSchema {
    pub(super) nodes: Vec<Node>,
    pub(super) literals: Vec<Box<str>>,
    pub(super) root: u32,
}

/// Keywords that only annotate (or that this module documents as ignored): accepted, no effect.
const IGNORED: &[&str] = &[
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
    "deprecated",
    "readOnly",
    "writeOnly",
    "$defs",
    "definitions",
    "discriminator",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
];

/// Keywords this module implements.
const SUPPORTED: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
];

const OBJECT_KEYWORDS: &[&str] = &["properties", "required", "additionalProperties"];
const ARRAY_KEYWORDS: &[&str] = &["items", "minItems", "maxItems"];
const STRING_KEYWORDS: &[&str] = &["minLength", "maxLength"];

fn err(path: &str, message: impl std::fmt::Display) -> ModelError {
    ModelError::JsonConstraint(format!("schema at `{path}`: {message}"))
}

impl JsonSchema {
    /// Compiles `schema`; `None` means "any JSON object" (`{"type": "json_object"}` without a
    /// schema). Unsupported keywords, unknown types and contradictions are errors naming the
    /// schema path and the keyword.
    pub fn compile(schema: Option<&Value>) -> Result<Self> {
        let mut c = Compiler {
            root: schema,
            nodes: vec![Node::Any],
            paths: vec!["#".to_string()],
            literals: Vec::new(),
            lit_index: HashMap::new(),
            refs: HashMap::new(),
        };
        for text in ["true", "false", "null", ":"] {
            c.literal(text.to_string());
        }
        let root = match schema {
            None => c.add(Node::FreeObject { values: ANY }, "#"),
            Some(v) => c.compile(v, "#")?,
        };
        c.check_no_empty_cycles()?;
        Ok(Self {
            nodes: c.nodes,
            literals: c.literals,
            root,
        })
    }
}

struct Compiler<'a> {
    root: Option<&'a Value>,
    nodes: Vec<Node>,
    paths: Vec<String>,
    literals: Vec<Box<str>>,
    lit_index: HashMap<String, u32>,
    refs: HashMap<String, u32>,
}

impl<'a> Compiler<'a> {
    fn add(&mut self, node: Node, path: &str) -> u32 {
        self.nodes.push(node);
        self.paths.push(path.to_string());
        (self.nodes.len() - 1) as u32
    }

    fn literal(&mut self, text: String) -> u32 {
        if let Some(&i) = self.lit_index.get(&text) {
            return i;
        }
        let i = self.literals.len() as u32;
        self.literals.push(text.clone().into_boxed_str());
        self.lit_index.insert(text, i);
        i
    }

    fn compile(&mut self, v: &'a Value, path: &str) -> Result<u32> {
        match v {
            Value::Bool(true) => Ok(ANY),
            Value::Bool(false) => Err(err(path, "the schema `false` matches no value")),
            Value::Object(map) => self.compile_map(map, path),
            other => Err(err(
                path,
                format!("a schema must be an object or a boolean, found {other}"),
            )),
        }
    }

    fn compile_map(&mut self, map: &'a Map<String, Value>, path: &str) -> Result<u32> {
        for key in map.keys() {
            if !SUPPORTED.contains(&key.as_str()) && !IGNORED.contains(&key.as_str()) {
                return Err(err(
                    path,
                    format!("keyword `{key}` is not supported by constrained decoding"),
                ));
            }
        }
        let constraining: Vec<&str> = map
            .keys()
            .map(String::as_str)
            .filter(|k| SUPPORTED.contains(k))
            .collect();
        let only = |allowed: &[&str], what: &str| -> Result<()> {
            match constraining.iter().find(|k| !allowed.contains(k)) {
                Some(k) => Err(err(
                    path,
                    format!("`{k}` together with `{what}` is not supported"),
                )),
                None => Ok(()),
            }
        };

        if let Some(r) = map.get("$ref") {
            only(&["$ref"], "$ref")?;
            return self.resolve_ref(r, path);
        }
        if let Some(all) = map.get("allOf") {
            only(&["allOf"], "allOf")?;
            return match all.as_array().map(Vec::as_slice) {
                Some([one]) => self.compile(one, &format!("{path}/allOf/0")),
                _ => Err(err(
                    path,
                    "`allOf` is supported only with exactly one schema",
                )),
            };
        }
        for kw in ["anyOf", "oneOf"] {
            if let Some(alts) = map.get(kw) {
                only(&[kw], kw)?;
                let alts = match alts.as_array() {
                    Some(a) if !a.is_empty() => a,
                    _ => return Err(err(path, format!("`{kw}` must be a non-empty array"))),
                };
                let mut ids = Vec::with_capacity(alts.len());
                for (i, a) in alts.iter().enumerate() {
                    ids.push(self.compile(a, &format!("{path}/{kw}/{i}"))?);
                }
                return Ok(if ids.len() == 1 {
                    ids[0]
                } else {
                    self.add(Node::AnyOf(ids), path)
                });
            }
        }
        if map.contains_key("enum") || map.contains_key("const") {
            return self.compile_enum(map, path, &constraining);
        }
        let types: Vec<&str> = match map.get("type") {
            None => {
                let has = |kws: &[&str]| kws.iter().any(|k| map.contains_key(*k));
                let inferred: Vec<&str> = [
                    ("object", has(OBJECT_KEYWORDS)),
                    ("array", has(ARRAY_KEYWORDS)),
                    ("string", has(STRING_KEYWORDS)),
                ]
                .into_iter()
                .filter_map(|(t, yes)| yes.then_some(t))
                .collect();
                match inferred.len() {
                    0 => return Ok(ANY),
                    1 => inferred,
                    _ => {
                        return Err(err(
                            path,
                            "keywords of several types without `type`; add `type`",
                        ))
                    }
                }
            }
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) if !ts.is_empty() => {
                let mut out = Vec::new();
                for t in ts {
                    match t.as_str() {
                        Some(s) if !out.contains(&s) => out.push(s),
                        Some(_) => {}
                        None => return Err(err(path, format!("`type` entry {t} is not a string"))),
                    }
                }
                out
            }
            Some(other) => {
                return Err(err(
                    path,
                    format!(
                        "`type` must be a string or a non-empty array of strings, found {other}"
                    ),
                ))
            }
        };
        let mut ids = Vec::with_capacity(types.len());
        for t in types {
            ids.push(self.compile_typed(t, map, path)?);
        }
        Ok(if ids.len() == 1 {
            ids[0]
        } else {
            self.add(Node::AnyOf(ids), path)
        })
    }

    fn compile_enum(
        &mut self,
        map: &'a Map<String, Value>,
        path: &str,
        constraining: &[&str],
    ) -> Result<u32> {
        if map.contains_key("enum") && map.contains_key("const") {
            return Err(err(path, "`enum` together with `const` is not supported"));
        }
        if let Some(k) = constraining
            .iter()
            .find(|k| !["enum", "const", "type"].contains(k))
        {
            return Err(err(
                path,
                format!("`{k}` together with `enum`/`const` is not supported"),
            ));
        }
        let (kw, values): (&str, Vec<&Value>) = match (map.get("enum"), map.get("const")) {
            (Some(Value::Array(vs)), _) if !vs.is_empty() => ("enum", vs.iter().collect()),
            (Some(_), _) => return Err(err(path, "`enum` must be a non-empty array")),
            (None, Some(c)) => ("const", vec![c]),
            (None, None) => unreachable!("checked by the caller"),
        };
        let types: Option<Vec<&str>> = match map.get("type") {
            None => None,
            Some(Value::String(t)) => Some(vec![t.as_str()]),
            Some(Value::Array(ts)) => Some(ts.iter().filter_map(Value::as_str).collect()),
            Some(other) => return Err(err(path, format!("`type` {other} is not a type name"))),
        };
        let mut lits = Vec::new();
        for v in values {
            if let Some(ts) = &types {
                if !ts.iter().any(|t| value_has_type(v, t)) {
                    return Err(err(
                        path,
                        format!("`{kw}` value {v} does not have the schema's `type`"),
                    ));
                }
            }
            let text = serde_json::to_string(v)
                .map_err(|e| err(path, format!("`{kw}` value {v}: {e}")))?;
            let lit = self.literal(text);
            if !lits.contains(&lit) {
                lits.push(lit);
            }
        }
        Ok(self.add(Node::Enum(lits), path))
    }

    fn compile_typed(&mut self, t: &str, map: &'a Map<String, Value>, path: &str) -> Result<u32> {
        let node = match t {
            "null" => Node::Null,
            "boolean" => Node::Boolean,
            "integer" => Node::Number { integer: true },
            "number" => Node::Number { integer: false },
            "string" => {
                let min = count(map, "minLength", path)?.unwrap_or(0);
                let max = count(map, "maxLength", path)?.unwrap_or(INF);
                if min > max {
                    return Err(err(
                        path,
                        format!("`minLength` {min} is greater than `maxLength` {max}"),
                    ));
                }
                Node::String { min, max }
            }
            "array" => {
                let min = count(map, "minItems", path)?.unwrap_or(0);
                let mut max = count(map, "maxItems", path)?.unwrap_or(INF);
                if min > max {
                    return Err(err(
                        path,
                        format!("`minItems` {min} is greater than `maxItems` {max}"),
                    ));
                }
                let items = match map.get("items") {
                    None | Some(Value::Bool(true)) => ANY,
                    Some(Value::Bool(false)) => {
                        if min > 0 {
                            return Err(err(path, "`items: false` with `minItems` > 0"));
                        }
                        max = 0;
                        ANY
                    }
                    Some(Value::Array(_)) => {
                        return Err(err(
                            path,
                            "`items` as an array (tuple validation) is not supported",
                        ))
                    }
                    Some(s) => self.compile(s, &format!("{path}/items"))?,
                };
                Node::Array { items, min, max }
            }
            "object" => return self.compile_object(map, path),
            other => return Err(err(path, format!("unknown `type` \"{other}\""))),
        };
        Ok(self.add(node, path))
    }

    fn compile_object(&mut self, map: &'a Map<String, Value>, path: &str) -> Result<u32> {
        let props = match map.get("properties") {
            None => None,
            Some(Value::Object(p)) => Some(p),
            Some(other) => {
                return Err(err(
                    path,
                    format!("`properties` must be an object, found {other}"),
                ))
            }
        };
        let mut required: Vec<&str> = Vec::new();
        match map.get("required") {
            None => {}
            Some(Value::Array(rs)) => {
                for r in rs {
                    let Some(name) = r.as_str() else {
                        return Err(err(path, format!("`required` entry {r} is not a string")));
                    };
                    if !props.is_some_and(|p| p.contains_key(name)) {
                        return Err(err(
                            path,
                            format!("`required` names \"{name}\", which is not in `properties`"),
                        ));
                    }
                    required.push(name);
                }
            }
            Some(other) => {
                return Err(err(
                    path,
                    format!("`required` must be an array, found {other}"),
                ))
            }
        }
        let additional = map.get("additionalProperties");
        let node = match props {
            Some(p) if !p.is_empty() => {
                let mut out = Vec::with_capacity(p.len());
                for (key, sub) in p {
                    let value = self.compile(sub, &format!("{path}/properties/{key}"))?;
                    let mut text = serde_json::to_string(key)
                        .map_err(|e| err(path, format!("property name {key:?}: {e}")))?;
                    text.remove(0);
                    text.push(':');
                    out.push(Prop {
                        key_lit: self.literal(text),
                        value,
                        required: required.contains(&key.as_str()),
                    });
                }
                let n = out.len() as u32;
                let mut req_from = vec![n; out.len() + 1];
                for i in (0..out.len()).rev() {
                    req_from[i] = if out[i].required {
                        i as u32
                    } else {
                        req_from[i + 1]
                    };
                }
                Node::Object {
                    props: out,
                    req_from,
                }
            }
            _ => match additional {
                None | Some(Value::Bool(true)) => Node::FreeObject { values: ANY },
                Some(Value::Bool(false)) => Node::Object {
                    props: Vec::new(),
                    req_from: vec![0],
                },
                Some(s) => Node::FreeObject {
                    values: self.compile(s, &format!("{path}/additionalProperties"))?,
                },
            },
        };
        Ok(self.add(node, path))
    }

    fn resolve_ref(&mut self, r: &Value, path: &str) -> Result<u32> {
        let Some(r) = r.as_str() else {
            return Err(err(path, format!("`$ref` must be a string, found {r}")));
        };
        if let Some(&id) = self.refs.get(r) {
            return Ok(id);
        }
        let Some(pointer) = r.strip_prefix('#') else {
            return Err(err(
                path,
                format!(
                    "`$ref` \"{r}\": only references inside the schema (`#/...`) are supported"
                ),
            ));
        };
        let target = self
            .root
            .and_then(|root| root.pointer(pointer))
            .ok_or_else(|| err(path, format!("`$ref` \"{r}\" points to nothing")))?;
        let slot = self.add(Node::Ref(INF), r);
        self.refs.insert(r.to_string(), slot);
        let id = self.compile(target, r)?;
        self.nodes[slot as usize] = Node::Ref(id);
        Ok(slot)
    }

    /// A `$ref`/`anyOf` cycle that consumes no character (`A = anyOf[A, ...]`) would make the
    /// parser loop forever: refuse it.
    fn check_no_empty_cycles(&self) -> Result<()> {
        // 0 = unvisited, 1 = on the current path, 2 = done.
        let mut color = vec![0u8; self.nodes.len()];
        for start in 0..self.nodes.len() {
            if color[start] != 0 {
                continue;
            }
            let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
            color[start] = 1;
            while let Some(&mut (n, ref mut next)) = stack.last_mut() {
                let succ: &[u32] = match &self.nodes[n] {
                    Node::AnyOf(alts) => alts,
                    Node::Ref(t) => std::slice::from_ref(t),
                    _ => &[],
                };
                if *next < succ.len() {
                    let s = succ[*next] as usize;
                    *next += 1;
                    match color[s] {
                        0 => {
                            color[s] = 1;
                            stack.push((s, 0));
                        }
                        1 => {
                            return Err(err(
                                &self.paths[s],
                                "a `$ref`/`anyOf` cycle that consumes no input (left recursion)",
                            ))
                        }
                        _ => {}
                    }
                } else {
                    color[n] = 2;
                    stack.pop();
                }
            }
        }
        Ok(())
    }
}

fn count(map: &Map<String, Value>, kw: &str, path: &str) -> Result<Option<u32>> {
    match map.get(kw) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) => Ok(Some(n.min(u64::from(INF - 1)) as u32)),
            None => Err(err(
                path,
                format!("`{kw}` must be a non-negative integer, found {v}"),
            )),
        },
    }
}

fn value_has_type(v: &Value, t: &str) -> bool {
    match t {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "string" => v.is_string(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        _ => false,
    }
}
