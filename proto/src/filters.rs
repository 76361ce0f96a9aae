//! containerd's filter language, as List calls carry it.
//!
//! ```text
//! selectors := selector ("," selector)*        all must match
//! selector  := fieldpath (operator value)?     no operator: the field is present
//! fieldpath := field ("." field)*
//! field     := quoted | [A-Za-z0-9_]+
//! operator  := "==" | "!=" | "~="              "~=" is a regular expression
//! value     := quoted | [^\s,]+
//! quoted    := "..." (Go string syntax); after "~=" also /.../ or |...|
//! ```
//! Several filter strings are alternatives: an object matches when any does,
//! and no filter at all matches everything (containerd's `filters.ParseAll`).

use regex::Regex;

/// A filter string that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("filter {input:?}: {msg} (at byte {pos})")]
pub struct FilterError {
    input: String,
    pos: usize,
    msg: String,
}

/// What a filter reads from the object it is matched against.
pub trait Adaptor {
    /// The value at `path` (`["labels", "a.b"]`), or `None` when absent.
    fn field(&self, path: &[String]) -> Option<&str>;
}

#[derive(Debug, Clone)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

#[derive(Debug, Clone)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

impl Selector {
    fn matches(&self, a: &dyn Adaptor) -> bool {
        let v = a.field(&self.path);
        match &self.op {
            Op::Present => v.is_some(),
            Op::Equal(want) => v == Some(want.as_str()),
            // As containerd: an absent field is the empty string here.
            Op::NotEqual(want) => v.unwrap_or("") != want,
            Op::Matches(re) => re.is_match(v.unwrap_or("")),
        }
    }
}

/// A parsed set of filters: any of its alternatives, each all of its selectors.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    any: Vec<Vec<Selector>>,
}

impl Filter {
    /// Parses containerd filter strings; empty strings and an empty list match all.
    pub fn parse_all<S: AsRef<str>>(filters: &[S]) -> Result<Filter, FilterError> {
        let mut any = Vec::new();
        for f in filters {
            let f = f.as_ref();
            if f.is_empty() {
                return Ok(Filter::default());
            }
            any.push(Parser::new(f).selectors()?);
        }
        Ok(Filter { any })
    }

    /// True when the filter matches everything.
    pub fn is_always(&self) -> bool {
        self.any.is_empty()
    }

    /// Whether the object matches.
    pub fn matches(&self, a: &dyn Adaptor) -> bool {
        self.any.is_empty() || self.any.iter().any(|all| all.iter().all(|s| s.matches(a)))
    }

    /// If the filter is exactly one `FIELD==value` selector, that value:
    /// lets a store answer it from an index instead of a scan.
    pub fn single_equal(&self, field: &str) -> Option<&str> {
        match self.any.as_slice() {
            [all] => match all.as_slice() {
                [Selector {
                    path,
                    op: Op::Equal(v),
                }] if path.len() == 1 && path[0] == field => Some(v),
                _ => None,
            },
            _ => None,
        }
    }
}

#[derive(Debug, PartialEq)]
enum Tok {
    Eof,
    Field(String),
    Value(String),
    Quoted(String),
    Sep(char),
    Op(String),
}

struct Parser<'a> {
    input: &'a str,
    pos: usize,
    /// The scanner is after an operator: the next bare token is a value.
    value: bool,
}

fn is_field_char(c: char) -> bool {
    c == '_' || c.is_ascii_alphanumeric()
}

fn is_value_char(c: char) -> bool {
    c != ',' && !c.is_whitespace() && !c.is_control()
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Self {
        Parser {
            input,
            pos: 0,
            value: false,
        }
    }

    fn err(&self, pos: usize, msg: impl Into<String>) -> FilterError {
        FilterError {
            input: self.input.to_string(),
            pos,
            msg: msg.into(),
        }
    }

    fn rest(&self) -> &'a str {
        &self.input[self.pos..]
    }

    fn peek_char(&self) -> Option<char> {
        self.rest().trim_start().chars().next()
    }

    /// Scans one token; returns its start.
    fn scan(&mut self) -> Result<(usize, Tok), FilterError> {
        let trimmed = self.rest().trim_start();
        self.pos = self.input.len() - trimmed.len();
        let start = self.pos;
        let Some(c) = trimmed.chars().next() else {
            return Ok((start, Tok::Eof));
        };
        if c == '\0' {
            return Err(self.err(start, "unexpected null"));
        }
        if matches!(c, '"' | '/' | '|') {
            let s = self.scan_quoted(c)?;
            return Ok((start, Tok::Quoted(s)));
        }
        if matches!(c, ',' | '.') {
            self.pos += 1;
            self.value = false;
            return Ok((start, Tok::Sep(c)));
        }
        if matches!(c, '=' | '!' | '~') {
            let n = trimmed
                .find(|c: char| !matches!(c, '=' | '!' | '~'))
                .unwrap_or(trimmed.len());
            self.pos += n;
            self.value = true;
            return Ok((start, Tok::Op(trimmed[..n].to_string())));
        }
        if self.value {
            let n = trimmed
                .find(|c: char| !is_value_char(c))
                .unwrap_or(trimmed.len());
            self.pos += n;
            self.value = false;
            return Ok((start, Tok::Value(trimmed[..n].to_string())));
        }
        if is_field_char(c) {
            let n = trimmed
                .find(|c: char| !is_field_char(c))
                .unwrap_or(trimmed.len());
            self.pos += n;
            return Ok((start, Tok::Field(trimmed[..n].to_string())));
        }
        Err(self.err(start, format!("unexpected input: {c:?}")))
    }

    /// Reads a quoted literal that starts at `self.pos` and unquotes it.
    fn scan_quoted(&mut self, quote: char) -> Result<String, FilterError> {
        let start = self.pos;
        let mut out = String::new();
        let mut chars = self.input[start + 1..].char_indices();
        while let Some((i, c)) = chars.next() {
            if c == quote {
                self.pos = start + 1 + i + c.len_utf8();
                return Ok(out);
            }
            match c {
                '\n' => break,
                '\\' => {
                    let Some((_, e)) = chars.next() else { break };
                    let simple = match e {
                        'a' => Some('\x07'),
                        'b' => Some('\x08'),
                        'f' => Some('\x0c'),
                        'n' => Some('\n'),
                        'r' => Some('\r'),
                        't' => Some('\t'),
                        'v' => Some('\x0b'),
                        '\\' => Some('\\'),
                        c if c == quote => Some(c),
                        _ => None,
                    };
                    if let Some(s) = simple {
                        out.push(s);
                        continue;
                    }
                    let (radix, digits, first) = match e {
                        '0'..='7' => (8, 3, Some(e)),
                        'x' => (16, 2, None),
                        'u' => (16, 4, None),
                        'U' => (16, 8, None),
                        _ => return Err(self.err(start + 1 + i, "illegal escape sequence")),
                    };
                    let mut text: String = first.into_iter().collect();
                    while text.len() < digits {
                        match chars.next() {
                            Some((_, d)) if d.is_digit(radix) => text.push(d),
                            _ => {
                                return Err(
                                    self.err(start + 1 + i, "illegal numeric escape sequence")
                                )
                            }
                        }
                    }
                    let v = u32::from_str_radix(&text, radix)
                        .ok()
                        .and_then(char::from_u32)
                        .ok_or_else(|| self.err(start + 1 + i, "invalid escaped character"))?;
                    out.push(v);
                }
                c => out.push(c),
            }
        }
        Err(self.err(start, "quoted literal not terminated"))
    }

    fn selectors(&mut self) -> Result<Vec<Selector>, FilterError> {
        let mut all = vec![self.selector()?];
        loop {
            let (pos, tok) = self.scan()?;
            match tok {
                Tok::Eof => return Ok(all),
                Tok::Sep(',') => all.push(self.selector()?),
                _ => return Err(self.err(pos, "expected `,` or the end")),
            }
        }
    }

    fn field(&mut self) -> Result<String, FilterError> {
        let (pos, tok) = self.scan()?;
        match tok {
            Tok::Field(f) => Ok(f),
            Tok::Quoted(q) if self.input[pos..].starts_with('"') => Ok(q),
            _ => Err(self.err(pos, "expected a field name or a quoted field")),
        }
    }

    fn selector(&mut self) -> Result<Selector, FilterError> {
        let mut path = vec![self.field()?];
        while self.peek_char() == Some('.') {
            self.scan()?;
            path.push(self.field()?);
        }
        match self.peek_char() {
            None | Some(',') => {
                return Ok(Selector {
                    path,
                    op: Op::Present,
                })
            }
            _ => {}
        }
        let (pos, tok) = self.scan()?;
        let Tok::Op(op) = tok else {
            return Err(self.err(pos, "expected an operator (\"==\", \"!=\" or \"~=\")"));
        };
        let (vpos, vtok) = self.scan()?;
        let value = match vtok {
            Tok::Value(v) | Tok::Field(v) => v,
            Tok::Quoted(q) if op == "~=" || self.input[vpos..].starts_with('"') => q,
            Tok::Eof => return Err(self.err(vpos, "expected a value, found the end")),
            _ => return Err(self.err(vpos, "expected a value or a quoted value")),
        };
        let op = match op.as_str() {
            "==" => Op::Equal(value),
            "!=" => Op::NotEqual(value),
            "~=" => Op::Matches(
                Regex::new(&value).map_err(|e| self.err(vpos, format!("bad regexp: {e}")))?,
            ),
            other => return Err(self.err(pos, format!("unsupported operator {other:?}"))),
        };
        Ok(Selector { path, op })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Obj(HashMap<String, String>, HashMap<String, String>);

    impl Adaptor for Obj {
        fn field(&self, path: &[String]) -> Option<&str> {
            match path.first().map(String::as_str) {
                Some("labels") => self.1.get(&path[1..].join(".")).map(String::as_str),
                Some(f) if path.len() == 1 => self.0.get(f).map(String::as_str),
                _ => None,
            }
        }
    }

    fn obj(fields: &[(&str, &str)], labels: &[(&str, &str)]) -> Obj {
        let m = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        Obj(m(fields), m(labels))
    }

    fn f(s: &[&str]) -> Filter {
        Filter::parse_all(s).expect("parses")
    }

    #[test]
    fn containerd_forms() {
        let o = obj(
            &[
                ("name", "default/3/sha256:ab"),
                ("kind", "committed"),
                ("parent", "p1"),
            ],
            &[("containerd.io/gc.root", "x"), ("a", "b c")],
        );
        assert!(f(&[]).matches(&o));
        assert!(f(&[""]).matches(&o));
        assert!(f(&["parent==p1"]).matches(&o));
        assert!(!f(&["parent==p2"]).matches(&o));
        assert!(f(&["labels.\"containerd.io/gc.root\""]).matches(&o));
        assert!(!f(&["labels.\"containerd.io/gc.other\""]).matches(&o));
        assert!(f(&["kind==committed,parent==p1"]).matches(&o));
        assert!(!f(&["kind==active,parent==p1"]).matches(&o));
        assert!(f(&["kind==active", "parent==p1"]).matches(&o));
        assert!(f(&["name~=sha256"]).matches(&o));
        assert!(f(&["name~=/^default\\//"]).matches(&o));
        assert!(!f(&["name~=^other"]).matches(&o));
        assert!(f(&["labels.a==\"b c\""]).matches(&o));
        assert!(f(&["labels.missing!=x"]).matches(&o));
        assert!(f(&[" kind == committed "]).matches(&o));
        assert_eq!(f(&["parent==p1"]).single_equal("parent"), Some("p1"));
        assert_eq!(f(&["parent==p1,kind==x"]).single_equal("parent"), None);
    }

    #[test]
    fn errors_name_the_place() {
        for bad in [
            "kind=",
            "kind==",
            "==x",
            "kind==\"x",
            "a,,b",
            "name~=(",
            "kind<x",
        ] {
            let e = Filter::parse_all(&[bad]).expect_err(bad);
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }
}
