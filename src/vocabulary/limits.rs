//! The limits on what enters the system, checked where it enters: job messages and events
//! at the worker, webhook requests at the receiver, contexts at `start`, node outputs after
//! the node ran. Past a limit the input is refused as a whole — a job message is
//! dead-lettered, a request answered `400`/`413`, a node's result fails the node — and
//! nothing of it is written.
//!
//! | what | limit |
//! | --- | --- |
//! | a message body on the job queue | [`MAX_MESSAGE_BYTES`] |
//! | a run, blueprint or node id | [`MAX_ID_BYTES`], no control characters |
//! | nesting of a stored JSON value | [`MAX_VALUE_DEPTH`] levels |
//! | one node's output and context writes, or a start context, as JSON | [`MAX_VALUE_BYTES`] |
//! | a string or key in a stored value | no `\u0000` (PostgreSQL's `jsonb` refuses it) |
//! | the reason header of a dead letter | [`MAX_REASON_BYTES`] (cut, marked `…`) |

use serde_json::Value;

/// Largest message body a worker handles; a larger one is dead-lettered unread.
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;
/// Longest run, blueprint or node id, in bytes.
pub const MAX_ID_BYTES: usize = 256;
/// Deepest nesting of a stored JSON value (a value PostgreSQL stores must also be read back:
/// the JSON parser on this side refuses more than 128 levels, and a context nests each value
/// under its key; this leaves room).
pub const MAX_VALUE_DEPTH: usize = 64;
/// Largest JSON of one node's output and writes, or of a start context, in bytes.
pub const MAX_VALUE_BYTES: usize = 16 * 1024 * 1024;
/// Longest reason carried in a dead letter's header (the broker refuses large headers).
pub const MAX_REASON_BYTES: usize = 1024;

/// Whether `id` is a usable run, blueprint or node id: not empty, at most [`MAX_ID_BYTES`],
/// no control characters. `what` names it in the reason.
pub fn check_id(what: &str, id: &str) -> Result<(), String> {
    if id.trim().is_empty() {
        return Err(format!("{what} is empty"));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(format!(
            "{what} is {} bytes long (at most {MAX_ID_BYTES})",
            id.len()
        ));
    }
    if id.chars().any(char::is_control) {
        return Err(format!("{what} contains a control character"));
    }
    Ok(())
}

/// Whether PostgreSQL can store `value` and give it back: no `\u0000` in a string or key,
/// at most [`MAX_VALUE_DEPTH`] levels, and — counting `budget` bytes of JSON already
/// spent — at most [`MAX_VALUE_BYTES`] in all. Returns the bytes spent, roughly (string
/// and key lengths plus a few per item), so several values can share one budget.
pub fn check_storable(what: &str, value: &Value, budget: usize) -> Result<usize, String> {
    let mut spent = budget;
    walk(value, 1, &mut spent).map_err(|problem| format!("{what} cannot be stored: {problem}"))?;
    Ok(spent)
}

fn walk(value: &Value, depth: usize, spent: &mut usize) -> Result<(), String> {
    if depth > MAX_VALUE_DEPTH {
        return Err(format!("it is nested deeper than {MAX_VALUE_DEPTH} levels"));
    }
    *spent += 8;
    match value {
        Value::String(s) => string(s, spent)?,
        Value::Array(items) => {
            for item in items {
                walk(item, depth + 1, spent)?;
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                string(k, spent)?;
                walk(v, depth + 1, spent)?;
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
    if *spent > MAX_VALUE_BYTES {
        return Err(format!("it is larger than {MAX_VALUE_BYTES} bytes"));
    }
    Ok(())
}

fn string(s: &str, spent: &mut usize) -> Result<(), String> {
    if s.contains('\0') {
        return Err("a string contains \\u0000, which PostgreSQL does not store".into());
    }
    *spent += s.len();
    Ok(())
}

/// `reason`, cut to at most [`MAX_REASON_BYTES`] on a character boundary (marked `…`).
pub fn cut_reason(reason: &str) -> String {
    if reason.len() <= MAX_REASON_BYTES {
        return reason.to_string();
    }
    let mut end = MAX_REASON_BYTES - '…'.len_utf8();
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &reason[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ids_are_bounded_and_printable() {
        assert!(check_id("runId", "run-1").is_ok());
        assert!(check_id("runId", "").is_err());
        assert!(check_id("runId", &"x".repeat(MAX_ID_BYTES)).is_ok());
        assert!(check_id("runId", &"x".repeat(MAX_ID_BYTES + 1))
            .unwrap_err()
            .contains("257 bytes"));
        assert!(check_id("nodeId", "a\0b").unwrap_err().contains("control"));
        assert!(check_id("nodeId", "a\nb").is_err());
    }

    #[test]
    fn storable_values_have_no_nul_and_bounded_depth() {
        assert!(check_storable("output", &json!({"a": [1, "x", null]}), 0).is_ok());
        let nul = check_storable("output", &json!({"a": "x\u{0}y"}), 0).unwrap_err();
        assert!(nul.contains("\\u0000"), "{nul}");
        assert!(check_storable("output", &json!({"a\u{0}": 1}), 0).is_err());
        let mut deep = json!(1);
        for _ in 0..MAX_VALUE_DEPTH {
            deep = json!([deep]);
        }
        let err = check_storable("output", &deep, 0).unwrap_err();
        assert!(err.contains("nested deeper"), "{err}");
        let big = json!("x".repeat(MAX_VALUE_BYTES));
        assert!(check_storable("output", &big, 0).is_err());
        // A shared budget: two halves fit, a third does not.
        let half = json!("x".repeat(MAX_VALUE_BYTES / 2 - 64));
        let spent = check_storable("a", &half, 0).unwrap();
        let spent = check_storable("b", &half, spent).unwrap();
        assert!(check_storable("c", &half, spent).is_err());
    }

    #[test]
    fn reasons_are_cut_on_a_character_boundary() {
        assert_eq!(cut_reason("short"), "short");
        let long = "é".repeat(MAX_REASON_BYTES);
        let cut = cut_reason(&long);
        assert!(cut.len() <= MAX_REASON_BYTES && cut.ends_with('…'));
    }
}
