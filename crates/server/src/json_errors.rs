//! Request bodies that do not parse, explained in the API's terms: the
//! field (its path in the body) and the rule it breaks, not the parser's
//! Rust types ("expected u64") or its float reading of a big integer.
//!
//! Only the error path comes here: a body that parses never pays for the
//! path tracking.

use serde::de::DeserializeOwned;
use serde_json::error::Category;

use peakstack_domain::MAX_TRANSFER_AMOUNT;

/// `bytes` as `T`, or a detail saying which field breaks which rule.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    if let Some(detail) = not_an_object("", bytes) {
        return Err(detail);
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| describe("", &e))?;
    deserializer.end().map_err(|e| syntax(&e))?;
    Ok(value)
}

/// Why `text` is not a `T`, its fields' paths under `prefix` (for example
/// `transfers[3]`). For a text already known not to parse.
pub fn explain<T: DeserializeOwned>(prefix: &str, text: &str) -> String {
    if let Some(detail) = not_an_object(prefix, text.as_bytes()) {
        return detail;
    }
    let mut deserializer = serde_json::Deserializer::from_str(text);
    match serde_path_to_error::deserialize::<_, T>(&mut deserializer) {
        Err(error) => describe(prefix, &error),
        Ok(_) => match deserializer.end() {
            Err(error) => syntax(&error),
            Ok(()) => format!("{prefix}: not valid here"),
        },
    }
}

/// Every body (and batch item) is an object; serde would also read a
/// struct from an array, and then blame its first element.
fn not_an_object(path: &str, bytes: &[u8]) -> Option<String> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace())?;
    if *first == b'{' {
        return None;
    }
    if let Err(error) = serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
        return Some(syntax(&error));
    }
    let got = match first {
        b'[' => "an array",
        b'"' => "a string",
        b't' | b'f' => "a boolean",
        b'n' => "null",
        _ => "a number",
    };
    Some(format!("{}: must be a JSON object, got {got}", shown(path)))
}

fn describe(prefix: &str, error: &serde_path_to_error::Error<serde_json::Error>) -> String {
    let inner = error.inner();
    if inner.classify() != Category::Data {
        return syntax(inner);
    }
    let path = join(prefix, &error.path().to_string());
    let message = without_position(inner);
    if let Some(field) = between(&message, "missing field `", "`") {
        return format!("{}: is required", join(&path, field));
    }
    if let Some(field) = between(&message, "unknown field `", "`") {
        let known = message.split_once(", expected ").map_or(String::new(), |(_, known)| {
            format!(" (the fields are {})", known.trim_start_matches("one of ").replace('`', ""))
        });
        // The path names the unknown field already.
        let path = if path.rsplit(['.', '[']).next() == Some(field) { path.clone() } else { join(&path, field) };
        return format!("{path}: is not a field of this request{known}");
    }
    let got = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))
        .and_then(|rest| rest.split_once(", expected "))
        .map(|(unexpected, _)| unexpected);
    let Some(got) = got else { return format!("{}: {message}", shown(&path)) };
    let field = path.rsplit(['.', '[']).next().unwrap_or_default();
    format!("{}: {}, got {}", shown(&path), rule(field, &message), describe_value(got))
}

/// What a field must be, in the API's terms.
fn rule(field: &str, message: &str) -> String {
    match field {
        "amount" => format!("must be an integer from 1 to {MAX_TRANSFER_AMOUNT}"),
        "timeout_ms" => format!("must be an integer from 0 to {MAX_TRANSFER_AMOUNT}"),
        "overdraft_limit" => format!("must be an integer from 0 to {}", u64::MAX),
        "pending" | "atomic" => "must be true or false".to_owned(),
        "metadata" => "must be a JSON object".to_owned(),
        "flags" => "must be an array of flag names".to_owned(),
        "transfers" => "must be an array of transfers".to_owned(),
        _ if message.ends_with("expected a string") => "must be a string".to_owned(),
        _ if message.contains("expected struct") || message.contains("expected a map") => {
            "must be a JSON object".to_owned()
        }
        _ if message.ends_with("expected a sequence") => "must be an array".to_owned(),
        _ if message.ends_with("expected a boolean") => "must be true or false".to_owned(),
        _ => "has the wrong type".to_owned(),
    }
}

/// serde's "unexpected" text (`integer \`-1\``, `floating point \`1.5\``,
/// `string "5"`) as a reader would say it.
fn describe_value(unexpected: &str) -> String {
    if let Some(number) = between(unexpected, "integer `", "`") {
        return number.to_owned();
    }
    if let Some(number) = between(unexpected, "floating point `", "`") {
        return match number.parse::<f64>() {
            // serde_json reads an integer beyond 64 bits as a float.
            Ok(value) if value.fract() == 0.0 && value.abs() >= 9.2e18 => {
                format!("a number too large ({number})")
            }
            Ok(value) if value.fract() == 0.0 => format!("{number} (written as a decimal)"),
            _ => format!("the fraction {number}"),
        };
    }
    if let Some(boolean) = between(unexpected, "boolean `", "`") {
        return boolean.to_owned();
    }
    if let Some(text) = unexpected.strip_prefix("string ") {
        return format!("the string {text}");
    }
    match unexpected {
        "map" => "an object".to_owned(),
        "sequence" => "an array".to_owned(),
        "unit value" | "null" => "null".to_owned(),
        other => other.to_owned(),
    }
}

fn syntax(error: &serde_json::Error) -> String {
    let message = without_position(error);
    let position = format!("at line {} column {}", error.line(), error.column());
    match error.classify() {
        Category::Eof => format!("the body is not valid JSON: it ends too early ({message}) {position}"),
        _ => format!("the body is not valid JSON: {message} {position}"),
    }
}

fn without_position(error: &serde_json::Error) -> String {
    let text = error.to_string();
    match text.rfind(" at line ") {
        Some(at) if error.line() > 0 => text[..at].to_owned(),
        _ => text,
    }
}

fn between<'a>(text: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let rest = &text[text.find(start)? + start.len()..];
    Some(&rest[..rest.find(end)?])
}

/// `prefix.path`, where serde_path_to_error writes the root as ".".
fn join(prefix: &str, path: &str) -> String {
    let path = if path == "." { "" } else { path };
    match (prefix.is_empty(), path.is_empty()) {
        (true, _) => path.to_owned(),
        (false, true) => prefix.to_owned(),
        (false, false) if path.starts_with('[') => format!("{prefix}{path}"),
        (false, false) => format!("{prefix}.{path}"),
    }
}

fn shown(path: &str) -> &str {
    if path.is_empty() {
        "the body"
    } else {
        path
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        id: String,
        amount: u64,
        #[serde(default)]
        pending: bool,
        #[serde(default)]
        items: Vec<Item>,
    }

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Item {
        amount: u64,
    }

    fn check(body: &str, expected: &str) {
        let detail = parse::<Body>(body.as_bytes()).expect_err(body);
        assert_eq!(detail, expected, "{body}");
    }

    #[test]
    fn details_name_the_field_and_the_rule() {
        let max = MAX_TRANSFER_AMOUNT;
        check(r#"{"id":"a","amount":-1}"#, &format!("amount: must be an integer from 1 to {max}, got -1"));
        check(
            r#"{"id":"a","amount":18446744073709551616}"#,
            &format!("amount: must be an integer from 1 to {max}, got a number too large (1.8446744073709552e+19)"),
        );
        check(
            r#"{"id":"a","amount":1.5}"#,
            &format!("amount: must be an integer from 1 to {max}, got the fraction 1.5"),
        );
        check(
            r#"{"id":"a","amount":"5"}"#,
            &format!("amount: must be an integer from 1 to {max}, got the string \"5\""),
        );
        check(r#"{"id":5,"amount":1}"#, "id: must be a string, got 5");
        check(r#"{"id":"a","amount":1,"pending":"yes"}"#, "pending: must be true or false, got the string \"yes\"");
        check(r#"{"id":"a"}"#, "amount: is required");
        check(r#"{"id":"a","amount":1,"items":[{}]}"#, "items[0].amount: is required");
        check(
            r#"{"id":"a","amount":1,"items":[{"amount":-2}]}"#,
            &format!("items[0].amount: must be an integer from 1 to {max}, got -2"),
        );
        check(
            r#"{"id":"a","amount":1,"colour":"red"}"#,
            "colour: is not a field of this request (the fields are id, amount, pending, items)",
        );
        check(r#"[1]"#, "the body: must be a JSON object, got an array");
        check(
            r#"{"id":"a","amount":1"#,
            "the body is not valid JSON: it ends too early (EOF while parsing an object) at line 1 column 20",
        );
        check("not json", "the body is not valid JSON: expected ident at line 1 column 2");
        check(r#"{"id":"a","amount":1} x"#, "the body is not valid JSON: trailing characters at line 1 column 23");
        assert_eq!(
            explain::<Item>("transfers[3]", r#"{"amount":0.5}"#),
            format!("transfers[3].amount: must be an integer from 1 to {max}, got the fraction 0.5")
        );
        assert_eq!(explain::<Item>("transfers[3]", "{}"), "transfers[3].amount: is required");
    }
}
