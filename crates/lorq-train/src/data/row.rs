//! One JSONL row parsed into one of the three formats, with errors that name the field.

use lorq_model::ChatMessage;
use serde_json::Value;

/// Roles a chat row may use. Anything else is more likely a typo than a role the template knows.
pub const CHAT_ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    /// `{"text": ...}`: trained on every token.
    Text(String),
    /// `{"instruction", "input"?, "output"}`: trained on `output` (+ EOS).
    Alpaca {
        instruction: String,
        input: String,
        output: String,
    },
    /// `{"messages": [{"role", "content"}, ...]}`: trained on the assistant turns.
    Chat(Vec<ChatMessage>),
}

/// Parses one non-blank line. The error text names the field (the caller adds file and line).
pub fn parse_row(line: &str) -> Result<Row, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(obj) = v else {
        return Err(format!("expected a JSON object per line, got {}", kind(&v)));
    };
    // The format is chosen by the keys present: `messages`, then Alpaca, then `text`.
    if let Some(m) = obj.get("messages") {
        return parse_messages(m).map(Row::Chat);
    }
    if obj.contains_key("instruction") || obj.contains_key("output") {
        let instruction = string_field(&obj, "instruction")?;
        let output = string_field(&obj, "output")?;
        let input = match obj.get("input") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(format!(
                    "field `input`: expected a string, got {}",
                    kind(other)
                ))
            }
        };
        return Ok(Row::Alpaca {
            instruction,
            input,
            output,
        });
    }
    if obj.contains_key("text") {
        return string_field(&obj, "text").map(Row::Text);
    }
    let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    Err(format!(
        "no `text`, `messages` or `instruction`/`output` field (keys: {keys:?})"
    ))
}

fn string_field(obj: &serde_json::Map<String, Value>, name: &str) -> Result<String, String> {
    match obj.get(name) {
        Some(Value::String(s)) => Ok(s.clone()),
        None => Err(format!("field `{name}` is missing")),
        Some(other) => Err(format!(
            "field `{name}`: expected a string, got {}",
            kind(other)
        )),
    }
}

fn parse_messages(v: &Value) -> Result<Vec<ChatMessage>, String> {
    let Value::Array(list) = v else {
        return Err(format!(
            "field `messages`: expected an array of {{\"role\", \"content\"}} objects, got {}",
            kind(v)
        ));
    };
    if list.is_empty() {
        return Err("field `messages`: empty array".into());
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let Value::Object(o) = m else {
                return Err(format!(
                    "field `messages[{i}]`: expected an object, got {}",
                    kind(m)
                ));
            };
            let role = string_field(o, "role").map_err(|e| format!("`messages[{i}]`: {e}"))?;
            if !CHAT_ROLES.contains(&role.as_str()) {
                return Err(format!(
                    "field `messages[{i}].role`: unknown role {role:?} (expected one of {})",
                    CHAT_ROLES.join(", ")
                ));
            }
            let content =
                string_field(o, "content").map_err(|e| format!("`messages[{i}]`: {e}"))?;
            Ok(ChatMessage { role, content })
        })
        .collect()
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
