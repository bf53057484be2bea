//! The `stats --json` schema as the README writes it (the block after "JSON schema"), read
//! from the README itself, so a test compares the server's answer with the documentation
//! rather than with a list of its own that could drift from both.
//!
//! The block is JSON-like: `{ "key": TYPE, ... }`, `[ TYPE, ... ]`, `TYPE | TYPE`, the
//! scalars `int`, `float`, `null`, quoted string and number literals, an object of bare keys
//! (`{ "reloads", ... }`: integers), and `NAME = TYPE` definitions used by name.

use std::collections::BTreeMap;

use serde_json::Value;

/// A type in the schema.
#[derive(Debug, Clone)]
pub enum Ty {
    Int,
    Float,
    Null,
    Literal(String),
    Number(u64),
    Array(Box<Ty>),
    Object(BTreeMap<String, Ty>),
    Union(Vec<Ty>),
    Named(String),
}

/// The README's schema: the root type and the named definitions.
#[derive(Debug)]
pub struct Schema {
    root: Ty,
    names: BTreeMap<String, Ty>,
}

/// Reads the schema block from the README.
pub fn read() -> Schema {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("reading README.md");
    let after = readme
        .split("JSON schema (`version` 1)")
        .nth(1)
        .expect("the README's JSON schema heading");
    let block = after.split("```").nth(1).expect("the schema's code block");
    let mut p = Parser {
        toks: tokens(block),
        at: 0,
    };
    let root = p.ty();
    let mut names = BTreeMap::new();
    while p.at < p.toks.len() {
        let name = p.next();
        assert_eq!(p.next(), "=", "a definition NAME = TYPE after {name}");
        names.insert(name, p.ty());
    }
    Schema { root, names }
}

impl Schema {
    /// Whether `v` has exactly the documented keys, each of the documented type.
    pub fn check(&self, v: &Value) -> Result<(), String> {
        self.matches(&self.root, v, "$")
    }

    fn matches(&self, ty: &Ty, v: &Value, at: &str) -> Result<(), String> {
        let fail = || Err(format!("{at}: {v} is not {ty:?}"));
        match ty {
            Ty::Int if v.is_u64() || v.is_i64() => Ok(()),
            Ty::Float if v.is_f64() => Ok(()),
            Ty::Null if v.is_null() => Ok(()),
            Ty::Literal(s) if v.as_str() == Some(s) => Ok(()),
            Ty::Number(n) if v.as_u64() == Some(*n) => Ok(()),
            Ty::Array(each) => {
                let Some(items) = v.as_array() else {
                    return fail();
                };
                for (i, item) in items.iter().enumerate() {
                    self.matches(each, item, &format!("{at}[{i}]"))?;
                }
                Ok(())
            }
            Ty::Object(keys) => {
                let Some(obj) = v.as_object() else {
                    return fail();
                };
                for (k, t) in keys {
                    let Some(field) = obj.get(k) else {
                        return Err(format!("{at}.{k}: documented, not in the answer"));
                    };
                    self.matches(t, field, &format!("{at}.{k}"))?;
                }
                match obj.keys().find(|k| !keys.contains_key(*k)) {
                    Some(k) => Err(format!("{at}.{k}: in the answer, not documented")),
                    None => Ok(()),
                }
            }
            Ty::Union(alternatives) => {
                if alternatives.iter().any(|t| self.matches(t, v, at).is_ok()) {
                    Ok(())
                } else {
                    fail()
                }
            }
            Ty::Named(n) => {
                let t = self
                    .names
                    .get(n)
                    .unwrap_or_else(|| panic!("{n} is used in the README's schema, not defined"));
                self.matches(t, v, at)
            }
            _ => fail(),
        }
    }
}

/// Quoted strings (kept with their quotes), punctuation, and words.
fn tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                let mut s = String::from('"');
                for d in chars.by_ref() {
                    if d == '"' {
                        break;
                    }
                    s.push(d);
                }
                out.push(s);
            }
            '{' | '}' | '[' | ']' | ',' | ':' | '|' | '=' => out.push(c.to_string()),
            '.' => {
                // `...` in an array: "and more of the same".
                while chars.peek() == Some(&'.') {
                    chars.next();
                }
                out.push("...".into());
            }
            c if c.is_whitespace() => {}
            c => {
                let mut w = String::from(c);
                while let Some(&d) = chars.peek() {
                    if d.is_alphanumeric() || d == '_' {
                        w.push(d);
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push(w);
            }
        }
    }
    out
}

struct Parser {
    toks: Vec<String>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> &str {
        self.toks.get(self.at).map_or("", String::as_str)
    }

    fn next(&mut self) -> String {
        let t = self.peek().to_string();
        assert!(!t.is_empty(), "the README's schema block ends too soon");
        self.at += 1;
        t
    }

    fn expect(&mut self, want: &str) {
        let got = self.next();
        assert_eq!(got, want, "in the README's schema block");
    }

    /// TYPE ( | TYPE )*
    fn ty(&mut self) -> Ty {
        let mut alternatives = vec![self.one()];
        while self.peek() == "|" {
            self.at += 1;
            alternatives.push(self.one());
        }
        if alternatives.len() == 1 {
            alternatives.pop().unwrap()
        } else {
            Ty::Union(alternatives)
        }
    }

    fn one(&mut self) -> Ty {
        let t = self.next();
        match t.as_str() {
            "int" => Ty::Int,
            "float" => Ty::Float,
            "null" => Ty::Null,
            "{" => self.object(),
            "[" => {
                let each = self.ty();
                if self.peek() == "," {
                    self.at += 1;
                    self.expect("...");
                }
                self.expect("]");
                Ty::Array(Box::new(each))
            }
            s if s.starts_with('"') => Ty::Literal(s[1..].to_string()),
            s if s.parse::<u64>().is_ok() => Ty::Number(s.parse().unwrap()),
            s if s.chars().all(|c| c.is_ascii_uppercase() || c == '_') => Ty::Named(t),
            s => panic!("unexpected {s:?} in the README's schema block"),
        }
    }

    /// After `{`: `"key": TYPE` or a bare `"key"` (an integer), separated by commas.
    fn object(&mut self) -> Ty {
        let mut keys = BTreeMap::new();
        while self.peek() != "}" {
            let key = self.next();
            let key = key
                .strip_prefix('"')
                .unwrap_or_else(|| panic!("a quoted key in the README's schema, not {key:?}"))
                .to_string();
            let ty = if self.peek() == ":" {
                self.at += 1;
                self.ty()
            } else {
                Ty::Int
            };
            keys.insert(key, ty);
            if self.peek() == "," {
                self.at += 1;
            }
        }
        self.expect("}");
        Ty::Object(keys)
    }
}
